"""int8 dictionaries (one float32 scale per atom): the format, the compressor, the CPU kernel, transformers,
``check`` and vLLM, each against an independent reference (float64 dense math, the dense rebuild)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import cospadi_vllm  # noqa: F401  (registers the transformers quantizer)
from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.check import check_checkpoint
from cospadi_vllm.kernels import KernelConfig, choose_kernel
from offline_compress.layer import LayerSettings, compress_linear
from offline_compress.reader import load_reconstructed_model
from tests.reference import HeldLayer, assert_kernel_matches_float64, merged_layer_tensors, reference_weight_t
from tests.test_compressor import synthetic_layer
from tests.test_hf_quantizer import assert_save_pretrained_round_trips
from tests.vllm_helpers import assert_vllm_matches_dense_rebuild

LOGITS_RTOL = 1e-4


@pytest.mark.parametrize("in_features", [48, 40])  # 40: not a multiple of the C++ x·D's 16-row chunks
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", sorted(fmt.VALUE_DTYPES))
def test_cpu_kernel_with_int8_dictionary_matches_float64(value_dtype, act_dtype, in_features):
    g = torch.Generator().manual_seed(31 + in_features + len(value_dtype))
    tensors = merged_layer_tensors(value_dtype, g, in_features=in_features, dictionary_dtype="int8")
    dense = reference_weight_t(tensors, in_features)  # int8 atoms times their scales, times C
    layer = HeldLayer.of(tensors)
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, tensors[fmt.COEF_VALUES].dtype, torch.int8))
    kernel.process_weights_after_loading(layer)
    # held as stored ([in, K], 1 byte per entry, never widened): the C++ x·D reads the codes along the atoms
    assert layer.dictionary.dtype == torch.int8 and layer.dictionary.shape == tensors[fmt.DICTIONARY].shape
    stored = kernel.stored_tensors(layer)
    for name in (fmt.DICTIONARY, fmt.DICTIONARY_SCALES):
        assert stored[name].dtype == tensors[name].dtype and stored[name].equal(tensors[name]), name
    bound = 1e-5 if act_dtype == torch.float32 else 3e-2
    assert_kernel_matches_float64(kernel, layer, dense, act_dtype, g, bound)


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_compressed_layer_with_int8_dictionary(spectrum):
    """The stored layer: int8 atoms in [-127, 127] with positive float32 scales, stored bytes within the
    budget, and the reported whitened error is the one of the stored tensors (rebuilt in float64)."""
    weight, gram = synthetic_layer(spectrum)
    ratio = 0.3
    result = compress_linear(weight, gram, ratio, LayerSettings(dictionary_dtype="int8", iterations=2))
    dictionary, scales = result.tensors[fmt.DICTIONARY], result.tensors[fmt.DICTIONARY_SCALES]
    assert dictionary.dtype == torch.int8 and dictionary.shape == (weight.shape[1], result.shape.k)
    assert scales.dtype == torch.float32 and scales.shape == (result.shape.k,) and bool((scales > 0).all())
    assert int(dictionary.abs().max()) <= 127
    stored = fmt.stored_bytes(result.shape, "int8", dictionary_dtype_name="int8")
    assert stored <= (1 - ratio) * fmt.dense_bf16_bytes(*weight.shape[::-1])
    approx = codec.reconstruct_weight_t(result.tensors, result.shape.k).double()
    error = ((weight.double().T - approx).T @ gram.double() @ (weight.double().T - approx)).trace()
    reference = (weight.double() @ gram.double() @ weight.double().T).trace()
    assert abs(float((error / reference).sqrt()) - result.whitened_rel_error) <= 1e-3 * result.whitened_rel_error


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen2-shared"])
def test_transformers_logits_match_dense_rebuild(int8_checkpoints, variant):
    checkpoint = int8_checkpoints[variant]
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["dictionary_dtype"] == "int8"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    held = [m for m in model.modules() if type(m).__name__ == "CoSpaDiLinear" and m.owns_dictionary]
    assert held and all(m.dictionary.dtype == torch.int8 for m in held)
    assert_logits_match_dense_rebuild(model, checkpoint, seed=5)


def assert_logits_match_dense_rebuild(model, checkpoint, seed: int) -> None:
    """The loaded checkpoint's logits within LOGITS_RTOL of the dense rebuild's on random ids, and `check` clean."""
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = model(ids).logits.double()
        want = load_reconstructed_model(checkpoint)(ids).logits.double()
    assert float((got - want).abs().max() / want.abs().max()) <= LOGITS_RTOL
    assert check_checkpoint(checkpoint) == []


def test_save_pretrained_round_trips_int8_dictionary(int8_checkpoints, tmp_path):
    assert_save_pretrained_round_trips(int8_checkpoints["qwen2-shared"], tmp_path)


def _edit_tensors(source, target, edit):
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_check_names_a_bad_dictionary_scale(int8_checkpoints, tiny_checkpoints, tmp_path):
    prefix = "model.layers.0.mlp.down_proj"
    name = f"{prefix}.{fmt.DICTIONARY_SCALES}"
    cases = {
        "shape": (lambda t: t.__setitem__(name, t[name][:-1].contiguous()), f"tensor {name} has shape"),
        "dtype": (lambda t: t.__setitem__(name, t[name].to(torch.int32)), f"tensor {name} has dtype int32"),
        "missing": (lambda t: t.pop(name), f"missing tensor {name}"),
    }
    for case, (edit, needle) in cases.items():
        broken = _edit_tensors(int8_checkpoints["llama"], tmp_path / case, edit)
        problems = check_checkpoint(broken)
        assert any(needle in p for p in problems), (case, problems)
    # a bfloat16-dictionary checkpoint carrying scales no reader would load
    stray = _edit_tensors(tiny_checkpoints["llama"], tmp_path / "stray",
                          lambda t: t.__setitem__(name, torch.rand(t[f"{prefix}.dictionary"].shape[1])))
    assert any(f"tensor {name} is stored, but a bfloat16 dictionary has none" in p for p in check_checkpoint(stray))


@pytest.mark.slow
def test_vllm_serves_int8_dictionary(int8_checkpoints):
    """vLLM (CPU) at TP = 1 gives the greedy tokens of transformers on the dense rebuild. (Shared int8 dictionaries
    at TP = 1 and TP = 2 — atoms and their scales split by atoms in q/k/v and gate/up, by input rows in o/down,
    one dictionary per group — run in tests/test_int4_values.py, on the stacked checkpoint with int4 values.)"""
    assert_vllm_matches_dense_rebuild(int8_checkpoints["llama"], tensor_parallel=(1,))
