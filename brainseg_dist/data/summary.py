"""Dataset counts and tumour-size statistics for ``brainseg data summary``."""

from __future__ import annotations

import numpy as np
import pandas as pd


def summarize(table: pd.DataFrame) -> dict:
    """Counts and tumour-size statistics of a slice table.

    Returns:
        A JSON-ready dict with ``patients``, ``slices``, ``positive_slices``,
        ``negative_slices``, ``positive_fraction``, ``slices_per_site``,
        ``slices_per_patient`` (min/median/max), ``tumour_pixels_per_positive_slice``
        (mean/median/p5/p95/max, native resolution) and ``tumour_pixels_per_patient``.
    """
    pos = table[table["diagnosis"] == 1]
    per_patient = table.groupby("patient")
    sizes = pos["tumour_pixels"].to_numpy(dtype=float)
    burden = per_patient["tumour_pixels"].sum().to_numpy(dtype=float)

    def stats(x: np.ndarray) -> dict:
        if len(x) == 0:
            return {"mean": 0.0, "median": 0.0, "p5": 0.0, "p95": 0.0, "max": 0.0}
        return {"mean": float(x.mean()), "median": float(np.median(x)),
                "p5": float(np.percentile(x, 5)), "p95": float(np.percentile(x, 95)),
                "max": float(x.max())}

    counts = per_patient.size()
    return {
        "patients": int(table["patient"].nunique()),
        "slices": len(table),
        "positive_slices": len(pos),
        "negative_slices": len(table) - len(pos),
        "positive_fraction": float(len(pos) / max(len(table), 1)),
        "patients_with_tumour": int((per_patient["diagnosis"].max() > 0).sum()),
        "slices_per_site": {str(k): int(v) for k, v in table.groupby("site").size().items()},
        "patients_per_site": {
            str(k): int(v) for k, v in table.groupby("site")["patient"].nunique().items()
        },
        "slices_per_patient": {"min": int(counts.min()), "median": float(counts.median()),
                               "max": int(counts.max())},
        "tumour_pixels_per_positive_slice": stats(sizes),
        "tumour_pixels_per_patient": stats(burden),
    }
