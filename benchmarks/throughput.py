#!/usr/bin/env python
"""What each of brainseg_dist's speed choices buys, measured side by side in one run.

Compared against the way most public code trains on ``kaggle_3m`` (the dataset author's
PyTorch code: per-sample CPU augmentation in DataLoader workers, fp32, NCHW; reimplemented in
``benchmarks/baseline.py``). Every comparison is a ratio between measurements of the same run,
so it holds on a busy machine where absolute numbers do not.

    python benchmarks/throughput.py --quick              # ~3 min on 2 CPU cores
    python benchmarks/throughput.py --json bench.json    # full mode, for GPUs
    python benchmarks/throughput.py --quick --data-dir /data/kaggle_3m

Split by what it measures, over the package functions training uses: ``bench_data`` (decode
and cache), ``bench_training`` (training steps and the loader), ``bench_inference`` (eager,
TorchScript, ``torch.compile``), ``bench_scaling`` (1 vs N processes); ``bench_report`` prints
the tables and ``bench_common`` holds the shared helpers. This file parses the options and
runs them.

See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Inductor compiles in a pool of worker processes by default; one thread keeps a timed-out
# compile subprocess self-contained (it is terminated by its pid, with nothing left behind).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_augment import measure_augmentation
from bench_common import (
    DEPTH,
    SCHEMA_VERSION,
    _load_average,
    failure,
    hardware,
    project_mixed_precision,
)
from bench_data import measure_decode, prepare_data
from bench_inference import measure_inference
from bench_report import print_tables
from bench_scaling import measure_scaling
from bench_training import (
    build_compile_pipelines,
    build_pipelines,
    measure_compile,
    measure_loader,
    measure_training,
)

from brainseg_dist.console import console
from brainseg_dist.io import atomic_write_json

# mode -> defaults; explicit command-line values win.
MODES: dict[str, dict[str, Any]] = {
    "full": {"patients": 16, "slices": (20, 40), "base_width": 32, "steps": 25, "warmup": 3,
             "rounds": 5, "loader_batches": 40, "infer_iters": (100, 20), "infer_warmup": 5,
             "scaling_steps": 10, "scaling_warmup": 3, "compile": True,
             "compile_budget": 900.0},
    "quick": {"patients": 6, "slices": (20, 40), "base_width": 16, "steps": 3, "warmup": 1,
              "rounds": 3, "loader_batches": 10, "infer_iters": (10, 3), "infer_warmup": 2,
              "scaling_steps": 3, "scaling_warmup": 1, "compile": False,
              "compile_budget": 240.0},
    # For the test suite: seconds, not minutes. Numbers are meaningless, the structure is not.
    "tiny": {"patients": 3, "slices": (8, 10), "base_width": 4, "steps": 2, "warmup": 1,
             "rounds": 1, "loader_batches": 3, "infer_iters": (3, 2), "infer_warmup": 2,
             "scaling_steps": 1, "scaling_warmup": 1, "compile": False, "compile_budget": 60.0,
             "image_size": 64, "batch_size": 8},
}




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small synthetic data, base width 16, few steps (~3 min on 2 cores)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long smoke run for the tests (numbers are meaningless)")
    p.add_argument("--data-dir", help="a real kaggle_3m root (default: synthetic data)")
    p.add_argument("--json", help="write the results here (atomically)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, help="per process (default 32)")
    p.add_argument("--image-size", type=int, help="default 128")
    p.add_argument("--base-width", type=int, help="U-Net base width (32 full, 16 quick)")
    p.add_argument("--steps", type=int, help="timed training steps per pipeline")
    p.add_argument("--warmup", type=int, help="untimed training steps per pipeline")
    p.add_argument("--rounds", type=int, help="interleaved rounds the timed steps are split in")
    p.add_argument("--patients", type=int, help="synthetic patients")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers of the per-sample CPU augmentation pipelines")
    p.add_argument("--baseline-workers", type=lambda v: [int(w) for w in v.split(",") if w],
                   default=[], metavar="N,N",
                   help="also time the baseline with these loader worker counts (its best "
                        "one is reported beside --workers)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True,
                   help="after each timed block of a pipeline fed by loader workers, wait "
                        "(untimed) until they have refilled their buffer, so they do not run "
                        "beside the next pipeline's block")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="measure torch.compile: inference, and a compiled training pipeline "
                        "(default: on in full mode, off in --quick)")
    p.add_argument("--compile-budget", type=float, help="seconds before compile is given up")
    p.add_argument("--compile-modes", type=lambda v: [m for m in v.split(",") if m],
                   metavar="MODE,MODE",
                   help="torch.compile modes of the compiled training pipelines (default: "
                        "default and reduce-overhead (CUDA graphs) on CUDA, default on CPU)")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="measure 1 against N data-parallel processes")
    p.add_argument("--scaling-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    defaults = {"batch_size": 32, "image_size": 128, **MODES[args.mode]}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.infer_batches = (1, 32)
    if args.image_size % 2**DEPTH or args.image_size < 2**DEPTH:
        p.error(f"--image-size must be a multiple of {2**DEPTH}")
    if (min(args.steps, args.rounds, args.batch_size, args.workers, *args.baseline_workers) < 1
            or args.warmup < 0):
        p.error("--steps, --rounds, --batch-size and --workers (and --baseline-workers) must "
                "be >= 1, --warmup >= 0")
    args.rounds = min(args.rounds, args.steps)
    return args

def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)

def _timed_pipelines(pipelines: list, measure, args: argparse.Namespace) -> dict[str, Any]:
    """``measure(pipelines, args)``, then stop their loader workers whatever happened."""
    try:
        return measure(pipelines, args)
    finally:
        for p in pipelines:
            p.close()

def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in (
        "mode", "batch_size", "image_size", "base_width", "steps", "warmup", "rounds",
        "workers", "baseline_workers", "infer_batches", "compile", "scaling", "settle")}
    return {**out, "depth": DEPTH, "project_mixed_precision": project_mixed_precision(device)}

def _loader_against_training(data, args: argparse.Namespace, device: torch.device,
                             train: dict[str, Any]) -> dict[str, Any]:
    """The data paths alone (:func:`measure_loader`), each over the training it feeds."""
    lo = measure_loader(data, args, device)
    train_ips = train["project"]["images_per_s"]
    lo["train_images_per_s"] = train_ips
    lo["loader_over_train"] = lo["project_loader_images_per_s"] / train_ips
    lo["input_pipeline_over_train"] = lo["input_pipeline_images_per_s"] / train_ips
    lo["baseline_loader_over_train"] = (lo["baseline_loader_images_per_s"]
                                        / train["baseline"]["images_per_s"])
    lo["loader_is_bottleneck"] = lo["loader_over_train"] < 3
    return lo

def _compiled_training(data, args: argparse.Namespace, device: torch.device,
                       mode: str) -> dict[str, Any]:
    """The compiled project pipeline in ``mode`` against its eager twin, or the failure."""
    console.print(f"training: torch.compile, mode {mode} ...")
    try:
        return _timed_pipelines(build_compile_pipelines(data, args, device, mode),
                                measure_compile, args)
    except Exception as exc:
        return failure(exc)

def _compile_modes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The torch.compile modes measured: none without ``--compile``."""
    if not args.compile:
        return []
    return args.compile_modes or (["default", "reduce-overhead"] if device.type == "cuda"
                                  else ["default"])

def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement in turn; with ``--json``, the sections measured so far are written
    there (``complete: false``) after each long one, so a run cut off at a time limit keeps
    them."""

    def save_partial(res: dict[str, Any]) -> None:
        if args.json:
            atomic_write_json(args.json, {**res, "complete": False})

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = select_device(args.device)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"schema": SCHEMA_VERSION, "load_average": {"start": _load_average()},
                           "hardware": hardware(device), "settings": _settings(args, device)}
    with tempfile.TemporaryDirectory(prefix="brainseg-bench-") as tmp:
        tmp = Path(tmp)
        console.print(f"[bold]brainseg_dist throughput[/bold] ({args.mode}, {device})")
        root, source = prepare_data(args, tmp)
        cache_dir = tmp / "cache"
        console.print("data: decoding ...")
        data, decode = measure_decode(root, args.image_size, cache_dir)
        res["data"] = {**source, **decode}
        if len(data) < args.batch_size:
            raise SystemExit(f"error: {len(data)} slices is less than one batch of "
                             f"{args.batch_size}; add patients or lower --batch-size")

        console.print("training: building pipelines ...")
        res["train"] = _timed_pipelines(build_pipelines(data, args, device), measure_training,
                                        args)
        save_partial(res)

        compile_modes = _compile_modes(args, device)
        console.print("augmentation ...")
        res["augment"] = measure_augmentation(data, args, device,
                                              res["train"]["project"]["median_step_s"],
                                              compile_modes)

        console.print("loader ...")
        res["loader"] = _loader_against_training(data, args, device, res["train"])

        console.print("inference ...")
        res["inference"] = measure_inference(data, args, device)
        save_partial(res)

        if args.compile:  # last of the training measurements: the slowest and likeliest to fail
            res["train"]["compile"] = {}
            for mode in compile_modes:
                res["train"]["compile"][mode] = _compiled_training(data, args, device, mode)
                save_partial(res)

        if args.scaling:
            try:
                res["scaling"] = measure_scaling(root, cache_dir, args, device)
            except Exception as exc:
                res["scaling"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        else:
            res["scaling"] = {"status": "skipped", "reason": "--no-scaling"}
    res["load_average"]["end"] = _load_average()
    res["seconds"] = time.perf_counter() - t_start
    res["summary"] = summarize(res)
    res["warnings"] = check_conditions(res)
    res["complete"] = True
    return res

def check_conditions(res: dict[str, Any]) -> list[str]:
    """Say when the machine was too busy, or the step times too scattered, to trust much."""
    out = []
    hw = res["hardware"]
    cores = hw["cpu_cores_usable"] or 1
    # The load before the run started is other processes' (later it includes ours).
    load = (res["load_average"]["start"] or [0.0])[0]
    if res["hardware"]["device"] == "cpu" and load > 0.5 * cores:
        out.append(
            f"the machine was busy (1-min load average {load:.1f} on {cores} cores when the "
            "run started): other processes took CPU time, and with several torch threads OpenMP "
            "spin-waiting for a descheduled thread inflates small operations most (batch-1 "
            "inference, augmentation). Ratios within this run stay comparable; absolute "
            "numbers do not. OMP_WAIT_POLICY=passive or --threads 1 reduce the distortion.")
    rows = [("baseline", res["train"]["baseline"]), ("project", res["train"]["project"]),
            *res["train"]["ablations"].items(), *res["train"]["baseline_sweep"].items()]
    noisy = [name for name, r in rows if r["steps"] > 1 and r["max_step_s"] > 1.5 * r["min_step_s"]]
    if noisy:
        out.append(f"scattered step times (slowest > 1.5x fastest) for {', '.join(noisy)}: "
                   "re-run, or raise --steps")
    return out

def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, all against measurements of the same run."""
    tr, inf = res["train"], res["inference"]
    s: dict[str, Any] = {
        "project_speedup_vs_baseline": tr["project"]["speedup_vs_baseline"],
        "device_augment_gain": tr["ablations"]["no_device_augment"]["project_choice_gain"],
        "channels_last_gain": tr["ablations"]["no_channels_last"]["project_choice_gain"],
        "amp_toggled_ratio_vs_project": tr["ablations"]["amp_toggled"]["ratio_vs_project"],
        "amp_toggled_to": tr["ablations"]["amp_toggled"]["mixed_precision"],
        "data_toggled_ratio_vs_project": tr["ablations"]["data_toggled"]["ratio_vs_project"],
        "sync_free_gain": tr["ablations"]["sync_per_step"]["project_choice_gain"],
        "adam_toggled_to": tr["ablations"]["adam_toggled"]["adam"],
        "adam_toggled_ratio_vs_project": tr["ablations"]["adam_toggled"]["ratio_vs_project"],
        "project_speedup_vs_best_baseline": (tr["project"]["images_per_s"]
                                             / max(tr["baseline_workers"].values())),
        "best_baseline_workers": int(max(tr["baseline_workers"],
                                         key=tr["baseline_workers"].get)),
        # The baseline's steps are timed between other pipelines' rounds, while its workers
        # refill their prefetch buffer; with cores to spare (a GPU host) its timed steps then
        # never wait for them. Run on its own it cannot outpace its loader alone.
        "baseline_sustained_images_per_s": min(tr["baseline"]["images_per_s"],
                                               res["loader"]["baseline_loader_images_per_s"]),
        "augment_share_of_step": res["augment"]["augment_share_of_step"],
        "augment_other_share_of_step": res["augment"]["augment_other_share_of_step"],
        "loader_over_train": res["loader"]["loader_over_train"],
        "torchscript_over_eager": inf["torchscript_over_eager"],
        # The same training ratios from each pipeline's fastest step (robust to load spikes).
        # Medians over rounds of the per-round ratios (each round measured every pipeline).
        "round_medians": {
            "project_speedup_vs_baseline": tr["project"]["round_median_speedup_vs_baseline"],
            **{f"{name}_ratio_vs_project": r["round_median_ratio_vs_project"]
               for name, r in tr["ablations"].items()},
        },
        # The same from the process's CPU seconds (pipelines without loader workers only).
        "round_medians_cpu_time": {
            f"{name}_ratio_vs_project": r["round_median_cpu_ratio_vs_project"]
            for name, r in tr["ablations"].items() if "round_median_cpu_ratio_vs_project" in r
        },
        "best_step": {
            "project_speedup_vs_baseline": tr["project"]["speedup_vs_baseline_best"],
            **{f"{name}_ratio_vs_project": r["ratio_vs_project_best"]
               for name, r in tr["ablations"].items()},
        },
    }
    s["project_speedup_vs_sustained_baseline"] = (tr["project"]["images_per_s"]
                                                  / s["baseline_sustained_images_per_s"])
    # Project defaults that measured slower than switching them off (5% margin for noise).
    s["project_defaults_slower_than_alternative"] = [
        name for name, r in tr["ablations"].items() if r["ratio_vs_project"] > 1.05]
    if "compile" in tr:
        s["compile"] = {mode: {k: r[k] for k in ("compile_seconds", "saved_per_step_s",
                                                 "break_even_steps", "ratio_vs_project")}
                        if "compile_seconds" in r else r for mode, r in tr["compile"].items()}
        s["augment_compiled_share_of_step"] = {
            mode: ms / (tr["compile"][mode]["median_step_s"] * 1000)
            for mode, ms in res["augment"].get("augment_compiled_ms", {}).items()
            if isinstance(ms, float) and "median_step_s" in tr["compile"].get(mode, {})}
    sc = res.get("scaling", {})
    if sc.get("status") == "ok":
        last = sc["runs"][-1]
        s["scaling"] = {"processes": last["processes"], "speedup_vs_1": last["speedup_vs_1"],
                        "efficiency": last["efficiency"]}
    return s

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    if args.json:  # before the tables: a report that fails to print loses no result
        atomic_write_json(args.json, res)
    out = Console(width=max(120, Console().width))
    print_tables(res, out)
    for w in res["warnings"]:
        out.print(f"[yellow]note:[/yellow] {w}", highlight=False)
    if args.json:
        console.print(f"results written to {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
