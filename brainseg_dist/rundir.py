"""Guard a training run directory: never silently replace a finished run, and clear what a
killed process left behind before a new start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError, ConfigError
from brainseg_dist.io import check_writable, load_checkpoint_file, remove_temporaries

# Files whose presence means the directory holds (part of) a training run.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
# What --overwrite removes: everything a run writes, so nothing of the old run is left to
# pass for the new one (a model.ts exported from the old best.pt above all). The synthetic
# dataset is kept; it is regenerated when its parameters differ.
STALE_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "split.json",
               "validation.json", "model.ts", "model.pt2", "model.onnx", "metadata.json")
STALE_FOLDERS = ("tensorboard",)


def is_main_rank() -> bool:
    """Rank 0 of a launched job, or a plain process (before any Accelerator exists)."""
    return os.environ.get("RANK", "0") == "0"


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False,
                    config_hash: str | None = None) -> Path:
    """Check (and on ``--overwrite`` clear) a run directory before any data is loaded.

    Args:
        out: the run directory (``train.output_dir``).
        resume: the run is being continued (``--resume``).
        overwrite: an earlier run there may be replaced (``--overwrite``).
        config_hash: :meth:`~brainseg_dist.config.Config.hash` of the run's config; on
            ``--resume`` it must match ``last.pt``'s.

    Returns:
        The run directory, created and known to be writable.

    Raises:
        ConfigError: ``--resume`` together with ``--overwrite``.
        BrainsegError: the directory holds a run and neither flag was given, or it cannot be
            written.
    """
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in "
                          f"{out} or replace it, not both")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume and not overwrite:
        raise BrainsegError(f"{out}: holds an earlier training run ({', '.join(found)}); "
                            "use --resume to continue it or --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BrainsegError(f"{out}: train.output_dir is a file, not a folder")
    if resume:  # a damaged or foreign last.pt fails now, not after the data is decoded
        if not (out / "last.pt").exists():
            raise BrainsegError(f"{out / 'last.pt'}: nothing to resume (no last.pt in the run "
                                "directory)")
        state = load_resumable(out / "last.pt")
        if config_hash is not None and state["config_hash"] != config_hash:
            raise BrainsegError(f"{out / 'last.pt'}: checkpoint was trained with a different "
                                f"config (hash {state['config_hash']} != {config_hash})")
        if (out / "split.json").exists():
            from brainseg_dist.data.split import load_split

            load_split(out / "split.json")
    if not is_main_rank():
        return out  # rank 0 alone changes the directory
    check_writable(out, "run directory (train.output_dir)")
    for stale in remove_temporaries(out):
        console.print(f"removed {stale} (left by an interrupted process)", highlight=False)
    if overwrite:
        for path in _stale_outputs(out):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if found:
            console.print(f"--overwrite: removed the earlier run in {out}", highlight=False)
    return out


def _stale_outputs(out: Path) -> list[Path]:
    paths = [out / name for name in (*STALE_FILES, *STALE_FOLDERS)]
    paths += sorted(out.glob("eval_*"))
    return [p for p in paths if p.exists() or p.is_symlink()]


RESUME_KEYS = ("model", "optimizer", "scaler", "epoch", "best", "best_epoch", "stale_epochs",
               "rng", "config_hash", "history")


def load_resumable(path: Path) -> dict[str, Any]:
    """``last.pt`` loaded safely, with every key that :meth:`Trainer._restore` needs.

    Raises:
        BrainsegError: unreadable, unsafe or incomplete checkpoint (named).
    """
    state = load_checkpoint_file(path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise BrainsegError(f"{path}: cannot resume from this checkpoint (missing "
                            f"{', '.join(missing)}; written by another version?)")
    return state


def existing_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a folder.

    Raises:
        BrainsegError: it does not exist, or it is a file (each said as such).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise BrainsegError(f"{run_dir}: is a file, not a run directory")
    if not run_dir.is_dir():
        raise BrainsegError(f"{run_dir}: run directory not found")
    return run_dir
