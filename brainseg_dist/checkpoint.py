"""The training checkpoint (``best.pt``, ``last.pt``): one versioned schema, one :func:`save`
and one :func:`load`.

Schema (version 1), a dict of tensors and plain values only:

* ``format`` (``"brainseg-checkpoint"``) and ``version``;
* ``model``: the weights that validation and export use (the EMA when it is on);
* ``config``: the run's :class:`~brainseg_dist.config.Config` as a dict (read back as a
  ``Config``: image size, normalization, threshold and U-Net shape come from it) and
  ``config_hash``;
* ``epoch``, ``metrics`` (that epoch's row) and ``history`` (every row so far);
* what ``--resume`` needs (:data:`RESUME_KEYS`): optimizer, AMP scaler, early-stopping state,
  and the RNG state stored as tensors, plus ``live_model``/``ema_updates`` with an EMA.

Every file is opened with ``torch.load(weights_only=True)``, so a foreign checkpoint cannot
run code. Files written before the schema had a version (the same keys, plus copies of
``image_size``, ``normalization``, ``threshold`` and ``model_args``) read as version 0.
"""

from __future__ import annotations

import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg_dist.config import Config, from_dict
from brainseg_dist.errors import BrainsegError, ConfigError
from brainseg_dist.io import atomic_torch_save

FORMAT = "brainseg-checkpoint"
VERSION = 1
RESUME_KEYS = ("model", "optimizer", "scaler", "epoch", "best", "best_epoch", "stale_epochs",
               "rng", "config_hash", "history")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its file, its raw dict and its typed config."""

    path: Path
    state: dict[str, Any]
    config: Config

    @property
    def epoch(self) -> int | None:
        return self.state.get("epoch")

    @property
    def config_hash(self) -> str:
        return str(self.state.get("config_hash", ""))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def normalization(self) -> str:
        return self.config.train.normalization

    @property
    def threshold(self) -> float:
        return self.config.train.threshold

    @property
    def model_args(self) -> dict[str, int | str]:
        m = self.config.model
        return {"base_width": m.base_width, "depth": m.depth, "norm": m.norm}


def save(path: str | Path, *, model: dict[str, torch.Tensor], config: Config, epoch: int,
         metrics: dict[str, Any], history: list[dict[str, Any]],
         training: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a killed process leaves the old file intact).

    Args:
        path: ``best.pt`` or ``last.pt`` of the run directory.
        model: the state dict of the weights validation and export use.
        config: the run's config.
        epoch: the epoch just finished (0-based).
        metrics: its metrics row.
        history: every metrics row so far (``metrics.jsonl`` is rebuilt from it).
        training: what ``--resume`` restores besides the weights (optimizer, scaler, best,
            best_epoch, stale_epochs, rng, and live_model/ema_updates with an EMA).
    """
    state = {"format": FORMAT, "version": VERSION, "model": model, "config": config.to_dict(),
             "config_hash": config.hash(), "epoch": epoch, "metrics": metrics,
             "history": list(history), **training}
    return atomic_torch_save(path, state)


def load(path: str | Path, require: tuple[str, ...] = ("model",)) -> Checkpoint:
    """Read a checkpoint safely and check its schema.

    Args:
        path: the file.
        require: keys it must hold (:data:`RESUME_KEYS` to continue training from it).

    Raises:
        BrainsegError: missing, empty, truncated, foreign or unsafe file, a newer schema
            version, missing keys or an invalid config; one line that names the file.
    """
    path = Path(path)
    state = load_state(path)
    fmt, version = state.get("format"), state.get("version", 0)
    if fmt is None and not {"model", "config"} <= set(state):
        version = None  # neither this schema nor its unversioned predecessor
    if (fmt not in (None, FORMAT) or version is None or not isinstance(version, int)
            or isinstance(version, bool)):
        found = ", ".join(sorted(map(str, state))[:6]) or "nothing"
        raise BrainsegError(f"{path}: not a brainseg checkpoint (holds {found})")
    if version > VERSION:
        raise BrainsegError(f"{path}: checkpoint format version {version} is newer than this "
                            f"brainseg reads ({VERSION}); update brainseg-dist")
    missing = [k for k in ("config", *require) if k not in state]
    if missing:
        what = "cannot resume from this checkpoint" if "rng" in require else \
            "not a brainseg checkpoint"
        raise BrainsegError(f"{path}: {what} (missing {', '.join(missing)}; written by "
                            "another version?)")
    try:
        config = from_dict(state["config"], source=f"{path} (config)")
    except ConfigError as exc:
        raise BrainsegError(f"{path}: not a brainseg checkpoint (bad config: {exc})") from None
    return Checkpoint(path, state, config)


def load_state(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear error line per failure.

    ``weights_only=True`` refuses any pickled object other than tensors and plain values, so
    opening a foreign checkpoint cannot run code.

    Raises:
        BrainsegError: missing, empty, truncated or foreign file, or one that holds unsafe
            objects; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise BrainsegError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise BrainsegError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise BrainsegError(f"{path}: empty checkpoint file (0 bytes); it was never written "
                            "completely")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle at all, or a damaged one
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
            raise BrainsegError(f"{path}: unreadable checkpoint (damaged or truncated: "
                                f"{detail[1] if detail else _first_line(exc)})") from None
        raise BrainsegError(
            f"{path}: refused to open: the checkpoint holds Python objects ({found[1]}) other "
            "than tensors and plain values, which could run code when loaded; only "
            "checkpoints written by brainseg training are accepted") from None
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise BrainsegError(f"{path}: unreadable checkpoint (damaged or truncated: "
                            f"{_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise BrainsegError(f"{path}: not a brainseg checkpoint (holds a "
                            f"{type(state).__name__}, expected a dict)")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (numpy arrays would need an unsafe unpickler)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` stored."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
