"""Bad-input matrix: every user mistake ends in one clear line, never a traceback, and no file
that existed before is changed.

Each case builds its damaged input in its own folder (next to read-only copies of a trained
run), runs the real CLI in-process, and checks:

* exit status 1 (2 for a click usage error);
* no ``Traceback`` in the output and no exception escaping the command;
* the offending path, key or flag named in the output (and, where a wrong culprit was named
  before, that it is not);
* every file under the case folder and the shared run byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tifffile
import torch
import yaml
from click.testing import CliRunner
from helpers import make_patient, rng_image, square_mask, truncate_half, write_image

from brainseg_dist.cli import main
from brainseg_dist.pipeline import quiet_jit_deprecation


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Workspace:
    """Read-only trained run, its model.ts and a small input folder, shared by all cases."""

    run: Path
    model_ts: Path
    inputs: Path  # a patient folder of 3 slices (with masks) for predict


@pytest.fixture(scope="module")
def workspace(trained_run, trained_model_ts, tmp_path_factory) -> Workspace:
    src = trained_run / "synthetic" / "kaggle_3m"
    folder = sorted(p for p in src.iterdir() if p.is_dir())[0]
    inputs = tmp_path_factory.mktemp("matrix_inputs") / folder.name
    inputs.mkdir()
    for n in (1, 2, 3):
        for name in (f"{folder.name}_{n}.tif", f"{folder.name}_{n}_mask.tif"):
            shutil.copy2(folder / name, inputs / name)
    return Workspace(trained_run, trained_model_ts, inputs)


@dataclass
class Case:
    """Everything one case needs: its folder, and what it must produce."""

    ws: Workspace
    dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def run_copy(self, *names: str) -> Path:
        """A copy of the trained run's small files (the synthetic set is linked)."""
        run = self.dir / "run"
        run.mkdir(exist_ok=True)
        for name in names or ("config.yaml", "split.json", "metrics.jsonl", "best.pt",
                              "last.pt"):
            shutil.copy2(self.ws.run / name, run / name)
        os.symlink(self.ws.run / "synthetic", run / "synthetic")
        return run

    def config(self, text: str) -> Path:
        path = self.dir / "config.yaml"
        path.write_text(text)
        return path

    def root(self, slices=(1, 2, 3)) -> Path:
        """A valid one-patient dataset root."""
        root = self.dir / "root"
        make_patient(root, "TCGA_CS_4941_19960909", slices)
        return root


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose unpickling would run ``touch MARKER`` (os.system)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(path, weights_only=True) if path.is_file() else {}
    state["payload"] = Payload()
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- the cases
# Each returns (CLI args, expected exit status, strings the output must contain[, strings it
# must not contain]).
Setup = Callable[[Case], tuple]
CASES: dict[str, tuple[str, Setup]] = {}


def case(kind: str):
    def register(fn: Setup) -> Setup:
        CASES[fn.__name__] = (kind, fn)
        return fn
    return register


# --- data
@case("data")
def root_is_a_file(c):
    f = c.dir / "kaggle_3m"
    f.write_text("x")
    return ["data", "summary", f], 1, [str(f), "is a file"], ["not found"]


@case("data")
def root_missing(c):
    return ["data", "summary", c.dir / "nope"], 1, [str(c.dir / "nope"), "not found"]


@case("data")
def data_csv_numeric_patient(c):
    root = c.root()
    (root / "data.csv").write_text("Patient,age\n123,40\n")
    return ["data", "summary", root], 1, [str(root / "data.csv"), "'Patient'", "numbers"]


@case("data")
def data_csv_blank_patient(c):
    root = c.root()
    (root / "data.csv").write_text("Patient,age\nTCGA_CS_4941,40\n,41\n")
    return ["data", "summary", root], 1, [str(root / "data.csv"), "blank on line(s) 3"]


@case("data")
def data_csv_without_patient_column(c):
    root = c.root()
    (root / "data.csv").write_text("Name,age\nx,40\n")
    return ["data", "summary", root], 1, [str(root / "data.csv"), "'Patient'"]


@case("data")
def slice_tif_and_tiff_twins(c):
    root = c.root()
    folder = root / "TCGA_CS_4941_19960909"
    shutil.copy2(folder / f"{folder.name}_2.tif", folder / f"{folder.name}_2.tiff")
    return ["data", "summary", root], 1, [f"{folder.name}_2.tif", f"{folder.name}_2.tiff",
                                          "slice number 2 again"]


@case("data")
def slice_number_with_leading_zero(c):
    root = c.root()
    folder = root / "TCGA_CS_4941_19960909"
    write_image(folder / f"{folder.name}_01.tif", rng_image(9))
    write_image(folder / f"{folder.name}_01_mask.tif", square_mask())
    return ["data", "summary", root], 1, [f"{folder.name}_01.tif", f"{folder.name}_1.tif"]


@case("data")
def truncated_slice(c):
    root = c.root()
    bad = truncate_half(root / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_2.tif")
    return ["data", "summary", root], 1, [str(bad)]


@case("data")
def non_binary_mask(c):
    root = c.root()
    bad = root / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_3_mask.tif"
    write_image(bad, square_mask(value=128) + 1)
    return ["data", "summary", root], 1, [str(bad), "not binary"]


@case("data")
def cache_env_is_a_file(c):
    root = c.root()
    f = c.dir / "cachefile"
    f.write_text("x")
    c.env["BRAINSEG_CACHE_DIR"] = str(f)
    return ["data", "summary", root], 1, [str(f), "BRAINSEG_CACHE_DIR", "is a file"]


@case("data")
def cache_option_is_a_file(c):
    f = c.dir / "cachefile"
    f.write_text("x")
    return ["data", "summary", c.root(), "--cache-dir", f], 2, ["--cache-dir", str(f)]


@case("data")
def summary_figures_not_writable(c):
    blocker = c.dir / "file"
    blocker.write_text("x")
    return (["data", "summary", c.root(), "--figures", blocker / "figs"], 1,
            [str(blocker / "figs"), "cannot be written"])


@case("data")
def summary_negative_image_size(c):
    return ["data", "summary", c.root(), "--image-size", "-5"], 2, ["--image-size", "-5"]


@case("data")
def synth_negative_patients(c):
    return ["synth", c.dir / "s", "--patients", "-2"], 2, ["--patients", "-2"]


# --- config
@case("config")
def set_value_not_yaml(c):
    return (["train", "--set", "train.epochs=[1"], 1, ["--set 'train.epochs=[1'",
                                                       "train.epochs", "not valid YAML"])


@case("config")
def yaml_date_value(c):
    cfg = c.config("train:\n  epochs: 2024-01-01\n")
    return ["train", "--config", cfg], 1, [str(cfg), "train.epochs", "date"]


@case("config")
def yaml_negative_weight_decay(c):
    cfg = c.config("optim:\n  weight_decay: -0.1\n")
    return ["train", "--config", cfg], 1, [str(cfg), "optim.weight_decay"]


@case("config")
def set_negative_num_workers_blames_the_flag(c):
    cfg = c.config("train:\n  epochs: 1\n")
    return (["train", "--config", cfg, "--set", "data.num_workers=-1"], 1,
            ["--set data.num_workers=-1", "data.num_workers"], [str(cfg)])


@case("config")
def flag_out_of_range_blames_the_flag(c):
    cfg = c.config("train:\n  epochs: 1\n")
    return (["train", "--config", cfg, "--epochs", "0"], 1, ["--epochs 0", "train.epochs"],
            [str(cfg)])


@case("config")
def flag_image_size_not_divisible(c):
    return ["train", "--image-size", "20"], 1, ["--image-size 20", "data.image_size"]


@case("config")
def set_unknown_key_blames_the_flag(c):
    cfg = c.config("train:\n  epochs: 1\n")
    return (["train", "--config", cfg, "--set", "train.epoch=3"], 1,
            ["--set train.epoch=3", "unknown key 'train.epoch'"], [str(cfg)])


@case("config")
def set_unknown_section(c):
    return ["train", "--set", "trian.epochs=3"], 1, ["--set trian.epochs=3", "'trian'"]


@case("config")
def set_without_equals(c):
    return ["train", "--set", "train.epochs"], 1, ["--set", "train.epochs", "SECTION.KEY=VALUE"]


@case("config")
def yaml_unknown_key(c):
    cfg = c.config("model:\n  widht: 8\n")
    return ["train", "--config", cfg], 1, [str(cfg), "model.widht"]


@case("config")
def yaml_not_parsable(c):
    cfg = c.config("train: [epochs: 1\n")
    return ["train", "--config", cfg], 1, [str(cfg), "not valid YAML"]


@case("config")
def yaml_top_level_list(c):
    cfg = c.config("- 1\n- 2\n")
    return ["train", "--config", cfg], 1, [str(cfg), "mapping"]


@case("config")
def yaml_nan_learning_rate(c):
    cfg = c.config("optim:\n  lr: .nan\n")
    return ["train", "--config", cfg], 1, [str(cfg), "optim.lr", "finite"]


@case("config")
def config_file_missing(c):
    return ["train", "--config", c.dir / "none.yaml"], 1, [str(c.dir / "none.yaml"), "not found"]


@case("config")
def set_negative_seed(c):
    return ["train", "--set", "train.seed=-1"], 1, ["--set train.seed=-1", "train.seed"]


# --- train
@case("train")
def train_into_finished_run(c):
    run = c.run_copy()
    return (["train", "--config", run / "config.yaml", "--output-dir", run], 1,
            [str(run), "--resume", "--overwrite"])


@case("train")
def train_resume_and_overwrite(c):
    run = c.run_copy()
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume",
             "--overwrite"], 1, ["--resume", "--overwrite", str(run)])


@case("train")
def train_output_dir_is_a_file(c):
    f = c.dir / "run"
    f.write_text("x")
    return ["train", "--output-dir", f], 2, ["--output-dir", str(f)]


@case("train")
def train_data_dir_missing(c):
    return (["train", "--data-dir", c.dir / "nodata", "--output-dir", c.dir / "out",
             "--epochs", "1"], 1, [str(c.dir / "nodata"), "not found"])


@case("train")
def validate_only_zero_byte_checkpoint(c):
    run = c.run_copy()
    ckpt = c.dir / "empty.pt"
    ckpt.write_bytes(b"")
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--validate-only",
             ckpt], 1, [str(ckpt), "0 bytes"], ["Aborted"])


@case("train")
def validate_only_not_a_checkpoint(c):
    run = c.run_copy()
    ckpt = c.dir / "tensor.pt"
    torch.save(torch.zeros(3), ckpt)
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--validate-only",
             ckpt], 1, [str(ckpt), "not a brainseg checkpoint"])


# --- resume
@case("resume")
def resume_without_last_pt(c):
    run = c.run_copy("config.yaml", "split.json")
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"], 1,
            [str(run / "last.pt"), "nothing to resume"])


@case("resume")
def resume_zero_byte_last_pt(c):
    run = c.run_copy()
    (run / "last.pt").write_bytes(b"")
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"], 1,
            [str(run / "last.pt"), "0 bytes"], ["Aborted"])


@case("resume")
def resume_truncated_last_pt(c):
    run = c.run_copy()
    truncate_half(run / "last.pt")
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"], 1,
            [str(run / "last.pt"), "unreadable checkpoint"])


@case("resume")
def resume_last_pt_missing_keys(c):
    run = c.run_copy()
    state = torch.load(run / "last.pt", weights_only=True)
    del state["rng"]
    torch.save(state, run / "last.pt")
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"], 1,
            [str(run / "last.pt"), "missing rng"])


@case("resume")
def resume_damaged_split_json(c):
    run = c.run_copy()
    (run / "split.json").write_text('{"train": ["a"')
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume"], 1,
            [str(run / "split.json"), "damaged split file"])


@case("resume")
def resume_with_other_config(c):
    run = c.run_copy()
    return (["train", "--config", run / "config.yaml", "--output-dir", run, "--resume",
             "--set", "model.depth=3"], 1, [str(run / "last.pt"), "different config"])


# --- evaluate
@case("evaluate")
def evaluate_run_dir_missing(c):
    return ["evaluate", c.dir / "nope"], 1, [str(c.dir / "nope"), "run directory not found"]


@case("evaluate")
def evaluate_run_dir_is_a_file(c):
    f = c.dir / "run"
    f.write_text("x")
    return ["evaluate", f], 2, [str(f)]


@case("evaluate")
def evaluate_batch_size_zero(c):
    return ["evaluate", c.ws.run, "--batch-size", "0"], 2, ["--batch-size", "0"]


@case("evaluate")
def evaluate_bad_device(c):
    return (["evaluate", c.ws.run, "--device", "gpu7"], 1, ["--device gpu7"],
            ["checkpoint", "model"])


@case("evaluate")
def evaluate_damaged_split_json(c):
    run = c.run_copy()
    (run / "split.json").write_text("{not json")
    return ["evaluate", run], 1, [str(run / "split.json"), "damaged split file"]


@case("evaluate")
def evaluate_split_json_wrong_shape(c):
    run = c.run_copy()
    (run / "split.json").write_text('{"test": "TCGA_CS_4941"}')
    return ["evaluate", run], 1, [str(run / "split.json"), "list of patient IDs"]


@case("evaluate")
def evaluate_truncated_best_pt(c):
    run = c.run_copy()
    truncate_half(run / "best.pt")
    return ["evaluate", run], 1, [str(run / "best.pt"), "unreadable checkpoint"]


@case("evaluate")
def evaluate_missing_checkpoint(c):
    return (["evaluate", c.ws.run, "--checkpoint", c.dir / "gone.pt"], 1,
            [str(c.dir / "gone.pt"), "checkpoint not found"])


@case("evaluate")
def evaluate_out_not_writable(c):
    blocker = c.dir / "file"
    blocker.write_text("x")
    return (["evaluate", c.ws.run, "--out", blocker / "eval"], 1,
            [str(blocker / "eval"), "cannot be written"])


# --- export
@case("export")
def export_zero_byte_best_pt(c):
    run = c.run_copy()
    (run / "best.pt").write_bytes(b"")
    return ["export", run, "--no-pt2"], 1, [str(run / "best.pt"), "0 bytes"], ["Aborted"]


@case("export")
def export_negative_tolerance(c):
    return ["export", c.ws.run, "--tolerance", "-1"], 2, ["--tolerance", "-1"]


@case("export")
def export_out_not_writable(c):
    blocker = c.dir / "file"
    blocker.write_text("x")
    return (["export", c.ws.run, "--out", blocker / "model.ts", "--no-pt2"], 1,
            [f"{blocker}: folder of --out is a file"])


@case("export")
def export_weights_of_another_model(c):
    run = c.run_copy()
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"]["model"]["base_width"] = 3  # the U-Net's shape comes from the config
    torch.save(state, run / "best.pt")
    return ["export", run, "--no-pt2"], 1, [str(run / "best.pt"), "do not fit"]


# --- predict
@case("predict")
def predict_batch_size_zero(c):
    return (["predict", c.ws.model_ts, c.ws.inputs, c.dir / "out", "--batch-size", "0"], 2,
            ["--batch-size", "0"])


@case("predict")
def predict_foreign_torchscript(c):
    foreign = c.dir / "other.ts"
    with quiet_jit_deprecation():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(foreign))
    return (["predict", foreign, c.ws.inputs, c.dir / "out"], 1,
            [str(foreign), "not a brainseg segmentation model"])


def rewritten_model(c, name: str, metadata: str | None, format_version: int = 1) -> Path:
    """The trained model.ts saved again with other metadata or format version."""
    with quiet_jit_deprecation():
        module = torch.jit.load(str(c.ws.model_ts))
        module.format_version = format_version
        path = c.dir / name
        files = {} if metadata is None else {"metadata.json": metadata}
        torch.jit.save(module, str(path), _extra_files=files)
    return path


@case("predict")
def predict_model_from_a_newer_version(c):
    model = rewritten_model(c, "newer.ts", None, format_version=99)
    return (["predict", model, c.ws.inputs, c.dir / "out"], 1,
            [str(model), "format version 99 is newer"])


@case("predict")
def predict_model_with_damaged_metadata(c):
    model = rewritten_model(c, "damaged.ts", '{"threshold": ')
    return (["predict", model, c.ws.inputs, c.dir / "out"], 1,
            [str(model), "damaged metadata.json"])


@case("predict")
def predict_model_missing(c):
    return (["predict", c.dir / "model.ts", c.ws.inputs, c.dir / "out"], 1,
            [str(c.dir / "model.ts"), "not found"])


@case("predict")
def predict_bad_device(c):
    return (["predict", c.ws.model_ts, c.ws.inputs, c.dir / "out", "--device", "tpu"], 1,
            ["--device tpu"], ["not a loadable"])


@case("predict")
def predict_threshold_out_of_range(c):
    return (["predict", c.ws.model_ts, c.ws.inputs, c.dir / "out", "--threshold", "1.5"], 2,
            ["--threshold", "1.5"])


@case("predict")
def predict_tif_and_tiff_twins(c):
    folder = c.dir / c.ws.inputs.name
    shutil.copytree(c.ws.inputs, folder)
    twin = folder / f"{folder.name}_2.tiff"
    shutil.copy2(folder / f"{folder.name}_2.tif", twin)
    return (["predict", c.ws.model_ts, folder, c.dir / "out"], 1,
            [str(twin), f"{folder.name}_2.tif"])


@case("predict")
def predict_out_not_writable(c):
    blocker = c.dir / "file"
    blocker.write_text("x")
    return (["predict", c.ws.model_ts, c.ws.inputs, blocker / "out"], 1,
            [f"{blocker}: folder of OUT is a file"])


@case("predict")
def predict_out_holds_other_files(c):
    out = c.dir / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return (["predict", c.ws.model_ts, c.ws.inputs, out], 1, [str(out), "not empty"])


@case("predict")
def predict_truncated_pixels_keep_earlier_out(c):
    """The earlier OUT of a successful run stays byte-identical when the next run fails on a
    slice whose header passes the pre-check but whose pixel data is cut off."""
    root = c.dir / "root"  # two patient folders: the first is written before the second fails
    shutil.copytree(c.ws.inputs, root / "A")
    shutil.copytree(c.ws.inputs, root / "B")
    out = c.dir / "out"
    first = CliRunner().invoke(main, ["predict", str(c.ws.model_ts), str(root), str(out)])
    assert first.exit_code == 0, first.output
    # A new image in A: its new overlay differs from the earlier one written to OUT.
    write_image(root / "A" / f"{c.ws.inputs.name}_1.tif", rng_image(5))
    bad = root / "B" / f"{c.ws.inputs.name}_3.tif"
    with open(bad, "r+b") as f:  # header and IFD stay; the strip data is cut
        f.truncate(bad.stat().st_size - 4096)
    with tifffile.TiffFile(bad) as tif:  # the header pre-check passes
        assert tif.series[0].shape == (256, 256, 3)
    return ["predict", c.ws.model_ts, root, out], 1, [str(bad)]


@case("predict")
def predict_input_is_a_mask(c):
    mask = c.ws.inputs / f"{c.ws.inputs.name}_1_mask.tif"
    return ["predict", c.ws.model_ts, mask, c.dir / "out"], 1, [str(mask), "ground-truth mask"]


# ----------------------------------------------------------------------------- the test
_HASHES: dict[tuple, str] = {}


def tree_state(*folders: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file below the folders (hashes cached by inode, size and
    change time, so the shared read-only run is hashed once)."""
    state = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            st = p.stat()
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            state[str(p)] = _HASHES[key]
    return state


def test_at_least_forty_cases_over_every_stage():
    kinds = {kind for kind, _ in CASES.values()}
    assert kinds == {"data", "config", "train", "resume", "evaluate", "export", "predict"}
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, workspace, tmp_path, monkeypatch):
    c = Case(workspace, tmp_path)
    args, status, named, *rest = CASES[name][1](c)
    not_named = rest[0] if rest else []
    for key, value in c.env.items():
        monkeypatch.setenv(key, value)
    before = tree_state(tmp_path, workspace.run, workspace.inputs)
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    assert result.exit_code == status, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    for text in named:
        assert text in output, f"{text!r} not named in: {output}"
    for text in not_named:
        assert text not in output, f"{text!r} wrongly named in: {output}"
    after = tree_state(tmp_path, workspace.run, workspace.inputs)
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed"
    assert set(before) <= set(after), "a file was removed"


def test_cases_cover_the_issue_list():
    """The issue's examples are all cases (so none is silently dropped from the matrix)."""
    for name in ("data_csv_numeric_patient", "data_csv_blank_patient", "cache_env_is_a_file",
                 "set_value_not_yaml", "yaml_date_value", "yaml_negative_weight_decay",
                 "set_negative_num_workers_blames_the_flag", "resume_truncated_last_pt",
                 "evaluate_damaged_split_json", "evaluate_batch_size_zero",
                 "predict_batch_size_zero", "predict_foreign_torchscript",
                 "predict_out_not_writable", "resume_zero_byte_last_pt",
                 "slice_tif_and_tiff_twins", "slice_number_with_leading_zero",
                 "predict_truncated_pixels_keep_earlier_out", "predict_tif_and_tiff_twins",
                 "summary_negative_image_size", "synth_negative_patients",
                 "evaluate_bad_device", "root_is_a_file"):
        assert name in CASES, name


def test_yaml_dates_become_text_for_text_keys(tmp_path):
    from brainseg_dist.config import load_config

    cfg = load_config(None, {"train.output_dir": yaml.safe_load("2024-01-01")})
    assert cfg.train.output_dir == "2024-01-01"


def test_marker_helper_really_runs_code_without_weights_only(tmp_path):
    """The malicious payload used by test_malicious_checkpoint.py is live: an unsafe load
    would run it (so 'marker absent' there means refused, not inert)."""
    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
