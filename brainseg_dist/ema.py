"""An exponential moving average of a model's weights, for validation and export.

Averaging the weights of the last few hundred steps smooths out the step-to-step noise of
Adam and of BatchNorm statistics, so the validation curve, model selection and the exported
model depend less on where exactly an epoch happened to end.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """A shadow copy of a model whose parameters and float buffers follow an EMA.

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates (as in
    TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``), so the average does not
    keep the random initialization in short runs.

    Args:
        model: the (unwrapped) model being trained.
        decay: the final per-step decay, in ``[0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights by one step: a few foreach
        calls, not one per tensor (on a GPU each is a kernel launch the host must make)."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), weight)
        pairs = list(zip(self.model.buffers(), model.buffers(), strict=True))
        stats = [(a, b) for a, b in pairs if a.dtype.is_floating_point]  # running statistics
        counters = [(a, b) for a, b in pairs if not a.dtype.is_floating_point]  # BatchNorm's
        if stats:
            torch._foreach_lerp_([a for a, _ in stats], [b for _, b in stats], weight)
        if counters:
            torch._foreach_copy_([a for a, _ in counters], [b for _, b in counters])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
