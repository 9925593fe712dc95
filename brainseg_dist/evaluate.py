"""``brainseg evaluate``: score a run's checkpoint on held-out patients at native resolution.

Which patients:

* without ``--data-dir`` (or with the run's own dataset root), ``--split`` picks a part of the
  run's ``split.json``; the default is ``test``, the held-out patients;
* with ``--data-dir`` pointing at another root, the default is ``--split all``: every patient
  of that root (none of them can be in the run's split). A named part may still be asked for;
  then only that part's patients found in the root are evaluated.

How: every slice is read at its native size (256×256), run through the same end-to-end
pipeline that ``brainseg export`` writes to ``model.ts`` (area-resize to the training size,
training normalization, U-Net, sigmoid, bilinear resize of the probabilities back to native
size) and thresholded at the checkpoint's threshold. Masks are never resized.

Four variants are always computed, since they need the model twice at most: ``plain``,
``tta`` (mean probability of the slice and its horizontal flip), ``lcc`` (largest
26-connected 3D component of each patient's stacked prediction) and ``tta+lcc``. ``--tta``
and ``--lcc`` choose which one is the headline.

Outputs (``RUN_DIR/eval_<split>`` by default): ``per_patient.csv``, ``summary.json``,
``dice_per_patient.png``, ``overlays_best.png``, ``overlays_median.png``,
``overlays_worst.png`` and ``training_curves.png``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainseg_dist import rundir
from brainseg_dist.checkpoint import Checkpoint
from brainseg_dist.checkpoint import load as load_checkpoint
from brainseg_dist.config import EvalSplit, choices
from brainseg_dist.console import progress, warn
from brainseg_dist.data.scan import list_slices
from brainseg_dist.ensemble import build_ensemble
from brainseg_dist.errors import BrainsegError, DatasetError
from brainseg_dist.io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    check_writable,
    json_safe,
    read_json,
)
from brainseg_dist.metrics import (
    CONVENTIONS,
    dice_from_counts,
    hd95_per_slice,
    iou_from_counts,
    largest_component_3d,
    overlap_counts,
    patient_dice,
    patient_dice_summary,
    slice_metrics,
)
from brainseg_dist.pipeline import (
    check_device,
    from_checkpoint,
    patient_probabilities,
    read_folder,
)
from brainseg_dist.report import evaluation_report
from brainseg_dist.rundir import data_root, eval_dir, existing_run_dir, is_cv_dir

VARIANTS = ("plain", "tta", "lcc", "tta+lcc")
POSTPROCESSED = "post-processed"  # a fold ensemble's chosen post-processing (model.segment)
SPLITS = choices(EvalSplit)
OVERLAY_SLICES = 4

def headline_name(tta: bool, lcc: bool) -> str:
    """Variant key for the options: ``plain``, ``tta``, ``lcc`` or ``tta+lcc``."""
    return {(False, False): "plain", (True, False): "tta", (False, True): "lcc",
            (True, True): "tta+lcc"}[(tta, lcc)]


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def select_patients(table: pd.DataFrame, run_dir: Path, split: str, root: Path
                    ) -> list[str]:
    """Patients to evaluate: a part of ``split.json`` found in ``root``, or all of them.

    Raises:
        BrainsegError: no ``split.json`` for a named part, an unknown part, or no patient of
            that part in ``root``.
    """
    present = list(dict.fromkeys(table["patient"]))
    if split == "all":
        return present
    path = run_dir / rundir.SPLIT
    if not path.is_file():
        raise BrainsegError(f"{path}: not found; use --split all to evaluate every patient")
    parts = read_json(path, "split file")
    if not isinstance(parts, dict):
        raise BrainsegError(f"{path}: damaged split file (expected an object with train, val "
                            f"and test lists, got {type(parts).__name__})")
    if split not in parts:
        raise BrainsegError(f"{path}: no '{split}' part (has {', '.join(parts)})")
    wanted = parts[split]
    if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
        raise BrainsegError(f"{path}: damaged split file ('{split}' must be a list of "
                            "patient IDs)")
    chosen = [p for p in wanted if p in set(present)]
    missing = [p for p in wanted if p not in set(present)]
    if not chosen:
        raise BrainsegError(f"{root}: none of the {len(wanted)} '{split}' patients of {path} "
                            "are in this dataset; use --split all to evaluate every patient "
                            "of it")
    if missing:
        warn(f"{root}: {len(missing)} '{split}' patient(s) of {path} not found: "
             f"{', '.join(missing)}")
    return chosen


@dataclass
class PatientResult:
    """Per-slice results of one patient folder for every variant."""

    patient: str
    folder: str
    slices: int
    counts: dict[str, np.ndarray]  # variant -> N×3 (intersection, predicted, truth)
    hd95: dict[str, np.ndarray]  # variant -> N, NaN where undefined
    overlay: dict[str, Any] = field(default_factory=dict)


def _pick_overlay_slices(masks: np.ndarray, pred: np.ndarray, k: int) -> list[int]:
    """The ``k`` slices with the most tumour (truth plus prediction), in slice order."""
    area = masks.reshape(len(masks), -1).sum(1) + pred.reshape(len(pred), -1).sum(1)
    order = np.argsort(-area, kind="stable")[:k]
    return sorted(int(i) for i in order if area[i] > 0) or [len(masks) // 2]


def evaluate_folder(pipeline: Any, rows: pd.DataFrame, threshold: float, normalization: str,
                    headline: str, batch_size: int = 16, device: str = "cpu",
                    skip_invalid: bool = False) -> PatientResult:
    """Predict one patient folder (identity and flipped) and score all four variants.

    Args:
        pipeline: the eager :class:`~brainseg_dist.pipeline.SegmentationPipeline` on
            ``device``.
        rows: the folder's rows of the slice table, in slice order.
        threshold: probability threshold.
        normalization: ``slice`` or ``volume`` (statistics of the whole folder).
        headline: variant whose prediction the overlay slices show.
        batch_size: slices per forward pass.
        device: where the model runs.
        skip_invalid: drop unreadable slices with a warning instead of failing.

    Returns:
        :class:`PatientResult` with overlap counts and HD95 per slice and variant.
    """
    images, masks, rows = read_folder(rows, skip_invalid)
    p_id, p_flip = patient_probabilities(pipeline, images, normalization, batch_size, device)
    target = torch.from_numpy(masks).bool()
    preds = {"plain": p_id > threshold, "tta": (p_id + p_flip) / 2 > threshold}
    preds["lcc"] = largest_component_3d(preds["plain"])
    preds["tta+lcc"] = largest_component_3d(preds["tta"])
    if hasattr(pipeline, "segment"):  # a fold ensemble: its own post-processing, in-module
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
            preds[POSTPROCESSED] = pipeline.segment(x)[:, 0].bool().cpu()
    counts = {k: overlap_counts(v, target).numpy() for k, v in preds.items()}
    hd = {k: hd95_per_slice(v, target) for k, v in preds.items()}
    pick = _pick_overlay_slices(masks, preds[headline].numpy(), OVERLAY_SLICES)
    overlay = {"images": [images[i] for i in pick], "masks": [masks[i] for i in pick],
               "preds": [preds[headline][i].numpy().astype(np.uint8) for i in pick],
               "slices": [int(rows["slice"].iloc[i]) for i in pick]}
    return PatientResult(str(rows["patient"].iloc[0]), str(rows["folder"].iloc[0]), len(rows),
                         counts, hd, overlay)


def summarize_variant(results: list[PatientResult], variant: str) -> dict[str, Any]:
    """Per-patient Dice (summary and values), slice-level and diagnosis metrics."""
    counts = np.concatenate([r.counts[variant] for r in results])
    patients = np.concatenate([[r.patient] * r.slices for r in results])
    hd = np.concatenate([r.hd95[variant] for r in results])
    dice = patient_dice(counts, patients)
    s = slice_metrics(counts, hd)
    return {
        "patient_dice": patient_dice_summary(dice),
        "per_patient": dice,
        "slice": {k: s[k] for k in ("slices", "tumour_slices", "empty_slices",
                                    "dice_tumour_slices", "fp_rate_empty_slices", "dice",
                                    "iou", "precision", "recall", "hd95_mean", "hd95_median",
                                    "hd95_slices")},
        "diagnosis": {k: s[k] for k in ("sensitivity", "specificity", "accuracy",
                                        "tp", "fp", "tn", "fn")},
    }


def per_patient_table(results: list[PatientResult], headline: str) -> pd.DataFrame:
    """One row per patient: sizes, headline metrics and the Dice of every variant."""
    rows = []
    by_patient: dict[str, list[PatientResult]] = {}
    for r in results:
        by_patient.setdefault(r.patient, []).append(r)
    for patient, rs in by_patient.items():
        c = np.concatenate([r.counts[headline] for r in rs])
        hd = np.concatenate([r.hd95[headline] for r in rs])
        inter, pred, truth = (int(v) for v in c.sum(0))
        s = slice_metrics(c, hd)
        row = {
            "patient": patient, "folder": ";".join(r.folder for r in rs),
            "slices": len(c), "tumour_slices": s["tumour_slices"],
            "dice": float(dice_from_counts(inter, pred, truth)),
            "gt_pixels": truth, "pred_pixels": pred, "intersection": inter,
            "iou": float(iou_from_counts(inter, pred, truth)),
            "dice_tumour_slices": s["dice_tumour_slices"],
            "fp_empty_slices": s["fp"], "empty_slices": s["empty_slices"],
            "hd95_mean": s["hd95_mean"], "hd95_slices": s["hd95_slices"],
        }
        for v in rs[0].counts:
            cv = np.concatenate([r.counts[v] for r in rs]).sum(0)
            row[f"dice_{v}"] = float(dice_from_counts(*cv))
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class EvalResult:
    """Where :func:`evaluate_run` wrote its outputs, and the summary it wrote."""

    out: Path
    summary: dict[str, Any]
    per_patient: pd.DataFrame
    figures: list[Path]


def evaluate_run(run_dir: str | Path, split: str | None = None,
                 data_dir: str | Path | None = None, tta: bool = False, lcc: bool = False,
                 checkpoint: str | Path = rundir.BEST, out: str | Path | None = None,
                 batch_size: int = 16, device: str = "cpu", show_progress: bool = True,
                 figures: bool = True) -> EvalResult:
    """Evaluate a run's checkpoint and write per-patient and summary metrics plus figures.

    Args:
        run_dir: training run directory (``config.yaml``, ``split.json``, checkpoint).
        split: ``test``/``val``/``train``/``all``; None: ``test`` on the run's own dataset,
            ``all`` on another root.
        data_dir: dataset root (default: the run's: ``data.data_dir`` or its synthetic set).
        tta: make flip TTA part of the headline variant.
        lcc: make 3D largest-connected-component post-processing part of the headline.
        checkpoint: file name in ``run_dir``, or a path to a checkpoint elsewhere.
        out: output folder (default ``RUN_DIR/eval_<split>``).
        batch_size: slices per forward pass.
        device: ``cpu`` or ``cuda``.
        show_progress: rich progress bar over patients.
        figures: write the PNG figures.

    Returns:
        :class:`EvalResult`.

    Raises:
        BrainsegError: missing run files, unknown split, no patients, bad data (named).
    """
    t0 = time.perf_counter()
    run_dir = existing_run_dir(run_dir)
    check_device(device, batch_size)
    pipeline, ckpt, ensemble = _load(run_dir, checkpoint)
    root, split = _root_and_split(run_dir, ckpt, data_dir, split, ensemble)
    skip_invalid = ckpt.config.data.skip_invalid
    table = _patient_table(root, run_dir, split, skip_invalid)
    headline = POSTPROCESSED if ensemble else headline_name(tta, lcc)
    out = Path(out) if out is not None else eval_dir(run_dir, split)
    check_writable(out, "evaluation output folder (--out)")  # before any slice is decoded

    results = _score_patients(pipeline.to(device), table, ckpt.normalization, headline,
                              batch_size, device, skip_invalid, show_progress)
    variants = {v: summarize_variant(results, v) for v in results[0].counts}
    per_patient = per_patient_table(results, headline)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "per_patient.csv", lambda p: per_patient.to_csv(p, index=False))
    written = _figures(results, per_patient, variants[headline], run_dir, out, split,
                       headline) if figures else []
    summary = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt.path),
        "checkpoint_epoch": ckpt.epoch, "config_hash": ckpt.config_hash,
        "data_dir": str(root), "split": split, **_scored(results, pipeline, ckpt, headline,
                                                         variants),
        "figures": [p.name for p in written], "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / "summary.json", summary)  # strict JSON: NaN becomes null
    if figures:
        written.append(evaluation_report(out, json_safe(summary), per_patient, results))
    return EvalResult(out, summary, per_patient, written)


def _scored(results: list[PatientResult], pipeline: Any, ckpt: Checkpoint, headline: str,
            variants: dict[str, Any]) -> dict[str, Any]:
    """The summary's account of what was scored, how, and the figures per variant."""
    return {
        "patients": len(results), "slices": int(sum(r.slices for r in results)),
        "threshold": pipeline.threshold, "image_size": ckpt.image_size,
        "normalization": ckpt.normalization,
        "resolution": "native (masks as stored; probabilities resized to native size)",
        "headline": headline, "headline_metrics": variants[headline]["patient_dice"],
        "variants": variants, "conventions": CONVENTIONS,
    }


def _root_and_split(run_dir: Path, ckpt: Checkpoint, data_dir: str | Path | None,
                    split: str | None, ensemble: bool) -> tuple[Path, str]:
    """The dataset root and the part of it to evaluate (see :func:`evaluate_run`)."""
    run_root = data_root(run_dir, ckpt.config.data.data_dir)
    root = Path(data_dir) if data_dir is not None else run_root
    own_root = _same_path(root, run_root)
    split = split or ("test" if own_root and not ensemble else "all")
    if ensemble and own_root:
        warn(f"{root}: every patient here trained some fold of the ensemble in {run_dir}; "
             "these figures are not on unseen patients")
    if split not in SPLITS:
        raise BrainsegError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    return root, split


def _score_patients(pipeline: Any, table: pd.DataFrame, normalization: str, headline: str,
                    batch_size: int, device: str, skip_invalid: bool,
                    show_progress: bool) -> list[PatientResult]:
    """:func:`evaluate_folder` of every patient folder in ``table``, with a progress bar."""
    results: list[PatientResult] = []
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("evaluating", total=table["folder"].nunique(), info="")
        for _folder, rows in table.groupby("folder", sort=False):
            r = evaluate_folder(pipeline, rows, pipeline.threshold, normalization, headline,
                                batch_size, device, skip_invalid)
            results.append(r)
            d = dice_from_counts(*r.counts[headline].sum(0))
            bar.update(task, advance=1, info=f"{r.patient} Dice {float(d):.3f}")
    return results


def _load(run_dir: Path, checkpoint: str | Path) -> tuple[Any, Checkpoint, bool]:
    """``(pipeline, checkpoint, is_ensemble)``: a CV directory's fold ensemble (every CV
    patient trained some fold: it is evaluated on new patients), else the run's checkpoint
    (the run's own file first; a path that exists as given otherwise)."""
    if is_cv_dir(run_dir):
        pipeline, meta = build_ensemble(run_dir)
        return pipeline, load_checkpoint(Path(meta["ensemble"]["checkpoints"][0])), True
    path = run_dir / checkpoint if (run_dir / checkpoint).is_file() else Path(checkpoint)
    pipeline, ckpt = from_checkpoint(path)
    return pipeline, ckpt, False


def _patient_table(root: Path, run_dir: Path, split: str, skip_invalid: bool
                   ) -> pd.DataFrame:
    """The slice table of the patients to evaluate."""
    table, problems = list_slices(root)
    if problems and (not skip_invalid or not len(table)):
        raise DatasetError(problems, root)
    patients = select_patients(table, run_dir, split, root)
    return table[table["patient"].isin(set(patients))]


def _figures(results: list[PatientResult], per_patient: pd.DataFrame,
             headline_metrics: dict[str, Any], run_dir: Path, out: Path, split: str,
             headline: str) -> list[Path]:
    """Dice bar chart, best/median/worst patient overlays and training curves."""
    from brainseg_dist import viz

    dice = dict(zip(per_patient["patient"], per_patient["dice"], strict=True))
    s = headline_metrics["patient_dice"]
    written = [viz.dice_per_patient(
        dice, out / "dice_per_patient.png",
        f"{split}: per-patient 3D Dice ({headline}), mean {s['mean']:.3f}, "
        f"median {s['median']:.3f}")]
    order = per_patient.sort_values("dice", kind="stable")["patient"].tolist()
    picks = {"best": order[-1], "median": order[(len(order) - 1) // 2], "worst": order[0]}
    by_patient = {r.patient: r for r in results}
    drawn: dict[str, Path] = {}
    for label, patient in picks.items():
        path = out / f"overlays_{label}.png"
        if patient in drawn:  # fewer than three patients: same figure, copied
            written.append(atomic_write_bytes(path, drawn[patient].read_bytes()))
            continue
        r = by_patient[patient]
        ov = r.overlay
        drawn[patient] = viz.patient_overlays(
            ov["images"], ov["masks"], ov["preds"], [f"slice {n}" for n in ov["slices"]],
            path, f"{label}: {r.folder}, 3D Dice {dice[patient]:.3f} ({headline})")
        written.append(drawn[patient])
    metrics = run_dir / rundir.METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        try:
            written.append(viz.training_curves(metrics, out / "training_curves.png"))
        except BrainsegError as exc:  # the curves are a side figure: the scores still count
            warn(f"{exc}; training_curves.png not drawn")
    return written
