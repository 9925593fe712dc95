"""``report.html``: one self-contained page of an evaluation or a cross-validation.

Rendered with jinja2 from ``templates/report.html.j2``: the protocol, the summary table, a
per-patient table sortable by any column (a few lines of inline JavaScript), Dice per
patient, training curves, best/median/worst overlays and, per patient, a strip of slices
with the ground truth and the prediction outlined (what the dataset's author shows as GIFs).
Every figure is a base64 ``data:`` PNG, so the page needs no network and no other file.
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainseg_dist.io import atomic_write_text
from brainseg_dist.tables import CV_ROWS, EVAL_ROWS, ci_cell, fmt

TRUTH_RGB = (0.13, 0.82, 0.13)
PRED_RGB = (1.0, 0.19, 0.13)
STRIP_SLICES = 4


def data_uri(png: bytes | Path) -> str:
    """A PNG (bytes or file) as a ``data:image/png;base64,...`` URI."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, np.clip(rgb, 0, 1), format="png")
    return buf.getvalue()


def strip_png(images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
              gap: int = 4) -> bytes:
    """Slices side by side: FLAIR in grey, truth (green) and prediction (red) outlined.

    Args:
        images: ``H×W×3`` uint8 slices (channel 1 is FLAIR).
        truths: ``H×W`` 0/1 ground-truth masks.
        preds: ``H×W`` 0/1 predicted masks.
    """
    import torch

    from brainseg_dist.metrics import boundary

    tiles = []
    for image, truth, pred in zip(images, truths, preds, strict=True):
        grey = image[..., 1].astype(np.float32) / 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for mask, colour in ((truth, TRUTH_RGB), (pred, PRED_RGB)):
            edge = boundary(torch.from_numpy(np.asarray(mask).astype(bool))).numpy()
            rgb[edge] = colour
        tiles.append(rgb)
        tiles.append(np.ones((rgb.shape[0], gap, 3), np.float32))
    return _png(np.concatenate(tiles[:-1], axis=1))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(frame: pd.DataFrame) -> tuple[list[str], list[list[dict[str, str]]]]:
    """Columns and rows of a data frame; each cell keeps a sort value and a display text."""
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for v in record:
            is_num = isinstance(v, int | float | np.integer | np.floating) and not isinstance(
                v, bool)
            number = float(v) if is_num else None
            finite = number is not None and math.isfinite(number)
            cells.append({"value": repr(number) if finite else ("" if is_num else str(v)),
                          "text": _fmt(number if isinstance(v, float | np.floating) else v)
                          if finite or not is_num else "–"})
        rows.append(cells)
    return list(frame.columns), rows


def render(path: Path, **context: Any) -> Path:
    """Render the template into ``path`` (atomically)."""
    import jinja2

    from brainseg_dist import __version__

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.get_template("report.html.j2").render(
        version=__version__, created=time.strftime("%Y-%m-%d %H:%M"), **context)
    return atomic_write_text(path, html)


def _curves(metrics: Path) -> bytes | None:
    """Training curves of one ``metrics.jsonl`` as PNG bytes (None if absent or unusable)."""
    from brainseg_dist import viz
    from brainseg_dist.errors import BrainsegError

    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return viz.training_curves(metrics, Path(tmp) / "curves.png").read_bytes()
        except BrainsegError:
            return None


def _figure(fid: str, title: str, png: bytes | Path | None, note: str = ""
            ) -> list[dict[str, str]]:
    if png is None or (isinstance(png, Path) and not png.is_file()):
        return []
    return [{"id": fid, "title": title, "src": data_uri(png), "note": note}]


# ----------------------------------------------------------------------------- evaluate
def evaluation_report(out: Path, summary: dict[str, Any], per_patient: pd.DataFrame,
                      results: list[Any]) -> Path:
    """``out/report.html`` of ``brainseg evaluate`` (its figures must be in ``out``)."""
    variants = list(summary["variants"])
    rows = []
    for name, get in EVAL_ROWS:
        rows.append({"name": name, "cells": [get(summary["variants"][v]) for v in variants]})
    protocol = {
        "run": summary["run_dir"], "checkpoint": f"{summary['checkpoint']} "
        f"(epoch {summary['checkpoint_epoch']})", "data": summary["data_dir"],
        "patients": f"{summary['patients']} ({summary['split']} split), "
                    f"{summary['slices']} slices",
        "resolution": summary["resolution"],
        "model input": f"{summary['image_size']}×{summary['image_size']}, "
                       f"{summary['normalization']} normalization, threshold "
                       f"{summary['threshold']:g}",
        "headline": summary["headline"],
        **{f"convention: {k}": v for k, v in summary["conventions"].items()},
    }
    dice = dict(zip(per_patient["patient"], per_patient["dice"], strict=True))
    strips = [{"patient": r.folder, "dice": _fmt(dice.get(r.patient)),
               "src": data_uri(strip_png(r.overlay["images"], r.overlay["masks"],
                                         r.overlay["preds"]))} for r in results]
    figures = (_figure("dice", "Dice per patient", out / "dice_per_patient.png")
               + _figure("curves", "Training curves", out / "training_curves.png",
                         "From metrics.jsonl of the run.")
               + [f for label in ("best", "median", "worst")
                  for f in _figure(f"overlay-{label}", f"{label.capitalize()} patient",
                                   out / f"overlays_{label}.png",
                                   "Truth solid green, prediction dashed red, on FLAIR.")])
    columns, table = _table(per_patient.drop(columns=["folder"], errors="ignore"))
    return render(out / "report.html", title=f"brainseg evaluation: {summary['split']} split "
                  f"of {Path(summary['run_dir']).name}", protocol=protocol,
                  variants=variants, headline=summary["headline"], summary_rows=rows,
                  patient_columns=columns, patient_rows=table, figures=figures,
                  strips=strips, strip_variant=summary["headline"])


# ----------------------------------------------------------------------------- cv
def strip_data(rows: pd.DataFrame, pred: Any, truth: Any, k: int = STRIP_SLICES
               ) -> dict[str, Any]:
    """The ``k`` slices with the most tumour (truth plus prediction) of one patient, read
    back for the report: images, truth and prediction."""
    from brainseg_dist.data.decode import read_image

    pred, truth = np.asarray(pred).astype(np.uint8), np.asarray(truth).astype(np.uint8)
    area = truth.reshape(len(truth), -1).sum(1) + pred.reshape(len(pred), -1).sum(1)
    pick = sorted(int(i) for i in np.argsort(-area, kind="stable")[:k] if area[i] > 0) \
        or [len(truth) // 2]
    return {"images": [read_image(rows["image_path"].iloc[i]) for i in pick],
            "masks": [truth[i] for i in pick], "preds": [pred[i] for i in pick]}


def cv_report(out: Path, summary: dict[str, Any], per_patient: pd.DataFrame,
              strips: dict[str, dict[str, Any]], fold_dirs: list[Path]) -> Path:
    """``out/report.html`` of ``brainseg cv``."""
    variants = list(summary["variants"])
    rows = [{"name": "95% CI of the mean",
             "cells": [ci_cell(summary["variants"][v]) for v in variants]}]
    rows += [{"name": name, "cells": [fmt(summary["variants"][v][key]) for v in variants]}
             for name, key in CV_ROWS]
    protocol = {"cross-validation": summary["protocol"], "folds": summary["folds"],
                "patients": summary["patients"], "data": summary["data_dir"],
                "seed": summary["seed"], "inner validation fraction": summary["val_fraction"],
                **{f"fold {d['fold']} post-processing": d["postprocessing"]
                   for d in summary["folds_detail"]}}
    figures = _figure("dice", "Dice per patient", out / "dice_per_patient.png")
    for k, fold in enumerate(fold_dirs):
        figures += _figure(f"curves-{k}", f"Training curves, fold {k}",
                           _curves(fold / "metrics.jsonl"))
    order = per_patient.sort_values("dice_post-processed", kind="stable")["patient"].tolist()
    picks = {"worst": order[0], "median": order[(len(order) - 1) // 2], "best": order[-1]}
    dice = dict(zip(per_patient["patient"], per_patient["dice_post-processed"], strict=True))
    strip_list = [{"patient": f"{p} ({label})" if p in picks.values() and label else p,
                   "dice": _fmt(dice[p]),
                   "src": data_uri(strip_png(s["images"], s["masks"], s["preds"]))}
                  for p, s in strips.items()
                  for label in [next((lb for lb, q in picks.items() if q == p), "")]]
    columns, table = _table(per_patient)
    return render(out / "report.html", title=f"brainseg {summary['folds']}-fold "
                  f"cross-validation of {out.name}", protocol=protocol, variants=variants,
                  headline=summary["headline"], summary_rows=rows, patient_columns=columns,
                  patient_rows=table, figures=figures, strips=strip_list,
                  strip_variant="post-processed")
