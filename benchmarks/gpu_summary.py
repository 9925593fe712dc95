"""``gpu_check.json``: the results of ``benchmarks/gpu_check.sh`` (``checks.json``,
``throughput.json``, ``train.json``, ``train_fast.json``, ``step_ops.json``, ``cv.json`` and the
steps' exit statuses) against issue 12's targets. ``python benchmarks/gpu_checks.py summary
--out DIR`` writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_list(path: Path) -> list[dict[str, Any]]:
    rows = _load(path)
    return rows if isinstance(rows, list) else []


def _criterion(value: float | None, target: float, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"value": value, "target": f"{'<=' if at_most else '>='} {target}", "met": met}


def summarize(out: Path, steps_file: Path | None) -> dict[str, Any]:
    """The issue's targets against what ``checks.json``, ``throughput.json`` and
    ``train.json`` in ``out`` hold (``met: null`` where a result is missing)."""
    checks = _load(out / "checks.json") or {}
    bench = _load(out / "throughput.json") or {}
    train = _load(out / "train.json") or {}
    train_fast = _load(out / "train_fast.json") or {}
    tr, sm = bench.get("train", {}), bench.get("summary", {})
    base = tr.get("baseline", {}).get("images_per_s")
    project = tr.get("project", {}).get("images_per_s")
    criteria = {
        "project_vs_baseline_default_workers": _criterion(
            project / base if project and base else None, 10),
        "project_vs_best_baseline": _criterion(sm.get("project_speedup_vs_best_baseline"), 10),
        # Against the lesser of the baseline's steps and its loader alone (4 workers).
        "project_vs_baseline_sustained": _criterion(
            sm.get("project_speedup_vs_sustained_baseline"), 10),
        "data_path_over_training": _criterion(bench.get("loader", {}).get("loader_over_train"),
                                              3),
        "augment_share_of_step": _criterion(sm.get("augment_share_of_step"), 0.15,
                                            at_most=True),
        # The same with augment.fused toggled (one sampling grid vs the sequential Kornia ops).
        "augment_share_of_step_other_geometry": _criterion(
            sm.get("augment_other_share_of_step"), 0.15, at_most=True),
        # The default geometry compiled with the model (train.compile, reduce-overhead), of
        # the compiled step.
        "augment_share_of_compiled_step": _criterion(
            (sm.get("augment_compiled_share_of_step") or {}).get("reduce-overhead"), 0.15,
            at_most=True),
    }
    steps = {}
    skipped = {"skipped": "out of budget", "unselected": "not in GPU_CHECK_ONLY"}
    if steps_file is not None and steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split()
            steps[name] = ({"skipped": skipped[rc]} if rc in skipped else
                           {"exit_status": int(rc), "seconds": float(seconds)})
    return {
        "device": bench.get("hardware", {}).get("device_name"),
        "criteria": criteria,
        "checks": {name: r.get("ok") for name, r in checks.items()},
        "baseline_workers_images_per_s": tr.get("baseline_workers"),
        "project_images_per_s": project,
        # Each optimization switched off (or toggled), over the project step, same rounds.
        "ablations_vs_project": {name: r.get("ratio_vs_project")
                                 for name, r in tr.get("ablations", {}).items()},
        "compile": sm.get("compile"),
        # Each compiled pipeline against the baseline, through the eager project it was timed
        # beside (the compiled ones run after the baseline's rounds).
        "compiled_vs_baseline_default_workers": {
            mode: c["ratio_vs_project"] * project / base
            for mode, c in (sm.get("compile") or {}).items()
            if project and base and "ratio_vs_project" in c},
        **{name: {k: run.get(k) for k in ("train_images_per_second",
                                          "train_images_per_second_after_first",
                                          "val_dice_patient_mean", "peak_memory_gb",
                                          "peak_rss_gb", "wall_seconds")}
           for name, run in (("train", train), ("train_fast", train_fast))},
        # Host calls per eager step (benchmarks/step_ops.py): variant -> phase -> calls.
        "host_calls_per_step": {r["variant"]: {k: v for k, v in r.items() if k != "variant"}
                                for r in _load_list(out / "step_ops.json")},
        "cv": _cv_summary(_load(out / "cv.json")),
        "steps": steps,
        # None where this run left the checks out (GPU_CHECK_ONLY); a checks step that ran
        # and wrote nothing is a failure.
        "all_checks_ok": None if steps.get("checks") == {"skipped": skipped["unselected"]}
        else bool(checks) and all(r.get("ok") for r in checks.values()),
    }


def _cv_summary(cv: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per recipe of ``cv.json`` (benchmarks/gpu_cv.py): per-patient Dice (post-processed,
    plain), wall time, the folds finished and the slowest one's training seconds (the rest
    of the wall time is start-up and evaluation), and the paired post-processed difference
    from the first recipe."""
    if not cv:
        return None
    rows = {}
    for name, r in cv.get("recipes", {}).items():
        pair = (r.get("paired_against_first") or {}).get("post-processed") or {}
        folds = r.get("folds") or []
        trained = [f["seconds"] for f in folds if f.get("seconds") is not None]
        rows[name] = {"headline": r.get("headline"), "plain": r.get("plain"),
                      "seconds": r.get("seconds"), "skipped": r.get("skipped"),
                      "folds_finished": sum(bool(f.get("finished")) for f in folds),
                      "slowest_fold_training_seconds": max(trained, default=None),
                      "paired_mean": pair.get("mean"), "paired_ci95": pair.get("ci95")}
    return {"data": cv.get("data"), "epochs": cv.get("epochs"), "seed": cv.get("seed"),
            "recipes": rows}
