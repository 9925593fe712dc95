"""``brainseg score PRED TRUTH``: masks from any tool against ground truth, case by case.

The counterpart of nnU-Net's ``evaluate_folder`` for this project's two layouts:

* **NIfTI:** every ``CASE.nii.gz`` (or ``CASE_seg.nii.gz``) in TRUTH is paired with
  ``CASE_seg.nii.gz`` (or ``CASE.nii.gz``) in PRED, which is what ``brainseg predict`` writes.
  Both must share the voxel grid (shape and affine). Distances and volumes are in mm.
* **kaggle_3m slices:** every ``<folder>/<name>_mask.tif`` under TRUTH is paired with the
  file of the same relative path under PRED (``brainseg predict``'s output for a kaggle_3m
  root); a folder is one case. HD95 is per slice in pixels, as ``brainseg evaluate`` has it.

Any non-zero voxel is tumour (multi-label masks, e.g. BraTS's, are scored as whole tumour).
A truth case without a prediction is an error, never dropped, since dropping the hard cases
would raise the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch

from brainseg_dist.console import progress
from brainseg_dist.errors import BrainsegError
from brainseg_dist.metrics import (
    bootstrap_ci,
    dice_from_counts,
    hd95_3d,
    hd95_per_slice,
    patient_dice_summary,
)
from brainseg_dist.nifti import is_nifti, load_volume, stem, volume_data

MASK_SUFFIX = "_mask.tif"
SEG_SUFFIX = "_seg"


@dataclass
class CasePair:
    """One case: its prediction and truth files (one each for NIfTI, one per slice for tif)."""

    name: str
    pred: list[Path]
    truth: list[Path]


def _nifti_cases(pred: Path, truth: Path) -> list[CasePair]:
    files = [truth] if truth.is_file() else sorted(p for p in truth.iterdir() if is_nifti(p))
    cases = []
    for t in files:
        case = stem(t).removesuffix(SEG_SUFFIX)
        if pred.is_file():
            match = pred
        else:
            match = next((pred / f"{case}{s}{ext}" for s in (SEG_SUFFIX, "")
                          for ext in (".nii.gz", ".nii") if (pred / f"{case}{s}{ext}").is_file()),
                         pred / f"{case}{SEG_SUFFIX}.nii.gz")
        cases.append(CasePair(case, [match], [t]))
    return cases


def _tif_cases(pred: Path, truth: Path) -> list[CasePair]:
    by_folder: dict[Path, list[Path]] = {}
    for t in sorted(truth.rglob(f"*{MASK_SUFFIX}")):
        by_folder.setdefault(t.parent.relative_to(truth), []).append(t)
    # A single patient folder as TRUTH is one case named after it.
    return [CasePair(truth.name if folder == Path() else str(folder),
                     [pred / t.relative_to(truth) for t in files], files)
            for folder, files in by_folder.items()]


def pair_cases(pred: str | Path, truth: str | Path) -> tuple[list[CasePair], str]:
    """Pair every truth case with its prediction.

    Returns:
        The cases and the layout, ``"nifti"`` or ``"tif"``.

    Raises:
        BrainsegError: a path is missing, TRUTH holds no masks, or a truth case has no
            prediction (the first missing files are named).
    """
    pred, truth = Path(pred), Path(truth)
    for path, what in ((pred, "PRED"), (truth, "TRUTH")):
        if not path.exists():
            raise BrainsegError(f"{path}: {what} not found")
    nifti = is_nifti(truth) or (truth.is_dir() and any(is_nifti(p) for p in truth.iterdir()))
    cases = _nifti_cases(pred, truth) if nifti else (
        _tif_cases(pred, truth) if truth.is_dir() else [])
    if not cases:
        raise BrainsegError(f"{truth}: no ground truth found (expected NIfTI masks, or "
                            f"<folder>/<name>{MASK_SUFFIX} slices)")
    missing = [p for c in cases for p in c.pred if not p.is_file()]
    if missing:
        raise BrainsegError(f"{missing[0]}: missing prediction for a truth mask "
                            f"({len(missing)} missing in {pred}); every truth case needs one")
    return cases, "nifti" if nifti else "tif"


def _read_nifti_pair(case: CasePair) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    (p_path,), (t_path,) = case.pred, case.truth
    p_img, t_img = load_volume(p_path), load_volume(t_path)
    if p_img.shape != t_img.shape or not np.allclose(p_img.affine, t_img.affine, atol=1e-3):
        raise BrainsegError(f"{p_path}: voxel grid differs from {t_path} (shape "
                            f"{tuple(p_img.shape)} vs {tuple(t_img.shape)}, or the affine); "
                            "resample the prediction onto the truth's grid")
    spacing = tuple(float(z) for z in t_img.header.get_zooms()[:3])
    return volume_data(p_img, p_path) > 0, volume_data(t_img, t_path) > 0, spacing


def _read_mask(path: Path) -> np.ndarray:
    try:
        mask = tifffile.imread(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, OSError, ...
        raise BrainsegError(f"{path}: not a readable tif ({str(exc)[:200]})") from None
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):  # a mask saved as RGB(A)
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise BrainsegError(f"{path}: mask of shape {mask.shape}; expected one 2D slice")
    return mask > 0


def _read_tif_pair(case: CasePair) -> tuple[np.ndarray, np.ndarray]:
    preds, truths = [], []
    for p_path, t_path in zip(case.pred, case.truth, strict=True):
        p, t = _read_mask(p_path), _read_mask(t_path)
        if p.shape != t.shape:
            raise BrainsegError(f"{p_path}: {p.shape[1]}×{p.shape[0]} pixels, but its truth "
                                f"{t_path} is {t.shape[1]}×{t.shape[0]}")
        preds.append(p)
        truths.append(t)
    return np.stack(preds), np.stack(truths)


def case_metrics(pred: np.ndarray, truth: np.ndarray, voxel_volume: float, hd95: float
                 ) -> dict[str, float]:
    """Dice (1.0 when both are empty), precision, recall, volumes and their difference."""
    inter, p, t = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
    nan = float("nan")
    return {
        "dice": float(dice_from_counts(inter, p, t)),
        "precision": inter / p if p else nan,
        "recall": inter / t if t else nan,
        "truth_volume": t * voxel_volume,
        "pred_volume": p * voxel_volume,
        "volume_difference": (p - t) / t if t else nan,
        "hd95": hd95,
    }


def score_case(case: CasePair, layout: str) -> dict[str, Any]:
    """One case's :func:`case_metrics`: mm and mm³ for NIfTI, pixels for tif slices."""
    if layout == "nifti":
        pred, truth, spacing = _read_nifti_pair(case)
        return {"case": case.name, **case_metrics(pred, truth, float(np.prod(spacing)),
                                                  hd95_3d(pred, truth, spacing))}
    pred, truth = _read_tif_pair(case)
    per_slice = hd95_per_slice(torch.from_numpy(pred), torch.from_numpy(truth))
    hd95 = float(np.nanmean(per_slice)) if np.isfinite(per_slice).any() else float("nan")
    return {"case": case.name, **case_metrics(pred, truth, 1.0, hd95)}


def summarize_scores(table: pd.DataFrame, layout: str) -> dict[str, Any]:
    """Per-case Dice mean, median, CI and the rest over the cases of ``table``."""
    dice = patient_dice_summary(table["dice"].to_numpy())
    finite = table["hd95"].dropna()
    return {
        "cases": len(table),
        "layout": layout,
        "dice_mean": dice["mean"], "dice_median": dice["median"], "dice_sd": dice["sd"],
        "dice_min": dice["min"], "dice_ci95": bootstrap_ci(table["dice"].to_numpy()),
        "cases_below_0.5": int((table["dice"] < 0.5).sum()),
        "volume_abs_difference_median": float(table["volume_difference"].abs().median()),
        "hd95_mean": float(finite.mean()) if len(finite) else float("nan"),
        "hd95_median": float(finite.median()) if len(finite) else float("nan"),
        "units": {"volume": "mm³", "hd95": "mm (3D)"} if layout == "nifti" else
                 {"volume": "pixels", "hd95": "pixels (2D, mean over slices)"},
    }


def score_folders(pred: str | Path, truth: str | Path, show_progress: bool = True
                  ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every truth case against its prediction.

    Args:
        pred: predicted masks (a folder, or one NIfTI file).
        truth: ground truth in the same layout (a folder, or one NIfTI file).
        show_progress: a progress bar over the cases.

    Returns:
        The per-case table (worst Dice first) and :func:`summarize_scores`.

    Raises:
        BrainsegError: unpaired, unreadable or mismatched files; the file is named.
    """
    cases, layout = pair_cases(pred, truth)
    rows = []
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("scoring", total=len(cases), info="")
        for case in cases:
            rows.append(score_case(case, layout))
            bar.update(task, advance=1, info=case.name)
    table = pd.DataFrame(rows).sort_values("dice", kind="stable").reset_index(drop=True)
    return table, summarize_scores(table, layout)
