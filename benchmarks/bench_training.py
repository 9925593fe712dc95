"""Throughput benchmark, training: the project's input pipeline (the package's data path,
normalization, device augmentation, loss and mixed-precision rule, as training uses them)
against the baseline and each optimization switched off; and the data path against training.

Steps are timed in blocks (one device sync at each end of a round's steps, none between), so
a step that never waits on the device can overlap the next one, as in training. After the block
of a pipeline fed by loader workers, the next block waits until those workers have refilled
their prefetch buffer (:func:`wait_for_idle_workers`): otherwise they would run beside whichever
pipeline is timed next, which on an H200 host slowed the project's launch-bound step by a
quarter (23.5 ms beside them, 18.2 ms without)."""

from __future__ import annotations

import itertools
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
from bench_common import (
    DEPTH,
    LR,
    _amp_dtype,
    _sync,
    project_mixed_precision,
    wait_for_idle_workers,
)

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig, DataConfig, load_config
from brainseg_dist.console import console
from brainseg_dist.data import SliceData
from brainseg_dist.data.device import DeviceBatches, resolve_on_device
from brainseg_dist.data.loader import make_loader
from brainseg_dist.metrics import bce_dice_loss
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize
from brainseg_dist.train.setup import (
    adam_implementation,
    compile_for_training,
    compiles_augmentation,
    make_optimizer,
    uses_cuda_graphs,
)


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
    sync_every_step: bool = False  # the old step: loss.item() and bool(finite) every step
    cudagraph_steps: bool = False  # torch.compile mode reduce-overhead: mark each new step
    settings: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # per-step mean of each timed block
    # The same in this process's CPU seconds: on a CPU shared with other jobs, a steadier
    # measure of the work of pipelines that do it all in this process (no loader workers).
    cpu_times: list[float] = field(default_factory=list)
    scaler: Any = None
    first_step_s: float | None = None  # the first warm-up step (a compile, if any)
    settle_s: float = 0.0  # waited, untimed, for its loader workers after its blocks

    def __post_init__(self):
        if self.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        self.loss_sum = torch.zeros((), device=self.device)  # the sync-free step's loss

    def step(self) -> None:
        """One full training step, including fetching the batch from the loader."""
        if self.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
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
        if self.sync_every_step:  # what training did before: two host syncs per step
            loss.item()
            bool(~torch.isfinite(loss.detach()))
        else:
            self.loss_sum += loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def timed_step(self) -> float:
        return self.timed_steps(1)

    def timed_steps(self, n: int) -> float:
        """Seconds per step over ``n`` steps, with a device sync only at both ends; the
        process's CPU seconds per step go to ``cpu_times``."""
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.step()
        _sync(self.device)
        self.cpu_times.append((time.process_time() - c0) / n)
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        """Stop loader worker processes (a DataLoader iterator shuts them down when freed)."""
        self.batches = iter(())

def _model(base_width: int, channels_last: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every pipeline
    return build_model(base_width, DEPTH, channels_last).to(device).train()

def _new_pipeline(name: str, description: str, batches: Iterator, base_width: int,
                  device: torch.device, amp: str, channels_last: bool = True,
                  augment: bool | None = True, adam: str = "auto", **options) -> Pipeline:
    """A pipeline with a fresh model (the same initial weights for every pipeline) and its
    own Adam, in the kernels ``optim.implementation: adam`` gives training on this device.
    ``augment``: True, the project's batched device augmentation; False, batches that come
    augmented (normalized on the device all the same); None, the baseline's float batches,
    neither."""
    model = _model(base_width, channels_last, device)
    optim_cfg = load_config(None, {"optim.implementation": adam})
    return Pipeline(
        name, description, batches, model,
        make_optimizer(model.parameters(), optim_cfg, LR, device.type),
        device, torch.channels_last if channels_last else torch.contiguous_format, amp,
        augment is not None, DeviceAugment(AugmentConfig()).to(device).train() if augment
        else None, **options)

def project_on_device(data: SliceData, device: torch.device) -> bool:
    """The project's default data path here (``data.on_device: auto``)."""
    return resolve_on_device("auto", device, data.images.nbytes + data.masks.nbytes,
                             DataConfig().device_memory_budget)

def data_batches(data: SliceData, batch_size: int, device: torch.device, on_device: bool,
                 seed: int = 0) -> Iterator:
    """Full uint8 batches, epoch after epoch: held on the device (training's
    :class:`DeviceBatches`) or from the in-memory DataLoader."""
    if not on_device:
        loader = make_loader(data, batch_size, shuffle=True, drop_last=True, seed=seed)
        return _cycle(lambda: loader)
    batches = DeviceBatches(data, batch_size, seed, device)

    def epochs() -> Iterator:
        for epoch in itertools.count():
            batches.set_epoch(epoch)
            yield from (b for b in batches if len(b[2]) == batch_size)

    return epochs()

def build_pipelines(data: SliceData, args, device: torch.device) -> list[Pipeline]:
    """The baseline (and the baseline at other worker counts), the project pipeline and one
    ablation per speed choice."""
    bs, bw = args.batch_size, args.base_width
    # Enough batches that the workers keep producing through every timed step: a timed
    # window then starts and ends with the prefetch buffer full (steady state), so it
    # pays for exactly the batches it consumes.
    n_batches = args.warmup + args.steps + 4 * max([args.workers, *args.baseline_workers]) + 4
    project_amp = project_mixed_precision(device)
    toggled_amp = "no" if project_amp != "no" else "bf16"
    on_device = project_on_device(data, device)
    aug_cfg = AugmentConfig()
    where = {True: "uint8 held on the device", False: "uint8 in-memory DataLoader, 0 workers"}
    project_adam = adam_implementation("auto", device.type)
    other_adam = "torch" if project_adam == "fused" else "fused"

    def pipeline(name, description, batches, channels_last=True, amp=project_amp,
                 augment=True, data_on_device=on_device, workers=args.workers, adam="auto",
                 **options):
        return _new_pipeline(
            name, description, batches, bw, device, amp, channels_last, augment, adam, **options,
            settings={"channels_last": channels_last, "mixed_precision": amp,
                      "adam": adam_implementation(adam, device.type),
                      "augmentation": "device (batched, Kornia)" if augment
                      else f"per-sample on CPU in {workers} loader workers",
                      "loader": where[data_on_device] if augment else f"{workers} workers"})

    def project_batches(toggled: bool = False) -> Iterator:
        return data_batches(data, bs, device, on_device != toggled)

    def baseline(workers: int, name: str = "baseline") -> Pipeline:
        loader = per_sample_loader(BaselineDataset(data, PerSampleAugment.buda(aug_cfg)), bs,
                                   n_batches, workers)
        return pipeline(name, "reference: float32 slices, per-sample CPU augmentation in "
                        f"{workers} DataLoader workers, fp32, NCHW, torch's Adam", iter(loader),
                        False, "no", None, False, workers, adam="torch")

    cpu_aug_loader = per_sample_loader(
        Uint8AugmentDataset(data, PerSampleAugment.from_config(aug_cfg)), bs, n_batches,
        args.workers)
    amp_word = {"no": "off", "bf16": "bf16", "fp16": "fp16"}
    pipelines = [
        baseline(args.workers),
        pipeline("project", f"{where[on_device]}, device normalization + batched device "
                 f"augmentation, channels-last, AMP {amp_word[project_amp]}, no host sync in "
                 "the step (project default)", project_batches()),
        pipeline("no_device_augment", "project, but per-sample CPU augmentation in "
                 f"{args.workers} loader workers", iter(cpu_aug_loader), augment=False,
                 data_on_device=False),
        pipeline("no_channels_last", "project, but NCHW (contiguous) model and inputs",
                 project_batches(), channels_last=False),
        pipeline("amp_toggled", f"project, but AMP {amp_word[toggled_amp]} (project default "
                 f"on {device.type}: {amp_word[project_amp]})", project_batches(),
                 amp=toggled_amp),
        pipeline("data_toggled", f"project, but {where[not on_device]} (project default on "
                 f"{device.type}: {where[on_device]})", project_batches(toggled=True),
                 data_on_device=not on_device),
        pipeline("sync_per_step", "project, but loss.item() and bool(finite) every step (the "
                 "step before the sync-free one)", project_batches(), sync_every_step=True),
        pipeline("adam_toggled", f"project, but Adam {other_adam} (project default on "
                 f"{device.type}: {project_adam})", project_batches(), adam=other_adam),
    ]
    pipelines += [baseline(w, f"baseline_workers_{w}") for w in args.baseline_workers
                  if w != args.workers]
    return pipelines

def build_compile_pipelines(data: SliceData, args, device: torch.device,
                            mode: str = "default") -> list[Pipeline]:
    """The project pipeline and the same with its model compiled as ``train.compile`` does
    in ``mode`` (timed apart from the others, so a slow or failing compile costs only its
    own result)."""
    on_device = project_on_device(data, device)
    amp = project_mixed_precision(device)
    augment_too = " and the augmentation" if compiles_augmentation(device) else ""
    eager, compiled = (
        _new_pipeline(name, description, data_batches(data, args.batch_size, device, on_device),
                      args.base_width, device, amp, **options)
        for name, description, options in (
            ("project", "project (eager), timed beside the compiled one", {}),
            ("compiled", f"project, with torch.compile of the model{augment_too} (mode {mode})",
             {"cudagraph_steps": uses_cuda_graphs(mode)})))
    if not compile_for_training(compiled.model, compiled.augment, device, mode):
        raise RuntimeError("torch.compile is unavailable here")
    return [eager, compiled]

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

def _round_ratio(p: Pipeline, ref: Pipeline, cpu: bool = False) -> float:
    """Median over rounds of ``ref``'s step time over ``p``'s in the same round (> 1: ``p``
    is faster): each round's pair ran back to back, under the same load. ``cpu``: from the
    process's CPU seconds instead of wall time."""
    times, ref_times = (p.cpu_times, ref.cpu_times) if cpu else (p.times, ref.times)
    return statistics.median(r / t for t, r in zip(times[-len(p.times):],
                                                   ref_times[-len(ref.times):], strict=True))

def _time_interleaved(pipelines: list[Pipeline], args) -> None:
    """Warm every pipeline up, then time ``steps`` steps each, interleaved in rounds (order
    reversed every other round) so a load change on the machine hits all of them alike.
    Each round's steps of a pipeline are timed as one block (``Pipeline.times`` holds one
    per-step time per round); with ``args.settle``, a block fed by loader workers is
    followed by :func:`wait_for_idle_workers`."""
    for p in pipelines:
        console.print(f"  warm-up: {p.name}")
        for i in range(max(args.warmup, 1)):  # at least one: the compile, if any, is here
            t = p.timed_step()
            p.first_step_s = t if i == 0 else p.first_step_s
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds)
                 for r in range(args.rounds)]
    for r, n in enumerate(per_round):
        order = pipelines if r % 2 == 0 else pipelines[::-1]
        for p in order:
            p.times.append(p.timed_steps(n))
            console.print(f"  round {r + 1}/{args.rounds}: {p.name} "
                          f"{p.times[-1] * 1000:.0f} ms/step")
            if args.settle:
                p.settle_s += wait_for_idle_workers(p.batches)

def measure_training(pipelines: list[Pipeline], args) -> dict[str, Any]:
    """Every pipeline timed by :func:`_time_interleaved`, against the baseline and (the
    ablations) the project."""
    _time_interleaved(pipelines, args)
    by_name = {p.name: p for p in pipelines}
    results: dict[str, Any] = {}
    base = _summary(by_name["baseline"].times, args.batch_size)
    project = _summary(by_name["project"].times, args.batch_size)
    for p in pipelines:
        r = {"description": p.description, **p.settings, **_summary(p.times, args.batch_size)}
        r["speedup_vs_baseline"] = r["images_per_s"] / base["images_per_s"]
        # From each pipeline's fastest round: less sensitive to other processes' load.
        r["speedup_vs_baseline_best"] = r["best_images_per_s"] / base["best_images_per_s"]
        r["round_median_speedup_vs_baseline"] = _round_ratio(p, by_name["baseline"])
        if p.name != "baseline" and not p.name.startswith("baseline_"):
            r["first_step_s"] = p.first_step_s
        if p.settle_s:
            r["settle_s"] = round(p.settle_s, 3)
        if p.name not in ("baseline", "project"):
            r["ratio_vs_project"] = r["images_per_s"] / project["images_per_s"]
            r["ratio_vs_project_best"] = r["best_images_per_s"] / project["best_images_per_s"]
            r["round_median_ratio_vs_project"] = _round_ratio(p, by_name["project"])
            if not p.name.startswith("no_device"):  # workers' CPU time is not ours
                r["round_median_cpu_ratio_vs_project"] = _round_ratio(p, by_name["project"],
                                                                      cpu=True)
            # > 1: the project's choice (this optimization on) is faster on this device.
            r["project_choice_gain"] = 1 / r["ratio_vs_project"]
        results[p.name] = r
    out = {"baseline": results.pop("baseline"), "project": results.pop("project")}
    sweep = {k: results.pop(k) for k in list(results) if k.startswith("baseline_workers_")}
    out["ablations"] = results
    out["baseline_workers"] = {str(args.workers): out["baseline"]["images_per_s"], **{
        k.removeprefix("baseline_workers_"): r["images_per_s"] for k, r in sweep.items()}}
    out["baseline_sweep"] = sweep
    return out

def measure_compile(pipelines: list[Pipeline], args) -> dict[str, Any]:
    """What ``train.compile`` costs (the compiled pipeline's first step, less a steady one)
    and saves per step against the eager project timed in the same rounds; the steps after
    which it has paid for itself (None: it never does)."""
    _time_interleaved(pipelines, args)
    project, compiled = pipelines
    eager = _summary(project.times, args.batch_size)
    r = {"description": compiled.description, **_summary(compiled.times, args.batch_size),
         "first_step_s": compiled.first_step_s, "eager_median_step_s": eager["median_step_s"]}
    r["ratio_vs_project"] = eager["median_step_s"] / r["median_step_s"]
    r["round_median_ratio_vs_project"] = _round_ratio(compiled, project)
    cost = r["first_step_s"] - r["median_step_s"]
    saved = eager["median_step_s"] - r["median_step_s"]
    return {**r, "compile_seconds": cost, "saved_per_step_s": saved,
            "break_even_steps": cost / saved if saved > 0 else None}

def measure_loader(data: SliceData, args, device: torch.device) -> dict[str, Any]:
    """The project's data path alone (device-resident batches, or the loader with the device
    transfer), the other path, the whole input pipeline (data + normalization + device
    augmentation) and the reference's loader alone."""
    bs, n = args.batch_size, args.loader_batches
    on_device = project_on_device(data, device)
    batches = data_batches(data, bs, device, on_device, seed=1)
    other = data_batches(data, bs, device, not on_device, seed=1)
    augment = DeviceAugment(AugmentConfig()).to(device).train()

    def rate(fn: Callable[[], None], count: int) -> float:
        fn()  # first batch: not timed
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        _sync(device)
        return bs * count / (time.perf_counter() - t0)

    def fetch(source: Iterator = batches):
        images, masks = next(source)[:2]
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    def pipeline():
        images, masks = fetch()
        x = normalize(images, "slice").contiguous(memory_format=torch.channels_last)
        augment(x, masks.float())

    out = {"project_data_on_device": on_device,
           "project_loader_images_per_s": rate(fetch, max(n, 20)),
           "other_data_path_images_per_s": rate(lambda: fetch(other), max(n, 20)),
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
