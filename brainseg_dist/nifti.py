"""NIfTI in and out for ``brainseg predict``: volumes to model slices, masks back to volumes.

**Inputs.** One FLAIR volume (``*.nii`` / ``*.nii.gz``; FLAIR fills the missing pre- and
post-contrast channels, as the dataset did for patients missing a sequence), three
co-registered volumes given as ``--pre``/``--flair``/``--post``, nnU-Net-style channel files
(``CASE_0000`` pre-contrast, ``CASE_0001`` FLAIR, ``CASE_0002`` post-contrast; the FLAIR one
is required), or a folder of such files (one case per name).

**Axes.** A ``kaggle_3m`` slice ``<folder>_<n>.tif`` is a ``256×256×3`` array whose row index
runs from the front of the head to the back (anterior at the top: the eyes are in row 0's
half), whose column index runs from the patient's right to left (radiological display, as
the DICOM rows were stored), and ``n`` counts axial slices from the feet towards the head
(low ``n`` show the orbits and cerebellum). In nibabel's terms the training layout of the
array ``[row, column, slice]`` is ``("P", "L", "S")``. Each input is reoriented to that
layout with its affine (:func:`nibabel.orientations.io_orientation`), sliced along the third
axis, and the mask is put back into the input's own layout, so ``CASE_seg.nii.gz`` has the
input's shape, affine and header. Non-square slices are zero-padded to a square (the
dataset's center crop would cut tissue away) and the prediction cropped back.

**Intensities**, per sequence and per volume, as the dataset was made (Buda et al.,
``flair-segmentation/preprocessing3D.m`` in github.com/MaciejMazurowski/brain-segmentation,
the MATLAB preprocessing that wrote the kaggle_3m tifs; the paper states that each sequence
was rescaled per volume): negative values are set to 0; ``minimum`` is the 2nd percentile of
the non-zero voxels; ``peak`` is the mode of a histogram of bin width 2 above ``minimum``;
``maximum = minimum + 2.55 (peak - minimum)``; the volume is clipped to
``[minimum, maximum]`` and mapped linearly to 0..255 (so the peak lands on grey level 100).
Their resize of each slice to 256 pixels and center crop are left to the model, which resizes
any H×W. Differences: the peak is searched above the mean non-zero value rather than above
``minimum`` (in volumes that are not skull-stripped, the background-noise mode just above
``minimum`` outnumbers the tissue peak and would saturate everything); numpy's linear
percentile instead of MATLAB's ``prctile``; and for volumes whose largest value is below 1024
(already rescaled data, e.g. 0..1 floats or 0..255) the histogram bin is ``max / 512`` wide
instead of 2, so the peak is still resolved.

Measured on the kaggle_3m tifs themselves (20 patients), the FLAIR tissue peak sits at grey
levels 40-88, not 100, so the released tifs were not made by exactly this script; what
matters for the model is that the mapping is linear up to clipping, because training
z-scores every slice (``slice`` normalization) and so removes any per-volume linear scale.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_dist.errors import BrainsegError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNELS = ("pre", "flair", "post")  # the model's channel order
TRAINING_AXES = ("P", "L", "S")  # array [row, column, slice] of the kaggle_3m slices
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
AFFINE_ATOL = 1e-3  # mm: affines closer than this are the same grid


def is_nifti(path: str | Path) -> bool:
    """A path whose name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def stem(path: Path) -> str:
    """The name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class NiftiCase:
    """One case: an output name and a file per model channel (None: filled with FLAIR)."""

    name: str
    files: dict[str, Path | None]


def _channel_of(path: Path) -> tuple[str, int | None]:
    m = _CHANNEL_RE.match(stem(path))
    return (m["case"], int(m["channel"])) if m else (stem(path), None)


def _cases_of(files: list[Path]) -> list[NiftiCase]:
    """Group files into cases: ``CASE_000k`` by channel, any other name as a FLAIR volume."""
    groups: dict[str, dict[int | None, Path]] = {}
    for f in sorted(files):
        case, channel = _channel_of(f)
        if channel is not None and channel > 2:
            raise BrainsegError(f"{f}: channel {channel:04d} is not one of 0000 (pre-contrast), "
                                "0001 (FLAIR), 0002 (post-contrast)")
        group = groups.setdefault(case, {})
        if channel in group:
            raise BrainsegError(f"{f}: same case and channel as {group[channel]}")
        group[channel] = f
    cases = []
    for case, group in groups.items():
        if None in group and len(group) > 1:
            raise BrainsegError(f"{group[None]}: a FLAIR volume named like the channel files "
                                f"of case {case} ({', '.join(str(p) for p in group.values())})")
        if None in group:
            cases.append(NiftiCase(case, {"pre": None, "flair": group[None], "post": None}))
            continue
        if 1 not in group:
            raise BrainsegError(f"{next(iter(group.values()))}: case {case} has no FLAIR volume "
                                f"({case}_0001.nii.gz); FLAIR is required")
        cases.append(NiftiCase(case, {c: group.get(i) for i, c in enumerate(CHANNELS)}))
    return cases


def find_cases(input_path: Path | None, pre: Path | None = None, flair: Path | None = None,
               post: Path | None = None) -> list[NiftiCase] | None:
    """The NIfTI cases INPUT (or ``--pre/--flair/--post``) names; None for a tif input.

    Raises:
        BrainsegError: a missing file, INPUT together with ``--flair``, ``--pre``/``--post``
            without a FLAIR volume, or badly named channel files.
    """
    explicit = {"pre": pre, "flair": flair, "post": post}
    for option, path in explicit.items():
        if path is not None and not Path(path).is_file():
            raise BrainsegError(f"{path}: --{option} file not found")
    if flair is not None:
        if input_path is not None:
            raise BrainsegError(f"{input_path}: give INPUT or --flair, not both")
        return [NiftiCase(_channel_of(Path(flair))[0], {k: Path(v) if v else None
                                                        for k, v in explicit.items()})]
    if input_path is None:
        raise BrainsegError("INPUT is missing (a .tif, a folder, or a NIfTI volume; or --flair)")
    if pre is not None or post is not None:
        if input_path is not None and is_nifti(input_path):
            return [NiftiCase(_channel_of(input_path)[0],
                              {"pre": pre, "flair": input_path, "post": post})]
        raise BrainsegError("--pre/--post need a FLAIR volume: --flair FILE or a .nii.gz INPUT")
    if input_path.is_file() and is_nifti(input_path):
        case, channel = _channel_of(input_path)
        if channel is None:
            return _cases_of([input_path])
        siblings = [p for p in input_path.parent.iterdir()
                    if is_nifti(p) and _channel_of(p)[0] == case]
        return _cases_of(siblings)
    if input_path.is_dir():
        has_tifs = any(p.suffix.lower() in (".tif", ".tiff") for p in input_path.iterdir())
        volumes = [p for p in input_path.iterdir() if p.is_file() and is_nifti(p)
                   and not stem(p).endswith("_seg")]
        if volumes and not has_tifs:
            return _cases_of(volumes)
    return None


# ----------------------------------------------------------------------------- reading
def load_volume(path: Path) -> Any:
    """Open a 3D NIfTI image (a 4D one with a single volume is taken as 3D).

    Raises:
        BrainsegError: naming the file: not NIfTI, unreadable, not 3D, or non-finite values.
    """
    import nibabel as nib

    if not is_nifti(path):
        raise BrainsegError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrainsegError(f"{path}: not a readable NIfTI file ({first[:200]})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise BrainsegError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise BrainsegError(f"{path}: {len(shape)}D image of shape {tuple(shape)}; expected "
                            "one 3D volume per sequence (split a 4D series first)")
    return img


def volume_data(img: Any, path: Path) -> np.ndarray:
    """The voxels of :func:`load_volume`'s image as float32 (scaling applied).

    Raises:
        BrainsegError: the voxel data is unreadable or not finite; the file is named.
    """
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except Exception as exc:  # truncated files fail only here
        raise BrainsegError(f"{path}: unreadable voxel data ({exc})") from None
    if not np.isfinite(data).all():
        raise BrainsegError(f"{path}: holds NaN or infinite values")
    return data.reshape(img.shape[:3])


def percentile_scale(volume: np.ndarray) -> np.ndarray:
    """One sequence's volume to uint8 0..255, as the kaggle_3m tifs were made (module doc)."""
    v = np.clip(volume.astype(np.float64), 0, None)
    nonzero = v[v != 0]
    if nonzero.size == 0:
        return np.zeros(v.shape, np.uint8)
    minimum = float(np.percentile(nonzero, 2))
    # The tissue peak, not the background-noise mode: search above the mean non-zero value.
    floor = max(minimum, float(nonzero.mean()))
    top = float(v.max())
    width = 2.0 if top >= 1024 else top / 512
    edges = np.arange(np.floor(v.min() / width) * width, top + width, width)
    counts, edges = np.histogram(v, bins=edges)
    start = int(np.searchsorted(edges, floor, side="left"))
    start = min(start, len(counts) - 1)
    peak = float(edges[start + int(np.argmax(counts[start:]))])
    maximum = minimum + (peak - minimum) * 2.55
    if maximum <= minimum:  # a flat volume: fall back to its range
        maximum = max(top, minimum + 1e-6)
    scaled = (np.clip(v, minimum, maximum) - minimum) / (maximum - minimum)
    return np.round(scaled * 255).astype(np.uint8)


@dataclass
class CaseVolume:
    """A case read and mapped to model input: slices, and how to put a mask back."""

    case: NiftiCase
    reference: Any  # the FLAIR image: affine, header, shape of the output
    images: np.ndarray  # N×3×H×W uint8, training layout
    to_input: np.ndarray  # nibabel orientation transform from training layout to input's
    to_training: np.ndarray  # and back

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.reference.header.get_zooms()[:3]))


def read_case(case: NiftiCase) -> CaseVolume:
    """Load, check, reorient and intensity-map a case's volumes.

    Raises:
        BrainsegError: naming the file: unreadable, not 3D, or a shape or affine that differs
            from the FLAIR volume's.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    check_case(case)
    flair_path = case.files["flair"]
    assert flair_path is not None
    reference = load_volume(flair_path)
    ornt = io_orientation(reference.affine)
    target = axcodes2ornt(TRAINING_AXES)
    to_training, to_input = ornt_transform(ornt, target), ornt_transform(target, ornt)
    channels: dict[str, np.ndarray] = {}
    for name in CHANNELS:
        path = case.files[name]
        if path is None:
            continue
        img = reference if name == "flair" else load_volume(path)
        channels[name] = percentile_scale(_reorient(volume_data(img, path), to_training))
    stack = np.stack([channels.get(c, channels["flair"]) for c in CHANNELS])  # 3×H×W×N
    images = np.ascontiguousarray(stack.transpose(3, 0, 1, 2))  # N×3×H×W
    return CaseVolume(case, reference, images, to_input, to_training)


def _reorient(data: np.ndarray, transform: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(data, transform))


def mask_to_input(volume: CaseVolume, masks: np.ndarray) -> np.ndarray:
    """``N×H×W`` masks in training layout -> the input's own array layout (uint8 0/1)."""
    training = np.ascontiguousarray(masks.transpose(1, 2, 0)).astype(np.uint8)
    return _reorient(training, volume.to_input)


def pad_square(images: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad ``N×C×H×W`` slices to square (centered); returns the crop that undoes it."""
    h, w = images.shape[2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h == w:
        return images, (slice(0, h), slice(0, w))
    out = np.zeros((*images.shape[:2], side, side), images.dtype)
    out[:, :, top:top + h, left:left + w] = images
    return out, (slice(top, top + h), slice(left, left + w))


# ----------------------------------------------------------------------------- writing
def segmentation_bytes(volume: CaseVolume, mask: np.ndarray) -> bytes:
    """``CASE_seg.nii.gz`` content: uint8 0/1 with the FLAIR input's affine and header."""
    ref = volume.reference
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = type(ref)(mask.astype(np.uint8), ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 1
    img.header["descrip"] = b"brainseg tumour mask (0/1)"
    # The input's sform/qform codes travel with the header; keep them as they were.
    img.set_sform(ref.affine, int(ref.header["sform_code"]))
    img.set_qform(ref.affine, int(ref.header["qform_code"]))
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


# ----------------------------------------------------------------------------- predict
def check_case(case: NiftiCase) -> None:
    """Header-only checks of a case before anything is decoded or written (shapes, affines,
    3D, NIfTI); :func:`read_case` repeats them on the data it reads."""
    flair_path = case.files["flair"]
    assert flair_path is not None
    reference = load_volume(flair_path)
    for name in ("pre", "post"):
        path = case.files[name]
        if path is None:
            continue
        img = load_volume(path)
        if img.shape[:3] != reference.shape[:3]:
            raise BrainsegError(f"{path}: shape {tuple(img.shape[:3])} differs from the FLAIR "
                                f"volume's {tuple(reference.shape[:3])} ({flair_path}); the "
                                "sequences must be co-registered on one grid")
        if not np.allclose(img.affine, reference.affine, atol=AFFINE_ATOL):
            raise BrainsegError(f"{path}: affine differs from the FLAIR volume's ({flair_path})"
                                f" by up to {np.abs(img.affine - reference.affine).max():.3g}; "
                                "the sequences must be co-registered on one grid")


def training_zooms(volume: CaseVolume) -> np.ndarray:
    """Voxel size (mm) along the training layout's row, column and slice axes."""
    zooms = np.asarray(volume.reference.header.get_zooms()[:3], dtype=np.float64)
    out = np.empty(3)
    out[volume.to_training[:, 0].astype(int)] = zooms  # input axis i becomes axis [i, 0]
    return out
