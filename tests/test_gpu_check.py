"""``benchmarks/gpu_check.sh`` (the prepared GPU verification) in its CPU mode, its time budget,
and ``benchmarks/gpu_cv.py``'s data and fold records. The one CPU-mode run is also the end-to-end
test of ``throughput.py`` and ``step_ops.py``. Apart from test_benchmarks.py so that the slowest
file of benchmark tests is not one unit for pytest-xdist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, positive

from brainseg_dist.train.setup import resolve_mixed_precision


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One ``benchmarks/gpu_check.sh --cpu --overwrite`` run over an earlier run's leftovers:
    its output directory and log. Its throughput.json and step_ops.json are the
    benchmarks' own end-to-end tests too (each script run once per suite, not twice)."""
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "out"
    (out / "partial").mkdir(parents=True)  # an earlier run's leftovers, replaced on --overwrite
    (out / "partial" / "train.json").write_text("{}")
    (out / "throughput.json").write_text("{}")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--overwrite"],
        cwd=base, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=600, check=False)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-2000:] + log[-4000:]
    return out, log


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step(cpu_check, tmp_path):
    """``benchmarks/gpu_check.sh --cpu``: the GPU verification's steps, tiny, on the CPU (the
    checks with their CPU stand-ins, throughput --tiny, one epoch of lgg_unet128 shrunk)."""
    out, _ = cpu_check
    assert sorted(p.name for p in out.iterdir()) == [  # all that comes back from a GPU run
        "checks.json", "cv.json", "gpu_check.json", "gpu_check.log", "step_ops.json",
        "throughput.json", "train.json"]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["all_checks_ok"]
    assert set(summary["checks"]) == {"bf16_autocast", "channels_last", "kornia_on_device",
                                      "device_batches", "no_host_sync", "no_host_sync_fused",
                                      "compiled_augment_draws"}
    assert {name: s["exit_status"] for name, s in summary["steps"].items()} == {
        "kornia": 0, "checks": 0, "throughput": 0, "train": 0, "step_ops": 0, "cv": 0}
    # gpu_cv.py: two recipes cross-validated at training seed 1, the second paired with the
    # first (the same folds: seed 0's).
    assert summary["cv"]["seed"] == 1
    cv = summary["cv"]["recipes"]
    assert list(cv) == ["lgg_unet128", "instance_norm"]
    assert all(0 <= r["headline"]["dice_patient_mean"] <= 1 for r in cv.values())
    assert cv["lgg_unet128"]["paired_mean"] is None
    assert isinstance(cv["instance_norm"]["paired_mean"], float)
    report = json.loads((out / "cv.json").read_text())["recipes"]["instance_norm"]
    assert len(report["per_patient"]) == 4
    assert report["paired_against_first"]["same_folds"]
    for r in cv.values():  # --tiny: 2 folds of 2 epochs each
        assert r["folds_finished"] == 2
        assert 0 < r["slowest_fold_training_seconds"] < r["seconds"]
    calls = summary["host_calls_per_step"]
    assert calls["optim.implementation: fused"]["optimizer"] <= 2
    assert calls["as configured"]["total"] > calls["optim.implementation: fused"]["total"]
    for row in calls.values():  # timed on a CPU; kernel time and launches only on CUDA
        assert positive(row["wall_ms"])
        assert row["device_ms"] is row["kernel_launches"] is None
    # Nothing is compiled in --cpu mode (and train.compile leaves a CPU's augmentation eager).
    assert summary["criteria"].pop("augment_share_of_compiled_step")["value"] is None
    for name, c in summary["criteria"].items():
        assert positive(c["value"]), name
        assert isinstance(c["met"], bool), name
    train = summary["train"]
    assert positive(train["train_images_per_second"][0])
    assert positive(train["peak_rss_gb"])
    assert json.loads((out / "throughput.json").read_text())["train"]

    # A second run refuses to touch the first one's results, or a killed run's partial/,
    # unless --overwrite says so.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    killed = tmp_path / "killed"
    (killed / "partial").mkdir(parents=True)
    for out_dir, present in ((out, "gpu_check.json"), (killed, "partial")):
        proc = subprocess.run(
            ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=tmp_path,
            env={**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{out_dir / present} is left by an earlier run: pass --overwrite" in proc.stderr
    assert [p.name for p in killed.iterdir()] == ["partial"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


PIPELINE_KEYS = ("images_per_s", "median_step_s", "mean_images_per_s", "best_images_per_s",
                 "speedup_vs_baseline")
ABLATIONS = ("no_device_augment", "no_channels_last", "amp_toggled", "data_toggled",
             "sync_per_step", "adam_toggled")


@pytest.mark.slow
def test_throughput_tiny_writes_every_ratio(cpu_check):
    """``benchmarks/throughput.py --tiny`` as gpu_check.sh runs it on a CPU: every section of
    the JSON it documents, and its rich table."""
    out, log = cpu_check
    assert "Training throughput" in log  # the rich table is always printed
    res = json.loads((out / "throughput.json").read_text())
    assert res["schema"] == 1
    assert res["settings"]["mode"] == "tiny"
    hw = res["hardware"]
    assert hw["cpu_amx"] == (resolve_mixed_precision("auto", "cpu") == "bf16")
    for key in ("device_name", "cpu_model", "cpu_cores_usable", "torch_threads", "torch",
                "kornia", "accelerate"):
        assert hw[key], key

    data = res["data"]
    assert data["source"] == "synthetic"
    assert data["slices"] > 0
    assert data["patients_from_cache"] == data["patients"]  # the second load hit the cache
    for key in ("cold_slices_per_s", "cached_slices_per_s", "cache_speedup"):
        assert positive(data[key]), key

    train = res["train"]
    assert train["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert train["baseline"]["channels_last"] is False
    assert train["baseline"]["mixed_precision"] == "no"
    assert train["project"]["channels_last"] is True
    # The project default on this CPU: bf16 with AMX, else off; the ablation toggles it.
    cpu_amp = resolve_mixed_precision("auto", "cpu")
    assert train["project"]["mixed_precision"] == cpu_amp
    for name in ("baseline", "project"):
        for key in PIPELINE_KEYS:
            assert positive(train[name][key]), (name, key)
    assert set(train["ablations"]) == set(ABLATIONS)
    for name, r in train["ablations"].items():
        for key in (*PIPELINE_KEYS, "ratio_vs_project", "ratio_vs_project_best",
                    "project_choice_gain", "speedup_vs_baseline_best"):
            assert positive(r[key]), (name, key)
        assert r["ratio_vs_project"] * r["project_choice_gain"] == pytest.approx(1.0)
    assert train["ablations"]["amp_toggled"]["mixed_precision"] == {"no": "bf16",
                                                                     "bf16": "no"}[cpu_amp]
    assert train["ablations"]["no_channels_last"]["channels_last"] is False
    assert (train["project"]["adam"], train["ablations"]["adam_toggled"]["adam"]) == (
        "torch", "fused")  # on a CPU; fused is the project's choice on CUDA
    assert train["baseline"]["adam"] == "torch"
    assert train["project"]["loader"] == "uint8 in-memory DataLoader, 0 workers"  # CPU default
    assert train["ablations"]["data_toggled"]["loader"] == "uint8 held on the device"
    assert set(train["baseline_workers"]) == {"1", "2"}
    assert positive(train["baseline_sweep"]["baseline_workers_1"]["images_per_s"])
    for name, r in train["ablations"].items():
        assert positive(r["round_median_ratio_vs_project"]), name

    aug = res["augment"]
    for key in ("normalize_ms", "augment_ms", "augment_share_of_step", "input_share_of_step"):
        assert positive(aug[key]), key
    assert set(aug["ops_ms"]) == {"RandomHorizontalFlip", "RandomRotation",
                                  "RandomElasticTransform"}

    loader = res["loader"]
    assert loader["project_data_on_device"] is False
    for key in ("project_loader_images_per_s", "input_pipeline_images_per_s",
                "baseline_loader_images_per_s", "loader_over_train",
                "other_data_path_images_per_s"):
        assert positive(loader[key]), key
    assert isinstance(loader["loader_is_bottleneck"], bool)

    inf = res["inference"]
    for b in ("1", "32"):
        row = inf[f"batch_{b}"]
        assert {"eager", "torchscript"} <= set(row)
        for name, r in row.items():
            assert positive(r["median_latency_ms"]), (b, name)
            assert positive(r["over_eager"]), (b, name)
        assert positive(inf["torchscript_over_eager"][b])
    assert inf["compile"]["status"] == "unavailable"
    assert "skipped" in inf["compile"]["reason"]

    # 1 against 2 gloo processes (skipped on one GPU: nothing to scale to).
    sc = res["scaling"]
    assert sc["status"] == "ok", sc
    assert sc["backend"] == "gloo"
    assert [r["processes"] for r in sc["runs"]] == [1, 2]
    assert [r["global_batch"] for r in sc["runs"]] == [8, 16]
    for r in sc["runs"]:
        assert positive(r["images_per_s"])
        assert positive(r["efficiency"])
    assert sc["runs"][0]["speedup_vs_1"] == pytest.approx(1.0)
    assert res["summary"]["scaling"]["processes"] == 2
    summary = res["summary"]
    assert positive(summary["project_speedup_vs_baseline"])
    assert positive(summary["loader_over_train"])
    for key in ("sync_free_gain", "data_toggled_ratio_vs_project", "augment_share_of_step",
                "project_speedup_vs_best_baseline", "project_speedup_vs_sustained_baseline"):
        assert positive(summary[key]), key
    assert summary["baseline_sustained_images_per_s"] == min(
        train["baseline"]["images_per_s"], loader["baseline_loader_images_per_s"])
    assert set(summary["round_medians"]) == {"project_speedup_vs_baseline", *(
        f"{name}_ratio_vs_project" for name in ABLATIONS)}
    assert set(summary["round_medians_cpu_time"]) == {  # workers' CPU time is not measured
        f"{name}_ratio_vs_project" for name in ABLATIONS if name != "no_device_augment"}
    assert isinstance(summary["project_defaults_slower_than_alternative"], list)
    assert isinstance(res["warnings"], list)




@pytest.mark.slow
def test_step_ops_counts_every_variant(cpu_check):
    """``benchmarks/step_ops.py`` as gpu_check.sh runs it: one row per variant, phases adding
    up to the total, Adam's implementations ordered by their host calls."""
    out, log = cpu_check
    rows = {r["variant"]: r for r in json.loads((out / "step_ops.json").read_text())}
    assert len(rows) == 11
    for row in rows.values():
        assert row["total"] == sum(row[p] for p in ("inputs", "augment", "forward", "loss",
                                                    "tracker", "backward", "optimizer", "ema"))
    assert rows["optim.implementation: fused"]["optimizer"] <= 2
    assert (rows["optim.implementation: fused"]["optimizer"]
            < rows["Adam foreach (torch's choice on CUDA)"]["optimizer"]
            < rows["optim.implementation: torch"]["optimizer"])  # a for-loop on a CPU
    assert "Adam foreach" in log
    # Each variant is reported (and written) as it finishes: a step stopped at its limit
    # keeps the rows it measured.
    assert sum(line.startswith("step_ops: ") for line in log.splitlines()) == len(rows)
    casts = (rows["train.mixed_precision: bf16"]["forward"]
             - rows["train.mixed_precision: no"]["forward"])
    assert casts > 0  # autocast's casts
    # InstanceNorm2d reshapes around batch_norm and leaves channels-last: more calls than
    # GroupNorm with one group per channel, the same function.
    assert (rows["model.norm: instance"]["total"] > rows["model.norm: group"]["total"]
            > rows["model.norm: batch"]["total"])


def test_gpu_check_skips_the_steps_its_budget_cannot_hold(tmp_path):
    """GPU_CHECK_BUDGET bounds the whole run (580 s on a GPU, inside the device tool's 600 s
    call): a step gets what is left of it, and none starts with under 10 s left."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "12"},
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1  # a skipped step is not a passed one
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["steps"] == {name: {"skipped": "out of budget"} for name in
                                ("kornia", "checks", "throughput", "train", "step_ops", "cv")}
    assert summary["all_checks_ok"] is False  # skipped for want of time: not passed
    assert "checks: skipped" in (out / "gpu_check.log").read_text()


def test_gpu_check_only_runs_the_steps_it_names(tmp_path):
    """GPU_CHECK_ONLY reruns some steps (kornia is always installed): the others are recorded
    as not selected. An unknown step name is one line and exit status 2, before any step."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    script = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"]
    bad = subprocess.run(script, cwd=tmp_path, env={**env, "GPU_CHECK_ONLY": "train,step-ops"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gpu_check: GPU_CHECK_ONLY: unknown step 'step-ops'")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    proc = subprocess.run(script, cwd=tmp_path, env={**env, "GPU_CHECK_ONLY": "kornia"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["all_checks_ok"] is None  # not run: neither passed nor failed
    steps = summary["steps"]
    assert steps.pop("kornia")["exit_status"] == 0
    assert steps == {name: {"skipped": "not in GPU_CHECK_ONLY"} for name in
                     ("checks", "throughput", "train", "step_ops", "cv")}


def test_gpu_cv_unpacks_the_carried_archive_to_a_kaggle_3m_root(real_root, tmp_path):
    """The GPU machine gets the real subset as its archive in .data/: ``gpu_cv.py`` unpacks it
    (with tarfile's data filter) to the kaggle_3m root that ``brainseg cv`` reads; a missing
    archive is one line and exit status 2."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_cv
    from conftest import DEFAULT_ARCHIVE

    archive = Path(os.environ.get("BRAINSEG_LGG_ARCHIVE") or DEFAULT_ARCHIVE)
    root, what = gpu_cv.data_root(argparse.Namespace(archive=archive, synthetic=None), tmp_path)
    assert what == f"real: {archive.name}"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        p.name for p in real_root.iterdir() if p.is_dir())
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_cv.py"), "--archive",
                           str(tmp_path / "none.tar.xz"), "--json", str(tmp_path / "cv.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"gpu_cv: {tmp_path / 'none.tar.xz'}: no such archive "
                                   "(carry it: see gpu_check.sh)")
    assert not (tmp_path / "cv.json").exists()


def test_gpu_cv_fold_progress_keeps_what_a_stopped_recipe_trained(tmp_path):
    """A recipe stopped at the deadline still reports its folds: epochs done, the last inner
    validation Dice and images/s; training seconds only for a finished fold."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_cv

    row = {"epoch": 0, "val_dice_patient_mean": 0.5, "train_images_per_second": 900.0}
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "metrics.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "epoch": 1, "val_dice_patient_mean": 0.7})
        + "\n")
    (tmp_path / "fold_0" / "fold_done.json").write_text(json.dumps({"seconds": 12.5}))
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert gpu_cv.fold_progress(tmp_path, 3) == [
        {"fold": 0, "epochs": 2, "finished": True, "seconds": 12.5,
         "val_dice_patient_mean": 0.7, "train_images_per_second": 900.0},
        {"fold": 1, "epochs": 1, "finished": False, "seconds": None,
         "val_dice_patient_mean": 0.5, "train_images_per_second": 900.0},
        {"fold": 2, "epochs": 0, "finished": False, "seconds": None,
         "val_dice_patient_mean": None, "train_images_per_second": None}]


def _cv_report(path, seed, dice, folds=(0, 0, 1, 1)):
    """A gpu_cv.py report: ``dice`` maps a recipe to post-processed Dice of patients a..d
    (plain Dice 0.1 lower); ``seed`` None leaves the key out, as older reports do."""
    report = {"recipes": {name: {"per_patient": [
        {"patient": p, "fold": f, "dice_post-processed": d, "dice_plain": d - 0.1}
        for p, f, d in zip("abcd", folds, values, strict=True)][::-1]}  # any patient order
        for name, values in dice.items()}}
    report["recipes"]["stopped"] = {"skipped": "10 s left"}  # no table: left out
    if seed is not None:
        report["seed"] = seed
    path.write_text(json.dumps(report))
    return path


def test_gpu_cv_pool_averages_seeds_and_pairs_recipes(tmp_path, capsys):
    """``benchmarks/gpu_cv_pool.py`` is ``brainseg compare --pool-seeds`` of the reports:
    each recipe's per-patient Dice averaged over its seeds, every recipe paired with the
    reference on those averages, a recipe's later seeds paired with its first; reports on
    other folds, or a recipe and seed twice, are one line and exit 2."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_cv_pool

    seed0 = _cv_report(tmp_path / "s0.json", None, {"in": [0.6, 0.7, 0.8, 0.5],
                                                    "bn": [0.5, 0.7, 0.9, 0.3]})
    seed1 = _cv_report(tmp_path / "s1.json", 1, {"bn": [0.7, 0.9, 0.9, 0.1]})
    out = tmp_path / "pooled.json"
    assert gpu_cv_pool.main([str(seed0), str(seed1), "--reference", "bn",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    bn, other = "bn (seed 0) + bn (seed 1)", "in (seed 0)"
    assert result["reference"] == bn  # first, though the reports list it second
    assert list(result["runs"]) == [bn, other]
    assert result["runs"][bn]["post-processed"]["dice_patient_mean"] == pytest.approx(0.625)
    assert result["runs"][bn]["plain"]["dice_patient_mean"] == pytest.approx(0.525)
    (comparison,) = result["comparisons"]
    assert comparison["run"] == other
    assert comparison["same_folds"]
    pair = comparison["paired"]["post-processed"]  # on (0.6, 0.8, 0.9, 0.2)
    assert pair["mean"] == pytest.approx(0.025)  # (0, -0.1, -0.1, +0.3) / 4
    assert (pair["better"], pair["worse"]) == (1, 2)
    assert pair["largest_gain"] == ["d", pytest.approx(0.3)]
    (spread,) = result["seed_spread"]
    assert (spread["reference"], spread["run"]) == ("bn (seed 0)", "bn (seed 1)")
    assert spread["paired"]["post-processed"]["mean"] == pytest.approx(0.05)  # (+.2,+.2,0,-.2)

    moved = _cv_report(tmp_path / "moved.json", 2, {"bn": [0.5] * 4}, folds=(1, 0, 1, 1))
    capsys.readouterr()
    for reports, message in (
            ([seed0, moved], "bn (seed 2) tested other patients or folds than in (seed 0): "
                             "no pairing"),
            ([seed0, seed0], f"{seed0}: recipe 'in' at seed 0 is in an earlier report too")):
        assert gpu_cv_pool.main([*map(str, reports), "--reference", "bn"]) == 2
        said = capsys.readouterr()
        assert said.err == f"gpu_cv_pool: {message}\n"
        assert said.out == ""


def test_gpu_cv_pool_pools_the_same_function_under_one_name(tmp_path, capsys):
    """``--same group_norm=instance_norm``: seed 1 of group_norm pools with seed 0 of
    instance_norm as one recipe; a malformed pair is one line and exit 2."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_cv_pool

    seed0 = _cv_report(tmp_path / "s0.json", 0, {"bn": [0.5] * 4, "in": [0.6, 0.7, 0.8, 0.5]})
    seed1 = _cv_report(tmp_path / "s1.json", 1, {"bn": [0.5] * 4, "gn": [0.8, 0.7, 0.6, 0.5]})
    out = tmp_path / "pooled.json"
    assert gpu_cv_pool.main([str(seed0), str(seed1), "--reference", "bn", "--same", "gn=in",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    pooled = "in (seed 0) + gn (seed 1)"
    assert list(result["runs"]) == ["bn (seed 0) + bn (seed 1)", pooled]
    assert result["runs"][pooled]["post-processed"]["dice_patient_mean"] == pytest.approx(0.65)
    assert [s["run"] for s in result["seed_spread"]] == ["bn (seed 1)", "gn (seed 1)"]
    capsys.readouterr()
    assert gpu_cv_pool.main([str(seed0), "--same", "gn"]) == 2
    assert capsys.readouterr().err == ("gpu_cv_pool: --same 'gn': expected NAME=AS, such as "
                                       "group_norm=instance_norm\n")
