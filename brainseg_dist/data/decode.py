"""Decode and validate one slice pair, and resize it to the training size as uint8
(by :mod:`brainseg_dist.preprocess`, the one implementation of the rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch

from brainseg_dist import preprocess
from brainseg_dist.errors import DataProblem


class SliceError(Exception):
    """A slice file could not be used; ``problem`` names the file and the reason."""

    def __init__(self, problem: DataProblem):
        self.problem = problem
        super().__init__(str(problem))


def _read_tif(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except FileNotFoundError:
        raise SliceError(DataProblem(path, "file not found")) from None
    except Exception as exc:  # tifffile raises many types for truncated/corrupt files
        raise SliceError(DataProblem(path, f"unreadable or truncated tif ({exc})")) from None
    if array.size == 0:  # tifffile returns an empty array when the IFD lies past the end
        raise SliceError(DataProblem(path, "unreadable or truncated tif (no image directory)"))
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read an H×W×3 uint8 image (pre-contrast, FLAIR, post-contrast).

    Raises:
        SliceError: unreadable file, wrong dtype or wrong channel count.
    """
    path = Path(path)
    image = _read_tif(path)
    if image.dtype != np.uint8:
        raise SliceError(DataProblem(path, f"image dtype is {image.dtype}, expected uint8"))
    if image.ndim != 3 or image.shape[2] != 3:
        raise SliceError(DataProblem(path, f"image shape is {image.shape}, expected H×W×3"))
    return image


def read_mask(path: str | Path) -> np.ndarray:
    """Read an H×W mask with values in {0, 255} (or {0, 1}) and return it as 0/1 uint8.

    Raises:
        SliceError: unreadable file, wrong dtype/shape, or values that are not binary.
    """
    path = Path(path)
    mask = _read_tif(path)
    if mask.dtype != np.uint8:
        raise SliceError(DataProblem(path, f"mask dtype is {mask.dtype}, expected uint8"))
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise SliceError(DataProblem(path, f"mask shape is {mask.shape}, expected H×W"))
    values = np.unique(mask)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise SliceError(DataProblem(path, f"mask is not binary: values {{{shown}}}, "
                                           "expected only 0 and 255"))
    return (mask > 0).astype(np.uint8)


def read_pair(image_path: str | Path, mask_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one image/mask pair; mask returned as 0/1."""
    image = read_image(image_path)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise SliceError(DataProblem(Path(mask_path), f"mask is {mask.shape[0]}x{mask.shape[1]} "
                                     f"but its image is {image.shape[0]}x{image.shape[1]}"))
    return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """An H×W×3 uint8 image at the training size: 3×size×size uint8
    (:func:`brainseg_dist.preprocess.resize`)."""
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return preprocess.resize(chw[None], size)[0].to(torch.uint8).numpy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 0/1 H×W mask at the training size: 1×size×size uint8 0/1
    (:func:`brainseg_dist.preprocess.resize_mask`)."""
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    return preprocess.resize_mask(t, size)[0].to(torch.uint8).numpy()
