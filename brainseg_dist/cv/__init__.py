"""``brainseg cv``: patient-level K-fold cross-validation over a whole dataset root.

Every patient is tested exactly once, by the fold that never saw it. Within each fold the
non-test patients are split again into training and an inner validation part; model selection
and the post-processing choice use only that inner part, so no reported patient influences any
choice. Layout of ``DIR``::

    cv_plan.json            folds, seed, patients of every fold, config hash
    fold_<k>/               an ordinary run directory (config, split.json, best.pt, ...)
    fold_<k>/postprocessing.json   the setting chosen on the fold's inner validation patients
    cv_per_patient.csv      one row per patient: fold, Dice without and with post-processing
    cv_summary.json         per-patient Dice mean, median and 95% bootstrap CI, HD95, ...
    dice_per_patient.png

Folds are resumable: a finished fold is skipped, an interrupted one resumes from ``last.pt``.
``--fold K`` trains one fold only, so folds can run as separate jobs; the summary is written
once every fold has finished. ``--jobs N`` starts those jobs itself, N at a time
(:mod:`brainseg_dist.cv.jobs`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from brainseg_dist import rundir
from brainseg_dist.config import Config, replace
from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, atomic_write_json


def make_plan(cfg: Config, folds: int, val_fraction: float,
              split_seed: int | None = None) -> dict[str, Any]:
    """Decode the dataset once (filling the cache) and deal its patients into folds.

    The folds are dealt with ``split_seed``, or with ``train.seed`` when it is None; a fixed
    ``split_seed`` keeps the folds while ``train.seed`` changes the training (seed noise).
    """
    from brainseg_dist.data import load_dataset
    from brainseg_dist.data.split import make_cv_splits, patient_burden

    if not cfg.data.data_dir:
        raise BrainsegError("brainseg cv: --data-dir is required (a kaggle_3m root)")
    data = load_dataset(cfg.data.data_dir, cfg.data.image_size, cfg.data.cache_dir,
                        cfg.data.skip_invalid)
    burden = patient_burden(data.table)
    if len(burden) < folds:
        raise BrainsegError(f"{cfg.data.data_dir}: {len(burden)} patients cannot fill "
                            f"{folds} folds")
    seed = cfg.train.seed if split_seed is None else split_seed
    splits = make_cv_splits(burden, folds, val_fraction, seed)
    return {"folds": folds, "seed": seed, "val_fraction": val_fraction,
            "data_dir": str(cfg.data.data_dir), "patients": len(burden),
            "config_hash": cfg.hash(), "splits": splits}


def _check_plan(saved: dict[str, Any], new: dict[str, Any], path: Path,
                training: bool) -> None:
    """The call must match the saved plan; the config only where a fold still trains."""
    if Path(saved.get("data_dir", "")).resolve() != Path(new["data_dir"]).resolve():
        raise BrainsegError(f"{path}: existing cross-validation is of {saved.get('data_dir')}, "
                            f"this call of {new['data_dir']}; use another --output-dir")
    for key in ("folds", "seed", "val_fraction") + (("config_hash",) if training else ()):
        if saved.get(key) != new.get(key):
            raise BrainsegError(f"{path}: existing cross-validation has {key}="
                                f"{saved.get(key)!r}, this call {new.get(key)!r}; use another "
                                "--output-dir")


def fold_config(cfg: Config, out: Path, fold: int) -> Config:
    """The config of one fold: its own run directory; no export of single folds."""
    return replace(cfg, train={"output_dir": str(rundir.fold_dir(out, fold)), "export": False})


def train_folds(cfg: Config, out: Path, plan: dict[str, Any],
                only: int | None = None) -> None:
    """Train every unfinished fold (or only fold ``only``), resuming interrupted ones."""
    from brainseg_dist.train import run_training

    for split in plan["splits"]:
        k = split["fold"]
        if only is not None and k != only:
            continue
        run = rundir.fold_dir(out, k)
        if rundir.fold_finished(out, k):
            console.print(f"fold {k + 1}/{plan['folds']}: finished, skipped")
            continue
        resume = (run / rundir.LAST).is_file()
        console.print(f"fold {k + 1}/{plan['folds']}: {len(split['train'])} train, "
                      f"{len(split['val'])} validation, {len(split['test'])} test patients"
                      + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        result = run_training(fold_config(cfg, out, k), resume=resume, split=split)
        finished = result.epochs_run == cfg.train.epochs or result.stopped_early
        if finished and _is_main_process():
            atomic_write_json(run / rundir.FOLD_DONE, {
                "fold": k, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "best_val_dice_patient_mean": result.best_dice_patient_mean,
                "seconds": time.perf_counter() - t0})


def _current_summary(out: Path, plan: dict[str, Any]) -> CVResult | None:
    """The saved result when it was written after every fold finished, else None."""
    summary_path, table_path = out / rundir.CV_SUMMARY, out / rundir.CV_PER_PATIENT
    if not (summary_path.is_file() and table_path.is_file()):
        return None
    done = [rundir.fold_dir(out, s["fold"]) / rundir.FOLD_DONE for s in plan["splits"]]
    if summary_path.stat().st_mtime < max(p.stat().st_mtime for p in done):
        return None
    return CVResult(out, json.loads(summary_path.read_text()), pd.read_csv(table_path))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


@dataclass
class CVResult:
    out: Path
    summary: dict[str, Any]
    per_patient: pd.DataFrame


def _check_call(folds: int, only_fold: int | None, jobs: int) -> None:
    """Refuse a call whose options contradict each other, before anything is decoded."""
    if only_fold is not None and not 0 <= only_fold < folds:
        raise BrainsegError(f"--fold {only_fold}: expected 0..{folds - 1}")
    if jobs > 1 and only_fold is not None:
        raise BrainsegError(f"--jobs {jobs} with --fold {only_fold}: --jobs starts one "
                            "--fold job per fold itself; give one of them")
    if jobs > 1 and _num_processes() > 1:
        raise BrainsegError(f"--jobs {jobs}: the folds would each start under every process "
                            "of this distributed launch; run brainseg cv --jobs without "
                            "accelerate launch, or one fold per launch with --fold")


def _saved_or_new_plan(plan: dict[str, Any], out: Path, only_fold: int | None
                       ) -> dict[str, Any]:
    """The plan saved in ``out`` (which this call must match), else ``plan``, now saved."""
    plan_path = out / rundir.CV_PLAN
    if plan_path.is_file():
        saved = rundir.read_plan(out)
        training = any(not rundir.fold_finished(out, s["fold"])
                       and only_fold in (None, s["fold"]) for s in saved["splits"])
        _check_plan(saved, plan, plan_path, training)
        return saved
    if _is_main_process():
        atomic_write_json(plan_path, plan)
    return plan


def run_cv(cfg: Config, out: str | Path, folds: int = 5, val_fraction: float = 0.2,
           only_fold: int | None = None, batch_size: int = 16,
           device: str = "cpu", split_seed: int | None = None,
           jobs: int = 1, evaluate: bool = True) -> CVResult | None:
    """Cross-validate ``cfg`` over the patients of ``cfg.data.data_dir``.

    Args:
        cfg: the training config (its ``train.output_dir`` is ignored: folds go to ``out``).
        out: the CV directory.
        folds: number of folds K.
        val_fraction: share of each fold's non-test patients used for inner validation.
        only_fold: train this fold only (0-based) and stop; for folds run as separate jobs.
        batch_size: slices per forward pass in evaluation.
        device: where evaluation runs.
        split_seed: seed of the folds (None: ``train.seed``). Two CVs with one split seed and
            different ``train.seed`` test the same patients per fold, so ``brainseg compare``
            pairs them: the seed-to-seed spread of a recipe.
        jobs: folds trained at once, each as its own ``--fold K`` process (1: one after
            another in this process).
        evaluate: False: only train (the jobs of ``jobs``; their caller evaluates).

    Returns:
        :class:`CVResult` once every fold has finished (None after ``only_fold``, or on
        ranks other than the main process).

    Raises:
        BrainsegError: bad data root, a plan that does not match this call, a damaged fold.
    """
    out = Path(out)
    _check_call(folds, only_fold, jobs)
    plan = _saved_or_new_plan(make_plan(cfg, folds, val_fraction, split_seed), out, only_fold)
    if jobs > 1:
        from brainseg_dist.cv.jobs import train_folds_as_jobs

        train_folds_as_jobs(cfg, out, plan, jobs)
    else:
        train_folds(cfg, out, plan, only_fold)
    if not (evaluate and _is_main_process()):
        return None
    unfinished = [s["fold"] for s in plan["splits"]
                  if not rundir.fold_finished(out, s["fold"])]
    if unfinished:
        console.print(f"folds {', '.join(str(k) for k in unfinished)} not finished yet; the "
                      "summary is written when every fold is done")
        return None
    saved = _current_summary(out, plan)
    if saved is not None:  # a rerun of a finished CV costs nothing
        console.print(f"already evaluated: {out / rundir.CV_SUMMARY} is newer than every fold "
                      "(delete it to evaluate again)")
        return saved
    from brainseg_dist.cv_eval import evaluate_cv

    summary, table = evaluate_cv(out, plan, batch_size=batch_size, device=device)
    atomic_write(out / rundir.CV_PER_PATIENT, lambda p: table.to_csv(p, index=False))
    atomic_write_json(out / rundir.CV_SUMMARY, summary)
    return CVResult(out, summary, table)
