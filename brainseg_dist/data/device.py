"""Training slices resident on the device: uploaded once as uint8, batched there by index.

No DataLoader and no host copy per step: each epoch uploads one index vector (a few KB), and
every batch is an ``index_select`` on the device. The order is the DataLoader path's, rule for
rule: the epoch's permutation of :class:`~brainseg_dist.data.loader.EpochShuffleSampler` cut
into batches, and with several processes dealt out by Accelerate's own
:class:`~accelerate.data_loader.BatchSamplerShard` (batch ``k`` to rank ``k mod N``, the last
round completed from the first indices). So a resumed run, and 1 against N processes, see
the same batches as with the DataLoader.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard, DataLoaderStateMixin
from accelerate.state import GradientState
from torch.utils.data import BatchSampler

from brainseg_dist.data import SliceData
from brainseg_dist.data.loader import EpochShuffleSampler


def resolve_on_device(setting: str, device: torch.device, nbytes: int, budget: float) -> bool:
    """Whether the training slices live on the device.

    Args:
        setting: ``data.on_device``: ``"true"``, ``"false"`` or ``"auto"`` (on for CUDA when
            ``nbytes`` is at most ``budget`` of the GPU's memory; off on CPU, where the
            DataLoader already reads from memory).
        device: the training device.
        nbytes: bytes of the uint8 slices and masks.
        budget: ``data.device_memory_budget``, a share of the GPU's total memory.
    """
    if setting != "auto":
        return setting == "true"
    if device.type != "cuda":
        return False
    return nbytes <= budget * torch.cuda.get_device_properties(device).total_memory


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, num_processes: int = 1,
                  process_index: int = 0) -> list[list[int]]:
    """This rank's batches of slice indices for one epoch, as the prepared DataLoader gives
    them (Accelerate shards only when there are several processes)."""
    sampler = EpochShuffleSampler(n, seed)
    sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    if num_processes > 1:
        batches = BatchSamplerShard(batches, num_processes, process_index,
                                    split_batches=False, even_batches=True)
    return list(batches)


class DeviceBatches(DataLoaderStateMixin):
    """``(images uint8 B×3×S×S, masks uint8 B×1×S×S, slice index B)`` batches of slices held
    on the device, in the order of :func:`epoch_batches`.

    It tells Accelerate's gradient accumulation where the epoch ends, as a prepared
    DataLoader does (:class:`~accelerate.data_loader.DataLoaderStateMixin`).

    Args:
        data: the training slices.
        batch_size: per process.
        seed: ``train.seed`` (the permutation of epoch ``e`` is seeded by seed and ``e``).
        device: where the slices are uploaded.
        num_processes: data-parallel processes.
        process_index: this process's rank.
    """

    def __init__(self, data: SliceData, batch_size: int, seed: int, device: torch.device,
                 num_processes: int = 1, process_index: int = 0):
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(self.device)
        self.masks = torch.from_numpy(np.ascontiguousarray(data.masks)).to(self.device)
        self.batch_size, self.seed = batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0
        self.gradient_state = GradientState()
        self._drop_last = False
        self._length = len(epoch_batches(len(self.images), batch_size, seed, 0, num_processes,
                                         process_index))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def _order(self) -> tuple[torch.Tensor, list[int]]:
        """The epoch's indices on the device, and the batch lengths."""
        batches = epoch_batches(len(self.images), self.batch_size, self.seed, self.epoch,
                                self.num_processes, self.process_index)
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.long)
        if self.device.type == "cuda":  # pinned: the upload does not block the host
            flat = flat.pin_memory()
        return flat.to(self.device, non_blocking=True), [len(b) for b in batches]

    def __iter__(self):
        order, lengths = self._order()
        # The DataLoader's iterator draws its base seed from torch's global generator; draw
        # it here too, so augmentation sees the same random stream on either path.
        torch.empty((), dtype=torch.int64).random_()
        self.begin()
        try:
            start = 0
            for i, length in enumerate(lengths):
                idx = order[start:start + length]
                start += length
                self.end_of_dataloader = i == len(lengths) - 1
                yield self.images.index_select(0, idx), self.masks.index_select(0, idx), idx
        finally:
            self.end()
