"""GPTQ rounding (offline_compress/gptq.py) against float64 references computed here."""

import pytest
import torch

from offline_compress.gptq import quantize_gptq, round_to_nearest


def correlated_inputs(g: torch.Generator, tokens: int = 2048, cols: int = 256) -> torch.Tensor:
    """X [tokens, cols] with strongly correlated columns and a few large ones (what real activations look like)."""
    mixing = 2 * torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return (torch.randn(tokens, cols, generator=g) @ mixing) * torch.rand(cols, generator=g).add(0.1)


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x.double() @ (weight.double() - approx.double()).T).norm() / (x.double() @ weight.double().T).norm())


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest():
    """A diagonal Hessian carries no feedback between inputs: the codes are those of rounding each weight to the
    nearest point of its group's symmetric grid (scale 2·max|w| / 15, zero 8), computed here."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 256, generator=g)
    result = quantize_gptq(weight, torch.diag(torch.rand(256, generator=g) + 0.5), bits=4, group_size=128)
    groups = weight.view(24, 2, 128)
    scale = 2 * groups.abs().amax(2, keepdim=True) / 15
    expected = (groups / scale + 8).round().clamp(0, 15).view(24, 256)
    assert torch.equal(result.codes.float(), expected)
    assert torch.allclose(result.scales, scale.squeeze(2)) and bool((result.zeros == 8).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (4, 256)])
def test_gptq_lowers_the_output_error(symmetric, bits, group_size):
    """Correlated inputs: GPTQ's output error ‖X(W − Ŵ)ᵀ‖ (float64) is well below rounding to nearest on the same
    kind of grid; codes are integers of the grid, zeros integers inside it, and the dequantized weight is
    (codes − zero)·scale of each input's group (recomputed here)."""
    g = torch.Generator().manual_seed(bits * group_size + symmetric)
    x = correlated_inputs(g)
    weight = torch.randn(48, 256, generator=g)
    result = quantize_gptq(weight, x.T @ x, bits=bits, group_size=group_size, symmetric=symmetric)
    top = 2**bits - 1
    assert result.codes.min() >= 0 and result.codes.max() <= top
    assert result.scales.shape == result.zeros.shape == (48, 256 // group_size)
    assert torch.equal(result.zeros, result.zeros.round()) and result.zeros.min() >= 0 and result.zeros.max() <= top
    group = torch.arange(256) // group_size
    rebuilt = (result.codes.double() - result.zeros.double()[:, group]) * result.scales.double()[:, group]
    assert torch.allclose(result.dequantize().double(), rebuilt, atol=1e-6)
    rtn = round_to_nearest(weight, bits=bits, group_size=group_size, symmetric=symmetric)
    assert output_error(x, weight, result.dequantize()) < 0.85 * output_error(x, weight, rtn.dequantize())


def test_inputs_that_never_fire_are_zero():
    g = torch.Generator().manual_seed(5)
    x = correlated_inputs(g, cols=128)
    x[:, 7] = 0
    result = quantize_gptq(torch.randn(16, 128, generator=g), x.T @ x)
    assert bool((result.dequantize()[:, 7] == 0).all())
