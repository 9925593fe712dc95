"""The training loop: :class:`Trainer` and its named steps.

Set-up of the data (:meth:`Trainer._setup_data`: dataset, split, volume statistics, batches)
and of the model (:meth:`Trainer._setup_model`: U-Net, optimizer at the scaled lr, Accelerate,
compile, augmentation, EMA), one epoch (:meth:`Trainer.train_epoch` of sync-free
:meth:`Trainer.train_step` calls, :meth:`Trainer.validate`) and its end
(:meth:`Trainer._end_of_epoch`: selection, early stopping, checkpoints, metrics, logs), strung
together by :meth:`Trainer.fit`; :class:`~brainseg_dist.train.persistence.CheckpointState`
writes and restores checkpoints.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg_dist import rundir
from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import Config, dump_config
from brainseg_dist.console import console, progress
from brainseg_dist.data import SliceData, load_dataset
from brainseg_dist.data.device import DeviceBatches, resolve_on_device
from brainseg_dist.data.loader import EpochShuffleSampler, make_loader
from brainseg_dist.data.split import save_split
from brainseg_dist.ema import WeightEMA
from brainseg_dist.errors import BrainsegError, NonFiniteLossError
from brainseg_dist.io import atomic_write_text
from brainseg_dist.metrics import bce_dice_loss, overlap_counts, summarize_dice
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize, volume_stats_by_patient
from brainseg_dist.train.persistence import CheckpointState
from brainseg_dist.train.report import log_scalars, overlay_grid, print_row
from brainseg_dist.train.setup import (
    REFERENCE_BATCH,
    adam_implementation,
    compile_for_training,
    compile_note,
    global_batch,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    prepare_data_dir,
    resolve_compile,
    scaled_lr,
    split_for_run,
    uses_cuda_graphs,
)
from brainseg_dist.train.step import LossReading, LossTracker, is_read_step

ADAM_WORDS = {"fused": "fused Adam", "torch": "torch's default Adam kernels"}


def eager(method):
    """Run ``method`` with a compiled model eager: validation, overlays (eval mode) and last,
    smaller batches would each compile (and record CUDA graphs) again for a few batches an
    epoch. (A ``set_stance`` object made once would set the stance on creation.)"""
    @functools.wraps(method)
    def run_eagerly(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return method(*args, **kwargs)
    return run_eagerly


@dataclass
class TrainResult:
    output_dir: Path
    best_epoch: int
    best_dice_patient_mean: float
    epochs_run: int
    history: list[dict[str, Any]]
    stopped_early: bool


class Trainer(CheckpointState):
    """State of one training run; :meth:`fit` runs it. Build through :func:`run_training`."""

    def __init__(self, cfg: Config, resume: bool = False, split: dict | None = None):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.resume = resume
        self.accelerator = make_accelerator(cfg)  # seeds every generator with train.seed
        self.is_main = self.accelerator.is_main_process
        loaders = self._setup_data(split)
        self._setup_model(*loaders)
        self.start_epoch = 0
        self.best = -1.0
        self.best_epoch = -1
        self.stale_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.writer = None

    # ----------------------------------------------------------------- set-up
    def _setup_data(self, split: dict | None) -> tuple[Any, Any]:
        """Dataset, split, volume statistics; returns the (unprepared) train and val loaders."""
        cfg, acc = self.cfg, self.accelerator
        root = prepare_data_dir(cfg, acc)
        with acc.main_process_first():  # rank 0 fills the decode cache
            data = load_dataset(root, cfg.data.image_size, cfg.data.cache_dir,
                                cfg.data.skip_invalid, show_progress=self.is_main)
        self.split = split_for_run(cfg, data, self.out, self.resume, split)
        self.train_data = data.subset(self.split["train"])
        self.val_data = data.subset(self.split["val"])
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise BrainsegError(f"{root}: split left no training or validation slices "
                                f"({len(data.patients)} patients); add patients or change "
                                "data.val_fraction")
        self.val_patients = self.val_data.table["patient"].to_numpy()
        self.volume_stats = {"train": self._patient_stats(self.train_data),
                             "val": self._patient_stats(self.val_data)}
        self.train_batches = self._train_batches()
        val_loader = make_loader(self.val_data, cfg.train.batch_size, seed=None,
                                 num_workers=cfg.data.num_workers, device=acc.device)
        return self.train_batches, val_loader

    def _train_batches(self) -> Any:
        """Device-resident batches (``data.on_device``), else the (unprepared) DataLoader."""
        cfg, acc = self.cfg, self.accelerator
        nbytes = self.train_data.images.nbytes + self.train_data.masks.nbytes
        self.on_device = resolve_on_device(cfg.data.on_device, acc.device, nbytes,
                                           cfg.data.device_memory_budget)
        if self.on_device:
            return DeviceBatches(self.train_data, cfg.train.batch_size, cfg.train.seed,
                                 acc.device, acc.num_processes, acc.process_index)
        self.sampler = EpochShuffleSampler(len(self.train_data), cfg.train.seed)
        return make_loader(self.train_data, cfg.train.batch_size, seed=None,
                           sampler=self.sampler, num_workers=cfg.data.num_workers,
                           device=acc.device)

    def _patient_stats(self, data: SliceData) -> torch.Tensor | None:
        """Per-slice patient statistics for ``volume`` normalization (None otherwise)."""
        if self.cfg.train.normalization != "volume":
            return None
        codes = data.table["patient"].factorize()[0]
        return volume_stats_by_patient(data.images, codes).to(self.accelerator.device)

    def _setup_model(self, train_batches: Any, val_loader: Any) -> None:
        """U-Net, optimizer at the scaled lr, Accelerate, compile, augmentation and EMA."""
        cfg, acc = self.cfg, self.accelerator
        model = build_model(cfg.model.base_width, cfg.model.depth, cfg.model.channels_last,
                            cfg.model.foreground_prior, cfg.model.norm)
        if (cfg.model.sync_batchnorm and acc.num_processes > 1
                and acc.device.type == "cuda"):  # SyncBatchNorm is GPU-only in torch
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.lr = scaled_lr(cfg, acc.num_processes)
        optimizer = make_optimizer(model.parameters(), cfg, self.lr, acc.device.type)
        if self.on_device:
            self.model, self.optimizer, self.val_loader = acc.prepare(model, optimizer,
                                                                      val_loader)
        else:
            self.model, self.optimizer, self.train_batches, self.val_loader = acc.prepare(
                model, optimizer, train_batches, val_loader)
        self.augment = DeviceAugment(cfg.augment).to(acc.device)
        self.ema = (WeightEMA(acc.unwrap_model(self.model), cfg.train.ema_decay)
                    if cfg.train.ema_decay > 0 else None)
        # After the EMA's copy, which must run its own weights, not a compiled live model.
        batches = cfg.train.epochs * len(self.train_batches)
        self.compiled = resolve_compile(cfg.train.compile, cfg.train.compile_mode, acc.device,
                                        acc.num_processes, batches) and compile_for_training(
            acc.unwrap_model(self.model), self.augment, acc.device, cfg.train.compile_mode)
        self.compile_note = compile_note(cfg.train.compile, self.compiled, batches)
        self.cudagraph_steps = self.compiled and uses_cuda_graphs(cfg.train.compile_mode)
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)

    def eval_model(self) -> torch.nn.Module:
        """The weights that validation, ``best.pt`` and export use: the EMA when it is on."""
        if self.ema is not None:
            return self.ema.model
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------- one epoch
    def _inputs(self, images: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor | None):
        x = normalize(images, self.cfg.train.normalization,
                      None if stats is None else stats[idx])
        return x.contiguous(memory_format=self.memory_format)

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor,
                   tracker: LossTracker, step: int) -> None:
        """One optimizer (or accumulation) step on a uint8 batch; waits on no device result."""
        acc, cfg = self.accelerator, self.cfg
        if self.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        with acc.accumulate(self.model):
            x = self._inputs(self.augment.intensity(images), idx, self.volume_stats["train"])
            x, y = self.augment(x, masks.float())
            x = x.contiguous(memory_format=self.memory_format)  # warps return NCHW
            with acc.autocast():
                logits = self.model(x)
            loss = bce_dice_loss(logits, y, cfg.optim.bce_weight, cfg.optim.dice_weight,
                                 dice=cfg.optim.dice)
            tracker.add(loss, len(images), step)
            acc.backward(loss)
            if cfg.optim.grad_clip > 0 and acc.sync_gradients:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and acc.sync_gradients:
                self.ema.update(acc.unwrap_model(self.model))

    def train_epoch(self, epoch: int, bar, task) -> tuple[float, float]:
        """One epoch; the loss is read (one host sync) every ``train.log_every`` steps and at
        the end, which is also when a non-finite loss is noticed.

        Returns:
            The epoch's mean training loss over every rank, and images per second.

        Raises:
            NonFiniteLossError: a step's loss was NaN or infinite.
        """
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        self.augment.train()
        # Accelerate's loader re-sets its sampler's epoch from its own iteration counter, which
        # restarts at 0 on --resume: set both so the order depends only on the epoch.
        self.train_batches.set_epoch(epoch)
        if not self.on_device:
            self.sampler.set_epoch(epoch)
        # Augmentation randomness depends only on (seed, epoch, rank): exact resume.
        torch.manual_seed(cfg.train.seed * 100_003 + epoch * 101 + acc.process_index)
        tracker, steps, t0 = LossTracker(acc), len(self.train_batches), time.perf_counter()
        reading, info = None, ""
        for step, (images, masks, idx) in enumerate(self.train_batches):
            if self.compiled and len(images) < cfg.train.batch_size:
                # The epoch's last, smaller batch would compile the model and augmentation
                # again (and record new CUDA graphs): tens of seconds for one step.
                eager(self.train_step)(images, masks, idx, tracker, step)
            else:
                self.train_step(images, masks, idx, tracker, step)
            if is_read_step(step, steps, cfg.train.log_every):
                reading = tracker.read()
                self._stop_if_non_finite(reading, epoch, step)
                info = f"loss {reading.window_loss:.4f}"
            if bar is not None:
                bar.update(task, advance=1, info=info)
        seconds = time.perf_counter() - t0
        return reading.epoch_loss, reading.images / seconds

    def _stop_if_non_finite(self, reading: LossReading, epoch: int, step: int) -> None:
        if reading.first_bad_step is None:
            return
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, step {reading.first_bad_step + 1} (seen "
            f"at step {step + 1}; train.log_every {self.cfg.train.log_every}). "
            f"{self.out / 'last.pt'} (end of the previous epoch) is untouched. Try a lower "
            "optim.lr, optim.grad_clip > 0, or bf16 instead of fp16.")

    @torch.no_grad()
    @eager
    def validate(self) -> dict[str, float]:
        """Validation loss and Dice over every validation slice, identical for any rank count."""
        acc, cfg = self.accelerator, self.cfg
        self.model.eval()
        model = self.eval_model()
        losses, counts, indices = [], [], []
        for images, masks, idx in self.val_loader:
            x = self._inputs(images, idx, self.volume_stats["val"])
            with acc.autocast():
                logits = model(x)
            # Per-slice loss whatever the training Dice, so any rank count reports the same.
            loss = bce_dice_loss(logits, masks, cfg.optim.bce_weight, cfg.optim.dice_weight,
                                 reduction="none")
            pred = torch.sigmoid(logits.float()) > cfg.train.threshold
            c = overlap_counts(pred, masks)
            loss, c, idx = acc.gather_for_metrics((loss, c, idx))
            losses.append(loss.cpu())
            counts.append(c.cpu())
            indices.append(idx.cpu())
        idx = torch.cat(indices).numpy()
        result = summarize_dice(torch.cat(counts).numpy(), self.val_patients[idx])
        result = {f"val_{k}": v for k, v in result.items()}
        result["val_loss"] = float(torch.cat(losses).double().mean())
        result["val_slices"] = len(idx)
        return result

    @torch.no_grad()
    @eager
    def _log_overlays(self, epoch: int) -> None:
        n = self.cfg.train.num_overlays
        if n <= 0 or self.writer is None:
            return
        order = np.argsort(-self.val_data.table["tumour_pixels"].to_numpy())
        pick = torch.as_tensor(np.sort(order[:n]))
        images = torch.from_numpy(self.val_data.images)[pick]
        masks = torch.from_numpy(self.val_data.masks)[pick]
        model = self.eval_model().eval()
        x = self._inputs(images.to(self.accelerator.device), pick.to(self.accelerator.device),
                         self.volume_stats["val"])
        with self.accelerator.autocast():
            pred = torch.sigmoid(model(x).float()) > self.cfg.train.threshold
        self.writer.add_images("val/overlay (green: truth, red: prediction)",
                               overlay_grid(images, masks, pred.cpu()), epoch + 1)

    # ----------------------------------------------------------------- the run
    def _start(self) -> None:
        """Restore on --resume; write config.yaml and split.json; open TensorBoard."""
        acc, cfg = self.accelerator, self.cfg
        if self.resume:
            self._restore()
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / rundir.CONFIG, dump_config(cfg))
        save_split(self.split, self.out / rundir.SPLIT)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out / rundir.TENSORBOARD), purge_step=(
            self.start_epoch + 1 if self.resume else None))
        batch = global_batch(cfg, acc.num_processes)
        scaling = ("" if cfg.optim.scale_lr == "none" else
                   f" (optim.lr {cfg.optim.lr:.2e} scaled {cfg.optim.scale_lr} to global batch "
                   f"{batch} from {REFERENCE_BATCH})")
        console.print(
            f"training on {acc.num_processes} process(es), device {acc.device}, "
            f"mixed precision {acc.mixed_precision}, batch {cfg.train.batch_size}/process "
            f"(global {batch}), lr {self.lr:.2e}{scaling}, "
            f"{len(self.train_data)} train / {len(self.val_data)} val slices "
            f"({len(self.split['train'])}/{len(self.split['val'])} patients), training data "
            f"{'on the device' if self.on_device else 'from a DataLoader'}"
            f"{self.compile_note}, "
            f"{ADAM_WORDS[adam_implementation(cfg.optim.implementation, acc.device.type)]}")

    def _end_of_epoch(self, row: dict[str, Any]) -> bool:
        """Selection and early-stopping state, checkpoints, metrics.jsonl and logs.

        Returns:
            Whether early stopping ends the run here.
        """
        cfg, epoch = self.cfg, row["epoch"]
        # "last" keeps the final (averaged) weights: with a handful of validation patients,
        # picking the best epoch mostly picks noise.
        improved = cfg.train.select == "last" or row["val_dice_patient_mean"] > self.best
        if improved:
            self.best, self.best_epoch, self.stale_epochs = (
                row["val_dice_patient_mean"], epoch, 0)
        else:
            self.stale_epochs += 1
        self.history.append(row)
        if self.is_main:
            self._save([self.out / rundir.BEST] * improved + [self.out / rundir.LAST], epoch,
                       row)
            self._write_history()
            log_scalars(self.writer, row)
            self._log_overlays(epoch)
            print_row(row, cfg.train.epochs, epoch == self.start_epoch, improved)
        self.accelerator.wait_for_everyone()
        stop = bool(cfg.train.patience) and self.stale_epochs >= cfg.train.patience
        if stop and self.is_main:
            console.print(f"early stop: no improvement for {cfg.train.patience} "
                          f"epochs (best epoch {self.best_epoch + 1})")
        return stop

    def fit(self) -> TrainResult:
        """Run the remaining epochs; export ``best.pt`` when the run is finished."""
        cfg = self.cfg
        self._start()
        scheduler = make_scheduler(self.optimizer, cfg, self.start_epoch, self.lr)
        t_start = time.perf_counter() - (self.history[-1]["elapsed_seconds"] if self.history
                                         else 0.0)
        last_epoch = min(cfg.train.epochs, cfg.train.stop_after_epoch or cfg.train.epochs)
        stopped_early = False
        with progress(disable=not self.is_main) as bar:
            for epoch in range(self.start_epoch, last_epoch):
                lr = self.optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}",
                                    total=len(self.train_batches), info="")
                train_loss, ips = self.train_epoch(epoch, bar, task)
                val = self.validate()
                bar.remove_task(task)
                scheduler.step()
                row = {"epoch": epoch, "train_loss": train_loss, **val, "lr": lr,
                       "epoch_seconds": time.perf_counter() - t0,
                       "elapsed_seconds": time.perf_counter() - t_start,
                       "train_images_per_second": ips, "time": time.time()}
                if self._end_of_epoch(row):
                    stopped_early = True
                    break
        self._finish(stopped_early)
        return TrainResult(self.out, self.best_epoch, self.best, len(self.history), self.history,
                           stopped_early)

    def _finish(self, stopped_early: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if not self.is_main:
            return
        console.print(f"best val per-patient Dice {self.best:.4f} at epoch "
                      f"{self.best_epoch + 1}; run directory {self.out}")
        finished = len(self.history) == self.cfg.train.epochs or stopped_early
        if self.cfg.train.export and finished and (self.out / rundir.BEST).exists():
            from brainseg_dist.export import export_run  # training's last stage

            # model.onnx (about 17 s more on CPU) is left to an explicit `brainseg export`.
            export_run(self.out, onnx=False)
