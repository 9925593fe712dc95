"""CPU latency per patient volume: one fold's model.ts against the K-fold ensemble's.

    python benchmarks/ensemble_latency.py CV_DIR PATIENT_FOLDER [--repeats 5] [--threads 2]

Both modules are the TorchScript files ``brainseg export`` writes (the single fold's is
scripted here from ``fold_0/best.pt`` the same way), loaded with ``torch.jit.load`` and run on
the whole patient stack at native resolution. Reported: median seconds per volume of the
single fold (probabilities), the ensemble's probabilities (``forward``: K folds, and flip TTA
when the chosen post-processing has it) and the ensemble's ``segment`` (forward plus
threshold, 3D components and hole filling), and the ratios, all from one run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile
import torch


def load_volume(folder: Path) -> torch.Tensor:
    images = sorted((p for p in folder.glob("*.tif") if not p.name.endswith("_mask.tif")),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return torch.from_numpy(np.stack([tifffile.imread(p) for p in images])).permute(0, 3, 1, 2)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (TorchScript profiling runs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def main() -> None:
    from brainseg_dist.checkpoint import load as load_checkpoint
    from brainseg_dist.ensemble import build_ensemble
    from brainseg_dist.export import script_pipeline
    from brainseg_dist.pipeline import quiet_jit_deprecation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_dir", type=Path)
    ap.add_argument("patient", type=Path, help="a kaggle_3m patient folder")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = load_volume(args.patient)
    with quiet_jit_deprecation(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        single = roundtrip(script_pipeline(load_checkpoint(args.cv_dir / "fold_0" / "best.pt")))
        traced, meta = build_ensemble(args.cv_dir, trace=True)
        ensemble = roundtrip(torch.jit.script(traced))
    with torch.no_grad():
        t_single = median_seconds(lambda: single(x), args.repeats)
        t_forward = median_seconds(lambda: ensemble(x), args.repeats)
        t_segment = median_seconds(lambda: ensemble.segment(x), args.repeats)
    result = {
        "slices": len(x), "threads": args.threads, "repeats": args.repeats,
        "folds": meta["ensemble"]["folds"],
        "postprocessing": meta["ensemble"]["postprocessing"]["description"],
        "single_fold_s": t_single, "ensemble_forward_s": t_forward,
        "ensemble_segment_s": t_segment,
        "forward_ratio": t_forward / t_single, "segment_ratio": t_segment / t_single,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
