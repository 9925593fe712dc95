"""Model-card metadata in the conventions of MONAI bundles (``configs/metadata.json``).

``brainseg export`` merges these keys into the metadata it embeds in ``model.ts``
(``metadata.json`` extra file), ``model.pt2`` (extra file) and ``model.onnx``
(``metadata_props``), and writes the whole as ``metadata.json`` beside the exports. MONAI's
keys: ``version``, ``changelog``, ``pytorch_version``, ``numpy_version``,
``optional_packages_version``, ``name``, ``task``, ``description``, ``authors``,
``data_source``, ``data_type``, ``intended_use``, ``references``, ``network_data_format``
(inputs and outputs: type, format, modality, channels, value range, spatial shape, dtype),
and metrics with the protocol that produced them.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg_dist import __version__

SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
          "0.8.1/meta_schema_20220324.json")
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "nibabel", "kornia", "accelerate")


def _versions() -> dict[str, str]:
    out = {}
    for name in OPTIONAL:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _training_data(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    data = cfg.get("data") or {}
    split_path = run_dir / "split.json"
    counts = {}
    if split_path.is_file():
        try:
            split = json.loads(split_path.read_text())
            counts = {k: len(v) for k, v in split.items() if isinstance(v, list)}
        except (OSError, json.JSONDecodeError):
            counts = {}
    root = data.get("data_dir")
    return {"data_dir": root or "synthetic (brainseg synth, generated in the run directory)",
            "synthetic": root is None, "patients_per_split": counts,
            "split": "by patient, stratified by tumour burden (split.json)"}


def _metrics(run_dir: Path, ckpt: Any) -> dict[str, Any]:
    """Held-out test figures when ``brainseg evaluate`` wrote them, else the validation
    figure of the exported epoch, each with its protocol."""
    out: dict[str, Any] = {}
    summary = run_dir / "eval_test" / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            out["test"] = {"per_patient_dice": s["headline_metrics"], "variant": s["headline"],
                           "patients": s["patients"], "slices": s["slices"],
                           "protocol": "brainseg evaluate on the held-out test patients of "
                                       "split.json; " + s["conventions"]["dice"]}
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and ckpt.epoch is not None:
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("epoch") == ckpt.epoch:
                out["validation"] = {
                    "val_dice_patient_mean": row.get("val_dice_patient_mean"),
                    "val_dice_patient_median": row.get("val_dice_patient_median"),
                    "epoch": ckpt.epoch,
                    "protocol": "validation patients of split.json at the training size, "
                                "per-patient 3D Dice, the exported epoch"}
    return out


def model_card(ckpt: Any, run_dir: Path) -> dict[str, Any]:
    """The MONAI-style keys for a checkpoint of a run."""
    cfg = ckpt.state.get("config") or {}
    spatial = ["H", "W"]
    return {
        "schema": SCHEMA,
        "version": __version__,
        "changelog": {__version__: "exported by brainseg-dist"},
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": _versions(),
        "name": "brainseg-dist LGG FLAIR abnormality segmentation (2D U-Net)",
        "task": "Segmentation of FLAIR abnormalities (lower-grade gliomas) in brain MRI",
        "description": "End-to-end 2D pipeline: raw axial slices in (any H×W), resize to the "
                       f"training size {ckpt.image_size}, {ckpt.normalization} z-score, "
                       "U-Net, sigmoid, resize back; tumour probabilities out.",
        "authors": "brainseg-dist contributors",
        "copyright": "MIT (code); the training data's own licence applies to the weights",
        "data_source": "kaggle_3m layout (Buda et al. 2019, TCGA-LGG via TCIA) or synthetic",
        "data_type": "tif slices (uint8, 3 sequences) or NIfTI volumes via brainseg predict",
        "intended_use": "Research only; not a medical device.",
        "references": ["Buda, Saha, Mazurowski. Computers in Biology and Medicine, 2019."],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR",
                "num_channels": 3, "spatial_shape": spatial, "dtype": "uint8",
                "value_range": [0, 255], "is_patch_data": False,
                "channel_def": {"0": "T1 pre-contrast", "1": "FLAIR",
                                "2": "T1 post-contrast"},
                "layout": "N×3×H×W axial slices; rows anterior→posterior, columns "
                          "right→left (radiological), as the kaggle_3m tifs"}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "segmentation", "num_channels": 1,
                "spatial_shape": spatial, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {"0": "tumour (FLAIR abnormality)"},
                "threshold": ckpt.threshold}},
        },
        "training_data": _training_data(run_dir, cfg),
        "metrics": _metrics(run_dir, ckpt),
    }
