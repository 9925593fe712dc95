"""uint8 batches straight from memory. No augmentation here: that runs batched on the device."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


def make_loader(
    data: SliceData,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of uint8 batches ``(images, masks, slice_index)``.

    Args:
        data: decoded slices.
        batch_size: per-process batch size.
        shuffle: reshuffle every epoch (seeded by ``seed``).
        num_workers: loader processes; 0 is fastest for in-memory data.
        drop_last: drop the final incomplete batch.
        seed: seeds the shuffling generator.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        SliceDataset(data), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, collate_fn=collate_batch, generator=generator,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
    )
