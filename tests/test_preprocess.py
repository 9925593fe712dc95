"""preprocess: the resize rule's export form."""

from __future__ import annotations

import pytest
import torch

from brainseg_dist.preprocess import _shrink, _shrink_by_windows


@pytest.mark.parametrize("hw", [(203, 317), (256, 256), (128, 130), (1000, 129)])
def test_export_area_resize_as_matrices_is_exact(hw):
    """The area resize used under export (two matrix products, which the ONNX exporter can
    express at a symbolic H×W) equals F.interpolate(mode="area") bit for bit."""
    x = torch.randint(0, 256, (2, 3, *hw), generator=torch.Generator().manual_seed(0)).float()
    torch.testing.assert_close(_shrink_by_windows(x, 128), _shrink(x, 128), rtol=0, atol=0)
