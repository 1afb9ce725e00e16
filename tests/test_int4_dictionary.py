"""The 4-bit dictionary (GPTQ layout): packing against hand-computed words, the byte formula against the stored
tensors, the compressed layer's reported error against float64 math of what is stored, the kernel seam against
float64 dense math, transformers against the dense rebuild, ``check``, and vLLM (held at 4 bits, TP = 1 and 2)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import cospadi_vllm  # noqa: F401  (registers the transformers quantizer)
from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.check import check_checkpoint
from cospadi_vllm.kernels import KernelConfig, choose_kernel
from offline_compress.layer import LayerSettings, compress_linear
from tests.reference import (
    VALUE_DTYPES,
    HeldLayer,
    assert_kernel_matches_float64,
    merged_layer_tensors,
    reference_weight_t,
)
from tests.test_hf_quantizer import assert_save_pretrained_round_trips
from tests.test_int8_dictionary import _edit_tensors, assert_logits_match_dense_rebuild
from tests.vllm_helpers import assert_vllm_matches_dense_rebuild


def test_int4_dictionary_packing_is_gptq_layout():
    """Input 8r+i of atom t sits in bits [4i, 4i+4) of word [r, t] (GPTQ's qweight), computed here with Python ints."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (20, 3), generator=g)  # 20 inputs: the last word half empty
    packed = codec.pack_int4_dictionary(codes)
    assert packed.dtype == torch.int32 and packed.shape == (3, 3)
    for r in range(3):
        for t in range(3):
            word = sum(int(codes[8 * r + i, t]) << (4 * i) for i in range(8) if 8 * r + i < 20)
            assert int(packed[r, t]) & 0xFFFFFFFF == word
    assert torch.equal(codec.unpack_int4_dictionary(packed, 20), codes.to(torch.int32))


def test_int4_dictionary_dequantizes_per_group():
    """(code − 8) · the scale of the input's group of 128, for in = 200 (a partial last group)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (200, 5), generator=g)
    scales = torch.rand(2, 5, generator=g).to(torch.float16)
    dense = codec.dequantize_dictionary({fmt.DICTIONARY: codec.pack_int4_dictionary(codes), fmt.DICTIONARY_SCALES: scales}, 200)
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
    approx = (codec.dequantize_dictionary(result.tensors, 200).double()
              @ codec.decode_coefficients(result.tensors[fmt.COEF_MASK], result.tensors[fmt.COEF_VALUES],
                                        result.tensors[fmt.COEF_SCALES], k).double())
    delta = weight.double().T - approx
    error = ((delta.T @ gram @ delta).trace() / (weight.double() @ gram @ weight.double().T).trace()).sqrt()
    assert abs(float(error) - result.whitened_rel_error) <= 1e-3 * result.whitened_rel_error
    int8_dictionary = compress_linear(weight, gram, ratio, LayerSettings(value_dtype=value_dtype, dictionary_dtype="int8",
                                                                         iterations=2))
    assert k > int8_dictionary.shape.k


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_with_int4_dictionary_matches_float64(act_dtype, value_dtype):
    """The kernel seam on a merged 3-shard layer with a 4-bit D (in = 48: one partial group): float64 dense math of
    the stored codes and scales is the reference; D is held as stored (4 bits) and given back bit-identical."""
    g = torch.Generator().manual_seed(51 + len(value_dtype))
    tensors = merged_layer_tensors(value_dtype, g, dictionary_dtype="int4")
    dense = reference_weight_t(tensors, 48)  # D decoded bit by bit, not by the codec
    layer = HeldLayer.of(tensors)
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, fmt.VALUE_DTYPES[value_dtype], torch.int32),
                           "cpu")  # the C++ x·D (vLLM's W4A16 kernel: tests/test_cpu_wna16.py)
    kernel.process_weights_after_loading(layer)
    assert layer.dictionary.dtype == torch.int32 and layer.dictionary.shape == (6, tensors[fmt.DICTIONARY].shape[1])
    stored = kernel.stored_tensors(layer)
    for name in (fmt.DICTIONARY, fmt.DICTIONARY_SCALES):
        assert stored[name].equal(tensors[name]), name
    bound = 1e-5 if act_dtype == torch.float32 else 3e-2
    assert_kernel_matches_float64(kernel, layer, dense, act_dtype, g, bound)


@pytest.mark.parametrize("variant", ["llama", "qwen2-shared"])
def test_transformers_logits_match_dense_rebuild(int4_dictionary_checkpoints, variant):
    checkpoint = int4_dictionary_checkpoints[variant]
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["dictionary_dtype"] == "int4"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert_logits_match_dense_rebuild(model, checkpoint, seed=8)


def test_save_pretrained_round_trips_int4_dictionary(int4_dictionary_checkpoints, tmp_path):
    assert_save_pretrained_round_trips(int4_dictionary_checkpoints["qwen2-shared"], tmp_path)


def test_check_names_a_bad_grouped_scale(int4_dictionary_checkpoints, tmp_path):
    name = "model.layers.0.self_attn.q_proj.dictionary_scales"
    cases = {
        "shape": (lambda t: t.__setitem__(name, t[name][:1].contiguous()), f"tensor {name} has shape"),
        "dtype": (lambda t: t.__setitem__(name, t[name].float()), f"tensor {name} has dtype float32"),
        "packed": (lambda t: t.__setitem__(name[: -len("_scales")], t[name[: -len("_scales")]][:-1].contiguous()),
                   f"tensor {name[: -len('_scales')]} has shape"),
    }
    assert check_checkpoint(int4_dictionary_checkpoints["llama"]) == []
    for case, (edit, needle) in cases.items():
        problems = check_checkpoint(_edit_tensors(int4_dictionary_checkpoints["llama"], tmp_path / case, edit))
        assert any(needle in p for p in problems), (case, problems)


@pytest.mark.slow
def test_vllm_serves_int4_dictionary(int4_dictionary_checkpoints):
    """vLLM (CPU) on the all-4-bit shared Qwen2: TP = 1 gives the greedy tokens of transformers on the dense rebuild,
    TP = 2 the same tokens as TP = 1 (D split by atoms with its group scales in q/k/v and gate/up, by input rows in
    whole groups of 128 in o / down)."""
    assert_vllm_matches_dense_rebuild(int4_dictionary_checkpoints["qwen2-shared"], tensor_parallel=(1, 2))


@pytest.mark.slow
def test_vllm_holds_the_dictionary_in_4_bits(int4_dictionary_checkpoints):
    """Every vLLM layer holds its dictionary as stored: int32 words of 8 codes (in·k/2 bytes) beside float16 group
    scales, one copy per shared group; the compressed layers hold no more than their stored bytes + 10 %."""
    from cospadi_vllm.memory import run_isolated

    checkpoint = int4_dictionary_checkpoints["qwen2-shared"]
    modules = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["modules"]
    layers = run_isolated(checkpoint, "float32", tp=1)["ranks"][0]["cospadi_layers"]
    assert len(layers) == 8
    for name, layer in layers.items():
        assert layer["dictionary_dtype"] == "int32", (name, layer)
    atoms = sum(modules[f"model.layers.0.self_attn.{m}"]["k"] for m in ("q_proj", "k_proj", "v_proj"))
    assert layers["model.layers.0.self_attn.qkv_proj"]["dictionary_bytes"] == 256 * atoms // 2  # 4 bits per entry
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        first, second = layers[f"model.layers.0.{fused}"], layers[f"model.layers.1.{fused}"]
        assert first["dictionary_data_ptr"] == second["dictionary_data_ptr"], fused
    held, stored = (sum(layer[key] for layer in layers.values()) for key in ("held_bytes", "stored_bytes_tp1"))
    assert held <= 1.10 * stored, (held, stored)
