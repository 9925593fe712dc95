"""``brainseg cv`` on a synthetic root: folds, resumability, summary, post-processing chosen on
validation only, the fold ensemble in one model.ts, and that file in a clean process."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import patient_stack, run_cli, run_without_package, unwrap

from brainseg_dist.metrics import bootstrap_ci

TINY_CV = ["--folds", "3", "--epochs", "4", "--image-size", "32", "--base-width", "4",
           "--batch-size", "8", "--lr", "0.01", "--set", "train.num_overlays=0"]


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    values = np.random.default_rng(0).uniform(0.5, 1.0, 40)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert (lo, hi) == tuple(bootstrap_ci(values))
    # The interval of the mean shrinks like 1/sqrt(n).
    lo4, hi4 = bootstrap_ci(np.tile(values, 4))
    assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.2)
    assert all(np.isnan(bootstrap_ci(values[:1])))


@pytest.fixture(scope="module")
def cv_run(synth_root, tmp_path_factory):
    """The folds trained as 2 concurrent ``--fold K`` jobs (``--jobs``), then evaluated here;
    the rerun test below goes through the sequential path."""
    out = tmp_path_factory.mktemp("cv") / "cv"
    proc = run_cli(["cv", "--data-dir", synth_root, "--output-dir", out, *TINY_CV,
                    "--jobs", "2"], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.mark.slow
def test_cv_summary_tests_every_patient_once(cv_run, synth_root):
    out, proc = cv_run
    summary = json.loads((out / "cv_summary.json").read_text())
    for key in ("patients", "dice_patient_mean", "dice_patient_median", "dice_patient_ci95"):
        assert key in summary, key
    assert summary["patients"] == 8
    assert summary["folds"] == 3
    table = pd.read_csv(out / "cv_per_patient.csv")
    assert sorted(table["patient"]) == sorted(p.name[:12] for p in synth_root.iterdir()
                                               if p.is_dir())
    plan = json.loads((out / "cv_plan.json").read_text())
    for split in plan["splits"]:
        fold = table[table["fold"] == split["fold"]]
        assert sorted(fold["patient"]) == sorted(split["test"])
        chosen = json.loads((out / f"fold_{split['fold']}" / "postprocessing.json").read_text())
        # Chosen on the fold's inner validation patients, never on its test patients.
        assert str(split["val"]) in chosen["chosen_on"]
        assert not set(split["test"]) & set(split["val"]) | set(split["train"]) & set(
            split["test"])
    post = summary["variants"]["post-processed"]
    assert post["dice_patient_mean"] == pytest.approx(table["dice_post-processed"].mean())
    assert post["dice_patient_median"] == pytest.approx(table["dice_post-processed"].median())
    lo, hi = summary["dice_patient_ci95"]
    assert lo <= summary["dice_patient_mean"] <= hi
    assert (out / "dice_per_patient.png").stat().st_size > 1000
    assert "NaN" not in (out / "cv_summary.json").read_text()
    assert "headline (post-processed)" in proc.stdout + proc.stderr
    html = (out / "report.html").read_text()  # the page itself: tests/test_report.py
    assert html.count('<div class="strip">') == 8
    assert all(p in html for p in table["patient"])
    assert "Training curves, fold 2" in html


@pytest.mark.slow
def test_cv_summary_table_and_fold_configs(cv_run, capsys):
    """The console table of the summary; each fold trains in its own directory, no export."""
    from brainseg_dist import rundir
    from brainseg_dist.config import load_config
    from brainseg_dist.cv import fold_config
    from brainseg_dist.tables import print_cv_summary

    out, _ = cv_run
    summary = json.loads((out / rundir.CV_SUMMARY).read_text())
    print_cv_summary(summary, out)
    err = capsys.readouterr().err
    assert "3-fold cross-validation" in err
    assert "95% CI of the mean" in err
    cfg = fold_config(load_config(out / "fold_0" / rundir.CONFIG), out, 2)
    assert cfg.train.output_dir == str(rundir.fold_dir(out, 2))
    assert cfg.train.export is False


@pytest.mark.slow
def test_compare_reads_a_real_cv_output(cv_run):
    """``brainseg compare`` on what ``brainseg cv`` wrote (test_compare.py checks the numbers on
    hand-made directories): the same run twice differs by nothing, key by key."""
    from brainseg_dist.compare import compare_runs

    out, _ = cv_run
    c = compare_runs([out, out])
    comp = c["comparisons"][0]
    assert c["patients"] == 8
    assert c["headline"] == "post-processed"
    assert set(comp["paired"]) == {"plain", "post-processed"}
    assert comp["same_folds"]
    assert comp["config_changes"] == {}
    assert all(p["mean"] == 0.0 and p["unchanged"] == 8 for p in comp["paired"].values())


def test_cv_rerun_skips_finished_folds_and_refuses_another_plan(cv_run, synth_root,
                                                               tmp_path):
    out, _ = cv_run
    before = (out / "fold_0" / "best.pt").read_bytes()
    again = run_cli(["cv", "--data-dir", synth_root, "--output-dir", out, *TINY_CV],
                    timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (again.stdout + again.stderr).count("finished, skipped") == 3
    assert "already evaluated" in again.stdout + again.stderr  # not evaluated a second time
    assert (out / "fold_0" / "best.pt").read_bytes() == before
    other = run_cli(["cv", "--data-dir", synth_root, "--output-dir", out,
                     *TINY_CV[:1], "4", *TINY_CV[2:]])
    assert other.returncode == 1
    assert "folds=3" in other.stdout + other.stderr
    copy = shutil.copytree(synth_root, tmp_path / "copy" / "kaggle_3m")
    elsewhere = run_cli(["cv", "--data-dir", copy, "--output-dir", out, *TINY_CV])
    assert elsewhere.returncode == 1
    assert "existing cross-validation is of" in elsewhere.stdout + elsewhere.stderr
    assert "Traceback" not in other.stderr
    resplit = run_cli(["cv", "--data-dir", synth_root, "--output-dir", out, *TINY_CV,
                       "--split-seed", "5"])
    assert resplit.returncode == 1
    assert "seed=0, this call 5" in resplit.stdout + resplit.stderr


def test_split_seed_keeps_the_folds_while_the_training_seed_changes(synth_root):
    from brainseg_dist.config import load_config
    from brainseg_dist.cv import make_plan

    def plan(seed, split_seed=None):
        cfg = load_config(None, {"data.data_dir": str(synth_root), "data.image_size": 32,
                                 "train.seed": seed})
        return make_plan(cfg, 3, 0.2, split_seed)

    first, reseeded = plan(0), plan(1, split_seed=0)
    assert reseeded["splits"] == first["splits"]
    assert reseeded["seed"] == 0
    assert reseeded["config_hash"] != first["config_hash"]  # the training seed is in the hash
    assert plan(1)["splits"] != first["splits"]  # without it the seed moves the folds


@pytest.fixture(scope="module")
def ensemble_ts(cv_run):
    out, _ = cv_run
    proc = run_cli(["export", out, "--no-pt2"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fold ensemble of 3 folds" in proc.stdout + proc.stderr
    return out / "model.ts"


@pytest.mark.slow
def test_ensemble_model_ts_in_a_clean_process_equals_evaluate(cv_run, ensemble_ts, synth_root,
                                                             tmp_path):
    """model.ts loaded without brainseg_dist: its segment() masks give exactly the pixel
    counts `brainseg evaluate` reports for the ensemble, and equal the eager masks."""
    from brainseg_dist.ensemble import build_ensemble

    out, _ = cv_run
    evaluation = run_cli(["evaluate", out, "--data-dir", synth_root, "--out",
                          tmp_path / "eval"], timeout=600)
    assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
    table = pd.read_csv(tmp_path / "eval" / "per_patient.csv").set_index("patient")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["headline"] == "post-processed"
    script = f"""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
            model = torch.jit.load({str(ensemble_ts)!r})
        result, masks = {{}}, {{}}
        for folder in sorted(p for p in Path({str(synth_root)!r}).iterdir() if p.is_dir()):
            images = sorted((p for p in folder.glob("*.tif") if not p.name.endswith("_mask.tif")),
                            key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            x = torch.from_numpy(np.stack([tifffile.imread(p) for p in images])).permute(0, 3, 1, 2)
            with torch.no_grad():
                pred = model.segment(x)[:, 0].numpy().astype(bool)
            gt = np.stack([tifffile.imread(str(p)[:-4] + "_mask.tif") > 0 for p in images])
            result[folder.name[:12]] = {{"intersection": int((pred & gt).sum()),
                                         "pred_pixels": int(pred.sum())}}
            masks[folder.name[:12]] = pred
        np.savez("masks.npz", **masks)
        print(json.dumps(result))
    """
    proc = run_without_package(script, tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    clean = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(clean) == set(table.index)
    for patient, row in clean.items():
        assert table.loc[patient, "pred_pixels"] == row["pred_pixels"], patient
        assert table.loc[patient, "intersection"] == row["intersection"], patient
    eager, _ = build_ensemble(out)
    differing = 0
    with np.load(tmp_path / "masks.npz") as z:
        for patient in z.files:
            x = patient_stack(next(p for p in synth_root.iterdir() if p.name.startswith(patient)))
            with torch.no_grad():
                masks = eager.segment(x)[:, 0].numpy().astype(bool)
            differing += int((masks != z[patient]).sum())
    assert differing == 0


@pytest.mark.slow
def test_predict_with_the_ensemble_applies_its_postprocessing(cv_run, ensemble_ts, synth_root,
                                                              tmp_path):
    from brainseg_dist.ensemble import build_ensemble

    out, _ = cv_run
    folder = sorted(p for p in synth_root.iterdir() if p.is_dir())[0]
    proc = run_cli(["predict", ensemble_ts, folder, tmp_path / "pred", "--no-overlays"],
                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    volume = pd.read_csv(tmp_path / "pred" / "tumour_volume.csv")
    x = patient_stack(folder)
    eager, _ = build_ensemble(out)
    with torch.no_grad():
        expected = int(eager.segment(x).sum())
    assert int(volume["tumour_pixels"].iloc[0]) == expected


@pytest.mark.parametrize(("args", "named"), [
    (["--folds", "1"], "--folds"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--fold", "-1"], "--fold"),
    (["--folds", "9"], "9 folds"),  # 8 synthetic patients
    (["--folds", "3", "--fold", "3"], "--fold 3"),
    (["--split-seed", "-1"], "--split-seed"),  # the range train.seed allows
    (["--jobs", "0"], "--jobs"),
    (["--jobs", "2", "--fold", "1"], "--jobs 2 with --fold 1"),
])
def test_cv_bad_arguments_get_one_clear_line(synth_root, tmp_path, args, named):
    proc = run_cli(["cv", "--data-dir", synth_root, "--output-dir", tmp_path / "cv",
                    "--image-size", "32", "--base-width", "4", "--epochs", "1", *args])
    assert proc.returncode in (1, 2), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert named in proc.stdout + proc.stderr
    assert not (tmp_path / "cv" / "fold_0").exists()
    if named.startswith("--"):  # refused before anything was written
        assert not (tmp_path / "cv").exists()


@pytest.mark.slow
def test_a_fold_trained_as_a_job_equals_the_fold_trained_in_the_call(cv_run, synth_root,
                                                                      tmp_path):
    """``--jobs`` only moves where a fold trains: its job loads the call's config from
    jobs/config.yaml and trains bit for bit what ``--fold 0`` trains in the calling process
    (1 thread each: the job's share of this process's one)."""
    from brainseg_dist.config import load_config
    from brainseg_dist.cv import run_cv

    out, proc = cv_run
    text = proc.stdout + proc.stderr
    assert "training 3 fold(s) as 2 concurrent jobs" in text
    assert text.count("finished in") == 3
    logs = [(out / "jobs" / f"fold_{k}.log").read_text() for k in range(3)]
    assert all("best val per-patient Dice" in log for log in logs)
    assert not any("evaluated" in log for log in logs)  # the jobs train; the call evaluates
    options = dict(zip(TINY_CV[::2], TINY_CV[1::2], strict=True))
    cfg = load_config(None, {"data.data_dir": str(synth_root), "train.output_dir": str(tmp_path),
                             "train.epochs": 4, "data.image_size": 32, "model.base_width": 4,
                             "train.batch_size": 8, "optim.lr": 0.01,
                             "train.num_overlays": 0})
    assert options["--folds"] == "3"
    assert load_config(out / "jobs" / "config.yaml").hash() == cfg.hash()
    assert run_cv(cfg, tmp_path, folds=3, only_fold=0) is None
    job = torch.load(out / "fold_0" / "best.pt", weights_only=True)["model"]
    here = torch.load(tmp_path / "fold_0" / "best.pt", weights_only=True)["model"]
    assert job.keys() == here.keys()
    assert all(torch.equal(job[k], here[k]) for k in job)


@pytest.mark.slow
def test_a_failed_job_is_named_in_one_line_and_the_other_folds_finish(synth_root, tmp_path):
    """A fold whose ``last.pt`` is damaged fails in its job; the call names the fold, the
    job's own one-line error and its log, exits 1, and the other folds still train."""
    out = tmp_path / "cv"
    (out / "fold_1").mkdir(parents=True)
    (out / "fold_1" / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_cli(["cv", "--data-dir", synth_root, "--output-dir", out, *TINY_CV,
                    "--epochs", "1", "--jobs", "2"], timeout=900)  # the later --epochs wins
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    error = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error) == 1, text
    assert "fold 2/3 failed (exit status 1)" in error[0]
    assert "last.pt: unreadable checkpoint" in error[0]
    assert str(out / "jobs" / "fold_1.log") in unwrap(error[0])
    assert (out / "fold_0" / "fold_done.json").is_file()
    assert (out / "fold_2" / "fold_done.json").is_file()
    assert not (out / "cv_summary.json").exists()


def test_job_env_shares_threads_and_deals_gpus_round_robin(monkeypatch):
    from brainseg_dist.cv.jobs import job_env

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    env = job_env(0, 3, on_cuda=False, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "BRAINSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "2"}
    assert job_env(1, 16, on_cuda=False, base={})["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = [job_env(slot, 4, on_cuda=True, base={"CUDA_VISIBLE_DEVICES": "3,5"})
               ["CUDA_VISIBLE_DEVICES"] for slot in range(4)]
    assert devices == ["3", "5", "3", "5"]
    assert job_env(1, 2, on_cuda=True, base={})["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in job_env(1, 2, on_cuda=False, base={})


def test_jobs_are_refused_under_a_distributed_launch(synth_root, tmp_path, monkeypatch):
    import brainseg_dist.cv as cv
    from brainseg_dist.config import load_config
    from brainseg_dist.errors import BrainsegError

    monkeypatch.setattr(cv, "_num_processes", lambda: 2)
    cfg = load_config(None, {"data.data_dir": str(synth_root)})
    with pytest.raises(BrainsegError, match=r"--jobs 2: .*distributed launch"):
        cv.run_cv(cfg, tmp_path / "cv", folds=3, jobs=2)
    assert not (tmp_path / "cv").exists()


@pytest.mark.slow
def test_sigterm_to_the_call_stops_its_jobs(synth_root, tmp_path):
    """A scheduler's cancel or ``kill`` reaches the call, not its jobs: the call stops them
    before it exits (143), so no fold trains on unwatched; each resumes from last.pt."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cv"
    args = [*TINY_CV, "--epochs", "200"]  # the later --epochs wins: long enough to interrupt
    env = {**os.environ, "BRAINSEG_NO_PROGRESS": "1"}
    call = subprocess.Popen([sys.executable, "-m", "brainseg_dist.cli", "cv", "--data-dir",
                             str(synth_root), "--output-dir", str(out), *args, "--jobs", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [out / f"fold_{k}" / "metrics.jsonl" for k in (0, 1)]

    def epochs() -> list[int]:
        return [len(p.read_text().splitlines()) if p.is_file() else 0 for p in metrics]

    deadline = time.monotonic() + 300
    while min(epochs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert min(epochs()) >= 2, "the jobs did not start training"
    call.send_signal(signal.SIGTERM)
    assert call.wait(timeout=60) == 128 + signal.SIGTERM
    stopped = epochs()
    time.sleep(5)
    assert epochs() == stopped  # no job is still training
    assert all((p.parent / "last.pt").is_file() for p in metrics)
    assert max(stopped) < 200
