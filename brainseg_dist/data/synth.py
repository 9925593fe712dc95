"""Synthetic brain MRI in exactly the ``kaggle_3m`` layout, for tests and the demo.

Each patient is a stack of axial slices through an ellipsoidal head: skull, grey and white
matter, ventricles, a smooth bias field and noise, in three channels (pre-contrast, FLAIR,
post-contrast). An irregular tumour that is bright on FLAIR spans a run of consecutive slices,
so most slices are empty, as in the real data. Output is deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from brainseg_dist.io import atomic_write, atomic_write_text

SITES = ("CS", "DU", "EZ", "FG", "HT")
SIZE = 256


def _patient_name(rng: np.random.Generator, used: set[str]) -> str:
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    while True:
        site = SITES[rng.integers(len(SITES))]
        pid = "".join(rng.choice(alphabet, 4))
        date = f"{rng.integers(1985, 2003)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
        name = f"TCGA_{site}_{pid}_{date}"
        if name[:12] not in used:
            used.add(name[:12])
            return name


def _smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Low-frequency multiplicative bias field around 1."""
    a, b, c, d = rng.normal(0, 0.08, 4)
    return 1 + a * xx + b * yy + c * xx * yy + d * (xx**2 - yy**2)


def synth_patient(rng: np.random.Generator, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One patient's volume: images ``n×256×256×3`` uint8 and masks ``n×256×256`` (0/255)."""
    yy, xx = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    ry, rx = rng.uniform(0.72, 0.85), rng.uniform(0.58, 0.7)
    bias = _smooth_field(rng, yy, xx)
    # Tumour: a union of a few random blobs, centred inside one hemisphere.
    z_len = rng.uniform(0.25, 0.45) * n_slices
    z_c = rng.uniform(0.35, 0.65) * n_slices
    cy, cx = rng.uniform(-0.3, 0.3), rng.choice([-1, 1]) * rng.uniform(0.15, 0.3)
    blobs = [(cy + rng.normal(0, 0.06), cx + rng.normal(0, 0.06), rng.uniform(0.1, 0.22),
              rng.uniform(0.08, 0.18)) for _ in range(rng.integers(2, 5))]
    flair_gain = rng.uniform(70, 110)
    images = np.zeros((n_slices, SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((n_slices, SIZE, SIZE), np.uint8)
    for z in range(n_slices):
        t = (z - (n_slices - 1) / 2) / (n_slices / 2 + 1)  # -1..1 along the head
        scale = np.sqrt(max(1 - t**2, 0.05))
        r = np.sqrt((yy / (ry * scale)) ** 2 + (xx / (rx * scale)) ** 2)
        head, brain = r < 1.0, r < 0.9
        white = r < 0.6
        vent = (((yy + 0.05) / 0.25) ** 2 + (np.abs(xx) / 0.12 - 0.6) ** 2 < 0.5) & (abs(t) < 0.4)
        tz = (z - z_c) / (z_len / 2)
        tumour = np.zeros_like(head)
        if abs(tz) < 1:
            for by, bx, br, jitter in blobs:
                angle = np.arctan2(yy - by, xx - bx)
                rad = br * np.sqrt(1 - tz**2) * (1 + jitter * np.sin(5 * angle))
                tumour |= (yy - by) ** 2 + (xx - bx) ** 2 < rad**2
            tumour &= brain
        pre = np.where(head & ~brain, 150, 0) + np.where(brain, 90, 0) + np.where(white, 30, 0)
        flair = np.where(head & ~brain, 60, 0) + np.where(brain, 85, 0) - np.where(white, 15, 0)
        post = pre + np.where(head & ~brain, 30, 0)
        vol = np.stack([pre, flair, post], -1).astype(np.float32)
        vol[vent] = (20, 15, 25)
        vol[tumour] += (-15, flair_gain, 5)
        vol *= bias[..., None]
        vol += rng.normal(0, 4, vol.shape) * head[..., None]
        images[z] = np.clip(vol, 0, 255).astype(np.uint8)
        masks[z] = tumour.astype(np.uint8) * 255
    return images, masks


def write_synthetic_dataset(
    out: str | Path, patients: int = 12, seed: int = 0, slices: tuple[int, int] = (20, 40)
) -> Path:
    """Write a synthetic ``kaggle_3m``-style dataset (folders, tifs, ``data.csv``).

    Args:
        out: destination root; created if needed. Existing patient files are overwritten
            atomically, one file at a time.
        patients: number of patient folders.
        seed: the same seed gives byte-identical files.
        slices: inclusive range of slices per patient.

    Returns:
        The root path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    rows = []
    for _ in range(patients):
        name = _patient_name(rng, used)
        n = int(rng.integers(slices[0], slices[1] + 1))
        images, masks = synth_patient(rng, n)
        folder = out / name
        folder.mkdir(exist_ok=True)
        for z in range(n):
            atomic_write(folder / f"{name}_{z + 1}.tif",
                         lambda p, a=images[z]: tifffile.imwrite(p, a, photometric="rgb"))
            atomic_write(folder / f"{name}_{z + 1}_mask.tif",
                         lambda p, a=masks[z]: tifffile.imwrite(p, a, photometric="minisblack"))
        rows.append({
            "Patient": name[:12],
            "RNASeqCluster": int(rng.integers(1, 5)),
            "MethylationCluster": int(rng.integers(1, 6)),
            "histological_type": int(rng.integers(1, 4)),
            "neoplasm_histologic_grade": int(rng.integers(1, 3)),
            "gender": int(rng.integers(1, 3)),
            "age_at_initial_pathologic": int(rng.integers(20, 75)),
            "death01": int(rng.integers(0, 2)),
        })
    atomic_write_text(out / "data.csv", pd.DataFrame(rows).to_csv(index=False))
    return out
