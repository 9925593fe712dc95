"""``benchmarks/throughput.py`` runs end to end and writes the JSON it documents.

Structure and sanity only: speed targets live in the benchmark's own output, never in timed
tests (on a shared CI machine they would be flaky).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO
from torch.utils.data import DataLoader, Dataset

from brainseg_dist.train.setup import resolve_mixed_precision

SCRIPT = REPO / "benchmarks" / "throughput.py"
PIPELINE_KEYS = ("images_per_s", "median_step_s", "mean_images_per_s", "best_images_per_s",
                 "speedup_vs_baseline")
ABLATIONS = ("no_device_augment", "no_channels_last", "amp_toggled", "data_toggled",
             "sync_per_step", "adam_toggled")


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--json", str(out), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training throughput" in proc.stdout  # the rich table is always printed
    return json.loads(out.read_text())


def test_tiny_run_writes_every_ratio(tmp_path):
    res = _run(tmp_path, "--no-scaling", "--no-compile", "--baseline-workers", "1")
    assert res["schema"] == 1
    assert res["settings"]["mode"] == "tiny"
    hw = res["hardware"]
    assert hw["cpu_amx"] == (resolve_mixed_precision("auto", "cpu") == "bf16")
    for key in ("device_name", "cpu_model", "cpu_cores_usable", "torch_threads", "torch",
                "kornia", "accelerate"):
        assert hw[key], key

    data = res["data"]
    assert data["source"] == "synthetic"
    assert data["slices"] > 0
    assert data["patients_from_cache"] == data["patients"]  # the second load hit the cache
    for key in ("cold_slices_per_s", "cached_slices_per_s", "cache_speedup"):
        assert _positive(data[key]), key

    train = res["train"]
    assert train["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert train["baseline"]["channels_last"] is False
    assert train["baseline"]["mixed_precision"] == "no"
    assert train["project"]["channels_last"] is True
    # The project default on this CPU: bf16 with AMX, else off; the ablation toggles it.
    cpu_amp = resolve_mixed_precision("auto", "cpu")
    assert train["project"]["mixed_precision"] == cpu_amp
    for name in ("baseline", "project"):
        for key in PIPELINE_KEYS:
            assert _positive(train[name][key]), (name, key)
    assert set(train["ablations"]) == set(ABLATIONS)
    for name, r in train["ablations"].items():
        for key in (*PIPELINE_KEYS, "ratio_vs_project", "ratio_vs_project_best",
                    "project_choice_gain", "speedup_vs_baseline_best"):
            assert _positive(r[key]), (name, key)
        assert r["ratio_vs_project"] * r["project_choice_gain"] == pytest.approx(1.0)
    assert train["ablations"]["amp_toggled"]["mixed_precision"] == {"no": "bf16",
                                                                     "bf16": "no"}[cpu_amp]
    assert train["ablations"]["no_channels_last"]["channels_last"] is False
    assert (train["project"]["adam"], train["ablations"]["adam_toggled"]["adam"]) == (
        "torch", "fused")  # on a CPU; fused is the project's choice on CUDA
    assert train["baseline"]["adam"] == "torch"
    assert train["project"]["loader"] == "uint8 in-memory DataLoader, 0 workers"  # CPU default
    assert train["ablations"]["data_toggled"]["loader"] == "uint8 held on the device"
    assert set(train["baseline_workers"]) == {"1", "2"}
    assert _positive(train["baseline_sweep"]["baseline_workers_1"]["images_per_s"])
    for name, r in train["ablations"].items():
        assert _positive(r["round_median_ratio_vs_project"]), name

    aug = res["augment"]
    for key in ("normalize_ms", "augment_ms", "augment_share_of_step", "input_share_of_step"):
        assert _positive(aug[key]), key
    assert set(aug["ops_ms"]) == {"RandomHorizontalFlip", "RandomRotation",
                                  "RandomElasticTransform"}

    loader = res["loader"]
    assert loader["project_data_on_device"] is False
    for key in ("project_loader_images_per_s", "input_pipeline_images_per_s",
                "baseline_loader_images_per_s", "loader_over_train",
                "other_data_path_images_per_s"):
        assert _positive(loader[key]), key
    assert isinstance(loader["loader_is_bottleneck"], bool)

    inf = res["inference"]
    for b in ("1", "32"):
        row = inf[f"batch_{b}"]
        assert {"eager", "torchscript"} <= set(row)
        for name, r in row.items():
            assert _positive(r["median_latency_ms"]), (b, name)
            assert _positive(r["over_eager"]), (b, name)
        assert _positive(inf["torchscript_over_eager"][b])
    assert inf["compile"]["status"] == "unavailable"
    assert "skipped" in inf["compile"]["reason"]

    assert res["scaling"]["status"] == "skipped"
    summary = res["summary"]
    assert _positive(summary["project_speedup_vs_baseline"])
    assert _positive(summary["loader_over_train"])
    for key in ("sync_free_gain", "data_toggled_ratio_vs_project", "augment_share_of_step",
                "project_speedup_vs_best_baseline", "project_speedup_vs_sustained_baseline"):
        assert _positive(summary[key]), key
    assert summary["baseline_sustained_images_per_s"] == min(
        train["baseline"]["images_per_s"], loader["baseline_loader_images_per_s"])
    assert set(summary["round_medians"]) == {"project_speedup_vs_baseline", *(
        f"{name}_ratio_vs_project" for name in ABLATIONS)}
    assert set(summary["round_medians_cpu_time"]) == {  # workers' CPU time is not measured
        f"{name}_ratio_vs_project" for name in ABLATIONS if name != "no_device_augment"}
    assert isinstance(summary["project_defaults_slower_than_alternative"], list)
    assert isinstance(res["warnings"], list)


class _CpuBoundItems(Dataset):
    """Items that cost 50 ms of CPU each (as decoding and augmenting do), counted in a file."""

    def __init__(self, made: Path):
        self.made = made

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        with self.made.open("ab") as f:
            f.write(b".")
        return i


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_settle_waits_until_loader_workers_have_refilled(tmp_path):
    """After a block that took batches from loader workers, the next block starts once they
    are idle again, with their prefetch buffer full (4 batches here), not while they work."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_common import wait_for_idle_workers

    made = tmp_path / "made"
    batches = iter(DataLoader(_CpuBoundItems(made), batch_size=1, num_workers=1,
                              prefetch_factor=4))
    for _ in range(6):
        next(batches)
    assert made.stat().st_size < 6 + 4  # still refilling
    assert wait_for_idle_workers(batches) > 0
    assert made.stat().st_size == 6 + 4
    assert wait_for_idle_workers(iter(range(3))) == pytest.approx(0, abs=0.04)  # no workers


def test_cut_off_run_keeps_finished_sections_and_a_failed_compile(tmp_path, monkeypatch):
    """A compile that fails is recorded, not fatal; a run cut off later (as gpu_check.sh's
    time limits do) leaves every section it finished in --json, marked incomplete."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    def no_compiler(*_args):
        raise RuntimeError("no C compiler")

    def cut_off(*_args):
        raise SystemExit(124)

    monkeypatch.setattr(throughput, "build_compile_pipelines", no_compiler)
    monkeypatch.setattr(throughput, "measure_scaling", cut_off)
    # The augmentation compiles as on CUDA, through dynamo (inductor would take a minute).
    import bench_augment
    monkeypatch.setattr(bench_augment, "compiles_augmentation", lambda _device: True)
    monkeypatch.setattr(bench_augment, "compile_model",
                        lambda module, _mode: module.compile(backend="aot_eager") or True)
    out = tmp_path / "bench.json"
    args = throughput.parse_args(["--tiny", "--device", "cpu", "--compile", "--compile-budget",
                                  "1", "--json", str(out)])
    with pytest.raises(SystemExit):
        throughput.run(args)
    res = json.loads(out.read_text())
    assert res["complete"] is False
    assert res["train"]["compile"] == {"default": {"status": "failed",
                                                   "reason": "RuntimeError: no C compiler"}}
    for section in ("data", "augment", "loader", "inference"):
        assert res[section], section
    assert _positive(res["train"]["project"]["images_per_s"])
    assert "summary" not in res
    assert res["inference"]["compile"]["status"] == "unavailable"  # past its 1 s budget
    compiled_ms = res["augment"]["augment_compiled_ms"]["default"]
    assert _positive(compiled_ms)
    res["summary"] = throughput.summarize(res)
    assert res["summary"]["compile"]["default"]["status"] == "failed"
    assert res["summary"]["augment_compiled_share_of_step"] == {}  # no compiled step to share
    res["train"]["compile"]["default"]["median_step_s"] = compiled_ms / 1000 * 4
    assert throughput.summarize(res)["augment_compiled_share_of_step"] == {
        "default": pytest.approx(0.25)}
    res["load_average"]["end"] = None
    res["scaling"] = {"status": "skipped", "reason": "cut off"}
    with (tmp_path / "tables.txt").open("w") as f:
        throughput.print_tables(res, throughput.Console(file=f, width=200))
    tables = (tmp_path / "tables.txt").read_text()
    assert "torch.compile, mode default: failed (RuntimeError: no C compiler)" in tables
    assert "DeviceAugment, sequential, compiled (mode default)" in tables


@pytest.mark.slow
def test_tiny_run_measures_two_process_scaling(tmp_path):
    res = _run(tmp_path, "--no-compile")
    sc = res["scaling"]
    assert sc["status"] == "ok", sc
    assert sc["backend"] == "gloo"
    assert [r["processes"] for r in sc["runs"]] == [1, 2]
    assert [r["global_batch"] for r in sc["runs"]] == [8, 16]
    for r in sc["runs"]:
        assert _positive(r["images_per_s"])
        assert _positive(r["efficiency"])
    assert sc["runs"][0]["speedup_vs_1"] == pytest.approx(1.0)
    assert res["summary"]["scaling"]["processes"] == 2


@pytest.mark.slow
def test_kill_loop_loses_nothing(tmp_path):
    """``benchmarks/kill_loop.py``: SIGKILL at random moments, then resume; every check of the
    script (loadable checkpoints, metrics.jsonl vs last.pt, no temporaries after a start,
    resumed metrics equal to an uninterrupted run's) holds. 3 kills here; 20 in the README."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kill_loop import kill_loop

    report = kill_loop(tmp_path, kills=3, epochs=4, seed=1)
    assert sum(not r["finished"] for r in report["records"]) == 3
    assert report["largest_relative_metric_difference"] <= 1e-6
    assert all(r["flag"] in (None, "--resume", "--overwrite") for r in report["records"])


def test_kill_loop_checks_can_fail(trained_run, tmp_path):
    """The loop's invariant check passes on a consistent run directory and fails on a
    metrics.jsonl that leads or contradicts last.pt, or a metrics.jsonl without last.pt."""
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    from kill_loop import check_after_kill

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        shutil.copy2(trained_run / name, run / name)
    assert check_after_kill(run)["metrics_lag"] == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(rows[0] + "\n")  # one epoch behind: allowed
    assert check_after_kill(run)["metrics_lag"] == 1
    (run / "metrics.jsonl").write_text("\n".join([*rows, rows[-1]]) + "\n")  # ahead
    with pytest.raises(AssertionError):
        check_after_kill(run)
    (run / "metrics.jsonl").write_text(rows[0].replace('"epoch": 0', '"epoch": 5') + "\n")
    with pytest.raises(AssertionError, match="differs"):
        check_after_kill(run)
    (run / "last.pt").unlink()
    with pytest.raises(AssertionError, match=r"without last\.pt"):
        check_after_kill(run)


def test_step_ops_counts_every_variant_and_refuses_a_bad_key(tmp_path):
    """``benchmarks/step_ops.py``: one row per variant, phases adding up to the total; a bad
    ``--set`` key is one line naming it."""
    script = REPO / "benchmarks" / "step_ops.py"
    tiny = ["--set", "data.image_size=32", "--set", "model.base_width=4",
            "--set", "train.batch_size=4", "--set", "train.ema_decay=0.9"]
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, str(script), *tiny, "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "BRAINSEG_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert len(rows) == 8
    for row in rows.values():
        assert row["total"] == sum(row[p] for p in ("inputs", "augment", "forward", "loss",
                                                    "tracker", "backward", "optimizer", "ema"))
    assert rows["optim.implementation: fused"]["optimizer"] <= 2
    assert (rows["optim.implementation: fused"]["optimizer"]
            < rows["Adam foreach (torch's choice on CUDA)"]["optimizer"]
            < rows["optim.implementation: torch"]["optimizer"])  # a for-loop on a CPU
    assert "Adam foreach" in proc.stdout
    casts = (rows["train.mixed_precision: bf16"]["forward"]
             - rows["train.mixed_precision: no"]["forward"])
    assert casts > 0  # autocast's casts
    bad = subprocess.run([sys.executable, str(script), "--set", "train.epoch=3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "unknown key 'train.epoch'" in bad.stderr
    negative = subprocess.run([sys.executable, str(script), "--profile", "-1"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)
    assert negative.returncode == 2
    assert "--profile: expected a whole number of steps >= 0, got '-1'" in negative.stderr
