"""The benchmarks' parts: throughput.py cut off mid-run, its loader settling, the kill loop,
step_ops.py's refusals. throughput.py and step_ops.py end to end are checked on the run of
gpu_check.sh --cpu (tests/test_gpu_check.py), which runs each of them once.

Structure and sanity only: speed targets live in the benchmark's own output, never in timed
tests (on a shared CI machine they would be flaky).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, positive
from torch.utils.data import DataLoader, Dataset


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
    assert positive(res["train"]["project"]["images_per_s"])
    assert "summary" not in res
    assert res["inference"]["compile"]["status"] == "unavailable"  # past its 1 s budget
    compiled_ms = res["augment"]["augment_compiled_ms"]["default"]
    assert positive(compiled_ms)
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


def test_step_ops_refuses_a_bad_key_in_one_line(tmp_path):
    """``benchmarks/step_ops.py``: a bad ``--set`` key or ``--profile`` value is one line naming
    it (its rows are checked on gpu_check.sh's run, tests/test_gpu_check.py)."""
    script = REPO / "benchmarks" / "step_ops.py"
    bad = subprocess.run([sys.executable, str(script), "--set", "train.epoch=3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "unknown key 'train.epoch'" in bad.stderr
    negative = subprocess.run([sys.executable, str(script), "--profile", "-1"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)
    assert negative.returncode == 2
    assert "--profile: expected a whole number of steps >= 0, got '-1'" in negative.stderr


def test_step_ops_device_time_counts_each_kernel_once():
    """``step_ops.device_columns``: kineto credits a kernel's time both to the kernel's own
    (GPU) event and to the CPU call that launched it, and a GPU-side user range spans kernels;
    only the kernel counts. Made-up events, shaped as ``key_averages`` gives them."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_ops import device_columns

    def event(key, device_type, self_us, count=1, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_us,
                               count=count, is_user_annotation=annotation)

    events = [event("aten::add", DeviceType.CPU, 0, count=4),
              event("cudaLaunchKernel", DeviceType.CPU, 5000, count=4),
              event("cuLaunchKernel", DeviceType.CPU, 1000, count=2),
              event("vectorized_elementwise_kernel", DeviceType.CUDA, 5000, count=4),
              event("triton_poi_fused", DeviceType.CUDA, 1000, count=2),
              event("forward", DeviceType.CUDA, 9000, annotation=True)]
    assert device_columns(events) == (6.0, 6)
