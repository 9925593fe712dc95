"""Device-resident training batches (``data.on_device``) against the DataLoader path: the same
batches for the same seed, epoch and rank (1 process here, 2 gloo processes in a slow test),
and the same training."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from helpers import torchrun
from test_train import tiny_config

from brainseg_dist.data import SliceData
from brainseg_dist.data.device import DeviceBatches, epoch_batches, resolve_on_device
from brainseg_dist.data.loader import EpochShuffleSampler, make_loader
from brainseg_dist.train import run_training

REPO = Path(__file__).resolve().parent.parent
N, S, BATCH, SEED = 37, 8, 8, 3  # 37 slices: a partial last batch


def slices(n: int = N) -> SliceData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, S, S), dtype=np.uint8)
    masks = rng.integers(0, 2, (n, 1, S, S), dtype=np.uint8)
    table = pd.DataFrame({"patient": [f"P{i // 5}" for i in range(n)], "slice": range(n)})
    return SliceData(Path("."), table, images, masks, S)


def loader_epochs(data: SliceData, accelerator: Accelerator, epochs: int) -> list[list]:
    """Batches of the prepared DataLoader, as training sets it up, epoch by epoch."""
    sampler = EpochShuffleSampler(len(data), SEED)
    loader = accelerator.prepare(make_loader(data, BATCH, seed=None, sampler=sampler))
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        out.append([tuple(t.clone() for t in batch) for batch in loader])
    return out


def device_epochs(data: SliceData, accelerator: Accelerator, epochs: int) -> list[list]:
    batches = DeviceBatches(data, BATCH, SEED, accelerator.device, accelerator.num_processes,
                            accelerator.process_index)
    out = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        out.append([tuple(t.clone() for t in batch) for batch in batches])
    assert all(len(e) == len(batches) for e in out)
    return out


def test_device_batches_equal_the_dataloader_batches():
    data = slices()
    accelerator = Accelerator(cpu=True)
    expected = loader_epochs(data, accelerator, 3)
    got = device_epochs(data, accelerator, 3)
    assert [len(b[2]) for b in got[0]] == [8, 8, 8, 8, 5]
    assert got[0][0][2].tolist() != got[1][0][2].tolist()  # a new order every epoch
    for epoch_a, epoch_b in zip(expected, got, strict=True):
        for a, b in zip(epoch_a, epoch_b, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.dtype == y.dtype
                assert torch.equal(x, y)


def test_rank_shards_cover_the_epoch():
    """Two ranks: batch k goes to rank k mod 2; the last round is filled from the start."""
    ranks = [epoch_batches(N, BATCH, SEED, 1, 2, r) for r in range(2)]
    assert [len(b) for b in ranks] == [3, 3]
    assert all(len(b) == BATCH for r in ranks for b in r)
    order = epoch_batches(N, BATCH, SEED, 1)
    assert ranks[0][0] == order[0]
    assert ranks[1][0] == order[1]
    seen = {i for r in ranks for b in r for i in b}
    assert seen == set(range(N))


def test_resolve_on_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_on_device("true", cpu, 10, 0.25)
    assert not resolve_on_device("false", cuda, 10, 0.25)
    assert not resolve_on_device("auto", cpu, 10, 0.25)  # the DataLoader reads memory already
    gpu = SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    assert resolve_on_device("auto", cuda, 2**30, 0.25)  # kaggle_3m at 256²: about 1 GB
    assert not resolve_on_device("auto", cuda, 30 * 2**30, 0.25)  # over the budget


def test_device_data_trains_exactly_like_the_dataloader(synth_root, tmp_path):
    """Same metrics either way, with gradient accumulation over an odd number of steps (161
    training slices: 21 steps of 8; the epoch's last step must still apply its gradients)."""
    runs = {}
    for on_device in ("false", "true"):
        cfg = tiny_config(synth_root, tmp_path / on_device, **{
            "train.epochs": 2, "data.on_device": on_device, "train.grad_accumulation": 2,
            "train.log_every": 3})
        runs[on_device] = run_training(cfg).history
    loader, device = runs["false"], runs["true"]
    for a, b in zip(loader, device, strict=True):
        for key in ("train_loss", "val_loss", "val_dice", "val_dice_patient_mean", "lr"):
            assert a[key] == b[key], (a["epoch"], key)


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from accelerate import Accelerator
    sys.path.insert(0, sys.argv[1])
    from test_data_device import slices, loader_epochs, device_epochs
    acc = Accelerator(cpu=True)
    data = slices()
    same = all(torch.equal(x, y)
               for ea, eb in zip(loader_epochs(data, acc, 3), device_epochs(data, acc, 3),
                                 strict=True)
               for a, b in zip(ea, eb, strict=True) for x, y in zip(a, b, strict=True))
    idx = [b[2].tolist() for b in device_epochs(data, acc, 1)[0]]
    with open(f"{sys.argv[2]}/rank{acc.process_index}.json", "w") as f:
        json.dump({"same": same, "processes": acc.num_processes, "indices": idx}, f)
""")


@pytest.mark.slow
def test_two_gloo_ranks_draw_the_dataloader_shards(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    job = torchrun([REPO / "tests", tmp_path], program=[script])
    log = job.communicate(timeout=300)[0]
    assert job.returncode == 0, log[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["same"] and r["processes"] == 2 for r in ranks)
    assert ranks[0]["indices"] != ranks[1]["indices"]
    assert ranks[0]["indices"] == epoch_batches(N, BATCH, SEED, 0, 2, 0)
