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
from brainseg_dist.console import console, progress
from brainseg_dist.data.scan import list_slices
from brainseg_dist.errors import BrainsegError, DatasetError
from brainseg_dist.io import atomic_write_json, json_safe
from brainseg_dist.metrics import hd95_per_slice, overlap_counts, slice_metrics
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


def patient_probabilities(pipeline: Any, rows: pd.DataFrame, normalization: str,
                          batch_size: int, device: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A patient folder's native-resolution probabilities, plain and flipped, and its truth.

    Returns:
        ``(p_identity, p_flipped, truth)``, each ``D×H×W`` (float32, float32, bool).
    """
    from brainseg_dist.evaluate import _read_folder
    from brainseg_dist.predict import predict_volume, volume_stats_of

    images, masks, _ = _read_folder(rows, skip_invalid=False)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    stats = volume_stats_of(pipeline, [x], device) if normalization == "volume" else None
    p_id = predict_volume(pipeline, x, batch_size, device, stats=stats)[:, 0]
    p_flip = predict_volume(pipeline, x, batch_size, device, flip=True, stats=stats)[:, 0]
    return p_id, p_flip, torch.from_numpy(masks).bool()


def _fold_predictions(run: Path, rows_by_patient: dict[str, pd.DataFrame],
                      patients: list[str], batch_size: int, device: str
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from brainseg_dist.export import build_pipeline, load_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    pipeline = build_pipeline(ckpt).to(device)
    return {p: patient_probabilities(pipeline, rows_by_patient[p], ckpt.normalization,
                                     batch_size, device) for p in patients}


def variant_metrics(dice: dict[str, float], counts: np.ndarray, hd95: np.ndarray,
                    seed: int = 0) -> dict[str, Any]:
    """Per-patient Dice summary with a bootstrap CI, and the slice-level metrics."""
    from brainseg_dist.cv import bootstrap_ci

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
        ``ensemble_postprocessing.json`` and ``dice_per_patient.png``.
    """
    from brainseg_dist.cv import ENSEMBLE_PP_FILE, PP_FILE, fold_dir

    t0 = time.perf_counter()
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
    settings = pp.candidates()
    chosen: dict[int, pp.PostProcessing] = {}
    rows, counts, hd = [], {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    dice: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    oof_scores = []
    folds_detail = []
    strips: dict[str, dict[str, Any]] = {}  # report.html: a few slices per patient
    with progress() as bar:
        task = bar.add_task("evaluating folds", total=len(plan["splits"]), info="")
        for split in plan["splits"]:
            k, run = split["fold"], fold_dir(out, split["fold"])
            preds = _fold_predictions(run, rows_by_patient, split["val"] + split["test"],
                                      batch_size, device)
            val_scores = pp.score_candidates([preds[p] for p in split["val"]], settings)
            setting, val_after, val_before = pp.choose(val_scores, settings)
            chosen[k] = setting
            atomic_write_json(run / PP_FILE, {
                **setting.to_dict(), "description": setting.describe(),
                "chosen_on": f"inner validation patients of fold {k}: {split['val']}",
                "val_dice_patient_mean": val_after, "val_dice_patient_mean_plain": val_before})
            test = [preds[p] for p in split["test"]]
            oof_scores.append(pp.score_candidates(test, settings))
            for p, (p_id, p_flip, truth) in zip(split["test"], test, strict=True):
                row = {"patient": p, "fold": k, "slices": len(truth),
                       "gt_voxels": int(truth.sum())}
                for name, s in (("plain", pp.PLAIN), ("post-processed", setting)):
                    mask = s.masks(p_id, p_flip)
                    c = overlap_counts(mask, truth).numpy()
                    counts[name].append(c)
                    hd[name].append(hd95_per_slice(mask, truth))
                    dice[name][p] = pp.patient_dice(mask, truth)
                    row[f"dice_{name}"] = dice[name][p]
                strips[p] = strip_data(rows_by_patient[p], mask, truth)  # post-processed
                rows.append(row)
            folds_detail.append({"fold": k, "train": split["train"], "val": split["val"],
                                 "test": split["test"], "postprocessing": setting.describe(),
                                 "val_dice_plain": val_before, "val_dice_chosen": val_after})
            bar.update(task, advance=1, info=f"fold {k}: {setting.describe()}")
    ensemble_setting, oof_after, oof_before = pp.choose(np.concatenate(oof_scores, axis=1),
                                                        settings)
    atomic_write_json(out / ENSEMBLE_PP_FILE, {
        **ensemble_setting.to_dict(), "description": ensemble_setting.describe(),
        "chosen_on": "out-of-fold predictions of all cross-validation patients (for the "
                     "fold ensemble only; no reported figure uses this choice)",
        "oof_dice_patient_mean": oof_after, "oof_dice_patient_mean_plain": oof_before})
    variants = {name: variant_metrics(dice[name], np.concatenate(counts[name]),
                                      np.concatenate(hd[name]), plan["seed"])
                for name in VARIANTS}
    headline = variants["post-processed"]
    summary = {
        "protocol": PROTOCOL,
        "folds": plan["folds"],
        "patients": len(rows),
        "seed": plan["seed"],
        "val_fraction": plan["val_fraction"],
        "data_dir": plan["data_dir"],
        "config_hash": plan["config_hash"],
        "headline": "post-processed",
        "dice_patient_mean": headline["dice_patient_mean"],
        "dice_patient_median": headline["dice_patient_median"],
        "dice_patient_ci95": headline["dice_patient_ci95"],
        "variants": variants,
        "folds_detail": folds_detail,
        "ensemble_postprocessing": ensemble_setting.describe(),
        "seconds": time.perf_counter() - t0,
    }
    per_patient = pd.DataFrame(rows)
    _figure(out, dice["post-processed"], headline)
    cv_report(out, json_safe(summary), per_patient, strips,
              [fold_dir(out, s["fold"]) for s in plan["splits"]])
    console.print(f"evaluated {len(rows)} patients in {summary['seconds']:.0f} s")
    return json_safe(summary), per_patient


def _figure(out: Path, dice: dict[str, float], metrics: dict[str, Any]) -> Path:
    from brainseg_dist import viz

    lo, hi = metrics["dice_patient_ci95"]
    return viz.dice_per_patient(
        dice, out / "dice_per_patient.png",
        f"CV, post-processed: mean {metrics['dice_patient_mean']:.3f} "
        f"[{lo:.3f}, {hi:.3f}], median {metrics['dice_patient_median']:.3f}")
