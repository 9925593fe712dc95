"""``brainseg predict``: segment new slices with an exported ``model.ts`` (no checkpoint needed).

INPUT is one ``.tif`` slice, one patient folder of slices, or a ``kaggle_3m``-style root of
patient folders; files ending in ``_mask.tif`` are ground truth and are skipped. For every
slice ``<name>.tif`` it writes ``OUT/<folder>/<name>_mask.tif`` (uint8 0/255, the input's
H×W) and ``OUT/<folder>/overlays/<name>.png`` (FLAIR with the predicted mask), plus
``OUT/tumour_area.csv`` (tumour pixels per slice) and ``OUT/tumour_volume.csv`` (tumour
pixels per patient folder). Inputs are never overwritten: a run whose outputs would land in
an input patient folder is refused before anything is written.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch

from brainseg_dist.console import progress
from brainseg_dist.data.inputs import check_inputs, find_inputs, read_slice
from brainseg_dist.data.scan import patient_id
from brainseg_dist.deployed import (
    PREDICTION_MARKER,
    PredictResult,
    check_replaceable,
    load_model,
    resolve_model,
    staged_folder,
)
from brainseg_dist.errors import BrainsegError, DataProblem, DatasetError
from brainseg_dist.io import atomic_write, atomic_write_bytes
from brainseg_dist.pipeline import check_device, patient_masks


# ----------------------------------------------------------------------------- inputs
@dataclass
class InputSlice:
    """One input slice and where its outputs go."""

    path: Path
    folder: str  # output sub-folder (the patient folder's name)
    name: str  # file stem
    mask_out: Path = field(default=Path())
    overlay_out: Path = field(default=Path())


def plan_outputs(groups: dict[str, list[Path]], out: Path) -> list[InputSlice]:
    """Output paths for every input slice.

    Raises:
        DatasetError: two inputs would write the same output (``x.tif`` next to ``x.tiff``,
            or two patient folders of the same name); both files are named.
    """
    plan, owner, problems = [], {}, []
    for folder, paths in groups.items():
        for p in paths:
            s = InputSlice(p, folder, p.stem)
            s.mask_out = out / folder / f"{p.stem}_mask.tif"
            s.overlay_out = out / folder / "overlays" / f"{p.stem}.png"
            key = str(s.mask_out).lower()  # case-insensitive file systems clash too
            if key in owner:
                problems.append(DataProblem(p, f"same output {s.mask_out.name} as "
                                               f"{owner[key]}; rename one of them"))
            owner.setdefault(key, p)
            plan.append(s)
    if problems:
        raise DatasetError(problems)
    return plan


def check_no_overwrite(out: Path, plan: list[InputSlice]) -> None:
    """Refuse any output inside an input patient folder (the folder of any input slice).

    Writing there could replace an input (a ground-truth ``<name>_mask.tif`` has exactly the
    name of a predicted mask) or leave a predicted ``_mask.tif`` that later passes for ground
    truth. OUT may be anywhere else, including inside a dataset root next to the patient
    folders (a folder without slices of its own is not taken for a patient folder).

    Raises:
        BrainsegError: OUT is a file, or some output would land in an input folder; the
            message names the folder and an example file (and says if files would be replaced).
    """
    if out.exists() and not out.is_dir():
        raise BrainsegError(f"{out}: output location exists and is not a folder")
    folders = {s.path.resolve().parent for s in plan}
    outputs = [p for s in plan for p in (s.mask_out, s.overlay_out)]
    outputs += [out / "tumour_area.csv", out / "tumour_volume.csv"]
    clashes = []
    for p in outputs:
        r = p.resolve()
        inside = next((f for f in r.parents if f in folders), None)
        if inside is not None:
            clashes.append((p, inside))
    if clashes:
        existing = sum(p.exists() for p, _ in clashes)
        p, folder = clashes[0]
        raise BrainsegError(
            f"{out}: refusing to write predictions into the input folder {folder}: "
            f"{len(clashes)} output(s) would land there (e.g. {p}), {existing} of them "
            "replacing existing input files such as ground-truth masks. Choose an OUT folder "
            "outside the patient folders.")


# ----------------------------------------------------------------------------- outputs
def _write_mask(path: Path, mask: np.ndarray) -> None:
    atomic_write(path, lambda p: tifffile.imwrite(p, mask, photometric="minisblack"))


def overlay_png(image: np.ndarray, mask: np.ndarray) -> bytes:
    """FLAIR in grey with the predicted mask tinted red and its outline in yellow (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainseg_dist.metrics import boundary
    from brainseg_dist.viz import overlay

    rgb = overlay(image, mask, colour=(1.0, 0.15, 0.1), alpha=0.35)
    edge = boundary(torch.from_numpy(mask.astype(bool))).numpy()
    rgb[edge] = (1.0, 0.9, 0.0)
    buf = io.BytesIO()
    plt.imsave(buf, np.clip(rgb, 0, 1), format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- entry point
def predict(model: str | Path, input_path: str | Path | None, out: str | Path,
            batch_size: int = 32, device: str = "cpu", threshold: float | None = None,
            overlays: bool = True, show_progress: bool = True,
            on_folder: Callable[[str, int], None] | None = None,
            export_missing: Callable[[Path], object] | None = None, pre: Path | None = None,
            flair: Path | None = None, post: Path | None = None) -> PredictResult:
    """Segment every slice under INPUT and write masks, overlays and tumour-size CSVs.

    NIfTI input (a volume, nnU-Net-style channel files, a folder of them, or ``pre``/``flair``/
    ``post``) goes to :func:`brainseg_dist.nifti_predict.predict_nifti` instead.

    Args:
        model: ``model.ts``, ``model.onnx`` or a run directory.
        input_path: one ``.tif``, a patient folder, a ``kaggle_3m``-style root, or NIfTI.
        out: output folder (created); must not overwrite anything in the input location.
        batch_size: slices per forward pass.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        threshold: probability threshold (default: the model's training threshold).
        overlays: also write overlay PNGs.
        show_progress: rich progress bar over slices.
        on_folder: called with (folder, slices) after each folder (for tests/logging).
        export_missing: writes a run directory's missing ``model.ts`` (the CLI passes
            :func:`brainseg_dist.export.export_run`); without it such a run is an error.
        pre, flair, post: NIfTI sequences given one by one (``--pre/--flair/--post``).

    Returns:
        :class:`PredictResult`.

    Raises:
        BrainsegError: bad model, unreadable or wrongly shaped input (the file is named),
            an output that would overwrite an input, or an unavailable device.
    """
    from brainseg_dist.nifti import find_cases
    from brainseg_dist.nifti_predict import predict_nifti

    cases = find_cases(None if input_path is None else Path(input_path), pre, flair, post)
    if cases is not None:
        return predict_nifti(model, cases, out, batch_size, device, threshold, show_progress,
                             export_missing)
    t0, input_path, out = time.perf_counter(), Path(input_path), Path(out)
    check_device(device, batch_size)
    kind, groups = find_inputs(input_path)
    plan = plan_outputs(groups, out)
    check_no_overwrite(out, plan)
    check_replaceable(out)
    check_inputs([s.path for s in plan])
    module, meta = load_model(resolve_model(model, export_missing), device)
    thr = float(meta["threshold"] if threshold is None else threshold)
    if not 0 < thr < 1:
        raise BrainsegError(f"--threshold {thr}: must be between 0 and 1")
    # Everything is written to a staging folder beside OUT and moved into place at the end:
    # a failure half-way leaves an earlier OUT exactly as it was.
    with staged_folder(out) as stage:
        area, vol = _predict_into(stage, out, plan, module, meta, thr, batch_size, device,
                                  overlays, show_progress, on_folder)
    seconds = time.perf_counter() - t0
    return PredictResult(out, kind, len(plan), area["folder"].nunique() if len(area) else 0,
                         seconds, len(plan) / seconds if seconds > 0 else float("nan"), area,
                         vol)


def _predict_into(stage: Path, out: Path, plan: list[InputSlice], module: Any,
                  meta: dict[str, Any], thr: float, batch_size: int, device: str,
                  overlays: bool, show_progress: bool,
                  on_folder: Callable[[str, int], None] | None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every planned slice; write masks, overlays and CSVs under ``stage`` (paths in
    the CSVs are the final ones under ``out``)."""
    volume = meta["normalization"] == "volume"
    # A fold ensemble's segment() applies the post-processing chosen on validation; an
    # explicit --threshold asks for plain thresholding instead.
    segment = hasattr(module, "segment") and thr == float(meta["threshold"])
    area_rows, volume_rows = [], []
    by_folder: dict[str, list[InputSlice]] = {}
    for s in plan:
        by_folder.setdefault(s.folder, []).append(s)
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("predicting", total=len(plan), info="")
        for folder, slices in by_folder.items():
            images = [read_slice(s.path) for s in slices]
            masks = patient_masks(module, images, volume, thr, segment, batch_size, device)
            for s, image, mask in zip(slices, images, masks, strict=True):
                _write_mask(stage / s.mask_out.relative_to(out), mask.astype(np.uint8) * 255)
                if overlays:
                    atomic_write_bytes(stage / s.overlay_out.relative_to(out),
                                       overlay_png(image, mask))
                area_rows.append({"patient": patient_id(folder), "folder": folder,
                                  "slice": s.name, "image_path": str(s.path),
                                  "mask_path": str(s.mask_out), "height": mask.shape[0],
                                  "width": mask.shape[1], "tumour_pixels": int(mask.sum())})
                bar.update(task, advance=1, info=folder)
            areas = [r["tumour_pixels"] for r in area_rows[-len(slices):]]
            volume_rows.append({"patient": patient_id(folder), "folder": folder,
                                "slices": len(slices),
                                "tumour_slices": int(sum(a > 0 for a in areas)),
                                "tumour_pixels": int(sum(areas))})
            if on_folder is not None:
                on_folder(folder, len(slices))
    area = pd.DataFrame(area_rows)
    vol = pd.DataFrame(volume_rows)
    atomic_write(stage / "tumour_volume.csv", lambda p: vol.to_csv(p, index=False))
    atomic_write(stage / PREDICTION_MARKER, lambda p: area.to_csv(p, index=False))
    return area, vol
