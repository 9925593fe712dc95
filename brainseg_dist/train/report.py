"""What training shows while it runs: one console row per epoch, TensorBoard scalars and
validation overlays."""

from __future__ import annotations

from typing import Any

import torch

from brainseg_dist.console import console
from brainseg_dist.preprocess import to_unit

# The metrics.jsonl keys that go to TensorBoard (as train/<name> or val/<name>).
SCALARS = ("train_loss", "val_loss", "val_dice", "val_dice_patient_mean",
           "val_dice_patient_median", "val_dice_tumour_slices", "lr", "train_images_per_second")


def log_scalars(writer: Any, row: dict[str, Any]) -> None:
    """One epoch's :data:`SCALARS` to TensorBoard (step = epoch + 1)."""
    step = row["epoch"] + 1
    for key in SCALARS:
        group = "train" if key.startswith("train") or key == "lr" else "val"
        writer.add_scalar(f"{group}/{key.removeprefix(group + '_')}", row[key], step)
    writer.flush()


def overlay_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor
                 ) -> torch.Tensor:
    """FLAIR in grey; ground truth in green, prediction in red (yellow where both)."""
    flair = to_unit(images[:, 1:2])
    rgb = flair.repeat(1, 3, 1, 1) * 0.7
    rgb[:, 1:2] += 0.3 * masks.float()
    rgb[:, 0:1] += 0.3 * preds.float()
    return rgb.clamp(0, 1)


def print_row(row: dict[str, Any], epochs: int, header: bool, improved: bool) -> None:
    """The epoch's row of the console table (with the header on the first row)."""
    from rich.table import Table

    t = Table(show_header=header, box=None, pad_edge=False)
    for name, width in (("epoch", 7), ("loss", 6), ("val loss", 8), ("Dice", 6),
                        ("pt mean", 7), ("pt median", 9), ("lr", 8), ("s", 5),
                        ("img/s", 5), ("", 4)):
        t.add_column(name, justify="right", min_width=width)
    t.add_row(f"{row['epoch'] + 1}/{epochs}", f"{row['train_loss']:.4f}",
              f"{row['val_loss']:.4f}", f"{row['val_dice']:.4f}",
              f"{row['val_dice_patient_mean']:.4f}", f"{row['val_dice_patient_median']:.4f}",
              f"{row['lr']:.2e}", f"{row['epoch_seconds']:.1f}",
              f"{row['train_images_per_second']:.0f}", "best" if improved else "")
    console.print(t)
