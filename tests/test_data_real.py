"""The real LGG subset (20 patients of kaggle_3m); skipped when the archive is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import corrupted_copy, run_cli, unwrap

from brainseg_dist.data import load_dataset
from brainseg_dist.errors import DatasetError

pytestmark = pytest.mark.real_data

PATIENTS, SLICES, POSITIVE, NEGATIVE = 20, 706, 242, 464


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_cache")


@pytest.fixture(scope="module")
def real_data(real_root, real_cache):
    """The real subset decoded once (cold cache) at the default size."""
    return load_dataset(real_root, cache_dir=real_cache, show_progress=False)


def test_real_counts(real_data):
    table = real_data.table
    assert len(real_data.patients) == PATIENTS
    assert len(real_data) == SLICES
    assert int((table["diagnosis"] == 1).sum()) == POSITIVE
    assert int((table["diagnosis"] == 0).sum()) == NEGATIVE
    assert real_data.skipped == []
    assert real_data.timings["patients_from_cache"] == 0
    assert real_data.images.shape == (SLICES, 3, 128, 128)
    assert real_data.masks.shape == (SLICES, 1, 128, 128)
    assert set(np.unique(real_data.masks).tolist()) == {0, 1}
    assert (table["native_height"] == 256).all()
    assert (table["native_width"] == 256).all()
    assert set(table["site"]) == {"CS", "DU", "FG", "HT"}
    # data.csv is joined for every patient
    assert table["age_at_initial_pathologic"].notna().all()


def test_real_slices_in_numeric_order(real_data):
    for _, rows in real_data.table.groupby("folder", sort=False):
        slices = rows["slice"].tolist()
        assert slices == list(range(1, len(slices) + 1))


def test_real_second_load_from_cache(real_root, real_cache, real_data):
    again = load_dataset(real_root, cache_dir=real_cache, show_progress=False)
    assert again.timings["patients_from_cache"] == PATIENTS
    assert again.timings["decode_seconds"] < real_data.timings["decode_seconds"]
    np.testing.assert_array_equal(again.images, real_data.images)
    np.testing.assert_array_equal(again.masks, real_data.masks)
    assert again.table["tumour_pixels"].tolist() == real_data.table["tumour_pixels"].tolist()


def test_real_summary_cli(real_root, real_cache, real_data):
    result = run_cli(["data", "summary", real_root, "--json", "--cache-dir", real_cache])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["patients"] == PATIENTS
    assert summary["slices"] == SLICES
    assert summary["positive_slices"] == POSITIVE
    assert summary["negative_slices"] == NEGATIVE
    assert summary["patients_with_tumour"] == real_data.table.groupby("patient")[
        "diagnosis"].max().sum()
    # the cache written in-process is reused by a separate process
    assert summary["timings"]["patients_from_cache"] == PATIENTS


@pytest.fixture
def real_corrupted(real_root, tmp_path):
    # both faults in ONE patient folder; the other patient stays intact
    return corrupted_copy(real_root, tmp_path / "kaggle_3m", truncate=(0, 10),
                          delete_mask=(0, 3))


def test_real_corrupted_copy(real_corrupted):
    root, truncated, deleted, n_slices = real_corrupted
    with pytest.raises(DatasetError) as info:
        load_dataset(root, image_size=64)
    err = info.value
    assert len(err.problems) == 2
    assert str(truncated) in str(err)
    assert "truncated" in str(err)
    assert deleted.name in str(err)
    assert str(deleted.with_name(deleted.name.replace("_mask", ""))) in str(err)

    result = run_cli(["data", "summary", root, "--json", "--skip-invalid"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["patients"] == 2  # the damaged patient keeps its good slices
    assert summary["slices"] == n_slices - 2
    assert len(summary["skipped_slices"]) == 2
    assert truncated.name in unwrap(result.stderr)
