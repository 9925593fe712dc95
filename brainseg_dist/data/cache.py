"""Decode each patient's slices once, resized to the training size, and cache them on disk.

One ``.npz`` per patient and training size. The file name carries a hash of every slice's
path, byte size and modification time plus the size, so a changed file or size misses the
cache and is decoded again; untouched patients are read back in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg_dist.data.decode import SliceError, read_pair, resize_image, resize_mask
from brainseg_dist.errors import DataProblem
from brainseg_dist.io import atomic_write_bytes, remove_temporaries

CACHE_VERSION = 1
STALE_TEMPORARY_S = 3600.0


def default_cache_dir() -> Path:
    """``$BRAINSEG_CACHE_DIR`` or ``$XDG_CACHE_HOME/brainseg_dist`` (``~/.cache/...``)."""
    return _cache_dir_and_source()[0]


def _cache_dir_and_source() -> tuple[Path, str]:
    if env := os.environ.get("BRAINSEG_CACHE_DIR"):
        return Path(env), "BRAINSEG_CACHE_DIR"
    if base := os.environ.get("XDG_CACHE_HOME"):
        return Path(base) / "brainseg_dist", "XDG_CACHE_HOME"
    return Path.home() / ".cache" / "brainseg_dist", "the default cache folder"


def usable_cache_dir(cache_dir: str | Path | None) -> Path:
    """The decoded-slice cache folder, created and checked for writing before any decoding.

    Args:
        cache_dir: ``data.cache_dir``/``--cache-dir``, or None for :func:`default_cache_dir`.

    Returns:
        The folder.

    Raises:
        BrainsegError: the folder is a file or cannot be written; the message names the
            setting it came from (``data.cache_dir``, ``BRAINSEG_CACHE_DIR``, ...).
    """
    from brainseg_dist.errors import BrainsegError
    from brainseg_dist.io import check_writable

    path, source = ((Path(cache_dir), "data.cache_dir / --cache-dir") if cache_dir is not None
                    else _cache_dir_and_source())
    try:
        return check_writable(path / "decoded", f"decoded-slice cache (from {source})")
    except BrainsegError:
        if path.exists() and not path.is_dir():
            raise BrainsegError(f"{path}: decoded-slice cache (from {source}) is a file, not a "
                                "folder; point it at a folder or unset it") from None
        raise


@dataclass
class PatientSlices:
    """Decoded slices of one patient folder."""

    folder: str
    images: np.ndarray  # N×3×S×S uint8
    masks: np.ndarray  # N×1×S×S uint8 (0/1)
    tumour_pixels: np.ndarray  # N int64, counted at native resolution
    native_shape: np.ndarray  # N×2 int64 (H, W) of the source slices
    problems: list[DataProblem]
    valid: np.ndarray  # N bool: False where the slice failed to decode
    from_cache: bool = False


def cache_key(rows: pd.DataFrame, size: int) -> str:
    """Hash of the slices' paths, sizes and mtimes plus the training size."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}".encode())
    for image_path, mask_path in zip(rows["image_path"], rows["mask_path"], strict=True):
        for p in (image_path, mask_path):
            try:
                st = os.stat(p)
                h.update(f"|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"|{p}|missing".encode())
    return h.hexdigest()[:20]


def decode_patient(rows: pd.DataFrame, size: int) -> PatientSlices:
    """Decode, validate and resize one patient's slices (every problem is collected)."""
    n = len(rows)
    images = np.zeros((n, 3, size, size), np.uint8)
    masks = np.zeros((n, 1, size, size), np.uint8)
    tumour = np.zeros(n, np.int64)
    shapes = np.zeros((n, 2), np.int64)
    valid = np.zeros(n, bool)
    problems: list[DataProblem] = []
    for i, (image_path, mask_path) in enumerate(
        zip(rows["image_path"], rows["mask_path"], strict=True)
    ):
        try:
            image, mask = read_pair(image_path, mask_path)
        except SliceError as exc:
            problems.append(exc.problem)
            continue
        images[i] = resize_image(image, size)
        masks[i] = resize_mask(mask, size)
        tumour[i] = int(mask.sum())
        shapes[i] = mask.shape
        valid[i] = True
    folder = str(rows["folder"].iloc[0])
    return PatientSlices(folder, images, masks, tumour, shapes, problems, valid)


def _load(path: Path) -> PatientSlices | None:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # a damaged cache entry is simply rebuilt
        return None
    n = len(arrays["tumour_pixels"])
    return PatientSlices(str(arrays["folder"]), arrays["images"], arrays["masks"],
                         arrays["tumour_pixels"], arrays["native_shape"], [],
                         np.ones(n, bool), from_cache=True)


def _save(path: Path, p: PatientSlices) -> None:
    buf = io.BytesIO()
    np.savez(buf, folder=np.array(p.folder), images=p.images, masks=p.masks,
             tumour_pixels=p.tumour_pixels, native_shape=p.native_shape)
    atomic_write_bytes(path, buf.getvalue())


def load_patients(
    table: pd.DataFrame,
    size: int,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    on_patient: Callable[[PatientSlices], None] | None = None,
) -> list[PatientSlices]:
    """Decode (or read from cache) every patient of ``table``, in the table's folder order.

    Args:
        table: slice table from :func:`brainseg_dist.data.scan.list_slices`.
        size: training size S (slices become S×S).
        cache_dir: where ``.npz`` entries live; default :func:`default_cache_dir`.
        use_cache: read and write the cache (False decodes everything, writes nothing).
        workers: decoding threads (tifffile and torch release the GIL).
        on_patient: called after each patient, e.g. to advance a progress bar.

    Returns:
        One :class:`PatientSlices` per folder. Patients with problems are never cached.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if use_cache:
        cache = usable_cache_dir(cache_dir).parent
        # Leftovers of killed processes; an hour old, so no live writer's file is touched.
        remove_temporaries(cache / "decoded", older_than=STALE_TEMPORARY_S)
    groups = [g for _, g in table.groupby("folder", sort=False)]

    def work(rows: pd.DataFrame) -> PatientSlices:
        path = cache / "decoded" / f"{rows['folder'].iloc[0]}-{size}-{cache_key(rows, size)}.npz"
        result = _load(path) if use_cache and path.is_file() else None
        if result is None or len(result.tumour_pixels) != len(rows):
            result = decode_patient(rows, size)
            if use_cache and not result.problems:
                _save(path, result)
        if on_patient is not None:
            on_patient(result)
        return result

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, groups))
