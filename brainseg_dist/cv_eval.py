"""Evaluation of a finished cross-validation: post-processing chosen on each fold's inner
validation patients, every patient scored once by the fold that never saw it.

Per fold: the fold's ``best.pt`` predicts its inner validation patients (plain and flipped, at
native resolution, through the same end-to-end pipeline that ``model.ts`` holds); the
post-processing setting with the best mean per-patient Dice there is saved as
``fold_<k>/postprocessing.json``; then the fold's test patients are scored without
post-processing (``plain``: threshold 0.5) and with the fold's chosen setting
(``post-processed``). The ensemble's setting (``ensemble_postprocessing.json``) is chosen on
the out-of-fold predictions of all patients, as nnU-Net does for its final model; it is never
used for a reported figure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainseg_dist import postprocess as pp
from brainseg_dist import rundir
from brainseg_dist.console import console, progress
from brainseg_dist.data.scan import list_slices
from brainseg_dist.errors import BrainsegError, DatasetError
from brainseg_dist.io import atomic_write_json, json_safe
from brainseg_dist.metrics import bootstrap_ci, hd95_per_slice, overlap_counts, slice_metrics
from brainseg_dist.pipeline import from_checkpoint, patient_probabilities, read_folder
from brainseg_dist.report import cv_report, strip_data

VARIANTS = ("plain", "post-processed")
PROTOCOL = (
    "Patient-level K-fold cross-validation (folds stratified by tumour burden, seeded). Each "
    "fold trains on its training patients; model selection (train.select) and the "
    "post-processing choice use only its inner validation patients; every patient is tested "
    "once, by the fold that never saw it. Per-patient 3D Dice at native resolution (1.0 when "
    "prediction and truth are both empty). 'plain': threshold 0.5, no TTA, no "
    "post-processing; 'post-processed': the setting each fold chose on its inner validation "
    "patients. CI: percentile bootstrap of the mean over patients (10,000 resamples).")


def _fold_predictions(run: Path, rows_by_patient: dict[str, pd.DataFrame],
                      patients: list[str], batch_size: int, device: str
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{patient: (p_identity, p_flipped, truth)}`` by the fold's ``best.pt``, each ``D×H×W``
    at native resolution (float32, float32, bool)."""
    pipeline, ckpt = from_checkpoint(run / rundir.BEST)
    pipeline = pipeline.to(device)
    out = {}
    for p in patients:
        images, masks, _ = read_folder(rows_by_patient[p])
        p_id, p_flip = patient_probabilities(pipeline, images, ckpt.normalization, batch_size,
                                             device)
        out[p] = (p_id, p_flip, torch.from_numpy(masks).bool())
    return out


def variant_metrics(dice: dict[str, float], counts: np.ndarray, hd95: np.ndarray,
                    seed: int = 0) -> dict[str, Any]:
    """Per-patient Dice summary with a bootstrap CI, and the slice-level metrics."""
    d = np.array(list(dice.values()), dtype=np.float64)
    s = slice_metrics(counts, hd95)
    return {
        "dice_patient_mean": float(d.mean()),
        "dice_patient_median": float(np.median(d)),
        "dice_patient_sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
        "dice_patient_min": float(d.min()),
        "dice_patient_ci95": bootstrap_ci(d, seed=seed),
        "patients_below_0.5": int((d < 0.5).sum()),
        **{k: s[k] for k in ("dice_tumour_slices", "fp_rate_empty_slices", "sensitivity",
                             "specificity", "precision", "recall", "dice", "hd95_mean",
                             "hd95_median", "hd95_slices", "slices", "tumour_slices",
                             "empty_slices")},
    }


def evaluate_cv(out: Path, plan: dict[str, Any], batch_size: int = 16,
                device: str = "cpu") -> tuple[dict[str, Any], pd.DataFrame]:
    """Choose post-processing per fold on validation, score every patient on its test fold.

    Args:
        out: the CV directory.
        plan: its ``cv_plan.json``.
        batch_size: slices per forward pass.
        device: where the models run.

    Returns:
        ``(summary, per-patient table)``; also writes each fold's ``postprocessing.json``,
        ``ensemble_postprocessing.json``, ``dice_per_patient.png`` and ``report.html``.
    """
    t0 = time.perf_counter()
    rows_by_patient = _rows_by_patient(plan)
    settings = pp.candidates()
    scores = _Scores()
    oof_scores, folds_detail = [], []
    with progress() as bar:
        task = bar.add_task("evaluating folds", total=len(plan["splits"]), info="")
        for split in plan["splits"]:
            k, run = split["fold"], rundir.fold_dir(out, split["fold"])
            preds = _fold_predictions(run, rows_by_patient, split["val"] + split["test"],
                                      batch_size, device)
            setting, val_after, val_before = _choose_on_validation(
                run, k, split["val"], [preds[p] for p in split["val"]], settings)
            test = [preds[p] for p in split["test"]]
            oof_scores.append(pp.score_candidates(test, settings))
            for p, pred in zip(split["test"], test, strict=True):
                scores.add(p, k, pred, setting, rows_by_patient[p])
            folds_detail.append({"fold": k, "train": split["train"], "val": split["val"],
                                 "test": split["test"], "postprocessing": setting.describe(),
                                 "val_dice_plain": val_before, "val_dice_chosen": val_after})
            bar.update(task, advance=1, info=f"fold {k}: {setting.describe()}")
    ensemble_setting = _choose_for_ensemble(out, oof_scores, settings)
    variants = {name: variant_metrics(scores.dice[name], np.concatenate(scores.counts[name]),
                                      np.concatenate(scores.hd[name]), plan["seed"])
                for name in VARIANTS}
    headline = variants["post-processed"]
    summary = {
        "protocol": PROTOCOL, "folds": plan["folds"], "patients": len(scores.rows),
        "seed": plan["seed"], "val_fraction": plan["val_fraction"],
        "data_dir": plan["data_dir"], "config_hash": plan["config_hash"],
        "headline": "post-processed",
        "dice_patient_mean": headline["dice_patient_mean"],
        "dice_patient_median": headline["dice_patient_median"],
        "dice_patient_ci95": headline["dice_patient_ci95"],
        "variants": variants, "folds_detail": folds_detail,
        "ensemble_postprocessing": ensemble_setting.describe(),
        "seconds": time.perf_counter() - t0,
    }
    per_patient = pd.DataFrame(scores.rows)
    _figure(out, scores.dice["post-processed"], headline)
    cv_report(out, json_safe(summary), per_patient, scores.strips,
              [rundir.fold_dir(out, s["fold"]) for s in plan["splits"]])
    console.print(f"evaluated {len(scores.rows)} patients in {summary['seconds']:.0f} s")
    return json_safe(summary), per_patient


def _rows_by_patient(plan: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The slice table of the plan's dataset, by patient.

    Raises:
        DatasetError, BrainsegError: bad data, or patients of the plan missing.
    """
    root = Path(plan["data_dir"])
    table, problems = list_slices(root)
    if problems:
        raise DatasetError(problems, root)
    # Not dict(groupby): dict() takes the groupby's `keys` attribute for a mapping's.
    rows_by_patient = {p: rows for p, rows in table.groupby("patient", sort=False)}  # noqa: C416
    wanted = {p for s in plan["splits"] for p in s["test"]}
    missing = sorted(wanted - set(rows_by_patient))
    if missing:
        raise BrainsegError(f"{root}: {len(missing)} patient(s) of the cross-validation plan "
                            f"are missing: {', '.join(missing[:5])}")
    return rows_by_patient


def _choose_on_validation(run: Path, k: int, patients: list[str], preds: list,
                          settings: list[pp.PostProcessing]
                          ) -> tuple[pp.PostProcessing, float, float]:
    """The fold's post-processing, chosen on its inner validation patients and saved."""
    setting, val_after, val_before = pp.choose(pp.score_candidates(preds, settings), settings)
    atomic_write_json(run / rundir.FOLD_POSTPROCESSING, {
        **setting.to_dict(), "description": setting.describe(),
        "chosen_on": f"inner validation patients of fold {k}: {patients}",
        "val_dice_patient_mean": val_after, "val_dice_patient_mean_plain": val_before})
    return setting, val_after, val_before


def _choose_for_ensemble(out: Path, oof_scores: list[np.ndarray],
                         settings: list[pp.PostProcessing]) -> pp.PostProcessing:
    """The fold ensemble's post-processing, chosen on all out-of-fold predictions, saved."""
    setting, oof_after, oof_before = pp.choose(np.concatenate(oof_scores, axis=1), settings)
    atomic_write_json(out / rundir.ENSEMBLE_POSTPROCESSING, {
        **setting.to_dict(), "description": setting.describe(),
        "chosen_on": "out-of-fold predictions of all cross-validation patients (for the "
                     "fold ensemble only; no reported figure uses this choice)",
        "oof_dice_patient_mean": oof_after, "oof_dice_patient_mean_plain": oof_before})
    return setting


class _Scores:
    """Per-patient rows, and per-variant overlap counts, HD95 and Dice of the test patients."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.counts: dict[str, list] = {v: [] for v in VARIANTS}
        self.hd: dict[str, list] = {v: [] for v in VARIANTS}
        self.dice: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        self.strips: dict[str, dict[str, Any]] = {}  # report.html: a few slices per patient

    def add(self, patient: str, fold: int, pred: tuple, setting: pp.PostProcessing,
            rows: pd.DataFrame) -> None:
        p_id, p_flip, truth = pred
        row = {"patient": patient, "fold": fold, "slices": len(truth),
               "gt_voxels": int(truth.sum())}
        for name, s in (("plain", pp.PLAIN), ("post-processed", setting)):
            mask = s.masks(p_id, p_flip)
            self.counts[name].append(overlap_counts(mask, truth).numpy())
            self.hd[name].append(hd95_per_slice(mask, truth))
            self.dice[name][patient] = pp.patient_dice(mask, truth)
            row[f"dice_{name}"] = self.dice[name][patient]
        self.strips[patient] = strip_data(rows, mask, truth)  # the post-processed masks
        self.rows.append(row)


def _figure(out: Path, dice: dict[str, float], metrics: dict[str, Any]) -> Path:
    from brainseg_dist import viz

    lo, hi = metrics["dice_patient_ci95"]
    return viz.dice_per_patient(
        dice, out / "dice_per_patient.png",
        f"CV, post-processed: mean {metrics['dice_patient_mean']:.3f} "
        f"[{lo:.3f}, {hi:.3f}], median {metrics['dice_patient_median']:.3f}")
