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


def make_cv_splits(burden: pd.Series, folds: int = 5, val_fraction: float = 0.2,
                   seed: int = 0) -> list[dict]:
    """Patient-level K-fold cross-validation: every patient is tested exactly once.

    Patients are ranked by tumour burden (ties broken by ``seed``) and dealt out in blocks of
    ``folds``, each block in a random order, so every fold spans the range of burden. Fold
    ``k`` tests its own patients; the other patients are split again into training and an
    inner validation part (``val_fraction`` of them, at least one, burden-stratified) that
    model selection and post-processing choices may use. The test patients are never seen
    by training or by any choice.

    Args:
        burden: tumour pixels per patient (index: patient id).
        folds: number of folds K (2 <= K <= number of patients).
        val_fraction: share of each fold's non-test patients held out for validation.
        seed: makes the assignment reproducible.

    Returns:
        ``K`` split dicts with ``train``, ``val``, ``test`` and ``fold``/``folds``/``seed``.
    """
    patients = list(burden.index)
    n = len(patients)
    if not 2 <= folds <= n:
        raise ValueError(f"{folds} folds need at least {folds} patients, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"bad inner validation fraction {val_fraction}")
    rng = np.random.default_rng(seed)
    jitter = rng.permutation(n)
    order = [patients[i] for i in np.lexsort((jitter, burden.to_numpy()))]
    assignment: dict[str, int] = {}
    for start in range(0, n, folds):
        block = order[start:start + folds]
        for p, f in zip(block, rng.permutation(folds)[: len(block)], strict=False):
            assignment[p] = int(f)
    splits = []
    for fold in range(folds):
        test = [p for p in order if assignment[p] == fold]
        rest = [p for p in order if assignment[p] != fold]
        n_val = min(len(rest) - 1, max(1, round(val_fraction * len(rest))))
        val = _stratified_pick(rest, n_val, rng)
        train = [p for p in rest if p not in set(val)]
        split = {"train": sorted(train), "val": sorted(val), "test": sorted(test),
                 "seed": seed, "folds": folds, "fold": fold, "kind": "cross-validation",
                 "val_fraction": val_fraction, "stratified_by": "tumour_pixels"}
        check_disjoint(split)
        splits.append(split)
    return splits


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
