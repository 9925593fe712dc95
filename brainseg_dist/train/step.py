"""The training loss and its finiteness, kept on the device and read every few steps.

A ``loss.item()`` or ``bool(~isfinite(loss))`` per step makes the host wait for the device
at every step, so it can never queue the next one while the GPU works; under DDP the
finiteness check was also an all-reduce per step. :class:`LossTracker` only adds to device
tensors per step and brings them to the host in one transfer (after one gather across
processes) every ``train.log_every`` steps and at the end of the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator


@dataclass
class LossReading:
    """What one read of the tracker saw (the same on every rank)."""

    epoch_loss: float  # mean loss per image since the epoch began (every rank)
    images: float  # images since the epoch began (every rank)
    window_loss: float  # mean loss per image since the previous read
    first_bad_step: int | None  # 0-based step of the first non-finite loss, if any


class LossTracker:
    """Per-step loss sums and a non-finite flag on the device; host reads at chosen steps.

    Args:
        accelerator: gives the device and, with several processes, the gather.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.total = torch.zeros((), device=device)  # Σ loss × images (float32)
        self.count = torch.zeros((), device=device)  # images
        self.first_bad = torch.full((), math.inf, device=device)  # first non-finite step
        self._last = (0.0, 0.0)  # (total, count) at the previous read

    def add(self, loss: torch.Tensor, images: int, step: int) -> None:
        """Add one step's mean loss over ``images`` images; no host sync."""
        loss = loss.detach()
        self.total += loss * images
        self.count += images
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & torch.isinf(self.first_bad),
                                     torch.full_like(self.first_bad, step), self.first_bad)

    def read(self) -> LossReading:
        """Sum over processes and bring the figures to the host: one sync, one collective."""
        local = torch.stack([self.total, self.count, self.first_bad])
        every = self.accelerator.gather(local[None]) if self.accelerator.num_processes > 1 \
            else local[None]
        total, count = every[:, 0].sum(), every[:, 1].sum()
        total_v, count_v, mean_v, first = torch.stack(
            [total, count, total / count, every[:, 2].min()]).tolist()
        window = ((total_v - self._last[0]) / (count_v - self._last[1])
                  if count_v > self._last[1] else math.nan)
        self._last = (total_v, count_v)
        return LossReading(mean_v, count_v, window, None if math.isinf(first) else int(first))


def is_read_step(step: int, steps: int, log_every: int) -> bool:
    """Whether the tracker is read after 0-based ``step`` of an epoch of ``steps`` steps."""
    return (step + 1) % log_every == 0 or step + 1 == steps
