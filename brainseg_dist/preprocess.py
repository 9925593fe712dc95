"""Intensity and size preprocessing: the one implementation that decoding, training, the
exported module and evaluation all call.

* :func:`to_unit`: uint8 (or 0..255 float) grey levels to float on a 0..1 scale;
* :func:`resample`: the training-size rule (area averaging when shrinking, bilinear with
  antialiasing when a side must grow); :func:`resize` rounds it to whole grey levels for
  slices, :func:`resize_mask` thresholds it at one half for masks;
* :func:`zscore`: per-slice, per-channel z-score, or z-score with given volume statistics
  (``N×C×2`` per slice in training, ``C×2`` for one volume); :func:`volume_stats` computes
  the statistics of one volume, :func:`volume_stats_by_patient` those of every slice's
  patient.

Everything here compiles under TorchScript and ``torch.export`` (the exported
``SegmentationPipeline`` calls it), so this module has no postponed annotations and reads no
module-level constant inside a function body (defaults are evaluated at definition time).
"""

import functools
from typing import Final

import torch
import torch.nn.functional as F

# Below this std (on a 0..1 scale) a slice channel is treated as flat, so near-empty slices at
# the top and bottom of the head are not blown up into noise by the z-score.
MIN_STD: Final = 0.02


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) ``N×C×H×W`` to float32 on a 0..1 scale."""
    return images.float() / 255.0


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="area")


def _grow(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def _windows(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-averaging windows from ``n`` inputs to ``size`` outputs: output ``i`` averages
    inputs ``floor(i n / size) .. ceil((i+1) n / size) - 1`` (adaptive average pooling, which
    ``mode="area"`` is). Returns the ``size×n`` 0/1 matrix and the window lengths."""
    i = torch.arange(size, device=device)
    start = (i * n) // size
    end = ((i + 1) * n + size - 1) // size
    j = torch.arange(n, device=device)
    window = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return window.float(), (end - start).float()


def _shrink_by_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`_shrink` as two matrix products, bit-identical on whole grey levels. Used when
    exporting: the ONNX exporter cannot decompose adaptive pooling at a symbolic H×W."""
    wh, nh = _windows(x.shape[2], size, x.device)
    ww, nw = _windows(x.shape[3], size, x.device)
    sums = torch.einsum("sh,nchw,tw->ncst", wh, x, ww)
    return sums / nh[:, None] / nw[None, :]  # height, then width: the pool's rounding order


def _resize_branch(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[2] >= size and x.shape[3] >= size:
        return _shrink(x, size)
    return _grow(x, size)


def resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """The training-size rule on float ``N×C×H×W``: area averaging when both sides shrink
    (or stay), bilinear with antialiasing when a side must grow. Not rounded."""
    if torch.jit.is_scripting():
        return _resize_branch(x, size)
    if torch.compiler.is_exporting():
        # A Python `if` on symbolic H/W would pin the exported program to one branch;
        # torch.cond keeps both so the program accepts any H×W.
        pred = (x.shape[2] >= size) & (x.shape[3] >= size)
        return torch.cond(pred, functools.partial(_shrink_by_windows, size=size),
                          functools.partial(_grow, size=size), (x,))
    return _resize_branch(x, size)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Slices ``N×C×H×W`` (uint8 or 0..255 float) to the training size ``S×S`` by
    :func:`resample`, rounded to whole grey levels in [0, 255] (float, as uint8 values)."""
    return resample(images.float(), size).round().clamp(0.0, 255.0)


def resize_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """0/1 masks ``N×1×H×W`` to ``N×1×S×S`` bool: :func:`resample`, then threshold at ½."""
    return resample(masks.float(), size) >= 0.5


def volume_stats(x01: torch.Tensor) -> torch.Tensor:
    """Per-channel ``(mean, std)`` (``C×2``) of one volume ``N×C×H×W`` on a 0..1 scale."""
    c = x01.shape[1]
    vol = x01.transpose(0, 1).reshape(c, -1)
    return torch.stack([vol.mean(1), vol.std(1)], dim=1)


def volume_stats_by_patient(images, patient_codes) -> torch.Tensor:
    """:func:`volume_stats` of each slice's patient: ``N×C×2`` float32.

    Args:
        images: ``N×C×H×W`` uint8 array or tensor (all slices).
        patient_codes: ``N`` integer patient ids.
    """
    images = torch.as_tensor(images)
    codes = torch.as_tensor(patient_codes)
    out = torch.zeros(len(images), images.shape[1], 2)
    for code in codes.unique():
        sel = codes == code
        out[sel] = volume_stats(to_unit(images[sel]))
    return out


def zscore(x01: torch.Tensor, stats: torch.Tensor | None = None,
           min_std: float = MIN_STD) -> torch.Tensor:
    """Z-score ``N×C×H×W`` images on a 0..1 scale; the std is floored at ``min_std``.

    Args:
        x01: the images.
        stats: None for per-slice, per-channel statistics; else ``(mean, std)`` in the last
            dimension: ``N×C×2`` (one row per slice) or ``C×2`` (one volume).
        min_std: floor of the std.
    """
    if stats is None:
        mean = x01.mean(dim=(2, 3), keepdim=True)
        std = x01.std(dim=(2, 3), keepdim=True).clamp_min(min_std)
    else:
        mean = stats[..., 0, None, None]
        std = stats[..., 1, None, None].clamp_min(min_std)
    return (x01 - mean) / std


def normalize(images: torch.Tensor, mode: str = "slice",
              stats: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (or 0..255 float) images to the network's input: :func:`to_unit`, then
    :func:`zscore` per slice (``slice``) or with the volume statistics ``stats`` (``volume``).

    Raises:
        ValueError: unknown mode, or ``volume`` without statistics.
    """
    x = to_unit(images)
    if mode == "slice":
        return zscore(x)
    if mode == "volume":
        if stats is None:
            raise ValueError("volume normalization needs volume statistics")
        return zscore(x, stats)
    raise ValueError(f"unknown normalization {mode!r}")
