#!/usr/bin/env python
"""What each of brainseg_dist's speed choices buys, measured side by side in one run.

Compared against the way most public code trains on ``kaggle_3m`` (the dataset author's
PyTorch code: per-sample CPU augmentation in DataLoader workers, fp32, NCHW; reimplemented in
``benchmarks/baseline.py``). Every comparison is a ratio between measurements of the same run,
so it holds on a busy machine where absolute numbers do not.

    python benchmarks/throughput.py --quick              # ~3 min on 2 CPU cores
    python benchmarks/throughput.py --json bench.json    # full mode, for GPUs
    python benchmarks/throughput.py --quick --data-dir /data/kaggle_3m

See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import multiprocessing as mp
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Inductor compiles in a pool of worker processes by default; one thread keeps a timed-out
# compile subprocess self-contained (it is terminated by its pid, with nothing left behind).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import (
    BaselineDataset,
    PerSampleAugment,
    Uint8AugmentDataset,
    per_sample_loader,
)

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.console import console
from brainseg_dist.data import SliceData, load_dataset
from brainseg_dist.data.loader import make_loader
from brainseg_dist.data.synth import write_synthetic_dataset
from brainseg_dist.io import atomic_write_json
from brainseg_dist.metrics import bce_dice_loss
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize
from brainseg_dist.train import resolve_mixed_precision

SCHEMA_VERSION = 1
DEPTH = 4
LR = 1e-3

# mode -> defaults; explicit command-line values win.
MODES: dict[str, dict[str, Any]] = {
    "full": {"patients": 16, "slices": (20, 40), "base_width": 32, "steps": 20, "warmup": 3,
             "rounds": 4, "loader_batches": 40, "infer_iters": (100, 20), "infer_warmup": 5,
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


# --------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "kornia": _version("kornia"),
        "accelerate": _version("accelerate"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _amp_dtype(mode: str | None) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode or "no")


def project_mixed_precision(device: torch.device) -> str:
    """The project's default (``train.mixed_precision: auto``) on this device."""
    mode = resolve_mixed_precision("auto", device.type)
    if mode is None:  # launched under an accelerate config: it decides
        mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return mode


# --------------------------------------------------------------------------- data
def prepare_data(args, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The dataset root (``--data-dir`` or a fresh synthetic one) and how it was made."""
    if args.data_dir:
        return Path(args.data_dir), {"source": str(args.data_dir)}
    root = workdir / "synthetic" / "kaggle_3m"
    t0 = time.perf_counter()
    write_synthetic_dataset(root, patients=args.patients, seed=0, slices=args.slices)
    return root, {"source": "synthetic", "synthetic_patients": args.patients,
                  "synthetic_write_seconds": time.perf_counter() - t0}


def measure_decode(root: Path, image_size: int, cache_dir: Path) -> tuple[SliceData,
                                                                        dict[str, Any]]:
    """Tif decode rate into an empty cache, then the rate of reading it back."""
    t0 = time.perf_counter()
    cold = load_dataset(root, image_size, cache_dir=cache_dir, show_progress=False)
    cold_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = load_dataset(root, image_size, cache_dir=cache_dir, show_progress=False)
    warm_wall = time.perf_counter() - t0
    n = len(warm)
    cold_s, warm_s = cold.timings["decode_seconds"], warm.timings["decode_seconds"]
    result = {
        "patients": len(warm.patients),
        "slices": n,
        "cold_decode_seconds": cold_s,
        "cold_slices_per_s": n / cold_s,
        "cold_load_dataset_seconds": cold_wall,
        "cached_decode_seconds": warm_s,
        "cached_slices_per_s": n / warm_s,
        "cached_load_dataset_seconds": warm_wall,
        "cache_speedup": cold_s / warm_s,
        "patients_from_cache": int(warm.timings["patients_from_cache"]),
    }
    return warm, result


# --------------------------------------------------------------------------- training
def _cycle(make: Callable[[], Any]) -> Iterator:
    """Batches of a loader, epoch after epoch."""
    while True:
        yield from make()


@dataclass
class Pipeline:
    """One way of training: its loader, model, optimizer and the per-step work."""

    name: str
    description: str
    batches: Iterator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    memory_format: torch.memory_format
    amp: str  # "no" | "bf16" | "fp16"
    normalize_on_device: bool  # uint8 batches, normalized on the device
    augment: torch.nn.Module | None  # batched device augmentation, or None
    settings: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    scaler: Any = None

    def __post_init__(self):
        if self.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def step(self) -> None:
        """One full training step, including fetching the batch from the loader."""
        images, masks = next(self.batches)[:2]
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        x = normalize(images, "slice") if self.normalize_on_device else images.float()
        x = x.contiguous(memory_format=self.memory_format)
        y = masks.float()
        if self.augment is not None:
            x, y = self.augment(x, y)
            x = x.contiguous(memory_format=self.memory_format)
        dtype = _amp_dtype(self.amp)
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                            enabled=dtype is not None):
            logits = self.model(x)
        loss = bce_dice_loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop loader worker processes (a DataLoader iterator shuts them down when freed)."""
        self.batches = iter(())


def _model(base_width: int, channels_last: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every pipeline
    return build_model(base_width, DEPTH, channels_last).to(device).train()


def build_pipelines(data: SliceData, args, device: torch.device) -> list[Pipeline]:
    """The baseline, the project pipeline and one ablation per speed choice."""
    bs, bw = args.batch_size, args.base_width
    # Enough batches that the workers keep producing through every timed step: a timed
    # window then starts and ends with the prefetch buffer full (steady state), so it
    # pays for exactly the batches it consumes.
    n_batches = args.warmup + args.steps + 4 * args.workers + 4
    project_amp = project_mixed_precision(device)
    toggled_amp = "no" if project_amp != "no" else "bf16"
    aug_cfg = AugmentConfig()

    def project_batches(seed: int = 0) -> Iterator:
        loader = make_loader(data, bs, shuffle=True, drop_last=True, seed=seed)
        return _cycle(lambda: loader)

    def device_augment() -> DeviceAugment:
        return DeviceAugment(aug_cfg).to(device).train()

    def pipeline(name, description, batches, channels_last, amp, on_device, augment):
        model = _model(bw, channels_last, device)
        return Pipeline(
            name, description, batches, model, torch.optim.Adam(model.parameters(), lr=LR),
            device, torch.channels_last if channels_last else torch.contiguous_format, amp,
            on_device, augment,
            settings={"channels_last": channels_last, "mixed_precision": amp,
                      "augmentation": "device (batched, Kornia)" if augment is not None
                      else f"per-sample on CPU in {args.workers} loader workers",
                      "loader": "uint8 in memory, 0 workers" if augment is not None
                      else f"{args.workers} workers"})

    baseline_loader = per_sample_loader(
        BaselineDataset(data, PerSampleAugment.buda(aug_cfg)), bs, n_batches, args.workers)
    cpu_aug_loader = per_sample_loader(
        Uint8AugmentDataset(data, PerSampleAugment.from_config(aug_cfg)), bs, n_batches,
        args.workers)
    amp_word = {"no": "off", "bf16": "bf16", "fp16": "fp16"}
    return [
        pipeline("baseline", "reference: float32 slices, per-sample CPU augmentation in "
                 f"{args.workers} DataLoader workers, fp32, NCHW", iter(baseline_loader),
                 False, "no", False, None),
        pipeline("project", "uint8 in-memory loader, device normalization + batched device "
                 f"augmentation, channels-last, AMP {amp_word[project_amp]} (project default)",
                 project_batches(), True, project_amp, True, device_augment()),
        pipeline("no_device_augment", "project, but per-sample CPU augmentation in "
                 f"{args.workers} loader workers", iter(cpu_aug_loader), True, project_amp,
                 True, None),
        pipeline("no_channels_last", "project, but NCHW (contiguous) model and inputs",
                 project_batches(), False, project_amp, True, device_augment()),
        pipeline("amp_toggled", f"project, but AMP {amp_word[toggled_amp]} (project default "
                 f"on {device.type}: {amp_word[project_amp]})", project_batches(), True,
                 toggled_amp, True, device_augment()),
    ]


def _summary(times: list[float], batch_size: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "images_per_s": batch_size / median,
        "median_step_s": median,
        "mean_images_per_s": batch_size * len(times) / sum(times),
        "best_images_per_s": batch_size / min(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "steps": len(times),
        "step_times_s": [round(t, 5) for t in times],
    }


def measure_training(pipelines: list[Pipeline], args) -> dict[str, Any]:
    """Warm every pipeline up, then time ``steps`` steps each, interleaved in rounds (order
    reversed every other round) so a load change on the machine hits all of them alike."""
    for p in pipelines:
        console.print(f"  warm-up: {p.name}")
        for _ in range(args.warmup):
            p.timed_step()
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds)
                 for r in range(args.rounds)]
    for r, n in enumerate(per_round):
        order = pipelines if r % 2 == 0 else pipelines[::-1]
        for p in order:
            p.times += [p.timed_step() for _ in range(n)]
            console.print(f"  round {r + 1}/{args.rounds}: {p.name} "
                          f"{statistics.median(p.times) * 1000:.0f} ms/step")
    results: dict[str, Any] = {}
    base = _summary(pipelines[0].times, args.batch_size)
    project = _summary(pipelines[1].times, args.batch_size)
    for p in pipelines:
        r = {"description": p.description, **p.settings, **_summary(p.times, args.batch_size)}
        r["speedup_vs_baseline"] = r["images_per_s"] / base["images_per_s"]
        # From each pipeline's fastest step: less sensitive to other processes' load.
        r["speedup_vs_baseline_best"] = r["best_images_per_s"] / base["best_images_per_s"]
        if p.name not in ("baseline", "project"):
            r["ratio_vs_project"] = r["images_per_s"] / project["images_per_s"]
            r["ratio_vs_project_best"] = r["best_images_per_s"] / project["best_images_per_s"]
            # > 1: the project's choice (this optimization on) is faster on this device.
            r["project_choice_gain"] = 1 / r["ratio_vs_project"]
        results[p.name] = r
    return {"baseline": results.pop("baseline"), "project": results.pop("project"),
            "ablations": results}


# --------------------------------------------------------------------------- loader
def measure_loader(data: SliceData, args, device: torch.device) -> dict[str, Any]:
    """The project loader alone (with the device transfer), the whole input pipeline
    (loader + normalization + device augmentation) and the reference's loader alone."""
    bs, n = args.batch_size, args.loader_batches
    loader = make_loader(data, bs, shuffle=True, drop_last=True, seed=1)
    batches = _cycle(lambda: loader)
    augment = DeviceAugment(AugmentConfig()).to(device).train()

    def rate(fn: Callable[[], None], count: int) -> float:
        fn()  # first batch: not timed
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        _sync(device)
        return bs * count / (time.perf_counter() - t0)

    def fetch():
        images, masks = next(batches)[:2]
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    def pipeline():
        images, masks = fetch()
        x = normalize(images, "slice").contiguous(memory_format=torch.channels_last)
        augment(x, masks.float())

    out = {"project_loader_images_per_s": rate(fetch, max(n, 20)),
           "input_pipeline_images_per_s": rate(pipeline, n)}
    ref = per_sample_loader(BaselineDataset(data, PerSampleAugment.buda()), bs, n + 1,
                            args.workers, seed=1)
    ref_batches = iter(ref)

    def ref_fetch():
        images, masks = next(ref_batches)
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    out["baseline_loader_images_per_s"] = rate(ref_fetch, n)
    ref_batches = iter(())  # shuts the workers down
    return out


# --------------------------------------------------------------------------- inference
def _timed_calls(fn: Callable[[], Any], device: torch.device, warmup: int,
                 iters: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_latency_ms": statistics.median(times) * 1000, "iters": iters}


@contextlib.contextmanager
def _quiet_torchscript():
    # torch >= 2.10 marks TorchScript deprecated and warns on every torch.jit call. The
    # benchmark measures TorchScript on purpose (the project exports it), so silence just that.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


def _to_torchscript(model: torch.nn.Module, example: torch.Tensor):
    """``torch.jit.script`` the U-Net, or trace it where its Python is not scriptable (the
    U-Net has no data-dependent control flow, so a trace is exact). Returns (module, how)."""
    try:
        return torch.jit.script(model), "torch.jit.script"
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:120]
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    return traced, f"torch.jit.trace (script failed: {reason})"


def _compile_worker(state: dict, base_width: int, device: str, batches: list[int],
                    image_size: int, warmup: int, iters: list[int], results) -> None:
    """torch.compile in its own process, so a slow or hanging compile can be cut off."""
    try:
        dev = torch.device(device)
        model = build_model(base_width, DEPTH, True).to(dev).eval()
        model.load_state_dict(state)
        out: dict[str, Any] = {}
        for b, n in zip(batches, iters, strict=True):
            compiled = torch.compile(model, dynamic=False)
            x = torch.randn(b, 3, image_size, image_size, device=dev).contiguous(
                memory_format=torch.channels_last)
            with torch.inference_mode():
                # Eager again in this process, so the ratio compares like with like.
                eager = _timed_calls(lambda x=x: model(x), dev, warmup, n)
                t0 = time.perf_counter()
                compiled(x)
                _sync(dev)
                compile_s = time.perf_counter() - t0
                r = _timed_calls(lambda c=compiled, x=x: c(x), dev, warmup, n)
            out[str(b)] = {**r, "compile_seconds": compile_s,
                           "eager_same_process_latency_ms": eager["median_latency_ms"]}
        results.put({"ok": out})
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                     if str(exc).strip() else type(exc).__name__})


def measure_compile(model: torch.nn.Module, args, device: torch.device,
                    batches: list[int], iters: list[int]) -> dict[str, Any]:
    """torch.compile latencies per batch size, or ``status: unavailable`` with the reason."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    proc = ctx.Process(target=_compile_worker, args=(
        state, args.base_width, str(device), batches, args.image_size, args.infer_warmup,
        iters, results), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        msg = results.get(timeout=args.compile_budget)
    except queue.Empty:
        msg = {"error": f"no result within the {args.compile_budget:.0f} s budget "
                        "(--compile-budget)"}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.terminate()
        proc.join()
    wall = time.perf_counter() - t0
    if "ok" not in msg:
        return {"status": "unavailable", "reason": msg["error"], "seconds": wall}
    return {"status": "ok", "seconds": wall, "by_batch": msg["ok"]}


def measure_inference(data: SliceData, args, device: torch.device) -> dict[str, Any]:
    """Eager against TorchScript (scripted+frozen, and optimize_for_inference) and, when it
    works, torch.compile, on the same U-Net in eval mode, fp32, channels-last."""
    torch.manual_seed(0)
    model = build_model(args.base_width, DEPTH, True).to(device).eval()
    # Real slices, repeated up to the largest batch.
    big = max(args.infer_batches)
    idx = torch.arange(big) % len(data)
    images = torch.from_numpy(data.images)[idx].to(device)
    x_all = normalize(images, "slice").contiguous(memory_format=torch.channels_last)

    with _quiet_torchscript():
        t0 = time.perf_counter()
        scripted, how = _to_torchscript(model, x_all[:1])
        frozen = torch.jit.freeze(scripted)  # folds BatchNorm into the convolutions
        freeze_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            optimized = torch.jit.optimize_for_inference(_to_torchscript(model, x_all[:1])[0])
            optimized_error = None
        except Exception as exc:  # platform-dependent (MKLDNN), reported rather than fatal
            optimized, optimized_error = None, f"{type(exc).__name__}: {exc}"
        optimize_s = time.perf_counter() - t0

    variants: dict[str, Any] = {"eager": model, "torchscript": frozen}
    if optimized is not None:
        variants["torchscript_optimized"] = optimized
    out: dict[str, Any] = {
        "precision": "fp32", "memory_format": "channels_last",
        "torchscript": f"{how} + torch.jit.freeze (BatchNorm folded)",
        "torchscript_optimized": ("torch.jit.optimize_for_inference (freeze + MKLDNN "
                                  "layout on CPU)") if optimized is not None else
                                 f"unavailable: {optimized_error}",
        "script_freeze_seconds": freeze_s, "optimize_for_inference_seconds": optimize_s,
    }
    iters = [args.infer_iters[0] if b == 1 else args.infer_iters[1]
             for b in args.infer_batches]
    for b, n in zip(args.infer_batches, iters, strict=True):
        x = x_all[:b].contiguous(memory_format=torch.channels_last)
        row: dict[str, Any] = {}
        with _quiet_torchscript(), torch.inference_mode():
            for name, m in variants.items():
                r = _timed_calls(lambda m=m, x=x: m(x), device, args.infer_warmup, n)
                r["images_per_s"] = b / (r["median_latency_ms"] / 1000)
                row[name] = r
        eager = row["eager"]["images_per_s"]
        for name in variants:
            row[name]["over_eager"] = row[name]["images_per_s"] / eager
        out[f"batch_{b}"] = row
        console.print(f"  inference batch {b}: " + ", ".join(
            f"{k} {v['median_latency_ms']:.1f} ms" for k, v in row.items()))

    if args.compile:
        console.print(f"  torch.compile (budget {args.compile_budget:.0f} s) ...")
        comp = measure_compile(model, args, device, list(args.infer_batches), iters)
        out["compile"] = comp
        if comp["status"] == "ok":
            for b in args.infer_batches:
                r = comp["by_batch"][str(b)]
                r["images_per_s"] = b / (r["median_latency_ms"] / 1000)
                # Against eager timed in the compile process (same conditions).
                r["over_eager"] = r["eager_same_process_latency_ms"] / r["median_latency_ms"]
                out[f"batch_{b}"]["compile"] = r
        out["compile_over_eager"] = {
            str(b): out[f"batch_{b}"]["compile"]["over_eager"] for b in args.infer_batches
        } if comp["status"] == "ok" else None
    else:
        out["compile"] = {"status": "unavailable", "reason": "skipped (--no-compile; the "
                          "default in --quick, where compiling costs minutes on a CPU)"}
    out["torchscript_over_eager"] = {str(b): out[f"batch_{b}"]["torchscript"]["over_eager"]
                                     for b in args.infer_batches}
    if optimized is not None:
        out["torchscript_optimized_over_eager"] = {
            str(b): out[f"batch_{b}"]["torchscript_optimized"]["over_eager"]
            for b in args.infer_batches}
    return out


# --------------------------------------------------------------------------- scaling
def _ddp_worker(rank: int, world: int, port: int, cfg: dict[str, Any], results) -> None:
    """One process of a data-parallel run of the project pipeline (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    try:
        cuda = cfg["device"] == "cuda"
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:  # share the cores: 1 process x all threads against N processes x 1/N
            torch.set_num_threads(max(1, cfg["threads"] // world))
        dist.init_process_group("nccl" if cuda else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        data = load_dataset(cfg["root"], cfg["image_size"], cache_dir=cfg["cache_dir"],
                            show_progress=False)
        model = _model(cfg["base_width"], True, device)
        if cuda and world > 1:  # as the project does under DDP on GPUs
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if cuda else None)
        loader = make_loader(data, cfg["batch_size"], shuffle=True, drop_last=True, seed=rank)
        p = Pipeline("ddp", "", _cycle(lambda: loader), ddp,
                     torch.optim.Adam(ddp.parameters(), lr=LR), device, torch.channels_last,
                     cfg["amp"], True, DeviceAugment(AugmentConfig()).to(device).train())
        for _ in range(cfg["warmup"]):
            p.timed_step()
        dist.barrier()
        t0 = time.perf_counter()
        times = [p.timed_step() for _ in range(cfg["steps"])]
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                               device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if rank == 0:
            results.put({"ok": {"elapsed": float(elapsed), "median_step_s":
                                statistics.median(times), "threads": torch.get_num_threads()}})
        dist.destroy_process_group()
    except Exception as exc:
        results.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})


def _run_ddp(world: int, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, cfg, results), daemon=True)
             for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        msg = results.get(timeout=timeout)
    except queue.Empty:
        msg = {"error": f"no result within {timeout:.0f} s"}
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if "ok" not in msg:
        raise RuntimeError(msg["error"])
    return msg["ok"]


def measure_scaling(root: Path, cache_dir: Path, args, device: torch.device) -> dict[str, Any]:
    """Global images/s of 1 against 2 processes (CPU, gloo) or 1..N GPUs (NCCL)."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        worlds = sorted({1, *[w for w in (2, 4, 8, 16) if w <= n], n})
        if n < 2:
            return {"status": "skipped", "reason": "one GPU: nothing to scale to"}
    else:
        worlds = [1, 2]
    cfg = {"device": device.type, "threads": torch.get_num_threads(), "root": str(root),
           "image_size": args.image_size, "cache_dir": str(cache_dir),
           "base_width": args.base_width, "batch_size": args.batch_size,
           "amp": project_mixed_precision(device), "warmup": args.scaling_warmup,
           "steps": args.scaling_steps}
    runs = []
    for world in worlds:
        console.print(f"  scaling: {world} process(es) ...")
        r = _run_ddp(world, cfg, timeout=args.scaling_timeout)
        ips = world * args.batch_size * args.scaling_steps / r["elapsed"]
        runs.append({"processes": world, "global_batch": world * args.batch_size,
                     "images_per_s": ips, "median_step_s": r["median_step_s"],
                     "threads_per_process": r["threads"]})
    one = runs[0]["images_per_s"]
    for r in runs:
        r["speedup_vs_1"] = r["images_per_s"] / one
        r["efficiency"] = r["speedup_vs_1"] / r["processes"]
    return {"status": "ok", "backend": "nccl" if device.type == "cuda" else "gloo",
            "per_process_batch": args.batch_size, "steps": args.scaling_steps,
            "note": ("CPU: the same cores are split between the processes, so the ideal "
                     "speedup is 1x, not Nx" if device.type == "cpu" else
                     "GPU: ideal speedup is Nx"),
            "runs": runs}


# --------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_tables(res: dict[str, Any], out: Console) -> None:
    hw = res["hardware"]
    t = Table(title="Hardware", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("device", f"{hw['device']} ({hw['device_name']})")
    t.add_row("CPU", f"{hw['cpu_model']}, {hw['cpu_cores_usable']} usable cores, "
                     f"torch threads {hw['torch_threads']}")
    t.add_row("versions", f"torch {hw['torch']}, kornia {hw['kornia']}, accelerate "
                          f"{hw['accelerate']}, python {hw['python']}")
    s = res["settings"]
    t.add_row("settings", f"mode {s['mode']}, batch {s['batch_size']}, image "
                          f"{s['image_size']}, base width {s['base_width']}, {s['steps']} steps "
                          f"after {s['warmup']} warm-up, loader workers {s['workers']}")
    t.add_row("load average", f"start {res['load_average']['start']}, end "
                              f"{res['load_average']['end']}")
    out.print(t)

    d = res["data"]
    t = Table(title=f"Data ({d['source']}: {d['patients']} patients, {d['slices']} slices)")
    for c in ("stage", "slices/s", "seconds", "vs cold"):
        t.add_column(c, justify="right" if c != "stage" else "left")
    t.add_row("tif decode (empty cache)", _f(d["cold_slices_per_s"], "{:.0f}"),
              _f(d["cold_decode_seconds"]), "1.00x")
    t.add_row("from the decoded cache", _f(d["cached_slices_per_s"], "{:.0f}"),
              _f(d["cached_decode_seconds"], "{:.3f}"), _f(d["cache_speedup"], "{:.1f}x"))
    out.print(t)

    tr = res["train"]
    t = Table(title="Training throughput (full step incl. data loading)")
    for c in ("pipeline", "img/s", "median step ms", "vs baseline", "vs project",
              "best step: vs baseline / project", "AMP", "ch-last", "augment"):
        t.add_column(c, justify="left" if c in ("pipeline", "augment") else "right",
                     no_wrap=c == "pipeline")
    rows = [("baseline", tr["baseline"]), ("project", tr["project"]),
            *tr["ablations"].items()]
    for name, r in rows:
        best = _f(r["speedup_vs_baseline_best"], "{:.2f}x")
        if "ratio_vs_project_best" in r:
            best += " / " + _f(r["ratio_vs_project_best"], "{:.2f}x")
        t.add_row(name, _f(r["images_per_s"], "{:.1f}"), _f(r["median_step_s"] * 1000, "{:.0f}"),
                  _f(r["speedup_vs_baseline"], "{:.2f}x"),
                  _f(r.get("ratio_vs_project"), "{:.2f}x"), best, r["mixed_precision"],
                  "yes" if r["channels_last"] else "no",
                  "device" if r["augmentation"].startswith("device") else
                  f"CPU, {res['settings']['workers']} workers")
    out.print(t)

    lo = res["loader"]
    t = Table(title="Is data loading the bottleneck?")
    t.add_column("measure")
    t.add_column("img/s", justify="right")
    t.add_column("over project training", justify="right")
    t.add_row("project loader alone (+ device transfer)",
              _f(lo["project_loader_images_per_s"], "{:.0f}"), _f(lo["loader_over_train"],
                                                                  "{:.1f}x"))
    t.add_row("+ normalization + device augmentation",
              _f(lo["input_pipeline_images_per_s"], "{:.0f}"),
              _f(lo["input_pipeline_over_train"], "{:.1f}x"))
    t.add_row(f"baseline loader alone ({res['settings']['workers']} workers)",
              _f(lo["baseline_loader_images_per_s"], "{:.0f}"),
              _f(lo["baseline_loader_over_train"], "{:.1f}x"))
    t.add_row("project training", _f(tr["project"]["images_per_s"], "{:.1f}"), "1.0x")
    out.print(t)

    inf = res["inference"]
    t = Table(title=f"Inference ({inf['precision']}, {inf['memory_format']}, eval mode)")
    for c in ("batch", "variant", "median ms", "img/s", "vs eager"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for b in res["settings"]["infer_batches"]:
        for name, r in inf[f"batch_{b}"].items():
            t.add_row(str(b), name, _f(r["median_latency_ms"]), _f(r["images_per_s"], "{:.1f}"),
                      _f(r["over_eager"], "{:.2f}x"))
    out.print(t)
    if inf["compile"]["status"] != "ok":
        out.print(f"torch.compile: unavailable ({inf['compile']['reason']})")
    else:
        out.print("torch.compile runs in its own process; its 'vs eager' is against eager timed "
                  "in that process. Compile time: " + ", ".join(
                      f"batch {b} {r['compile_seconds']:.0f} s"
                      for b, r in inf["compile"]["by_batch"].items()), highlight=False)
    out.print(f"TorchScript: {inf['torchscript']}; optimized: {inf['torchscript_optimized']}",
              highlight=False)

    sc = res["scaling"]
    if sc.get("status") == "ok":
        t = Table(title=f"Data-parallel scaling ({sc['backend']}, batch "
                        f"{sc['per_process_batch']}/process; {sc['note']})")
        for c in ("processes", "global batch", "threads/process", "img/s", "speedup",
                  "efficiency"):
            t.add_column(c, justify="right")
        for r in sc["runs"]:
            t.add_row(str(r["processes"]), str(r["global_batch"]),
                      str(r["threads_per_process"]), _f(r["images_per_s"], "{:.1f}"),
                      _f(r["speedup_vs_1"], "{:.2f}x"), _f(r["efficiency"], "{:.0%}"))
        out.print(t)
    else:
        out.print(f"scaling: {sc.get('status')} ({sc.get('reason', '')})")

    sm = res["summary"]
    t = Table(title="Key ratios (same run)", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("project training speedup vs baseline",
              _f(sm["project_speedup_vs_baseline"], "{:.2f}x"))
    t.add_row("gain from device augmentation (vs per-sample CPU workers)",
              _f(sm["device_augment_gain"], "{:.2f}x"))
    t.add_row("gain from channels-last", _f(sm["channels_last_gain"], "{:.2f}x"))
    t.add_row(f"AMP switched to {sm['amp_toggled_to']}, vs project",
              _f(sm["amp_toggled_ratio_vs_project"], "{:.2f}x"))
    t.add_row("loader over training (>= 3: loading is not the bottleneck)",
              _f(sm["loader_over_train"], "{:.0f}x"))
    for b, r in sm["torchscript_over_eager"].items():
        t.add_row(f"TorchScript over eager, batch {b}", _f(r, "{:.2f}x"))
    if "scaling" in sm:
        t.add_row(f"{sm['scaling']['processes']} processes over 1",
                  _f(sm["scaling"]["speedup_vs_1"], "{:.2f}x"))
    slower = sm["project_defaults_slower_than_alternative"]
    t.add_row("project defaults slower than switching them off", ", ".join(slower) or "none")
    out.print(t)


# --------------------------------------------------------------------------- main
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
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="measure torch.compile inference (default: on in full mode, off in "
                        "--quick)")
    p.add_argument("--compile-budget", type=float, help="seconds before compile is given up")
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
    if min(args.steps, args.rounds, args.batch_size, args.workers) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --batch-size and --workers must be >= 1, --warmup >= 0")
    args.rounds = min(args.rounds, args.steps)
    return args


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = select_device(args.device)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"schema": SCHEMA_VERSION, "load_average": {"start": _load_average()}}
    res["hardware"] = hardware(device)
    res["settings"] = {k: getattr(args, k) for k in (
        "mode", "batch_size", "image_size", "base_width", "steps", "warmup", "rounds",
        "workers", "infer_batches", "compile", "scaling")}
    res["settings"]["depth"] = DEPTH
    res["settings"]["project_mixed_precision"] = project_mixed_precision(device)
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
        pipelines = build_pipelines(data, args, device)
        try:
            res["train"] = measure_training(pipelines, args)
        finally:
            for p in pipelines:
                p.close()
            del pipelines

        console.print("loader ...")
        lo = measure_loader(data, args, device)
        train_ips = res["train"]["project"]["images_per_s"]
        lo["train_images_per_s"] = train_ips
        lo["loader_over_train"] = lo["project_loader_images_per_s"] / train_ips
        lo["input_pipeline_over_train"] = lo["input_pipeline_images_per_s"] / train_ips
        lo["baseline_loader_over_train"] = (lo["baseline_loader_images_per_s"]
                                            / res["train"]["baseline"]["images_per_s"])
        lo["loader_is_bottleneck"] = lo["loader_over_train"] < 3
        res["loader"] = lo

        console.print("inference ...")
        res["inference"] = measure_inference(data, args, device)

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
            *res["train"]["ablations"].items()]
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
        "loader_over_train": res["loader"]["loader_over_train"],
        "torchscript_over_eager": inf["torchscript_over_eager"],
        # The same training ratios from each pipeline's fastest step (robust to load spikes).
        "best_step": {
            "project_speedup_vs_baseline": tr["project"]["speedup_vs_baseline_best"],
            **{f"{name}_ratio_vs_project": r["ratio_vs_project_best"]
               for name, r in tr["ablations"].items()},
        },
    }
    # Project defaults that measured slower than switching them off (5% margin for noise).
    s["project_defaults_slower_than_alternative"] = [
        name for name, r in tr["ablations"].items() if r["ratio_vs_project"] > 1.05]
    sc = res.get("scaling", {})
    if sc.get("status") == "ok":
        last = sc["runs"][-1]
        s["scaling"] = {"processes": last["processes"], "speedup_vs_1": last["speedup_vs_1"],
                        "efficiency": last["efficiency"]}
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    out = Console(width=max(120, Console().width))
    print_tables(res, out)
    for w in res["warnings"]:
        out.print(f"[yellow]note:[/yellow] {w}", highlight=False)
    if args.json:
        atomic_write_json(args.json, res)
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
