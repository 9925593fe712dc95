"""Every result survives: malicious checkpoints are refused by every command, a finished run is
never silently replaced, and leftovers of killed processes are cleared."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, unwrap
from test_bad_inputs import evil_checkpoint

from brainseg_dist import checkpoint
from brainseg_dist.checkpoint import load_state
from brainseg_dist.config import load_config
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write_json, dumps_strict
from brainseg_dist.rundir import prepare_run_dir


def run_copy(trained_run, dest):
    dest.mkdir()
    for name in ("config.yaml", "split.json", "metrics.jsonl", "best.pt", "last.pt"):
        shutil.copy2(trained_run / name, dest / name)
    os.symlink(trained_run / "synthetic", dest / "synthetic")
    return dest


@pytest.fixture(scope="module")
def evil_run(trained_run, tmp_path_factory):
    """A run whose best.pt and last.pt would run ``touch MARKER`` when unpickled."""
    tmp = tmp_path_factory.mktemp("evil")
    run = run_copy(trained_run, tmp / "run")
    marker = tmp / "PWNED"
    evil_checkpoint(run / "best.pt", marker)
    evil_checkpoint(run / "last.pt", marker)
    return run, marker


@pytest.mark.parametrize("command", ["export", "evaluate", "predict", "resume", "validate-only"])
def test_malicious_checkpoint_is_refused_by_every_command(command, evil_run, trained_run,
                                                          tmp_path):
    run, marker = evil_run
    inputs = trained_run / "synthetic" / "kaggle_3m"
    folder = sorted(p for p in inputs.iterdir() if p.is_dir())[0]
    args = {
        "export": ["export", run, "--no-pt2"],
        "evaluate": ["evaluate", run, "--out", tmp_path / "eval"],
        "predict": ["predict", run, folder / f"{folder.name}_1.tif", tmp_path / "pred"],
        "resume": ["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"],
        "validate-only": ["train", "--config", run / "config.yaml", "--output-dir", run,
                          "--validate-only", run / "best.pt"],
    }[command]
    checkpoint = run / ("last.pt" if command == "resume" else "best.pt")
    proc = run_cli(args)
    err = unwrap(proc.stderr)
    assert proc.returncode == 1, err
    assert "Traceback" not in err + proc.stdout
    assert f"{checkpoint}: refused to open" in err
    assert "posix.system" in err
    assert not marker.exists()
    assert not (run / "model.ts").exists()


def test_package_never_loads_unsafely():
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "brainseg_dist"
    offenders = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


def test_checkpoints_load_with_weights_only(trained_run):
    for name in ("best.pt", "last.pt"):
        state = load_state(trained_run / name)
        assert state["history"][-1]["epoch"] == state["epoch"]
        assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_state_round_trip():
    import random

    import numpy as np

    from brainseg_dist.checkpoint import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = rng_state()
    expected = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state)
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == expected


# ----------------------------------------------------------------------------- run directory
def fake_finished_run(out):
    out.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "split.json",
                 "model.ts", "model.pt2"):
        (out / name).write_text(name)
    (out / "eval_test").mkdir()
    (out / "eval_test" / "summary.json").write_text("{}")
    (out / "tensorboard").mkdir()
    (out / "synthetic").mkdir()
    (out / "synthetic" / "keep.txt").write_text("dataset")
    return out


def test_finished_run_needs_resume_or_overwrite(tmp_path):
    out = fake_finished_run(tmp_path / "run")
    with pytest.raises(BrainsegError, match="use --resume to continue it or --overwrite"):
        prepare_run_dir(out)
    assert (out / "best.pt").read_text() == "best.pt"


def test_overwrite_removes_the_old_run_with_its_exports_and_evaluations(tmp_path):
    out = fake_finished_run(tmp_path / "run")
    prepare_run_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["synthetic"]
    assert (out / "synthetic" / "keep.txt").is_file()


def test_cli_overwrite_trains_again(trained_run, tmp_path):
    run = run_copy(trained_run, tmp_path / "run")
    (run / "model.ts").write_text("stale export of the old best.pt")
    (run / "eval_test").mkdir()
    old_best = (run / "best.pt").read_bytes()
    args = ["train", "--config", run / "config.yaml", "--output-dir", run, "--epochs", "1",
            "--set", "train.export=false", "--set", "model.base_width=4",
            "--image-size", "32"]
    refused = run_cli(args)
    assert refused.returncode == 1
    assert (run / "best.pt").read_bytes() == old_best
    done = run_cli([*args, "--overwrite"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (run / "model.ts").exists()
    assert not (run / "eval_test").exists()
    assert checkpoint.load(run / "best.pt").config.model.base_width == 4


def test_stale_temporaries_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    (out / "synthetic" / "kaggle_3m" / "P").mkdir(parents=True)
    stale = [out / ".last.pt.abc123.tmp", out / ".metrics.jsonl.x.tmp",
             out / "synthetic" / "kaggle_3m" / "P" / ".P_1.tif.q.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    (out / ".pred.k2.tmp").mkdir()  # a staging folder of a killed predict
    keep = out / "notes.tmp"  # not a name atomic_write makes
    keep.write_text("mine")
    prepare_run_dir(out)
    assert not any(p.exists() for p in [*stale, out / ".pred.k2.tmp"])
    assert keep.read_text() == "mine"


# ----------------------------------------------------------------------------- synthetic set
def test_synthetic_set_is_keyed_by_its_parameters(tmp_path):
    from brainseg_dist.train import prepare_data_dir

    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

    def prepare(patients, seed):
        cfg = load_config(None, {"train.output_dir": str(tmp_path), "train.seed": seed,
                                 "data.synthetic_patients": patients})
        root = prepare_data_dir(cfg, acc)
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    three = prepare(3, 0)
    assert len(three) == 3
    assert prepare(3, 0) == three  # same parameters: reused
    assert len(prepare(4, 0)) == 4  # more patients: regenerated, not the stale 3
    assert prepare(4, 1) != prepare(4, 0)  # other seed: other patients


# ----------------------------------------------------------------------------- strict JSON
def test_json_outputs_write_null_not_nan(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}
    assert dumps_strict({"v": float("-inf")}) == '{"v": null}'


def strict_loads(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_damaged_metrics_are_rebuilt_from_last_pt_on_resume(trained_run, tmp_path):
    """metrics.jsonl is rewritten from last.pt's history on --resume, with null for NaN."""
    from brainseg_dist.train import run_training

    run = run_copy(trained_run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=True)
    state["history"][0]["val_dice_tumour_slices"] = float("nan")
    torch.save(state, run / "last.pt")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 0.5}\n{"epoch": 1, "tr')
    cfg = load_config(run / "config.yaml", {"train.output_dir": str(run)})
    result = run_training(cfg, resume=True)  # every epoch already done: nothing to train
    rows = [strict_loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["val_dice_tumour_slices"] is None
    assert rows[1]["val_loss"] == pytest.approx(state["history"][1]["val_loss"])
    assert result.epochs_run == 2


def test_evaluate_with_damaged_metrics_warns_and_still_scores(trained_run, tmp_path):
    run = run_copy(trained_run, tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 1.0}\n{"epo')
    proc = run_cli(["evaluate", run, "--out", tmp_path / "eval"])
    err = unwrap(proc.stderr)
    assert proc.returncode == 0, err
    assert f"{run / 'metrics.jsonl'}: damaged metrics file: line 2" in err
    assert not (tmp_path / "eval" / "training_curves.png").exists()
    summary = strict_loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["patients"] >= 1
