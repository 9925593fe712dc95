"""Export a trained run as one end-to-end module: TorchScript ``model.ts`` and ``model.pt2``.

The exported module takes a batch of raw slices (uint8, or float on the 0..255 scale),
``N×3×H×W`` at any ``H×W``, and returns tumour probabilities ``N×1×H×W`` (float32):

1. resize to the training size ``S×S``: area averaging when shrinking (what training did to
   the 256×256 slices), bilinear with antialiasing when a side must grow; the result is
   rounded to whole grey levels, as training rounded its area-resized uint8 slices;
2. the training normalization: ``slice`` z-scores every slice and channel (std clamped at
   :data:`brainseg_dist.augment.MIN_STD`); ``volume`` uses the mean/std of the whole input
   batch, so pass one patient's complete stack of slices as one batch (or call
   ``predict_with_stats`` with statistics from ``volume_stats``);
3. the U-Net and a sigmoid;
4. bilinear resize of the probabilities back to ``H×W``.

Threshold the output at the module's ``threshold`` attribute for a mask. The TorchScript file
needs only ``torch`` to load; its metadata is stored both as module attributes and as the extra
file ``metadata.json``.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_dist.augment import MIN_STD
from brainseg_dist.console import console, warn
from brainseg_dist.data.synth import run_data_root
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, check_writable, dumps_strict, load_checkpoint_file
from brainseg_dist.model import build_model

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# torch 2.13 deprecates TorchScript; every torch.jit entry point warns with
# DeprecationWarning "`torch.jit.<name>` is deprecated. Please switch to `torch.compile` or
# `torch.export`." We keep TorchScript on purpose (a model.ts loads with torch alone, from
# Python or C++), so exactly that warning is silenced around our own jit calls.
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence only torch's TorchScript deprecation warning inside the ``with`` block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
        yield


class ExportError(BrainsegError):
    """Export failed, or the exported module disagrees with the eager one."""


class SegmentationPipeline(nn.Module):
    """Raw slices in, tumour probabilities out: resize, normalize, U-Net, sigmoid, resize back.

    Scriptable (TorchScript) and exportable (``torch.export``) with the same code; the
    typed attributes travel with the scripted module as metadata.

    Args:
        unet: the trained U-Net in eval mode (eager, or traced for TorchScript).
        image_size: training size S.
        normalization: ``"slice"`` or ``"volume"``.
        threshold: probability threshold used in training and evaluation.
        config_hash: :meth:`brainseg_dist.config.Config.hash` of the run.
    """

    # Attribute types (int, str, float) are inferred by TorchScript from the values set in
    # __init__; class-level annotations would be strings here (postponed evaluation), which
    # the TorchScript compiler rejects.

    def __init__(self, unet: nn.Module, image_size: int, normalization: str, threshold: float,
                 config_hash: str):
        super().__init__()
        if normalization not in ("slice", "volume"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.unet = unet
        self.image_size = int(image_size)
        self.normalization = str(normalization)
        self.threshold = float(threshold)
        self.config_hash = str(config_hash)
        self.min_std = float(MIN_STD)
        self.format_version = FORMAT_VERSION

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="area")

    def _grow(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True)

    def _resize_branch(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] >= self.image_size and x.shape[3] >= self.image_size:
            return self._shrink(x)
        return self._grow(x)

    @torch.jit.export
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``N×3×H×W`` uint8/float (0..255) -> float ``N×3×S×S`` on the 0..255 grey-level grid."""
        x = x.float()
        if torch.jit.is_scripting():
            r = self._resize_branch(x)
        elif torch.compiler.is_exporting():
            # A Python `if` on symbolic H/W would pin the exported program to one branch;
            # torch.cond keeps both so the program accepts any H×W.
            pred = (x.shape[2] >= self.image_size) & (x.shape[3] >= self.image_size)
            r = torch.cond(pred, self._shrink, self._grow, (x,))
        else:
            r = self._resize_branch(x)
        # Training area-resized uint8 slices and rounded them back to uint8.
        return r.round().clamp(0.0, 255.0)

    @torch.jit.export
    def volume_stats(self, resized: torch.Tensor) -> torch.Tensor:
        """Per-channel ``(mean, std)`` (``3×2``, 0..1 scale) of a stack of prepared slices.

        Same statistic as :func:`brainseg_dist.augment.volume_statistics` for one patient.
        """
        c = resized.shape[1]
        vol = (resized / 255.0).transpose(0, 1).reshape(c, -1)
        return torch.stack([vol.mean(1), vol.std(1)], dim=1)

    def _normalize(self, resized: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        x = resized / 255.0
        if self.normalization == "volume":
            if stats is None:
                stats = self.volume_stats(resized)
            mean = stats[:, 0].reshape(1, -1, 1, 1)
            std = stats[:, 1].reshape(1, -1, 1, 1).clamp_min(self.min_std)
            return (x - mean) / std
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(self.min_std)
        return (x - mean) / std

    def _probabilities(self, x: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        z = self._normalize(self.prepare(x), stats)
        probs = torch.sigmoid(self.unet(z).float())
        return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)

    @torch.jit.export
    def predict_with_stats(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Probabilities with given volume statistics (``3×2``; ignored for ``slice``)."""
        return self._probabilities(x, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N×3×H×W`` uint8/float (0..255) -> probabilities ``N×1×H×W`` float32."""
        return self._probabilities(x, None)


@dataclass
class Checkpoint:
    """A loaded training checkpoint and what the pipeline needs from it."""

    path: Path
    state: dict[str, Any]
    image_size: int
    normalization: str
    threshold: float
    config_hash: str
    model_args: dict[str, int]
    epoch: int | None = None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``best.pt``/``last.pt`` written by training.

    Raises:
        BrainsegError: missing file, unreadable file or missing keys (named in the message).
    """
    path = Path(path)
    state = load_checkpoint_file(path)  # weights_only=True: opening it cannot run code
    missing = [k for k in ("model", "model_args", "image_size", "normalization", "threshold")
               if k not in state]
    if missing:
        raise BrainsegError(f"{path}: not a brainseg checkpoint (missing {', '.join(missing)})")
    try:
        return Checkpoint(path, state, int(state["image_size"]), str(state["normalization"]),
                          float(state["threshold"]), str(state.get("config_hash", "")),
                          {k: int(state["model_args"][k]) for k in ("base_width", "depth")},
                          state.get("epoch"))
    except (TypeError, ValueError, KeyError) as exc:
        raise BrainsegError(f"{path}: not a brainseg checkpoint (bad metadata: "
                            f"{type(exc).__name__}: {exc})") from None


def build_unet(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's U-Net in eval mode, contiguous memory format, on the CPU."""
    unet = build_model(ckpt.model_args["base_width"], ckpt.model_args["depth"],
                       channels_last=False)
    try:
        unet.load_state_dict(ckpt.state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BrainsegError(f"{ckpt.path}: weights do not fit the U-Net its metadata describes "
                            f"({str(exc).strip().splitlines()[0]})") from None
    return unet.eval()


def build_pipeline(ckpt: Checkpoint) -> SegmentationPipeline:
    """The eager end-to-end pipeline of a checkpoint (eval mode, CPU)."""
    return SegmentationPipeline(build_unet(ckpt), ckpt.image_size, ckpt.normalization,
                                ckpt.threshold, ckpt.config_hash).eval()


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


def metadata(ckpt: Checkpoint, **extra: Any) -> dict[str, Any]:
    """The metadata stored in ``model.ts`` (``metadata.json``) and ``model.pt2``."""
    cfg = ckpt.state.get("config") or {}
    return {
        "format_version": FORMAT_VERSION,
        "threshold": ckpt.threshold,
        "image_size": ckpt.image_size,
        "normalization": ckpt.normalization,
        "config_hash": ckpt.config_hash,
        "model_args": ckpt.model_args,
        "checkpoint": str(ckpt.path),
        "checkpoint_epoch": ckpt.epoch,
        "input": "N×3×H×W uint8 or float in [0, 255] (pre-contrast, FLAIR, post-contrast), "
                 "any H×W",
        "output": "N×1×H×W float32 tumour probabilities; mask = probabilities > threshold",
        "volume_normalization": ("statistics of the whole input batch: pass one patient's "
                                 "full stack as one batch") if ckpt.normalization == "volume"
        else None,
        "config": cfg,
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def load_torchscript(path: str | Path, device: str | torch.device = "cpu"
                     ) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load ``model.ts`` and its ``metadata.json``.

    Raises:
        BrainsegError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainsegError(f"{path}: model file not found")
    files = {METADATA_FILE: ""}
    try:
        with quiet_jit_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=files)
    except Exception as exc:  # torch raises RuntimeError and others for bad archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrainsegError(f"{path}: not a loadable TorchScript model ({first})") from None
    raw = files[METADATA_FILE]
    try:
        meta = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BrainsegError(f"{path}: damaged {METADATA_FILE} inside the model ({exc})"
                            ) from None
    missing = [name for name in ("prepare", "volume_stats", "predict_with_stats", "threshold",
                                 "normalization", "image_size") if not hasattr(module, name)]
    if missing:
        raise BrainsegError(f"{path}: a TorchScript model, but not a brainseg segmentation "
                            f"model (lacks {', '.join(missing)}); export one with "
                            "`brainseg export RUN_DIR`")
    version = getattr(module, "format_version", FORMAT_VERSION)
    if not isinstance(meta, dict) or int(version) > FORMAT_VERSION:
        raise BrainsegError(f"{path}: model format version {version} is newer than this "
                            f"brainseg reads ({FORMAT_VERSION}); update brainseg-dist")
    return module.eval(), meta


# ----------------------------------------------------------------------------- parity inputs
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

    root = run_data_root(run_dir, (cfg.get("data") or {}).get("data_dir"))
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


def export_run(run_dir: str | Path, checkpoint: str | Path = "best.pt",
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
    from brainseg_dist.rundir import existing_run_dir

    run_dir = existing_run_dir(run_dir)
    # The run's own checkpoint first; a path that exists as given otherwise.
    ckpt_path = run_dir / checkpoint if (run_dir / checkpoint).is_file() else Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    out = Path(out) if out is not None else run_dir / "model.ts"
    if out.is_dir():
        raise BrainsegError(f"{out}: --out is a folder; give the TorchScript file name")
    check_writable(out.parent, "folder of --out")  # before the slow scripting and parity
    eager = build_pipeline(ckpt)
    images, source = parity_inputs(run_dir, ckpt.state.get("config") or {}, parity_count)
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
