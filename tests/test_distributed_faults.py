"""Distributed faults and the multi-node path, on this machine with CPU (gloo) processes.

* A rank killed with SIGKILL mid-epoch ends the whole job, non-zero, within a minute: torch's
  elastic agent (torchrun, which ``accelerate launch`` also runs) sees the dead worker and
  tears the group down; the surviving rank's gloo collectives fail on the closed connection.
* ``accelerate launch`` with 2 machines × 1 process on 127.0.0.1 (static rendezvous) trains
  to the same validation figures as a single-node 2-process run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import child_env, ddp_train_args, free_port, torchrun

REPO = Path(__file__).resolve().parent.parent
DEAD_RANK_LIMIT_S = 60
VAL_KEYS = ("val_loss", "val_dice", "val_dice_patient_mean", "val_dice_patient_median",
            "val_dice_tumour_slices")


def worker_of_rank(agent_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker process with ``RANK=rank`` started by a torchrun agent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no rank-{rank} worker under pid {agent_pid}")


def accelerate_two_machines(tmp_path: Path, args: list[str]) -> list[subprocess.Popen]:
    """``accelerate launch`` once per machine (rank 0 and 1), 1 process each, on 127.0.0.1."""
    config = multinode_config(tmp_path, free_port())
    accelerate = Path(sys.executable).parent / "accelerate"
    return [subprocess.Popen(
        [str(accelerate), "launch", "--config_file", str(config), "--machine_rank", str(rank),
         "-m", "brainseg_dist.train", *map(str, args)], cwd=REPO, env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one machine", "two machines"])
def test_killing_one_rank_ends_the_job(layout, synth_root, tmp_path):
    """SIGKILL of rank 1 mid-epoch. One machine: torchrun's agent tears the group down. Two
    machines: machine 0's agent cannot see rank 1; its worker's next gloo collective fails
    on the closed connection, and each launcher exits non-zero."""
    out = tmp_path / "run"
    args = ddp_train_args(synth_root, out, epochs=200)
    jobs = [torchrun(args)] if layout == "one machine" else accelerate_two_machines(tmp_path,
                                                                                   args)
    try:
        victim = worker_of_rank(jobs[-1].pid, 1)
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first epoch is done: training runs
            assert all(j.poll() is None for j in jobs), jobs[0].stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        time.sleep(0.3)  # into the next epoch (about 1 s each)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for job in jobs:
            job.wait(timeout=DEAD_RANK_LIMIT_S)
        seconds = time.monotonic() - killed_at
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    logs = [job.stdout.read() for job in jobs]
    print(f"{layout}: job ended {seconds:.1f} s after SIGKILL of rank 1 (exit status "
          f"{[j.returncode for j in jobs]})")
    assert all(job.returncode != 0 for job in jobs)
    assert seconds < DEAD_RANK_LIMIT_S
    assert "Signal 9" in logs[-1] or "SIGKILL" in logs[-1], logs[-1][-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 200  # it was stopped, not finished


def multinode_config(tmp_path: Path, port: int) -> Path:
    """launch/cpu_2proc.yaml with 2 machines instead of 1 (one process each)."""
    text = (REPO / "launch" / "cpu_2proc.yaml").read_text()
    text = text.replace("num_machines: 1", "num_machines: 2")
    text = text.replace("main_process_port: 29533", f"main_process_port: {port}")
    path = tmp_path / "two_machines.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_two_machines_on_localhost_match_one_machine(ddp_run, synth_root, tmp_path):
    """The same run as :func:`ddp_run` (one machine, 2 processes), on 2 machines."""
    machines = accelerate_two_machines(tmp_path, ddp_train_args(synth_root, tmp_path / "multi"))
    logs = [m.communicate(timeout=300)[0] for m in machines]
    for rank, (m, text) in enumerate(zip(machines, logs, strict=True)):
        assert m.returncode == 0, f"machine {rank}:\n{text[-3000:]}"
    assert "training on 2 process(es)" in logs[0]

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    one, two = rows(ddp_run), rows(tmp_path / "multi")
    assert len(one) == len(two) == 1
    for key in VAL_KEYS:
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-6, abs=1e-7), key
