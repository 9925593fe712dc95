"""CPU latency of the four runtimes of one exported pipeline, in one run.

    python benchmarks/runtimes.py RUN_DIR [PATIENT_FOLDER] [--repeats 5] [--threads 1]
        [--no-aoti] [--json OUT]

The same checkpoint (``RUN_DIR/best.pt``) as: the eager :class:`SegmentationPipeline`,
TorchScript (scripted as ``brainseg export`` does), the ``torch.export`` program
(``model.pt2``'s program, run as ``ExportedProgram.module()``), that program compiled ahead of
time by AOTInductor (where it compiles here; the failure is reported otherwise), and the
ONNX graph of ``model.onnx`` in onnxruntime's CPU provider. Each is timed per slice (batch 1,
native 256×256 uint8) and per volume (one patient's whole stack as one batch; a synthetic
24-slice stack without PATIENT_FOLDER): median seconds over ``--repeats`` after one warm-up,
and the ratio to eager. Nothing is promised beyond the figures of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def load_volume(folder: Path | None) -> torch.Tensor:
    if folder is None:
        g = torch.Generator().manual_seed(0)
        small = torch.rand(24, 3, 32, 32, generator=g)
        return (torch.nn.functional.interpolate(small, size=(256, 256), mode="bilinear")
                * 255).round().to(torch.uint8)
    import tifffile

    images = sorted((p for p in folder.glob("*.tif") if not p.name.endswith("_mask.tif")),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return torch.from_numpy(np.stack([tifffile.imread(p) for p in images])).permute(0, 3, 1, 2)


def median_seconds(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int
                   ) -> float:
    with torch.no_grad():
        fn(x)  # warm-up (and compilation, where lazy)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def runtimes(run_dir: Path, aoti: bool) -> tuple[dict[str, Callable], dict[str, str]]:
    from brainseg_dist.export import (
        _export_program,
        build_pipeline,
        load_checkpoint,
        script_pipeline,
    )
    from brainseg_dist.onnx_export import export_program, missing_packages, session

    ckpt = load_checkpoint(run_dir / "best.pt")
    eager = build_pipeline(ckpt)
    example = load_volume(None)[:2]
    fns: dict[str, Callable] = {"eager": eager, "torchscript": script_pipeline(ckpt)}
    notes: dict[str, str] = {}
    program, dynamic = _export_program(eager, example)
    fns["torch.export"] = program.module()
    notes["torch.export"] = f"ExportedProgram.module(), {dynamic} dynamic shapes"
    if aoti:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                pkg = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(Path(tmp) / "model.pt2"))
                compiled = torch._inductor.aoti_load_package(pkg)
            fns["aotinductor"] = compiled
            notes["aotinductor"] = "torch._inductor.aoti_compile_and_package of the program"
        except Exception as exc:  # compilation is best effort: report why
            notes["aotinductor"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    if missing_packages():
        notes["onnxruntime"] = f"skipped: {', '.join(missing_packages())} missing"
    else:
        sess = session(export_program(eager, example).model_proto.SerializeToString())
        fns["onnxruntime"] = lambda x: sess.run(None, {"image": x.numpy()})[0]
        notes["onnxruntime"] = "CPUExecutionProvider, dynamo-exported graph"
    return fns, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("patient", type=Path, nargs="?")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-aoti", action="store_true", help="Skip the AOTInductor compile.")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    volume = load_volume(args.patient)
    fns, notes = runtimes(args.run_dir, not args.no_aoti)
    rows = {}
    for name, fn in fns.items():
        rows[name] = {"slice_s": median_seconds(fn, volume[:1], args.repeats),
                      "volume_s": median_seconds(fn, volume, args.repeats)}
    base = rows["eager"]
    print(f"{len(volume)}-slice volume of {volume.shape[2]}×{volume.shape[3]} uint8, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'runtime':<14}{'slice ms':>10}{'vs eager':>10}{'volume s':>10}{'vs eager':>10}")
    for name, r in rows.items():
        print(f"{name:<14}{r['slice_s'] * 1e3:>10.1f}{base['slice_s'] / r['slice_s']:>9.2f}×"
              f"{r['volume_s']:>10.3f}{base['volume_s'] / r['volume_s']:>9.2f}×")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    if args.json:
        args.json.write_text(json.dumps({"slices": len(volume), "threads": args.threads,
                                         "repeats": args.repeats, "runtimes": rows,
                                         "notes": notes, "torch": torch.__version__},
                                        indent=2))


if __name__ == "__main__":
    main()
