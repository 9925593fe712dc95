"""``brainseg export``: a trained run (or a cross-validation's fold ensemble) as one
end-to-end module, TorchScript ``model.ts`` and ``torch.export`` ``model.pt2``.

The module is :class:`brainseg_dist.pipeline.SegmentationPipeline` (raw slices in,
probabilities out; see :mod:`brainseg_dist.pipeline`), with the U-Net traced and the rest
scripted. Before anything is written, the scripted module is compared with the eager one on
slices of the run's own dataset (uint8, float, odd sizes); the file written is loaded back and
checked again. The TorchScript file needs only ``torch`` to load; its metadata is stored both
as module attributes and as the extra file ``metadata.json``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_dist import rundir
from brainseg_dist.checkpoint import Checkpoint
from brainseg_dist.checkpoint import load as load_checkpoint
from brainseg_dist.console import console, warn
from brainseg_dist.ensemble import build_ensemble, traced_ensemble
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, check_writable, dumps_strict
from brainseg_dist.pipeline import (
    METADATA_FILE,
    SegmentationPipeline,
    build_pipeline,
    build_unet,
    load_torchscript,
    metadata,
    quiet_jit_deprecation,
)
from brainseg_dist.postprocess import PostProcessing


class ExportError(BrainsegError):
    """Export failed, or the exported module disagrees with the eager one."""


def script_pipeline(ckpt: Checkpoint) -> torch.jit.ScriptModule:
    """TorchScript version of :func:`build_pipeline`.

    The U-Net is traced (its forward zips module lists, which the TorchScript compiler does
    not accept) at the fixed training size it always sees; the wrapper is scripted so resizing
    and normalization follow each input's size.
    """
    unet = build_unet(ckpt)
    example = torch.zeros(1, 3, ckpt.image_size, ckpt.image_size)
    with quiet_jit_deprecation(), torch.no_grad():
        traced = torch.jit.trace(unet, example)
        pipeline = SegmentationPipeline(traced, ckpt.image_size, ckpt.normalization,
                                        ckpt.threshold, ckpt.config_hash).eval()
        return torch.jit.script(pipeline)


def parity_inputs(run_dir: Path, cfg: dict[str, Any], count: int = 8
                  ) -> tuple[torch.Tensor, str]:
    """Native slices from the run's dataset for the parity check (uint8 ``N×3×H×W``).

    Picks ``count`` slices spread over the dataset, half of them with tumour. Falls back to
    smooth random images (with a warning) when the dataset is no longer there.

    Returns:
        ``(images, description)``.
    """
    from brainseg_dist.data.decode import SliceError, read_image
    from brainseg_dist.data.scan import list_slices

    root = rundir.data_root(run_dir, (cfg.get("data") or {}).get("data_dir"))
    table, _ = list_slices(root) if root.is_dir() else (None, [])
    if table is not None and len(table):
        tumour = np.array([Path(p).stat().st_size for p in table["mask_path"]])
        # Mask files with tumour compress worse than empty ones: a cheap way to pick both.
        order = np.argsort(-tumour, kind="stable")
        half = count // 2
        rows = list(order[:half]) + list(np.linspace(0, len(table) - 1, count - half,
                                                     dtype=int))
        images = []
        for i in dict.fromkeys(int(r) for r in rows):
            try:
                images.append(read_image(table["image_path"].iloc[i]))
            except SliceError:
                continue
        shapes = {im.shape for im in images}
        if images and len(shapes) == 1:
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            return x, f"{len(images)} slices of {root}"
    warn(f"{root}: dataset not found; checking export parity on synthetic random images")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(count, 3, 32, 32, generator=g)
    x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8), f"{count} random smooth images"


def outputs(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The module's output for each input batch (no autograd)."""
    with torch.no_grad():
        return [module(x) for x in inputs]


def max_abs_difference(reference: list[torch.Tensor], module: nn.Module,
                       inputs: list[torch.Tensor], threshold: float = 0.5) -> tuple[float, int]:
    """Compare a module's probabilities with reference outputs for the same input batches.

    Returns:
        ``(largest absolute difference, pixels whose mask at threshold differs)``.
    """
    worst, differing = 0.0, 0
    for ref, out in zip(reference, outputs(module, inputs), strict=True):
        worst = max(worst, float((ref - out).abs().max()))
        differing += int(((ref > threshold) != (out > threshold)).sum())
    return worst, differing


# ----------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_run` wrote and measured."""

    torchscript: Path
    max_abs_diff: float
    mask_pixels_differing: int
    metadata: dict[str, Any]
    pt2: Path | None = None
    pt2_max_abs_diff: float | None = None
    pt2_dynamic: str | None = None  # "batch+hw", "batch", "static" or None (not written)
    onnx: Any = None  # brainseg_dist.onnx_export.OnnxParity when model.onnx was written
    notes: list[str] = field(default_factory=list)


def _parity_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """The native uint8 batch, two slices as float, an odd-size crop (shrink path) and a
    small version (grow path): every input type and resize branch of the module."""
    h, w = x.shape[2], x.shape[3]
    crop = x[:2, :, : max(8, h * 25 // 32), : max(8, w * 15 // 16)]  # e.g. 200×240 of 256×256
    small = F.interpolate(x[:2].float(), size=(max(8, h // 3), max(8, w // 3)), mode="area")
    return [x, x[:2].float(), crop.contiguous(), small.round()]


def _export_program(pipeline: SegmentationPipeline, example: torch.Tensor
                    ) -> tuple[Any, str]:
    """``torch.export`` the eager pipeline: dynamic batch and H×W, else batch, else static."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    height = Dim("height", min=8, max=8192)
    width = Dim("width", min=8, max=8192)
    attempts = [("batch+hw", ({0: batch, 2: height, 3: width},)),
                ("batch", ({0: batch},)),
                ("static", None)]
    errors = []
    for name, dynamic in attempts:
        try:
            with torch.no_grad():
                program = torch.export.export(pipeline, (example,), dynamic_shapes=dynamic)
            return program, name
        except Exception as exc:  # export raises many error types; try the next variant
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise ExportError("torch.export failed: " + "; ".join(errors))


def export_run(run_dir: str | Path, checkpoint: str | Path = rundir.BEST,
               out: str | Path | None = None, tolerance: float = 1e-4, pt2: bool = True,
               parity_count: int = 6, verbose: bool = True, onnx: bool = True
               ) -> ExportResult:
    """Export a run's checkpoint to ``model.ts`` (TorchScript) and ``model.pt2`` (torch.export).

    The TorchScript file is written to a temporary name, loaded back and compared with the
    eager pipeline on slices of the run's dataset (uint8, float, and odd sizes); only if the
    largest absolute probability difference is within ``tolerance`` is it renamed into place.
    ``model.pt2`` is best effort: a failure is reported as a warning.

    Args:
        run_dir: training run directory.
        checkpoint: file name in ``run_dir``, or a path to a checkpoint elsewhere.
        out: TorchScript destination (default ``RUN_DIR/model.ts``); ``model.pt2`` goes next
            to it (same stem).
        tolerance: largest allowed absolute difference of probabilities.
        pt2: also write the ``torch.export`` program.
        onnx: also write ``model.onnx`` (:mod:`brainseg_dist.onnx_export`; best effort).
        parity_count: number of dataset slices in the parity check.
        verbose: print a short report on the console.

    Returns:
        :class:`ExportResult` with paths, parity figures and metadata.

    Raises:
        ExportError: scripting failed or parity is worse than ``tolerance``.
        BrainsegError: missing run directory or checkpoint.
    """
    run_dir = rundir.existing_run_dir(run_dir)
    # The run's own checkpoint first; a path that exists as given otherwise.
    ckpt_path = run_dir / checkpoint if (run_dir / checkpoint).is_file() else Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    out = Path(out) if out is not None else run_dir / rundir.TORCHSCRIPT
    if out.is_dir():
        raise BrainsegError(f"{out}: --out is a folder; give the TorchScript file name")
    check_writable(out.parent, "folder of --out")  # before the slow scripting and parity
    eager = build_pipeline(ckpt)
    images, source = parity_inputs(run_dir, ckpt.config.to_dict(), parity_count)
    try:
        scripted = script_pipeline(ckpt)
    except Exception as exc:  # the TorchScript compiler raises its own frontend errors
        raise ExportError(f"{ckpt.path}: TorchScript compilation failed ({exc})") from exc
    from brainseg_dist.model_card import model_card

    meta = {**metadata(ckpt), **model_card(ckpt, run_dir)}
    res = write_checked_exports(eager, scripted, images, source, out, meta, tolerance, pt2,
                                verbose, onnx)
    card = out.parent / METADATA_FILE  # beside the exports, as in a MONAI bundle
    atomic_write(card, lambda p: p.write_text(dumps_strict(res.metadata, indent=2)))
    return res


def export_torchscript(run_dir: str | Path) -> ExportResult:
    """Only a run's ``model.ts`` (and its model card), parity-checked: what ``predict`` needs
    when a run directory has none. The torch.export program and ONNX would add about 20 s on
    a CPU; ``brainseg export`` writes them."""
    return export_run(run_dir, pt2=False, onnx=False)


def write_checked_exports(eager: nn.Module, scripted: torch.jit.ScriptModule,
                          images: torch.Tensor, source: str, out: Path,
                          meta: dict[str, Any], tolerance: float, pt2: bool,
                          verbose: bool, onnx: bool = True) -> ExportResult:
    """Check a scripted pipeline against its eager twin, then write ``out`` (and ``.pt2``,
    ``.onnx``).

    Parity is measured on ``images`` and on float, cropped and small versions of them (every
    input type and resize branch); the file written is loaded back and checked again, so
    what lands on disk is what was checked.

    Raises:
        ExportError: parity worse than ``tolerance``.
    """
    threshold = float(getattr(eager, "threshold", 0.5))
    batches = _parity_batches(images)
    reference = outputs(eager, batches)
    diff, differing = max_abs_difference(reference, scripted, batches, threshold)
    meta = {**meta, "parity": {"source": source, "tolerance": tolerance, "max_abs_diff": diff,
                               "mask_pixels_differing": differing,
                               "inputs": "uint8, float, odd-size crop, small (grown)"}}
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(f"{out}: TorchScript output differs from the eager model by "
                          f"{diff:.3g} (tolerance {tolerance:g}) on {source}; not written")

    def write_checked(tmp: Path) -> None:
        with quiet_jit_deprecation():
            torch.jit.save(scripted, str(tmp),
                           _extra_files={METADATA_FILE: dumps_strict(meta, indent=2)})
        loaded, _ = load_torchscript(tmp)
        reloaded, _ = max_abs_difference(reference[:1], loaded, batches[:1])
        if not reloaded <= tolerance:
            raise ExportError(f"{out}: the saved TorchScript file differs from the eager "
                              f"model by {reloaded:.3g} after loading; not written")

    atomic_write(out, write_checked)
    res = ExportResult(out, diff, differing, meta)
    if verbose:
        console.print(f"wrote {out}: max |Δp| vs eager {diff:.2e} on {source} "
                      f"(tolerance {tolerance:g}); {differing} mask pixels differ")
    if pt2:
        _write_pt2(res, eager, images, batches, reference, out.with_suffix(".pt2"), tolerance,
                   verbose)
    if onnx:
        from brainseg_dist.onnx_export import write_onnx

        res.onnx = write_onnx(eager, images, batches, reference, out.with_suffix(".onnx"),
                              meta, tolerance, verbose)
    return res


def _write_pt2(res: ExportResult, eager: SegmentationPipeline, images: torch.Tensor,
               batches: list[torch.Tensor], reference: list[torch.Tensor], path: Path,
               tolerance: float, verbose: bool) -> None:
    """Write ``model.pt2`` (best effort): export, save, load back, check parity."""
    try:
        program, dynamic = _export_program(eager, images)
    except ExportError as exc:
        warn(f"{path}: not written ({exc}); model.ts is unaffected")
        res.notes.append(str(exc))
        return
    # The program asserts the example's dtype (uint8); float inputs are not part of it.
    keep = [i for i, b in enumerate(batches) if b.dtype == torch.uint8 and (
        dynamic == "batch+hw" or (dynamic == "batch" and b.shape[2:] == images.shape[2:])
        or b.shape == images.shape)]
    meta = {**res.metadata, "pt2_dynamic_shapes": dynamic, "pt2_input_dtype": "uint8"}
    if dynamic != "batch+hw":
        meta["pt2_input_size"] = list(images.shape[1:])
        note = f"{path}: dynamic H×W export failed; the program accepts {dynamic} shapes only"
        warn(note)
        res.notes.append(note)
    state: dict[str, Any] = {}

    def write_checked(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.export.save(program, buf, extra_files={METADATA_FILE: dumps_strict(meta)})
        data = buf.getvalue()
        tmp.write_bytes(data)
        # Load from the bytes just written (torch.export.load wants a name ending in .pt2).
        loaded = torch.export.load(io.BytesIO(data)).module()
        state["diff"], _ = max_abs_difference([reference[i] for i in keep], loaded,
                                              [batches[i] for i in keep])
        if not state["diff"] <= tolerance:
            raise ExportError(f"{path}: exported program differs from the eager model by "
                              f"{state['diff']:.3g} (tolerance {tolerance:g})")

    try:
        atomic_write(path, write_checked)
    except Exception as exc:  # best effort: model.ts is the primary artifact
        warn(f"{path}: not written ({type(exc).__name__}: {exc}); model.ts is unaffected")
        res.notes.append(str(exc))
        return
    res.pt2, res.pt2_max_abs_diff, res.pt2_dynamic = path, state["diff"], dynamic
    if verbose:
        console.print(f"wrote {path}: torch.export program, {dynamic} dynamic shapes, "
                      f"uint8 input, max |Δp| vs eager {state['diff']:.2e}")


def export_ensemble(cv_dir: str | Path, out: str | Path | None = None,
                    tolerance: float = 1e-4, pt2: bool = True,
                    verbose: bool = True) -> ExportResult:
    """Write a CV directory's fold ensemble as ``model.ts`` (and ``model.pt2``), checked.

    Besides the probability parity of :func:`~brainseg_dist.export.write_checked_exports`,
    the scripted ``segment`` must give the eager masks exactly.

    Raises:
        ExportError: compilation failed or outputs differ.
    """
    cv_dir = Path(cv_dir)
    out = Path(out) if out is not None else cv_dir / rundir.TORCHSCRIPT
    eager, meta = build_ensemble(cv_dir)  # each fold's checkpoint is read once
    setting = PostProcessing.from_dict(meta["ensemble"]["postprocessing"])
    traced = traced_ensemble(eager, setting)
    images, source = parity_inputs(rundir.fold_dir(cv_dir, 0), meta["config"], 6)
    try:
        with quiet_jit_deprecation():
            scripted = torch.jit.script(traced)
    except Exception as exc:  # the TorchScript compiler raises its own frontend errors
        raise ExportError(f"{cv_dir}: TorchScript compilation failed ({exc})") from exc
    with torch.no_grad():
        differing = int((eager.segment(images) != scripted.segment(images)).sum())
    if differing:
        raise ExportError(f"{out}: scripted segment() differs from the eager one in "
                          f"{differing} pixels; not written")
    meta["segment_parity"] = {"source": source, "mask_pixels_differing": differing}
    res = write_checked_exports(eager, scripted, images, source, out, meta, tolerance, pt2,
                                verbose)
    if verbose:
        console.print(f"fold ensemble of {meta['ensemble']['folds']} folds; post-processing: "
                      f"{meta['ensemble']['postprocessing']['description']}")
    return res
