"""Slices to segment that come without masks (``brainseg predict``'s INPUT): one ``.tif``, a
patient folder, or a ``kaggle_3m``-style root; found, validated from their headers, decoded.
Files ending in ``_mask.tif`` are ground truth and are skipped."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile

from brainseg_dist.data.decode import SliceError, read_image
from brainseg_dist.errors import BrainsegError, DataProblem, DatasetError

TIF_SUFFIXES = (".tif", ".tiff")
_NUMBER_RE = re.compile(r"_(\d+)$")


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


def check_inputs(paths: list[Path]) -> list[tuple[int, int]]:
    """Read every input's tif header (no pixel decoding) and validate dtype and shape.

    Returns:
        ``(H, W)`` per slice.

    Raises:
        DatasetError: listing every unreadable file and every file that is not an
            ``H×W×3`` uint8 image.
    """
    problems, shapes = [], []
    for path in paths:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), series.dtype
        except Exception as exc:  # tifffile raises many types for corrupt files
            problems.append(DataProblem(path, f"unreadable tif ({exc})"))
            shapes.append((0, 0))
            continue
        if dtype != np.uint8:
            problems.append(DataProblem(path, f"image dtype is {dtype}, expected uint8"))
        elif len(shape) != 3 or shape[2] != 3:
            problems.append(DataProblem(path, f"image shape is {shape}, expected H×W×3 "
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
    try:
        return read_image(path)
    except SliceError as exc:
        raise BrainsegError(str(exc)) from None
