"""Loss and segmentation metrics shared by training and evaluation.

Empty-mask conventions (also in the README):

* Dice of a slice or patient where both ground truth and prediction are empty is 1.0
  (a correct "no tumour"); where exactly one is empty it is 0.0.
* The global Dice pools intersections and sums over all slices before dividing.
* HD95 is only defined where both masks are non-empty; elsewhere it is NaN and left out of
  means (the number of slices it was computed on is reported with it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SOFT_DICE_SMOOTH = 1.0


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, bce_weight: float = 1.0,
                  dice_weight: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """BCE-with-logits plus soft Dice, computed per sample.

    Per-sample (not per-batch) terms make the loss of a slice independent of which batch or
    process it lands in, so 1- and N-process validation losses agree.

    Args:
        logits: ``N×1×H×W`` raw outputs (computed in float32 here even under AMP).
        targets: ``N×1×H×W`` 0/1.
        bce_weight: weight of the BCE term.
        dice_weight: weight of the ``1 - soft Dice`` term.
        reduction: ``"mean"`` or ``"none"`` (returns ``N`` losses).
    """
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(1, 2, 3))
    probs = torch.sigmoid(logits)
    inter = (probs * targets).sum(dim=(1, 2, 3))
    denom = probs.sum(dim=(1, 2, 3)) + targets.sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + SOFT_DICE_SMOOTH) / (denom + SOFT_DICE_SMOOTH)
    loss = bce_weight * bce + dice_weight * (1 - soft_dice)
    return loss.mean() if reduction == "mean" else loss


def overlap_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-slice ``[intersection, predicted pixels, target pixels]`` as ``N×3`` int64."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    return torch.stack([(pred & target).sum(1), pred.sum(1), target.sum(1)], dim=1).long()


def dice_from_counts(inter, pred_sum, target_sum) -> np.ndarray:
    """Dice = 2|A∩B| / (|A|+|B|), with 1.0 where both are empty (arrays or scalars)."""
    inter = np.asarray(inter, dtype=np.float64)
    denom = np.asarray(pred_sum, dtype=np.float64) + np.asarray(target_sum, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.where(denom > 0, denom, 1), 1.0)


def patient_dice(counts: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """3D Dice per patient from per-slice overlap counts, summed over each patient's slices.

    Args:
        counts: ``N×3`` (intersection, predicted, target) per slice.
        patients: ``N`` patient ids.

    Returns:
        ``{patient: dice}``.
    """
    sums: dict[str, np.ndarray] = {}
    for c, p in zip(counts, patients, strict=True):
        sums[p] = sums.get(p, 0) + np.asarray(c, dtype=np.int64)
    return {p: float(dice_from_counts(*s)) for p, s in sums.items()}


def summarize_dice(counts: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """Global Dice, per-patient 3D Dice (mean/median/std) and Dice on tumour slices."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    per_patient = np.array(list(patient_dice(counts, patients).values()))
    tumour = counts[:, 2] > 0
    per_slice = dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])
    return {
        "dice": float(dice_from_counts(*counts.sum(0))),
        "dice_patient_mean": float(per_patient.mean()) if len(per_patient) else float("nan"),
        "dice_patient_median": float(np.median(per_patient)) if len(per_patient) else float("nan"),
        "dice_patient_std": float(per_patient.std()) if len(per_patient) else float("nan"),
        "dice_tumour_slices": float(per_slice[tumour].mean()) if tumour.any() else float("nan"),
    }
