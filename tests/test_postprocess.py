"""Post-processing: component labelling against a brute-force flood fill, hole filling, the
choice on validation scores, and the same results from the TorchScript-compiled code."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from brainseg_dist import postprocess as pp


def flood_fill_labels(volume: np.ndarray, neighbours: list[tuple[int, int, int]]) -> np.ndarray:
    """Components by breadth-first search (the reference): ids 1, 2, ... in the raster order
    of each component's first voxel."""
    labels = np.zeros(volume.shape, dtype=np.int64)
    for start in zip(*np.nonzero(volume), strict=True):
        if labels[start]:
            continue
        labels[start] = labels.max() + 1
        queue = [start]
        while queue:
            z, y, x = queue.pop()
            for dz, dy, dx in neighbours:
                n = (z + dz, y + dy, x + dx)
                if all(0 <= n[i] < volume.shape[i] for i in range(3)) and volume[n] \
                        and not labels[n]:
                    labels[n] = labels[start]
                    queue.append(n)
    return labels


def offsets(in_plane: bool, full: bool) -> list[tuple[int, int, int]]:
    out = []
    for d in itertools.product((-1, 0, 1), repeat=3):
        if d == (0, 0, 0) or (in_plane and d[0] != 0):
            continue
        if not full and sum(map(abs, d)) > 1:
            continue
        out.append(d)
    return out


@pytest.mark.parametrize(("in_plane", "full"), [(False, True), (True, True), (True, False),
                                                (False, False)])
@pytest.mark.parametrize(("seed", "density"), [(0, 0.35), (1, 0.35), (2, 0.6), (3, 0.9)])
def test_label_components_matches_flood_fill(in_plane, full, seed, density):
    """The same components, with ids in the same order (the largest-component tie-break
    depends on it), from sparse noise to one blob of long runs."""
    volume = np.random.default_rng(seed).random((5, 12, 13)) < density
    labels = pp.label_components(torch.from_numpy(volume), in_plane=in_plane, full=full)
    ranks = torch.unique(labels, return_inverse=True)[1].numpy()  # ids 0, 1, 2, ...
    assert (ranks == flood_fill_labels(volume, offsets(in_plane, full))).all()


def test_label_components_of_a_full_volume_and_of_single_rows():
    for shape in ((3, 1, 9), (4, 9, 1), (1, 1, 1), (2, 5, 6)):
        labels = pp.label_components(torch.ones(shape, dtype=torch.bool))
        assert (labels == 1).all(), shape
    assert not pp.label_components(torch.zeros(2, 3, 4, dtype=torch.bool)).any()


def test_fill_holes_fills_enclosed_not_open_regions():
    mask = torch.zeros(3, 20, 20, dtype=torch.bool)
    mask[1, 5:15, 5:15] = True
    mask[1, 8:11, 8:11] = False  # enclosed hole: filled
    mask[1, 12:15, 9:11] = False  # notch open to the outside (reaches row 14 -> edge at 15)
    mask[1, 14, 9:11] = False
    ring = mask.clone()
    ring[2, 0:4, 0:4] = True  # touches the border; its inside is not a hole
    ring[2, 0:2, 0:2] = False
    filled = pp.fill_holes_2d(ring)
    assert filled[1, 8:11, 8:11].all()
    assert not filled[1, 14, 9:11].any()
    assert not filled[2, 0:2, 0:2].any()
    assert not filled[0].any()
    # A diagonal gap does not connect a hole to the outside (background is 4-connected).
    diag = torch.zeros(1, 7, 7, dtype=torch.bool)
    diag[0, 1:6, 1:6] = True
    diag[0, 2:5, 2:5] = False
    diag[0, 1, 1] = False
    assert pp.fill_holes_2d(diag)[0, 3, 3]


def test_keep_components_largest_and_min_size():
    mask = torch.zeros(4, 10, 10, dtype=torch.bool)
    mask[0:2, 0:3, 0:3] = True  # 18 voxels
    mask[3, 7:9, 7:9] = True  # 4 voxels
    assert int(pp.keep_components(mask, largest=True, min_voxels=0).sum()) == 18
    assert int(pp.keep_components(mask, largest=False, min_voxels=5).sum()) == 18
    assert int(pp.keep_components(mask, largest=False, min_voxels=4).sum()) == 22
    assert torch.equal(pp.keep_components(mask, largest=False, min_voxels=0), mask)
    # A tie keeps the component that starts last in raster order, the same in evaluate,
    # predict and the exported ensemble.
    mask[3, 0:3, 0:3] = True
    mask[3, 0, 0] = False  # 8 voxels, not touching the 18-voxel block (one slice apart)
    mask[0, 7:9, 7:9] = True
    mask[1, 7:9, 7:9] = True  # the 4-voxel block grows to 12, then 18 with the next line
    mask[2, 7:9, 6:9] = True
    tied = pp.keep_components(mask, largest=True, min_voxels=0)
    assert int(tied.sum()) == 18
    assert bool(tied[3, 8, 8])
    assert not bool(tied[0, 0, 0])


def test_candidates_start_with_plain_and_are_distinct():
    settings = pp.candidates()
    assert settings[0] == pp.PLAIN
    assert len(set(settings)) == len(settings)


def test_choose_prefers_the_best_and_keeps_plain_on_ties():
    settings = [pp.PLAIN, pp.PostProcessing(tta=True), pp.PostProcessing(threshold=0.4)]
    tie = np.array([[0.8, 0.6], [0.8, 0.6], [0.7, 0.6]])
    assert pp.choose(tie, settings)[0] == pp.PLAIN
    better = np.array([[0.8, 0.6], [0.8, 0.6], [0.9, 0.7]])
    setting, after, before = pp.choose(better, settings)
    assert setting == settings[2]
    assert (after, before) == pytest.approx((0.8, 0.7))


def test_score_candidates_equals_masks_dice():
    """Every setting's score (from component counts, or from the filled masks) equals the
    Dice of the masks it makes, also for an empty truth and an empty prediction."""
    g = torch.Generator().manual_seed(0)
    p_id = torch.rand(6, 24, 24, generator=g) ** 3
    p_flip = torch.rand(6, 24, 24, generator=g) ** 3
    truth = torch.zeros(6, 24, 24, dtype=torch.bool)
    truth[1:4, 5:15, 5:15] = True
    # Probabilities in a box (scores are computed inside it), with a ring around a hole, two
    # blobs of different sizes, and truth also outside the box.
    boxed = torch.zeros(6, 24, 24)
    boxed[2:5, 8:18, 10:20] = 0.9
    boxed[3, 11:15, 13:17] = 0.1  # a hole in a slice of the big blob
    boxed[1, 3:5, 3:5] = 0.35     # a small blob, above only the lowest thresholds
    missed = truth.clone()
    missed[0, 20:23, 20:23] = True  # outside the box
    patients = [(p_id, p_flip, truth), (p_id, p_flip, torch.zeros_like(truth)),
                (p_id * 0.1, p_flip * 0.1, truth), (boxed, boxed.flip(2), missed)]
    settings = pp.candidates()
    scores = pp.score_candidates(patients, settings)
    for i, setting in enumerate(settings):
        for j, (a, b, t) in enumerate(patients):
            assert scores[i, j] == pytest.approx(pp.patient_dice(setting.masks(a, b), t)), \
                (setting, j)


def test_apply_masks_compiles_to_torchscript_with_same_output():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(5, 30, 30, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(pp.apply_masks)
    for largest, min_voxels, fill in ((True, 0, True), (False, 20, False), (False, 0, True)):
        assert torch.equal(scripted(probs, 0.6, largest, min_voxels, fill),
                           pp.apply_masks(probs, 0.6, largest, min_voxels, fill))


def test_postprocessing_rejects_bad_settings():
    with pytest.raises(ValueError, match="components"):
        pp.PostProcessing(components="some")
    with pytest.raises(ValueError, match="threshold"):
        pp.PostProcessing(threshold=1.0)
