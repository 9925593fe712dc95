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
from bench_common import _sync
from bench_training import data_batches, project_on_device

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.data import SliceData
from brainseg_dist.preprocess import normalize


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


def measure_augmentation(data: SliceData, args, device: torch.device,
                         project_step_s: float) -> dict[str, Any]:
    """Augmentation cost per batch of ``args.batch_size`` and its share of a training step.

    Args:
        data: the slices.
        args: the benchmark's options (``batch_size``, ``loader_batches``).
        device: where the batches and Kornia run.
        project_step_s: the project pipeline's median training step, in seconds.

    Returns:
        ``normalize_ms``, ``augment_ms`` (geometry, mask threshold and the configured
        intensity changes of :class:`DeviceAugment`, as configured by default),
        ``augment_other_ms`` (the same with ``augment.fused`` toggled: one sampling grid
        against the sequential Kornia ops), ``ops_ms`` (each sequential Kornia op on the
        stacked image+mask batch), ``fused_geometry_ms`` (the one-grid geometry alone),
        ``augment_share_of_step``, ``augment_other_share_of_step`` and
        ``input_share_of_step`` (normalization + augmentation).
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
    step_ms = project_step_s * 1000
    out["project_step_ms"] = step_ms
    out["augment_share_of_step"] = out["augment_ms"] / step_ms
    out["augment_other_share_of_step"] = out["augment_other_ms"] / step_ms
    out["input_share_of_step"] = (out["augment_ms"] + out["normalize_ms"]) / step_ms
    return out
