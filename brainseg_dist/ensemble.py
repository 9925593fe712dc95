"""The K folds of a cross-validation as one exported model.

:class:`FoldEnsemble` averages the folds' tumour probabilities (optionally with horizontal
flip TTA) and hands them to :class:`~brainseg_dist.pipeline.SegmentationPipeline` as logits, so
the pipeline's resizing, normalization and sigmoid stay the single implementation.
:class:`EnsemblePipeline` adds ``segment``: the post-processing chosen on the out-of-fold
predictions (threshold, 3D components, 2D hole filling) inside the module, so a ``model.ts``
loaded with ``torch.jit.load`` alone returns the final masks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainseg_dist import checkpoint, rundir
from brainseg_dist.errors import BrainsegError
from brainseg_dist.pipeline import (
    SegmentationPipeline,
    build_unet,
    metadata,
    quiet_jit_deprecation,
)
from brainseg_dist.postprocess import PostProcessing, apply_masks

# Probabilities are clamped to [EPS, 1 - EPS] before the logit, so the pipeline's sigmoid
# gives them back to well under the export tolerance.
EPS = 1e-6


class FoldEnsemble(nn.Module):
    """Mean probability of several U-Nets (and of their flipped inputs), as a logit.

    Args:
        unets: the folds' U-Nets in eval mode (eager or traced).
        tta: also average each U-Net's prediction of the horizontally flipped input.
    """

    def __init__(self, unets: list[nn.Module], tta: bool):
        super().__init__()
        self.unets = nn.ModuleList(unets)
        self.tta = bool(tta)
        self.views = len(unets) * (2 if tta else 1)
        self.eps = EPS  # an attribute: TorchScript cannot read a module-level float

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(z[:, :1])
        for unet in self.unets:
            total = total + torch.sigmoid(unet(z).float())
            if self.tta:
                total = total + torch.sigmoid(unet(z.flip(-1)).float()).flip(-1)
        return torch.logit(total / self.views, eps=self.eps)


class EnsemblePipeline(SegmentationPipeline):
    """:class:`SegmentationPipeline` over a :class:`FoldEnsemble`, with post-processing.

    ``forward`` returns the ensemble's probabilities; ``segment`` treats the batch as one
    patient's stack of slices (in order) and returns its post-processed ``N×1×H×W`` uint8
    masks.
    """

    def __init__(self, ensemble: FoldEnsemble, image_size: int, normalization: str,
                 setting: PostProcessing, config_hash: str):
        super().__init__(ensemble, image_size, normalization, setting.threshold, config_hash)
        self.largest = setting.components == "largest"
        self.min_voxels = int(setting.min_voxels if setting.components == "min_size" else 0)
        self.fill_holes = bool(setting.fill_holes)

    @torch.jit.export
    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """``N×3×H×W`` slices of one patient -> post-processed ``N×1×H×W`` uint8 masks."""
        probs = self.forward(x)[:, 0]
        masks = apply_masks(probs, self.threshold, self.largest, self.min_voxels,
                            self.fill_holes)
        return masks.to(torch.uint8).unsqueeze(1)


def read_setting(path: Path) -> PostProcessing:
    """A saved post-processing setting.

    Raises:
        BrainsegError: missing or damaged file.
    """
    try:
        return PostProcessing.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise BrainsegError(f"{path}: not found; run `brainseg cv` to the end first") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise BrainsegError(f"{path}: damaged post-processing setting ({exc})") from None


def build_ensemble(cv_dir: str | Path, trace: bool = False
                   ) -> tuple[EnsemblePipeline, dict[str, Any]]:
    """The eager (or traced-U-Net) ensemble of a finished cross-validation directory.

    Returns:
        ``(pipeline, metadata)``.

    Raises:
        BrainsegError: unfinished folds, or folds trained with different settings.
    """
    cv_dir = Path(cv_dir)
    plan = rundir.read_plan(cv_dir)
    setting = read_setting(cv_dir / rundir.ENSEMBLE_POSTPROCESSING)
    ckpts = [checkpoint.load(rundir.fold_dir(cv_dir, s["fold"]) / rundir.BEST)
             for s in plan["splits"]]
    first = ckpts[0]
    for c in ckpts[1:]:
        if (c.image_size, c.normalization, c.model_args) != (
                first.image_size, first.normalization, first.model_args):
            raise BrainsegError(f"{c.path}: trained with other settings than {first.path}")
    pipeline = EnsemblePipeline(FoldEnsemble([build_unet(c) for c in ckpts], setting.tta),
                                first.image_size, first.normalization, setting,
                                plan["config_hash"]).eval()
    meta = metadata(first, ensemble={
        "folds": plan["folds"], "checkpoints": [str(c.path) for c in ckpts],
        "checkpoint_epochs": [c.epoch for c in ckpts],
        "postprocessing": {**setting.to_dict(), "description": setting.describe()},
        "segment": "model.segment(x): x one patient's N×3×H×W slices in order; returns "
                   "post-processed N×1×H×W uint8 masks",
    })
    meta["threshold"] = setting.threshold
    return (traced_ensemble(pipeline, setting) if trace else pipeline), meta


def traced_ensemble(pipeline: EnsemblePipeline, setting: PostProcessing) -> EnsemblePipeline:
    """The same ensemble with every U-Net traced at the training size, ready for
    ``torch.jit.script`` (the U-Net's forward zips module lists, which the TorchScript
    compiler does not accept)."""
    example = torch.zeros(1, 3, pipeline.image_size, pipeline.image_size)
    with quiet_jit_deprecation(), torch.no_grad():
        unets = [torch.jit.trace(u, example) for u in pipeline.unet.unets]
    return EnsemblePipeline(FoldEnsemble(unets, setting.tta), pipeline.image_size,
                            pipeline.normalization, setting, pipeline.config_hash).eval()
