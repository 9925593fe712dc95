"""2D U-Net (Ronneberger et al. 2015, as in Buda et al. 2019): encoder/decoder with skips."""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("batch", "instance", "group")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":  # per image and channel, the same in training and eval (nnU-Net)
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "group":
        # InstanceNorm's function in one kernel each way: InstanceNorm2d reshapes around
        # batch_norm (4 more host calls a layer forward, 12 backward, at depth 4) and returns
        # NCHW from a channels-last input, so every convolution after it would get NCHW.
        return nn.GroupNorm(ch, ch)
    raise ValueError(f"unknown normalization layer {kind!r}; expected one of {NORMS}")


def _block(in_ch: int, out_ch: int, norm: str = "batch") -> nn.Sequential:
    """Two 3×3 convolutions, each followed by a normalization layer and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        _norm(norm, out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        _norm(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` down-sampling levels and a single-channel logit output.

    Args:
        in_channels: input channels (3: pre-contrast, FLAIR, post-contrast).
        out_channels: output channels (1: tumour logit).
        base_width: channels of the first level; doubles at each level.
        depth: number of encoder levels (pooling steps); input sides must divide by 2**depth.
        norm: ``"batch"`` (BatchNorm), ``"instance"`` (InstanceNorm with affine weights) or
            ``"group"`` (the same function as GroupNorm, one group per channel).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_width: int = 32,
                 depth: int = 4, norm: str = "batch"):
        super().__init__()
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        ch = in_channels
        for w in widths[:-1]:
            self.encoders.append(_block(ch, w, norm))
            ch = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[-2], widths[-1], norm)
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.upconvs.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.decoders.append(_block(2 * w_out, w_out, norm))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.upconvs, self.decoders, skips[::-1], strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_model(base_width: int = 32, depth: int = 4, channels_last: bool = True,
                foreground_prior: float = 0.0, norm: str = "batch") -> UNet:
    """A freshly initialised U-Net, converted to channels-last memory format if asked.

    Args:
        base_width: channels of the first level.
        depth: number of pooling levels.
        channels_last: convert the weights to channels-last.
        foreground_prior: if in (0, 1), the head's bias starts at ``log(p / (1 - p))``, so the
            untrained model already predicts that share of foreground (the prior
            initialisation of Lin et al. 2017). Adam moves a bias by at most about ``lr`` per
            step, so from torch's default (about 0, i.e. p = 0.5 everywhere) a short run never
            reaches confident background; 0 keeps torch's default.
        norm: the normalization layer after each convolution (see :class:`UNet`).
    """
    model = UNet(base_width=base_width, depth=depth, norm=norm)
    if foreground_prior > 0:
        with torch.no_grad():
            model.head.bias.fill_(math.log(foreground_prior / (1 - foreground_prior)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
