"""The decoded-slice cache: hits, per-patient invalidation, size keys, opt-out."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import copy_patients

from brainseg_dist.data import load_dataset
from brainseg_dist.data.cache import default_cache_dir
from brainseg_dist.data.decode import resize_image


@pytest.fixture
def small_root(synth_root, tmp_path):
    """A private copy of 3 synthetic patients (safe to modify)."""
    root = tmp_path / "kaggle_3m"
    copy_patients(synth_root, root, 3)
    return root


def _cache_files(cache):
    return sorted(p.name for p in (cache / "decoded").glob("*.npz")) if cache.exists() else []


def test_cache_dir_comes_from_env(isolated_cache):
    assert default_cache_dir() == isolated_cache


def test_second_load_reads_from_cache(small_root, isolated_cache):
    first = load_dataset(small_root, image_size=64)
    assert first.timings["patients_from_cache"] == 0
    assert first.timings["patients"] == 3
    files = _cache_files(isolated_cache)
    assert len(files) == 3
    assert all(name.startswith("TCGA_") and "-64-" in name for name in files)

    second = load_dataset(small_root, image_size=64)
    assert second.timings["patients_from_cache"] == 3
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.masks, first.masks)
    assert second.images.dtype == np.uint8
    assert second.masks.dtype == np.uint8
    pd.testing.assert_frame_equal(second.table, first.table)
    assert _cache_files(isolated_cache) == files


def test_modified_tif_invalidates_only_its_patient(small_root, isolated_cache):
    first = load_dataset(small_root, image_size=64)
    folders = list(dict.fromkeys(first.table["folder"]))
    changed_folder = folders[1]
    row = first.table.index[first.table["folder"] == changed_folder][0]
    path = first.table.at[row, "image_path"]

    original = tifffile.imread(path)
    new = np.ascontiguousarray(255 - original)  # same size on disk, different content
    st = os.stat(path)
    tifffile.imwrite(path, new, photometric="rgb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    assert os.stat(path).st_mtime_ns != st.st_mtime_ns

    second = load_dataset(small_root, image_size=64)
    assert second.timings["patients_from_cache"] == 2
    np.testing.assert_array_equal(second.images[row], resize_image(new, 64))
    assert not np.array_equal(second.images[row], first.images[row])
    others = (second.table["image_path"] != path).to_numpy()
    np.testing.assert_array_equal(second.images[others], first.images[others])
    np.testing.assert_array_equal(second.masks, first.masks)

    third = load_dataset(small_root, image_size=64)
    assert third.timings["patients_from_cache"] == 3
    np.testing.assert_array_equal(third.images, second.images)


def test_touching_a_mask_invalidates_its_patient(small_root):
    first = load_dataset(small_root, image_size=32)
    path = first.table["mask_path"].iloc[-1]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3_000_000_000))
    second = load_dataset(small_root, image_size=32)
    assert second.timings["patients_from_cache"] == 2
    np.testing.assert_array_equal(second.masks, first.masks)


def test_different_image_size_misses_the_cache(small_root, isolated_cache):
    at64 = load_dataset(small_root, image_size=64)
    at32 = load_dataset(small_root, image_size=32)
    assert at32.timings["patients_from_cache"] == 0
    assert at32.images.shape[2:] == (32, 32)
    assert len(_cache_files(isolated_cache)) == 6
    again = load_dataset(small_root, image_size=64)
    assert again.timings["patients_from_cache"] == 3
    np.testing.assert_array_equal(again.images, at64.images)


def test_use_cache_false_writes_nothing(small_root, isolated_cache):
    data = load_dataset(small_root, image_size=32, use_cache=False)
    assert len(data) > 0
    assert data.timings["patients_from_cache"] == 0
    assert not any(isolated_cache.rglob("*"))
    # and it does not read an existing cache either
    load_dataset(small_root, image_size=32)
    assert len(_cache_files(isolated_cache)) == 3
    again = load_dataset(small_root, image_size=32, use_cache=False)
    assert again.timings["patients_from_cache"] == 0


def test_explicit_cache_dir(small_root, tmp_path, isolated_cache):
    cache = tmp_path / "elsewhere"
    load_dataset(small_root, image_size=32, cache_dir=cache)
    assert len(_cache_files(cache)) == 3
    assert _cache_files(isolated_cache) == []
    assert load_dataset(small_root, image_size=32, cache_dir=cache).timings[
        "patients_from_cache"] == 3


def test_damaged_cache_entry_is_rebuilt(small_root, isolated_cache):
    first = load_dataset(small_root, image_size=32)
    entry = sorted((isolated_cache / "decoded").glob("*.npz"))[0]
    entry.write_bytes(b"garbage")
    second = load_dataset(small_root, image_size=32)
    assert second.timings["patients_from_cache"] == 2
    np.testing.assert_array_equal(second.images, first.images)
    assert load_dataset(small_root, image_size=32).timings["patients_from_cache"] == 3


def test_patients_with_problems_are_not_cached(small_root, isolated_cache):
    folder = sorted(p for p in small_root.iterdir() if p.is_dir())[0]
    mask = sorted(folder.glob("*_mask.tif"))[0]
    mask.write_bytes(mask.read_bytes()[:100])
    data = load_dataset(small_root, image_size=32, skip_invalid=True)
    assert len(data.skipped) == 1
    assert len(_cache_files(isolated_cache)) == 2
    assert not any(name.startswith(folder.name) for name in _cache_files(isolated_cache))
    again = load_dataset(small_root, image_size=32, skip_invalid=True)
    assert again.timings["patients_from_cache"] == 2
    assert len(again.skipped) == 1
