"""The run directory: every file a run (or a cross-validation) writes is named here, and the
directory is guarded: never silently replace a finished run, and clear what a killed process
left behind before a new start.

A training run: ``config.yaml``, ``split.json``, ``metrics.jsonl``, ``best.pt``, ``last.pt``,
``validation.json``, ``tensorboard/``, ``model.ts``, ``model.pt2``, ``model.onnx``,
``metadata.json``, ``eval_<split>/`` and,
when trained without ``data.data_dir``, ``synthetic/kaggle_3m`` (with its ``COMPLETE``
marker). A cross-validation directory: ``cv_plan.json``, ``fold_<k>/`` (a training run each,
plus ``postprocessing.json`` and ``fold_done.json``), ``ensemble_postprocessing.json``,
``cv_summary.json``, ``cv_per_patient.csv``, the ensemble's ``model.ts``/``model.pt2``, and
with ``--jobs`` ``jobs/`` (the jobs' config and logs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError, ConfigError
from brainseg_dist.io import check_writable, remove_temporaries

CONFIG = "config.yaml"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
BEST = "best.pt"
LAST = "last.pt"
VALIDATION = "validation.json"
TENSORBOARD = "tensorboard"
TORCHSCRIPT = "model.ts"
PROGRAM = "model.pt2"
ONNX = "model.onnx"
MODEL_CARD = "metadata.json"  # MONAI-bundle style, beside the exports
EVAL_PREFIX = "eval_"  # eval_<split>/ of brainseg evaluate
SYNTHETIC = "synthetic"  # synthetic/kaggle_3m and its synthetic/COMPLETE marker
# A cross-validation directory.
CV_PLAN = "cv_plan.json"
CV_SUMMARY = "cv_summary.json"
CV_PER_PATIENT = "cv_per_patient.csv"
FOLD_DONE = "fold_done.json"
FOLD_POSTPROCESSING = "postprocessing.json"  # in each fold: chosen on its inner validation
ENSEMBLE_POSTPROCESSING = "ensemble_postprocessing.json"  # chosen on all out-of-fold preds
CV_JOBS = "jobs"  # brainseg cv --jobs: config.yaml and fold_<k>.log of the fold jobs

# Files whose presence means the directory holds (part of) a training run.
RUN_FILES = (LAST, BEST, METRICS)
# What --overwrite removes: everything a run writes, so nothing of the old run is left to
# pass for the new one (a model.ts exported from the old best.pt above all). The synthetic
# dataset is kept; it is regenerated when its parameters differ.
STALE_FILES = (LAST, BEST, METRICS, CONFIG, SPLIT, VALIDATION, TORCHSCRIPT, PROGRAM, ONNX,
               MODEL_CARD)
STALE_FOLDERS = (TENSORBOARD,)


def data_root(run_dir: str | Path, data_dir: str | None) -> Path:
    """A run's dataset root: ``data.data_dir``, or the synthetic set generated inside the run
    directory when training was started without one."""
    return Path(data_dir) if data_dir else Path(run_dir) / SYNTHETIC / "kaggle_3m"


def eval_dir(run_dir: str | Path, split: str) -> Path:
    """Where ``brainseg evaluate`` writes by default."""
    return Path(run_dir) / f"{EVAL_PREFIX}{split}"


def fold_dir(out: Path, fold: int) -> Path:
    """Fold ``fold``'s run directory in a cross-validation directory."""
    return Path(out) / f"fold_{fold}"


def fold_finished(out: Path, fold: int) -> bool:
    """Whether fold ``fold`` of a cross-validation directory has trained to its end."""
    return (fold_dir(out, fold) / FOLD_DONE).is_file()


def is_cv_dir(path: str | Path) -> bool:
    """True for a directory written by ``brainseg cv``."""
    return (Path(path) / CV_PLAN).is_file()


def read_plan(out: str | Path) -> dict[str, Any]:
    """The ``cv_plan.json`` of a CV directory.

    Raises:
        BrainsegError: missing or damaged plan.
    """
    path = Path(out) / CV_PLAN
    try:
        plan = json.loads(path.read_text())
        assert isinstance(plan, dict)
        assert isinstance(plan["splits"], list)
    except FileNotFoundError:
        raise BrainsegError(f"{path}: not found; not a cross-validation directory") from None
    except (ValueError, KeyError, AssertionError):
        raise BrainsegError(f"{path}: damaged cross-validation plan") from None
    return plan


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
        if not (out / LAST).exists():
            raise BrainsegError(f"{out / LAST}: nothing to resume (no last.pt in the run "
                                "directory)")
        from brainseg_dist import checkpoint  # torch: only when resuming

        last = checkpoint.load(out / LAST, require=checkpoint.RESUME_KEYS)
        if config_hash is not None and last.config_hash != config_hash:
            raise BrainsegError(f"{out / LAST}: checkpoint was trained with a different "
                                f"config (hash {last.config_hash} != {config_hash})")
        if (out / SPLIT).exists():
            from brainseg_dist.data.split import load_split

            load_split(out / SPLIT)
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
    paths += sorted(out.glob(f"{EVAL_PREFIX}*"))
    return [p for p in paths if p.exists() or p.is_symlink()]


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
