"""``brainseg compare``: paired per-patient differences between CV runs, checked against
numpy on hand-made CV directories (a real ``brainseg cv`` output is compared in test_cv)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import PNG_SIGNATURE, run_cli

from brainseg_dist.compare import TIE, compare_runs, load_cv_run
from brainseg_dist.errors import BrainsegError

PATIENTS = [f"TCGA_XX_{i:04d}" for i in range(12)]
FOLDS = [PATIENTS[i::3] for i in range(3)]


def make_cv_dir(path, plain, post, config=None, patients=PATIENTS):
    """The files of a finished ``brainseg cv`` that a comparison reads."""
    (path / "fold_0").mkdir(parents=True)
    fold = {p: k for k, test in enumerate(FOLDS) for p in test}
    pd.DataFrame({"patient": patients, "fold": [fold.get(p, 0) for p in patients],
                  "dice_plain": plain, "dice_post-processed": post}).to_csv(
        path / "cv_per_patient.csv", index=False)
    variants = {v: {"dice_patient_mean": float(np.mean(d)),
                    "dice_patient_median": float(np.median(d)),
                    "dice_patient_ci95": [0.0, 1.0]}
                for v, d in (("plain", plain), ("post-processed", post))}
    (path / "cv_summary.json").write_text(json.dumps(
        {"headline": "post-processed", "variants": variants}))
    (path / "cv_plan.json").write_text(json.dumps(
        {"splits": [{"train": [], "val": [], "test": t} for t in FOLDS]}))
    base = {"train": {"epochs": 30, "output_dir": str(path / "fold_0"), "seed": 0},
            "optim": {"lr": 0.001}}
    for key, value in (config or {}).items():
        section, name = key.split(".")
        base.setdefault(section, {})[name] = value
    (path / "fold_0" / "config.yaml").write_text(yaml.safe_dump(base))
    return path


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(3)
    plain_a = rng.uniform(0.5, 0.9, len(PATIENTS))
    post_a = plain_a + 0.01
    gain = rng.normal(0.03, 0.02, len(PATIENTS))
    gain[0] = 0.0  # one patient unchanged
    a = make_cv_dir(tmp_path / "a", plain_a, post_a)
    b = make_cv_dir(tmp_path / "b", plain_a + gain, post_a + gain,
                    config={"train.epochs": 40})
    return a, b, gain


def test_paired_difference_matches_numpy(two_runs):
    a, b, gain = two_runs
    c = compare_runs([a, b])
    comp = c["comparisons"][0]
    assert c["reference"] == str(a)
    assert comp["same_folds"]
    for variant in ("plain", "post-processed"):
        p = comp["paired"][variant]
        assert p["mean"] == pytest.approx(gain.mean(), abs=1e-12)
        assert p["median"] == pytest.approx(np.median(gain), abs=1e-12)
        assert p["better"] == int((gain > TIE).sum())
        assert p["worse"] == int((gain < -TIE).sum())
        assert p["unchanged"] == 1
        assert p["better"] + p["worse"] + p["unchanged"] == len(PATIENTS)
        lo, hi = p["ci95"]
        assert lo < gain.mean() < hi
        # Paired: the CI of the difference is narrower than the spread between patients.
        assert hi - lo < np.std(list(c["per_patient"][str(a)][variant].values()))
        assert p["largest_gain"] == [PATIENTS[int(np.argmax(gain))],
                                     pytest.approx(gain.max(), abs=1e-12)]
        assert p["largest_loss"][1] == pytest.approx(gain.min(), abs=1e-12)
    # Only the recipe key that changed, not where each run lived.
    assert comp["config_changes"] == {"train.epochs": [30, 40]}


def test_a_run_against_itself_changes_nothing(two_runs):
    a, _, _ = two_runs
    p = compare_runs([a, a])["comparisons"][0]
    assert p["config_changes"] == {}
    assert p["paired"]["plain"]["mean"] == 0.0
    assert p["paired"]["plain"]["unchanged"] == len(PATIENTS)


def test_different_folds_are_reported(two_runs, tmp_path):
    a, b, _ = two_runs
    plan = json.loads((b / "cv_plan.json").read_text())
    plan["splits"][0]["test"], plan["splits"][1]["test"] = FOLDS[1], FOLDS[0][:-1] + FOLDS[2]
    (b / "cv_plan.json").write_text(json.dumps(plan))
    assert not compare_runs([a, b])["comparisons"][0]["same_folds"]


def test_other_patients_or_missing_files_are_one_clear_error(two_runs, tmp_path):
    a, _, _ = two_runs
    other = make_cv_dir(tmp_path / "other", np.full(11, 0.8), np.full(11, 0.8),
                        patients=PATIENTS[:-1])
    with pytest.raises(BrainsegError, match=rf"{other}: tested other patients than {a} "
                                            rf"\(1 differ, e.g. {PATIENTS[-1]} only in {a}\)"):
        compare_runs([a, other])
    with pytest.raises(BrainsegError, match="at least two"):
        compare_runs([a])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(BrainsegError, match=r"unfinished/cv_summary\.json: summary of a "
                                            r"finished `brainseg cv` run not found"):
        load_cv_run(tmp_path / "unfinished")
    (a / "cv_per_patient.csv").write_text("no,table\n1,2\n")
    with pytest.raises(BrainsegError, match=r"cv_per_patient\.csv: unreadable"):
        load_cv_run(a)


def test_cli_prints_tables_and_writes_json_and_figure(two_runs, tmp_path):
    a, b, gain = two_runs
    out = tmp_path / "cmp"
    proc = run_cli(["compare", a, b, "--json", out / "c.json", "--figure", out / "c.png"])
    assert proc.returncode == 0, proc.stderr
    printed = proc.stderr  # the console writes to stderr, as every command's does
    assert f"{gain.mean():+.3f} [" in printed
    assert "train.epochs 30 → 40" in printed
    assert "selects on these patients" in printed
    saved = json.loads((out / "c.json").read_text())
    assert saved["per_patient"][str(b)]["plain"][PATIENTS[3]] == pytest.approx(
        float(pd.read_csv(b / "cv_per_patient.csv").set_index("patient")
              .loc[PATIENTS[3], "dice_plain"]))
    assert (out / "c.png").read_bytes().startswith(PNG_SIGNATURE)

    bad = run_cli(["compare", a, tmp_path / "nowhere"])
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "nowhere: not a directory" in bad.stderr


def test_pool_seeds_averages_each_recipe_over_its_seeds(tmp_path):
    rng = np.random.default_rng(5)
    dice = {name: rng.uniform(0.4, 0.9, len(PATIENTS)) for name in ("a0", "a1", "b0", "b1")}
    recipe = {"a0": {}, "a1": {"train.seed": 1, "train.log_every": 5},  # speed: still pooled
              "b0": {"train.epochs": 40},
              "b1": {"train.epochs": 40, "train.seed": 1, "optim.implementation": "fused"}}
    dirs = [make_cv_dir(tmp_path / n, dice[n], dice[n] + 0.01, config=recipe[n])
            for n in ("a0", "b0", "a1", "b1")]  # seeds interleaved: grouped by recipe
    c = compare_runs(dirs, pool=True)
    a, b = f"{dirs[0]} + {dirs[2]}", f"{dirs[1]} + {dirs[3]}"
    assert c["reference"] == a
    assert list(c["runs"]) == [a, b]
    pooled_a, pooled_b = (dice["a0"] + dice["a1"]) / 2, (dice["b0"] + dice["b1"]) / 2
    assert c["runs"][a]["plain"]["dice_patient_mean"] == pytest.approx(pooled_a.mean())
    (comp,) = c["comparisons"]
    assert comp["run"] == b
    assert comp["config_changes"] == {"train.epochs": [30, 40]}  # the seeds [0, 1] both
    assert comp["paired"]["plain"]["mean"] == pytest.approx((pooled_b - pooled_a).mean())
    spread = {(s["reference"], s["run"]): s["paired"]["plain"]["mean"]
              for s in c["seed_spread"]}
    assert spread == {(str(dirs[0]), str(dirs[2])): pytest.approx((dice["a1"] - dice["a0"]).mean()),
                      (str(dirs[1]), str(dirs[3])): pytest.approx((dice["b1"] - dice["b0"]).mean())}
    assert "seed_spread" not in compare_runs(dirs)  # unpooled: each run against the first
    with pytest.raises(BrainsegError, match="every run is one recipe"):
        compare_runs([dirs[0], dirs[2]], pool=True)
    proc = run_cli(["compare", "--pool-seeds", *dirs])
    assert proc.returncode == 0, proc.stderr
    assert "seed spread" in proc.stderr
    assert f"{(pooled_b - pooled_a).mean():+.3f} [" in proc.stderr


def test_keys_a_saved_run_lacks_count_as_their_old_behaviour(two_runs, tmp_path):
    a, _, _ = two_runs  # its config.yaml predates augment.fused and train.compile_mode
    plain = pd.read_csv(a / "cv_per_patient.csv")["dice_plain"].to_numpy()
    same = make_cv_dir(tmp_path / "same", plain, plain,
                       config={"augment.fused": False, "train.compile_mode": "default",
                               "model.norm": "batch"})
    fused = make_cv_dir(tmp_path / "fused", plain, plain, config={"augment.fused": True})
    changes = [c["config_changes"] for c in compare_runs([a, same, fused])["comparisons"]]
    assert changes == [{}, {"augment.fused": [False, True]}]
    assert len(compare_runs([a, same, fused], pool=True)["runs"]) == 2  # a and same pooled
