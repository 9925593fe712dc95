"""``brainseg predict`` on NIfTI cases: each volume through the model, masks back as
``CASE_seg.nii.gz`` with the input's affine and header, and tumour sizes in mm² and mm³.

The volume handling (finding cases, reorientation, intensity scaling, writing) is in
:mod:`brainseg_dist.nifti`; models and the staged OUT in :mod:`brainseg_dist.deployed`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainseg_dist.console import progress
from brainseg_dist.deployed import (
    PREDICTION_MARKER,
    PredictResult,
    check_replaceable,
    load_model,
    resolve_model,
    staged_folder,
)
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, atomic_write_bytes
from brainseg_dist.nifti import (
    CHANNELS,
    CaseVolume,
    NiftiCase,
    check_case,
    mask_to_input,
    pad_square,
    read_case,
    segmentation_bytes,
    training_zooms,
)
from brainseg_dist.pipeline import check_device, predict_volume, stack_volume_stats


def check_cases(cases: list[NiftiCase], out: Path) -> None:
    """Every case readable and consistent, no two writing the same file, none inside OUT.

    Raises:
        BrainsegError: the offending file is named.
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BrainsegError(f"{out}: two inputs would both write {dup}_seg.nii.gz")
    for case in cases:
        check_case(case)
        for f in case.files.values():
            if f is not None and out.resolve() in f.resolve().parents:
                raise BrainsegError(f"{f}: input inside OUT ({out}), which predict replaces "
                                    "as a whole; choose another OUT")


def segment_volume(module: Any, meta: dict[str, Any], vol: CaseVolume, thr: float,
                   segment: bool, batch_size: int, device: str) -> np.ndarray:
    """``N×H×W`` bool masks of one case's axial slices, in the training layout."""
    x, (rows, cols) = pad_square(vol.images)
    x = torch.from_numpy(x)
    if segment:  # a fold ensemble: its own post-processing, on the whole volume
        with torch.no_grad():
            masks = module.segment(x.to(device))[:, 0].to(torch.bool).cpu()
    else:
        stats = (stack_volume_stats(module, [x], device)
                 if meta["normalization"] == "volume" else None)
        masks = predict_volume(module, x, batch_size, device, stats=stats)[:, 0] > thr
    return masks.numpy()[:, rows, cols]


def case_rows(case: NiftiCase, vol: CaseVolume, masks: np.ndarray, seg_path: Path
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The case's ``tumour_volume.csv`` row (mm³) and ``tumour_area.csv`` rows (mm²)."""
    zr, zc, _ = training_zooms(vol)
    per_slice = masks.reshape(len(masks), -1).sum(1)
    area = [{"case": case.name, "slice": i, "tumour_voxels": int(n),
             "area_mm2": float(n) * zr * zc} for i, n in enumerate(per_slice)]
    voxels = int(per_slice.sum())
    volume = {
        "case": case.name, "flair": str(case.files["flair"]),
        "channels": "+".join(c for c in CHANNELS if case.files[c] is not None),
        "shape": "x".join(str(s) for s in vol.reference.shape[:3]),
        "slices": len(masks), "tumour_slices": int((per_slice > 0).sum()),
        "tumour_voxels": voxels, "voxel_mm3": vol.voxel_mm3,
        "volume_mm3": voxels * vol.voxel_mm3, "volume_ml": voxels * vol.voxel_mm3 / 1e3,
        "mask_path": str(seg_path)}
    return volume, area


def predict_nifti(model: str | Path, cases: list[NiftiCase], out: str | Path,
                  batch_size: int = 32, device: str = "cpu", threshold: float | None = None,
                  show_progress: bool = True,
                  export_missing: Any = None) -> PredictResult:
    """Segment NIfTI cases; write ``OUT/CASE_seg.nii.gz``, ``tumour_volume.csv`` (mm³ per
    case) and ``tumour_area.csv`` (mm² per axial slice), staged and moved into place whole.

    Args:
        model: ``model.ts``, ``model.onnx`` or a run directory.
        cases: from :func:`brainseg_dist.nifti.find_cases`.
        out: output folder (replaced whole).
        batch_size: slices per forward pass.
        device: where the model runs.
        threshold: probability threshold (default: the model's).
        show_progress: rich progress bar.
        export_missing: writes a run directory's missing ``model.ts`` (the CLI passes
            :func:`brainseg_dist.export.export_run`).

    Returns:
        :class:`brainseg_dist.deployed.PredictResult` (kind ``"nifti"``).

    Raises:
        BrainsegError: bad input (the file is named), bad model, OUT not replaceable.
    """
    t0, out = time.perf_counter(), Path(out)
    check_device(device, batch_size)
    check_cases(cases, out)
    check_replaceable(out)
    module, meta = load_model(resolve_model(model, export_missing), device)
    thr = float(meta["threshold"] if threshold is None else threshold)
    segment = hasattr(module, "segment") and thr == float(meta["threshold"])
    volume_rows, area_rows, slices = [], [], 0
    with staged_folder(out) as stage, progress(disable=not show_progress) as bar:
        task = bar.add_task("predicting", total=len(cases), info="")
        for case in cases:
            vol = read_case(case)
            masks = segment_volume(module, meta, vol, thr, segment, batch_size, device)
            seg_path = out / f"{case.name}_seg.nii.gz"
            atomic_write_bytes(stage / seg_path.name,
                               segmentation_bytes(vol, mask_to_input(vol, masks)))
            volume, area = case_rows(case, vol, masks, seg_path)
            volume_rows.append(volume)
            area_rows += area
            slices += len(masks)
            bar.update(task, advance=1, info=f"{case.name}: {volume['volume_mm3']:.0f} mm³")
        area_table, volume_table = pd.DataFrame(area_rows), pd.DataFrame(volume_rows)
        atomic_write(stage / "tumour_volume.csv", lambda p: volume_table.to_csv(p, index=False))
        atomic_write(stage / PREDICTION_MARKER, lambda p: area_table.to_csv(p, index=False))
    seconds = time.perf_counter() - t0
    return PredictResult(out, "nifti", slices, len(cases), seconds,
                         slices / seconds if seconds > 0 else float("nan"),
                         area_table, volume_table)
