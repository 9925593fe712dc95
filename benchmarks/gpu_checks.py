#!/usr/bin/env python
"""The checks and the training run of ``benchmarks/gpu_check.sh``, as plain functions.

Each ``check_*`` function takes a :class:`~brainseg_dist.train.Trainer` and returns what it saw
(JSON-ready), raising ``AssertionError`` when the GPU fast path is not in effect:

* ``check_bf16_autocast``: every convolution's output is bf16 under the training autocast;
* ``check_channels_last``: every convolution gets a channels-last input (after the warps);
* ``check_kornia_on_device``: Kornia draws its parameters and works on the training device;
* ``check_device_batches``: the training slices live on the device and batches are its rows;
* ``check_no_host_sync``: steps between two loss reads never wait on the device, under
  ``torch.cuda.set_sync_debug_mode("warn")`` on CUDA, every warning collected with the line
  that made it (the host-sync counter on CPU);
* ``check_no_host_sync_fused``: the same with the one-grid geometry (``augment.fused``);
* ``check_compiled_augment_draws``: the augmentation compiled as ``train.compile`` compiles it
  (CUDA graphs) still draws anew in every step, at the configured rates.

No pytest is needed (the GPU machine may lack it): ``python benchmarks/gpu_checks.py checks``
runs them all and writes JSON; ``tests/test_gpu.py`` runs the same functions under pytest
(``gpu`` marker, skipped without CUDA). ``train`` runs a config for a few epochs and reports
images/s and peak memory; ``summary`` folds the results of ``gpu_check.sh`` into one JSON.

    python benchmarks/gpu_checks.py checks --device cuda --json checks.json
    python benchmarks/gpu_checks.py train --config configs/lgg_unet128.yaml --epochs 3 \\
        --synthetic-patients 60 --work /tmp/run --json train.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_summary import summarize
from host_syncs import HostSyncCounter

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import load_config
from brainseg_dist.io import atomic_write_json
from brainseg_dist.train import Trainer, run_training
from brainseg_dist.train.setup import compile_for_training
from brainseg_dist.train.step import LossTracker

CONVS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
# The sampler's permutation is drawn from a CPU generator on every device (host work).
HOST_CODE = (("data/loader.py", "__iter__"),)
# c10/cuda's warning at each synchronizing call under set_sync_debug_mode("warn").
SYNC_WARNING = "called a synchronizing CUDA operation"


def tiny_trainer(out: Path, device: str, **overrides: Any) -> Trainer:
    """A small synthetic run on ``device`` (``cuda`` or ``cpu``) with the project defaults
    that matter here: channels-last, device augmentation, the default data path and AMP on
    CUDA (on CPU: the slices forced onto the "device", AMP as given)."""
    cfg = load_config(None, {
        "data.synthetic_patients": 4, "data.image_size": 64, "model.base_width": 8,
        "train.batch_size": 8, "train.epochs": 1, "train.output_dir": str(out),
        "train.export": False, "train.num_overlays": 0, "train.cpu": device == "cpu",
        "data.on_device": "auto" if device == "cuda" else "true",
        "augment.elastic_p": 0.5, "augment.gamma_p": 0.5, **overrides})
    return Trainer(cfg)


def _steps(trainer: Trainer, n: int, first_step: int = 0):
    """Run ``n`` training steps; yields before each one (so a caller can switch modes)."""
    tracker = LossTracker(trainer.accelerator)
    trainer.model.train()
    trainer.augment.train()
    batches = iter(trainer.train_batches)
    for step in range(first_step, first_step + n):
        yield step
        images, masks, idx = next(batches)
        trainer.train_step(images, masks, idx, tracker, step)


def _hooked_step(trainer: Trainer, hook, pre: bool = False) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    convs = [m for m in model.modules() if isinstance(m, CONVS)]
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook)
               for m in convs]
    try:
        for _ in _steps(trainer, 1):
            pass
    finally:
        for h in handles:
            h.remove()


def check_bf16_autocast(trainer: Trainer) -> dict[str, Any]:
    """Convolution outputs are bf16 under the training autocast (mixed precision bf16)."""
    assert trainer.accelerator.mixed_precision == "bf16", trainer.accelerator.mixed_precision
    dtypes: Counter[str] = Counter()
    _hooked_step(trainer, lambda _module, _inputs, out: dtypes.update([str(out.dtype)]))
    assert dtypes, "no convolution ran"
    assert set(dtypes) == {"torch.bfloat16"}, dict(dtypes)
    return {"mixed_precision": "bf16", "conv_output_dtypes": dict(dtypes)}


def check_channels_last(trainer: Trainer) -> dict[str, Any]:
    """Every convolution's input (the first one's comes from the augmentation warps) and
    weight are channels-last."""
    seen: Counter[str] = Counter()

    def hook(module, inputs):
        x = inputs[0]
        seen["input channels-last" if x.is_contiguous(memory_format=torch.channels_last)
             else "input NCHW"] += 1
        seen["weight channels-last" if module.weight.is_contiguous(
            memory_format=torch.channels_last) else "weight NCHW"] += 1

    _hooked_step(trainer, hook, pre=True)
    assert not seen["input NCHW"], dict(seen)
    assert not seen["weight NCHW"], dict(seen)
    return {"convolutions": dict(seen)}


def check_kornia_on_device(trainer: Trainer) -> dict[str, Any]:
    """Kornia's random parameters are drawn on, and its ops return, the training device."""
    device = trainer.accelerator.device
    aug = trainer.augment.train()
    x = torch.rand(8, 4, 64, 64, device=device)
    ops = {}
    geometric = list(aug.geometric) if isinstance(aug.geometric, torch.nn.Sequential) else []
    for op in [*geometric, *([aug.gamma] if aug.gamma is not None else [])]:
        out = op(x if op is not aug.gamma else x[:, :3])
        ops[type(op).__name__] = {"rng_device": str(op.device), "output": str(out.device)}
        assert op.device.type == device.type, ops
        assert out.device.type == device.type, ops
    return {"device": str(device), "ops": ops}


def check_device_batches(trainer: Trainer) -> dict[str, Any]:
    """The training slices are held on the device, and a batch is their rows at its index."""
    device = trainer.accelerator.device
    assert trainer.on_device, "data.on_device resolved to false"
    held = trainer.train_batches.images
    assert held.device.type == device.type
    assert held.dtype == torch.uint8
    images, _, idx = next(iter(trainer.train_batches))
    assert images.device.type == device.type
    assert idx.device.type == device.type
    rows = torch.from_numpy(trainer.train_data.images[idx.cpu().numpy()])
    assert torch.equal(images.cpu(), rows)
    return {"device": str(held.device), "held_mb": round(held.numel() / 2**20, 2),
            "batch": list(images.shape), "steps_per_epoch": len(trainer.train_batches)}


class SyncSites(Counter):
    """A ``warnings.showwarning`` that counts CUDA's sync-debug warnings by where they were
    raised (the innermost Python frames). Only the per-call warning counts: setting the mode
    also warns, once per process, that the mode is a prototype ("... does not yet detect all
    synchronizing operations"), which is no sync."""

    def __call__(self, message, *_args, **_kwargs) -> None:
        if SYNC_WARNING in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if Path(f.filename).name != "warnings.py"][-5:][::-1]
            self[" < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:"
                            f"{f.lineno}" for f in frames)] += 1


def check_no_host_sync(trainer: Trainer, steps: int = 6, warmup: int = 2) -> dict[str, Any]:
    """No host sync in ``steps`` training steps (after ``warmup``), batches included."""
    for _ in _steps(trainer, warmup):
        pass
    cuda = trainer.accelerator.device.type == "cuda"
    counter, watching = HostSyncCounter(host_code=HOST_CODE), False
    # CUDA's debug mode warns at each synchronizing call: every one is collected with the
    # innermost Python frames at that moment (an error would stop at the first).
    syncs = SyncSites()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = syncs
        try:
            for i, _ in enumerate(_steps(trainer, steps + 1, warmup)):
                if i == 1:  # after the epoch's index upload (the generator's first batch)
                    if cuda:
                        torch.cuda.set_sync_debug_mode("warn")
                    else:
                        counter.__enter__()
                    watching = True
        finally:
            if watching and cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            elif watching:
                counter.__exit__(None, None, None)
    assert counter.count == 0, dict(counter.calls)
    assert not syncs, f"synchronizing CUDA calls (innermost frames: count): {dict(syncs)}"
    return {"steps": steps, "how": "torch.cuda.set_sync_debug_mode('warn')" if cuda
            else "host-sync counter (TorchFunctionMode)"}


def check_no_host_sync_fused(trainer: Trainer) -> dict[str, Any]:
    """:func:`check_no_host_sync` with the one-grid geometry (``augment.fused``)."""
    kept = trainer.augment
    cfg = dataclasses.replace(trainer.cfg.augment, fused=True)
    trainer.augment = DeviceAugment(cfg).to(trainer.accelerator.device)
    try:
        return {**check_no_host_sync(trainer), "augment": "fused"}
    finally:
        trainer.augment = kept


def check_compiled_augment_draws(trainer: Trainer, n: int = 512, calls: int = 4
                                  ) -> dict[str, Any]:
    """The default augmentation compiled as ``train.compile`` compiles it (mode
    reduce-overhead: CUDA graphs replay Kornia's random draws; on CPU, where training leaves
    it eager, through dynamo and AOT autograd) still draws anew in every step: in each of
    ``calls`` calls on ``n`` copies of one asymmetric slice, the share left untouched is
    ``(1 - hflip_p)(1 - vflip_p)(1 - rotation_p)(1 - elastic_p)`` within 4.5 standard
    errors, and no two calls agree."""
    device, cfg = trainer.accelerator.device, trainer.cfg.augment
    augment = DeviceAugment(cfg).to(device).train()
    if device.type == "cuda":
        model = torch.nn.Identity()
        assert compile_for_training(model, augment, device, "reduce-overhead")
    else:
        augment.compile(backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g).expand(n, 3, 64, 64).contiguous().to(device)
    y = (x[:, :1] > 0.5).float()
    expected = ((1 - cfg.hflip_p) * (1 - cfg.vflip_p) * (1 - cfg.rotation_p)
                * (1 - cfg.elastic_p))
    bound = 4.5 * (expected * (1 - expected) / n) ** 0.5
    outputs, untouched = [], []
    for _ in range(calls):
        torch.compiler.cudagraph_mark_step_begin()
        out = augment(x, y)[0].clone()  # graph outputs are overwritten by the next replay
        outputs.append(out)
        untouched.append(float(((out - x).abs().amax((1, 2, 3)) < 1e-4).float().mean()))
    assert all(abs(u - expected) <= bound for u in untouched), (untouched, expected, bound)
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(outputs)), "repeated draws"
    return {"untouched_share": untouched, "expected": expected, "bound": bound,
            "compiled": "reduce-overhead" if device.type == "cuda" else "aot_eager"}


CHECKS = {"bf16_autocast": check_bf16_autocast, "channels_last": check_channels_last,
          "kornia_on_device": check_kornia_on_device, "device_batches": check_device_batches,
          "no_host_sync": check_no_host_sync, "no_host_sync_fused": check_no_host_sync_fused,
          "compiled_augment_draws": check_compiled_augment_draws}


def run_checks(device: str, work: Path) -> dict[str, Any]:
    """Every check, in turn, on one tiny trainer (Accelerate allows one mixed-precision
    setting per process; on CPU it is bf16 here, so the autocast check has something to see,
    at 32² since bf16 convolutions are slow on a CPU: 22 s for the checks against 35 s at 64²).

    Returns:
        ``{name: {"ok", "seconds", "evidence" | "error"}}``.
    """
    overrides = ({"train.mixed_precision": "bf16", "data.image_size": 32} if device == "cpu"
                 else {})
    trainer = tiny_trainer(work / "run", device, **overrides)
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "evidence": check(trainer)}
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"check {name}: {'ok' if results[name]['ok'] else 'FAILED'} "
              f"({results[name]['seconds']} s)", flush=True)
    return results


def run_train(config: str | None, epochs: int, patients: int, work: Path,
              overrides: dict[str, Any]) -> dict[str, Any]:
    """Train ``config`` on a synthetic set for ``epochs`` epochs: images/s per epoch and peak
    memory (the GPU's allocator peak on CUDA; the process's peak RSS on CPU)."""
    cfg = load_config(config, {"train.epochs": epochs, "data.synthetic_patients": patients,
                               "train.output_dir": str(work / "run"), "train.export": False,
                               "train.num_overlays": 0, "data.data_dir": None, **overrides})
    cuda = torch.cuda.is_available() and not cfg.train.cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_training(cfg)
    seconds = time.perf_counter() - t0
    ips = [r["train_images_per_second"] for r in result.history]
    out = {"config": config, "epochs": epochs, "synthetic_patients": patients,
           "train_images_per_second": ips,
           "train_images_per_second_after_first": (sum(ips[1:]) / len(ips[1:]) if ips[1:]
                                                   else ips[0]),
           "epoch_seconds": [r["epoch_seconds"] for r in result.history],
           "val_dice_patient_mean": [r["val_dice_patient_mean"] for r in result.history],
           "wall_seconds": seconds, "device": "cuda" if cuda else "cpu"}
    if cuda:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("checks", help="run every check on a tiny trainer")
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    c.add_argument("--work", type=Path, required=True, help="scratch directory")
    c.add_argument("--json", type=Path, required=True)
    t = sub.add_parser("train", help="train a config on synthetic data; images/s, memory")
    t.add_argument("--config")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--synthetic-patients", type=int, default=60)
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--json", type=Path, required=True)
    s = sub.add_parser("summary", help="fold the results in --out into gpu_check.json")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=Path, help="'name exit_status seconds' lines")
    args = p.parse_args(argv)
    if args.command == "checks":
        results = run_checks(args.device, args.work)
        atomic_write_json(args.json, results)
        return 0 if all(r["ok"] for r in results.values()) else 1
    if args.command == "train":
        import yaml

        overrides = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.set)}
        atomic_write_json(args.json, run_train(args.config, args.epochs,
                                               args.synthetic_patients, args.work, overrides))
        return 0
    summary = summarize(args.out, args.steps)
    atomic_write_json(args.out / "gpu_check.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
