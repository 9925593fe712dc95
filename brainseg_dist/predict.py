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

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch

from brainseg_dist.console import console, progress
from brainseg_dist.data.scan import patient_id
from brainseg_dist.errors import BrainsegError, DataProblem, DatasetError
from brainseg_dist.io import atomic_write, atomic_write_bytes, check_writable, current_umask

TIF_SUFFIXES = (".tif", ".tiff")
_NUMBER_RE = re.compile(r"_(\d+)$")


# ----------------------------------------------------------------------------- inference
def volume_stats_of(module: Any, batches: list[torch.Tensor], device: str | torch.device
                    ) -> torch.Tensor:
    """Volume statistics (``3×2``) of slices given as batches (possibly of different sizes).

    Every batch is resized to the training size by the module's ``prepare`` first, so the
    statistic is the one training computed from its resized slices.
    """
    resized = [module.prepare(b.to(device)) for b in batches]
    return module.volume_stats(torch.cat(resized))


@torch.no_grad()
def predict_volume(module: Any, images: torch.Tensor, batch_size: int = 32,
                   device: str | torch.device = "cpu", flip: bool = False,
                   stats: torch.Tensor | None = None) -> torch.Tensor:
    """Tumour probabilities for a stack of slices, in batches.

    Works with the eager :class:`~brainseg_dist.export.SegmentationPipeline` and with a
    loaded ``model.ts`` (same methods).

    Args:
        module: the pipeline (eval mode, on ``device``).
        images: ``N×3×H×W`` uint8 (or 0..255 float) on the CPU.
        batch_size: slices per forward pass.
        device: where the module runs.
        flip: run on horizontally flipped slices and flip the probabilities back (for TTA).
        stats: volume statistics for ``volume`` normalization (:func:`volume_stats_of` of the
            whole patient); None for ``slice`` normalization.

    Returns:
        ``N×1×H×W`` float32 probabilities on the CPU.
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        if flip:
            x = x.flip(-1)
        p = module(x) if stats is None else module.predict_with_stats(x, stats)
        if flip:
            p = p.flip(-1)
        out.append(p.float().cpu())
    if not out:
        return torch.zeros(0, 1, *images.shape[2:])
    return torch.cat(out)


# ----------------------------------------------------------------------------- inputs
@dataclass
class InputSlice:
    """One input slice and where its outputs go."""

    path: Path
    folder: str  # output sub-folder (the patient folder's name)
    name: str  # file stem
    mask_out: Path = field(default=Path())
    overlay_out: Path = field(default=Path())


def _is_image(p: Path) -> bool:
    return (p.is_file() and p.suffix.lower() in TIF_SUFFIXES
            and not p.stem.lower().endswith("_mask") and not p.name.startswith("."))


def _slice_key(p: Path) -> tuple:
    """Numeric slice order (``_2`` before ``_10``), then name."""
    m = _NUMBER_RE.search(p.stem)
    return (p.stem[: m.start()] if m else p.stem, int(m[1]) if m else -1, p.name)


def find_inputs(path: str | Path) -> tuple[str, dict[str, list[Path]]]:
    """Detect what INPUT is and list its slices per patient folder.

    Args:
        path: a ``.tif`` file, a folder of ``.tif`` slices, or a root of such folders.

    Returns:
        ``(kind, {folder name: [image paths in slice order]})`` with kind ``"file"``,
        ``"folder"`` or ``"root"``.

    Raises:
        BrainsegError: the path does not exist, is a mask, or holds no slices.
    """
    path = Path(path)
    if not path.exists():
        raise BrainsegError(f"{path}: input not found")
    if path.is_file():
        if path.suffix.lower() not in TIF_SUFFIXES:
            raise BrainsegError(f"{path}: not a .tif slice")
        if path.stem.lower().endswith("_mask"):
            raise BrainsegError(f"{path}: this is a ground-truth mask, not an image slice")
        return "file", {path.resolve().parent.name: [path]}
    own = sorted((p for p in path.iterdir() if _is_image(p)), key=_slice_key)
    if own:
        return "folder", {path.resolve().name: own}
    groups = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted((p for p in sub.iterdir() if _is_image(p)), key=_slice_key)
        if images:
            groups[sub.name] = images
    if not groups:
        raise BrainsegError(f"{path}: no .tif slices found (expected a slice, a patient folder "
                            "of <name>.tif files, or a root of patient folders)")
    return "root", groups


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


def check_inputs(plan: list[InputSlice]) -> list[tuple[int, int]]:
    """Read every input's tif header (no pixel decoding) and validate dtype and shape.

    Returns:
        ``(H, W)`` per slice.

    Raises:
        DatasetError: listing every unreadable file and every file that is not an
            ``H×W×3`` uint8 image.
    """
    problems, shapes = [], []
    for s in plan:
        try:
            with tifffile.TiffFile(s.path) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), series.dtype
        except Exception as exc:  # tifffile raises many types for corrupt files
            problems.append(DataProblem(s.path, f"unreadable tif ({exc})"))
            shapes.append((0, 0))
            continue
        if dtype != np.uint8:
            problems.append(DataProblem(s.path, f"image dtype is {dtype}, expected uint8"))
        elif len(shape) != 3 or shape[2] != 3:
            problems.append(DataProblem(s.path, f"image shape is {shape}, expected H×W×3 "
                                                "(pre-contrast, FLAIR, post-contrast)"))
        shapes.append(shape[:2] if len(shape) >= 2 else (0, 0))
    if problems:
        raise DatasetError(problems)
    return shapes


def read_slice(path: Path) -> np.ndarray:
    """Decode one ``H×W×3`` uint8 slice.

    Raises:
        BrainsegError: naming the file, when it cannot be decoded or has the wrong shape.
    """
    from brainseg_dist.data.decode import SliceError, read_image

    try:
        return read_image(path)
    except SliceError as exc:
        raise BrainsegError(str(exc)) from None


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
@dataclass
class PredictResult:
    """What :func:`predict` wrote and how long it took."""

    out: Path
    kind: str
    slices: int
    folders: int
    seconds: float
    slices_per_second: float
    area: pd.DataFrame
    volume: pd.DataFrame


def check_device(device: str) -> torch.device:
    """Parse ``--device`` and check it exists here, before any model or data is read.

    Raises:
        BrainsegError: not a device name torch knows, or CUDA missing.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise BrainsegError(f"--device {device}: not a device name; use cpu, cuda or cuda:N"
                            ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BrainsegError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BrainsegError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here")
    elif parsed.type != "cpu":
        raise BrainsegError(f"--device {device}: unsupported device type; use cpu or cuda")
    return parsed


def resolve_model(model: str | Path) -> Path:
    """MODEL as given: a ``model.ts`` file, or a run directory (its ``model.ts``, exported
    from ``best.pt`` first when missing)."""
    model = Path(model)
    if model.is_dir():
        ts = model / "model.ts"
        if not ts.is_file():
            if not (model / "best.pt").is_file():
                raise BrainsegError(f"{model}: run directory has neither model.ts nor best.pt")
            from brainseg_dist.export import export_run  # only needed to export

            console.print(f"{ts} not found: exporting it from {model / 'best.pt'}")
            export_run(model)
        return ts
    if not model.is_file():
        raise BrainsegError(f"{model}: model not found (expected model.ts, model.onnx or a run "
                            "directory)")
    return model


def load_model(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """Load ``model.ts`` on ``device`` (or ``model.onnx`` for onnxruntime) with its metadata
    (attributes and metadata.json)."""
    from brainseg_dist.export import load_torchscript

    if path.suffix.lower() == ".onnx":
        from brainseg_dist.onnx_export import load_onnx

        return load_onnx(path, device)
    module, meta = load_torchscript(path, device)
    meta.setdefault("threshold", float(module.threshold))
    meta.setdefault("normalization", str(module.normalization))
    meta.setdefault("image_size", int(module.image_size))
    return module, meta


def predict(model: str | Path, input_path: str | Path | None, out: str | Path, batch_size: int = 32,
            device: str = "cpu", threshold: float | None = None, overlays: bool = True,
            show_progress: bool = True,
            on_folder: Callable[[str, int], None] | None = None, pre: Path | None = None,
            flair: Path | None = None, post: Path | None = None) -> PredictResult:
    """Segment every slice under INPUT and write masks, overlays and tumour-size CSVs.

    NIfTI input (a volume, nnU-Net-style channel files, a folder of them, or ``pre``/``flair``/
    ``post``) goes to :func:`brainseg_dist.nifti.predict_nifti` instead.

    Args:
        model: ``model.ts`` or a run directory.
        input_path: one ``.tif``, a patient folder, or a ``kaggle_3m``-style root.
        out: output folder (created); must not overwrite anything in the input location.
        batch_size: slices per forward pass.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        threshold: probability threshold (default: the model's training threshold).
        overlays: also write overlay PNGs.
        show_progress: rich progress bar over slices.
        on_folder: called with (folder, slices) after each folder (for tests/logging).

    Returns:
        :class:`PredictResult`.

    Raises:
        BrainsegError: bad model, unreadable or wrongly shaped input (the file is named),
            an output that would overwrite an input, or an unavailable device.
    """
    from brainseg_dist.nifti import find_cases, predict_nifti

    cases = find_cases(None if input_path is None else Path(input_path), pre, flair, post)
    if cases is not None:
        return predict_nifti(model, cases, out, batch_size, device, threshold, show_progress)
    t0 = time.perf_counter()
    input_path, out = Path(input_path), Path(out)
    check_device(device)
    if batch_size < 1:
        raise BrainsegError(f"--batch-size {batch_size}: must be >= 1")
    kind, groups = find_inputs(input_path)
    plan = plan_outputs(groups, out)
    check_no_overwrite(out, plan)
    check_replaceable(out)
    check_inputs(plan)
    module, meta = load_model(resolve_model(model), device)
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


PREDICTION_MARKER = "tumour_area.csv"  # an OUT holding this was written by predict


def check_replaceable(out: Path) -> None:
    """OUT is replaced as a whole: refuse a non-empty OUT that predict did not write, and
    check before any decoding that its parent folder takes new files.

    Raises:
        BrainsegError: OUT holds other files, or its folder cannot be written.
    """
    if out.is_dir() and any(out.iterdir()) and not (out / PREDICTION_MARKER).is_file():
        raise BrainsegError(f"{out}: output folder is not empty and holds no earlier "
                            f"predictions ({PREDICTION_MARKER}); predict replaces OUT as a "
                            "whole, so choose a new or empty folder")
    check_writable(out.parent, "folder of OUT")


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield an empty staging folder beside ``out``; on success it replaces ``out``.

    The earlier ``out`` (if any) is renamed aside, the stage renamed to ``out``, and only
    then the earlier one deleted; on any failure the stage is deleted and ``out`` untouched.
    Leftovers of a killed process are named ``.NAME.XXXX.tmp`` (removed by
    :func:`brainseg_dist.io.remove_temporaries`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700; use normal permissions
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp",
                                        dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


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
            # Batch slices of equal size together; sizes may differ between folders/files.
            sizes: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(images):
                sizes.setdefault(im.shape[:2], []).append(i)
            stacks = {hw: torch.from_numpy(np.stack([images[i] for i in idx]))
                      .permute(0, 3, 1, 2).contiguous() for hw, idx in sizes.items()}
            # Volume normalization: statistics of the whole folder (one patient's volume).
            stats = volume_stats_of(module, list(stacks.values()), device) if volume else None
            masks: list[np.ndarray | None] = [None] * len(images)
            for hw, idx in sizes.items():
                if segment:  # a fold ensemble: its own 3D post-processing, on the folder
                    with torch.no_grad():
                        m = module.segment(stacks[hw].to(device))[:, 0].bool().cpu()
                    for j, i in enumerate(idx):
                        masks[i] = m[j].numpy()
                    continue
                probs = predict_volume(module, stacks[hw], batch_size, device, stats=stats)
                for j, i in enumerate(idx):
                    masks[i] = (probs[j, 0] > thr).numpy()
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
