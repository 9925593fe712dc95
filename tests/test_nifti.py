"""``brainseg predict`` on NIfTI: reorientation, per-volume percentile scaling, the mask back on
the input's grid, mm³ volumes, and one clear line for bad volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers import patient_stack, run_cli, tree_hashes, unwrap

from brainseg_dist.errors import BrainsegError
from brainseg_dist.nifti import find_cases, percentile_scale
from brainseg_dist.predict import predict

# A RAS+ grid: 0.94 mm in-plane, 5 mm slices, off-centre origin (a typical converted FLAIR).
AFFINE = np.array([[0.94, 0, 0, -120.0], [0, 0.94, 0, -110.0], [0, 0, 5.0, -40.0],
                   [0, 0, 0, 1]])
SCALE = 7.3  # raw scanner units: the percentile scaling must undo it


def to_ras(stack: np.ndarray) -> np.ndarray:
    """kaggle_3m layout ``N×H×W`` ([slice S, row P, column L]) -> RAS array ``[x, y, z]``."""
    return stack.transpose(2, 1, 0)[::-1, ::-1, :]


def write_volume(path, data, affine=AFFINE, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


def nifti_case(folder, out_dir, channels=(0, 1, 2), nnunet=True):
    """The patient folder's tif stack as NIfTI volumes in scanner units on :data:`AFFINE`."""
    stack = patient_stack(folder).numpy()  # N×3×H×W uint8
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in channels:
        name = f"case_{c:04d}.nii.gz" if nnunet else f"{['pre', 'flair', 'post'][c]}.nii.gz"
        paths[c] = write_volume(out_dir / name, to_ras(stack[:, c]) * SCALE)
    return stack, paths


@pytest.fixture(scope="module")
def patient(trained_run):
    src = trained_run / "synthetic" / "kaggle_3m"
    return max((p for p in src.iterdir() if p.is_dir()),
               key=lambda p: (len(list(p.glob("*_mask.tif"))), p.name))


@pytest.fixture(scope="module")
def tif_masks(trained_model_ts, patient, tmp_path_factory):
    """The tif path's predicted masks of the patient, ``N×H×W`` bool."""
    out = tmp_path_factory.mktemp("tifpred") / "out"
    r = predict(trained_model_ts, patient, out, show_progress=False, overlays=False)
    import tifffile

    return np.stack([tifffile.imread(p) > 0 for p in r.area["mask_path"]])


def test_percentile_scale_puts_the_peak_at_100():
    rng = np.random.default_rng(0)
    vol = np.zeros((60, 60, 10))
    vol[5:55, 5:55] = rng.integers(1, 4, (50, 50, 10))  # background noise: the largest mode
    vol[15:45, 15:45] = 600.0  # the tissue peak
    vol[20:30, 20:30, 2:8] = rng.uniform(300, 2500, (10, 10, 6))  # bright tumour
    vol[vol == 0] = -3.0  # a negative background is clipped to 0 first
    out = percentile_scale(vol)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0
    assert out[16, 16, 0] == 100  # the tissue mode lands on grey level 100
    assert (out[20:30, 20:30, 2:8] == 255).any()  # above 2.55× the peak: saturated
    assert percentile_scale(np.zeros((4, 4, 4))).max() == 0


def test_nnunet_case_equals_tif_path(trained_model_ts, patient, tif_masks, tmp_path):
    _, paths = nifti_case(patient, tmp_path / "in")
    r = predict(trained_model_ts, paths[1], tmp_path / "out", show_progress=False)
    assert r.kind == "nifti"
    seg_path = tmp_path / "out" / "case_seg.nii.gz"
    seg, given = nib.load(str(seg_path)), nib.load(str(paths[1]))
    np.testing.assert_array_equal(seg.affine, given.affine)  # the input's, exactly
    np.testing.assert_allclose(seg.affine, AFFINE, atol=1e-6)  # (stored as float32)
    assert seg.header["sform_code"] == given.header["sform_code"] == 1
    assert seg.get_data_dtype() == np.uint8
    data = np.asarray(seg.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    expected = to_ras(tif_masks.astype(np.uint8))
    assert data.shape == expected.shape
    differing = int((data != expected).sum())
    assert differing <= 0.01 * data.size, differing
    assert expected.sum() > 0  # the comparison covers tumour, not only background
    vol = pd.read_csv(tmp_path / "out" / "tumour_volume.csv")
    assert vol["case"].tolist() == ["case"]
    assert vol["tumour_voxels"].iloc[0] == int(data.sum())
    assert vol["volume_mm3"].iloc[0] == pytest.approx(data.sum() * 0.94 * 0.94 * 5.0)
    area = pd.read_csv(tmp_path / "out" / "tumour_area.csv")
    assert area["area_mm2"].sum() == pytest.approx(data.sum() * 0.94 * 0.94)


def test_flair_only_and_explicit_options_via_cli(trained_model_ts, patient, tmp_path):
    _, paths = nifti_case(patient, tmp_path / "in", nnunet=False)
    flair_only = run_cli(["predict", trained_model_ts, paths[1], tmp_path / "a"])
    assert flair_only.returncode == 0, flair_only.stderr
    assert (tmp_path / "a" / "flair_seg.nii.gz").is_file()
    vol = pd.read_csv(tmp_path / "a" / "tumour_volume.csv")
    assert vol["channels"].tolist() == ["flair"]
    three = run_cli(["predict", trained_model_ts, "--pre", paths[0], "--flair", paths[1],
                     "--post", paths[2], tmp_path / "b"])
    assert three.returncode == 0, three.stderr
    assert "mm³" in three.stderr
    vol = pd.read_csv(tmp_path / "b" / "tumour_volume.csv")
    assert vol["channels"].tolist() == ["pre+flair+post"]


def test_reoriented_input_gives_the_same_mask(trained_model_ts, patient, tmp_path):
    """The same volume stored LPS with axes swapped: masks equal voxel for voxel in space."""
    _, paths = nifti_case(patient, tmp_path / "ras", channels=(1,))
    ras = nib.load(str(paths[1]))
    lps = ras.as_reoriented(np.array([[1, -1], [0, -1], [2, 1]]))  # y, x swapped and flipped
    (tmp_path / "lps").mkdir()
    write_volume(tmp_path / "lps" / "x.nii.gz", np.asarray(lps.dataobj), lps.affine)
    a = predict(trained_model_ts, paths[1], tmp_path / "o1", show_progress=False)
    b = predict(trained_model_ts, tmp_path / "lps" / "x.nii.gz", tmp_path / "o2",
                show_progress=False)
    seg_a = nib.load(str(tmp_path / "o1" / "case_seg.nii.gz"))
    seg_b = nib.load(str(tmp_path / "o2" / "x_seg.nii.gz"))
    np.testing.assert_allclose(seg_b.affine, lps.affine)
    back = seg_b.as_reoriented(np.array([[1, -1], [0, -1], [2, 1]]))  # involution here
    np.testing.assert_allclose(back.affine, seg_a.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(seg_a.dataobj))
    assert a.volume["volume_mm3"].iloc[0] == pytest.approx(b.volume["volume_mm3"].iloc[0])


BAD = {
    "4d": "4D image",
    "shape": "differs from the FLAIR volume's",
    "affine": "affine differs from the FLAIR volume's",
    "not_nifti": "not a readable NIfTI file",
}


@pytest.mark.parametrize("fault", list(BAD))
def test_bad_volumes_one_clear_line(trained_model_ts, tmp_path, fault):
    flair = write_volume(tmp_path / "c_0001.nii.gz", np.ones((16, 16, 4)) * 100)
    other = tmp_path / "c_0000.nii.gz"
    if fault == "4d":
        bad = write_volume(tmp_path / "c_0001.nii.gz", np.ones((16, 16, 4, 2)))
    elif fault == "shape":
        bad = write_volume(other, np.ones((16, 16, 5)))
    elif fault == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 2.0
        bad = write_volume(other, np.ones((16, 16, 4)), shifted)
    else:
        bad = other
        bad.write_bytes(b"this is not a NIfTI file" * 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tumour_area.csv").write_text("earlier predictions\n")
    before = tree_hashes(out)
    proc = run_cli(["predict", trained_model_ts, flair, out])
    err = unwrap(proc.stderr)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert str(bad) in err
    assert BAD[fault] in err
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert tree_hashes(out) == before  # nothing half-written


def test_input_option_errors(tmp_path):
    flair = write_volume(tmp_path / "f.nii.gz", np.ones((8, 8, 2)))
    with pytest.raises(BrainsegError, match="not both"):
        find_cases(flair, flair=flair)
    with pytest.raises(BrainsegError, match="--pre file not found"):
        find_cases(None, pre=tmp_path / "missing.nii.gz", flair=flair)
    write_volume(tmp_path / "d_0000.nii.gz", np.ones((8, 8, 2)))
    with pytest.raises(BrainsegError, match="FLAIR is required"):
        find_cases(tmp_path / "d_0000.nii.gz")
    assert find_cases(tmp_path / "nothing.tif") is None


@pytest.mark.real_data
def test_real_patient_as_nifti_equals_tif_path(real_root, trained_model_ts, tmp_path):
    """A real patient written as NIfTI (known affine, scanner-like units) through predict."""
    folder = sorted(p for p in real_root.iterdir() if p.is_dir())[0]
    stack, paths = nifti_case(folder, tmp_path / "in")
    tif = predict(trained_model_ts, folder, tmp_path / "tif", show_progress=False,
                  overlays=False)
    import tifffile

    tif_masks = np.stack([tifffile.imread(p) > 0 for p in tif.area["mask_path"]])
    predict(trained_model_ts, paths[1], tmp_path / "nii", show_progress=False)
    seg = nib.load(str(tmp_path / "nii" / "case_seg.nii.gz"))
    np.testing.assert_array_equal(seg.affine, nib.load(str(paths[1])).affine)
    data = np.asarray(seg.dataobj)
    expected = to_ras(tif_masks.astype(np.uint8))
    differing = int((data != expected).sum())
    print(f"\nreal {folder.name}: {differing} of {data.size} voxels differ "
          f"({differing / data.size:.4%}); tumour voxels tif {int(expected.sum())}, "
          f"nifti {int(data.sum())}")
    assert differing <= 0.01 * data.size
    # on the tifs the mapping is linear up to clipping (what slice z-scoring does not undo)
    for c in range(3):
        original = stack[:, c].astype(float)
        remapped = percentile_scale(original * SCALE).astype(float)
        r = np.corrcoef(original.ravel(), remapped.ravel())[0, 1]
        saturated = float((remapped == 255).mean())
        print(f"channel {c}: correlation {r:.4f}, saturated {saturated:.2%}")
        assert r > 0.98
        assert saturated < 0.03
