"""Evaluation of the synthetic trained run: summary and per-patient metrics against an
independent numpy recomputation from the native masks and model.ts outputs; split choice;
figures; the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from helpers import PNG_SIGNATURE, run_cli, unwrap

from brainseg_dist.errors import BrainsegError
from brainseg_dist.evaluate import VARIANTS, evaluate_run, headline_name, select_patients
from brainseg_dist.pipeline import load_torchscript


@pytest.fixture(scope="module")
def other_root(trained_run, tmp_path_factory):
    """Another dataset root holding copies of three of the run's training patients."""
    root = trained_run / "synthetic" / "kaggle_3m"
    train = set(json.loads((trained_run / "split.json").read_text())["train"])
    dst = tmp_path_factory.mktemp("other") / "kaggle_3m"
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name[:12] in train][:3]
    for folder in folders:
        shutil.copytree(folder, dst / folder.name)
    return dst


@pytest.fixture(scope="module")
def evaluated(trained_run, other_root, tmp_path_factory):
    """``--data-dir`` another root, no ``--split``: every patient of that root."""
    out = tmp_path_factory.mktemp("eval") / "eval_other"
    return evaluate_run(trained_run, data_dir=other_root, out=out, show_progress=False)


@pytest.fixture(scope="module")
def independent(trained_model_ts, other_root):
    """Per-patient results recomputed with numpy from the native tifs and model.ts alone."""
    module, meta = load_torchscript(trained_model_ts)
    root = other_root
    rows = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        n = len(list(folder.glob("*_mask.tif")))
        images = np.stack([tifffile.imread(folder / f"{folder.name}_{i}.tif")
                           for i in range(1, n + 1)])
        truth = np.stack([tifffile.imread(folder / f"{folder.name}_{i}_mask.tif")
                          for i in range(1, n + 1)]) > 0
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        with torch.no_grad():
            p = module(x)[:, 0].numpy()
            p_flip = module(x.flip(-1))[:, 0].flip(-1).numpy()
        rows["_".join(folder.name.split("_")[:3])] = {
            "truth": truth, "plain": p > meta["threshold"],
            "tta": (p + p_flip) / 2 > meta["threshold"]}
    return rows


def np_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else 2 * (pred & truth).sum() / denom


def test_per_patient_dice_matches_independent_recomputation(evaluated, independent):
    summary = json.loads((evaluated.out / "summary.json").read_text())
    table = pd.read_csv(evaluated.out / "per_patient.csv")
    assert set(summary["variants"]["plain"]["per_patient"]) == set(independent)
    assert summary["patients"] == len(table) == len(independent) == 3
    assert summary["split"] == "all"  # the default for another root
    for patient, r in independent.items():
        row = table[table["patient"] == patient].iloc[0]
        for variant in ("plain", "tta"):
            expected = np_dice(r[variant], r["truth"])
            got = summary["variants"][variant]["per_patient"][patient]
            assert got == pytest.approx(expected, abs=1e-6), (patient, variant)
            assert row[f"dice_{variant}"] == pytest.approx(expected, abs=1e-6)
        assert row["dice"] == pytest.approx(row["dice_plain"])  # headline is plain
        assert row["gt_pixels"] == r["truth"].sum()
        assert row["pred_pixels"] == r["plain"].sum()
        assert row["slices"] == len(r["truth"])
        assert row["tumour_slices"] == r["truth"].any(axis=(1, 2)).sum()


def test_summary_statistics_match_recomputation(evaluated, independent):
    summary = json.loads((evaluated.out / "summary.json").read_text())
    assert set(summary["variants"]) == set(VARIANTS)
    assert summary["headline"] == "plain"
    dice = np.array([np_dice(r["plain"], r["truth"]) for r in independent.values()])
    head = summary["variants"]["plain"]["patient_dice"]
    assert head["mean"] == pytest.approx(dice.mean(), abs=1e-6)
    assert head["median"] == pytest.approx(np.median(dice), abs=1e-6)
    assert head["sd"] == pytest.approx(dice.std(ddof=1), abs=1e-6)
    assert summary["headline_metrics"] == head
    # slice level, pooled over every slice of every patient
    pred = np.concatenate([r["plain"] for r in independent.values()])
    truth = np.concatenate([r["truth"] for r in independent.values()])
    gt_pos, pred_pos = truth.any(axis=(1, 2)), pred.any(axis=(1, 2))
    sl = summary["variants"]["plain"]["slice"]
    dg = summary["variants"]["plain"]["diagnosis"]
    assert sl["slices"] == len(pred)
    assert sl["tumour_slices"] == gt_pos.sum()
    fp_rate = (pred_pos & ~gt_pos).sum() / (~gt_pos).sum()
    assert sl["fp_rate_empty_slices"] == pytest.approx(fp_rate)
    per_slice = [np_dice(p, t) for p, t in zip(pred[gt_pos], truth[gt_pos], strict=True)]
    assert sl["dice_tumour_slices"] == pytest.approx(np.mean(per_slice), abs=1e-9)
    inter = (pred & truth).sum()
    assert sl["iou"] == pytest.approx(inter / (pred | truth).sum())
    if pred.sum():
        assert sl["precision"] == pytest.approx(inter / pred.sum())
    assert sl["recall"] == pytest.approx(inter / truth.sum())
    assert (dg["tp"], dg["fn"], dg["fp"], dg["tn"]) == (
        (gt_pos & pred_pos).sum(), (gt_pos & ~pred_pos).sum(),
        (~gt_pos & pred_pos).sum(), (~gt_pos & ~pred_pos).sum())
    both = gt_pos & pred_pos
    assert sl["hd95_slices"] == both.sum()
    if both.sum() == 0:
        assert sl["hd95_mean"] is None  # NaN is written as null
    for v in VARIANTS:  # LCC never adds pixels, so never adds false-positive slices
        lcc = summary["variants"][v]["diagnosis"]
        base = summary["variants"][v.replace("+lcc", "").replace("lcc", "plain")]["diagnosis"]
        assert lcc["fp"] <= base["fp"]


def test_outputs_and_figures(evaluated):
    names = {p.name for p in evaluated.out.iterdir()}
    assert {"per_patient.csv", "summary.json", "dice_per_patient.png", "overlays_best.png",
            "overlays_median.png", "overlays_worst.png", "training_curves.png"} <= names
    for name in names:
        if name.endswith(".png"):
            assert (evaluated.out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert not [n for n in names if n.endswith(".tmp")]
    text = (evaluated.out / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON
    columns = pd.read_csv(evaluated.out / "per_patient.csv").columns
    for c in ("patient", "slices", "tumour_slices", "dice", "gt_pixels", "pred_pixels",
              "hd95_mean", "dice_tta", "dice_lcc", "dice_tta+lcc"):
        assert c in columns, c


def test_split_selection(trained_run, other_root, tmp_path):
    from brainseg_dist.data.scan import list_slices

    root = trained_run / "synthetic" / "kaggle_3m"
    table, _ = list_slices(root)
    split = json.loads((trained_run / "split.json").read_text())
    assert select_patients(table, trained_run, "test", root) == split["test"]
    assert select_patients(table, trained_run, "val", root) == split["val"]
    assert len(select_patients(table, trained_run, "all", root)) == 8
    # a part of the split with no patient in another root is an error naming the way out
    with pytest.raises(BrainsegError, match="use --split all"):
        evaluate_run(trained_run, split="test", data_dir=other_root, out=tmp_path / "e",
                     show_progress=False)
    with pytest.raises(BrainsegError, match="--split bogus"):
        evaluate_run(trained_run, split="bogus", out=tmp_path / "e", show_progress=False)
    assert headline_name(False, True) == "lcc"
    assert headline_name(True, True) == "tta+lcc"


def test_cli_evaluate_default_test_split(trained_run, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli(["evaluate", trained_run, "--out", out, "--tta"])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert summary["split"] == "test"
    assert summary["headline"] == "tta"
    assert sorted(summary["variants"]["tta"]["per_patient"]) == sorted(split["test"])
    err = unwrap(proc.stderr)
    assert "patient Dice mean" in err  # the rich table
    assert "tta *" in err


def test_console_table_names_every_variant_and_the_headline(evaluated, capsys):
    from brainseg_dist.tables import print_eval_summary

    print_eval_summary(evaluated.summary, evaluated.out)
    err = unwrap(capsys.readouterr().err)
    for variant in evaluated.summary["variants"]:
        assert variant in err
    assert f"headline ({evaluated.summary['headline']})" in err
    assert str(evaluated.out) in err
