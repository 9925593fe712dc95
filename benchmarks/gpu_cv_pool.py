#!/usr/bin/env python
"""Pool the reports of ``benchmarks/gpu_cv.py`` over training seeds, and pair the recipes.

The GPU machine keeps no run directory, so ``brainseg compare --pool-seeds`` has nothing to
read afterwards; the reports keep each recipe's per-patient table. This does the same from
them: each recipe's per-patient Dice is averaged over its seeds (one report per seed, all on
the same folds), every recipe is paired patient by patient with the reference recipe, and a
recipe run at two seeds or more is paired with itself across seeds (the seed spread).

    python benchmarks/gpu_cv_pool.py results/cv.json results/cv_seed1.json \\
        --reference lgg_unet128 --same group_norm=instance_norm --json pooled.json
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from brainseg_dist.compare import paired_difference  # noqa: E402
from brainseg_dist.io import atomic_write_json  # noqa: E402

VARIANTS = ("post-processed", "plain")


class PoolError(ValueError):
    """Reports that cannot be pooled: the message names the file and the problem."""


def load_tables(paths: list[Path], same: dict[str, str] | None = None
                ) -> dict[str, dict[int, pd.DataFrame]]:
    """``{recipe: {seed: per-patient table indexed by patient}}`` of every finished recipe.
    A report without ``seed`` (written before gpu_cv.py recorded it) is seed 0. ``same`` maps
    a recipe to the one it is pooled as (the same function in another form, such as
    group_norm as instance_norm)."""
    same = same or {}
    tables: dict[str, dict[int, pd.DataFrame]] = {}
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
            name = same.get(name, name)
            if seed in tables.get(name, {}):
                raise PoolError(f"{path}: recipe {name!r} at seed {seed} is in an earlier "
                                "report too")
            table = pd.DataFrame(result["per_patient"]).set_index("patient")
            tables.setdefault(name, {})[seed] = table
    return _on_the_same_folds(tables)


def _on_the_same_folds(tables: dict[str, dict[int, pd.DataFrame]]
                       ) -> dict[str, dict[int, pd.DataFrame]]:
    """The tables in the first one's patient order (the bootstrap resamples in that order,
    as ``brainseg compare`` does), after checking that each tested the same patients in the
    same folds."""
    first = None
    for name, seeds in tables.items():
        for seed, table in seeds.items():
            if first is None:
                first = (name, seed, table["fold"])
            elif not table["fold"].sort_index().equals(first[2].sort_index()):
                raise PoolError(f"recipe {name!r} at seed {seed} tested other patients or "
                                f"folds than {first[0]!r} at seed {first[1]}: no pairing")
    order = first[2].index if first is not None else None
    return {name: {seed: t.loc[order] for seed, t in seeds.items()}
            for name, seeds in tables.items()}


def pool(tables: dict[str, dict[int, pd.DataFrame]], reference: str) -> dict[str, Any]:
    """Per recipe, its seeds and the seed-averaged mean and median per-patient Dice; per
    other recipe, the paired difference from ``reference``; per recipe with several seeds,
    each pair of its seeds (later minus earlier)."""
    if reference not in tables:
        raise PoolError(f"--reference {reference!r}: no finished recipe of that name (have "
                        f"{', '.join(sorted(tables)) or 'none'})")
    averaged = {name: {v: pd.concat([t[f"dice_{v}"] for t in seeds.values()], axis=1
                                    ).mean(axis=1) for v in VARIANTS}
                for name, seeds in tables.items()}
    out: dict[str, Any] = {"reference": reference, "recipes": {}}
    for name, seeds in tables.items():
        row: dict[str, Any] = {"seeds": sorted(seeds)}
        for v in VARIANTS:
            row[v] = {"mean": float(averaged[name][v].mean()),
                      "median": float(averaged[name][v].median())}
        if name != reference:
            row["paired_vs_reference"] = {v: paired_difference(averaged[reference][v],
                                                               averaged[name][v])
                                          for v in VARIANTS}
        row["seed_pairs"] = {
            f"{b} - {a}": paired_difference(seeds[a][f"dice_{VARIANTS[0]}"],
                                            seeds[b][f"dice_{VARIANTS[0]}"])
            for a, b in combinations(sorted(seeds), 2)}
        out["recipes"][name] = row
    return out


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
        result = pool(load_tables(args.reports, same), args.reference)
    except PoolError as exc:
        print(f"gpu_cv_pool: {exc}", file=sys.stderr)
        return 2
    for name, row in result["recipes"].items():
        post = row["post-processed"]
        line = (f"{name}: seeds {row['seeds']}, post-processed mean {post['mean']:.3f}, "
                f"median {post['median']:.3f}")
        pair = row.get("paired_vs_reference", {}).get("post-processed")
        if pair:
            lo, hi = pair["ci95"]
            line += (f"; vs {args.reference} {pair['mean']:+.3f} (CI [{lo:+.3f}, {hi:+.3f}], "
                     f"{pair['better']} better, {pair['worse']} worse)")
        print(line)
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
