"""Training: ``accelerate launch -m brainseg_dist.train`` (1..N processes) or ``brainseg train``.

One code path for every process count. Accelerate handles device placement, DDP and AMP; the
uint8 batches come from slices held on the device (``data.on_device``) or from a DataLoader,
and normalization plus augmentation run batched on the device.
Validation overlap counts are gathered across ranks with the padding duplicates dropped, so
1 and N processes report the same numbers for the same weights.

* :mod:`~brainseg_dist.train.setup`: the accelerator, the seeds, the dataset root, the split,
  the learning rate (scaled to the global batch), its schedule and ``torch.compile``;
* :mod:`~brainseg_dist.train.trainer`: :class:`Trainer` (set-up of data, set-up of model, the
  epoch, the end of an epoch);
* :mod:`~brainseg_dist.train.step`: the loss and its finiteness, accumulated on the device and
  read every ``train.log_every`` steps;
* :mod:`~brainseg_dist.train.persistence`: checkpoints and ``--resume``;
* :mod:`~brainseg_dist.train.run`: :func:`run_training` and :func:`validate_checkpoint`;
* :mod:`~brainseg_dist.train.report`: console rows and TensorBoard scalars and overlays.
"""

from brainseg_dist.train.run import run_training, validate_checkpoint
from brainseg_dist.train.setup import (
    lr_factor,
    prepare_data_dir,
    resolve_mixed_precision,
    scaled_lr,
    split_for_run,
)
from brainseg_dist.train.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer", "lr_factor", "prepare_data_dir", "resolve_mixed_precision",
           "run_training", "scaled_lr", "split_for_run", "validate_checkpoint"]
