"""The synthetic dataset: kaggle_3m layout, determinism and plausible anatomy."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import tifffile
from helpers import tree_hashes

from brainseg_dist.data.synth import SITES, write_synthetic_dataset

FOLDER_RE = re.compile(r"^TCGA_(?P<site>[A-Z]{2})_[0-9A-Z]{4}_(?P<date>\d{8})$")


def _folders(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_layout(synth_root):
    folders = _folders(synth_root)
    assert len(folders) == 8
    assert sorted(p.name for p in synth_root.iterdir() if p.is_file()) == ["data.csv"]
    for folder in folders:
        m = FOLDER_RE.match(folder.name)
        assert m, folder.name
        assert m["site"] in SITES
        assert 1985 <= int(m["date"][:4]) <= 2002
        names = {p.name for p in folder.iterdir()}
        n = len(names) // 2
        assert 20 <= n <= 40
        assert names == {f"{folder.name}_{i}{s}.tif" for i in range(1, n + 1)
                         for s in ("", "_mask")}
    folder = folders[0]
    image = tifffile.imread(folder / f"{folder.name}_1.tif")
    mask = tifffile.imread(folder / f"{folder.name}_1_mask.tif")
    assert image.shape == (256, 256, 3)
    assert image.dtype == np.uint8
    assert mask.shape == (256, 256)
    assert mask.dtype == np.uint8
    clinical = pd.read_csv(synth_root / "data.csv")
    assert sorted(clinical["Patient"]) == sorted(f.name[:12] for f in folders)
    assert clinical["Patient"].is_unique
    assert {"age_at_initial_pathologic", "death01", "gender"} <= set(clinical.columns)


def test_masks_are_0_255_and_images_not_blank(synth_data):
    for path in synth_data.table["mask_path"].iloc[::7]:
        assert set(np.unique(tifffile.imread(path)).tolist()) <= {0, 255}
    positives = synth_data.table.index[synth_data.table["diagnosis"] == 1]
    mask = tifffile.imread(synth_data.table.at[positives[0], "mask_path"])
    assert set(np.unique(mask).tolist()) == {0, 255}
    image = tifffile.imread(synth_data.table.at[positives[0], "image_path"])
    assert image.std() > 10


def test_loads_cleanly_with_clinical_columns(synth_data):
    assert len(synth_data.patients) == 8
    assert synth_data.skipped == []
    assert synth_data.table["age_at_initial_pathologic"].notna().all()
    assert (synth_data.table["native_height"] == 256).all()
    assert (synth_data.table["native_width"] == 256).all()


def test_same_seed_gives_identical_files(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", patients=2, seed=5, slices=(6, 8))
    b = write_synthetic_dataset(tmp_path / "b", patients=2, seed=5, slices=(6, 8))
    c = write_synthetic_dataset(tmp_path / "c", patients=2, seed=6, slices=(6, 8))
    ha, hb, hc = tree_hashes(a), tree_hashes(b), tree_hashes(c)
    assert len(ha) == 1 + 2 * sum(len(list(f.iterdir())) // 2 for f in _folders(a))
    assert ha == hb
    assert ha != hc
    # every image differs (empty masks may coincide, images never do)
    images_a = {h for k, h in ha.items() if k.endswith(".tif") and "_mask" not in k}
    images_c = {h for k, h in hc.items() if k.endswith(".tif") and "_mask" not in k}
    assert images_a
    assert not images_a & images_c
    assert [f.name for f in _folders(a)] != [f.name for f in _folders(c)]


def test_rewriting_in_place_is_idempotent(tmp_path):
    root = write_synthetic_dataset(tmp_path / "x", patients=1, seed=3, slices=(5, 5))
    before = tree_hashes(root)
    write_synthetic_dataset(root, patients=1, seed=3, slices=(5, 5))
    assert tree_hashes(root) == before
    assert not list(root.rglob(".*")), "no temporary files left behind"


def test_positive_fraction(synth_data):
    overall = synth_data.table["diagnosis"].mean()
    assert 0.15 <= overall <= 0.6
    per_patient = synth_data.table.groupby("patient")["diagnosis"].mean()
    assert ((per_patient >= 0.15) & (per_patient <= 0.6)).all(), per_patient.to_dict()


def test_tumour_slices_form_one_run(synth_data):
    for patient, rows in synth_data.table.groupby("patient"):
        positive = rows.loc[rows["diagnosis"] == 1, "slice"].to_numpy()
        assert len(positive) >= 2, patient
        assert positive.tolist() == list(range(positive.min(), positive.max() + 1)), patient
        # the run sits inside the stack, not at its ends
        assert positive.min() > rows["slice"].min()
        assert positive.max() < rows["slice"].max()


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_tumour_is_bright_on_flair(synth_data):
    table = synth_data.table
    for _, rows in table[table["diagnosis"] == 1].groupby("patient"):
        row = rows.loc[rows["tumour_pixels"].idxmax()]
        image = tifffile.imread(row["image_path"]).astype(float)
        mask = tifffile.imread(row["mask_path"]) > 0
        ring = _dilate(mask, 6) & ~mask
        flair = image[..., 1]
        assert ring.sum() > 50
        assert flair[mask].mean() > flair[ring].mean() + 40
        # brighter on FLAIR than on the other channels, where it is barely visible
        assert flair[mask].mean() - flair[ring].mean() > (
            image[..., 0][mask].mean() - image[..., 0][ring].mean()) + 40
