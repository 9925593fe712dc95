"""The inference core: from a trained checkpoint (or an exported ``model.ts``) to tumour
probabilities and masks. ``evaluate``, ``export`` and ``predict`` all stand on it.

:class:`SegmentationPipeline` takes a batch of raw slices (uint8, or float on the 0..255
scale), ``N×3×H×W`` at any ``H×W``, and returns tumour probabilities ``N×1×H×W`` (float32):

1. :func:`brainseg_dist.preprocess.resize` to the training size ``S×S`` (the rule training's
   decoding used);
2. the training normalization (:func:`brainseg_dist.preprocess.zscore`): ``slice`` z-scores
   every slice and channel; ``volume`` uses the mean/std of the whole input batch, so pass one
   patient's complete stack of slices as one batch (or call ``predict_with_stats`` with
   statistics from ``volume_stats``);
3. the U-Net and a sigmoid;
4. bilinear resize of the probabilities back to ``H×W``.

Threshold the output at the module's ``threshold`` attribute for a mask. The same module is
scripted into ``model.ts`` and exported to ``model.pt2`` by :mod:`brainseg_dist.export`.

Around it: building it from a checkpoint (:func:`from_checkpoint`), loading a ``model.ts``
(:func:`load_torchscript`), batched prediction of a whole patient volume with optional flip
TTA (:func:`predict_volume`, :func:`patient_probabilities`); the 3D post-processing is
:mod:`brainseg_dist.postprocess`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_dist import checkpoint, preprocess
from brainseg_dist.checkpoint import Checkpoint
from brainseg_dist.config import Normalization, choices
from brainseg_dist.console import warn
from brainseg_dist.data.decode import SliceError, read_pair
from brainseg_dist.errors import BrainsegError, DataProblem, DatasetError
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
        if normalization not in choices(Normalization):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.unet = unet
        self.image_size = int(image_size)
        self.normalization = str(normalization)
        self.threshold = float(threshold)
        self.config_hash = str(config_hash)
        self.min_std = float(preprocess.MIN_STD)
        self.format_version = FORMAT_VERSION

    @torch.jit.export
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``N×3×H×W`` uint8/float (0..255) -> float ``N×3×S×S`` on the 0..255 grey-level grid."""
        return preprocess.resize(x, self.image_size)

    @torch.jit.export
    def volume_stats(self, resized: torch.Tensor) -> torch.Tensor:
        """Per-channel ``(mean, std)`` (``3×2``, 0..1 scale) of a stack of prepared slices."""
        return preprocess.volume_stats(preprocess.to_unit(resized))

    def _normalize(self, resized: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        x = preprocess.to_unit(resized)
        if self.normalization == "volume":
            if stats is None:
                stats = preprocess.volume_stats(x)
            return preprocess.zscore(x, stats, self.min_std)
        return preprocess.zscore(x, None, self.min_std)

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


def build_unet(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's U-Net in eval mode, contiguous memory format, on the CPU."""
    args = ckpt.model_args
    unet = build_model(int(args["base_width"]), int(args["depth"]), channels_last=False,
                       norm=str(args["norm"]))
    try:
        unet.load_state_dict(ckpt.state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BrainsegError(f"{ckpt.path}: weights do not fit the U-Net its metadata describes "
                            f"({str(exc).strip().splitlines()[0]})") from None
    return unet.eval()


def from_checkpoint(path: str | Path) -> tuple[SegmentationPipeline, Checkpoint]:
    """Load a checkpoint (safely) and build its eager pipeline (eval mode, CPU)."""
    ckpt = checkpoint.load(path)
    return build_pipeline(ckpt), ckpt


def build_pipeline(ckpt: Checkpoint) -> SegmentationPipeline:
    """The eager end-to-end pipeline of a loaded checkpoint (eval mode, CPU)."""
    return SegmentationPipeline(build_unet(ckpt), ckpt.image_size, ckpt.normalization,
                                ckpt.threshold, ckpt.config_hash).eval()


def metadata(ckpt: Checkpoint, **extra: Any) -> dict[str, Any]:
    """The metadata stored in ``model.ts`` (``metadata.json``) and ``model.pt2``."""
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
        "config": ckpt.config.to_dict(),
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


# ----------------------------------------------------------------------------- prediction
def check_device(device: str, batch_size: int = 1) -> torch.device:
    """Parse ``--device`` and check it exists here (and ``--batch-size``), before any model
    or data is read.

    Raises:
        BrainsegError: not a device name torch knows, CUDA missing, or a batch size below 1.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise BrainsegError(f"--device {device}: not a device name; use cpu, cuda or cuda:N"
                            ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BrainsegError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BrainsegError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here")
    elif parsed.type != "cpu":
        raise BrainsegError(f"--device {device}: unsupported device type; use cpu or cuda")
    if batch_size < 1:
        raise BrainsegError(f"--batch-size {batch_size}: must be >= 1")
    return parsed


def stack_volume_stats(module: Any, batches: list[torch.Tensor], device: str | torch.device
                       ) -> torch.Tensor:
    """Volume statistics (``3×2``) of one patient's slices given as batches (possibly of
    different sizes), each resized by the module's ``prepare`` first, so the statistic is
    the one training computed from its resized slices."""
    resized = [module.prepare(b.to(device)) for b in batches]
    return module.volume_stats(torch.cat(resized))


@torch.no_grad()
def predict_volume(module: Any, images: torch.Tensor, batch_size: int = 32,
                   device: str | torch.device = "cpu", flip: bool = False,
                   stats: torch.Tensor | None = None) -> torch.Tensor:
    """Tumour probabilities for a stack of slices, in batches.

    Works with the eager :class:`SegmentationPipeline` and with a loaded ``model.ts`` (same
    methods).

    Args:
        module: the pipeline (eval mode, on ``device``).
        images: ``N×3×H×W`` uint8 (or 0..255 float) on the CPU.
        batch_size: slices per forward pass.
        device: where the module runs.
        flip: run on horizontally flipped slices and flip the probabilities back (for TTA).
        stats: volume statistics for ``volume`` normalization (:func:`stack_volume_stats` of
            the whole patient); None for ``slice`` normalization.

    Returns:
        ``N×1×H×W`` float32 probabilities on the CPU.
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        if flip:
            x = x.flip(-1)
        p = module(x) if stats is None else module.predict_with_stats(x, stats)
        if flip:
            p = p.flip(-1)
        out.append(p.float().cpu())
    if not out:
        return torch.zeros(0, 1, *images.shape[2:])
    return torch.cat(out)


def read_folder(rows: pd.DataFrame, skip_invalid: bool = False
                ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Native images ``N×H×W×3`` and masks ``N×H×W`` (0/1) of one patient folder's rows of
    the slice table, and the rows kept.

    Raises:
        DatasetError: unreadable slices (all of them named), or slices of different sizes.
    """
    images, masks, keep, problems = [], [], [], []
    for i, (ip, mp) in enumerate(zip(rows["image_path"], rows["mask_path"], strict=True)):
        try:
            image, mask = read_pair(ip, mp)
        except SliceError as exc:
            problems.append(exc.problem)
            continue
        images.append(image)
        masks.append(mask)
        keep.append(i)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        problems.append(DataProblem(Path(rows["image_path"].iloc[0]).parent,
                                    f"slices of different sizes {sorted(shapes)}"))
        images = []
    if problems and (not skip_invalid or not images):
        raise DatasetError(problems)
    for p in problems:
        warn(f"skipped {p}")
    return np.stack(images), np.stack(masks), rows.iloc[keep]


def patient_probabilities(module: Any, images: np.ndarray, normalization: str,
                          batch_size: int, device: str | torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A patient's native-resolution probabilities, plain and horizontally flipped (the two
    halves of flip TTA), with volume statistics of the whole patient when ``normalization``
    is ``volume``.

    Args:
        module: the pipeline (eager or ``model.ts``) on ``device``.
        images: the patient's native slices ``N×H×W×3`` uint8 (:func:`read_folder`).

    Returns:
        ``(p_identity, p_flipped)``, each ``N×H×W`` float32 on the CPU.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    stats = stack_volume_stats(module, [x], device) if normalization == "volume" else None
    p_id = predict_volume(module, x, batch_size, device, stats=stats)[:, 0]
    p_flip = predict_volume(module, x, batch_size, device, flip=True, stats=stats)[:, 0]
    return p_id, p_flip


def patient_masks(module: Any, images: list[np.ndarray], volume: bool, threshold: float,
                  segment: bool, batch_size: int, device: str | torch.device
                  ) -> list[np.ndarray]:
    """Masks (``H×W`` bool) of one patient folder's slices ``H×W×3`` uint8, whose sizes may
    differ: slices of equal size are batched together.

    Args:
        module: the pipeline or ``model.ts`` on ``device``.
        images: the folder's slices, in order.
        volume: ``volume`` normalization (statistics of the whole folder).
        threshold: probability threshold.
        segment: use the module's ``segment`` (a fold ensemble's own 3D post-processing).
        batch_size: slices per forward pass.
        device: where the module runs.
    """
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        sizes.setdefault(im.shape[:2], []).append(i)
    stacks = {hw: torch.from_numpy(np.stack([images[i] for i in idx]))
              .permute(0, 3, 1, 2).contiguous() for hw, idx in sizes.items()}
    stats = stack_volume_stats(module, list(stacks.values()), device) if volume else None
    masks: list[np.ndarray] = [np.zeros(0)] * len(images)
    for hw, idx in sizes.items():
        if segment:
            with torch.no_grad():
                m = module.segment(stacks[hw].to(device))[:, 0].bool().cpu()
        else:
            m = predict_volume(module, stacks[hw], batch_size, device, stats=stats)[:, 0] \
                > threshold
        for j, i in enumerate(idx):
            masks[i] = m[j].numpy()
    return masks
