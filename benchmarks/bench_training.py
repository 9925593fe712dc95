"""Throughput benchmark, training: the project's input pipeline (the package's loader,
normalization, device augmentation, loss and mixed-precision rule, as training uses them)
against the baseline and each optimization switched off; and the loader against training."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from baseline import (
    BaselineDataset,
    PerSampleAugment,
    Uint8AugmentDataset,
    per_sample_loader,
)
from bench_common import DEPTH, LR, _amp_dtype, _sync, project_mixed_precision

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.console import console
from brainseg_dist.data import SliceData
from brainseg_dist.data.loader import make_loader
from brainseg_dist.metrics import bce_dice_loss
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize


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
