"""Helpers for the tests: run the real CLI, craft small datasets and bad tif files."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import site
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(args, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m brainseg_dist.cli ARGS`` in a real process and return the result.

    The child inherits the current environment (so the per-test ``BRAINSEG_CACHE_DIR`` set by
    the autouse fixture applies) with progress bars off; ``env=`` adds or overrides variables.
    """
    env = {**os.environ, "BRAINSEG_NO_PROGRESS": "1", **kw.pop("env", {})}
    kw.setdefault("cwd", REPO)
    kw.setdefault("timeout", 120)
    return subprocess.run(
        [sys.executable, "-m", "brainseg_dist.cli", *map(str, args)],
        capture_output=True, text=True, env=env, check=False, **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a training child: no progress bars, one thread per process."""
    return {**os.environ, "BRAINSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def torchrun(args, nproc: int = 2, program=("-m", "brainseg_dist.train"), **kw
             ) -> subprocess.Popen:
    """``python -m torch.distributed.run PROGRAM ARGS`` (default: the training entry point) on
    ``nproc`` CPU (gloo) processes on a free port, output (stderr included) on ``stdout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *map(str, program), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def ddp_train_args(root: Path, out: Path, epochs: int = 1) -> list[str]:
    """A tiny run's training options. fp32 on every launcher: bf16 rounding depends on the
    batch, which sharding changes, and "auto" is bf16 on a CPU with AMX under torchrun but
    follows the accelerate config under ``accelerate launch``. Batch 8 over 2 ranks on 30%
    validation patients leaves an uneven last batch."""
    return ["--data-dir", str(root), "--output-dir", str(out), "--image-size", "32",
            "--base-width", "4", "--batch-size", "8", "--epochs", str(epochs),
            "--set", "data.val_fraction=0.3", "--set", "train.num_overlays=1",
            "--set", "train.export=false", "--set", "train.mixed_precision=no"]


def positive(x) -> bool:
    """A finite number above 0 (measured figures: a rate, a ratio, a time)."""
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def unwrap(text: str) -> str:
    """Undo line folding by the console, so a long path reads as one string again."""
    return text.replace("\n", "")


def rng_image(seed: int, shape=(256, 256, 3), dtype=np.uint8) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, min(info.max, 255) + 1, shape).astype(dtype)


def square_mask(shape=(256, 256), lo: int = 100, hi: int = 140, value: int = 255) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[lo:hi, lo:hi] = value
    return mask


def write_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photometric = "rgb" if image.ndim == 3 and image.shape[2] == 3 else "minisblack"
    tifffile.imwrite(path, image, photometric=photometric)
    return path


def write_pair(folder: Path, n: int, image: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write ``<folder>_<n>.tif`` and ``<folder>_<n>_mask.tif`` (valid by default)."""
    image = rng_image(n) if image is None else image
    mask = (square_mask() if n % 2 else np.zeros((256, 256), np.uint8)) if mask is None else mask
    return (write_image(folder / f"{folder.name}_{n}.tif", image),
            write_image(folder / f"{folder.name}_{n}_mask.tif", mask))


def make_patient(root: Path, folder: str, slices=(1, 2, 3)) -> Path:
    """A valid patient folder with the given slice numbers."""
    path = root / folder
    for n in slices:
        write_pair(path, n)
    return path


def truncate_half(path: Path) -> Path:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def copy_patients(src_root: Path, dst_root: Path, n: int) -> list[str]:
    """Copy the first ``n`` patient folders (and data.csv) of ``src_root`` to ``dst_root``."""
    dst_root.mkdir(parents=True, exist_ok=True)
    folders = sorted(p.name for p in src_root.iterdir() if p.is_dir())[:n]
    for name in folders:
        shutil.copytree(src_root / name, dst_root / name)
    if (src_root / "data.csv").is_file():
        shutil.copy2(src_root / "data.csv", dst_root / "data.csv")
    return folders


def tree_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupted_copy(src_root: Path, dst_root: Path, truncate: tuple[int, int],
                   delete_mask: tuple[int, int]):
    """Copy two patients, truncate one image and delete one mask.

    Args:
        truncate: (patient index 0/1, slice number) of the image to cut in half.
        delete_mask: (patient index 0/1, slice number) of the mask to delete.

    Returns:
        ``(root, truncated path, deleted path, slices before the damage)``.
    """
    folders = copy_patients(src_root, dst_root, 2)
    n_slices = sum(len(list((dst_root / f).glob("*_mask.tif"))) for f in folders)
    (i, n), (j, m) = truncate, delete_mask
    truncated = truncate_half(dst_root / folders[i] / f"{folders[i]}_{n}.tif")
    deleted = dst_root / folders[j] / f"{folders[j]}_{m}_mask.tif"
    deleted.unlink()
    return dst_root, truncated, deleted, n_slices


def run_without_package(body: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh ``python -I -S`` that has torch, numpy and tifffile but cannot
    import ``brainseg_dist`` (a user's process with an exported model and torch alone).

    ``sys``, ``json``, ``warnings``, ``np``, ``tifffile``, ``torch`` and ``Path`` are imported.
    """
    packages = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    preamble = textwrap.dedent(f"""
        import sys, json, warnings
        sys.path.extend({packages!r})
        try:
            import brainseg_dist
            raise SystemExit("brainseg_dist must not be importable here")
        except ImportError:
            pass
        import numpy as np, tifffile, torch
        from pathlib import Path
    """)
    return subprocess.run([sys.executable, "-I", "-S", "-c", preamble + textwrap.dedent(body)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def patient_stack(folder: Path):
    """A patient folder's images in slice order as an ``N×3×H×W`` uint8 tensor."""
    import torch

    images = sorted((p for p in folder.glob("*.tif") if not p.name.endswith("_mask.tif")),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return torch.from_numpy(np.stack([tifffile.imread(p) for p in images])).permute(0, 3, 1, 2)
