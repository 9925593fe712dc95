"""Device-side, batched augmentation (Kornia) and intensity normalization.

The CPU loader hands over uint8 batches; everything here runs on the training device. Image and
mask are stacked into one tensor so every geometric transform is applied to both with the same
parameters; the warped mask is thresholded at one half so it stays binary.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from brainseg_dist.config import AugmentConfig

# Below this std (on a 0..1 scale) a slice channel is treated as flat, so near-empty slices at
# the top and bottom of the head are not blown up into noise by the z-score.
MIN_STD = 0.02


def normalize_slices(images: torch.Tensor) -> torch.Tensor:
    """Per-slice, per-channel z-score of a float ``N×C×H×W`` batch in [0, 1]."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True).clamp_min(MIN_STD)
    return (images - mean) / std


def normalize(images: torch.Tensor, mode: str = "slice",
              volume_stats: torch.Tensor | None = None) -> torch.Tensor:
    """Scale uint8 (or 0..255 float) images to float and normalize them.

    Args:
        images: ``N×3×H×W`` uint8 or float in [0, 255].
        mode: ``"slice"`` (z-score each slice and channel) or ``"volume"`` (z-score with the
            mean/std of the slice's whole patient volume, given in ``volume_stats``).
        volume_stats: ``N×3×2`` (mean, std) per slice's patient on a 0..1 scale; volume mode.

    Returns:
        float32 ``N×3×H×W`` in the input's memory format.
    """
    x = images.float() / 255.0
    if mode == "slice":
        return normalize_slices(x)
    if mode == "volume":
        if volume_stats is None:
            raise ValueError("volume normalization needs volume_stats")
        mean = volume_stats[..., 0, None, None]
        std = volume_stats[..., 1, None, None].clamp_min(MIN_STD)
        return (x - mean) / std
    raise ValueError(f"unknown normalization {mode!r}")


def volume_statistics(images, patient_codes) -> torch.Tensor:
    """Per-slice ``(mean, std)`` of its patient's volume, per channel, on a 0..1 scale.

    Args:
        images: ``N×3×H×W`` uint8 array or tensor (all slices).
        patient_codes: ``N`` integer patient ids.

    Returns:
        ``N×3×2`` float32 tensor.
    """
    images = torch.as_tensor(images)
    codes = torch.as_tensor(patient_codes)
    out = torch.zeros(len(images), images.shape[1], 2)
    for code in codes.unique():
        sel = codes == code
        vol = images[sel].float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
        out[sel, :, 0] = vol.mean(1)
        out[sel, :, 1] = vol.std(1)
    return out


def fill_missing_sequences(images: torch.Tensor, p: float) -> torch.Tensor:
    """Replace pre-contrast (channel 0) and, independently, post-contrast (channel 2) with
    FLAIR (channel 1), each with probability ``p`` per slice.

    kaggle_3m stores FLAIR in the place of a sequence a patient lacks, and FLAIR-only input is
    filled the same way, so the model should see such slices in training.

    Args:
        images: ``N×3×H×W`` (pre-contrast, FLAIR, post-contrast), any dtype.
        p: probability per slice and replaced channel.

    Returns:
        A new tensor of the same dtype and memory format.
    """
    n = images.shape[0]
    drop = torch.rand(n, 2, device=images.device) < p
    flair = images[:, 1:2]
    pre = torch.where(drop[:, 0, None, None, None], flair, images[:, 0:1])
    post = torch.where(drop[:, 1, None, None, None], flair, images[:, 2:3])
    out = torch.cat([pre, flair, post], dim=1)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class DeviceAugment(nn.Module):
    """Random rotation, flips, elastic deformation and optional intensity jitter on a batch.

    :meth:`intensity` (gamma) runs on raw images before normalization; :meth:`forward`
    (geometry, then the optional gain/bias jitter) on normalized ones.

    Args:
        cfg: probabilities and strengths; ``cfg.enabled=False`` makes this the identity.
    """

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        self.cfg = cfg
        ops: list[nn.Module] = []
        if cfg.hflip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip_p))
        if cfg.vflip_p > 0:
            ops.append(K.RandomVerticalFlip(p=cfg.vflip_p))
        if cfg.rotation_p > 0 and cfg.rotation_degrees > 0:
            ops.append(K.RandomRotation(degrees=cfg.rotation_degrees, p=cfg.rotation_p))
        if cfg.elastic_p > 0:
            k = 2 * int(3 * cfg.elastic_sigma) + 1
            ops.append(K.RandomElasticTransform(
                kernel_size=(k, k), sigma=(cfg.elastic_sigma, cfg.elastic_sigma),
                alpha=(cfg.elastic_alpha, cfg.elastic_alpha), p=cfg.elastic_p))
        self.geometric = nn.Sequential(*ops)
        self.gamma = None
        if cfg.gamma_p > 0 and cfg.gamma_range > 0:
            r = cfg.gamma_range
            self.gamma = K.RandomGamma(gamma=(1 / (1 + r), 1 + r), p=cfg.gamma_p)

    @torch.no_grad()
    def intensity(self, images: torch.Tensor) -> torch.Tensor:
        """Changes of raw images (uint8 or float on the 0..255 scale), before normalization:
        a missing pre- or post-contrast sequence filled with FLAIR, then random gamma.
        Returns the input unchanged when both are off or in eval mode."""
        if not self.cfg.enabled or not self.training:
            return images
        if self.cfg.missing_sequence_p > 0:
            images = fill_missing_sequences(images, self.cfg.missing_sequence_p)
        if self.gamma is None:
            return images
        return self.gamma(images.float() / 255.0) * 255.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        """Augment normalized float images ``N×3×H×W`` and 0/1 masks ``N×1×H×W`` together."""
        if not self.cfg.enabled or not self.training:
            return images, masks
        c = images.shape[1]
        stacked = torch.cat([images, masks.to(images.dtype)], dim=1)
        if len(self.geometric):
            stacked = self.geometric(stacked)
        images, masks = stacked[:, :c], (stacked[:, c:] >= 0.5).to(masks.dtype)
        if self.cfg.intensity_p > 0:
            n = images.shape[0]
            apply = (torch.rand(n, 1, 1, 1, device=images.device) < self.cfg.intensity_p)
            s = self.cfg.intensity_strength
            gain = 1 + (torch.rand(n, c, 1, 1, device=images.device) * 2 - 1) * s
            bias = (torch.rand(n, c, 1, 1, device=images.device) * 2 - 1) * s
            images = torch.where(apply, images * gain + bias, images)
        return images, masks
