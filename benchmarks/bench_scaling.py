"""Throughput benchmark, scaling: 1 against N processes (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from bench_common import LR, _free_port, project_mixed_precision
from bench_training import Pipeline, _cycle, _model

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.console import console
from brainseg_dist.data import load_dataset
from brainseg_dist.data.loader import make_loader


def _ddp_worker(rank: int, world: int, port: int, cfg: dict[str, Any], results) -> None:
    """One process of a data-parallel run of the project pipeline (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    try:
        cuda = cfg["device"] == "cuda"
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:  # share the cores: 1 process x all threads against N processes x 1/N
            torch.set_num_threads(max(1, cfg["threads"] // world))
        dist.init_process_group("nccl" if cuda else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        data = load_dataset(cfg["root"], cfg["image_size"], cache_dir=cfg["cache_dir"],
                            show_progress=False)
        model = _model(cfg["base_width"], True, device)
        if cuda and world > 1:  # as the project does under DDP on GPUs
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if cuda else None)
        loader = make_loader(data, cfg["batch_size"], shuffle=True, drop_last=True, seed=rank)
        p = Pipeline("ddp", "", _cycle(lambda: loader), ddp,
                     torch.optim.Adam(ddp.parameters(), lr=LR), device, torch.channels_last,
                     cfg["amp"], True, DeviceAugment(AugmentConfig()).to(device).train())
        for _ in range(cfg["warmup"]):
            p.timed_step()
        dist.barrier()
        t0 = time.perf_counter()
        times = [p.timed_step() for _ in range(cfg["steps"])]
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                               device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if rank == 0:
            results.put({"ok": {"elapsed": float(elapsed), "median_step_s":
                                statistics.median(times), "threads": torch.get_num_threads()}})
        dist.destroy_process_group()
    except Exception as exc:
        results.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})

def _run_ddp(world: int, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, cfg, results), daemon=True)
             for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        msg = results.get(timeout=timeout)
    except queue.Empty:
        msg = {"error": f"no result within {timeout:.0f} s"}
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if "ok" not in msg:
        raise RuntimeError(msg["error"])
    return msg["ok"]

def measure_scaling(root: Path, cache_dir: Path, args, device: torch.device) -> dict[str, Any]:
    """Global images/s of 1 against 2 processes (CPU, gloo) or 1..N GPUs (NCCL)."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        worlds = sorted({1, *[w for w in (2, 4, 8, 16) if w <= n], n})
        if n < 2:
            return {"status": "skipped", "reason": "one GPU: nothing to scale to"}
    else:
        worlds = [1, 2]
    cfg = {"device": device.type, "threads": torch.get_num_threads(), "root": str(root),
           "image_size": args.image_size, "cache_dir": str(cache_dir),
           "base_width": args.base_width, "batch_size": args.batch_size,
           "amp": project_mixed_precision(device), "warmup": args.scaling_warmup,
           "steps": args.scaling_steps}
    runs = []
    for world in worlds:
        console.print(f"  scaling: {world} process(es) ...")
        r = _run_ddp(world, cfg, timeout=args.scaling_timeout)
        ips = world * args.batch_size * args.scaling_steps / r["elapsed"]
        runs.append({"processes": world, "global_batch": world * args.batch_size,
                     "images_per_s": ips, "median_step_s": r["median_step_s"],
                     "threads_per_process": r["threads"]})
    one = runs[0]["images_per_s"]
    for r in runs:
        r["speedup_vs_1"] = r["images_per_s"] / one
        r["efficiency"] = r["speedup_vs_1"] / r["processes"]
    return {"status": "ok", "backend": "nccl" if device.type == "cuda" else "gloo",
            "per_process_batch": args.batch_size, "steps": args.scaling_steps,
            "note": ("CPU: the same cores are split between the processes, so the ideal "
                     "speedup is 1x, not Nx" if device.type == "cpu" else
                     "GPU: ideal speedup is Nx"),
            "runs": runs}
