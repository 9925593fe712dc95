"""The weight EMA: its update rule, warm-up, BatchNorm buffers and state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brainseg_dist.ema import WeightEMA


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_update_follows_the_warmed_up_decay():
    live = model()
    ema = WeightEMA(live, decay=0.9)
    start = ema.model[0].weight.clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
    ema.update(live)
    d = min(0.9, 2 / 11)  # first update: the warm-up decay (1 + 1) / (10 + 1)
    assert torch.allclose(ema.model[0].weight, d * start + (1 - d) * live[0].weight)
    for _ in range(200):
        ema.update(live)
    assert ema.current_decay() == pytest.approx(0.9)
    assert torch.allclose(ema.model[0].weight, live[0].weight, atol=1e-6)
    assert not ema.model[0].weight.requires_grad


def test_batchnorm_statistics_are_averaged_and_counter_copied():
    live = model()
    ema = WeightEMA(live, decay=0.5)
    live.train()(torch.randn(4, 1, 8, 8) * 3 + 2)
    ema.update(live)
    bn_live, bn_ema = live[1], ema.model[1]
    d = ema.current_decay()
    expected = d * torch.zeros(2) + (1 - d) * bn_live.running_mean
    assert torch.allclose(bn_ema.running_mean, expected)
    assert int(bn_ema.num_batches_tracked) == int(bn_live.num_batches_tracked) == 1


def test_state_round_trip_and_bad_decay():
    live = model()
    ema = WeightEMA(live, decay=0.8)
    for _ in range(3):
        with torch.no_grad():
            live[0].weight.add_(0.1)
        ema.update(live)
    other = WeightEMA(model(), decay=0.8)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    assert torch.equal(other.model[0].weight, ema.model[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(live, decay=1.0)
