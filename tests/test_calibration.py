"""Input Grams of the calibration: the blocked product equals the plain float64 one."""

from __future__ import annotations

import pytest
import torch

from offline_compress.calibration import GRAM_BLOCK_WIDTH, MIN_BLOCKED_WIDTH, gram


@pytest.mark.parametrize("width", [96, MIN_BLOCKED_WIDTH, 2 * GRAM_BLOCK_WIDTH + 77, 4864])
def test_gram_equals_the_float64_product(width):
    """Widths below the blocked path, at its edge, not a multiple of the block, and a 0.5B model's down_proj;
    float32 inputs whose columns span four orders of magnitude (as activations do)."""
    x = torch.randn(600, width) * torch.logspace(-2, 2, width)
    reference = x.double().T @ x.double()
    product = gram(x)
    assert product.dtype == torch.float64 and product.shape == (width, width)
    scale = reference.diagonal().sqrt()
    assert ((product - reference).abs() / (scale[:, None] * scale[None, :])).max() < 1e-13
