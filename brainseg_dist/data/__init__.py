"""Data stage: scan a ``kaggle_3m`` root, validate, split by patient, decode and cache.

The main entry point is :func:`load_dataset`, which returns a :class:`SliceData` holding the
slice table and the uint8 arrays at the training size.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg_dist.console import progress, warn
from brainseg_dist.data.cache import PatientSlices, load_patients
from brainseg_dist.data.scan import join_clinical, list_slices, read_clinical
from brainseg_dist.errors import DataProblem, DatasetError

__all__ = ["SliceData", "load_dataset"]


@dataclass
class SliceData:
    """A validated dataset at one training size.

    Attributes:
        root: the dataset root.
        table: one row per usable slice, in folder then numeric slice order, with columns
            ``patient, folder, site, slice, image_path, mask_path, diagnosis, tumour_pixels,
            native_height, native_width`` and any ``data.csv`` columns.
        images: ``N×3×S×S`` uint8 (pre-contrast, FLAIR, post-contrast).
        masks: ``N×1×S×S`` uint8 with values 0/1.
        image_size: S.
        skipped: problems of the slices dropped by ``skip_invalid``.
        timings: seconds spent listing and decoding, and how many patients came from cache.
    """

    root: Path
    table: pd.DataFrame
    images: np.ndarray
    masks: np.ndarray
    image_size: int
    skipped: list[DataProblem] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def patients(self) -> list[str]:
        return list(dict.fromkeys(self.table["patient"]))

    def subset(self, patients: list[str] | set[str]) -> SliceData:
        """The slices of the given patients, in the original order."""
        keep = self.table["patient"].isin(set(patients)).to_numpy()
        idx = np.flatnonzero(keep)
        return SliceData(self.root, self.table.iloc[idx].reset_index(drop=True),
                         self.images[idx], self.masks[idx], self.image_size, self.skipped,
                         self.timings)


def _size_problems(patients: list[PatientSlices], table: pd.DataFrame) -> list[np.ndarray]:
    """Flag slices whose native size differs from the dataset's most common size."""
    shapes = np.concatenate([p.native_shape for p in patients])
    valid = np.concatenate([p.valid for p in patients])
    counts = Counter(map(tuple, shapes[valid].tolist()))
    if len(counts) <= 1:
        return []
    (common, n_common), = counts.most_common(1)
    bad = valid & np.any(shapes != np.array(common), axis=1)
    problems = [
        DataProblem(Path(table["image_path"].iloc[i]),
                    f"slice is {shapes[i][0]}x{shapes[i][1]}, expected {common[0]}x{common[1]} "
                    f"like {n_common} other slices")
        for i in np.flatnonzero(bad)
    ]
    return [bad, problems]


def load_dataset(
    root: str | Path,
    image_size: int = 128,
    cache_dir: str | Path | None = None,
    skip_invalid: bool = False,
    use_cache: bool = True,
    show_progress: bool = True,
) -> SliceData:
    """Scan, validate, decode (or read from cache) and label every slice under ``root``.

    Args:
        root: ``kaggle_3m``-style dataset root.
        image_size: training size S; slices are area-resized to S×S.
        cache_dir: decoded-slice cache (default ``~/.cache/brainseg_dist``).
        skip_invalid: drop bad slices with a warning instead of failing.
        use_cache: set False to decode everything without touching the cache.
        show_progress: show a rich progress bar while decoding.

    Returns:
        The validated :class:`SliceData`.

    Raises:
        DatasetError: listing every problem found (missing pairs, unreadable or truncated tifs,
            wrong size/dtype/channels, non-binary masks, empty root or folders), unless
            ``skip_invalid`` is set and at least one good slice remains.
    """
    root = Path(root)
    t0 = time.perf_counter()
    table, problems = list_slices(root)
    clinical, csv_problems = read_clinical(root) if root.is_dir() else (None, [])
    problems += csv_problems
    t_list = time.perf_counter() - t0

    patients = _decode(table, image_size, cache_dir, use_cache, show_progress)
    t_decode = time.perf_counter() - t0 - t_list

    valid = np.concatenate([p.valid for p in patients]) if patients else np.zeros(0, bool)
    for p in patients:
        problems += p.problems
    size_check = _size_problems(patients, table) if patients else []
    if size_check:
        valid &= ~size_check[0]
        problems += size_check[1]

    if problems and (not skip_invalid or not valid.any()):
        raise DatasetError(problems, root)
    for p in problems:
        warn(f"skipped {p}")

    table, images, masks = _assemble(table, patients, valid, clinical)
    timings = {
        "list_seconds": t_list,
        "decode_seconds": t_decode,
        "patients_from_cache": float(sum(p.from_cache for p in patients)),
        "patients": float(len(patients)),
    }
    return SliceData(root, table, images, masks, image_size, skipped=problems, timings=timings)


def _assemble(table: pd.DataFrame, patients: list[PatientSlices], valid: np.ndarray,
              clinical: pd.DataFrame | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The valid slices' table (labels, native sizes, clinical columns), images and masks."""
    images = np.concatenate([p.images for p in patients])[valid]
    masks = np.concatenate([p.masks for p in patients])[valid]
    tumour = np.concatenate([p.tumour_pixels for p in patients])[valid]
    shapes = np.concatenate([p.native_shape for p in patients])[valid]
    table = table.iloc[np.flatnonzero(valid)].reset_index(drop=True)
    table["diagnosis"] = (tumour > 0).astype(np.int64)
    table["tumour_pixels"] = tumour
    table["native_height"] = shapes[:, 0]
    table["native_width"] = shapes[:, 1]
    return join_clinical(table, clinical), images, masks


def _decode(table: pd.DataFrame, image_size: int, cache_dir: str | Path | None,
            use_cache: bool, show_progress: bool) -> list[PatientSlices]:
    """Every patient's slices at the training size, from the cache or decoded."""
    if not len(table):
        return []
    with progress(transient=True, disable=not show_progress) as bar:
        task = bar.add_task("decoding", total=table["folder"].nunique(), info="")
        return load_patients(table, image_size, cache_dir, use_cache=use_cache,
                             on_patient=lambda p: bar.update(task, advance=1, info=p.folder))
