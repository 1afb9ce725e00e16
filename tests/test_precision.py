"""Per-layer storage types (``--value-dtype auto`` / ``--dictionary-dtype auto``): the precision search against each
candidate compressed on its own, the format's per-module types, and a mixed checkpoint in transformers, ``check``
and vLLM against its dense rebuild."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import cospadi_vllm  # noqa: F401  (registers the transformers quantizer)
from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.check import check_checkpoint
from offline_compress.layer import LayerSettings, compress_linear
from offline_compress.options import CompressError, CompressOptions, validate_options
from offline_compress.precision import compress_fused, output_energy, precision_candidates
from tests.test_compressor import synthetic_layer
from tests.test_int8_dictionary import assert_logits_match_dense_rebuild
from tests.vllm_helpers import assert_vllm_matches_dense_rebuild


def _fused_layer() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two modules reading one input (as gate / up): weights [384, 64] and [192, 64], their Gram [64, 64]."""
    weight, gram = synthetic_layer("decaying")
    other = torch.randn(192, 64, generator=torch.Generator().manual_seed(8)) * 0.05
    return [weight, other], gram


def _stored_error(weights, gram, results) -> float:
    """Energy-weighted relative output error of the stored tensors, in float64: √(Σ‖X(A_i − Â_i)‖² / Σ‖X A_i‖²)."""
    gram = gram.double()
    num = den = 0.0
    for weight, result in zip(weights, results, strict=True):
        delta = weight.double().T - codec.reconstruct_weight_t(result.tensors, result.shape.k).double()
        num += float((delta.T @ gram @ delta).trace())
        den += float((weight.double() @ gram @ weight.double().T).trace())
    return (num / den) ** 0.5


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_precision_search_stores_the_best_pair(ratio):
    """With both types ``auto`` and the closed-form structures, the modules of one fused layer are stored in the pair
    whose own compression (each candidate run alone through ``compress_linear``) has the lowest output error, all in
    the same types, each within its byte budget; the stored tensors' dtypes are that pair's."""
    weights, gram = _fused_layer()
    settings = LayerSettings(value_dtype="auto", dictionary_dtype="auto", k_over_s=(), iterations=2)
    results = compress_fused(weights, gram, [ratio, ratio], settings)
    errors = {}
    for candidate in precision_candidates(settings):
        alone = [compress_linear(w, gram, ratio, candidate) for w in weights]
        errors[(candidate.value_dtype, candidate.dictionary_dtype)] = _stored_error(weights, gram, alone)
    chosen = {(r.value_dtype, r.dictionary_dtype) for r in results}
    assert len(chosen) == 1 and len(errors) == 4
    pair = chosen.pop()
    assert errors[pair] <= min(errors.values()) * (1 + 1e-3), (pair, errors)
    assert abs(_stored_error(weights, gram, results) - errors[pair]) <= 1e-3 * errors[pair]
    value_dtype, dictionary_dtype = pair
    for weight, result in zip(weights, results, strict=True):
        specs = result.shape.tensor_specs(fmt.VALUE_DTYPES[value_dtype], fmt.DICTIONARY_TYPES[dictionary_dtype].dtype)
        assert {n: (tuple(t.shape), t.dtype) for n, t in result.tensors.items()} == specs
        assert fmt.stored_bytes(result.shape, value_dtype, dictionary_dtype_name=dictionary_dtype) \
            <= (1 - ratio) * fmt.dense_bf16_bytes(*weight.shape[::-1])
        assert any(name.startswith("precision: ") for name in result.candidates)


def test_output_energy_is_the_output_norm():
    weights, gram = _fused_layer()
    x = torch.linalg.cholesky(gram).T  # XᵀX = gram
    assert abs(output_energy(weights[0], gram) - float((x @ weights[0].double().T).norm() ** 2)) \
        <= 1e-9 * output_energy(weights[0], gram)


def test_forced_types_skip_the_precision_search():
    weights, gram = _fused_layer()
    settings = LayerSettings(value_dtype="int4", dictionary_dtype="int8", k_over_s=(), iterations=2)
    results = compress_fused(weights, gram, [0.4, 0.4], settings)
    alone = [compress_linear(w, gram, 0.4, settings) for w in weights]
    for fused, single in zip(results, alone, strict=True):
        assert all(fused.tensors[n].equal(single.tensors[n]) for n in single.tensors)
        assert not any(name.startswith("precision: ") for name in fused.candidates)


@pytest.mark.parametrize("options, needle", [
    ({"method": "svd-llm"}, "needs --method cospadi"),
    ({"group_size": 2}, "--group-size"),
    ({"allocation": "sensitivity"}, "--allocation sensitivity"),
])
def test_auto_types_refuse_what_they_do_not_support(options, needle):
    with pytest.raises(CompressError, match=needle):
        validate_options(CompressOptions(dictionary_dtype="auto", **options))


@pytest.fixture(scope="module")
def mixed_checkpoint(tiny_models, calib_file, tmp_path_factory):
    """Tiny Qwen2 (q/k/v biases) compressed with both types ``auto`` at CR 0.6, closed-form structures."""
    from offline_compress.pipeline import compress_model

    out = tmp_path_factory.mktemp("cospadi-precision") / "qwen2"
    options = CompressOptions(ratio=0.6, fast=True, iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                              value_dtype="auto", dictionary_dtype="auto")
    compress_model(tiny_models["qwen2"], out, options, log=lambda m: None)
    return out


def _module_types(checkpoint) -> dict[str, tuple[str, str]]:
    qc = fmt.parse_quantization_config(json.loads((checkpoint / "config.json").read_text())["quantization_config"])
    return {name: (spec["value_dtype"], spec["dictionary_dtype"]) for name, spec in qc["modules"].items()}


def test_mixed_checkpoint_in_transformers(mixed_checkpoint):
    """The search stored more than one pair of types here; every module holds the types its entry names, fused
    modules the same ones, and the logits are those of the dense rebuild (`check` clean)."""
    types = _module_types(mixed_checkpoint)
    assert len(set(types.values())) >= 2, types
    for name, pair in types.items():
        parent, _, leaf = name.rpartition(".")
        assert all(types[f"{parent}.{m}"] == pair for m in fmt.fused_group(leaf)), name
    model = AutoModelForCausalLM.from_pretrained(mixed_checkpoint, dtype=torch.float32).eval()
    for name, (value_dtype, dictionary_dtype) in types.items():
        module = model.get_submodule(name)
        assert module.coef_values.dtype == fmt.VALUE_DTYPES[value_dtype], name
        assert module.dictionary.dtype == fmt.DICTIONARY_TYPES[dictionary_dtype].dtype, name
    assert_logits_match_dense_rebuild(model, mixed_checkpoint, seed=9)


def test_format_refuses_fused_modules_of_different_types(mixed_checkpoint):
    qc = json.loads((mixed_checkpoint / "config.json").read_text())["quantization_config"]
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    other = "int4" if _module_types(mixed_checkpoint)[k][1] == "int8" else "int8"
    edited = {**qc, "modules": {**qc["modules"], k: {**qc["modules"][k], "dictionary_dtype": other}}}
    with pytest.raises(fmt.FormatError, match=f"{q} and {k} store .* vLLM fuses them"):
        fmt.parse_quantization_config(edited)


def test_check_names_a_module_entry_that_disagrees_with_its_tensors(mixed_checkpoint, tmp_path):
    """A module's entry naming other types than its tensors hold: `check` names the tensor."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(mixed_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    name = "model.layers.1.self_attn.o_proj"
    entry = config["quantization_config"]["modules"][name]
    value_dtype = _module_types(mixed_checkpoint)[name][0]
    entry["value_dtype"] = "int4" if value_dtype == "int8" else "int8"
    (broken / "config.json").write_text(json.dumps(config))
    problems = check_checkpoint(broken)
    assert any(f"tensor {name}.coef_values has" in p for p in problems), problems


@pytest.mark.slow
def test_vllm_serves_a_mixed_checkpoint(mixed_checkpoint):
    """vLLM (CPU) at TP = 1 gives the greedy tokens of transformers on the dense rebuild, TP = 2 the same as TP = 1;
    each layer holds its dictionary and values in its own stored types."""
    from cospadi_vllm.memory import run_isolated

    assert_vllm_matches_dense_rebuild(mixed_checkpoint, tensor_parallel=(1, 2))
    types = _module_types(mixed_checkpoint)
    layers = run_isolated(mixed_checkpoint, "float32", tp=1)["ranks"][0]["cospadi_layers"]
    assert len(layers) == 8
    for name, layer in layers.items():
        parent, _, fused = name.rpartition(".")
        value_dtype, dictionary_dtype = types[f"{parent}.{fmt.FUSED_MODULES.get(fused, (fused,))[0]}"]
        held = {"int8": "int8", "int4": "int32"}[dictionary_dtype]  # a 4-bit D: GPTQ's int32 words
        assert layer["dictionary_dtype"] == held, (name, layer)
        assert layer["values_dtype"] == {"int8": "int8", "int4": "uint8"}[value_dtype], (name, layer)


def test_precision_candidates_cover_what_auto_leaves_open():
    base = LayerSettings(value_dtype="int8", dictionary_dtype="auto")
    assert [(c.value_dtype, c.dictionary_dtype) for c in precision_candidates(base)] == [("int8", "int8"), ("int8", "int4")]
    assert precision_candidates(replace(base, dictionary_dtype="int4")) == [replace(base, dictionary_dtype="int4")]
