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
once every fold has finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainseg_dist.config import Config, replace
from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, atomic_write_json

PLAN_FILE = "cv_plan.json"
SUMMARY_FILE = "cv_summary.json"
FOLD_DONE_FILE = "fold_done.json"
PP_FILE = "postprocessing.json"  # in each fold: chosen on its inner validation patients
ENSEMBLE_PP_FILE = "ensemble_postprocessing.json"  # chosen on all out-of-fold predictions
BOOTSTRAP_SAMPLES = 10_000


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold_{fold}"


def is_cv_dir(path: str | Path) -> bool:
    """True for a directory written by :func:`run_cv`."""
    return (Path(path) / PLAN_FILE).is_file()


def read_plan(out: str | Path) -> dict[str, Any]:
    """The ``cv_plan.json`` of a CV directory.

    Raises:
        BrainsegError: missing or damaged plan.
    """
    path = Path(out) / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
        assert isinstance(plan, dict)
        assert isinstance(plan["splits"], list)
    except FileNotFoundError:
        raise BrainsegError(f"{path}: not found; not a cross-validation directory") from None
    except (ValueError, KeyError, AssertionError):
        raise BrainsegError(f"{path}: damaged cross-validation plan") from None
    return plan


def make_plan(cfg: Config, folds: int, val_fraction: float) -> dict[str, Any]:
    """Decode the dataset once (filling the cache) and deal its patients into folds."""
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
    splits = make_cv_splits(burden, folds, val_fraction, cfg.train.seed)
    return {"folds": folds, "seed": cfg.train.seed, "val_fraction": val_fraction,
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
    return replace(cfg, train={"output_dir": str(fold_dir(out, fold)), "export": False})


def train_folds(cfg: Config, out: Path, plan: dict[str, Any],
                only: int | None = None) -> None:
    """Train every unfinished fold (or only fold ``only``), resuming interrupted ones."""
    from brainseg_dist.train import run_training

    for split in plan["splits"]:
        k = split["fold"]
        if only is not None and k != only:
            continue
        run = fold_dir(out, k)
        if (run / FOLD_DONE_FILE).is_file():
            console.print(f"fold {k + 1}/{plan['folds']}: finished, skipped")
            continue
        resume = (run / "last.pt").is_file()
        console.print(f"fold {k + 1}/{plan['folds']}: {len(split['train'])} train, "
                      f"{len(split['val'])} validation, {len(split['test'])} test patients"
                      + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        result = run_training(fold_config(cfg, out, k), resume=resume, split=split)
        finished = result.epochs_run == cfg.train.epochs or result.stopped_early
        if finished and _is_main_process():
            atomic_write_json(run / FOLD_DONE_FILE, {
                "fold": k, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "best_val_dice_patient_mean": result.best_dice_patient_mean,
                "seconds": time.perf_counter() - t0})


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def bootstrap_ci(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap confidence interval of the mean, resampling patients.

    Args:
        values: one value per patient.
        samples: bootstrap resamples.
        seed: resampling seed (fixed: the interval is reproducible).
        level: coverage.

    Returns:
        ``[low, high]``; NaNs for fewer than two values.
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    alpha = (1 - level) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


@dataclass
class CVResult:
    out: Path
    summary: dict[str, Any]
    per_patient: pd.DataFrame


def run_cv(cfg: Config, out: str | Path, folds: int = 5, val_fraction: float = 0.2,
           only_fold: int | None = None, batch_size: int = 16,
           device: str = "cpu") -> CVResult | None:
    """Cross-validate ``cfg`` over the patients of ``cfg.data.data_dir``.

    Args:
        cfg: the training config (its ``train.output_dir`` is ignored: folds go to ``out``).
        out: the CV directory.
        folds: number of folds K.
        val_fraction: share of each fold's non-test patients used for inner validation.
        only_fold: train this fold only (0-based) and stop; for folds run as separate jobs.
        batch_size: slices per forward pass in evaluation.
        device: where evaluation runs.

    Returns:
        :class:`CVResult` once every fold has finished (None after ``only_fold``, or on
        ranks other than the main process).

    Raises:
        BrainsegError: bad data root, a plan that does not match this call, a damaged fold.
    """
    out = Path(out)
    if only_fold is not None and not 0 <= only_fold < folds:
        raise BrainsegError(f"--fold {only_fold}: expected 0..{folds - 1}")
    plan = make_plan(cfg, folds, val_fraction)
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        saved = read_plan(out)
        training = any(not (fold_dir(out, s["fold"]) / FOLD_DONE_FILE).is_file()
                       and only_fold in (None, s["fold"]) for s in saved["splits"])
        _check_plan(saved, plan, plan_path, training)
        plan = saved
    elif _is_main_process():
        atomic_write_json(plan_path, plan)
    train_folds(cfg, out, plan, only_fold)
    if not _is_main_process():
        return None
    unfinished = [s["fold"] for s in plan["splits"]
                  if not (fold_dir(out, s["fold"]) / FOLD_DONE_FILE).is_file()]
    if unfinished:
        console.print(f"folds {', '.join(str(k) for k in unfinished)} not finished yet; the "
                      "summary is written when every fold is done")
        return None
    from brainseg_dist.cv_eval import evaluate_cv

    summary, table = evaluate_cv(out, plan, batch_size=batch_size, device=device)
    atomic_write(out / "cv_per_patient.csv", lambda p: table.to_csv(p, index=False))
    atomic_write_json(out / SUMMARY_FILE, summary)
    return CVResult(out, summary, table)


def main() -> None:
    """``accelerate launch -m brainseg_dist.cv [options]``: the options of ``brainseg cv``."""
    from brainseg_dist.cli import cv_command

    cv_command(prog_name="python -m brainseg_dist.cv")


if __name__ == "__main__":
    main()


def print_cv_summary(result: CVResult) -> None:
    """A rich table of the CV metrics without and with the chosen post-processing."""
    import math

    from rich.table import Table

    s = result.summary

    def fmt(x: Any) -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
            else f"{x:.3f}"

    t = Table(title=f"{s['folds']}-fold cross-validation: {s['patients']} patients, each "
                    "tested by the fold that never saw it")
    t.add_column("metric")
    names = list(s["variants"])
    for name in names:
        t.add_column(name, justify="right")
    rows = [("patient Dice mean", "dice_patient_mean"), ("patient Dice median",
                                                         "dice_patient_median"),
            ("patient Dice SD", "dice_patient_sd"), ("patient Dice min", "dice_patient_min"),
            ("Dice, tumour slices", "dice_tumour_slices"),
            ("FP rate, empty slices", "fp_rate_empty_slices"),
            ("slice sensitivity", "sensitivity"), ("slice specificity", "specificity"),
            ("HD95 px (mean)", "hd95_mean")]
    t.add_row("95% CI of the mean", *(
        "[{}, {}]".format(*(fmt(v) for v in s["variants"][n]["dice_patient_ci95"]))
        for n in names))
    for label, key in rows:
        t.add_row(label, *(fmt(s["variants"][n][key]) for n in names))
    console.print(t)
    console.print(f"headline ({s['headline']}): per-patient Dice mean "
                  f"{fmt(s['dice_patient_mean'])}, median {fmt(s['dice_patient_median'])}, "
                  f"95% CI [{fmt(s['dice_patient_ci95'][0])}, {fmt(s['dice_patient_ci95'][1])}]"
                  f"; outputs in {result.out}", highlight=False)
