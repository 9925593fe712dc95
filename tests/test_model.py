"""U-Net: shapes, skip connections, channels-last."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO

from brainseg_dist.model import UNet, build_model, count_parameters


@pytest.mark.parametrize(("depth", "size"), [(4, 64), (3, 40), (2, 128)])
def test_output_is_single_channel_logits_at_input_size(depth, size):
    model = UNet(base_width=4, depth=depth).eval()
    x = torch.randn(2, 3, size, size)
    y = model(x)
    assert y.shape == (2, 1, size, size)
    assert y.dtype == torch.float32


def test_four_levels_with_batchnorm_and_relu():
    model = UNet(base_width=32, depth=4)
    assert len(model.encoders) == len(model.decoders) == 4
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm2d", "ReLU", "ConvTranspose2d", "MaxPool2d"} <= kinds
    # The seed's U-Net (32 -> 512 channels) has ~7.8 M parameters.
    assert 7_000_000 < count_parameters(model) < 8_500_000


def test_channels_last_gives_same_output_and_format():
    torch.manual_seed(0)
    a = build_model(base_width=4, channels_last=False).eval()
    b = build_model(base_width=4, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    assert b.encoders[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    ya = a(x)
    yb = b(x.contiguous(memory_format=torch.channels_last))
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb, atol=1e-4, rtol=1e-4)


def test_skip_connections_carry_fine_detail():
    """A gradient reaches the input through every level, including the shallow skips."""
    model = UNet(base_width=4, depth=3).train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x)[0, 0, 5, 5].backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_foreground_prior_sets_the_untrained_foreground_share():
    """The head bias starts at logit(p): the untrained model predicts mostly background."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    default = build_model(base_width=4).train()
    prior = build_model(base_width=4, foreground_prior=0.01).train()
    assert prior.head.bias.item() == pytest.approx(-4.59512, abs=1e-5)
    with torch.no_grad():
        assert 0.3 < torch.sigmoid(default(x)).mean() < 0.7
        assert torch.sigmoid(prior(x)).mean() < 0.05


def test_instance_norm_gives_the_same_output_in_training_and_eval():
    """InstanceNorm has no running statistics: eval mode computes what training computed,
    unlike BatchNorm, whose eval output depends on the running averages."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    instance = build_model(base_width=4, depth=2, norm="instance")
    kinds = {type(m).__name__ for m in instance.modules()}
    assert "InstanceNorm2d" in kinds
    assert "BatchNorm2d" not in kinds
    with torch.no_grad():
        torch.testing.assert_close(instance.train()(x), instance.eval()(x))
        batch = build_model(base_width=4, depth=2).train()
        assert not torch.allclose(batch(x), batch.eval()(x), atol=1e-3)


def test_group_norm_is_instance_norm_that_keeps_channels_last():
    """``model.norm: group`` (GroupNorm, one group per channel) computes InstanceNorm's function
    from the same weights (either loads the other's checkpoint), forward and backward, but
    every convolution gets a channels-last input, and it issues fewer host calls."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_ops import PhaseCounter  # the project's host-call counter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    instance = build_model(base_width=4, depth=2, norm="instance")
    group = build_model(base_width=4, depth=2, norm="group")
    with torch.no_grad():  # different from the start: the norms' weights start equal anyway
        for p in instance.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    group.load_state_dict(instance.state_dict())
    seen = {}
    for name, model in (("instance", instance), ("group", group)):
        inputs = []
        hooks = [m.register_forward_pre_hook(lambda _m, a, into=inputs: into.append(a[0]))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with PhaseCounter() as calls:
            out = model(x)
            out.square().mean().backward()
        for h in hooks:
            h.remove()
        seen[name] = (out, [p.grad for p in model.parameters()], calls.counts.total(),
                      all(t.is_contiguous(memory_format=torch.channels_last) for t in inputs))
    torch.testing.assert_close(seen["group"][0], seen["instance"][0], atol=1e-5, rtol=1e-4)
    for g, i in zip(seen["group"][1], seen["instance"][1], strict=True):
        torch.testing.assert_close(g, i, atol=1e-5, rtol=1e-4)
    assert seen["group"][3]
    assert not seen["instance"][3]
    assert seen["group"][2] < seen["instance"][2]


def test_unknown_norm_layer_is_refused():
    with pytest.raises(ValueError, match="unknown normalization layer 'layer'"):
        build_model(base_width=4, norm="layer")
