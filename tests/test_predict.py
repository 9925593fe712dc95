"""``brainseg predict``: tif / folder / root inputs, masks and CSVs, model.ts or a run
directory as MODEL, refusal to overwrite inputs, and clear errors on bad inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from helpers import PNG_SIGNATURE, run_cli, tree_hashes, truncate_half, unwrap

from brainseg_dist.errors import BrainsegError, DatasetError
from brainseg_dist.pipeline import load_torchscript
from brainseg_dist.predict import find_inputs, predict


@pytest.fixture(scope="module")
def model_ts(trained_model_ts):
    return trained_model_ts


@pytest.fixture(scope="module")
def input_root(trained_run, tmp_path_factory):
    """A kaggle_3m-style root with copies of the run's two smallest patients."""
    src = trained_run / "synthetic" / "kaggle_3m"
    folders = sorted((p for p in src.iterdir() if p.is_dir()),
                     key=lambda p: (len(list(p.glob("*.tif"))), p.name))[:2]
    root = tmp_path_factory.mktemp("inputs") / "kaggle_3m"
    for f in folders:
        shutil.copytree(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def predicted_root(model_ts, input_root):
    """Predictions for the whole root, written to a folder inside the root itself (allowed:
    it is not a patient folder)."""
    before = tree_hashes(input_root)
    result = predict(model_ts, input_root, input_root / "predictions", show_progress=False)
    return result, before


def images_of(folder):
    return sorted((p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")),
                  key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def test_root_input_masks_and_csvs(predicted_root, input_root, model_ts):
    result, before = predicted_root
    out = input_root / "predictions"
    assert result.kind == "root"
    assert result.folders == 2
    module, meta = load_torchscript(model_ts)
    area = pd.read_csv(out / "tumour_area.csv")
    volume = pd.read_csv(out / "tumour_volume.csv")
    total = 0
    for folder in sorted(p for p in input_root.iterdir() if p.name.startswith("TCGA")):
        images = images_of(folder)
        x = torch.from_numpy(np.stack([tifffile.imread(p) for p in images])).permute(0, 3, 1, 2)
        with torch.no_grad():
            expected = (module(x)[:, 0] > meta["threshold"]).numpy()
        pixels = 0
        for i, p in enumerate(images):
            mask = tifffile.imread(out / folder.name / f"{p.stem}_mask.tif")
            assert mask.shape == (256, 256)
            assert mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 255}
            np.testing.assert_array_equal(mask > 0, expected[i])
            png = out / folder.name / "overlays" / f"{p.stem}.png"
            assert png.read_bytes()[:8] == PNG_SIGNATURE
            row = area[area["slice"] == p.stem].iloc[0]
            assert row["tumour_pixels"] == int(expected[i].sum())
            assert (row["height"], row["width"]) == (256, 256)
            pixels += int(expected[i].sum())
        v = volume[volume["folder"] == folder.name].iloc[0]
        assert v["tumour_pixels"] == pixels
        assert v["slices"] == len(images)
        assert v["patient"] == folder.name[:12]
        total += len(images)
    assert len(area) == result.slices == total
    # inputs untouched; the predictions folder is not taken for a patient folder next time
    assert {k: v for k, v in tree_hashes(input_root).items()
            if not k.startswith("predictions")} == before
    assert set(find_inputs(input_root)[1]) == {p.name for p in input_root.iterdir()
                                               if p.name.startswith("TCGA")}


def test_folder_input_with_run_dir_as_model(trained_run, input_root, predicted_root, tmp_path):
    """MODEL is a run directory without model.ts: ``brainseg predict`` exports model.ts first,
    and only that (the torch.export program and ONNX are ``brainseg export``'s)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "config.yaml", "split.json"):
        shutil.copy2(trained_run / name, run / name)
    os.symlink(trained_run / "synthetic", run / "synthetic")
    folder = sorted(p for p in input_root.iterdir() if p.name.startswith("TCGA"))[0]
    proc = run_cli(["predict", run, folder, tmp_path / "out", "--no-overlays"])
    assert proc.returncode == 0, proc.stderr
    assert "model.ts not found: exporting it" in unwrap(proc.stdout + proc.stderr)
    assert (run / "model.ts").is_file()
    assert not (run / "model.pt2").exists()
    assert not (run / "model.onnx").exists()
    assert not (tmp_path / "out" / folder.name / "overlays").exists()
    first = images_of(folder)[len(images_of(folder)) // 2]
    name = f"{first.stem}_mask.tif"
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "out" / folder.name / name),
        tifffile.imread(input_root / "predictions" / folder.name / name))


def test_cli_single_tif(model_ts, input_root, predicted_root, tmp_path):
    folder = sorted(p for p in input_root.iterdir() if p.name.startswith("TCGA"))[1]
    image = images_of(folder)[3]
    proc = run_cli(["predict", model_ts, image, tmp_path / "out", "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr
    mask = tmp_path / "out" / folder.name / f"{image.stem}_mask.tif"
    np.testing.assert_array_equal(
        tifffile.imread(mask),
        tifffile.imread(input_root / "predictions" / folder.name / mask.name))
    assert len(pd.read_csv(tmp_path / "out" / "tumour_area.csv")) == 1
    assert len(pd.read_csv(tmp_path / "out" / "tumour_volume.csv")) == 1
    assert "1 slice(s) in 1 folder(s) (file)" in unwrap(proc.stderr)


def test_refuses_to_overwrite_inputs(model_ts, input_root, tmp_path):
    folder = sorted(p for p in input_root.iterdir() if p.name.startswith("TCGA"))[0]
    before = tree_hashes(input_root)
    cases = [
        (input_root, input_root),  # OUT == root: predicted masks = ground-truth mask names
        (folder, input_root),  # folder input, OUT its parent: same
        (folder, folder),  # OUT == the input folder: outputs land inside it
        (images_of(folder)[0], input_root),  # single slice, OUT the root
        (images_of(folder)[0], folder / "sub"),  # OUT inside the patient folder
    ]
    for inp, out in cases:
        with pytest.raises(BrainsegError, match="refusing to write predictions into the input"):
            predict(model_ts, inp, out, show_progress=False)
    assert tree_hashes(input_root) == before
    with pytest.raises(BrainsegError, match="ground-truth mask"):
        predict(model_ts, folder / f"{folder.name}_1_mask.tif", tmp_path / "o",
                show_progress=False)


def test_bad_inputs_name_the_file(model_ts, input_root, tmp_path):
    root = tmp_path / "bad"
    folder = sorted(p for p in input_root.iterdir() if p.name.startswith("TCGA"))[0]
    shutil.copytree(folder, root / folder.name)
    gray = root / folder.name / f"{folder.name}_2.tif"
    tifffile.imwrite(gray, np.zeros((256, 256), np.uint8))  # wrong shape: H×W, not H×W×3
    with pytest.raises(DatasetError, match="expected H×W×3") as info:
        predict(model_ts, root, tmp_path / "out1", show_progress=False)
    assert str(gray) in str(info.value)
    shutil.copy2(folder / gray.name, gray)
    with pytest.raises(BrainsegError, match="input not found"):
        predict(model_ts, tmp_path / "missing", tmp_path / "out1", show_progress=False)
    bogus = tmp_path / "bogus.ts"
    bogus.write_bytes(b"not a model")
    with pytest.raises(BrainsegError, match="not a loadable TorchScript model"):
        predict(bogus, root, tmp_path / "out1", show_progress=False)

    corrupt = truncate_half(root / folder.name / f"{folder.name}_3.tif")
    proc = run_cli(["predict", model_ts, root, tmp_path / "out2"])
    assert proc.returncode == 1
    err = unwrap(proc.stderr)
    assert str(corrupt) in err
    assert "error:" in err
