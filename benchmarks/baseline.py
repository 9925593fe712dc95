"""The reference pipeline the benchmark compares against, reimplemented without scipy/skimage.

It follows the dataset author's PyTorch code (mateuszbuda/brain-segmentation-pytorch, the
code most public work on ``kaggle_3m`` starts from): the slices are normalized once per
patient volume and kept in memory as float32 ``H×W×C`` arrays, and a ``DataLoader`` with worker
processes augments **each sample on the CPU** in ``__getitem__`` (random scale, rotation,
horizontal flip; here also the elastic deformation the project uses), then transposes it to
``C×H×W`` float32. Training is fp32 on NCHW tensors.

skimage's ``rescale``/``rotate`` are replaced by the equivalent one-sample torch ops
(``F.interpolate``, ``F.affine_grid`` + ``F.grid_sample``), the elastic deformation by a
per-sample smoothed random displacement field (Kornia's definition: uniform noise in [-1, 1],
Gaussian-smoothed, times alpha, in normalized coordinates) and the flip by ``np.fliplr``-style
numpy slicing, so the per-sample CPU cost is of the same kind as the original's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from brainseg_dist.config import AugmentConfig
from brainseg_dist.data import SliceData

# mateuszbuda/brain-segmentation-pytorch train.py defaults: --aug-scale 0.05, --aug-angle 15,
# flip probability 0.5, both applied to every sample.
BUDA_SCALE = 0.05
BUDA_ANGLE = 15.0


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    k = 2 * int(3 * sigma) + 1
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


class PerSampleAugment:
    """Random scale, rotation, horizontal flip and elastic deformation of **one** sample.

    Args:
        scale: zoom factor drawn from ``U(1 - scale, 1 + scale)`` (0: off); centre crop/pad
            back to the input size, as in the reference ``Scale`` transform.
        rotation_degrees: angle drawn from ``U(-deg, deg)``.
        rotation_p: probability of rotating.
        hflip_p: probability of a horizontal flip.
        elastic_p: probability of an elastic deformation.
        elastic_alpha: displacement scale (Kornia's convention, normalized coordinates).
        elastic_sigma: Gaussian smoothing of the displacement field, in pixels.
    """

    def __init__(self, scale: float = 0.0, rotation_degrees: float = 15.0,
                 rotation_p: float = 1.0, hflip_p: float = 0.5, elastic_p: float = 0.2,
                 elastic_alpha: float = 3.0, elastic_sigma: float = 16.0):
        self.scale = scale
        self.rotation_degrees = rotation_degrees
        self.rotation_p = rotation_p
        self.hflip_p = hflip_p
        self.elastic_p = elastic_p
        self.elastic_alpha = elastic_alpha
        self.kernel = _gaussian_kernel(elastic_sigma)

    @classmethod
    def buda(cls, cfg: AugmentConfig | None = None) -> PerSampleAugment:
        """The reference's augmentation (scale 0.05, rotation ±15° and flip 0.5 on every
        sample) plus the project's elastic deformation, so both do comparable work."""
        cfg = cfg or AugmentConfig()
        return cls(scale=BUDA_SCALE, rotation_degrees=BUDA_ANGLE, rotation_p=1.0, hflip_p=0.5,
                   elastic_p=cfg.elastic_p, elastic_alpha=cfg.elastic_alpha,
                   elastic_sigma=cfg.elastic_sigma)

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> PerSampleAugment:
        """The project's augmentation settings, applied per sample (no scale)."""
        return cls(scale=0.0, rotation_degrees=cfg.rotation_degrees, rotation_p=cfg.rotation_p,
                   hflip_p=cfg.hflip_p, elastic_p=cfg.elastic_p, elastic_alpha=cfg.elastic_alpha,
                   elastic_sigma=cfg.elastic_sigma)

    def _scale(self, image: torch.Tensor, mask: torch.Tensor):
        size = image.shape[-1]
        s = np.random.uniform(1.0 - self.scale, 1.0 + self.scale)
        new = max(1, round(size * s))
        if new == size:
            return image, mask
        image = F.interpolate(image, size=(new, new), mode="bilinear", align_corners=False)
        mask = F.interpolate(mask, size=(new, new), mode="nearest")
        if new < size:
            lo = (size - new) // 2
            pad = (lo, size - new - lo, lo, size - new - lo)
            return F.pad(image, pad), F.pad(mask, pad)
        lo = (new - size) // 2
        return (image[..., lo:lo + size, lo:lo + size],
                mask[..., lo:lo + size, lo:lo + size])

    def _rotate(self, image: torch.Tensor, mask: torch.Tensor):
        angle = math.radians(np.random.uniform(-self.rotation_degrees, self.rotation_degrees))
        c, s = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=image.dtype)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        return (F.grid_sample(image, grid, mode="bilinear", align_corners=False),
                F.grid_sample(mask, grid, mode="nearest", align_corners=False))

    def _elastic(self, image: torch.Tensor, mask: torch.Tensor):
        _, _, h, w = image.shape
        noise = torch.from_numpy(np.random.uniform(-1, 1, (2, 1, h, w)).astype(np.float32))
        k = self.kernel
        pad = len(k) // 2
        noise = F.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, pad))
        noise = F.conv2d(noise, k.view(1, 1, -1, 1), padding=(pad, 0))
        disp = (noise * self.elastic_alpha).view(2, h, w).permute(1, 2, 0)[None]
        theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False) + disp
        return (F.grid_sample(image, grid, mode="bilinear", align_corners=False),
                F.grid_sample(mask, grid, mode="nearest", align_corners=False))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment a float ``C×H×W`` image and its ``1×H×W`` mask; returns numpy arrays."""
        img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        if self.scale > 0:
            img, msk = self._scale(img, msk)
        if self.rotation_degrees > 0 and np.random.rand() < self.rotation_p:
            img, msk = self._rotate(img, msk)
        if np.random.rand() < self.elastic_p:
            img, msk = self._elastic(img, msk)
        image, mask = img[0].numpy(), msk[0].numpy()
        if np.random.rand() < self.hflip_p:
            image, mask = image[:, :, ::-1].copy(), mask[:, :, ::-1].copy()
        return image, mask


def volume_normalize(data: SliceData) -> np.ndarray:
    """Per-patient, per-channel z-score of the slices, as ``N×H×W×C`` float32 (done once, up
    front, like the reference's ``normalize_volume``)."""
    out = np.empty(data.images.transpose(0, 2, 3, 1).shape, np.float32)
    patients = data.table["patient"].to_numpy()
    for p in np.unique(patients):
        sel = np.flatnonzero(patients == p)
        vol = data.images[sel].transpose(0, 2, 3, 1).astype(np.float32)
        mean = vol.mean(axis=(0, 1, 2))
        std = np.maximum(vol.std(axis=(0, 1, 2)), 1e-3)
        out[sel] = (vol - mean) / std
    return out


class BaselineDataset(Dataset):
    """Float32 ``H×W×C`` slices in memory; every ``__getitem__`` augments one sample."""

    def __init__(self, data: SliceData, augment: PerSampleAugment):
        self.images = volume_normalize(data)  # N×H×W×C float32
        self.masks = data.masks.transpose(0, 2, 3, 1)  # N×H×W×1 uint8 0/1
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i].transpose(2, 0, 1)
        mask = self.masks[i].transpose(2, 0, 1)
        image, mask = self.augment(image, mask)
        return (torch.from_numpy(image.astype(np.float32)),
                torch.from_numpy(mask.astype(np.float32)))


class Uint8AugmentDataset(Dataset):
    """The project's uint8 slices, augmented per sample in the loader workers (ablation of the
    device augmentation): returns uint8 ``(image, mask)`` so only the augmentation moves."""

    def __init__(self, data: SliceData, augment: PerSampleAugment):
        self.images = data.images
        self.masks = data.masks
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, mask = self.augment(self.images[i], self.masks[i])
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return torch.from_numpy(image), torch.from_numpy((mask >= 0.5).astype(np.uint8))


def seed_worker(worker_id: int) -> None:
    """The reference's ``worker_init_fn``: a distinct numpy seed per worker."""
    np.random.seed(42 + worker_id + torch.initial_seed() % 1000)


def per_sample_loader(dataset: Dataset, batch_size: int, batches: int, num_workers: int,
                      seed: int = 0) -> DataLoader:
    """A shuffling loader of ``batches`` full batches (several epochs if needed) whose
    ``num_workers`` processes run ``dataset.__getitem__`` (and so the augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=batch_size * batches, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, worker_init_fn=seed_worker,
                      pin_memory=torch.cuda.is_available(), generator=generator)
