#!/usr/bin/env python
"""Patient-level cross-validation of the GPU recipes on real patients: the ``cv`` step of
``benchmarks/gpu_check.sh``.

Each recipe runs as ``brainseg cv --jobs K`` (every fold at once, sharing the one GPU), in the
order of :data:`RECIPES`, while the deadline leaves time. ``--json`` is rewritten after each
recipe, so a step stopped at its limit keeps what finished: per recipe its exit status, wall
time, each fold's training (epochs, last inner-validation Dice, images/s, seconds; kept for a
recipe stopped at the deadline too), the headline (post-processed) and plain per-patient Dice
with their 95% CI, the per-patient table, and its paired difference from the first recipe
(``brainseg compare``). ``--seed`` trains every recipe at another seed on seed 0's folds;
``benchmarks/gpu_cv_pool.py`` pools the reports of several seeds.
The real subset travels to the GPU machine as its archive (``--archive``: carry an ignored
folder holding ``lgg-dev.tar.xz``); without one, ``--synthetic N`` patients stand in (the
CPU mode of ``gpu_check.sh``).

    python benchmarks/gpu_cv.py --archive .data/lgg-dev.tar.xz --epochs 50 --deadline 240 \
        --json cv.json
    python benchmarks/gpu_cv.py --synthetic 4 --folds 2 --jobs 1 --recipes 2 --tiny \
        --json cv.json   # the CPU mode: seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name, config, extra options: the shipped GPU recipe first (the others are paired against it).
RECIPES = [
    ("lgg_unet128", "configs/lgg_unet128.yaml", []),
    ("seed_recipe", "configs/experiments/lgg_unet128_seed.yaml", []),
    ("instance_norm", "configs/lgg_unet128.yaml", ["--set", "model.norm=instance"]),
    # The same function as instance_norm, as GroupNorm (channels-last, fewer host calls).
    ("group_norm", "configs/lgg_unet128.yaml", ["--set", "model.norm=group"]),
    # Compiled training (CUDA graphs), which train.compile: auto turns on for long runs: does
    # it learn as well as eager? Paired with lgg_unet128 at the same seed (gpu_cv_pool.py).
    ("compiled", "configs/lgg_unet128.yaml", ["--set", "train.compile=true"]),
]
# --tiny: seconds per fold on a CPU, so the script's CPU mode cannot rot.
TINY = ["--epochs", "2", "--image-size", "32", "--base-width", "4", "--batch-size", "8",
        "--set", "train.cpu=true"]


def data_root(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The kaggle_3m root the CVs read, and what it is (for the JSON)."""
    if args.archive:
        with tarfile.open(args.archive, mode="r:xz") as tar:
            tar.extractall(work / "data", filter="data")
        root = work / "data" / "kaggle_3m"
        if not root.is_dir():
            raise SystemExit(f"gpu_cv: {args.archive} has no kaggle_3m folder")
        return root, f"real: {Path(args.archive).name}"
    from brainseg_dist.data.synth import write_synthetic_dataset

    root = write_synthetic_dataset(work / "synthetic" / "kaggle_3m",
                                   patients=args.synthetic, seed=0)
    return root, f"synthetic: {args.synthetic} patients"


def run_recipe(name: str, config: str, extra: list[str], root: Path, work: Path,
               args: argparse.Namespace, seconds_left: float) -> dict[str, Any]:
    """One ``brainseg cv --jobs``; its summary and per-patient table when it finished."""
    out = work / f"cv_{name}"
    command = [sys.executable, "-m", "brainseg_dist.cli", "cv", "--config", str(REPO / config),
               "--data-dir", str(root), "--output-dir", str(out), "--folds", str(args.folds),
               "--jobs", str(args.jobs), *extra, *(TINY if args.tiny else []),
               *(["--seed", str(args.seed), "--split-seed", "0"] if args.seed else []),
               *(["--epochs", str(args.epochs)] if args.epochs else [])]
    print(f"gpu_cv: {name}: {' '.join(command[3:])}", flush=True)
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    try:
        rc: int | str = process.wait(timeout=seconds_left)
    except subprocess.TimeoutExpired:
        process.terminate()  # brainseg cv stops its fold jobs on SIGTERM (SIGKILL would not)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        rc = "timeout"
    result: dict[str, Any] = {"config": config, "options": extra, "exit_status": rc,
                              "seconds": round(time.perf_counter() - t0, 1),
                              "folds": fold_progress(out, args.folds)}
    if rc == 0:
        import pandas as pd

        summary = json.loads((out / "cv_summary.json").read_text())
        result["dir"] = str(out)
        result["headline"] = {k: summary[k] for k in
                              ("dice_patient_mean", "dice_patient_median", "dice_patient_ci95")}
        plain = summary["variants"]["plain"]
        result["plain"] = {k: plain[k] for k in ("dice_patient_mean", "dice_patient_median")}
        result["per_patient"] = pd.read_csv(out / "cv_per_patient.csv").to_dict("records")
    print(f"gpu_cv: {name}: exit status {rc} after {result['seconds']} s; "
          f"{result.get('headline', 'no result')}", flush=True)
    return result


def fold_progress(out: Path, folds: int) -> list[dict[str, Any]]:
    """Each fold's training as its run directory shows it, finished or not: epochs done, the
    last epoch's inner-validation Dice and images/s, and the fold's training seconds once it
    finished. This splits a recipe's time between training and the evaluation after it, and
    keeps something of a recipe stopped at the deadline."""
    from brainseg_dist import rundir
    from brainseg_dist.io import read_jsonl

    progress = []
    for k in range(folds):
        metrics = rundir.fold_dir(out, k) / rundir.METRICS
        rows = read_jsonl(metrics, "metrics file") if metrics.is_file() else []
        done = rundir.fold_dir(out, k) / rundir.FOLD_DONE
        last = rows[-1] if rows else {}
        progress.append({
            "fold": k, "epochs": len(rows), "finished": done.is_file(),
            "seconds": json.loads(done.read_text())["seconds"] if done.is_file() else None,
            "val_dice_patient_mean": last.get("val_dice_patient_mean"),
            "train_images_per_second": last.get("train_images_per_second")})
    return progress


def paired(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """``brainseg compare`` of two finished recipes: the per-patient differences."""
    if "dir" not in first or "dir" not in other:
        return None
    from brainseg_dist.compare import compare_runs

    comparison = compare_runs([first["dir"], other["dir"]])["comparisons"][0]
    return {"same_folds": comparison["same_folds"], **comparison["paired"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", type=Path, help="lgg-dev.tar.xz (a kaggle_3m root)")
    source.add_argument("--synthetic", type=int, help="synthetic patients instead")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=5, help="folds at once (brainseg cv --jobs)")
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="seconds for the whole script; a recipe starts only with "
                             "--min-seconds (and 90%% of the last recipe's time) left, and "
                             "is stopped at the deadline")
    parser.add_argument("--min-seconds", type=float, default=30.0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="one budget for every recipe (default: each config's own)")
    parser.add_argument("--recipes", type=int, default=len(RECIPES),
                        help="run the first N recipes of RECIPES")
    parser.add_argument("--recipe", action="append", choices=[r[0] for r in RECIPES],
                        help="run only these recipes (repeatable; instead of --recipes)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of every recipe; the folds stay seed 0's "
                             "(--split-seed 0), so runs of two seeds pair patient by patient")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized recipes (seconds)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.archive and not args.archive.is_file():
        print(f"gpu_cv: {args.archive}: no such archive (carry it: see gpu_check.sh)",
              file=sys.stderr)
        return 2
    from brainseg_dist.io import atomic_write_json

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_cv.") as tmp:
        work = Path(tmp)
        root, data = data_root(args, work)
        report: dict[str, Any] = {"data": data, "folds": args.folds, "jobs": args.jobs,
                                  "epochs": args.epochs, "seed": args.seed, "recipes": {}}
        needed = args.min_seconds
        chosen = ([r for r in RECIPES if r[0] in args.recipe] if args.recipe
                  else RECIPES[:args.recipes])
        for name, config, extra in chosen:
            left = args.deadline - (time.perf_counter() - t0)
            if left < needed:  # it would be stopped before its end: leave the time to others
                report["recipes"][name] = {"config": config, "options": extra,
                                           "skipped": f"{left:.0f} s left, {needed:.0f} s "
                                                      "needed"}
                continue
            result = run_recipe(name, config, extra, root, work, args, left)
            # The recipes cost about the same: the next one starts with 90% of this one's time.
            needed = max(needed, 0.9 * result["seconds"])
            first = report["recipes"].get(RECIPES[0][0])
            if first is not None and name != RECIPES[0][0]:
                result["paired_against_first"] = paired(first, result)
            report["recipes"][name] = result
            atomic_write_json(args.json, report)
        for result in report["recipes"].values():
            result.pop("dir", None)  # a temporary directory
        atomic_write_json(args.json, report)
    finished = [r for r in report["recipes"].values() if r.get("exit_status") == 0]
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
