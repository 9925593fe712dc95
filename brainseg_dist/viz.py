"""Figures (PNG): dataset samples and statistics, training curves, evaluation overlays."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

from brainseg_dist.io import atomic_write_bytes

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
MASK_CMAP = ListedColormap([(0, 0, 0, 0), (1.0, 0.2, 0.1, 1.0)])  # transparent / tumour red
GT_COLOUR, PRED_COLOUR = "#00e676", "#ff1744"


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render to PNG in memory, then write atomically; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def overlay(image: np.ndarray, mask: np.ndarray, colour=(1.0, 0.2, 0.1), alpha: float = 0.45):
    """FLAIR (channel 1) in grey with the mask blended in colour, as H×W×3 float RGB."""
    flair = image[..., 1] if image.ndim == 3 else image
    rgb = np.repeat(flair[..., None].astype(np.float32) / 255.0, 3, axis=2)
    m = mask.astype(bool)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return rgb


def sample_grid(images: list[np.ndarray], masks: list[np.ndarray], titles: list[str],
                path: str | Path) -> Path:
    """Each row: the three channels, the colour-mapped mask and the overlay, side by side.

    Args:
        images: H×W×3 uint8 slices.
        masks: H×W 0/1 masks.
        titles: row labels (e.g. ``folder, slice n``).
        path: PNG destination.
    """
    cols = [*CHANNELS, "mask", "overlay"]
    fig, axes = plt.subplots(len(images), len(cols), figsize=(2.2 * len(cols), 2.3 * len(images)),
                             squeeze=False)
    for r, (image, mask, title) in enumerate(zip(images, masks, titles, strict=True)):
        for c in range(3):
            axes[r, c].imshow(image[..., c], cmap="gray", vmin=0, vmax=255)
        axes[r, 3].imshow(np.zeros_like(mask), cmap="gray", vmin=0, vmax=1)
        axes[r, 3].imshow(mask, cmap=MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
        axes[r, 4].imshow(overlay(image, mask))
        axes[r, 0].set_ylabel(title, fontsize=7)
    for c, name in enumerate(cols):
        axes[0, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Samples: channels, colour-mapped mask, overlay on FLAIR", fontsize=10, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


def class_balance(table: pd.DataFrame, path: str | Path) -> Path:
    """Bar chart of positive (tumour) and negative slices, overall and per site."""
    counts = table.groupby(["site", "diagnosis"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=[0, 1], fill_value=0)
    total = counts.sum()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    bars = ax0.bar(["negative", "positive"], [total[0], total[1]], color=["#90a4ae", "#e53935"])
    ax0.bar_label(bars)
    ax0.margins(y=0.12)
    ax0.set_title(f"{len(table)} slices, {table['patient'].nunique()} patients")
    ax0.set_ylabel("slices")
    x = np.arange(len(counts))
    ax1.bar(x - 0.2, counts[0], 0.4, label="negative", color="#90a4ae")
    ax1.bar(x + 0.2, counts[1], 0.4, label="positive", color="#e53935")
    ax1.set_xticks(x, counts.index)
    ax1.set_xlabel("site")
    ax1.set_title("slices per site")
    ax1.legend()
    return save_figure(fig, path)


def tumour_size_histogram(table: pd.DataFrame, path: str | Path) -> Path:
    """Histogram of tumour area (pixels at native resolution) on positive slices."""
    sizes = table.loc[table["diagnosis"] == 1, "tumour_pixels"].to_numpy()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.hist(sizes, bins=40, color="#e53935", edgecolor="white")
    if len(sizes):
        ax.axvline(np.median(sizes), color="k", ls="--", label=f"median {np.median(sizes):.0f}")
        ax.legend()
    ax.set_xlabel("tumour pixels per positive slice")
    ax.set_ylabel("slices")
    ax.set_title(f"Tumour size on {len(sizes)} positive slices")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- evaluation
def dice_per_patient(dice: dict[str, float], path: str | Path, title: str = "") -> Path:
    """Bar chart of per-patient 3D Dice, sorted, with the mean and median marked.

    Args:
        dice: ``{patient: dice}``.
        path: PNG destination.
        title: figure title (e.g. split and variant).
    """
    items = sorted(dice.items(), key=lambda kv: kv[1])
    names = [k for k, _ in items]
    values = np.array([v for _, v in items], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(items) + 2), 3.8))
    colours = plt.cm.RdYlGn(np.clip(values, 0, 1))
    ax.bar(np.arange(len(items)), values, color=colours, edgecolor="k", linewidth=0.4)
    if len(values):
        ax.axhline(values.mean(), color="k", ls="--", lw=1, label=f"mean {values.mean():.3f}")
        ax.axhline(np.median(values), color="#1565c0", ls=":", lw=1.2,
                   label=f"median {np.median(values):.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(np.arange(len(items)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("3D Dice")
    ax.set_title(title or f"Per-patient Dice ({len(items)} patients)", fontsize=10)
    return save_figure(fig, path)


def paired_dice(reference: dict[str, float], others: dict[str, dict[str, float]],
                reference_name: str, path: str | Path, titles: dict[str, str] | None = None
                ) -> Path:
    """One panel per compared run: each patient's Dice under the reference (x) against the
    compared run (y); points above the diagonal got better.

    Args:
        reference: ``{patient: Dice}`` of the reference run.
        others: ``{run name: {patient: Dice}}``, the same patients.
        reference_name: the x axis label.
        path: PNG destination.
        titles: optional panel title per run name.
    """
    fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others), 4.2), squeeze=False)
    for ax, (name, dice) in zip(axes[0], others.items(), strict=True):
        patients = sorted(dice)
        x = np.array([reference[p] for p in patients], dtype=float)
        y = np.array([dice[p] for p in patients], dtype=float)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, zorder=0)
        ax.scatter(x, y, c=np.where(y >= x, "#2e7d32", "#c62828"), s=22, edgecolor="k",
                   linewidth=0.4)
        low = min(0.5, float(np.nanmin(np.r_[x, y]))) if len(x) else 0.0
        ax.set_xlim(low - 0.02, 1.01)
        ax.set_ylim(low - 0.02, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{Path(reference_name).name} (per-patient Dice)", fontsize=8)
        ax.set_ylabel(f"{Path(name).name} (per-patient Dice)", fontsize=8)
        ax.set_title((titles or {}).get(name, name), fontsize=8)
    return save_figure(fig, path)

def patient_overlays(images: list[np.ndarray], masks: list[np.ndarray],
                     preds: list[np.ndarray], titles: list[str], path: str | Path,
                     suptitle: str = "") -> Path:
    """A row of slices: FLAIR with ground truth and prediction outlined in two colours.

    Args:
        images: H×W×3 uint8 slices (FLAIR is channel 1).
        masks: H×W 0/1 ground truth, outlined in green.
        preds: H×W 0/1 prediction, outlined in red.
        titles: one caption per slice.
        path: PNG destination.
        suptitle: figure title (e.g. patient and Dice).
    """
    from matplotlib.lines import Line2D

    n = max(1, len(images))
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.1), squeeze=False)
    for ax, image, mask, pred, title in zip(axes[0], images, masks, preds, titles, strict=False):
        ax.imshow(image[..., 1], cmap="gray", vmin=0, vmax=255)
        # contour draws the 0.5 level of each binary mask: its outline, sub-pixel smooth.
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[GT_COLOUR], linewidths=1.2)
        if pred.any():
            ax.contour(pred.astype(float), levels=[0.5], colors=[PRED_COLOUR], linewidths=1.0,
                       linestyles="--")
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=GT_COLOUR, lw=1.5, label="ground truth"),
               Line2D([], [], color=PRED_COLOUR, lw=1.5, ls="--", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def training_curves(rows: list[dict] | str | Path, path: str | Path) -> Path:
    """Loss, validation Dice and learning rate per epoch from ``metrics.jsonl``.

    Args:
        rows: the parsed rows, or the path of ``metrics.jsonl`` (one JSON object per epoch).
        path: PNG destination.
    """
    from brainseg_dist.io import read_jsonl

    if isinstance(rows, str | Path):
        rows = read_jsonl(rows, "metrics file")
    frame = pd.DataFrame(rows)
    epoch = frame["epoch"].to_numpy() + 1 if "epoch" in frame else np.arange(1, len(frame) + 1)
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if key in frame:
            ax0.plot(epoch, frame[key], marker=".", label=label)
    ax0.set_title("loss (BCE + soft Dice)")
    ax0.legend(fontsize=8)
    for key, label in (("val_dice_patient_mean", "per-patient mean"),
                       ("val_dice_patient_median", "per-patient median"),
                       ("val_dice", "pooled"), ("val_dice_tumour_slices", "tumour slices")):
        if key in frame:
            ax1.plot(epoch, frame[key], marker=".", label=label)
    if "val_dice_patient_mean" in frame and len(frame):
        best = int(frame["val_dice_patient_mean"].to_numpy().argmax())
        ax1.axvline(epoch[best], color="k", ls=":", lw=1, label=f"best epoch {epoch[best]}")
    ax1.set_ylim(0, 1)
    ax1.set_title("validation Dice")
    ax1.legend(fontsize=7)
    if "lr" in frame:
        ax2.plot(epoch, frame["lr"], marker=".", color="#6a1b9a")
        ax2.set_yscale("log")
    ax2.set_title("learning rate")
    for ax in (ax0, ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def dataset_figures(data: Any, out: Path) -> list[Path]:
    """``brainseg data summary --figures OUT``: sample slices (the largest tumours and some
    empty slices), the class balance and the tumour-size histogram of a loaded dataset."""
    from brainseg_dist.data.decode import read_pair

    table = data.table
    pos = table[table["diagnosis"] == 1].sort_values("tumour_pixels", ascending=False)
    rows = list(pos.drop_duplicates("patient").head(4).index)
    rows += list(table[table["diagnosis"] == 0].drop_duplicates("patient").head(6 - len(rows))
                 .index)
    pairs = [read_pair(table.at[i, "image_path"], table.at[i, "mask_path"]) for i in rows]
    titles = [f"{table.at[i, 'folder']}\nslice {table.at[i, 'slice']}" for i in rows]
    out.mkdir(parents=True, exist_ok=True)
    return [
        sample_grid([p[0] for p in pairs], [p[1] for p in pairs], titles,
                        out / "samples.png"),
        class_balance(table, out / "class_balance.png"),
        tumour_size_histogram(table, out / "tumour_sizes.png"),
    ]
