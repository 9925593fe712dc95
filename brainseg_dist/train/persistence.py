"""Saving and restoring a training run's state: ``best.pt``/``last.pt`` (weights, optimizer,
scaler, early-stopping state, RNG and metric history) and ``metrics.jsonl``.

:class:`CheckpointState` is a part of :class:`~brainseg_dist.train.trainer.Trainer`, kept in
its own module; it reads the trainer's attributes (``accelerator``, ``model``, ``optimizer``,
``ema``, ``history``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from brainseg_dist import checkpoint, rundir
from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write_text, dumps_strict


class CheckpointState:
    """Checkpoint writing and ``--resume`` of :class:`~brainseg_dist.train.trainer.Trainer`."""

    def _save(self, paths: list[Path], epoch: int, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        training = {
            **({"live_model": acc.unwrap_model(self.model).state_dict(),
                "ema_updates": torch.tensor(self.ema.updates)} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "rng": checkpoint.rng_state(),
        }
        model = self.eval_model().state_dict()
        for path in paths:
            checkpoint.save(path, model=model, config=self.cfg, epoch=epoch, metrics=metrics,
                            history=self.history, training=training)

    def _restore(self) -> None:
        path = self.out / rundir.LAST
        if not path.exists():
            raise BrainsegError(f"{path}: nothing to resume (no last.pt in the run directory)")
        last = checkpoint.load(path, require=checkpoint.RESUME_KEYS)
        state = last.state
        if last.config_hash != self.cfg.hash():
            raise BrainsegError(f"{path}: checkpoint was trained with a different config "
                                f"(hash {last.config_hash} != {self.cfg.hash()})")
        live = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            live.load_state_dict(state["live_model"])
            self.ema.load_state_dict({"model": state["model"], "updates": state["ema_updates"]})
        else:
            live.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.stale_epochs = state["stale_epochs"]
        checkpoint.set_rng_state(state["rng"])
        # last.pt carries the history up to its epoch: metrics.jsonl (written after it, so
        # possibly one epoch behind after a kill, or damaged) is rewritten from it.
        self.history = list(state["history"])
        if self.is_main:
            self._write_history()
            console.print(f"resumed from {path} at epoch {self.start_epoch + 1}")

    def _write_history(self) -> None:
        text = "".join(dumps_strict(r) + "\n" for r in self.history)
        atomic_write_text(self.out / rundir.METRICS, text)
