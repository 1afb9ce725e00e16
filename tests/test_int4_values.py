"""int4 coefficient values (two per byte, one scale per output column): the packing, the compressor, the kernel
seam, transformers, ``check`` and vLLM, each against an independent reference (float64 dense math of the stored
numbers, the dense rebuild)."""

from __future__ import annotations

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
from offline_compress.quantization import feedback_codes, quantize_values
from tests.reference import HeldLayer, assert_kernel_matches_float64, merged_layer_tensors, reference_weight_t
from tests.test_compressor import synthetic_layer
from tests.test_hf_quantizer import assert_save_pretrained_round_trips
from tests.test_int8_dictionary import _edit_tensors, assert_logits_match_dense_rebuild
from tests.vllm_helpers import assert_vllm_matches_dense_rebuild


def test_int4_layout_is_low_nibble_first_twos_complement():
    codes = torch.tensor([[1, -1, 7, -7, 0], [-3, 2, 0, 0, 5]], dtype=torch.int8)
    packed = codec.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert packed.tolist() == [[0xF1, 0x97, 0x00], [0x2D, 0x00, 0x05]]  # -1 = 0xF, -7 = 0x9, -3 = 0xD
    assert codec.unpack_int4(packed, 5).equal(codes)


def test_int4_quantization_error_and_range():
    """Codes in [-7, 7] (-8 never written), odd s packed with a zero nibble; the searched clipping scale never
    rounds a row worse than absmax / 7 does (computed here directly), and on Gaussian rows clearly better."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(32, 401, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 32, dtype=torch.float64)[:, None]
    packed, scales = quantize_values(values, "int4")
    assert packed.shape == (32, 201) and packed.dtype == torch.uint8
    assert int((packed[:, -1] >> 4).max()) == 0
    nibbles = torch.stack((packed & 0xF, packed >> 4), 2).reshape(32, -1)[:, :401]
    assert not bool((nibbles == 8).any())
    error = ((codec.dequantize_values(packed, scales, 401).double() - values) ** 2).sum(1)
    step = values.abs().amax(1, keepdim=True) / 7
    absmax_error = (((values / step).round() * step - values) ** 2).sum(1)
    assert bool((error <= absmax_error * (1 + 1e-5)).all())
    assert float((error / absmax_error).mean()) < 0.8


@pytest.mark.parametrize("shared_factor", [False, True])
def test_feedback_rounding_lowers_the_whitened_error(shared_factor):
    """With correlated atoms (an over-complete dictionary), rounding with error feedback through each column's
    atoms gives a lower ‖D·(c − q)‖ than rounding to nearest at the same scales, on every column in sum and on
    most columns one by one; the codes stay integers in [-7, 7]. Reference: float64 products of the codes. Over one
    shared factor (codes off the support held at zero) still lower than to nearest, but above the per-column one."""
    g = torch.Generator().manual_seed(11)
    n, k, out, s = 24, 64, 96, 20
    dictionary = torch.randn(n, k, generator=g, dtype=torch.float64)
    support = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(out)])
    values = torch.randn(out, s, generator=g, dtype=torch.float64)
    scales = values.abs().amax(1) / 7
    scaled = values / scales[:, None]
    feedback = feedback_codes(scaled, support, dictionary.T @ dictionary, 7.0, shared_factor=shared_factor)
    nearest = scaled.round()
    assert torch.equal(feedback, feedback.round()) and float(feedback.abs().max()) <= 7

    def errors(codes):
        delta = (scaled - codes) * scales[:, None]  # [out, s]
        return torch.stack([(dictionary[:, support[j]] @ delta[j]).norm() for j in range(out)])

    with_feedback, to_nearest = errors(feedback), errors(nearest)
    if not shared_factor:
        assert float(with_feedback.norm()) < 0.85 * float(to_nearest.norm())
        assert int((with_feedback < to_nearest).sum()) >= 0.7 * out
    else:  # a third of the atoms per column: the held codes' residuals cost most of the exact rounding's gain
        exact = errors(feedback_codes(scaled, support, dictionary.T @ dictionary, 7.0))
        assert float(exact.norm()) < float(with_feedback.norm()) < float(to_nearest.norm())


def test_shared_factor_rounding_is_exact_on_a_dense_support():
    """Where every column uses every atom (SVD's s = k) the shared factor is each column's own: the same codes as
    the per-column rounding, which differ from rounding to nearest."""
    g = torch.Generator().manual_seed(12)
    dictionary = torch.randn(40, 24, generator=g, dtype=torch.float64)
    scaled = torch.randn(50, 24, generator=g, dtype=torch.float64) * 4
    support = torch.arange(24).expand(50, 24)
    gram = dictionary.T @ dictionary
    exact = feedback_codes(scaled, support, gram, 7.0)
    assert torch.equal(feedback_codes(scaled, support, gram, 7.0, shared_factor=True), exact)
    assert not torch.equal(exact, scaled.round().clamp(-7, 7))


@pytest.mark.parametrize("dictionary_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_with_int4_values_matches_float64(act_dtype, dictionary_dtype):
    """The kernel seam (what vLLM and transformers call) on a merged 3-shard layer with odd s per shard: float64
    dense math of the stored nibbles is the reference; the values are held packed and come back bit-identical."""
    g = torch.Generator().manual_seed(41 + len(dictionary_dtype))
    tensors = merged_layer_tensors("int4", g, dictionary_dtype=dictionary_dtype)
    dense = reference_weight_t(tensors, 48)
    layer = HeldLayer.of(tensors)
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, torch.uint8, fmt.DICTIONARY_TYPES[dictionary_dtype].dtype))
    kernel.process_weights_after_loading(layer)
    # held as stored: the kernel reads the nibbles (unpacking a chunk of rows at a time, in cache)
    assert layer.coef_values.dtype == torch.uint8 and layer.coef_values.shape == tensors[fmt.COEF_VALUES].shape
    stored = kernel.stored_tensors(layer)
    assert stored[fmt.COEF_VALUES].dtype == torch.uint8 and stored[fmt.COEF_VALUES].equal(tensors[fmt.COEF_VALUES])
    bound = 1e-5 if act_dtype == torch.float32 else 3e-2
    assert_kernel_matches_float64(kernel, layer, dense, act_dtype, g, bound)


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_compressed_layer_with_int4_values(spectrum):
    """Stored: packed uint8 values [out, ceil(s/2)], bytes within the budget (int4 counted at half a byte), and the
    reported whitened error is the float64 error of the stored tensors."""
    weight, gram = synthetic_layer(spectrum)
    ratio = 0.5
    result = compress_linear(weight, gram, ratio, LayerSettings(value_dtype="int4", dictionary_dtype="int8", iterations=2))
    values = result.tensors[fmt.COEF_VALUES]
    assert values.dtype == torch.uint8 and values.shape == (weight.shape[0], (result.shape.s + 1) // 2)
    stored = fmt.stored_bytes(result.shape, "int4", dictionary_dtype_name="int8")
    assert stored == sum(t.numel() * t.element_size() for t in result.tensors.values())
    assert stored <= (1 - ratio) * fmt.dense_bf16_bytes(*weight.shape[::-1])
    approx = codec.reconstruct_weight_t(result.tensors, result.shape.k).double()
    error = ((weight.double().T - approx).T @ gram.double() @ (weight.double().T - approx)).trace()
    reference = (weight.double() @ gram.double() @ weight.double().T).trace()
    assert abs(float((error / reference).sqrt()) - result.whitened_rel_error) <= 1e-3 * result.whitened_rel_error


@pytest.mark.parametrize("variant", ["llama", "qwen2-shared"])
def test_transformers_logits_match_dense_rebuild(int4_checkpoints, variant):
    checkpoint = int4_checkpoints[variant]
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["value_dtype"] == "int4"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert_logits_match_dense_rebuild(model, checkpoint, seed=6)


def test_save_pretrained_round_trips_int4_values(int4_checkpoints, tmp_path):
    assert_save_pretrained_round_trips(int4_checkpoints["qwen2-shared"], tmp_path)


def test_check_names_unpacked_or_mis_shaped_int4_values(int4_checkpoints, tmp_path):
    name = "model.layers.0.mlp.down_proj.coef_values"
    cases = {
        "unpacked": (lambda t: t.__setitem__(name, codec.unpack_int4(t[name])), f"tensor {name} has"),
        "shape": (lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()), f"tensor {name} has shape"),
    }
    for case, (edit, needle) in cases.items():
        problems = check_checkpoint(_edit_tensors(int4_checkpoints["llama"], tmp_path / case, edit))
        assert any(needle in p for p in problems), (case, problems)


@pytest.mark.slow
def test_vllm_serves_int4_values(int4_checkpoints):
    """vLLM (CPU), stacked int8 dictionaries shared by two layers with int4 values: TP = 1 gives the greedy tokens
    of transformers on the dense rebuild, TP = 2 the same tokens as TP = 1 (packed value rows split with their
    outputs in q/k/v and gate/up; o/down split by input rows)."""
    assert_vllm_matches_dense_rebuild(int4_checkpoints["qwen2-shared"], tensor_parallel=(1, 2))


@pytest.mark.slow
def test_vllm_holds_stacked_layers_at_their_stored_bytes(int4_checkpoints):
    """The stacked checkpoint in vLLM: every layer holds its dictionary as int8 (one byte per entry) and its values
    as packed int4 (uint8, two per byte: the kernels read nibbles, nothing is unpacked at load), the two layers of a
    group hold one copy of D, and the compressed layers hold no more than their stored bytes + 10 % (a member of a
    group stores only coefficients, so the value padding of fused shards is counted over the group)."""
    from cospadi_vllm.memory import run_isolated

    layers = run_isolated(int4_checkpoints["qwen2-shared"], "float32", tp=1)["ranks"][0]["cospadi_layers"]
    assert len(layers) == 8
    for name, layer in layers.items():
        assert layer["dictionary_dtype"] == "int8", (name, layer)
        assert layer["dictionary_bytes"] == layer["dictionary_numel"] > 0, (name, layer)
        assert layer["values_dtype"] == "uint8", (name, layer)
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):  # shared by the group (o / down stay per layer)
        first, second = layers[f"model.layers.0.{fused}"], layers[f"model.layers.1.{fused}"]
        assert first["dictionary_data_ptr"] == second["dictionary_data_ptr"], fused
    held, stored = (sum(layer[key] for layer in layers.values()) for key in ("held_bytes", "stored_bytes_tp1"))
    assert held <= 1.10 * stored, (held, stored)
