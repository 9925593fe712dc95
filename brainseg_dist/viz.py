"""Figures (PNG): dataset samples and statistics, training curves, evaluation overlays."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from brainseg_dist.io import atomic_write_bytes  # noqa: E402

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
