"""Throughput benchmark, augmentation on its own: milliseconds per batch of the device
normalization and of ``DeviceAugment`` (the whole of it, with the sequential Kornia ops and with
the one-grid ``augment.fused`` geometry, and each op alone), and their share of the project's
training step."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import _sync, failure
from bench_training import data_batches, project_on_device

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.data import SliceData
from brainseg_dist.preprocess import normalize
from brainseg_dist.train.setup import compile_model, compiles_augmentation, uses_cuda_graphs


def _ms_per_call(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Mean milliseconds per call over ``iters`` calls after one untimed call; the device is
    synchronized at both ends only, as in training."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1000


def compiled_augment_ms(cfg: AugmentConfig, x: torch.Tensor, y: torch.Tensor,
                        mode: str, iters: int) -> float | dict[str, str]:
    """Milliseconds per call of ``DeviceAugment`` compiled as ``train.compile`` compiles it
    in ``mode`` (each call marked as a new step where the mode replays CUDA graphs), after
    three untimed calls (the compile and the graph recording); or the failure."""
    augment = DeviceAugment(cfg).to(x.device).train()
    graphs = uses_cuda_graphs(mode)

    def call():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        augment(x, y)

    try:
        if not compile_model(augment, mode):
            raise RuntimeError("torch.compile is unavailable here")
        for _ in range(2):
            call()
        return _ms_per_call(call, x.device, iters)
    except Exception as exc:
        return failure(exc)


def measure_augmentation(data: SliceData, args, device: torch.device, project_step_s: float,
                         compile_modes: list[str] = ()) -> dict[str, Any]:
    """Augmentation cost per batch of ``args.batch_size`` and its share of a training step.

    Args:
        data: the slices.
        args: the benchmark's options (``batch_size``, ``loader_batches``).
        device: where the batches and Kornia run.
        project_step_s: the project pipeline's median training step, in seconds.
        compile_modes: with ``train.compile`` on, the augmentation is compiled where
            :func:`compiles_augmentation`; it is then timed compiled in each of these modes.

    Returns:
        ``normalize_ms``, ``augment_ms`` (geometry, mask threshold and the configured
        intensity changes of :class:`DeviceAugment`, as configured by default),
        ``augment_other_ms`` (the same with ``augment.fused`` toggled: one sampling grid
        against the sequential Kornia ops), ``ops_ms`` (each sequential Kornia op on the
        stacked image+mask batch), ``fused_geometry_ms`` (the one-grid geometry alone),
        ``augment_share_of_step``, ``augment_other_share_of_step`` and
        ``input_share_of_step`` (normalization + augmentation); ``augment_compiled_ms``
        (mode: the default augmentation compiled) where it is compiled.
    """
    images, masks, _ = next(data_batches(data, args.batch_size, device,
                                         project_on_device(data, device), seed=2))
    images, masks = images.to(device), masks.to(device)
    cfg = AugmentConfig()
    augment = DeviceAugment(cfg).to(device).train()
    other = DeviceAugment(dataclasses.replace(cfg, fused=not cfg.fused)).to(device).train()
    sequential, fused = (other, augment) if cfg.fused else (augment, other)
    x = normalize(images, "slice").contiguous(memory_format=torch.channels_last)
    y = masks.float()
    stacked = torch.cat([x, y], dim=1)
    iters = max(args.loader_batches, 5)
    out: dict[str, Any] = {
        "batch_size": args.batch_size,
        "fused_is_default": cfg.fused,
        "normalize_ms": _ms_per_call(lambda: normalize(images, "slice"), device, iters),
        "augment_ms": _ms_per_call(lambda: augment(x, y), device, iters),
        "augment_other_ms": _ms_per_call(lambda: other(x, y), device, iters),
        "ops_ms": {type(op).__name__: _ms_per_call(lambda op=op: op(stacked), device, iters)
                   for op in sequential.geometric},
        "fused_geometry_ms": _ms_per_call(lambda: fused.geometric(stacked), device, iters),
    }
    if compile_modes and compiles_augmentation(device):
        out["augment_compiled_ms"] = {mode: compiled_augment_ms(cfg, x, y, mode, iters)
                                      for mode in compile_modes}
    step_ms = project_step_s * 1000
    out["project_step_ms"] = step_ms
    out["augment_share_of_step"] = out["augment_ms"] / step_ms
    out["augment_other_share_of_step"] = out["augment_other_ms"] / step_ms
    out["input_share_of_step"] = (out["augment_ms"] + out["normalize_ms"]) / step_ms
    return out
