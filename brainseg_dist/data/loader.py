"""uint8 batches straight from memory, in an order that depends only on (seed, epoch). No
augmentation here: that runs batched on the device."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from brainseg_dist.data import SliceData


class SliceDataset(Dataset):
    """Yields ``(image uint8 3×S×S, mask uint8 1×S×S, slice index)`` from a :class:`SliceData`.

    ``__getitems__`` serves a whole batch with one fancy-index, so a batch costs one copy.
    """

    def __init__(self, data: SliceData):
        self.images = torch.from_numpy(np.ascontiguousarray(data.images))
        self.masks = torch.from_numpy(np.ascontiguousarray(data.masks))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i], torch.tensor(i)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.masks[idx], idx


def collate_batch(batch):
    """Pass through batches from ``__getitems__``; stack single samples otherwise."""
    if isinstance(batch, tuple):
        return batch
    images, masks, idx = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(masks), torch.stack(idx)


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)``, so a resumed run sees the same
    batches as an uninterrupted one. Accelerate shards its batches across processes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(
    data: SliceData,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = 0,
    sampler: Sampler[int] | None = None,
    device: torch.device | str | None = None,
) -> DataLoader:
    """A DataLoader of uint8 batches ``(images, masks, slice_index)``.

    Args:
        data: decoded slices.
        batch_size: per-process batch size.
        shuffle: reshuffle every epoch (seeded by ``seed``).
        num_workers: loader processes; 0 is fastest for in-memory data. Workers are not
            persistent: each epoch's iterator draws its base seed anew, so a resumed run
            consumes the generators exactly as an uninterrupted one.
        drop_last: drop the final incomplete batch.
        seed: seeds the loader's generator; None: no generator of its own (the loader then
            draws its base seed from torch's global generator, as training's loaders do).
        sampler: the order instead of ``shuffle`` (training's :class:`EpochShuffleSampler`).
        device: where the batches go; memory is pinned when that is a CUDA device (default:
            CUDA when available).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        SliceDataset(data), batch_size=batch_size, shuffle=shuffle, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, collate_fn=collate_batch,
        generator=generator, pin_memory=torch.device(device).type == "cuda",
    )
