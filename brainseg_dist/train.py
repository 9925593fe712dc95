"""Training: ``accelerate launch -m brainseg_dist.train`` (1..N processes) or ``brainseg train``.

One code path for every process count. Accelerate handles device placement, DDP and AMP; the
loader yields uint8 batches and normalization plus augmentation run batched on the device.
Validation overlap counts are gathered across ranks with the padding duplicates dropped, so
1 and N processes report the same numbers for the same weights.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import Sampler

from brainseg_dist.augment import DeviceAugment, normalize, volume_statistics
from brainseg_dist.config import Config, dump_config
from brainseg_dist.console import console, progress
from brainseg_dist.data import SliceData, load_dataset
from brainseg_dist.data.loader import SliceDataset, collate_batch
from brainseg_dist.data.split import load_split, make_split, patient_burden, save_split
from brainseg_dist.data.synth import run_data_root, write_synthetic_dataset
from brainseg_dist.ema import WeightEMA
from brainseg_dist.errors import BrainsegError, NonFiniteLossError
from brainseg_dist.io import (
    atomic_torch_save,
    atomic_write_text,
    dumps_strict,
    load_checkpoint_file,
    remove_temporaries,
)
from brainseg_dist.metrics import bce_dice_loss, overlap_counts, summarize_dice
from brainseg_dist.model import build_model
from brainseg_dist.rundir import load_resumable

METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_dice", "val_dice_patient_mean",
               "val_dice_patient_median", "val_dice_tumour_slices", "lr", "epoch_seconds",
               "elapsed_seconds", "train_images_per_second")


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


@dataclass
class TrainResult:
    output_dir: Path
    best_epoch: int
    best_dice_patient_mean: float
    epochs_run: int
    history: list[dict[str, Any]]
    stopped_early: bool


def resolve_mixed_precision(setting: str, device_type: str) -> str | None:
    """``auto``: the accelerate config's choice if launched with one, else bf16 on CUDA
    (fp16 where bf16 is unsupported) and off on CPU, where autocast slows training."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # let Accelerator read the launch config
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def lr_factor(epoch: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 1% (or constant), as a multiple of ``optim.lr``."""
    warm = cfg.optim.warmup_epochs
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    if cfg.optim.schedule == "constant":
        return 1.0
    t = (epoch - warm) / max(1, cfg.train.epochs - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def prepare_data_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The dataset root: ``data.data_dir``, or a synthetic dataset generated once per run."""
    root = run_data_root(cfg.train.output_dir, cfg.data.data_dir)
    if cfg.data.data_dir:
        return root
    done = root.parent / "COMPLETE"
    # The marker holds the parameters: a set made with other ones is replaced, not reused.
    key = f"patients={cfg.data.synthetic_patients} seed={cfg.train.seed}\n"
    if accelerator.is_main_process and not _marker_matches(done, key):
        done.unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
        remove_temporaries(root.parent)
        write_synthetic_dataset(root, patients=cfg.data.synthetic_patients, seed=cfg.train.seed)
        atomic_write_text(done, key)
    accelerator.wait_for_everyone()
    return root


def _marker_matches(marker: Path, key: str) -> bool:
    try:
        return marker.read_text() == key
    except OSError:
        return False


def split_for_run(cfg: Config, data: SliceData, out: Path, resume: bool,
                  given: dict | None = None) -> dict:
    """The run's split: ``given`` (e.g. a cross-validation fold), the saved ``split.json``
    when resuming, else a new one from the config.

    Raises:
        BrainsegError: resuming with a ``given`` split that differs from the saved one.
    """
    path = out / "split.json"
    saved = load_split(path) if resume and path.exists() else None
    if given is not None:
        if saved is not None and any(saved.get(k) != given.get(k) for k in
                                     ("train", "val", "test")):
            raise BrainsegError(f"{path}: the run was trained on a different patient split")
        return given
    if saved is not None:
        return saved
    return make_split(patient_burden(data.table), cfg.data.val_fraction, cfg.data.test_fraction,
                      cfg.train.seed, cfg.data.folds, cfg.data.fold)


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (numpy arrays would need an unsafe unpickler)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _overlay_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """FLAIR in grey; ground truth in green, prediction in red (yellow where both)."""
    flair = images[:, 1:2].float() / 255.0
    rgb = flair.repeat(1, 3, 1, 1) * 0.7
    rgb[:, 1:2] += 0.3 * masks.float()
    rgb[:, 0:1] += 0.3 * preds.float()
    return rgb.clamp(0, 1)


class Trainer:
    """State of one training run; :meth:`fit` runs it. Build through :func:`run_training`."""

    def __init__(self, cfg: Config, resume: bool = False, split: dict | None = None):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.resume = resume
        # Without a GPU, cpu=True is what makes Accelerate use gloo DDP under torchrun.
        use_cpu = (cfg.train.cpu or not torch.cuda.is_available()
                   or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision,
                                                    "cpu" if use_cpu else "cuda"),
            gradient_accumulation_steps=cfg.train.grad_accumulation,
            cpu=use_cpu,
            dataloader_config=DataLoaderConfiguration(even_batches=True),
        )
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)

        root = prepare_data_dir(cfg, self.accelerator)
        with self.accelerator.main_process_first():  # rank 0 fills the decode cache
            data = load_dataset(root, cfg.data.image_size, cfg.data.cache_dir,
                                cfg.data.skip_invalid, show_progress=self.is_main)
        self.split = split_for_run(cfg, data, self.out, resume, split)
        self.train_data = data.subset(self.split["train"])
        self.val_data = data.subset(self.split["val"])
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise BrainsegError(f"{root}: split left no training or validation slices "
                                f"({len(data.patients)} patients); add patients or change "
                                "data.val_fraction")
        self.val_patients = self.val_data.table["patient"].to_numpy()
        device = self.accelerator.device
        self.train_stats = self._volume_stats(self.train_data)
        self.val_stats = self._volume_stats(self.val_data)

        self.sampler = EpochShuffleSampler(len(self.train_data), cfg.train.seed)
        train_loader = torch.utils.data.DataLoader(
            SliceDataset(self.train_data), batch_size=cfg.train.batch_size, sampler=self.sampler,
            num_workers=cfg.data.num_workers, collate_fn=collate_batch, drop_last=False,
            pin_memory=device.type == "cuda")
        val_loader = torch.utils.data.DataLoader(
            SliceDataset(self.val_data), batch_size=cfg.train.batch_size, shuffle=False,
            num_workers=cfg.data.num_workers, collate_fn=collate_batch)

        model = build_model(cfg.model.base_width, cfg.model.depth, cfg.model.channels_last,
                            cfg.model.foreground_prior)
        if (cfg.model.sync_batchnorm and self.accelerator.num_processes > 1
                and device.type == "cuda"):  # SyncBatchNorm is GPU-only in torch
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self.augment = DeviceAugment(cfg.augment).to(device)
        self.ema = (WeightEMA(self.accelerator.unwrap_model(self.model), cfg.train.ema_decay)
                    if cfg.train.ema_decay > 0 else None)
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)
        self.start_epoch = 0
        self.best = -1.0
        self.best_epoch = -1
        self.stale_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.writer = None

    def eval_model(self) -> torch.nn.Module:
        """The weights that validation, ``best.pt`` and export use: the EMA when it is on."""
        if self.ema is not None:
            return self.ema.model
        return self.accelerator.unwrap_model(self.model)

    def _volume_stats(self, data: SliceData) -> torch.Tensor | None:
        """Per-slice patient statistics for ``volume`` normalization (None otherwise)."""
        if self.cfg.train.normalization != "volume":
            return None
        codes = data.table["patient"].factorize()[0]
        return volume_statistics(data.images, codes).to(self.accelerator.device)

    # ----------------------------------------------------------------- persistence
    def _checkpoint(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "model": self.eval_model().state_dict(),
            **({"live_model": acc.unwrap_model(self.model).state_dict(),
                "ema_updates": torch.tensor(self.ema.updates)} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "metrics": metrics,
            "history": list(self.history),  # metrics.jsonl is rebuilt from it on --resume
            "model_args": {"base_width": self.cfg.model.base_width,
                           "depth": self.cfg.model.depth},
            "image_size": self.cfg.data.image_size,
            "normalization": self.cfg.train.normalization,
            "threshold": self.cfg.train.threshold,
        }

    def _restore(self) -> None:
        path = self.out / "last.pt"
        if not path.exists():
            raise BrainsegError(f"{path}: nothing to resume (no last.pt in the run directory)")
        state = load_resumable(path)
        if state["config_hash"] != self.cfg.hash():
            raise BrainsegError(f"{path}: checkpoint was trained with a different config "
                                f"(hash {state['config_hash']} != {self.cfg.hash()})")
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
        _set_rng_state(state["rng"])
        # last.pt carries the history up to its epoch: metrics.jsonl (written after it, so
        # possibly one epoch behind after a kill, or damaged) is rewritten from it.
        self.history = list(state["history"])
        if self.is_main:
            self._write_history()
            console.print(f"resumed from {path} at epoch {self.start_epoch + 1}")

    def _write_history(self) -> None:
        text = "".join(dumps_strict(r) + "\n" for r in self.history)
        atomic_write_text(self.out / "metrics.jsonl", text)

    # ----------------------------------------------------------------- steps
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
                x = self._inputs(self.augment.intensity(images), idx, self.train_stats)
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
            x = self._inputs(images, idx, self.val_stats)
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
                         self.val_stats)
        with self.accelerator.autocast():
            pred = torch.sigmoid(model(x).float()) > self.cfg.train.threshold
        self.writer.add_images("val/overlay (green: truth, red: prediction)",
                               _overlay_grid(images, masks, pred.cpu()), epoch + 1)

    # ----------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        if self.resume:
            self._restore()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_config(cfg))
            save_split(self.split, self.out / "split.json")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=(
                self.start_epoch + 1 if self.resume else None))
            console.print(
                f"training on {acc.num_processes} process(es), device {acc.device}, "
                f"mixed precision {acc.mixed_precision}, batch {cfg.train.batch_size}/process "
                f"(global {cfg.train.batch_size * acc.num_processes * cfg.train.grad_accumulation}"
                f"), {len(self.train_data)} train / {len(self.val_data)} val slices "
                f"({len(self.split['train'])}/{len(self.split['val'])} patients)")
        t_start = time.perf_counter() - (self.history[-1]["elapsed_seconds"] if self.history
                                         else 0.0)
        stopped_early = False
        last_epoch = cfg.train.epochs
        if cfg.train.stop_after_epoch:
            last_epoch = min(last_epoch, cfg.train.stop_after_epoch)
        with progress(disable=not self.is_main) as bar:
            for epoch in range(self.start_epoch, last_epoch):
                lr = cfg.optim.lr * lr_factor(epoch, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}",
                                    total=len(self.train_loader), info="")
                train_loss, ips = self.train_epoch(epoch, bar, task)
                val = self.validate()
                bar.remove_task(task)
                row = {"epoch": epoch, "train_loss": train_loss, **val, "lr": lr,
                       "epoch_seconds": time.perf_counter() - t0,
                       "elapsed_seconds": time.perf_counter() - t_start,
                       "train_images_per_second": ips, "time": time.time()}
                # "last" keeps the final (averaged) weights: with a handful of validation
                # patients, picking the best epoch mostly picks noise.
                improved = (cfg.train.select == "last"
                            or val["val_dice_patient_mean"] > self.best)
                if improved:
                    self.best, self.best_epoch, self.stale_epochs = (
                        val["val_dice_patient_mean"], epoch, 0)
                else:
                    self.stale_epochs += 1
                self.history.append(row)
                if self.is_main:
                    state = self._checkpoint(epoch, row)
                    if improved:
                        atomic_torch_save(self.out / "best.pt", state)
                    atomic_torch_save(self.out / "last.pt", state)
                    self._write_history()
                    self._log_scalars(row)
                    self._log_overlays(epoch)
                    self._print_row(row, improved)
                acc.wait_for_everyone()
                if cfg.train.patience and self.stale_epochs >= cfg.train.patience:
                    stopped_early = True
                    if self.is_main:
                        console.print(f"early stop: no improvement for {cfg.train.patience} "
                                      f"epochs (best epoch {self.best_epoch + 1})")
                    break
        if self.writer is not None:
            self.writer.close()
        if self.is_main:
            console.print(f"best val per-patient Dice {self.best:.4f} at epoch "
                          f"{self.best_epoch + 1}; run directory {self.out}")
            finished = len(self.history) == cfg.train.epochs or stopped_early
            if cfg.train.export and finished and (self.out / "best.pt").exists():
                from brainseg_dist.export import export_run

                # model.onnx (about 17 s more on CPU) is left to an explicit `brainseg export`.
                export_run(self.out, onnx=False)
        return TrainResult(self.out, self.best_epoch, self.best, len(self.history), self.history,
                           stopped_early)

    def _log_scalars(self, row: dict[str, Any]) -> None:
        step = row["epoch"] + 1
        for key in ("train_loss", "val_loss", "val_dice", "val_dice_patient_mean",
                    "val_dice_patient_median", "val_dice_tumour_slices", "lr",
                    "train_images_per_second"):
            group = "train" if key.startswith("train") or key == "lr" else "val"
            self.writer.add_scalar(f"{group}/{key.removeprefix(group + '_')}", row[key], step)
        self.writer.flush()

    def _print_row(self, row: dict[str, Any], improved: bool) -> None:
        from rich.table import Table

        t = Table(show_header=row["epoch"] == self.start_epoch, box=None, pad_edge=False)
        for name, width in (("epoch", 7), ("loss", 6), ("val loss", 8), ("Dice", 6),
                            ("pt mean", 7), ("pt median", 9), ("lr", 8), ("s", 5),
                            ("img/s", 5), ("", 4)):
            t.add_column(name, justify="right", min_width=width)
        t.add_row(f"{row['epoch'] + 1}/{self.cfg.train.epochs}", f"{row['train_loss']:.4f}",
                  f"{row['val_loss']:.4f}", f"{row['val_dice']:.4f}",
                  f"{row['val_dice_patient_mean']:.4f}", f"{row['val_dice_patient_median']:.4f}",
                  f"{row['lr']:.2e}", f"{row['epoch_seconds']:.1f}",
                  f"{row['train_images_per_second']:.0f}", "best" if improved else "")
        console.print(t)


def validate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, float]:
    """Validate saved weights on the run's validation patients, in 1..N processes.

    Writes ``validation.json`` to the run directory (main process) and returns the metrics;
    used to check that every process count reports the same numbers.
    """
    state = load_checkpoint_file(checkpoint)  # before any data is loaded
    if "model" not in state:
        raise BrainsegError(f"{checkpoint}: not a brainseg checkpoint (no model weights)")
    trainer = Trainer(cfg, resume=True)
    try:
        trainer.eval_model().load_state_dict(state["model"])
    except RuntimeError as exc:
        raise BrainsegError(f"{checkpoint}: weights do not fit the configured model "
                            f"({str(exc).splitlines()[0]})") from None
    metrics = trainer.validate()
    metrics["processes"] = trainer.accelerator.num_processes
    if trainer.is_main:
        atomic_write_text(trainer.out / "validation.json", dumps_strict(metrics, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return metrics


def run_training(cfg: Config, resume: bool = False, split: dict | None = None) -> TrainResult:
    """Train a U-Net as configured and write the run directory.

    Args:
        cfg: the resolved config (``train.output_dir`` is the run directory).
        resume: continue from ``last.pt`` with model, optimizer, scaler, epoch and RNG state.
        split: patients for train/val/test (e.g. one cross-validation fold); default: the
            saved ``split.json`` on resume, else a new split from ``cfg.data``.

    Returns:
        Best epoch and score, and the per-epoch history.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; ``last.pt`` holds the previous epoch.
        DatasetError, ConfigError, BrainsegError: bad inputs, named in the message.
    """
    return Trainer(cfg, resume, split).fit()


def main() -> None:
    """``accelerate launch -m brainseg_dist.train [options]``: the same options as
    ``brainseg train``."""
    from brainseg_dist.cli import train_command

    train_command(prog_name="python -m brainseg_dist.train")


if __name__ == "__main__":
    main()
