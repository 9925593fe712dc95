"""Device-side, batched augmentation (Kornia).

The CPU loader hands over uint8 batches; everything here runs on the training device. Image and
mask are stacked into one tensor so every geometric transform is applied to both with the same
parameters; the warped mask is thresholded at one half so it stays binary.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from kornia.geometry import create_meshgrid
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


def _range(low: float, high: float, device: torch.device) -> torch.Tensor:
    """A Kornia parameter range as a float32 tensor on ``device`` (see ``DeviceAugment``)."""
    return torch.tensor([low, high], dtype=torch.float32, device=device)


def elastic_kernel_size(sigma: float) -> int:
    """The Gaussian's support for the displacement field: ±3 sigma, odd."""
    return 2 * int(3 * sigma) + 1


def band_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """``size×size`` matrix ``B`` with ``(B @ v)[i] = Σ_j kernel[j - i + r] v[j]``: a
    convolution with an odd ``kernel`` (radius ``r``) and a zero border, as a matrix. ``B``
    depends on ``j - i`` alone, so the one of a smaller size is its top-left block."""
    r = kernel.numel() // 2
    i = torch.arange(size, device=kernel.device)
    offset = i[None, :] - i[:, None] + r
    taps = kernel[offset.clamp(0, 2 * r)]
    return torch.where((offset >= 0) & (offset <= 2 * r), taps, torch.zeros_like(taps))


# The side up to which FusedGeometry slices its blur matrix from one made at construction
# (1 MB in float32); larger images build theirs at each call.
BLUR_SIZE = 512


class FusedGeometry(nn.Module):
    """Flips, rotation and elastic deformation resampled once, through one sampling grid.

    The sequential Kornia ops (flip, then rotation, then elastic) resample the batch once
    each; here the elastic displacement field, the inverse rotation and the flips are
    composed into one grid and the batch is sampled once (the mask is also blurred once, not
    three times). Each transform is drawn as its Kornia op draws it: a flip with its
    probability, an angle uniform in ±``rotation_degrees`` applied with ``rotation_p``, and a
    displacement field of uniform noise smoothed by Kornia's Gaussian (zero border) and
    scaled by ``elastic_alpha``, applied with ``elastic_p``. Nothing waits on the device.

    Args:
        cfg: the probabilities and strengths (``augment.*``).
    """

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        self.cfg = cfg
        k = elastic_kernel_size(cfg.elastic_sigma)
        kernel = get_gaussian_kernel1d(k, cfg.elastic_sigma)[0]
        self.register_buffer("kernel", kernel, persistent=False)
        # Made once, here: a matrix cached at the first call would be a graph output under
        # torch.compile, which a CUDA graph (mode reduce-overhead) overwrites at its next
        # replay, and filling a cache later changes what the compiled code was guarded on.
        self.register_buffer("blur", band_matrix(kernel, BLUR_SIZE), persistent=False)

    def blur_matrix(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``size×size`` banded matrix ``B`` with ``(B @ v)[i] = Σ_j kernel[j - i + r] v[j]``:
        Kornia's Gaussian as a zero-border convolution (``filter2d_separable`` with
        ``border_type="constant"``), computed as a matrix product. At sigma 16 the kernel
        spans 97 of 128 pixels, where one matrix multiply beats a convolution. Up to
        :data:`BLUR_SIZE` it is a block of the one made at construction."""
        if size <= self.blur.shape[0]:
            return self.blur[:size, :size].to(device, dtype)
        return band_matrix(self.kernel.to(device, dtype), size)

    def grid(self, draws: torch.Tensor, noise: torch.Tensor | None, h: int, w: int
             ) -> torch.Tensor:
        """The ``N×H×W×2`` sampling grid (``align_corners=True`` coordinates) of given draws.

        Args:
            draws: ``N×5`` uniforms in [0, 1): hflip, vflip, rotate or not, angle, elastic
                or not (each compared with its probability, as Kornia's ops do).
            noise: ``N×2×H×W`` uniform noise in [-1, 1) for the displacement field, or None.
            h: height.
            w: width.
        """
        cfg, n = self.cfg, draws.shape[0]
        grid = create_meshgrid(h, w, normalized_coordinates=True, device=draws.device)
        grid = grid.expand(n, h, w, 2)
        if noise is not None:
            disp = (self.blur_matrix(h, noise.device, noise.dtype) @ noise
                    @ self.blur_matrix(w, noise.device, noise.dtype).T)
            on = (draws[:, 4] < cfg.elastic_p).to(disp.dtype)[:, None, None, None]
            # RandomElasticTransform samples with align_corners=False, where one normalized
            # unit is W/2 pixels, not (W-1)/2: the same shift in pixels.
            # (Python scalars: a tensor made from a list would be a blocking host copy.)
            dx = disp[:, 0] * (cfg.elastic_alpha * w / max(w - 1, 1))
            dy = disp[:, 1] * (cfg.elastic_alpha * h / max(h - 1, 1))
            grid = grid + torch.stack([dx, dy], dim=-1) * on
        # Sampling runs backwards: displace, undo the rotation, then the flips.
        angle = torch.where(draws[:, 2] < cfg.rotation_p,
                            (draws[:, 3] * 2 - 1) * cfg.rotation_degrees,
                            torch.zeros_like(draws[:, 3])) * (math.pi / 180)
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        # Pixel offsets from the centre, so a rotation of a non-square image stays a rotation.
        cx, cy = max((w - 1) / 2, 1e-9), max((h - 1) / 2, 1e-9)
        px, py = grid[..., 0] * cx, grid[..., 1] * cy
        qx, qy = cos * px - sin * py, sin * px + cos * py  # inverse rotation, Kornia's sense
        qx = torch.where((draws[:, 0] < cfg.hflip_p)[:, None, None], -qx, qx)
        qy = torch.where((draws[:, 1] < cfg.vflip_p)[:, None, None], -qy, qy)
        return torch.stack([qx / cx, qy / cy], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (n, _, h, w), dev = x.shape, x.device
        draws = torch.rand(n, 5, device=dev)
        noise = (torch.rand(n, 2, h, w, device=dev) * 2 - 1 if self.cfg.elastic_p > 0
                 else None)
        return F.grid_sample(x, self.grid(draws, noise, h, w).to(x.dtype), mode="bilinear",
                             padding_mode="zeros", align_corners=True)


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
        self._build(torch.device("cpu"))

    def _build(self, device: torch.device) -> None:
        """The transforms for ``device``.

        Kornia's uniform parameter generators (rotation, gamma) hand their draws over on the
        device of their range tensors, or on the default device (the CPU) when the ranges are
        numbers: on CUDA that is a copy to the host and back in every step, each a host sync.
        So the ranges are tensors on the training device, and the ops are built anew when the
        module moves (:meth:`_apply`)."""
        cfg = self.cfg
        self.device = device
        # None: no geometric transform configured.
        self.geometric: nn.Module | None = (FusedGeometry(cfg) if cfg.fused
                                            else self._kornia_ops(cfg, device) or None)
        self.gamma = None
        if cfg.gamma_p > 0 and cfg.gamma_range > 0:
            r = cfg.gamma_range
            self.gamma = K.RandomGamma(gamma=_range(1 / (1 + r), 1 + r, device), p=cfg.gamma_p)
        self.to(device)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        device = fn(torch.zeros((), device=self.device)).device
        if device != self.device:
            self._build(device)
        return out

    @staticmethod
    def _kornia_ops(cfg: AugmentConfig, device: torch.device) -> nn.Sequential:
        ops: list[nn.Module] = []
        if cfg.hflip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip_p))
        if cfg.vflip_p > 0:
            ops.append(K.RandomVerticalFlip(p=cfg.vflip_p))
        if cfg.rotation_p > 0 and cfg.rotation_degrees > 0:
            d = cfg.rotation_degrees
            ops.append(K.RandomRotation(degrees=_range(-d, d, device), p=cfg.rotation_p))
        if cfg.elastic_p > 0:
            k = elastic_kernel_size(cfg.elastic_sigma)
            ops.append(K.RandomElasticTransform(
                kernel_size=(k, k), sigma=(cfg.elastic_sigma, cfg.elastic_sigma),
                alpha=(cfg.elastic_alpha, cfg.elastic_alpha), p=cfg.elastic_p))
        return nn.Sequential(*ops)

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
        if self.geometric is not None:
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
