"""Decoding and validating slices: every bad file is named, all at once."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from helpers import make_patient, rng_image, square_mask, truncate_half, write_image, write_pair

from brainseg_dist.data import load_dataset
from brainseg_dist.data.decode import (
    SliceError,
    read_image,
    read_mask,
    read_pair,
    resize_image,
    resize_mask,
)
from brainseg_dist.errors import DatasetError

GOOD = "TCGA_CS_4943_20000902"
BAD = "TCGA_DU_5852_19950709"


def _problem_for(err: DatasetError, path) -> str:
    matches = [p.problem for p in err.problems if p.path == path]
    assert len(matches) == 1, f"expected one problem for {path}, got {err.problems}"
    return matches[0]


def test_truncated_tif_is_named(tmp_path):
    make_patient(tmp_path, GOOD, slices=(1, 2))
    image, _ = write_pair(tmp_path / GOOD, 3)
    truncate_half(image)
    with pytest.raises(SliceError) as direct:
        read_image(image)
    assert direct.value.problem.path == image
    assert "truncated" in direct.value.problem.problem

    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    problem = _problem_for(info.value, image)
    assert "truncated" in problem or "unreadable" in problem
    assert len(info.value.problems) == 1
    assert f"{GOOD}_3.tif" in str(info.value)


def test_truncated_mask_is_named(tmp_path):
    make_patient(tmp_path, GOOD, slices=(1,))
    _, mask = write_pair(tmp_path / GOOD, 2, mask=square_mask())
    truncate_half(mask)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    assert "truncated" in _problem_for(info.value, mask)


@pytest.mark.parametrize("which", ["image", "mask"])
def test_truncated_tif_with_directory_at_the_end(tmp_path, which):
    """Files written with the IFD after the pixel data (as in kaggle_3m) lose the IFD when cut
    short; tifffile then returns an empty float64 array instead of raising."""
    make_patient(tmp_path, GOOD, slices=(1,))
    image, mask = write_pair(tmp_path / GOOD, 2)
    path = image if which == "image" else mask
    size = path.stat().st_size
    # a little-endian TIFF header whose first IFD offset points past the end of the file
    path.write_bytes(b"II*\x00" + struct.pack("<I", size) + bytes(size // 2 - 8))
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    problem = _problem_for(info.value, path)
    assert "truncated" in problem
    assert "dtype" not in problem


def test_file_that_is_not_a_tif(tmp_path):
    make_patient(tmp_path, GOOD, slices=(1,))
    image, _ = write_pair(tmp_path / GOOD, 2)
    image.write_bytes(b"this is not a tiff file at all")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    assert "unreadable" in _problem_for(info.value, image)


def test_wrong_dtype(tmp_path):
    path = write_image(tmp_path / "a.tif", rng_image(0, dtype=np.uint16))
    with pytest.raises(SliceError, match="dtype is uint16, expected uint8") as info:
        read_image(path)
    assert info.value.problem.path == path


def test_wrong_channel_count(tmp_path):
    path = write_image(tmp_path / "a.tif", rng_image(0, shape=(256, 256, 4)))
    with pytest.raises(SliceError, match=r"\(256, 256, 4\), expected H×W×3") as info:
        read_image(path)
    assert info.value.problem.path == path
    grey = write_image(tmp_path / "b.tif", rng_image(0, shape=(256, 256)))
    with pytest.raises(SliceError, match="expected H×W×3"):
        read_image(grey)


def test_mask_image_shape_mismatch(tmp_path):
    image = write_image(tmp_path / "a.tif", rng_image(0))
    mask = write_image(tmp_path / "a_mask.tif", square_mask((128, 128), 10, 20))
    with pytest.raises(SliceError, match="mask is 128x128 but its image is 256x256") as info:
        read_pair(image, mask)
    assert info.value.problem.path == mask


def test_non_binary_mask(tmp_path):
    mask = np.zeros((256, 256), np.uint8)
    mask[10:20, 10:20] = 128
    mask[30:40, 30:40] = 255
    path = write_image(tmp_path / "a_mask.tif", mask)
    with pytest.raises(SliceError) as info:
        read_mask(path)
    assert info.value.problem.path == path
    message = str(info.value)
    assert "not binary" in message
    assert "0, 128, 255" in message
    assert "a_mask.tif" in message


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0,), (255,)])
def test_binary_masks_read_as_zero_one(tmp_path, values):
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = values[-1]
    mask[:, :128] = values[0]
    out = read_mask(write_image(tmp_path / "m.tif", mask))
    assert out.dtype == np.uint8
    assert set(np.unique(out).tolist()) <= {0, 1}
    np.testing.assert_array_equal(out, (mask > 0).astype(np.uint8))


def test_mask_with_trailing_channel_axis_is_accepted(tmp_path):
    mask = square_mask()[..., None]
    out = read_mask(write_image(tmp_path / "m.tif", mask))
    assert out.shape == (256, 256)
    assert out.sum() == 1600


def test_wrong_native_size_flagged(tmp_path):
    make_patient(tmp_path, GOOD, slices=(1, 2, 3, 4))
    image, _ = write_pair(tmp_path / GOOD, 5, image=rng_image(5, shape=(240, 240, 3)),
                          mask=square_mask((240, 240)))
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    problem = _problem_for(info.value, image)
    assert "240x240" in problem
    assert "expected 256x256" in problem
    assert len(info.value.problems) == 1


def _corrupt_dataset(root):
    """3 good slices in GOOD and 2 in BAD, plus one bad slice of each kind in BAD."""
    make_patient(root, GOOD, slices=(1, 2, 3))
    folder = make_patient(root, BAD, slices=(1, 2))
    bad = {}
    bad["truncated"], _ = write_pair(folder, 3)
    truncate_half(bad["truncated"])
    bad["dtype"], _ = write_pair(folder, 4, image=rng_image(4, dtype=np.uint16))
    bad["channels"], _ = write_pair(folder, 5, image=rng_image(5, shape=(256, 256, 4)))
    _, bad["mismatch"] = write_pair(folder, 6, mask=square_mask((200, 200)))
    nonbinary = square_mask()
    nonbinary[0:5, 0:5] = 128
    _, bad["nonbinary"] = write_pair(folder, 7, mask=nonbinary)
    bad["size"], _ = write_pair(folder, 8, image=rng_image(8, shape=(240, 240, 3)),
                                mask=square_mask((240, 240)))
    bad["no_mask"] = write_image(folder / f"{BAD}_9.tif", rng_image(9))
    return bad


def test_all_problems_reported_at_once(tmp_path):
    bad = _corrupt_dataset(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, image_size=32)
    err = info.value
    assert len(err.problems) == len(bad) == 7
    assert {p.path for p in err.problems} == set(bad.values())
    assert "truncated" in _problem_for(err, bad["truncated"])
    assert "uint16" in _problem_for(err, bad["dtype"])
    assert "H×W×3" in _problem_for(err, bad["channels"])
    assert "200x200" in _problem_for(err, bad["mismatch"])
    assert "not binary" in _problem_for(err, bad["nonbinary"])
    assert "240x240" in _problem_for(err, bad["size"])
    assert "no mask" in _problem_for(err, bad["no_mask"])
    message = str(err)
    assert message.startswith("7 problem(s) in dataset")
    for path in bad.values():
        assert str(path) in message


def test_skip_invalid_drops_bad_slices_and_keeps_the_rest(tmp_path):
    bad = _corrupt_dataset(tmp_path)
    data = load_dataset(tmp_path, image_size=32, skip_invalid=True)
    assert len(data) == 5
    assert data.images.shape == (5, 3, 32, 32)
    assert data.masks.shape == (5, 1, 32, 32)
    assert data.table["folder"].tolist() == [GOOD] * 3 + [BAD] * 2
    assert data.table["slice"].tolist() == [1, 2, 3, 1, 2]
    assert {p.path for p in data.skipped} == set(bad.values())
    kept = set(data.table["image_path"]) | set(data.table["mask_path"])
    assert not kept & {str(p) for p in bad.values()}
    # the arrays line up with the kept rows
    for i, path in enumerate(data.table["image_path"]):
        np.testing.assert_array_equal(data.images[i], resize_image(read_image(path), 32))


def test_skip_invalid_still_fails_when_nothing_is_left(tmp_path):
    folder = tmp_path / BAD
    image, _ = write_pair(folder, 1)
    truncate_half(image)
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(tmp_path, image_size=32, skip_invalid=True)


def test_resize_image_shape_and_dtype():
    image = rng_image(0)
    for size in (32, 128, 256, 300):
        out = resize_image(image, size)
        assert out.shape == (3, size, size)
        assert out.dtype == np.uint8
    np.testing.assert_array_equal(resize_image(image, 256), image.transpose(2, 0, 1))
    constant = np.full((256, 256, 3), (10, 200, 255), np.uint8)
    out = resize_image(constant, 64)
    assert (out[0] == 10).all()
    assert (out[1] == 200).all()
    assert (out[2] == 255).all()
    # area averaging: a 2x2 block of 0 and 255 becomes 128 (rounded), not 127 or 0
    checker = np.zeros((4, 4, 3), np.uint8)
    checker[::2, ::2] = 255
    checker[1::2, 1::2] = 255
    np.testing.assert_array_equal(resize_image(checker, 2), np.full((3, 2, 2), 128, np.uint8))


def test_resize_image_non_square_input():
    out = resize_image(rng_image(1, shape=(240, 200, 3)), 64)
    assert out.shape == (3, 64, 64)
    assert out.dtype == np.uint8


def test_resize_mask_stays_binary():
    mask = (square_mask(value=1) | square_mask(lo=10, hi=13, value=1)).astype(np.uint8)
    for size in (32, 100, 128, 256, 512):
        out = resize_mask(mask, size)
        assert out.shape == (1, size, size)
        assert out.dtype == np.uint8
        assert set(np.unique(out).tolist()) <= {0, 1}
    np.testing.assert_array_equal(resize_mask(mask, 256)[0], mask)
    # a 40x40 square at 256 -> 20x20 at 128; the 3x3 speck keeps at most a few pixels
    half = resize_mask(mask, 128)[0]
    assert half[50:70, 50:70].all()
    assert half.sum() <= 400 + 4
    assert resize_mask(np.ones((256, 256), np.uint8), 64).all()
    assert not resize_mask(np.zeros((256, 256), np.uint8), 64).any()
