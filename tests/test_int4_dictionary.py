"""The 4-bit dictionary (GPTQ layout, reserved: written by the compressor, refused by every reader until one serves
it): packing against hand-computed words, the byte formula against the stored tensors, the compressed layer's
reported error against float64 math of what is stored, and the clear refusals."""

import pytest
import torch

from cospadi_vllm import format as fmt
from offline_compress.layer import LayerSettings, compress_linear
from offline_compress.options import CompressError, CompressOptions, validate_options


def test_int4_dictionary_packing_is_gptq_layout():
    """Input 8r+i of atom t sits in bits [4i, 4i+4) of word [r, t] (GPTQ's qweight), computed here with Python ints."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (20, 3), generator=g)  # 20 inputs: the last word half empty
    packed = fmt.pack_int4_dictionary(codes)
    assert packed.dtype == torch.int32 and packed.shape == (3, 3)
    for r in range(3):
        for t in range(3):
            word = sum(int(codes[8 * r + i, t]) << (4 * i) for i in range(8) if 8 * r + i < 20)
            assert int(packed[r, t]) & 0xFFFFFFFF == word
    assert torch.equal(fmt.unpack_int4_dictionary(packed, 20), codes)


def test_int4_dictionary_dequantizes_per_group():
    """(code − 8) · the scale of the input's group of 128, for in = 200 (a partial last group)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (200, 5), generator=g)
    scales = torch.rand(2, 5, generator=g).to(torch.float16)
    dense = fmt.dequantize_dictionary({fmt.DICTIONARY: fmt.pack_int4_dictionary(codes), fmt.DICTIONARY_SCALES: scales}, 200)
    group = torch.arange(200) // 128
    assert torch.equal(dense, (codes.float() - 8) * scales.float()[group])


def correlated_layer(in_features: int = 200, out_features: int = 300):
    g = torch.Generator().manual_seed(2)
    mixing = 2 * torch.randn(in_features, in_features, generator=g) / in_features**0.5 + torch.eye(in_features)
    x = torch.randn(4 * in_features, in_features, generator=g) @ mixing
    weight = torch.randn(out_features, in_features, generator=g) @ mixing.T / in_features**0.5
    return weight, (x.T @ x).double()


@pytest.mark.parametrize("value_dtype", ["int8", "int4"])
def test_compressed_layer_with_int4_dictionary(value_dtype):
    """Stored D: int32 [ceil(in/8), k] and float16 scales [ceil(in/128), k]; the stored bytes are the formula's and
    the tensors', within the budget; the reported whitened error is the float64 error of the stored tensors, and
    the 4-bit D buys more atoms than an int8 one at the same ratio."""
    weight, gram = correlated_layer()
    ratio = 0.5
    result = compress_linear(weight, gram, ratio, LayerSettings(value_dtype=value_dtype, dictionary_dtype="int4",
                                                                iterations=2))
    k = result.shape.k
    assert result.tensors[fmt.DICTIONARY].dtype == torch.int32 and result.tensors[fmt.DICTIONARY].shape == (25, k)
    assert result.tensors[fmt.DICTIONARY_SCALES].dtype == torch.float16
    assert result.tensors[fmt.DICTIONARY_SCALES].shape == (2, k)
    stored = fmt.stored_bytes(result.shape, value_dtype, dictionary_dtype_name="int4")
    assert stored == sum(t.numel() * t.element_size() for t in result.tensors.values())
    assert stored <= (1 - ratio) * fmt.dense_bf16_bytes(200, 300)
    approx = (fmt.dequantize_dictionary(result.tensors, 200).double()
              @ fmt.decode_coefficients(result.tensors[fmt.COEF_MASK], result.tensors[fmt.COEF_VALUES],
                                        result.tensors[fmt.COEF_SCALES], k).double())
    delta = weight.double().T - approx
    error = ((delta.T @ gram @ delta).trace() / (weight.double() @ gram @ weight.double().T).trace()).sqrt()
    assert abs(float(error) - result.whitened_rel_error) <= 1e-3 * result.whitened_rel_error
    int8_dictionary = compress_linear(weight, gram, ratio, LayerSettings(value_dtype=value_dtype, dictionary_dtype="int8",
                                                                         iterations=2))
    assert k > int8_dictionary.shape.k


def test_readers_and_the_cli_refuse_an_int4_dictionary():
    with pytest.raises(fmt.FormatError, match=r"dictionary_dtype 'int4' is not supported yet \(this build serves "
                                              r"bfloat16, int8\)"):
        fmt.dictionary_dtype_from_name("int4")
    with pytest.raises(CompressError, match=r"--dictionary-dtype must be one of \['bfloat16', 'int8'\], got 'int4'"):
        validate_options(CompressOptions(dictionary_dtype="int4"))
