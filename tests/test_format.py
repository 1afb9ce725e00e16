"""Format module (bit packing, byte accounting, config) and the encoding rules the compressor applies
(value quantization, the byte budget) — against plain-Python references."""

import pytest
import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.budget import BudgetError, solve_k_s
from offline_compress.quantization import encode_coefficients, quantize_values


def python_unpack(mask: torch.Tensor, k: int) -> list[list[int]]:
    """Independent reference: atom indices whose bit is set, read word by word with Python ints."""
    rows = []
    for row in mask.tolist():
        atoms = [w * 32 + b for w, word in enumerate(row) for b in range(32) if (word & 0xFFFFFFFF) >> b & 1]
        rows.append([a for a in atoms if a < k])
    return rows


@pytest.mark.parametrize("k", [1, 31, 32, 33, 95, 130])
def test_mask_roundtrip_matches_python_bits(k):
    g = torch.Generator().manual_seed(k)
    support = torch.rand(17, k, generator=g) < 0.5
    support[:, -1] = True  # the highest bit (bit 31 of a full word when k % 32 == 0) must survive
    mask = codec.pack_mask(support)
    assert mask.dtype == torch.int32 and mask.shape == (17, fmt.mask_words(k))
    assert python_unpack(mask, k) == [row.nonzero().squeeze(1).tolist() for row in support]
    assert torch.equal(codec.unpack_mask(mask, k), support)


@pytest.mark.parametrize("name,tol", [("int8", 1 / 127), ("float8_e4m3fn", 1 / 16), ("bfloat16", 1 / 256)])
def test_quantize_values_error_bound(name, tol):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(64, 40, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 64, dtype=torch.float64)[:, None]
    q, scales = quantize_values(values, name)
    assert q.dtype == fmt.VALUE_DTYPES[name] and scales.dtype == torch.float32 and scales.shape == (64,)
    back = codec.dequantize_values(q, scales).double()
    rel = (back - values).abs().amax(1) / values.abs().amax(1)
    assert float(rel.max()) <= tol


def test_encode_decode_against_dense_reference():
    g = torch.Generator().manual_seed(2)
    out_features, k, s = 23, 70, 9
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out_features)])
    vals = torch.randn(out_features, s, generator=g)
    tensors = encode_coefficients(idx, vals, k, "bfloat16")
    dense_ref = torch.zeros(k, out_features, dtype=torch.float64)
    for j in range(out_features):
        for t in range(s):
            dense_ref[idx[j, t], j] = vals[j, t].to(torch.bfloat16).double()
    dense = codec.decode_coefficients(tensors[fmt.COEF_MASK], tensors[fmt.COEF_VALUES], tensors[fmt.COEF_SCALES], k)
    assert torch.equal(dense.double(), dense_ref)
    # values stored in increasing atom order
    for j, row in enumerate(python_unpack(tensors[fmt.COEF_MASK], k)):
        expected = [float(dense_ref[a, j]) for a in row]
        assert tensors[fmt.COEF_VALUES][j].double().tolist() == expected


@pytest.mark.parametrize("in_f,out_f", [(576, 576), (576, 1536), (1536, 576), (4096, 14336)])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4])
def test_solve_k_s_uses_budget(in_f, out_f, ratio):
    shape = solve_k_s(in_f, out_f, ratio, 2.0, "int8")
    budget = (1 - ratio) * 2 * in_f * out_f
    used = fmt.stored_bytes(shape, "int8")
    assert used <= budget
    # one more atom would not fit: the budget is used up to one atom's bytes
    bigger = fmt.LayerShape(in_f, out_f, shape.k + 1, max(shape.s, int((shape.k + 1) / 2)))
    assert fmt.stored_bytes(bigger, "int8") > budget
    assert abs(shape.k / shape.s - 2.0) <= 0.05  # rounding, plus s topping up the last atom's bytes


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_solve_k_s_rejects_bad_ratio(bad):
    with pytest.raises(BudgetError, match="ratio"):
        solve_k_s(64, 64, bad, 2.0, "int8")


def test_parse_quantization_config_rejects_unknown_version():
    with pytest.raises(fmt.FormatError, match="format_version 99"):
        fmt.parse_quantization_config({"quant_method": "cospadi", "format_version": 99, "modules": {"a": {"k": 2, "s": 1}}})


def test_popcount32_matches_python():
    g = torch.Generator().manual_seed(4)
    words = torch.randint(-(2**31), 2**31, (300, 7), generator=g, dtype=torch.int64).to(torch.int32)
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    expected = torch.tensor([[bin(int(v)).count("1") for v in row] for row in as_unsigned])
    assert torch.equal(fmt.popcount32(as_unsigned), expected)
