"""Throughput benchmark, data: the dataset it runs on; tif decode against the decoded-slice
cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from brainseg_dist.data import SliceData, load_dataset
from brainseg_dist.data.synth import write_synthetic_dataset


def prepare_data(args, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The dataset root (``--data-dir`` or a fresh synthetic one) and how it was made."""
    if args.data_dir:
        return Path(args.data_dir), {"source": str(args.data_dir)}
    root = workdir / "synthetic" / "kaggle_3m"
    t0 = time.perf_counter()
    write_synthetic_dataset(root, patients=args.patients, seed=0, slices=args.slices)
    return root, {"source": "synthetic", "synthetic_patients": args.patients,
                  "synthetic_write_seconds": time.perf_counter() - t0}

def measure_decode(root: Path, image_size: int, cache_dir: Path) -> tuple[SliceData,
                                                                        dict[str, Any]]:
    """Tif decode rate into an empty cache, then the rate of reading it back."""
    t0 = time.perf_counter()
    cold = load_dataset(root, image_size, cache_dir=cache_dir, show_progress=False)
    cold_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = load_dataset(root, image_size, cache_dir=cache_dir, show_progress=False)
    warm_wall = time.perf_counter() - t0
    n = len(warm)
    cold_s, warm_s = cold.timings["decode_seconds"], warm.timings["decode_seconds"]
    result = {
        "patients": len(warm.patients),
        "slices": n,
        "cold_decode_seconds": cold_s,
        "cold_slices_per_s": n / cold_s,
        "cold_load_dataset_seconds": cold_wall,
        "cached_decode_seconds": warm_s,
        "cached_slices_per_s": n / warm_s,
        "cached_load_dataset_seconds": warm_wall,
        "cache_speedup": cold_s / warm_s,
        "patients_from_cache": int(warm.timings["patients_from_cache"]),
    }
    return warm, result
