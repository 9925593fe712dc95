"""Device-side, batched augmentation (Kornia).

The CPU loader hands over uint8 batches; everything here runs on the training device. Image and
mask are stacked into one tensor so every geometric transform is applied to both with the same
parameters; the warped mask is thresholded at one half so it stays binary.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from brainseg_dist.config import AugmentConfig
from brainseg_dist.preprocess import to_unit


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
        return self.gamma(to_unit(images)) * 255.0

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
