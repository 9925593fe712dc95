"""Paired comparison of cross-validation runs on the same patients (``brainseg compare``).

Two recipes cross-validated on the same patients differ by less than either run's own
confidence interval suggests, because most of the spread is between patients, not between
recipes. The paired difference per patient removes that spread: its mean, a bootstrap CI
over patients, and how many patients got better or worse. The config keys that differ
between the runs say what changed.

Choosing a recipe by such a comparison is model selection on the compared patients: the
winner's cross-validated figure is then optimistic, and an unbiased number needs patients
outside them.

One training run per recipe also carries the seed's luck. With ``pool_seeds``, runs whose
recipes differ only in ``train.seed`` are one recipe: each patient's Dice is averaged over its
seeds before the recipes are compared, and the runs of one recipe are compared with each
other, which measures that luck (the seed spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from brainseg_dist import rundir
from brainseg_dist.config import ADDED_KEYS, Config, dump_config
from brainseg_dist.config import SPEED_KEYS as SPEED_KEYS_BY_SECTION
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import read_json
from brainseg_dist.metrics import bootstrap_ci, patient_dice_summary

# Within this much Dice a patient counts as unchanged (the 3rd decimal the tables print).
TIE = 5e-4
# Keys that say where a run lived, not what it did.
LOCATION_KEYS = ("train.output_dir", "data.cache_dir")
SEED_KEY = "train.seed"
# The config's speed and bookkeeping keys as ``section.key``: --pool-seeds pools over them (a
# run saved before optim.implementation existed reads torch, a newer one auto).
SPEED_KEYS = tuple(f"{section}.{key}" for section, keys in SPEED_KEYS_BY_SECTION.items()
                   for key in keys)
SELECTION_NOTE = ("choosing a recipe by this comparison selects on these patients: the "
                  "winner's CV figure is then optimistic; confirm it on patients outside them")


@dataclass
class CvRun:
    """A finished ``brainseg cv`` directory, as far as a comparison needs it."""

    path: Path
    summary: dict[str, Any]
    dice: pd.DataFrame  # one row per patient (index), one ``dice_<variant>`` column per variant
    test_folds: list[frozenset[str]]
    config: dict[str, Any]  # fold 0's config.yaml, flattened to ``section.key``
    label: str = ""  # a pooled recipe's name (its runs joined with " + ")

    @property
    def name(self) -> str:
        return self.label or str(self.path)

    @property
    def variants(self) -> list[str]:
        return [c.removeprefix("dice_") for c in self.dice.columns if c.startswith("dice_")]


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            if isinstance(values, dict) for key, value in values.items()}


def behaviour_of_missing_keys() -> dict[str, dict[str, Any]]:
    """Per section, what a saved ``config.yaml`` that lacks a key behaved as (YAML types):
    the old behaviour for keys added later (the config hash's rule), else the default."""
    values = yaml.safe_load(dump_config(Config()))
    for (section, key), old_behaviour in ADDED_KEYS.items():
        values[section][key] = old_behaviour
    return values


def load_cv_run(path: str | Path) -> CvRun:
    """Read a CV directory's summary, per-patient Dice, folds and recipe.

    Raises:
        BrainsegError: a file is missing or unreadable; the file is named.
    """
    path = Path(path)
    if not path.is_dir():
        raise BrainsegError(f"{path}: not a directory (expected a `brainseg cv` output)")
    summary = read_json(path / rundir.CV_SUMMARY, "summary of a finished `brainseg cv` run")
    plan = read_json(path / rundir.CV_PLAN, "CV plan")
    table_path = path / rundir.CV_PER_PATIENT
    try:
        dice = pd.read_csv(table_path).set_index("patient")
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise BrainsegError(f"{table_path}: unreadable per-patient table ({exc})") from None
    if dice.index.has_duplicates or not any(c.startswith("dice_") for c in dice.columns):
        raise BrainsegError(f"{table_path}: expected one row per patient and dice_* columns")
    config_path = rundir.fold_dir(path, 0) / rundir.CONFIG
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BrainsegError(f"{config_path}: unreadable ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(summary, dict) or not isinstance(plan, dict):
        raise BrainsegError(f"{path}: not a `brainseg cv` output (its files hold other data)")
    splits = [s for s in plan.get("splits", []) if isinstance(s, dict)]
    # A key the run's config lacks was added later: it ran as that key's old behaviour.
    config = {**_flatten(behaviour_of_missing_keys()), **_flatten(raw)}
    return CvRun(path, summary, dice[[c for c in dice.columns if c.startswith("dice_")]],
                 [frozenset(s.get("test", [])) for s in splits], config)


def config_changes(reference: CvRun, other: CvRun) -> dict[str, list[Any]]:
    """``{key: [reference value, other value]}`` for every recipe key that differs (a key
    that neither the run nor the package knows shows as ``None``)."""
    keys = sorted((set(reference.config) | set(other.config)) - set(LOCATION_KEYS))
    return {k: [reference.config.get(k), other.config.get(k)] for k in keys
            if reference.config.get(k) != other.config.get(k)}


def paired_difference(reference: pd.Series, other: pd.Series, seed: int = 0
                      ) -> dict[str, Any]:
    """Per-patient ``other - reference``: mean, median, bootstrap CI of the mean, and the
    patients that changed most.

    Args:
        reference: per-patient Dice of the reference run.
        other: per-patient Dice of the compared run, same patients.
        seed: bootstrap seed.

    Returns:
        ``mean``, ``median``, ``ci95``, ``better``, ``worse``, ``unchanged`` (within
        :data:`TIE`), ``largest_gain`` and ``largest_loss`` (``[patient, difference]``).
    """
    d = (other - reference.loc[other.index]).astype(np.float64)
    order = d.sort_values()
    return {
        "mean": float(d.mean()), "median": float(d.median()),
        "ci95": bootstrap_ci(d.to_numpy(), seed=seed),
        "better": int((d > TIE).sum()), "worse": int((d < -TIE).sum()),
        "unchanged": int((d.abs() <= TIE).sum()),
        "largest_gain": [str(order.index[-1]), float(order.iloc[-1])],
        "largest_loss": [str(order.index[0]), float(order.iloc[0])],
    }


def _check_same_patients(reference: CvRun, other: CvRun) -> None:
    ref, oth = set(reference.dice.index), set(other.dice.index)
    if ref != oth:
        only = sorted(ref - oth)[:3] or sorted(oth - ref)[:3]
        where = reference.path if ref - oth else other.path
        raise BrainsegError(
            f"{other.path}: tested other patients than {reference.path} "
            f"({len(ref ^ oth)} differ, e.g. {', '.join(only)} only in {where}); a paired "
            "comparison needs the same patients")


def _paired_runs(reference: CvRun, other: CvRun, seed: int) -> dict[str, Any]:
    """``run``, ``same_folds`` and the :func:`paired_difference` of every variant both have."""
    return {"run": other.name,
            "same_folds": set(reference.test_folds) == set(other.test_folds),
            "paired": {v: paired_difference(reference.dice[f"dice_{v}"],
                                            other.dice[f"dice_{v}"], seed)
                       for v in reference.variants if v in other.variants}}


def _recipe(run: CvRun) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in run.config.items()
                        if k not in (*LOCATION_KEYS, SEED_KEY, *SPEED_KEYS)))


def variant_summaries(dice: pd.DataFrame, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per ``dice_<variant>`` column: the mean and median per-patient Dice and the bootstrap
    CI of the mean, as a ``brainseg cv`` summary gives them."""
    variants = {}
    for c in dice.columns:
        d = dice[c].to_numpy(np.float64)
        s = patient_dice_summary(d)
        variants[c.removeprefix("dice_")] = {
            "dice_patient_mean": s["mean"], "dice_patient_median": s["median"],
            "dice_patient_ci95": bootstrap_ci(d, seed=seed)}
    return variants


def _pooled(runs: list[CvRun], seed: int) -> CvRun:
    """One recipe's runs as one: each patient's Dice averaged over the runs (seeds)."""
    if len(runs) == 1:
        return runs[0]
    dice = sum(r.dice.loc[runs[0].dice.index] for r in runs) / len(runs)
    variants = variant_summaries(
        dice[[c for c in dice.columns if all(c in r.dice.columns for r in runs)]], seed)
    config = {**runs[0].config, SEED_KEY: [r.config.get(SEED_KEY) for r in runs]}
    return CvRun(runs[0].path, {"headline": runs[0].summary.get("headline"), "variants": variants},
                 dice[[f"dice_{v}" for v in variants]], runs[0].test_folds, config,
                 " + ".join(r.name for r in runs))


def pool_seeds(runs: list[CvRun], seed: int = 0) -> tuple[list[CvRun], list[dict[str, Any]]]:
    """Group runs whose recipes differ only in ``train.seed`` and :data:`SPEED_KEYS` (first
    appearance first).

    Returns:
        The pooled runs (see :func:`_pooled`), and the seed spread: for every recipe with
        several runs, the :func:`paired_difference` of each later run against its first.
    """
    groups: dict[tuple, list[CvRun]] = {}
    for run in runs:
        groups.setdefault(_recipe(run), []).append(run)
    spread = [{"reference": group[0].name, **_paired_runs(group[0], other, seed)}
              for group in groups.values() for other in group[1:]]
    return [_pooled(group, seed) for group in groups.values()], spread


def compare_runs(paths: list[str | Path], seed: int = 0,
                 pool: bool = False) -> dict[str, Any]:
    """:func:`compare_loaded` of the ``brainseg cv`` directories ``paths`` (the first is the
    reference).

    Raises:
        BrainsegError: fewer than two directories, or a directory that is not a finished
            ``brainseg cv`` output (see :func:`load_cv_run`).
    """
    if len(paths) < 2:
        raise BrainsegError("compare needs at least two `brainseg cv` directories")
    return compare_loaded([load_cv_run(p) for p in paths], seed, pool)


def compare_loaded(runs: list[CvRun], seed: int = 0, pool: bool = False) -> dict[str, Any]:
    """Compare every CV run in ``runs[1:]`` with ``runs[0]``, patient by patient.

    Args:
        runs: cross-validation runs (:func:`load_cv_run`, or built from other reports); the
            first is the reference.
        seed: bootstrap seed.
        pool: treat runs that differ only in ``train.seed`` as one recipe (:func:`pool_seeds`)
            and compare the recipes.

    Returns:
        ``reference``, ``runs`` (each run's own headline mean, median and CI per variant),
        ``comparisons`` (per compared run: ``same_folds``, ``config_changes`` and the
        :func:`paired_difference` of each variant both runs have), ``per_patient``
        (``{run: {variant: {patient: Dice}}}``), ``seed_spread`` (with ``pool``) and
        ``note``. A pooled recipe is named by its runs joined with `` + ``.

    Raises:
        BrainsegError: fewer than two runs (recipes, with ``pool``), or runs that tested
            different patients.
    """
    if len(runs) < 2:
        raise BrainsegError("compare needs at least two cross-validation runs")
    for other in runs[1:]:
        _check_same_patients(runs[0], other)
    spread = None
    if pool:
        runs, spread = pool_seeds(runs, seed)
        if len(runs) < 2:
            raise BrainsegError("compare --pool-seeds: every run is one recipe (they differ "
                                "at most in train.seed); nothing to compare it with")
    reference = runs[0]
    comparisons = [{**_paired_runs(reference, other, seed),
                    "config_changes": config_changes(reference, other)} for other in runs[1:]]
    return {
        "reference": reference.name,
        "patients": len(reference.dice),
        "headline": reference.summary.get("headline"),
        "runs": {r.name: {v: {k: r.summary.get("variants", {}).get(v, {}).get(k)
                                   for k in ("dice_patient_mean", "dice_patient_median",
                                             "dice_patient_ci95")}
                               for v in r.variants} for r in runs},
        "comparisons": comparisons,
        "per_patient": {r.name: {v: r.dice[f"dice_{v}"].astype(float).to_dict()
                                      for v in r.variants} for r in runs},
        **({"seed_spread": spread} if pool else {}),
        "note": SELECTION_NOTE,
    }

