#!/usr/bin/env python
"""Pool the reports of ``benchmarks/gpu_cv.py`` over training seeds, and pair the recipes.

The GPU machine keeps no run directory, so ``brainseg compare --pool-seeds`` has nothing to
read afterwards; the reports keep each recipe's per-patient table. This builds the runs that
``brainseg compare`` would load from them, and compares them as ``--pool-seeds`` does
(:func:`brainseg_dist.compare.compare_loaded`): each recipe's per-patient Dice is averaged over
its seeds (one report per seed, all on the same folds), every recipe is paired patient by
patient with the reference recipe, and a recipe's later seeds are paired with its first (the
seed spread).

    python benchmarks/gpu_cv_pool.py results/cv.json results/cv_seed1.json \\
        --reference lgg_unet128 --same group_norm=instance_norm --json pooled.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from brainseg_dist.compare import (  # noqa: E402
    SEED_KEY,
    CvRun,
    compare_loaded,
    variant_summaries,
)
from brainseg_dist.errors import BrainsegError  # noqa: E402
from brainseg_dist.io import atomic_write_json  # noqa: E402

RECIPE_KEY = "gpu_cv.recipe"  # the recipe's name stands for its config in the pooling


class PoolError(ValueError):
    """Reports that cannot be pooled: the message names the file and the problem."""


def load_runs(paths: list[Path], same: dict[str, str] | None = None) -> list[CvRun]:
    """Every finished recipe of every report as a :class:`CvRun` named ``NAME (seed S)``,
    in the reports' order. A report without ``seed`` (written before gpu_cv.py recorded it)
    is seed 0. ``same`` maps a recipe to the one it is pooled as (the same function in another
    form, such as group_norm as instance_norm)."""
    same = same or {}
    runs: list[CvRun] = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
            seed, recipes = int(report.get("seed") or 0), report["recipes"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PoolError(f"{path}: not a gpu_cv.py report ({type(exc).__name__}: {exc})"
                            ) from None
        for name, result in recipes.items():
            if "per_patient" not in result:
                continue  # skipped, or stopped at the deadline
            recipe = same.get(name, name)  # pooled as recipe, named as run
            if any(r.config == {RECIPE_KEY: recipe, SEED_KEY: seed} for r in runs):
                raise PoolError(f"{path}: recipe {recipe!r} at seed {seed} is in an earlier "
                                "report too")
            table = pd.DataFrame(result["per_patient"]).set_index("patient")
            dice = table[[c for c in table.columns if c.startswith("dice_")]]
            folds = [frozenset(ix) for ix in table.groupby("fold").groups.values()]
            runs.append(CvRun(path, {"variants": variant_summaries(dice)}, dice, folds,
                              {RECIPE_KEY: recipe, SEED_KEY: seed}, f"{name} (seed {seed})"))
    for run in runs[1:]:
        if set(run.test_folds) != set(runs[0].test_folds):
            raise PoolError(f"{run.name} tested other patients or folds than {runs[0].name}: "
                            "no pairing")
    return runs


def pool(runs: list[CvRun], reference: str) -> dict[str, Any]:
    """``brainseg compare --pool-seeds`` of ``runs`` with recipe ``reference`` first."""
    names = [r.config[RECIPE_KEY] for r in runs]
    if reference not in names:
        raise PoolError(f"--reference {reference!r}: no finished recipe of that name (have "
                        f"{', '.join(sorted(set(names))) or 'none'})")
    ordered = sorted(runs, key=lambda r: r.config[RECIPE_KEY] != reference)  # stable
    try:
        return compare_loaded(ordered, pool=True)
    except BrainsegError as exc:
        raise PoolError(str(exc)) from None


def _same_pair(text: str) -> tuple[str, str]:
    name, sep, alias = text.partition("=")
    if not (sep and name and alias):
        raise PoolError(f"--same {text!r}: expected NAME=AS, such as group_norm=instance_norm")
    return name, alias


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="gpu_cv.py --json files")
    parser.add_argument("--reference", default="lgg_unet128")
    parser.add_argument("--same", action="append", default=[], metavar="NAME=AS",
                        help="pool recipe NAME as recipe AS: only for the same function "
                             "(group_norm=instance_norm); repeatable")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        same = dict(_same_pair(text) for text in args.same)
        result = pool(load_runs(args.reports, same), args.reference)
    except PoolError as exc:
        print(f"gpu_cv_pool: {exc}", file=sys.stderr)
        return 2
    pairs = {c["run"]: c["paired"].get("post-processed") for c in result["comparisons"]}
    for name, variants in result["runs"].items():
        post = variants["post-processed"]
        line = (f"{name}: post-processed mean {post['dice_patient_mean']:.3f}, "
                f"median {post['dice_patient_median']:.3f}")
        if pairs.get(name):
            pair, (lo, hi) = pairs[name], pairs[name]["ci95"]
            line += (f"; vs {result['reference']} {pair['mean']:+.3f} (CI [{lo:+.3f}, "
                     f"{hi:+.3f}], {pair['better']} better, {pair['worse']} worse)")
        print(line)
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
