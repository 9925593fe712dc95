"""The training loop: :class:`Trainer` and its named steps.

Set-up of the data (:meth:`Trainer._setup_data`: dataset, split, volume statistics,
loaders), set-up of the model (:meth:`Trainer._setup_model`: U-Net, optimizer, Accelerate,
augmentation, EMA), one epoch (:meth:`Trainer.train_epoch`, :meth:`Trainer.validate`) and the
end of an epoch (:meth:`Trainer._end_of_epoch`: selection, early-stopping state, checkpoints,
metrics and logs). :meth:`Trainer.fit` strings them together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg_dist import checkpoint, rundir
from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import Config, dump_config
from brainseg_dist.console import console, progress
from brainseg_dist.data import SliceData, load_dataset
from brainseg_dist.data.loader import EpochShuffleSampler, make_loader
from brainseg_dist.data.split import save_split
from brainseg_dist.ema import WeightEMA
from brainseg_dist.errors import BrainsegError, NonFiniteLossError
from brainseg_dist.io import atomic_write_text, dumps_strict
from brainseg_dist.metrics import bce_dice_loss, overlap_counts, summarize_dice
from brainseg_dist.model import build_model
from brainseg_dist.preprocess import normalize, volume_stats_by_patient
from brainseg_dist.train.report import log_scalars, overlay_grid, print_row
from brainseg_dist.train.setup import (
    make_accelerator,
    make_scheduler,
    prepare_data_dir,
    split_for_run,
)


@dataclass
class TrainResult:
    output_dir: Path
    best_epoch: int
    best_dice_patient_mean: float
    epochs_run: int
    history: list[dict[str, Any]]
    stopped_early: bool


class Trainer:
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
        self.sampler = EpochShuffleSampler(len(self.train_data), cfg.train.seed)
        train_loader = make_loader(self.train_data, cfg.train.batch_size, seed=None,
                                   sampler=self.sampler,
                                   num_workers=cfg.data.num_workers, device=acc.device)
        val_loader = make_loader(self.val_data, cfg.train.batch_size, seed=None,
                                 num_workers=cfg.data.num_workers, device=acc.device)
        return train_loader, val_loader

    def _patient_stats(self, data: SliceData) -> torch.Tensor | None:
        """Per-slice patient statistics for ``volume`` normalization (None otherwise)."""
        if self.cfg.train.normalization != "volume":
            return None
        codes = data.table["patient"].factorize()[0]
        return volume_stats_by_patient(data.images, codes).to(self.accelerator.device)

    def _setup_model(self, train_loader: Any, val_loader: Any) -> None:
        """U-Net, optimizer and loaders through Accelerate; augmentation and EMA."""
        cfg, acc = self.cfg, self.accelerator
        model = build_model(cfg.model.base_width, cfg.model.depth, cfg.model.channels_last,
                            cfg.model.foreground_prior, cfg.model.norm)
        if (cfg.model.sync_batchnorm and acc.num_processes > 1
                and acc.device.type == "cuda"):  # SyncBatchNorm is GPU-only in torch
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            model, optimizer, train_loader, val_loader)
        self.augment = DeviceAugment(cfg.augment).to(acc.device)
        self.ema = (WeightEMA(acc.unwrap_model(self.model), cfg.train.ema_decay)
                    if cfg.train.ema_decay > 0 else None)
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)

    def eval_model(self) -> torch.nn.Module:
        """The weights that validation, ``best.pt`` and export use: the EMA when it is on."""
        if self.ema is not None:
            return self.ema.model
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------- persistence
    def _save(self, paths: list[Path], epoch: int, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        training = {
            **({"live_model": acc.unwrap_model(self.model).state_dict(),
                "ema_updates": torch.tensor(self.ema.updates)} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "rng": checkpoint.rng_state(),
        }
        model = self.eval_model().state_dict()
        for path in paths:
            checkpoint.save(path, model=model, config=self.cfg, epoch=epoch, metrics=metrics,
                            history=self.history, training=training)

    def _restore(self) -> None:
        path = self.out / rundir.LAST
        if not path.exists():
            raise BrainsegError(f"{path}: nothing to resume (no last.pt in the run directory)")
        last = checkpoint.load(path, require=checkpoint.RESUME_KEYS)
        state = last.state
        if last.config_hash != self.cfg.hash():
            raise BrainsegError(f"{path}: checkpoint was trained with a different config "
                                f"(hash {last.config_hash} != {self.cfg.hash()})")
        live = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            live.load_state_dict(state["live_model"])
            self.ema.load_state_dict({"model": state["model"], "updates": state["ema_updates"]})
        else:
            live.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.stale_epochs = state["stale_epochs"]
        checkpoint.set_rng_state(state["rng"])
        # last.pt carries the history up to its epoch: metrics.jsonl (written after it, so
        # possibly one epoch behind after a kill, or damaged) is rewritten from it.
        self.history = list(state["history"])
        if self.is_main:
            self._write_history()
            console.print(f"resumed from {path} at epoch {self.start_epoch + 1}")

    def _write_history(self) -> None:
        text = "".join(dumps_strict(r) + "\n" for r in self.history)
        atomic_write_text(self.out / rundir.METRICS, text)

    # ----------------------------------------------------------------- one epoch
    def _inputs(self, images: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor | None):
        x = normalize(images, self.cfg.train.normalization,
                      None if stats is None else stats[idx])
        return x.contiguous(memory_format=self.memory_format)

    def train_epoch(self, epoch: int, bar, task) -> tuple[float, float]:
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        self.augment.train()
        # Accelerate's loader re-sets its sampler's epoch from its own iteration counter, which
        # restarts at 0 on --resume: set both so the order depends only on the epoch.
        self.train_loader.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        # Augmentation randomness depends only on (seed, epoch, rank): exact resume.
        torch.manual_seed(cfg.train.seed * 100_003 + epoch * 101 + acc.process_index)
        total, count, t0 = torch.zeros((), device=acc.device), 0, time.perf_counter()
        for step, (images, masks, idx) in enumerate(self.train_loader):
            with acc.accumulate(self.model):
                x = self._inputs(self.augment.intensity(images), idx, self.volume_stats["train"])
                x, y = self.augment(x, masks.float())
                x = x.contiguous(memory_format=self.memory_format)  # warps return NCHW
                with acc.autocast():
                    logits = self.model(x)
                loss = bce_dice_loss(logits, y, cfg.optim.bce_weight, cfg.optim.dice_weight,
                                     dice=cfg.optim.dice)
                self._check_finite(loss, epoch, step)
                acc.backward(loss)
                if cfg.optim.grad_clip > 0 and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None and acc.sync_gradients:
                    self.ema.update(acc.unwrap_model(self.model))
            total += loss.detach() * len(images)
            count += len(images)
            if bar is not None:
                bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
        seconds = time.perf_counter() - t0
        stats = acc.reduce(torch.stack([total, torch.tensor(float(count), device=acc.device)]),
                           reduction="sum")
        images_per_s = float(stats[1]) / seconds
        return float(stats[0] / stats[1]), images_per_s

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:  # all ranks must stop together, not hang
            bad = self.accelerator.reduce(bad.float(), reduction="sum") > 0
        if bool(bad):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, step {step + 1}. "
                f"{self.out / 'last.pt'} (end of the previous epoch) is untouched. Try a lower "
                "optim.lr, optim.grad_clip > 0, or bf16 instead of fp16.")

    @torch.no_grad()
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
        console.print(
            f"training on {acc.num_processes} process(es), device {acc.device}, "
            f"mixed precision {acc.mixed_precision}, batch {cfg.train.batch_size}/process "
            f"(global {cfg.train.batch_size * acc.num_processes * cfg.train.grad_accumulation}"
            f"), {len(self.train_data)} train / {len(self.val_data)} val slices "
            f"({len(self.split['train'])}/{len(self.split['val'])} patients)")

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
        scheduler = make_scheduler(self.optimizer, cfg, self.start_epoch)
        t_start = time.perf_counter() - (self.history[-1]["elapsed_seconds"] if self.history
                                         else 0.0)
        last_epoch = min(cfg.train.epochs, cfg.train.stop_after_epoch or cfg.train.epochs)
        stopped_early = False
        with progress(disable=not self.is_main) as bar:
            for epoch in range(self.start_epoch, last_epoch):
                lr = self.optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}",
                                    total=len(self.train_loader), info="")
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
