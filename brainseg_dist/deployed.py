"""Exported models as ``predict`` finds and loads them, and ``predict``'s output folder.

Shared by the slice path (:mod:`brainseg_dist.predict`) and the NIfTI path
(:mod:`brainseg_dist.nifti_predict`): MODEL is a ``model.ts``, a ``model.onnx`` or a run
directory; OUT is staged beside itself and replaces the earlier OUT whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from brainseg_dist import rundir
from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import check_writable, current_umask
from brainseg_dist.pipeline import load_torchscript


@dataclass
class PredictResult:
    """What :func:`predict` wrote and how long it took."""

    out: Path
    kind: str
    slices: int
    folders: int
    seconds: float
    slices_per_second: float
    area: pd.DataFrame
    volume: pd.DataFrame


def resolve_model(model: str | Path,
                  export_missing: Callable[[Path], object] | None = None) -> Path:
    """MODEL as given: a ``model.ts`` file, or a run directory (its ``model.ts``, written
    from ``best.pt`` by ``export_missing`` first when missing)."""
    model = Path(model)
    if model.is_dir():
        ts = model / rundir.TORCHSCRIPT
        if not ts.is_file():
            if not (model / rundir.BEST).is_file():
                raise BrainsegError(f"{model}: run directory has neither model.ts nor best.pt")
            if export_missing is None:
                raise BrainsegError(f"{model}: run directory has no model.ts; write it with "
                                    "`brainseg export RUN_DIR`")
            console.print(f"{ts} not found: exporting it from {model / rundir.BEST}")
            export_missing(model)
        return ts
    if not model.is_file():
        raise BrainsegError(f"{model}: model not found (expected model.ts, model.onnx or a run "
                            "directory)")
    return model


def load_model(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """Load ``model.ts`` on ``device`` (or ``model.onnx`` for onnxruntime) with its metadata
    (attributes and metadata.json)."""
    if path.suffix.lower() == ".onnx":
        from brainseg_dist.onnx_export import load_onnx

        return load_onnx(path, device)
    module, meta = load_torchscript(path, device)
    meta.setdefault("threshold", float(module.threshold))
    meta.setdefault("normalization", str(module.normalization))
    meta.setdefault("image_size", int(module.image_size))
    return module, meta


PREDICTION_MARKER = "tumour_area.csv"  # an OUT holding this was written by predict


def check_replaceable(out: Path) -> None:
    """OUT is replaced as a whole: refuse a non-empty OUT that predict did not write, and
    check before any decoding that its parent folder takes new files.

    Raises:
        BrainsegError: OUT holds other files, or its folder cannot be written.
    """
    if out.is_dir() and any(out.iterdir()) and not (out / PREDICTION_MARKER).is_file():
        raise BrainsegError(f"{out}: output folder is not empty and holds no earlier "
                            f"predictions ({PREDICTION_MARKER}); predict replaces OUT as a "
                            "whole, so choose a new or empty folder")
    check_writable(out.parent, "folder of OUT")


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield an empty staging folder beside ``out``; on success it replaces ``out``.

    The earlier ``out`` (if any) is renamed aside, the stage renamed to ``out``, and only
    then the earlier one deleted; on any failure the stage is deleted and ``out`` untouched.
    Leftovers of a killed process are named ``.NAME.XXXX.tmp`` (removed by
    :func:`brainseg_dist.io.remove_temporaries`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700; use normal permissions
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp",
                                        dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
