"""Shared helpers of the throughput benchmark: timing, hardware facts, seeds, constants, and
waiting for loader workers to go idle between timed blocks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg_dist.train.setup import cpu_has_bf16_matrix_units, resolve_mixed_precision

SCHEMA_VERSION = 1
DEPTH = 4
LR = 1e-3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b

def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cpu_amx": cpu_has_bf16_matrix_units(),  # decides the CPU's mixed_precision: auto
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "kornia": _version("kornia"),
        "accelerate": _version("accelerate"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info

def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _amp_dtype(mode: str | None) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode or "no")

def project_mixed_precision(device: torch.device) -> str:
    """The project's default (``train.mixed_precision: auto``) on this device."""
    mode = resolve_mixed_precision("auto", device.type)
    if mode is None:  # launched under an accelerate config: it decides
        mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return mode


def failure(exc: Exception) -> dict[str, str]:
    """A measurement that failed, as its section records it (the reason cut at 2,000 chars)."""
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000]}


def _cpu_ticks(pids: list[int]) -> int | None:
    """User + system CPU ticks of these processes (Linux ``/proc``), or None."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total


def wait_for_idle_workers(batches: Iterator, quiet_polls: int = 3, poll_s: float = 0.05,
                          timeout_s: float = 30.0) -> float:
    """Wait until the loader workers behind ``batches`` (a DataLoader iterator) have used no
    CPU time for ``quiet_polls`` polls in a row: their prefetch buffer is full again.

    Returns:
        Seconds waited (0 without workers, or where their CPU time cannot be read).
    """
    pids = [w.pid for w in getattr(batches, "_workers", [])]
    t0 = time.perf_counter()
    last, quiet = _cpu_ticks(pids), 0
    while pids and last is not None and quiet < quiet_polls:
        if time.perf_counter() - t0 > timeout_s:
            break
        time.sleep(poll_s)
        now = _cpu_ticks(pids)
        quiet = quiet + 1 if now == last else 0
        last = now
    return time.perf_counter() - t0
