"""``brainseg cv --jobs N``: the folds train as N processes at once on one machine, each
``python -m brainseg_dist.cv --fold K`` with the call's resolved config.

Why: a 128² U-Net step is small. On a GPU one process is bound by its host issuing kernels
(the H200 run in the README: 1,912 images/s eager, 4,598 as CUDA graphs), so several folds
can share the device; on a CPU each job gets its share of the threads. Several GPUs take the
folds round-robin (``CUDA_VISIBLE_DEVICES``), as nnU-Net runs one fold per device. Each fold
is an ordinary ``--fold K`` job, so it trains exactly as it would alone, resumes from
``last.pt`` after an interruption, and a failed fold does not stop the others.
Layout, beside the folds::

    jobs/config.yaml        the config every job loads (the call's, resolved)
    jobs/fold_<k>.log       each job's output
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from brainseg_dist import rundir
from brainseg_dist.config import Config, dump_config
from brainseg_dist.console import console, progress
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write_text

POLL_SECONDS = 1.0


def job_env(slot: int, jobs: int, on_cuda: bool, base: dict[str, str] | None = None
            ) -> dict[str, str]:
    """The environment of the job in ``slot`` (0..jobs-1): no progress bars in its log, the
    machine's CPU threads shared out, and with several GPUs the device ``slot`` maps to.

    Args:
        slot: which of the ``jobs`` concurrent places the fold runs in.
        jobs: concurrent jobs.
        on_cuda: whether the folds train on CUDA.
        base: the environment to start from (default ``os.environ``).
    """
    import torch

    env = dict(os.environ if base is None else base)
    env["BRAINSEG_NO_PROGRESS"] = "1"
    threads = torch.get_num_threads() if not on_cuda else os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(1, threads // jobs))
    if on_cuda and torch.cuda.device_count() > 1:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in
                                                      range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)].strip()
    return env


def job_command(config_file: Path, out: Path, plan: dict[str, Any], fold: int) -> list[str]:
    """``python -m brainseg_dist.cv`` training one fold of ``plan`` with the saved config."""
    return [sys.executable, "-m", "brainseg_dist.cv", "--config", str(config_file),
            "--output-dir", str(out), "--folds", str(plan["folds"]),
            "--val-fraction", repr(plan["val_fraction"]), "--split-seed", str(plan["seed"]),
            "--fold", str(fold), "--train-only"]


@dataclass
class _Job:
    fold: int
    slot: int
    process: subprocess.Popen
    log: IO[str]
    log_path: Path
    started: float


def _epochs_done(out: Path, fold: int) -> int:
    path = rundir.fold_dir(out, fold) / rundir.METRICS
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _last_line(path: Path) -> str:
    """The log's last line: the job's one-line error where it failed on bad input."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
             if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "(no output)"


def train_folds_as_jobs(cfg: Config, out: Path, plan: dict[str, Any], jobs: int) -> None:
    """Train every unfinished fold of ``plan`` as a ``--fold K`` process, ``jobs`` at a time.

    Args:
        cfg: the call's config (saved to ``jobs/config.yaml`` for the jobs to load).
        out: the CV directory; ``cv_plan.json`` is already there.
        plan: the saved plan.
        jobs: how many folds train at once.

    Raises:
        BrainsegError: one or more folds failed (each named with its exit status, the last
            line of its log and the log's path); the other folds still ran to their end.
    """
    import torch

    todo = [s["fold"] for s in plan["splits"]
            if not rundir.fold_finished(out, s["fold"])]
    if not todo:
        return
    on_cuda = torch.cuda.is_available() and not cfg.train.cpu
    folder = out / rundir.CV_JOBS
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.yaml"
    atomic_write_text(config_file, dump_config(cfg))
    jobs = min(jobs, len(todo))
    console.print(f"training {len(todo)} fold(s) as {jobs} concurrent jobs; logs in {folder}")
    failed = _run_pool(todo, jobs, len(todo) * cfg.train.epochs, out, plan,
                       lambda fold, slot: _start(fold, slot, jobs, on_cuda, config_file,
                                                 out, plan))
    if failed:
        raise BrainsegError("; ".join(failed))


def _run_pool(todo: list[int], jobs: int, total: int, out: Path, plan: dict[str, Any],
              start: Callable[[int, int], _Job]) -> list[str]:
    """Keep ``jobs`` folds running until ``todo`` is empty, with a bar of epochs done.

    Returns:
        The failures' one-line descriptions.
    """
    running: dict[int, _Job] = {}
    started: list[int] = []
    failed: list[str] = []
    # A SIGTERM (kill, a scheduler's cancel) would end this process without its finally and
    # leave the jobs training; as SystemExit it stops them first.
    on_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with progress() as bar:
            task = bar.add_task("folds", total=total, info="")
            while todo or running:
                for slot in sorted(set(range(jobs)) - set(running)):
                    if todo:
                        started.append(todo.pop(0))
                        running[slot] = start(started[-1], slot)
                time.sleep(POLL_SECONDS)
                for slot, job in list(running.items()):
                    if job.process.poll() is not None:
                        del running[slot]
                        failed += filter(None, [_finish(job, out, plan)])
                done = sum(_epochs_done(out, k) for k in started)
                bar.update(task, completed=min(done, total),
                           info=f"{len(running)} running, {len(todo)} waiting")
    finally:
        _stop(list(running.values()))
        signal.signal(signal.SIGTERM, on_term)
    return failed


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop(jobs: list[_Job]) -> None:
    """Stop jobs still running when the call is interrupted; each resumes from last.pt."""
    for job in jobs:
        job.process.terminate()
    for job in jobs:
        try:
            job.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.process.kill()
        job.log.close()


def _start(fold: int, slot: int, jobs: int, on_cuda: bool, config_file: Path, out: Path,
           plan: dict[str, Any]) -> _Job:
    log_path = out / rundir.CV_JOBS / f"fold_{fold}.log"
    log = log_path.open("a", encoding="utf-8")
    process = subprocess.Popen(job_command(config_file, out, plan, fold), stdout=log,
                               stderr=subprocess.STDOUT, env=job_env(slot, jobs, on_cuda))
    return _Job(fold, slot, process, log, log_path, time.perf_counter())


def _finish(job: _Job, out: Path, plan: dict[str, Any]) -> str | None:
    """Report a job that ended; the failure's one-line description, or None."""
    job.log.close()
    name = f"fold {job.fold + 1}/{plan['folds']}"
    code = job.process.returncode
    if code != 0:
        return (f"{name} failed (exit status {code}): {_last_line(job.log_path)} "
                f"(log: {job.log_path})")
    minutes = (time.perf_counter() - job.started) / 60
    if rundir.fold_finished(out, job.fold):
        console.print(f"{name}: finished in {minutes:.1f} min")
    else:
        console.print(f"{name}: stopped at epoch {_epochs_done(out, job.fold)} "
                      "(train.stop_after_epoch); run again to continue")
    return None
