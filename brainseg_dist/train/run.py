"""Entry points of training: a run (:func:`run_training`), and the validation of saved weights
in 1..N processes (:func:`validate_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from brainseg_dist import checkpoint, rundir
from brainseg_dist.config import Config
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write_text, dumps_strict
from brainseg_dist.train.trainer import Trainer, TrainResult


def validate_checkpoint(cfg: Config, path: str | Path) -> dict[str, float]:
    """Validate saved weights on the run's validation patients, in 1..N processes.

    Writes ``validation.json`` to the run directory (main process) and returns the metrics;
    used to check that every process count reports the same numbers.
    """
    state = checkpoint.load(path).state  # before any data is loaded
    trainer = Trainer(cfg, resume=True)
    try:
        trainer.eval_model().load_state_dict(state["model"])
    except RuntimeError as exc:
        raise BrainsegError(f"{path}: weights do not fit the configured model "
                            f"({str(exc).splitlines()[0]})") from None
    metrics = trainer.validate()
    metrics["processes"] = trainer.accelerator.num_processes
    if trainer.is_main:
        atomic_write_text(trainer.out / rundir.VALIDATION, dumps_strict(metrics, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return metrics


def run_training(cfg: Config, resume: bool = False, split: dict | None = None) -> TrainResult:
    """Train a U-Net as configured and write the run directory.

    Args:
        cfg: the resolved config (``train.output_dir`` is the run directory).
        resume: continue from ``last.pt`` with model, optimizer, scaler, epoch and RNG state.
        split: patients for train/val/test (e.g. one cross-validation fold); default: the
            saved ``split.json`` on resume, else a new split from ``cfg.data``.

    Returns:
        Best epoch and score, and the per-epoch history.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; ``last.pt`` holds the previous epoch.
        DatasetError, ConfigError, BrainsegError: bad inputs, named in the message.
    """
    return Trainer(cfg, resume, split).fit()
