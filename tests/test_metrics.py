"""Metrics on hand-computed cases: Dice, IoU, HD95, slice-level and diagnosis metrics, the
empty-mask conventions, and 3D largest-connected-component post-processing."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from brainseg_dist.metrics import (
    boundary,
    connected_components_3d,
    dice_from_counts,
    hd95,
    hd95_per_slice,
    iou_from_counts,
    largest_component_3d,
    overlap_counts,
    patient_dice,
    patient_dice_summary,
    slice_metrics,
)


def box(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# ----------------------------------------------------------------------------- Dice / IoU
def test_dice_and_iou_hand_computed():
    pred = box((8, 8), (0, 2), (0, 2))  # 4 px
    target = box((8, 8), (0, 2), (0, 3))  # 6 px, contains pred
    c = overlap_counts(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])[0].numpy()
    assert c.tolist() == [4, 4, 6]
    assert float(dice_from_counts(*c)) == pytest.approx(2 * 4 / 10)
    assert float(iou_from_counts(*c)) == pytest.approx(4 / 6)


def test_empty_mask_conventions():
    # both empty: a correct "no tumour" -> 1.0; exactly one empty -> 0.0
    assert float(dice_from_counts(0, 0, 0)) == 1.0
    assert float(iou_from_counts(0, 0, 0)) == 1.0
    assert float(dice_from_counts(0, 5, 0)) == 0.0
    assert float(dice_from_counts(0, 0, 5)) == 0.0
    assert float(iou_from_counts(0, 5, 0)) == 0.0
    # HD95 is undefined unless both are non-empty
    empty, blob = np.zeros((5, 5), bool), box((5, 5), (1, 3), (1, 3))
    assert math.isnan(hd95(empty, empty))
    assert math.isnan(hd95(blob, empty))
    assert math.isnan(hd95(empty, blob))
    # per patient: counts are summed over slices first
    counts = np.array([[0, 0, 0], [0, 0, 0], [0, 3, 0], [2, 2, 2]])
    dice = patient_dice(counts, np.array(["empty_ok", "empty_ok", "fp_only", "hit"]))
    assert dice == {"empty_ok": 1.0, "fp_only": 0.0, "hit": 1.0}


# ----------------------------------------------------------------------------- HD95
def test_boundary_is_mask_minus_erosion():
    m = box((7, 7), (1, 6), (1, 6))  # 5x5 square: 16 boundary pixels, 3x3 interior
    b = boundary(torch.from_numpy(m)).numpy()
    assert b.sum() == 16
    assert not b[2:5, 2:5].any()
    # pixels on the image border stay boundary (outside the image counts as background)
    full = boundary(torch.ones(4, 4, dtype=torch.bool)).numpy()
    assert full.sum() == 12
    assert boundary(torch.ones(1, 1, dtype=torch.bool)).item()


def test_hd95_hand_computed():
    a = np.zeros((12, 12), bool)
    b = np.zeros((12, 12), bool)
    a[0, 0] = True
    b[3, 4] = True  # single pixels: distance 5
    assert hd95(a, b) == pytest.approx(5.0)
    # b -> a distances {3, 10}: 95th percentile (linear) = 3 + 0.95 * 7 = 9.65;
    # a -> b distances {3}; the HD95 is the larger of the two directed values.
    b = np.zeros((12, 12), bool)
    b[0, 3] = b[0, 10] = True
    assert hd95(a, b) == pytest.approx(9.65)
    assert hd95(b, a) == pytest.approx(9.65)
    assert hd95(a, a) == 0.0


def test_hd95_shifted_square_is_bounded_by_shift():
    a = box((64, 64), (10, 40), (10, 40))
    b = box((64, 64), (15, 45), (10, 40))  # shifted down 5 px: Hausdorff distance 5
    h = hd95(a, b)
    assert 0 < h <= 5.0
    assert h == pytest.approx(hd95(b, a))
    per = hd95_per_slice(torch.from_numpy(np.stack([a, a, np.zeros_like(a)])),
                         torch.from_numpy(np.stack([b, np.zeros_like(a), np.zeros_like(a)])))
    assert per[0] == pytest.approx(h)
    assert np.isnan(per[1:]).all()


# ----------------------------------------------------------------------------- slice metrics
def test_slice_metrics_hand_computed():
    shape = (10, 10)
    pred = np.stack([box(shape, (0, 2), (0, 4)),   # 8 px
                     np.zeros(shape, bool),          # misses a tumour slice
                     box(shape, (5, 6), (5, 8)),     # 3 px on an empty slice
                     np.zeros(shape, bool)])         # correct empty
    target = np.stack([box(shape, (0, 2), (1, 6)),  # 10 px, 6 shared with pred
                       box(shape, (3, 5), (3, 5)),   # 4 px
                       np.zeros(shape, bool),
                       np.zeros(shape, bool)])
    counts = overlap_counts(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    assert counts.tolist() == [[6, 8, 10], [0, 0, 4], [0, 3, 0], [0, 0, 0]]
    m = slice_metrics(counts, np.array([2.0, np.nan, np.nan, np.nan]))
    assert m["dice_tumour_slices"] == pytest.approx((12 / 18 + 0) / 2)
    assert m["fp_rate_empty_slices"] == pytest.approx(1 / 2)
    assert m["dice"] == pytest.approx(2 * 6 / (11 + 14))
    assert m["iou"] == pytest.approx(6 / (11 + 14 - 6))
    assert m["precision"] == pytest.approx(6 / 11)
    assert m["recall"] == pytest.approx(6 / 14)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == pytest.approx(0.5)
    assert (m["hd95_mean"], m["hd95_median"], m["hd95_slices"]) == (2.0, 2.0, 1)
    assert (m["slices"], m["tumour_slices"], m["empty_slices"]) == (4, 2, 2)


def test_slice_metrics_undefined_ratios_are_nan():
    m = slice_metrics(np.array([[0, 0, 0], [0, 0, 0]]))  # nothing anywhere
    assert m["dice"] == 1.0
    assert m["iou"] == 1.0
    assert math.isnan(m["precision"])
    assert math.isnan(m["recall"])
    assert math.isnan(m["sensitivity"])
    assert math.isnan(m["dice_tumour_slices"])
    assert m["fp_rate_empty_slices"] == 0.0
    assert m["specificity"] == 1.0
    assert math.isnan(m["hd95_mean"])
    assert m["hd95_slices"] == 0
    m = slice_metrics(np.array([[3, 3, 3]]))  # no empty slice: FP rate undefined
    assert math.isnan(m["fp_rate_empty_slices"])
    assert math.isnan(m["specificity"])


def test_patient_dice_summary_uses_sample_sd():
    s = patient_dice_summary({"a": 0.5, "b": 1.0, "c": 0.0})
    assert (s["mean"], s["median"], s["min"], s["max"], s["patients"]) == (0.5, 0.5, 0, 1, 3)
    assert s["sd"] == pytest.approx(0.5)  # ddof=1
    assert math.isnan(patient_dice_summary([0.7])["sd"])


# ----------------------------------------------------------------------------- 3D components
def bfs_components(v: np.ndarray) -> list[set]:
    """Reference 26-connected components by breadth-first search."""
    seen = np.zeros_like(v, bool)
    comps = []
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
               if (a, b, c) != (0, 0, 0)]
    for start in zip(*np.nonzero(v), strict=True):
        if seen[start]:
            continue
        comp, queue = set(), deque([start])
        seen[start] = True
        while queue:
            p = queue.popleft()
            comp.add(tuple(int(i) for i in p))
            for o in offsets:
                q = tuple(p[i] + o[i] for i in range(3))
                if all(0 <= q[i] < v.shape[i] for i in range(3)) and v[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        comps.append(comp)
    return comps


def test_largest_component_two_blobs():
    v = np.zeros((4, 6, 6), bool)
    v[0:2, 0:2, 0:2] = True  # blob A: 8 voxels
    v[2, 2, 2] = True  # touches A only at a corner: 26-connected, joins A (9 voxels)
    v[3, 5, 3:6] = True  # blob B: 3 voxels
    v[3, 0, 5] = True  # isolated voxel
    out = largest_component_3d(v).numpy()
    expected = np.zeros_like(v)
    expected[0:2, 0:2, 0:2] = True
    expected[2, 2, 2] = True
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)
    labels = connected_components_3d(v).numpy()
    assert len(np.unique(labels[v])) == 3
    assert (labels[~v] == 0).all()
    assert not largest_component_3d(np.zeros((2, 3, 3), bool)).any()


def test_connected_components_match_bfs_on_random_volumes():
    rng = np.random.default_rng(0)
    for density in (0.1, 0.25, 0.4):
        v = rng.random((5, 9, 11)) < density
        labels = connected_components_3d(v).numpy()
        ours = {}
        for p in zip(*np.nonzero(v), strict=True):
            ours.setdefault(labels[p], set()).add(tuple(int(i) for i in p))
        reference = bfs_components(v)
        assert sorted(map(sorted, ours.values())) == sorted(map(sorted, reference))


def test_batch_dice_does_not_charge_empty_slices_for_a_pixel_of_mass():
    """Per-sample Dice makes an empty slice with one pixel's worth of probability cost 0.5,
    as much as missing half a tumour; batch Dice pools it with the batch's tumour."""
    from brainseg_dist.metrics import bce_dice_loss

    targets = torch.zeros(2, 1, 16, 16)
    targets[0, 0, 4:12, 4:12] = 1  # one tumour slice, one empty slice
    logits = torch.where(targets > 0, 12.0, -12.0)
    logits[1, 0, 0, 0] = 12.0  # one confident false-positive pixel on the empty slice
    sample = bce_dice_loss(logits, targets, bce_weight=0, dice="sample")
    batch = bce_dice_loss(logits, targets, bce_weight=0, dice="batch")
    assert sample == pytest.approx(0.25, abs=1e-3)  # (0 + 0.5) / 2
    assert batch == pytest.approx(1 / 129, abs=1e-3)  # 1 FP pixel against 64 tumour pixels
    with pytest.raises(ValueError, match="batch"):
        bce_dice_loss(logits, targets, dice="batch", reduction="none")
    with pytest.raises(ValueError, match="Dice kind"):
        bce_dice_loss(logits, targets, dice="volume")
