"""Patient-level train/val/test splits (never by slice), stratified by tumour burden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainseg_dist.io import atomic_write_json, read_json

PARTS = ("train", "val", "test")


def patient_burden(table: pd.DataFrame) -> pd.Series:
    """Total tumour pixels per patient, in first-seen order."""
    return table.groupby("patient", sort=False)["tumour_pixels"].sum()


def _stratified_pick(order: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """Pick ``n`` patients, one at random from each of ``n`` consecutive burden strata."""
    if n <= 0:
        return []
    strata = np.array_split(np.array(order, dtype=object), n)
    return [str(s[rng.integers(len(s))]) for s in strata if len(s)]


def make_split(
    burden: pd.Series,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    folds: int = 0,
    fold: int = 0,
) -> dict:
    """Split patients into train/val/test, each part spanning the range of tumour burden.

    Patients are ranked by tumour burden (ties broken by ``seed``), cut into as many strata as
    the part needs patients, and one patient is drawn from each stratum. With ``folds > 1`` the
    test part is drawn first and the rest is cut into ``folds`` burden-balanced folds, of which
    ``fold`` is the validation part.

    Args:
        burden: tumour pixels per patient (index: patient id).
        val_fraction: share of patients for validation (ignored with ``folds``).
        test_fraction: share of patients held out for testing.
        seed: makes the split reproducible.
        folds: number of cross-validation folds (0 or 1: a single split).
        fold: which fold is the validation part.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "seed", "folds", "fold", ...}``.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    if folds > 1 and not 0 <= fold < folds:
        raise ValueError(f"fold {fold} out of range for {folds} folds")
    rng = np.random.default_rng(seed)
    patients = list(burden.index)
    n = len(patients)
    jitter = rng.permutation(n)  # random tie-breaking among equal burdens
    order = [patients[i] for i in np.lexsort((jitter, burden.to_numpy()))]

    def count(frac: float) -> int:
        return 0 if frac == 0 else max(1, round(frac * n)) if n >= 3 else 0

    test = _stratified_pick(order, count(test_fraction), rng)
    rest = [p for p in order if p not in set(test)]
    if folds > 1:
        blocks = [rest[i:i + folds] for i in range(0, len(rest), folds)]
        assignment: dict[str, int] = {}
        for block in blocks:
            for p, f in zip(block, rng.permutation(folds)[: len(block)], strict=False):
                assignment[p] = int(f)
        val = [p for p in rest if assignment[p] == fold]
    else:
        val = _stratified_pick(rest, count(val_fraction), rng)
    train = [p for p in rest if p not in set(val)]
    split = {
        "train": sorted(train), "val": sorted(val), "test": sorted(test),
        "seed": seed, "folds": folds, "fold": fold,
        "val_fraction": val_fraction, "test_fraction": test_fraction,
        "stratified_by": "tumour_pixels",
    }
    check_disjoint(split)
    return split


def check_disjoint(split: dict) -> None:
    """Raise if any patient appears in two parts (slice-level leakage inflates Dice)."""
    seen: dict[str, str] = {}
    for part in PARTS:
        for p in split.get(part, []):
            if p in seen:
                raise AssertionError(f"patient {p} is in both {seen[p]} and {part}")
            seen[p] = part


def save_split(split: dict, path: str | Path) -> Path:
    check_disjoint(split)
    return atomic_write_json(path, split)


def load_split(path: str | Path) -> dict:
    """Read ``split.json``.

    Raises:
        BrainsegError: missing, damaged, or parts that are not lists of patient IDs, or a
            patient in two parts (the file is named).
    """
    from brainseg_dist.errors import BrainsegError

    split = read_json(path, "split file")
    if not isinstance(split, dict) or not all(
            isinstance(split.get(part), list) and all(isinstance(p, str) for p in split[part])
            for part in PARTS):
        raise BrainsegError(f"{path}: damaged split file (expected train, val and test lists "
                            "of patient IDs)")
    try:
        check_disjoint(split)
    except AssertionError as exc:
        raise BrainsegError(f"{path}: damaged split file ({exc})") from None
    return split
