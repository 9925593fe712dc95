"""The training step never waits on the device: host syncs are counted step by step.

:class:`host_syncs.HostSyncCounter` (benchmarks/) records every call that copies a device
result to the host on a GPU (``item``, ``bool(t)``, ``tolist``, ``.cpu()``, ...) made by the
training code, Kornia or Accelerate. Steps between two reads of the loss must make none; a
read step (every ``train.log_every`` steps, and the last) makes one. The GPU twin of this test
(``tests/test_gpu.py``) runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import REPO
from test_train import tiny_config

from brainseg_dist.train import Trainer
from brainseg_dist.train.step import LossTracker, is_read_step

sys.path.insert(0, str(REPO / "benchmarks"))
from host_syncs import HostSyncCounter
from step_ops import PHASES, count_step

LOG_EVERY = 4
# The epoch's permutation comes from a CPU generator on every device: host work, once an epoch.
HOST_CODE = (("data/loader.py", "__iter__"),)


class StepRecorder:
    """A progress bar that notes the sync count at the end of every step."""

    def __init__(self, counter: HostSyncCounter):
        self.counter, self.marks, self.calls = counter, [0], []

    def update(self, task, advance=1, info=""):
        self.marks.append(self.counter.count)
        self.calls.append(dict(self.counter.calls))
        self.counter.calls.clear()

    def per_step(self) -> list[int]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


@pytest.mark.parametrize(("on_device", "fused"), [("false", False), ("true", False),
                                                  ("true", True)])
def test_host_syncs_only_on_read_steps(synth_root, tmp_path, on_device, fused):
    cfg = tiny_config(synth_root, tmp_path, **{"train.epochs": 1, "train.log_every": LOG_EVERY,
                                               "data.on_device": on_device,
                                               "augment.fused": fused,
                                               "optim.grad_clip": 1.0, "train.ema_decay": 0.9})
    trainer = Trainer(cfg)
    steps = len(trainer.train_batches)
    assert steps > 2 * LOG_EVERY
    counter = HostSyncCounter(host_code=HOST_CODE)
    bar = StepRecorder(counter)
    with counter:
        loss, _ = trainer.train_epoch(0, bar, None)
    assert math.isfinite(loss)
    syncs = bar.per_step()
    assert len(syncs) == steps
    for step, (n, calls) in enumerate(zip(syncs, bar.calls, strict=True)):
        allowed = 1 if is_read_step(step, steps, LOG_EVERY) else 0
        assert n <= allowed, f"step {step + 1}: {n} host syncs (allowed {allowed}): {calls}"
    assert sum(syncs) == sum(is_read_step(s, steps, LOG_EVERY) for s in range(steps))


class TwoRanks:
    """An accelerator stand-in with 2 processes whose other rank reports ``other``."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: torch.Tensor):
        self.other, self.gathers = other, 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        self.gathers += 1
        return torch.cat([t, self.other[None]])


def test_loss_tracker_sums_ranks_and_finds_the_first_bad_step():
    acc = TwoRanks(torch.tensor([10.0, 8.0, 5.0]))  # other rank: loss sum 10 over 8 images,
    tracker = LossTracker(acc)  # its first non-finite loss at step 5
    for step, loss in enumerate([1.0, 2.0, float("nan"), 3.0]):
        tracker.add(torch.tensor(loss), 4, step)
    assert acc.gathers == 0  # adding never talks to the other ranks
    reading = tracker.read()
    assert acc.gathers == 1
    assert reading.first_bad_step == 2  # the earliest over both ranks
    assert reading.images == 24
    assert math.isnan(reading.epoch_loss)

    healthy = LossTracker(TwoRanks(torch.tensor([10.0, 8.0, math.inf])))
    healthy.add(torch.tensor(2.0), 4, 0)
    first = healthy.read()
    assert first.first_bad_step is None
    assert first.epoch_loss == pytest.approx((8 + 10) / 12)
    healthy.add(torch.tensor(5.0), 4, 1)
    second = healthy.read()  # the other rank added nothing since: the window is ours
    assert second.window_loss == pytest.approx(5.0)
    assert second.epoch_loss == pytest.approx((8 + 20 + 10) / 16)


def test_read_steps():
    assert [s for s in range(10) if is_read_step(s, 10, 4)] == [3, 7, 9]
    assert [s for s in range(3) if is_read_step(s, 3, 25)] == [2]


def test_sync_sites_count_cudas_per_call_warning_only():
    """On CUDA the check collects the sync-debug warnings; the notice that setting the mode
    gives once per process (an H200 run counted it as a sync) is not one."""
    import warnings

    import gpu_checks

    sites = gpu_checks.SyncSites()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = sites
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet "
                      "detect all synchronizing operations", stacklevel=1)
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert sum(sites.values()) == 2
    ((where, count),) = sites.items()
    assert count == 2
    assert where.startswith("tests/test_sync_free.py:")


def test_optimizer_and_ema_are_a_few_host_calls_per_step(synth_root, tmp_path):
    """Host work, not just host syncs, sets the speed of a launch-bound GPU step: fused Adam
    is 2 operator calls a step (foreach Adam ~140, a for-loop ~10 per parameter) and the
    weight average 3, whatever the model's size. ``benchmarks/step_ops.py`` counts them."""
    counts = {}
    for fused in (True, False):
        cfg = tiny_config(synth_root, tmp_path / str(fused), **{
            "train.epochs": 1, "optim.implementation": "fused", "train.ema_decay": 0.9,
            "augment.fused": fused, "train.mixed_precision": "bf16"})
        trainer = Trainer(cfg)
        model = trainer.accelerator.unwrap_model(trainer.model)
        autocast_forward = vars(model)["forward"]  # Accelerate's, set on the instance
        counts[fused] = count_step(trainer).counts
        assert vars(model)["forward"] is autocast_forward  # the labels are taken off again
        assert set(counts[fused]) <= set(PHASES), counts[fused]
        assert counts[fused]["optimizer"] <= 2, counts[fused]
        assert counts[fused]["ema"] <= 3, counts[fused]
        for phase in ("augment", "forward", "loss", "tracker", "backward"):
            assert counts[fused][phase] > 0, phase
    # One sampling grid against three warps (rotation, flip, elastic) one after another.
    assert counts[True]["augment"] < counts[False]["augment"] / 2
