"""``model.onnx``: the end-to-end pipeline of ``model.ts`` as an ONNX graph, and its runtime.

Written by ``brainseg export`` beside ``model.ts`` through ``torch.onnx.export(...,
dynamo=True)``: ``image`` (``N×3×H×W`` uint8, dynamic N, H and W) in, ``probabilities``
(``N×1×H×W`` float32) out; the same resize, normalization, U-Net, sigmoid and resize back as
:class:`~brainseg_dist.export.SegmentationPipeline`. onnx, onnxscript and onnxruntime are the
optional extra ``brainseg-dist[onnx]``; without them the export says so in one line and
writes the other files.

What the dynamo exporter could not express, and what is done instead:

* **area resize at a symbolic H×W.** ``F.interpolate(mode="area")`` is an adaptive average
  pool; its decomposition for ONNX assumes a fixed ratio and fails on dynamic sizes ("cond's
  output stride is not a simple accumulative multiplication of sizes"). The ONNX graph does
  the same arithmetic as two matrix products: 0/1 window matrices built in-graph from H and W
  (``torch.arange``), whose sums of whole grey levels are exact in float32, divided by the
  window height and then its width, in the pool's order. The result is bit-identical on
  uint8 input (tested).
* **volume normalization** needs one patient's statistics, a second input the graph does not
  take: such models get no ``model.onnx`` (``model.ts``/``model.pt2`` cover them), and fold
  ensembles neither (their ``segment`` post-processing is TorchScript).

The metadata (model card included) is stored in the graph's ``metadata_props`` under
``metadata.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainseg_dist.console import console, warn
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write, dumps_strict
from brainseg_dist.pipeline import METADATA_FILE, SegmentationPipeline

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
OPSET = 18  # Resize with antialias needs 18


def missing_packages() -> list[str]:
    """The packages of the ``[onnx]`` extra that are not installed here."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


@contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """Silence only the exporter's known noise: torch's logger lines about torchvision ops
    it skips (torchvision is not a dependency) and pytree's ``LeafSpec`` FutureWarning."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_program(eager: SegmentationPipeline, example: torch.Tensor) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the pipeline: uint8 in, dynamic batch and H×W."""
    from torch.export import Dim

    dynamic = ({0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=8192),
                3: Dim("width", min=8, max=8192)},)
    with quiet_onnx_exporter(), torch.no_grad():
        return torch.onnx.export(eager.eval(), (example,), dynamo=True,
                                 dynamic_shapes=dynamic, input_names=[INPUT_NAME],
                                 output_names=[OUTPUT_NAME], opset_version=OPSET,
                                 verbose=False)


def session(path: str | Path | bytes) -> Any:
    """An onnxruntime CPU session for a file (or its bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A ``model.onnx`` run by onnxruntime, with the interface ``brainseg predict`` uses
    (``module(x)``, ``threshold``, ``normalization``, ``image_size``)."""

    def __init__(self, sess: Any, meta: dict[str, Any]):
        self.session = sess
        self.threshold = float(meta.get("threshold", 0.5))
        self.normalization = str(meta.get("normalization", "slice"))
        self.image_size = int(meta.get("image_size", 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:  # the graph takes whole grey levels
            x = x.float().round().clamp(0, 255).to(torch.uint8)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self) -> OnnxModel:
        return self

    def to(self, device: Any) -> OnnxModel:  # noqa: ARG002 - CPU only
        return self


def read_metadata(model: Any, path: Path) -> dict[str, Any]:
    """The ``metadata.json`` entry of an ONNX model's ``metadata_props`` (``{}`` if none)."""
    props = {p.key: p.value for p in model.metadata_props}
    try:
        return json.loads(props[METADATA_FILE]) if METADATA_FILE in props else {}
    except json.JSONDecodeError as exc:
        raise BrainsegError(f"{path}: damaged {METADATA_FILE} in the model ({exc})") from None


def load_onnx(path: str | Path, device: str = "cpu") -> tuple[OnnxModel, dict[str, Any]]:
    """Load ``model.onnx`` for onnxruntime on the CPU, with its metadata.

    Raises:
        BrainsegError: onnxruntime missing, a CUDA device asked for, or an unreadable file.
    """
    path = Path(path)
    if missing := missing_packages():
        raise BrainsegError(f"{path}: running an ONNX model needs {', '.join(missing)}: "
                            "pip install 'brainseg-dist[onnx]'")
    if torch.device(device).type != "cpu":
        raise BrainsegError(f"{path}: ONNX models run on the CPU here (onnxruntime's CPU "
                            "provider); use --device cpu or model.ts")
    import onnx

    try:
        proto = onnx.load(str(path))
        sess = session(path)
    except Exception as exc:  # onnx/onnxruntime raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrainsegError(f"{path}: not a loadable ONNX model ({first[:200]})") from None
    meta = read_metadata(proto, path)
    names = [i.name for i in sess.get_inputs()]
    if names != [INPUT_NAME] or "threshold" not in meta:
        raise BrainsegError(f"{path}: an ONNX model, but not a brainseg segmentation model "
                            f"(inputs {names}); export one with `brainseg export RUN_DIR`")
    return OnnxModel(sess, meta), meta


@dataclass
class OnnxParity:
    """How ``model.onnx`` compares with the eager pipeline."""

    path: Path
    max_abs_diff: float
    mask_pixels_differing: int
    inputs: str


def compare(sess: Any, reference: list[torch.Tensor], batches: list[torch.Tensor],
            threshold: float) -> tuple[float, int]:
    """Largest |Δp| and differing mask pixels of an ONNX session against reference outputs."""
    model = OnnxModel(sess, {"threshold": threshold})
    worst, differing = 0.0, 0
    for ref, x in zip(reference, batches, strict=True):
        out = model(x)
        worst = max(worst, float((ref - out).abs().max()))
        differing += int(((ref > threshold) != (out > threshold)).sum())
    return worst, differing


def unsupported(eager: nn.Module) -> str | None:
    """Why ``eager`` cannot be written as ONNX here (packages or model kind), or None."""
    if missing := missing_packages():
        return (f"ONNX export needs {', '.join(missing)} (pip install 'brainseg-dist[onnx]'); "
                "model.ts and model.pt2 are unaffected")
    if not isinstance(eager, SegmentationPipeline) or eager.normalization != "slice":
        what = ("a fold ensemble (its post-processing is TorchScript)"
                if not isinstance(eager, SegmentationPipeline)
                else "volume normalization (needs per-patient statistics as a second input)")
        return (f"ONNX export covers single models with slice normalization, not {what}; "
                "use model.ts")
    return None


def _with_metadata(proto: Any, meta: dict[str, Any]) -> bytes:
    """The serialized model with ``meta`` (plus the graph's I/O) as ``metadata.json``."""
    full = {**meta, "onnx": {"opset": OPSET, "input": f"{INPUT_NAME}: N×3×H×W uint8",
                             "output": f"{OUTPUT_NAME}: N×1×H×W float32"}}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_FILE, dumps_strict(full)
    return proto.SerializeToString()


def write_onnx(eager: nn.Module, images: torch.Tensor, batches: list[torch.Tensor],
               reference: list[torch.Tensor], path: Path, meta: dict[str, Any],
               tolerance: float, verbose: bool = True) -> OnnxParity | None:
    """Export, write ``path`` atomically, load it back with onnxruntime and check parity.

    Best effort like ``model.pt2``: missing packages, an unsupported model or an export
    failure are one warning line, and None is returned; ``model.ts`` is unaffected.

    Args:
        eager: the eager pipeline (the reference).
        images: the uint8 parity slices (the export example).
        batches: the parity batches (uint8 ones are compared; the graph takes uint8).
        reference: the eager outputs for ``batches``.
        path: destination, e.g. ``RUN_DIR/model.onnx``.
        meta: metadata to embed (``metadata_props["metadata.json"]``).
        tolerance: largest allowed |Δp|.
        verbose: print the parity line.
    """
    if (why := unsupported(eager)) is not None:
        warn(f"{path}: not written: {why}")
        return None
    keep = [i for i, b in enumerate(batches) if b.dtype == torch.uint8]
    threshold = float(eager.threshold)
    try:
        program = export_program(eager, images)
    except Exception as exc:  # the exporter raises many error types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        warn(f"{path}: not written (torch.onnx.export failed: {type(exc).__name__}: "
             f"{first}); model.ts is unaffected")
        return None
    import onnx

    state: dict[str, Any] = {}

    def write_checked(tmp: Path) -> None:
        data = _with_metadata(program.model_proto, meta)
        tmp.write_bytes(data)
        onnx.checker.check_model(onnx.load_from_string(data))
        sess = session(data)
        state["diff"], state["differing"] = compare(sess, [reference[i] for i in keep],
                                                    [batches[i] for i in keep], threshold)
        if not state["diff"] <= tolerance:  # also catches NaN
            raise BrainsegError(f"{path}: onnxruntime output differs from the eager model by "
                                f"{state['diff']:.3g} (tolerance {tolerance:g}); not written")

    try:
        atomic_write(path, write_checked)
    except BrainsegError as exc:
        warn(f"{exc}; model.ts is unaffected")
        return None
    parity = OnnxParity(path, state["diff"], state["differing"],
                        f"{len(keep)} uint8 batches (native size and odd-size crop)")
    if verbose:
        console.print(f"wrote {path}: ONNX (dynamo exporter, opset {OPSET}), dynamic batch and "
                      f"H×W, uint8 input; onnxruntime vs eager max |Δp| {parity.max_abs_diff:.2e}"
                      f", {parity.mask_pixels_differing} mask pixels differ")
    return parity

