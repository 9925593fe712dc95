"""``brainseg score``: predicted masks against ground truth, for NIfTI volumes and kaggle_3m
slices, checked against numpy, a brute-force HD95 and ``brainseg evaluate``."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import PNG_SIGNATURE, copy_patients, run_cli

from brainseg_dist.errors import BrainsegError
from brainseg_dist.metrics import hd95_3d
from brainseg_dist.score import score_folders

SPACING = (0.9, 0.9, 3.0)
AFFINE = np.diag([*SPACING, 1.0])


def blob(shape, centre, radius):
    """A voxel-space ellipsoid, spacing-aware (round in mm)."""
    grid = np.indices(shape).astype(float)
    d = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING, radius,
                                                         strict=True))
    return d <= 1.0


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine), str(path))


def brute_hd95(a, b, spacing):
    """Surface voxels by a 6-neighbour erosion in numpy, every pair's distance, np.percentile."""
    def surface(m):
        p = np.pad(m, 1)
        eroded = p[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                eroded &= np.roll(p, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~eroded) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_3d_matches_brute_force_in_mm():
    a = blob((24, 24, 10), (11, 12, 4), (7, 6, 9))
    b = blob((24, 24, 10), (13, 11, 5), (6, 7, 7))
    assert hd95_3d(a, b, SPACING) == pytest.approx(brute_hd95(a, b, SPACING), abs=1e-5)
    assert hd95_3d(a, a, SPACING) == pytest.approx(0.0, abs=1e-5)  # cdist: float error
    assert np.isnan(hd95_3d(a, np.zeros_like(a), SPACING))


@pytest.fixture
def nifti_cases(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    shape = (32, 32, 12)
    t1 = blob(shape, (15, 15, 6), (8, 7, 12))
    p1 = blob(shape, (17, 15, 6), (8, 8, 10))
    save(truth / "case_a.nii.gz", t1.astype(np.uint8) * 2)  # label 2: any non-zero is tumour
    save(pred / "case_a_seg.nii.gz", p1)
    save(truth / "case_b_seg.nii.gz", np.zeros(shape))  # nnU-Net-style names either way
    save(pred / "case_b.nii.gz", np.zeros(shape))
    return pred, truth, t1, p1


def test_nifti_cases_against_numpy(nifti_cases):
    pred, truth, t1, p1 = nifti_cases
    table, s = score_folders(pred, truth, show_progress=False)
    rows = table.set_index("case")
    inter = (t1 & p1).sum()
    assert rows.loc["case_a", "dice"] == pytest.approx(2 * inter / (t1.sum() + p1.sum()))
    assert rows.loc["case_a", "precision"] == pytest.approx(inter / p1.sum())
    assert rows.loc["case_a", "recall"] == pytest.approx(inter / t1.sum())
    voxel = float(np.prod(SPACING))
    assert rows.loc["case_a", "truth_volume"] == pytest.approx(t1.sum() * voxel)
    assert rows.loc["case_a", "pred_volume"] == pytest.approx(p1.sum() * voxel)
    assert rows.loc["case_a", "hd95"] == pytest.approx(brute_hd95(p1, t1, SPACING), abs=1e-5)
    assert rows.loc["case_b", "dice"] == 1.0  # both empty
    assert np.isnan(rows.loc["case_b", "hd95"])
    assert list(table["case"]) == ["case_a", "case_b"]  # worst first
    assert s["cases"] == 2
    assert s["dice_mean"] == pytest.approx((rows.loc["case_a", "dice"] + 1) / 2)
    assert s["units"] == {"volume": "mm³", "hd95": "mm (3D)"}


def test_nifti_problems_are_one_clear_error(nifti_cases, tmp_path):
    pred, truth, t1, _ = nifti_cases
    save(pred / "case_a_seg.nii.gz", t1, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(BrainsegError, match=r"case_a_seg\.nii\.gz: voxel grid differs from "
                                            r".*case_a\.nii\.gz"):
        score_folders(pred, truth, show_progress=False)
    (pred / "case_b.nii.gz").unlink()
    with pytest.raises(BrainsegError, match=r"case_b_seg\.nii\.gz: missing prediction for a "
                                            r"truth mask \(1 missing in"):
        score_folders(pred, truth, show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BrainsegError, match="no ground truth found"):
        score_folders(pred, empty, show_progress=False)


def test_tif_cases_against_numpy(synth_root, tmp_path):
    truth = tmp_path / "truth"
    names = copy_patients(synth_root, truth, 3)
    pred = tmp_path / "pred"
    expected = {}
    for k, name in enumerate(names):
        inter = p_sum = t_sum = 0
        for mask_path in sorted((truth / name).glob("*_mask.tif")):
            t = tifffile.imread(mask_path) > 0
            # patient 0 exact, 1 shifted by 3 pixels, 2 nothing predicted
            p = t if k == 0 else (np.roll(t, 3, axis=1) if k == 1 else np.zeros_like(t))
            (pred / name).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(pred / name / mask_path.name, p.astype(np.uint8) * 255)
            inter, p_sum, t_sum = inter + (p & t).sum(), p_sum + p.sum(), t_sum + t.sum()
        expected[name] = 2 * inter / (p_sum + t_sum)
    table, s = score_folders(pred, truth, show_progress=False)
    got = table.set_index("case")["dice"].to_dict()
    assert got == pytest.approx(expected)
    assert got[names[0]] == 1.0
    assert got[names[2]] == 0.0
    assert s["cases_below_0.5"] == 1
    assert s["units"]["volume"] == "pixels"
    # One patient folder against predict's output folder for it: one case, named after it.
    one, _ = score_folders(pred / names[1], truth / names[1], show_progress=False)
    assert list(one["case"]) == [names[1]]
    assert one["dice"][0] == pytest.approx(expected[names[1]])


def test_cli_writes_table_summary_and_figure(nifti_cases, tmp_path):
    pred, truth, _, _ = nifti_cases
    out = tmp_path / "out"
    proc = run_cli(["score", pred, truth, "--csv", out / "c.csv", "--json", out / "s.json",
                    "--figure", out / "f.png"])
    assert proc.returncode == 0, proc.stderr
    assert "2 case(s) (nifti)" in proc.stderr
    assert list(pd.read_csv(out / "c.csv")["case"]) == ["case_a", "case_b"]
    assert json.loads((out / "s.json").read_text())["cases"] == 2
    assert (out / "f.png").read_bytes().startswith(PNG_SIGNATURE)
    shutil.rmtree(pred)
    bad = run_cli(["score", pred, truth])
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert f"{pred}: PRED not found" in bad.stderr


@pytest.mark.slow
def test_score_of_predict_output_equals_evaluate(trained_run, trained_model_ts, tmp_path):
    """``brainseg predict`` then ``brainseg score`` gives each patient the 3D Dice that
    ``brainseg evaluate`` reports for the same model and patients (plain variant)."""
    root = tmp_path / "root"
    copy_patients(trained_run / "synthetic" / "kaggle_3m", root, 3)
    pred = tmp_path / "pred"
    proc = run_cli(["predict", trained_model_ts, root, pred, "--no-overlays"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    table, _ = score_folders(pred, root, show_progress=False)
    proc = run_cli(["evaluate", trained_run, "--data-dir", root, "--split", "all",
                    "--out", tmp_path / "eval"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    evaluated = pd.read_csv(tmp_path / "eval" / "per_patient.csv")
    assert len(evaluated) == 3
    scored = dict(zip(table["case"], table["dice"], strict=True))
    for row in evaluated.itertuples():
        folder = next(c for c in scored if c.startswith(row.patient))
        assert scored[folder] == pytest.approx(row.dice_plain, abs=1e-9), row.patient
