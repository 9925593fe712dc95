"""Scan a ``kaggle_3m``-style root into one row per slice (image/mask pairs, no decoding).

Layout: ``ROOT/<folder>/<folder>_<n>.tif`` and ``ROOT/<folder>/<folder>_<n>_mask.tif``, where
``<folder>`` is ``TCGA_<site>_<id>_<date>``; optional ``ROOT/data.csv`` with a ``Patient``
column equal to the first three parts of the folder name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainseg_dist.errors import DataProblem

SLICE_COLUMNS = ["patient", "folder", "site", "slice", "image_path", "mask_path"]
_SLICE_RE = re.compile(r"^(?P<folder>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


def patient_id(folder: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``TCGA_CS_4941`` (the key of ``data.csv``)."""
    return "_".join(folder.split("_")[:3])


def site_of(folder: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``CS`` (the acquiring institution)."""
    parts = folder.split("_")
    return parts[1] if len(parts) > 1 else ""


def list_slices(root: str | Path) -> tuple[pd.DataFrame, list[DataProblem]]:
    """Pair every image with its mask under ``root``.

    Args:
        root: dataset root holding one folder per patient.

    Returns:
        ``(table, problems)``. The table has one row per complete image/mask pair with columns
        ``SLICE_COLUMNS``, ordered by folder then numeric slice number (``_2`` before ``_10``).
        ``problems`` lists unpaired files, unexpected names, empty folders and an empty root.
    """
    root = Path(root)
    problems: list[DataProblem] = []
    if root.exists() and not root.is_dir():
        return pd.DataFrame(columns=SLICE_COLUMNS), [DataProblem(
            root, "dataset root is a file; expected a folder of patient folders")]
    if not root.is_dir():
        return pd.DataFrame(columns=SLICE_COLUMNS), [DataProblem(root, "dataset root not found")]
    rows = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        rows += _folder_pairs(folder, problems)
    if not folders:
        problems.append(DataProblem(root, "dataset root is empty: no patient folders"))
    elif not rows and not problems:
        problems.append(DataProblem(root, "no image/mask pairs found"))
    table = pd.DataFrame(rows, columns=SLICE_COLUMNS)
    return table, problems


def _folder_pairs(folder: Path, problems: list[DataProblem]) -> list[tuple]:
    """The image/mask pairs of one patient folder (table rows); problems are appended."""
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    clashing: set[int] = set()
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in (".tif", ".tiff"):
            continue
        m = _SLICE_RE.match(f.name)
        if m is None or m["folder"] != folder.name:
            problems.append(
                DataProblem(f, f"unexpected file name; expected {folder.name}_<n>[_mask].tif")
            )
            continue
        found = masks if m["mask"] else images
        n = int(m["n"])
        if n in found:  # _5.tif and _5.tiff, or _01 and _1: which one is meant?
            problems.append(DataProblem(f, f"slice number {n} again: {found[n].name} has "
                                           "it too; keep only one of the two files"))
            clashing.add(n)
            continue
        found[n] = f
    if not images and not masks:
        problems.append(DataProblem(folder, "patient folder has no slices"))
        return []
    rows = []
    for n in sorted(set(images) | set(masks)):
        if n in clashing:
            continue
        if n not in masks:
            problems.append(DataProblem(images[n], "image has no mask (expected "
                                        f"{folder.name}_{n}_mask.tif)"))
        elif n not in images:
            problems.append(DataProblem(masks[n], "mask has no image (expected "
                                        f"{folder.name}_{n}.tif)"))
        else:
            rows.append((patient_id(folder.name), folder.name, site_of(folder.name), n,
                         str(images[n]), str(masks[n])))
    return rows


def read_clinical(root: str | Path) -> tuple[pd.DataFrame | None, list[DataProblem]]:
    """Read ``ROOT/data.csv`` if present (one row per patient, keyed by ``Patient``)."""
    path = Path(root) / "data.csv"
    if not path.is_file():
        return None, []
    try:
        # Patient IDs are text; read as numbers they could not be joined to folder names.
        clinical = pd.read_csv(path, dtype={"Patient": str})
    except Exception as exc:  # pandas raises several types for bad CSVs
        return None, [DataProblem(path, f"unreadable CSV: {exc}")]
    if "Patient" not in clinical.columns:
        return None, [DataProblem(path, "no 'Patient' column")]
    ids = clinical["Patient"]
    blank = [i + 2 for i, v in enumerate(ids) if not isinstance(v, str) or not v.strip()]
    if blank:  # +2: the header is line 1
        return None, [DataProblem(path, f"'Patient' column is blank on line(s) "
                                        f"{', '.join(map(str, blank[:10]))}")]
    numeric = [v for v in ids if v.strip().lstrip("+-").replace(".", "", 1).isdigit()]
    if numeric:
        return None, [DataProblem(path, f"'Patient' column holds numbers (e.g. {numeric[0]}); "
                                        "expected patient IDs such as TCGA_CS_4941")]
    return clinical.drop_duplicates("Patient"), []


def join_clinical(table: pd.DataFrame, clinical: pd.DataFrame | None) -> pd.DataFrame:
    """Left-join per-patient clinical columns onto the slice table (absent data.csv is fine)."""
    if clinical is None:
        return table
    clinical = clinical.rename(columns={"Patient": "patient"})
    clinical = clinical[[c for c in clinical.columns if c == "patient" or c not in table.columns]]
    return table.merge(clinical, on="patient", how="left")
