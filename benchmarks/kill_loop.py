"""Kill ``brainseg train`` with SIGKILL at random moments, again and again, and check that
nothing is lost.

    python benchmarks/kill_loop.py --kills 20 --json kill_loop.json

One uninterrupted reference run first; then a run that is started (``--resume`` once it has a
``last.pt``), killed after a random delay, checked, and started again until ``--kills`` kills
landed (a start that finishes before its kill does not count; the run is started over); then
resumed to the end. After every kill:

* every ``best.pt`` and ``last.pt`` loads with ``torch.load(weights_only=True)``;
* ``metrics.jsonl`` agrees with ``last.pt``'s history (it may lag by the one epoch between the
  two renames, never lead, never differ);
* the temporary files seen after the previous kill are gone once the next start got past
  its start-up.

At the end no temporary file is left and the resumed run's metrics equal the reference's.
Prints a summary; ``--json`` writes every kill's record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from brainseg_dist.checkpoint import load_state  # noqa: E402
from brainseg_dist.io import atomic_write_json, is_temporary, json_safe  # noqa: E402

COMPARED = ("train_loss", "val_loss", "val_dice", "val_dice_patient_mean", "lr")
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def train_command(root: Path, out: Path, epochs: int, flag: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "brainseg_dist.cli", "train", "--data-dir", str(root),
           "--output-dir", str(out), "--image-size", "32", "--base-width", "4",
           "--batch-size", "8", "--epochs", str(epochs), "--set", "train.num_overlays=0",
           "--set", "train.export=false"]
    return [*cmd, flag] if flag else cmd


def child_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "BRAINSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
            "BRAINSEG_CACHE_DIR": str(cache)}


def read_metrics(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{path}: bare {constant} (not strict JSON)")

    if not path.exists():
        return []
    return [json.loads(x, parse_constant=refuse) for x in path.read_text().splitlines()]


def temporaries(folder: Path) -> set[Path]:
    return {p for p in folder.rglob(".*.tmp") if is_temporary(p)}


def check_after_kill(out: Path) -> dict:
    """The invariants that must hold whenever training is killed (raises AssertionError)."""
    states = {}
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            states[name] = load_state(out / name)  # weights_only=True
    rows = read_metrics(out / "metrics.jsonl")
    if "last.pt" not in states:
        assert not rows, "metrics.jsonl without last.pt"
        return {"last_epoch": None, "metrics_rows": 0, "metrics_lag": 0}
    history = json_safe(states["last.pt"]["history"])
    assert len(history) - len(rows) in (0, 1), (len(history), len(rows))
    assert rows == history[: len(rows)], "metrics.jsonl differs from last.pt's history"
    if "best.pt" in states:
        assert states["best.pt"]["epoch"] <= states["last.pt"]["epoch"] + 1
    return {"last_epoch": states["last.pt"]["epoch"], "metrics_rows": len(rows),
            "metrics_lag": len(history) - len(rows)}


def start_flag(out: Path) -> str | None:
    if (out / "last.pt").exists():
        return "--resume"
    if any((out / name).exists() for name in RUN_FILES):
        return "--overwrite"  # killed between best.pt and last.pt of the first epoch
    return None


def kill_loop(workdir: Path, kills: int, epochs: int = 8, seed: int = 0,
              patients: int = 6) -> dict:
    """Run the loop; returns a report (raises AssertionError when an invariant breaks)."""
    from brainseg_dist.data.synth import write_synthetic_dataset

    rng = random.Random(seed)
    root = write_synthetic_dataset(workdir / "data" / "kaggle_3m", patients=patients, seed=0)
    cache = workdir / "cache"
    env = child_env(cache)
    t0 = time.perf_counter()
    ref = subprocess.run(train_command(root, workdir / "reference", epochs, None), env=env,
                         capture_output=True, text=True, cwd=REPO, check=False)
    reference_s = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = workdir / "run"
    records, leftovers, restarts = [], set(), 0
    while sum(not r["finished"] for r in records) < kills:
        i = len(records)
        assert i < 4 * kills + 4, "the run keeps finishing before the kill"
        flag = start_flag(out)
        # Start-up, data loading, any epoch or the end of a fresh run (a resumed one may end
        # first: then it is started over, and the kill does not count).
        delay = rng.uniform(0.2, 0.9 * reference_s)
        proc = subprocess.Popen(train_command(root, out, epochs, flag), env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log = proc.stderr.read()
        finished = proc.returncode == 0
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"start {i} failed with {proc.returncode}:\n{log[-3000:]}")
        started = "removed " in log or "resumed from" in log or "training on" in log
        still_there = {p for p in leftovers if p.exists()}
        assert not (started and still_there), f"not removed at start-up: {still_there}"
        record = {"kill": i, "flag": flag, "delay_s": round(delay, 2), "finished": finished,
                  **check_after_kill(out)}
        leftovers = temporaries(out)
        record["temporaries_left"] = len(leftovers)
        records.append(record)
        if finished:  # the run ended before the kill: start a new one over it
            restarts += 1
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)

    final = subprocess.run(train_command(root, out, epochs, start_flag(out)), env=env,
                           capture_output=True, text=True, cwd=REPO, check=False)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not temporaries(out), f"temporary files after the last start: {temporaries(out)}"
    got = read_metrics(out / "metrics.jsonl")
    want = read_metrics(workdir / "reference" / "metrics.jsonl")
    assert [r["epoch"] for r in got] == list(range(epochs))
    worst = 0.0
    for a, b in zip(want, got, strict=True):
        for key in COMPARED:
            worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (a["epoch"], key)
    return {
        "kills": kills, "epochs": epochs, "seed": seed, "reference_seconds": reference_s,
        "starts": len(records), "runs_finished_before_kill": restarts,
        "kills_with_metrics_lag": sum(r["metrics_lag"] == 1 for r in records),
        "kills_leaving_temporaries": sum(r["temporaries_left"] > 0 for r in records),
        "largest_relative_metric_difference": worst, "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        report = kill_loop(workdir, args.kills, args.epochs, args.seed)
        report["seconds"] = time.perf_counter() - t0
    if args.json:
        atomic_write_json(args.json, report)
    summary = {k: v for k, v in report.items() if k != "records"}
    print(json.dumps(summary, indent=2))
    print("all checks passed")


if __name__ == "__main__":
    main()
