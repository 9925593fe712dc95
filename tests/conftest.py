"""Shared fixtures: an isolated cache per test, a synthetic dataset and the real LGG subset."""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from brainseg_dist.data.synth import write_synthetic_dataset

# Tiny test models gain nothing from threads, and on a loaded 2-core machine OpenMP
# spin-waiting makes 2 threads up to 100x slower than 1. Children inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "lgg-dev.tar.xz"
# The longest files (90 to 220 s each on 2 loaded cores, 2026-11-28) are collected first:
# launch/test.sh hands whole files to its 2 pytest-xdist workers in collection order, and a
# long file handed out late leaves one worker running it alone at the end (632 s of wall time
# for 575 s of work per worker, when xdist ordered files by their number of tests).
LONGEST_FIRST = ("test_gpu_check.py", "test_cv.py", "test_train.py", "test_benchmarks.py",
                 "test_real_pipeline.py", "test_distributed_faults.py", "test_run_safety.py",
                 "test_nifti.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FIRST` first, in that order; each file's tests stay
    together and in their order (a stable sort), as module-scoped fixtures need."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test session, shared by the pytest-xdist workers (the pattern
    of xdist's documentation): the first worker to get here builds under a file lock, the
    others wait and reuse its result. Only for fixtures that tests never write into.

    Returns:
        What ``build`` returned, read back from the finished build's marker.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    done = base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.is_file():
            folder = base / name
            shutil.rmtree(folder, ignore_errors=True)  # a failed build's leftovers
            folder.mkdir()
            done.write_text(str(build(folder)))
    return Path(done.read_text())


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty decoded-slice cache and no progress bars."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BRAINSEG_CACHE_DIR", str(cache))
    monkeypatch.setenv("BRAINSEG_NO_PROGRESS", "1")
    return cache


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """8 synthetic patients (seed 0), written once per session. Read-only: copy to corrupt."""
    return built_once(tmp_path_factory, "synth", lambda folder: write_synthetic_dataset(
        folder / "kaggle_3m", patients=8, seed=0))


@pytest.fixture(scope="session")
def synth_data(synth_root):
    """``load_dataset(synth_root)`` at the default size, decoded once without the cache."""
    from brainseg_dist.data import load_dataset

    return load_dataset(synth_root, use_cache=False, show_progress=False)


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """The real LGG subset (20 patients), extracted once per session; skipped when absent."""
    archive = Path(os.environ.get("BRAINSEG_LGG_ARCHIVE") or DEFAULT_ARCHIVE)
    if not archive.is_file():
        pytest.skip(f"real LGG subset not found: {archive} (set BRAINSEG_LGG_ARCHIVE)")

    def unpack(dest: Path) -> Path:
        with tarfile.open(archive, mode="r:xz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.11.4 / 3.10.12 has no extraction filters
                tar.extractall(dest)
        assert (dest / "kaggle_3m").is_dir(), f"{archive} has no kaggle_3m folder"
        return dest / "kaggle_3m"

    return built_once(tmp_path_factory, "lgg", unpack)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 2-epoch run of ``configs/demo.yaml`` on 8 synthetic patients, trained once per session.

    The run directory holds config.yaml, split.json, metrics.jsonl, best.pt, last.pt and the
    synthetic dataset (``synthetic/kaggle_3m``). Read-only: copy it to change it.
    """
    from brainseg_dist.config import load_config
    from brainseg_dist.train import run_training

    def train(folder: Path) -> Path:
        out, cache = folder / "run", folder / "cache"
        cfg = load_config(REPO / "configs" / "demo.yaml", {
            "train.output_dir": str(out), "train.epochs": 2, "data.synthetic_patients": 8,
            "data.cache_dir": str(cache), "train.num_overlays": 1, "train.export": False})
        with pytest.MonkeyPatch.context() as mp:  # session scope: no function monkeypatch
            mp.setenv("BRAINSEG_NO_PROGRESS", "1")
            mp.setenv("BRAINSEG_CACHE_DIR", str(cache))
            run_training(cfg)
        return out

    return built_once(tmp_path_factory, "trained_run", train)


@pytest.fixture(scope="session")
def ddp_run(synth_root, tmp_path_factory) -> Path:
    """1 epoch of :func:`helpers.ddp_train_args` on :func:`synth_root` by 2 DDP processes
    (torchrun, gloo), trained once per session: the reference of the process-count and
    multi-machine tests. Read-only: copy it to change it."""
    from helpers import ddp_train_args, torchrun

    def train(folder: Path) -> Path:
        job = torchrun(ddp_train_args(synth_root, folder / "run"))
        log = job.communicate(timeout=300)[0]
        assert job.returncode == 0, log[-3000:]
        assert "training on 2 process(es)" in log
        return folder / "run"

    return built_once(tmp_path_factory, "ddp_run", train)


@pytest.fixture(scope="session")
def trained_model_ts(trained_run, tmp_path_factory) -> Path:
    """``model.ts`` of :func:`trained_run`, exported once per session."""
    from brainseg_dist.export import export_run

    def export(_folder: Path) -> Path:
        export_run(trained_run, pt2=False, onnx=False, verbose=False)
        return trained_run / "model.ts"

    return built_once(tmp_path_factory, "trained_model_ts", export)
