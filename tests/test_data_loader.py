"""In-memory uint8 batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainseg_dist.data import SliceData
from brainseg_dist.data.loader import SliceDataset, make_loader

N, S = 23, 16


@pytest.fixture
def data() -> SliceData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 3, S, S), dtype=np.uint8)
    masks = rng.integers(0, 2, (N, 1, S, S), dtype=np.uint8)
    table = pd.DataFrame({"patient": [f"P{i // 5}" for i in range(N)], "slice": range(N)})
    return SliceData(Path("."), table, images, masks, S)


def _epoch(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_batches_are_uint8_with_int64_indices(data):
    batches = _epoch(make_loader(data, batch_size=8, shuffle=False))
    assert [len(b[0]) for b in batches] == [8, 8, 7]
    for images, masks, idx in batches:
        b = len(idx)
        assert images.shape == (b, 3, S, S)
        assert masks.shape == (b, 1, S, S)
        assert images.dtype == torch.uint8
        assert masks.dtype == torch.uint8
        assert idx.dtype == torch.int64
        # values are the stored bytes, untouched (no float conversion or scaling)
        np.testing.assert_array_equal(images.numpy(), data.images[idx.numpy()])
        np.testing.assert_array_equal(masks.numpy(), data.masks[idx.numpy()])
    order = torch.cat([b[2] for b in batches]).tolist()
    assert order == list(range(N))


def test_drop_last(data):
    batches = _epoch(make_loader(data, batch_size=8, shuffle=True, drop_last=True))
    assert [len(b[2]) for b in batches] == [8, 8]


def test_shuffle_is_seeded_and_covers_every_index_once(data):
    def orders(seed, epochs=2):
        loader = make_loader(data, batch_size=5, shuffle=True, seed=seed)
        return [torch.cat([b[2] for b in loader]).tolist() for _ in range(epochs)]

    a, b, c = orders(7), orders(7), orders(8)
    assert a == b
    assert a != c
    for epoch in (*a, *c):
        assert sorted(epoch) == list(range(N))
    assert a[0] != list(range(N))
    assert a[0] != a[1], "a new order every epoch"


def test_shuffled_batches_match_their_indices(data):
    for images, masks, idx in make_loader(data, batch_size=6, shuffle=True, seed=1):
        np.testing.assert_array_equal(images.numpy(), data.images[idx.numpy()])
        np.testing.assert_array_equal(masks.numpy(), data.masks[idx.numpy()])


def test_dataset_single_items_and_batches(data):
    ds = SliceDataset(data)
    assert len(ds) == N
    image, mask, i = ds[4]
    assert image.dtype == torch.uint8
    assert mask.shape == (1, S, S)
    assert i.dtype == torch.int64
    assert int(i) == 4
    np.testing.assert_array_equal(image.numpy(), data.images[4])
    images, masks, idx = ds.__getitems__([3, 1, 20])
    assert idx.tolist() == [3, 1, 20]
    np.testing.assert_array_equal(images.numpy(), data.images[[3, 1, 20]])
    np.testing.assert_array_equal(masks.numpy(), data.masks[[3, 1, 20]])


def test_loader_on_a_loaded_dataset(synth_data):
    sub = synth_data.subset(synth_data.patients[:2])
    loader = make_loader(sub, batch_size=16, shuffle=True, seed=0)
    seen = []
    for images, masks, idx in loader:
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (3, synth_data.image_size, synth_data.image_size)
        assert set(torch.unique(masks).tolist()) <= {0, 1}
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(sub)))
