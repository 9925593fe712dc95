"""Patient-level splits: disjoint, complete, seeded and stratified by tumour burden."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainseg_dist.data.split import (
    PARTS,
    check_disjoint,
    load_split,
    make_split,
    patient_burden,
    save_split,
)
from brainseg_dist.errors import BrainsegError

PATIENTS = [f"TCGA_XX_{i:04d}" for i in range(1, 21)]


@pytest.fixture
def burden20() -> pd.Series:
    """20 fake patients with burdens 1..20 (listed in a scrambled order)."""
    order = [7, 19, 2, 14, 11, 0, 5, 17, 9, 3, 16, 12, 1, 8, 18, 4, 13, 6, 10, 15]
    return pd.Series([i + 1 for i in order], index=[PATIENTS[i] for i in order])


def _parts(split):
    return [set(split[p]) for p in PARTS]


def _assert_partition(split, patients):
    train, val, test = _parts(split)
    assert not train & val
    assert not train & test
    assert not val & test
    assert train | val | test == set(patients)
    assert sum(len(split[p]) for p in PARTS) == len(set(patients))


def test_patient_burden(synth_data):
    burden = patient_burden(synth_data.table)
    assert list(burden.index) == synth_data.patients
    for patient, total in burden.items():
        rows = synth_data.table[synth_data.table["patient"] == patient]
        assert total == rows["tumour_pixels"].sum()
    assert (burden > 0).all()


def test_default_split_on_synthetic_table(synth_data):
    burden = patient_burden(synth_data.table)
    split = make_split(burden)
    _assert_partition(split, synth_data.patients)
    # 8 patients: 15% -> round(1.2) = 1 for val and test, the rest (6) for training
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (6, 1, 1)
    assert split["val_fraction"] == 0.15
    assert split["test_fraction"] == 0.15
    assert split["seed"] == 0
    assert split["folds"] == 0
    assert split["stratified_by"] == "tumour_pixels"
    for part in PARTS:
        assert split[part] == sorted(split[part])
    # subsets keep slices of one patient together (no slice-level leakage)
    sub = synth_data.subset(split["test"])
    assert set(sub.table["patient"]) == set(split["test"])
    assert len(sub) == int(synth_data.table["patient"].isin(split["test"]).sum())


def test_default_split_is_70_15_15(burden20):
    split = make_split(burden20)
    _assert_partition(split, PATIENTS)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (14, 3, 3)


def test_custom_fractions(burden20):
    split = make_split(burden20, val_fraction=0.1, test_fraction=0.25)
    _assert_partition(split, PATIENTS)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (13, 2, 5)
    no_test = make_split(burden20, test_fraction=0.0)
    assert no_test["test"] == []
    _assert_partition(no_test, PATIENTS)


def test_seeded_determinism(burden20):
    a = make_split(burden20, seed=3)
    b = make_split(burden20, seed=3)
    assert a == b
    c = make_split(burden20, seed=4)
    assert (a["train"], a["val"], a["test"]) != (c["train"], c["val"], c["test"])
    # across seeds the held-out patients vary
    tests = {tuple(make_split(burden20, seed=s)["test"]) for s in range(10)}
    assert len(tests) > 3


def test_split_does_not_depend_on_input_order(burden20):
    shuffled = burden20.sample(frac=1, random_state=1)
    assert list(shuffled.index) != list(burden20.index)
    a, b = make_split(burden20, seed=5), make_split(shuffled, seed=5)
    _assert_partition(b, PATIENTS)
    # same burdens, no ties: ranking is the same, so the stratified picks are the same
    assert (a["train"], a["val"], a["test"]) == (b["train"], b["val"], b["test"])


@pytest.mark.parametrize("seed", range(8))
def test_test_and_val_span_the_burden_range(burden20, seed):
    split = make_split(burden20, seed=seed)
    test_burdens = sorted(int(burden20[p]) for p in split["test"])
    # 3 strata of the ranked patients: one pick from each of 1-7, 8-14, 15-20
    assert test_burdens[0] <= 7
    assert 8 <= test_burdens[1] <= 14
    assert test_burdens[2] >= 15
    val_burdens = sorted(int(burden20[p]) for p in split["val"])
    assert val_burdens[0] <= 8
    assert val_burdens[-1] >= 13


@pytest.mark.parametrize("seed", [0, 1])
def test_kfold(burden20, seed):
    folds = 5
    splits = [make_split(burden20, seed=seed, folds=folds, fold=f) for f in range(folds)]
    tests = {tuple(s["test"]) for s in splits}
    assert len(tests) == 1, "the test part must be identical across folds"
    test = set(splits[0]["test"])
    assert len(test) == 3
    vals = [set(s["val"]) for s in splits]
    for i in range(folds):
        _assert_partition(splits[i], PATIENTS)
        assert splits[i]["fold"] == i
        assert splits[i]["folds"] == folds
        for j in range(i + 1, folds):
            assert not vals[i] & vals[j]
    assert set().union(*vals) | test == set(PATIENTS)
    assert not set().union(*vals) & test
    sizes = [len(v) for v in vals]
    assert sum(sizes) == 17
    assert max(sizes) - min(sizes) <= 1
    # each training part is everything except its own val and the common test
    for s, v in zip(splits, vals, strict=True):
        assert set(s["train"]) == set(PATIENTS) - v - test


def test_bad_arguments(burden20):
    with pytest.raises(ValueError, match="bad split fractions"):
        make_split(burden20, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="bad split fractions"):
        make_split(burden20, val_fraction=-0.1)
    with pytest.raises(ValueError, match="fold 5 out of range for 5 folds"):
        make_split(burden20, folds=5, fold=5)


def test_check_disjoint():
    check_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    with pytest.raises(AssertionError, match="patient b is in both train and test"):
        check_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["b"]})
    with pytest.raises(AssertionError, match="patient c is in both val and test"):
        check_disjoint({"train": [], "val": ["c"], "test": ["c"]})


def test_save_load_round_trip(burden20, tmp_path):
    split = make_split(burden20, seed=2, folds=5, fold=3)
    path = save_split(split, tmp_path / "sub" / "split.json")
    assert path == tmp_path / "sub" / "split.json"
    assert load_split(path) == split
    assert json.loads(path.read_text())["test"] == split["test"]
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]


def test_save_and_load_refuse_overlap(tmp_path):
    bad = {"train": ["a"], "val": ["a"], "test": []}
    with pytest.raises(AssertionError):
        save_split(bad, tmp_path / "split.json")
    assert not (tmp_path / "split.json").exists()
    (tmp_path / "leaky.json").write_text(json.dumps(bad))
    # A leaky file on disk is a damaged input (named), not an internal error.
    with pytest.raises(BrainsegError, match=r"leaky\.json: damaged split file .*patient a"):
        load_split(tmp_path / "leaky.json")


def test_cv_splits_test_every_patient_once_and_never_train_on_it():
    from brainseg_dist.data.split import make_cv_splits

    burden = pd.Series(np.arange(23) * 100, index=[f"P{i:02d}" for i in range(23)])
    splits = make_cv_splits(burden, folds=5, val_fraction=0.2, seed=3)
    tested = [p for s in splits for p in s["test"]]
    assert sorted(tested) == sorted(burden.index)  # each patient exactly once
    for s in splits:
        check_disjoint(s)
        assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(burden.index)
        assert 4 <= len(s["test"]) <= 5
        assert len(s["val"]) == round(0.2 * (23 - len(s["test"])))
        # Burden-stratified: patients are dealt out in blocks of 5 by burden, so a fold
        # tests one patient of each full block.
        blocks = sorted(int(p[1:]) // 5 for p in s["test"])
        assert blocks[:4] == [0, 1, 2, 3]
    again = make_cv_splits(burden, folds=5, val_fraction=0.2, seed=3)
    assert again == splits
    assert make_cv_splits(burden, folds=5, val_fraction=0.2, seed=4) != splits


def test_cv_splits_reject_more_folds_than_patients():
    from brainseg_dist.data.split import make_cv_splits

    burden = pd.Series([1, 2, 3], index=["a", "b", "c"])
    with pytest.raises(ValueError, match="4 folds"):
        make_cv_splits(burden, folds=4)
