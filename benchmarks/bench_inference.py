"""Throughput benchmark, inference: eager, TorchScript and ``torch.compile`` forward passes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from bench_common import DEPTH, _sync

from brainseg_dist.console import console
from brainseg_dist.data import SliceData
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize


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
