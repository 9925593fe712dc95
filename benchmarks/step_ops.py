"""Host calls per training step, phase by phase: what a host-bound GPU step is made of.

On a GPU a U-Net step at batch 32 and 128² is bound by the host (benchmarks/README.md): its
time is the CPU's time to issue a few hundred small operations, not the GPU's to run them. Each
operator call the dispatcher sees is host work, and most launch a kernel on a GPU. Counting
them needs no GPU: :class:`PhaseCounter` (a ``TorchDispatchMode``) counts the calls of one
real :meth:`~brainseg_dist.train.Trainer.train_step`, labelled by the part of the step that
made them (augmentation, forward, loss, backward, optimizer, EMA, loss tracker; the rest is
"inputs": normalization, casts and layout).

    python benchmarks/step_ops.py configs/lgg_unet128.yaml [--set key=value ...] [--json F]

prints a table for the config as it resolves on this machine, and for each variant of the
optimizer's kernels (``optim.implementation``), the augmentation's geometry
(``augment.fused``) and the mixed precision. The counts are the same on any device up to the
optimizer's choice (torch's default is foreach on CUDA, a for-loop on CPUs; ``fused`` is the
same everywhere) and tensor-size-dependent kernels (none in this step). ``--profile N`` adds
each variant's step time and, on CUDA, its GPU kernel time and kernel launches.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_common import _sync  # noqa: E402

from brainseg_dist.cli.training import parse_set_options  # noqa: E402
from brainseg_dist.config import load_config  # noqa: E402
from brainseg_dist.data.synth import write_synthetic_dataset  # noqa: E402
from brainseg_dist.errors import BrainsegError  # noqa: E402
from brainseg_dist.io import atomic_write_text  # noqa: E402
from brainseg_dist.train import Trainer  # noqa: E402
from brainseg_dist.train import trainer as trainer_module  # noqa: E402
from brainseg_dist.train.step import LossTracker  # noqa: E402

# Runtime calls that launch GPU work (a kernel, or a whole CUDA graph).
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaGraphLaunch")
PHASES = ("inputs", "augment", "forward", "loss", "tracker", "backward", "optimizer", "ema")
PROFILED = ("wall_ms", "device_ms", "device_busy", "kernel_launches")
# Profiler ranges that optimizers open: bookkeeping of the profiler, no work.
_NOT_COUNTED = ("profiler.",)


class PhaseCounter(TorchDispatchMode):
    """Counts operator calls by the phase that is current when they are made.

    :meth:`labelled` wraps a callable so that the calls it makes count for its phase; calls made
    outside any labelled callable count for ``default``.
    """

    def __init__(self, default: str = "inputs"):
        super().__init__()
        self.phase = default
        self.counts: Counter[str] = Counter()
        self.ops: dict[str, Counter[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not name.startswith(_NOT_COUNTED):
            self.counts[self.phase] += 1
            self.ops.setdefault(self.phase, Counter())[name] += 1
        return func(*args, **(kwargs or {}))

    def labelled(self, phase: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            outer, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = outer
        return call


@contextlib.contextmanager
def phases_of(trainer: Trainer, counter: PhaseCounter):
    """Label the parts of ``trainer``'s step for ``counter`` (instance attributes, and the
    loss function the trainer module calls), restored on exit."""
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    patched = [(trainer.augment, "forward"), (model, "forward"), (acc, "backward"),
               (trainer.optimizer, "step"), (trainer.optimizer, "zero_grad")]
    phases = ["augment", "forward", "backward", "optimizer", "optimizer"]
    if trainer.ema is not None:
        patched.append((trainer.ema, "update"))
        phases.append("ema")
    # Accelerate may have set an instance attribute already (its autocast forward): keep it.
    saved = [vars(obj).get(name) for obj, name in patched]
    for (obj, name), phase in zip(patched, phases, strict=True):
        setattr(obj, name, counter.labelled(phase, getattr(obj, name)))
    loss_fn = trainer_module.bce_dice_loss
    trainer_module.bce_dice_loss = counter.labelled("loss", loss_fn)
    try:
        yield
    finally:
        trainer_module.bce_dice_loss = loss_fn
        for (obj, name), before in zip(patched, saved, strict=True):
            if before is None:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, before)


class _LabelledTracker(LossTracker):
    counter: PhaseCounter

    def add(self, loss, images, step):
        return self.counter.labelled("tracker", super().add)(loss, images, step)


def count_step(trainer: Trainer) -> PhaseCounter:
    """Operator calls of one training step of ``trainer`` (its second: the first may set up
    optimizer state and caches), by phase."""
    tracker = _LabelledTracker(trainer.accelerator)
    tracker.counter = PhaseCounter()  # not active in the first step
    trainer.model.train()
    trainer.augment.train()
    batches = iter(trainer.train_batches)
    trainer.train_step(*next(batches), tracker, 0)
    counter = tracker.counter = PhaseCounter()
    images, masks, idx = next(batches)
    with phases_of(trainer, counter), counter:
        trainer.train_step(images, masks, idx, tracker, 1)
    return counter


def profile_steps(trainer: Trainer, steps: int = 10) -> dict[str, float | None]:
    """Milliseconds per training step: wall time (timed without the profiler, whose own
    overhead would slow a host-bound step) and, on CUDA, the GPU's kernel time and kernel
    launches per step (``torch.profiler``). ``device_busy`` is kernel time over wall time:
    far below 1, the GPU waits for the host.

    Args:
        trainer: a built trainer; its first batches are reused round robin.
        steps: steps timed, and then profiled, after three untimed ones.
    """
    device = trainer.accelerator.device
    tracker = LossTracker(trainer.accelerator)
    trainer.model.train()
    trainer.augment.train()
    batches = itertools.cycle(list(itertools.islice(iter(trainer.train_batches), 4)))
    for _ in range(3):
        trainer.train_step(*next(batches), tracker, 0)
    _sync(device)
    t0 = time.perf_counter()
    for k in range(steps):
        trainer.train_step(*next(batches), tracker, k)
    _sync(device)
    wall_ms = (time.perf_counter() - t0) / steps * 1000
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for k in range(steps):
            trainer.train_step(*next(batches), tracker, k)
        _sync(device)
    out: dict[str, float | None] = {"wall_ms": wall_ms, "device_ms": None,
                                    "device_busy": None, "kernel_launches": None}
    if cuda:
        device_ms, launches = device_columns(prof.key_averages())
        out["device_ms"] = device_ms / steps
        out["device_busy"] = out["device_ms"] / wall_ms
        out["kernel_launches"] = launches / steps
    return out


def device_columns(events: Any) -> tuple[float, int]:
    """Milliseconds of GPU work and kernel launches in a profile's averaged events.

    Only the GPU's own events count towards the time: kineto also credits each kernel's time
    to the CPU call that launched it, so summing every event's self device time would count
    each kernel twice (torch's own table sums the same events as this). User ranges on the
    GPU's timeline span kernels and are not work of their own.
    """
    device = [e for e in events if e.device_type != DeviceType.CPU
              and not getattr(e, "is_user_annotation", False)]
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    return sum(e.self_device_time_total for e in device) / 1000, launches


def _variants() -> list[tuple[str, dict[str, Any], bool]]:
    """``(name, overrides, foreach Adam)``: the config as given, each optimizer implementation
    (with torch's CUDA choice, foreach, here on any device), each geometry, precision and
    normalization."""
    rows = [("as configured", {}, False)]
    for impl in ("torch", "fused"):
        rows.append((f"optim.implementation: {impl}", {"optim.implementation": impl}, False))
    rows.append(("Adam foreach (torch's choice on CUDA)", {}, True))
    for fused in (False, True):
        rows.append((f"augment.fused: {str(fused).lower()}", {"augment.fused": fused}, False))
    for amp in ("no", "bf16"):  # autocast's casts are host calls too
        rows.append((f"train.mixed_precision: {amp}", {"train.mixed_precision": amp}, False))
    for norm in ("batch", "instance", "group"):  # the GPU recipe's open choice
        rows.append((f"model.norm: {norm}", {"model.norm": norm}, False))
    return rows


def measure(config: str | None, overrides: dict[str, Any], profile_steps_n: int = 0,
            on_row: Callable[[list[dict[str, Any]]], None] | None = None
            ) -> list[dict[str, Any]]:
    """One row per variant: the calls per phase and in all, on a small synthetic set; with
    ``profile_steps_n``, also :func:`profile_steps` over that many steps. ``on_row`` gets the
    rows so far after each variant, so a run stopped at a time limit keeps what it measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "synth", patients=4)
        for name, extra, foreach in _variants():
            t0 = time.perf_counter()
            cfg = load_config(config, {"data.data_dir": str(data),
                                       "train.output_dir": str(Path(tmp) / "run"),
                                       "train.export": False, "train.epochs": 1,
                                       **overrides, **extra})
            trainer = Trainer(cfg)
            if foreach:
                trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=trainer.lr,
                                                     weight_decay=cfg.optim.weight_decay,
                                                     foreach=True)
            counts = count_step(trainer).counts
            rows.append({"variant": name, **{p: counts.get(p, 0) for p in PHASES},
                         "total": sum(counts.values()),
                         "device": str(trainer.accelerator.device)})
            if profile_steps_n:
                try:  # CUDA's profiler needs CUPTI: a failure costs only these columns
                    rows[-1].update(profile_steps(trainer, profile_steps_n))
                except Exception as exc:
                    rows[-1]["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
            if on_row is not None:
                on_row(rows)
    return rows


def _steps(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 0, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="YAML config (default: the package defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="write the rows here too")
    p.add_argument("--profile", type=_steps, default=0, metavar="STEPS",
                   help="also time STEPS steps per variant, and profile as many (kernel time "
                        "and launches per step on CUDA)")
    args = p.parse_args(argv)
    def on_row(rows: list[dict[str, Any]]) -> None:
        print(f"step_ops: {rows[-1]['variant']}: {rows[-1]['total']} calls, "
              f"{rows[-1]['seconds']} s", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")

    try:
        rows = measure(args.config, parse_set_options(tuple(args.set)), args.profile, on_row)
    except BrainsegError as exc:
        raise SystemExit(f"step_ops: {exc}") from None
    table = Table(title=f"Host calls per training step ({rows[0]['device']})")
    timed = [k for k in PROFILED if k in rows[0]]
    for name in ("variant", *PHASES, "total", *timed):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], *(str(r[k]) for k in (*PHASES, "total")),
                      *("-" if r[k] is None else f"{r[k]:.3g}" for k in timed))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
