"""``benchmarks/gpu_check.sh`` (the prepared GPU verification) in its CPU mode, its time budget,
and ``benchmarks/gpu_cv.py``'s data; apart from test_benchmarks.py so that the slowest file of
benchmark tests is not one unit for pytest-xdist."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_gpu_check_cpu_mode_runs_every_step(tmp_path):
    """``benchmarks/gpu_check.sh --cpu``: the GPU verification's steps, tiny, on the CPU (the
    checks with their CPU stand-ins, throughput --tiny, one epoch of lgg_unet128 shrunk)."""
    import os

    out = tmp_path / "out"
    (out / "partial").mkdir(parents=True)  # an earlier run's leftovers, replaced on --overwrite
    (out / "partial" / "train.json").write_text("{}")
    (out / "throughput.json").write_text("{}")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--overwrite"],
        cwd=tmp_path, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=600, check=False)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-2000:] + log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [  # all that comes back from a GPU run
        "checks.json", "cv.json", "gpu_check.json", "gpu_check.log", "step_ops.json",
        "throughput.json", "train.json"]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["all_checks_ok"]
    assert set(summary["checks"]) == {"bf16_autocast", "channels_last", "kornia_on_device",
                                      "device_batches", "no_host_sync", "no_host_sync_fused",
                                      "compiled_augment_draws"}
    assert {name: s["exit_status"] for name, s in summary["steps"].items()} == {
        "kornia": 0, "checks": 0, "throughput": 0, "train": 0, "step_ops": 0, "cv": 0}
    # gpu_cv.py: two recipes cross-validated as --jobs, the second paired with the first.
    cv = summary["cv"]["recipes"]
    assert list(cv) == ["lgg_unet128", "seed_recipe"]
    assert all(0 <= r["headline"]["dice_patient_mean"] <= 1 for r in cv.values())
    assert cv["lgg_unet128"]["paired_mean"] is None
    assert isinstance(cv["seed_recipe"]["paired_mean"], float)
    assert len(json.loads((out / "cv.json").read_text())["recipes"]["seed_recipe"]
               ["per_patient"]) == 4
    calls = summary["host_calls_per_step"]
    assert calls["optim.implementation: fused"]["optimizer"] <= 2
    assert calls["as configured"]["total"] > calls["optim.implementation: fused"]["total"]
    for row in calls.values():  # timed on a CPU; kernel time and launches only on CUDA
        assert _positive(row["wall_ms"])
        assert row["device_ms"] is row["kernel_launches"] is None
    # Nothing is compiled in --cpu mode (and train.compile leaves a CPU's augmentation eager).
    assert summary["criteria"].pop("augment_share_of_compiled_step")["value"] is None
    for name, c in summary["criteria"].items():
        assert _positive(c["value"]), name
        assert isinstance(c["met"], bool), name
    train = summary["train"]
    assert _positive(train["train_images_per_second"][0])
    assert _positive(train["peak_rss_gb"])
    assert json.loads((out / "throughput.json").read_text())["train"]

    # A second run refuses to touch the first one's results, or a killed run's partial/,
    # unless --overwrite says so.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    killed = tmp_path / "killed"
    (killed / "partial").mkdir(parents=True)
    for out_dir, present in ((out, "gpu_check.json"), (killed, "partial")):
        proc = subprocess.run(
            ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=tmp_path,
            env={**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{out_dir / present} is left by an earlier run: pass --overwrite" in proc.stderr
    assert [p.name for p in killed.iterdir()] == ["partial"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_gpu_check_skips_the_steps_its_budget_cannot_hold(tmp_path):
    """GPU_CHECK_BUDGET bounds the whole run (580 s on a GPU, inside the device tool's 600 s
    call): a step gets what is left of it, and none starts with under 10 s left."""
    import os

    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "12"},
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1  # a skipped step is not a passed one
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["steps"] == {name: {"skipped": "out of budget"} for name in
                                ("kornia", "checks", "throughput", "train", "step_ops", "cv")}
    assert "checks: skipped" in (out / "gpu_check.log").read_text()


def test_gpu_cv_unpacks_the_carried_archive_to_a_kaggle_3m_root(real_root, tmp_path):
    """The GPU machine gets the real subset as its archive in .data/: ``gpu_cv.py`` unpacks it
    (with tarfile's data filter) to the kaggle_3m root that ``brainseg cv`` reads; a missing
    archive is one line and exit status 2."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_cv
    from conftest import DEFAULT_ARCHIVE

    archive = Path(os.environ.get("BRAINSEG_LGG_ARCHIVE") or DEFAULT_ARCHIVE)
    root, what = gpu_cv.data_root(argparse.Namespace(archive=archive, synthetic=None), tmp_path)
    assert what == f"real: {archive.name}"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        p.name for p in real_root.iterdir() if p.is_dir())
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_cv.py"), "--archive",
                           str(tmp_path / "none.tar.xz"), "--json", str(tmp_path / "cv.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"gpu_cv: {tmp_path / 'none.tar.xz'}: no such archive "
                                   "(carry it: see gpu_check.sh)")
    assert not (tmp_path / "cv.json").exists()
