"""Cross-layer dictionary sharing (--group-size) and sensitivity allocation (--allocation sensitivity).

References: dense float64 math on the stored tensors, transformers on the dense rebuild, vLLM as served.
"""

import json
from pathlib import Path

import pytest
import torch

import cospadi_vllm  # noqa: F401  (registers the transformers quantizer)
from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.check import check_checkpoint
from offline_compress import allocation
from offline_compress.budget import solve_k_s
from offline_compress.layer import LayerSettings, compress_linear, compress_shared
from offline_compress.options import DEFAULT_GROUP_TARGETS, CompressError, CompressOptions
from offline_compress.pipeline import compress_model
from tests.test_compressor import read_all

SHARED = [t.rsplit(".", 1)[1] for t in DEFAULT_GROUP_TARGETS]  # q k v gate up


def compressed_bytes_ratio(checkpoint: Path) -> float:
    """1 − (bytes of every compressed tensor in the safetensors) / (the same modules dense in bf16)."""
    tensors = read_all(checkpoint)
    modules = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["modules"]
    stored = sum(t.numel() * t.element_size() for name, t in tensors.items()
                 if name.rpartition(".")[0] in modules and name.rpartition(".")[2] in fmt.TENSOR_SUFFIXES)
    dense = 0
    for name in modules:
        in_features = tensors[f"{fmt.dictionary_owner(modules, name)}.dictionary"].shape[0]
        dense += 2 * in_features * tensors[f"{name}.coef_scales"].shape[0]
    return 1.0 - stored / dense


@pytest.fixture(scope="module")
def grouped(tiny_models, calib_file, tmp_path_factory):
    """Tiny Llama (2 layers) with G = 2: one group, q/k/v/gate/up shared, o/down per layer."""
    out = tmp_path_factory.mktemp("grouped") / "llama-g2"
    options = CompressOptions(ratio=0.3, iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                              group_size=2, dictionary_dtype="bfloat16")
    report = compress_model(tiny_models["llama"], out, options, log=lambda m: None)
    return out, report


def test_grouped_checkpoint_stores_each_shared_dictionary_once(grouped):
    out, report = grouped
    tensors = read_all(out)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    dictionaries = sorted(name for name in tensors if name.endswith(".dictionary"))
    per_layer = [f"model.layers.{i}.{kind}.dictionary" for i in (0, 1) for kind in ("self_attn.o_proj", "mlp.down_proj")]
    shared = [f"model.layers.0.{t}.dictionary" for t in DEFAULT_GROUP_TARGETS]
    assert dictionaries == sorted(per_layer + shared)  # 9 tensors where per-layer compression stores 14
    for target in DEFAULT_GROUP_TARGETS:
        member, owner = f"model.layers.1.{target}", f"model.layers.0.{target}"
        assert modules[member][fmt.SHARED_DICTIONARY_KEY] == owner
        assert fmt.SHARED_DICTIONARY_KEY not in modules[owner]
        assert modules[member]["k"] == modules[owner]["k"]
        assert report["modules"][member]["bytes_stored"] < report["modules"][owner]["bytes_stored"]
    # Real bytes in the files, the shared dictionary counted once: within 1 % of the target.
    assert abs(compressed_bytes_ratio(out) - 0.3) <= 0.01
    assert abs(report["totals"]["compression_ratio_actual"] - compressed_bytes_ratio(out)) < 1e-9
    assert check_checkpoint(out) == []


def test_grouped_checkpoint_in_transformers_shares_one_tensor(grouped):
    from transformers import AutoModelForCausalLM

    from offline_compress.reader import load_reconstructed_model

    out, _ = grouped
    for dtype in (torch.bfloat16, torch.float32):  # bf16 on CPU: the owner's D is held transposed, once
        model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        for target in DEFAULT_GROUP_TARGETS:
            first, second = (model.get_submodule(f"model.layers.{i}.{target}") for i in (0, 1))
            assert first.dictionary.data_ptr() == second.dictionary.data_ptr()
            assert f"model.layers.1.{target}.dictionary" not in model.state_dict()
        down = [model.model.layers[i].mlp.down_proj.dictionary.data_ptr() for i in (0, 1)]
        assert down[0] != down[1]
    ids = torch.randint(0, 49152, (2, 19), generator=torch.Generator().manual_seed(7))
    rebuilt = load_reconstructed_model(out)
    with torch.no_grad():
        got, want = model(ids).logits.double(), rebuilt(ids).logits.double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_shared_dictionary_reference_errors_name_both_modules(grouped, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out, _ = grouped
    owner, member = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    # The owner's dictionary tensor is missing.
    broken = tmp_path / "no-owner-dictionary"
    shutil.copytree(out, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors[f"{owner}.dictionary"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    problems = check_checkpoint(broken)
    assert any(member in p and f"{owner}.dictionary" in p for p in problems), problems
    with pytest.raises(fmt.FormatError, match=f"missing tensor {owner}.dictionary \\(shared by {member}\\)"):
        AutoModelForCausalLM.from_pretrained(broken)
    # The reference names a module that is not compressed.
    dangling = tmp_path / "dangling"
    shutil.copytree(out, dangling)
    config = json.loads((dangling / "config.json").read_text())
    config["quantization_config"]["modules"][member]["dictionary"] = "model.layers.0.mlp.nowhere"
    (dangling / "config.json").write_text(json.dumps(config))
    problems = check_checkpoint(dangling)
    assert len(problems) == 1 and member in problems[0] and "model.layers.0.mlp.nowhere" in problems[0], problems
    # Fused modules must share together: gate sharing layer 0's, up its own, is refused.
    split = tmp_path / "split"
    shutil.copytree(out, split)
    config = json.loads((split / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.1.mlp.gate_proj"]["dictionary"] = "model.layers.0.mlp.up_proj"
    (split / "config.json").write_text(json.dumps(config))
    assert any("fuses" in p and "model.layers.1.mlp" in p for p in check_checkpoint(split))


def test_group_options_are_checked(tiny_models, tmp_path):
    with pytest.raises(CompressError, match="vLLM fuses self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"):
        compress_model(tiny_models["llama"], tmp_path / "x", CompressOptions(group_size=2, group_targets=("self_attn.q_proj",)))
    with pytest.raises(CompressError, match="--group-size must be >= 1"):
        compress_model(tiny_models["llama"], tmp_path / "x", CompressOptions(group_size=0))
    with pytest.raises(CompressError, match="--allocation must be one of"):
        compress_model(tiny_models["llama"], tmp_path / "x", CompressOptions(allocation="magic"))
    assert not (tmp_path / "x").exists()


def _layer_and_gram(generator, out_features=96, in_features=64, tokens=400):
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, in_features,
                                                                                                     dtype=torch.float64)
    return weight, x.T @ x


def _whitened_error_f64(weight, tensors, k, gram):
    """‖X(A − DC)‖ / ‖XA‖ from the stored tensors, by Cholesky of the Gram (float64)."""
    factor = torch.linalg.cholesky(gram)
    approx = tensors[fmt.DICTIONARY].double() @ codec.decode_coefficients(
        tensors[fmt.COEF_MASK], tensors[fmt.COEF_VALUES], tensors[fmt.COEF_SCALES], k).double()
    target = weight.T.double()
    return float((factor.T @ (target - approx)).norm() / (factor.T @ target).norm())


def test_compress_shared_errors_per_layer_and_sharing_pays_on_similar_layers():
    generator = torch.Generator().manual_seed(11)
    settings = LayerSettings(iterations=4, k_over_s=(2.0,))
    base, gram_a = _layer_and_gram(generator)
    # Two "similar projections": the same weight up to a small perturbation, different calibration Grams.
    other = base + 0.05 * torch.randn(base.shape, generator=generator) / base.shape[1] ** 0.5
    _, gram_b = _layer_and_gram(generator)
    results = compress_shared([base, other], [gram_a, gram_b], 0.3, settings)
    assert fmt.DICTIONARY in results[0].tensors and fmt.DICTIONARY not in results[1].tensors
    dictionary = results[0].tensors[fmt.DICTIONARY]
    for weight, gram, result in zip([base, other], [gram_a, gram_b], results, strict=True):
        tensors = {**result.tensors, fmt.DICTIONARY: dictionary}
        found = {f"x.{suffix}": (t.dtype, tuple(t.shape)) for suffix, t in tensors.items()}
        assert fmt.layer_problems("x", found, result.shape, torch.int8) == []
        assert result.whitened_rel_error == pytest.approx(_whitened_error_f64(weight, tensors, result.shape.k, gram),
                                                          rel=1e-4)
    # Bytes: the group counts the dictionary once and stays within the budget of the two layers.
    stored = fmt.stored_bytes(results[0].shape, "int8") + fmt.stored_bytes(results[1].shape, "int8", owns_dictionary=False)
    dense = 2 * fmt.dense_bf16_bytes(64, 96)
    assert 0.3 <= 1 - stored / dense <= 0.31
    # On near-identical layers one shared dictionary (paid once, so larger) beats one per layer.
    alone = [compress_linear(w, g, 0.3, settings) for w, g in ((base, gram_a), (other, gram_b))]
    assert results[0].shape.k > alone[0].shape.k
    assert sum(r.whitened_rel_error for r in results) < sum(r.whitened_rel_error for r in alone)


def test_allocation_error_curve_and_budget():
    generator = torch.Generator().manual_seed(5)
    units = []
    for i, (out_features, decay) in enumerate([(96, 0.3), (64, 3.0), (128, 1.0)]):
        weight = torch.randn(out_features, 64, generator=generator, dtype=torch.float64)
        weight = weight * torch.arange(1, 65, dtype=torch.float64) ** -decay  # spectra decaying at different rates
        factor = torch.linalg.cholesky(_layer_and_gram(generator, out_features)[1])
        units.append(allocation.spectrum(f"unit{i}", weight.float(), factor))
        # e(r)² against a direct truncated SVD of the whitened target, float64.
        whitened = factor.T @ weight.T
        u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
        for ratio, err in zip([0.2, 0.5], allocation.error_curve(units[-1], [0.2, 0.5], "int8"), strict=True):
            rank = solve_k_s(64, out_features, ratio, 1.0, "int8", dense_coefficients=True).k
            truncated = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
            assert err == pytest.approx(float((whitened - truncated).square().sum() / whitened.square().sum()), rel=1e-3)
    ratios = allocation.allocate(units, 0.3, "int8")
    dense = {u.key: u.dense_bytes for u in units}
    saved = sum(ratios[k] * dense[k] for k in ratios) / sum(dense.values())
    assert 0.3 <= saved <= 0.3 + allocation.STEP * max(dense.values()) / sum(dense.values()) + 1e-9
    # The flat spectrum (decay 0.3) gets more bytes than the steep one (decay 3.0)...
    assert ratios["unit0"] < 0.3 < ratios["unit1"]

    # ...and the proxy objective is no worse than the uniform split's.
    def objective(choice):
        return sum(allocation.error_curve(u, [choice[u.key]], "int8")[0] for u in units)

    assert objective(ratios) < objective({u.key: 0.3 for u in units})


def test_sensitivity_allocation_keeps_total_bytes(tiny_models, calib_file, tmp_path):
    out = tmp_path / "sens"
    options = CompressOptions(ratio=0.3, iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                              allocation="sensitivity", group_size=2)
    report = compress_model(tiny_models["qwen2"], out, options, log=lambda m: None)
    assert abs(compressed_bytes_ratio(out) - 0.3) <= 0.01
    planned = report["allocation"]
    assert len(set(planned.values())) > 1  # not the uniform split
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert sum(fmt.SHARED_DICTIONARY_KEY in spec for spec in modules.values()) == len(SHARED)
    assert check_checkpoint(out) == []


@pytest.mark.slow
def test_vllm_serves_grouped_checkpoint_with_one_dictionary_per_group(grouped, tmp_path):
    from cospadi_vllm.memory import run_isolated
    from tests.test_vllm_plugin import compare_with_hf

    out, _ = grouped
    compare_with_hf(out)  # greedy tokens and prompt logprobs vs transformers on the dense rebuild
    layers = run_isolated(out, "float32", tp=1)["ranks"][0]["cospadi_layers"]
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        first, second = layers[f"model.layers.0.{fused}"], layers[f"model.layers.1.{fused}"]
        assert first["dictionary_numel"] > 0 and first["dictionary_data_ptr"] == second["dictionary_data_ptr"]
        assert second["held_bytes"] < first["held_bytes"]
    for own in ("self_attn.o_proj", "mlp.down_proj"):
        assert layers[f"model.layers.0.{own}"]["dictionary_data_ptr"] != layers[f"model.layers.1.{own}"]["dictionary_data_ptr"]
    # bf16 on CPU: the dictionary is transposed once, at its owner; the group's layers share that tensor.
    layers = run_isolated(out, "bfloat16", tp=1)["ranks"][0]["cospadi_layers"]
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        first, second = layers[f"model.layers.0.{fused}"], layers[f"model.layers.1.{fused}"]
        assert first["dictionary_numel"] > 0 and first["dictionary_data_ptr"] == second["dictionary_data_ptr"]


@pytest.mark.slow
def test_vllm_names_both_modules_when_a_shared_dictionary_is_missing(grouped, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.vllm_helpers import run_vllm

    out, _ = grouped
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.dictionary"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_vllm(broken)
    assert "model.layers.1.self_attn.k_proj" in result["error"]
    assert "model.layers.0.self_attn.k_proj.dictionary" in result["error"]


def test_ratio_is_a_ceiling_not_a_quota():
    """Stacked groups are wide ([in, G·out]): at a low ratio SVD's full rank (k = in) fits with bytes to
    spare and its only error is rounding. It is a candidate like any other: the stored structure fits the
    budget and is no worse than full-rank SVD-LLM; where full rank wins, the layer is smaller than asked."""
    generator = torch.Generator().manual_seed(3)
    weight, gram = _layer_and_gram(generator, out_features=192, in_features=64)
    svd = solve_k_s(64, 192, 0.05, 1.0, "int8", dense_coefficients=True)
    dense = fmt.dense_bf16_bytes(64, 192)
    assert svd.k == 64 and 1 - fmt.stored_bytes(svd, "int8") / dense > 0.06  # full rank leaves bytes unused
    result = compress_linear(weight, gram, 0.05, LayerSettings(iterations=2))
    baseline = compress_linear(weight, gram, 0.05, LayerSettings(method="svd-llm"))
    assert 1 - fmt.stored_bytes(result.shape, "int8") / dense >= 0.05
    assert result.whitened_rel_error <= baseline.whitened_rel_error * (1 + 1e-9)
    assert "svd" in result.candidates
    for name in ("k/s=1.5", "k/s=2"):  # every k/s was a candidate: trialled, or skipped on its estimate
        assert {f"{name} trial", f"{name} estimate"} & set(result.candidates), result.candidates
