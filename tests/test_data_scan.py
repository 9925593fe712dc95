"""Scanning a kaggle_3m root: pairing, ordering, naming and clinical data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import make_patient, write_image, write_pair

from brainseg_dist.data import load_dataset
from brainseg_dist.data.decode import read_image, resize_image
from brainseg_dist.data.scan import (
    SLICE_COLUMNS,
    join_clinical,
    list_slices,
    patient_id,
    read_clinical,
    site_of,
)
from brainseg_dist.errors import DatasetError

FOLDER = "TCGA_CS_4943_20000902"
OTHER = "TCGA_HT_7602_19951103"


def test_slices_are_in_numeric_order(tmp_path):
    # written out of order on purpose; lexical order would give 1, 10, 11, 2, 3
    make_patient(tmp_path, FOLDER, slices=(10, 2, 1, 11, 3))
    table, problems = list_slices(tmp_path)
    assert problems == []
    assert list(table.columns) == SLICE_COLUMNS
    assert table["slice"].tolist() == [1, 2, 3, 10, 11]
    assert [p.rsplit("/", 1)[1] for p in table["image_path"]] == [
        f"{FOLDER}_{n}.tif" for n in (1, 2, 3, 10, 11)
    ]
    assert [p.rsplit("/", 1)[1] for p in table["mask_path"]] == [
        f"{FOLDER}_{n}_mask.tif" for n in (1, 2, 3, 10, 11)
    ]

    data = load_dataset(tmp_path, image_size=32)
    assert data.table["slice"].tolist() == [1, 2, 3, 10, 11]
    # the arrays follow the table: slice 10 is the fourth image
    expected = resize_image(read_image(tmp_path / FOLDER / f"{FOLDER}_10.tif"), 32)
    np.testing.assert_array_equal(data.images[3], expected)


def test_folders_are_sorted_and_hidden_or_non_tif_entries_ignored(tmp_path):
    make_patient(tmp_path, OTHER, slices=(1,))
    make_patient(tmp_path, FOLDER, slices=(1,))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.md").write_text("not a patient")
    (tmp_path / FOLDER / "notes.txt").write_text("ignored")
    table, problems = list_slices(tmp_path)
    assert problems == []
    assert table["folder"].tolist() == [FOLDER, OTHER]


def test_unpaired_image_and_mask_reported_together(tmp_path):
    folder = make_patient(tmp_path, FOLDER, slices=(1, 2))
    lonely_image = write_image(folder / f"{FOLDER}_3.tif", np.zeros((256, 256, 3), np.uint8))
    lonely_mask = write_image(folder / f"{FOLDER}_4_mask.tif", np.zeros((256, 256), np.uint8))

    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    err = info.value
    assert len(err.problems) == 2
    by_path = {p.path: p.problem for p in err.problems}
    assert set(by_path) == {lonely_image, lonely_mask}
    assert "image has no mask" in by_path[lonely_image]
    assert f"{FOLDER}_3_mask.tif" in by_path[lonely_image]
    assert "mask has no image" in by_path[lonely_mask]
    assert f"{FOLDER}_4.tif" in by_path[lonely_mask]
    # the message shown to the user names both files
    assert str(lonely_image) in str(err)
    assert str(lonely_mask) in str(err)
    assert str(err).startswith("2 problem(s) in dataset")


def test_unexpected_file_names(tmp_path):
    folder = make_patient(tmp_path, FOLDER, slices=(1,))
    odd = write_image(folder / "scan.tif", np.zeros((256, 256, 3), np.uint8))
    foreign = write_image(folder / f"{OTHER}_2.tif", np.zeros((256, 256, 3), np.uint8))
    table, problems = list_slices(tmp_path)
    assert len(table) == 1
    assert {p.path for p in problems} == {odd, foreign}
    assert all("unexpected file name" in p.problem for p in problems)
    assert all(f"{FOLDER}_<n>[_mask].tif" in p.problem for p in problems)
    with pytest.raises(DatasetError, match="unexpected file name"):
        load_dataset(tmp_path, image_size=32)


def test_empty_root(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].path == tmp_path
    assert "empty" in str(info.value)


def test_empty_root_fails_even_with_skip_invalid(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path, skip_invalid=True)


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as info:
        load_dataset(missing)
    assert [p.path for p in info.value.problems] == [missing]
    assert "not found" in str(info.value)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(missing, skip_invalid=True)


def test_patient_folder_without_slices(tmp_path):
    make_patient(tmp_path, FOLDER, slices=(1, 2))
    empty = tmp_path / OTHER
    empty.mkdir()
    (empty / "readme.txt").write_text("no tifs here")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    assert [p.path for p in info.value.problems] == [empty]
    assert "no slices" in info.value.problems[0].problem

    data = load_dataset(tmp_path, image_size=32, skip_invalid=True)
    assert data.patients == ["TCGA_CS_4943"]
    assert len(data) == 2
    assert [p.path for p in data.skipped] == [empty]


def test_patient_and_site_columns(tmp_path):
    make_patient(tmp_path, FOLDER, slices=(1, 2))
    make_patient(tmp_path, OTHER, slices=(1,))
    table, _ = list_slices(tmp_path)
    assert table["patient"].tolist() == ["TCGA_CS_4943"] * 2 + ["TCGA_HT_7602"]
    assert table["site"].tolist() == ["CS", "CS", "HT"]
    assert patient_id(FOLDER) == "TCGA_CS_4943" == FOLDER[:12]
    assert site_of(OTHER) == "HT"


def test_data_csv_joined(tmp_path):
    make_patient(tmp_path, FOLDER, slices=(1, 2))
    make_patient(tmp_path, OTHER, slices=(1,))
    pd.DataFrame({
        "Patient": ["TCGA_HT_7602", "TCGA_CS_4943", "TCGA_XX_0000"],
        "age_at_initial_pathologic": [51, 37, 99],
        "death01": [1, 0, 1],
    }).to_csv(tmp_path / "data.csv", index=False)
    data = load_dataset(tmp_path, image_size=32)
    assert {"age_at_initial_pathologic", "death01"} <= set(data.table.columns)
    assert "Patient" not in data.table.columns
    assert len(data) == 3  # a left join: no rows gained or lost
    assert data.table["age_at_initial_pathologic"].tolist() == [37, 37, 51]
    assert data.table["death01"].tolist() == [0, 0, 1]


def test_data_csv_absent_is_fine(tmp_path):
    make_patient(tmp_path, FOLDER, slices=(1, 2))
    clinical, problems = read_clinical(tmp_path)
    assert clinical is None
    assert problems == []
    data = load_dataset(tmp_path, image_size=32)
    assert len(data) == 2
    assert set(data.table.columns) == {*SLICE_COLUMNS, "diagnosis", "tumour_pixels",
                                       "native_height", "native_width"}


def test_data_csv_without_patient_column_is_reported(tmp_path):
    make_patient(tmp_path, FOLDER, slices=(1,))
    pd.DataFrame({"id": ["TCGA_CS_4943"], "age": [3]}).to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(DatasetError, match="no 'Patient' column") as info:
        load_dataset(tmp_path, image_size=32)
    assert info.value.problems[0].path == tmp_path / "data.csv"


def test_join_clinical_keeps_existing_columns():
    table = pd.DataFrame({"patient": ["A", "B"], "site": ["CS", "HT"]})
    clinical = pd.DataFrame({"Patient": ["A"], "site": ["WRONG"], "grade": [2]})
    joined = join_clinical(table, clinical)
    assert joined["site"].tolist() == ["CS", "HT"]
    assert joined["grade"].iloc[0] == 2
    assert pd.isna(joined["grade"].iloc[1])
    assert join_clinical(table, None) is table


def test_write_pair_masks_are_used(tmp_path):
    # slice 1 of make_patient has a 40x40 square, slice 2 none: diagnosis follows the masks
    folder = make_patient(tmp_path, FOLDER, slices=(1, 2))
    write_pair(folder, 3, mask=np.zeros((256, 256), np.uint8))
    data = load_dataset(tmp_path, image_size=32)
    assert data.table["diagnosis"].tolist() == [1, 0, 0]
    assert data.table["tumour_pixels"].tolist() == [1600, 0, 0]
    assert data.table["native_height"].tolist() == [256] * 3
