"""The compressor end to end on tiny random Llama / Qwen2 / Qwen3 models."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cospadi_vllm import format as fmt
from offline_compress.options import CompressOptions
from offline_compress.pipeline import compress_model, compress_or_reuse
from offline_compress.reader import load_reconstructed_model, reconstructed_state_dict
from tests.conftest import TINY_ARCHS
from tests.test_format import python_unpack


def read_all(checkpoint_dir):
    tensors = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            tensors.update({name: fh.get_tensor(name) for name in fh.keys()})
    return tensors


@pytest.fixture(scope="module")
def compressed(tiny_models, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    result = {}
    for arch in TINY_ARCHS:
        for value_dtype in ("int8", "float8_e4m3fn", "bfloat16") if arch == "llama" else ("int8",):
            out = root / f"{arch}-{value_dtype}"
            options = CompressOptions(ratio=0.3, iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                                      value_dtype=value_dtype, dictionary_dtype="bfloat16")
            report = compress_model(tiny_models[arch], out, options, log=lambda m: None)
            result[(arch, value_dtype)] = (out, report)
    return result


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_checkpoint_layout_and_sparsity(compressed, tiny_models, arch):
    out, report = compressed[(arch, "int8")]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "cospadi" and qc["format_version"] == 1 and qc["value_dtype"] == "int8"
    assert len(qc["modules"]) == 2 * 7
    tensors = read_all(out)
    source = read_all(tiny_models[arch])
    for prefix, spec in qc["modules"].items():
        k, s = spec["k"], spec["s"]
        weight = source[f"{prefix}.weight"]
        out_f, in_f = weight.shape
        assert f"{prefix}.weight" not in tensors
        assert tensors[f"{prefix}.dictionary"].shape == (in_f, k) and tensors[f"{prefix}.dictionary"].dtype == torch.bfloat16
        assert tensors[f"{prefix}.coef_mask"].shape == (out_f, -(-k // 32)) and tensors[f"{prefix}.coef_mask"].dtype == torch.int32
        assert tensors[f"{prefix}.coef_values"].shape == (out_f, s) and tensors[f"{prefix}.coef_values"].dtype == torch.int8
        assert tensors[f"{prefix}.coef_scales"].shape == (out_f,) and tensors[f"{prefix}.coef_scales"].dtype == torch.float32
        rows = python_unpack(tensors[f"{prefix}.coef_mask"], k)
        assert all(len(row) == s for row in rows), "exactly s non-zeros per column"
        if f"{prefix}.bias" in source:  # Qwen2 q/k/v
            assert torch.equal(tensors[f"{prefix}.bias"], source[f"{prefix}.bias"])
    # uncompressed tensors carried over unchanged
    for name, tensor in source.items():
        if not any(name.startswith(p) for p in qc["modules"]):
            assert torch.equal(tensors[name], tensor), name
    for name in ("tokenizer.json", "compress_report.json"):
        assert (out / name).is_file()


@pytest.mark.parametrize("key", [("llama", "int8"), ("llama", "float8_e4m3fn"), ("llama", "bfloat16"), ("qwen2", "int8")])
def test_reconstruction_matches_float64_reference(compressed, key):
    """reader's dense Wᵀ equals D·C rebuilt independently (Python bit reading, float64)."""
    out, report = compressed[key]
    tensors = read_all(out)
    _, state = reconstructed_state_dict(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for prefix, spec in list(qc["modules"].items())[:4]:
        k = spec["k"]
        values = tensors[f"{prefix}.coef_values"].double() * tensors[f"{prefix}.coef_scales"].double()[:, None]
        coef = torch.zeros(k, values.shape[0], dtype=torch.float64)
        for j, atoms in enumerate(python_unpack(tensors[f"{prefix}.coef_mask"], k)):
            coef[atoms, j] = values[j]
        ref = tensors[f"{prefix}.dictionary"].double() @ coef
        assert torch.allclose(state[f"{prefix}.weight"].double().T, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", [("llama", "int8"), ("qwen3", "int8"), ("llama", "bfloat16")])
def test_ratio_counts_every_stored_byte(compressed, tiny_models, key):
    from transformers import AutoModelForCausalLM

    out, report = compressed[key]
    source = AutoModelForCausalLM.from_pretrained(tiny_models[key[0]])  # tied embeddings: counted once
    assert report["totals"]["model_bytes_dense_bf16"] == 2 * sum({id(p): p.numel() for p in source.parameters()}.values())
    tensors = read_all(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = sum(tensors[f"{p}.{sfx}"].numel() * tensors[f"{p}.{sfx}"].element_size()
                 for p in qc["modules"] for sfx in fmt.TENSOR_SUFFIXES if f"{p}.{sfx}" in tensors)
    dense = sum(2 * tensors[f"{p}.dictionary"].shape[0] * tensors[f"{p}.coef_scales"].shape[0] for p in qc["modules"])
    actual = 1 - stored / dense
    assert report["totals"]["bytes_stored"] == stored
    assert actual == pytest.approx(report["totals"]["compression_ratio_actual"])
    assert 0.3 <= actual <= 0.31
    assert 0 < report["totals"]["compression_ratio_model"] < actual


def test_reconstructed_model_equals_original_with_reference_weights(compressed, tiny_models):
    """The reader's model = the original HF model with each compressed weight swapped for D·C."""
    from transformers import AutoModelForCausalLM

    out, report = compressed[("qwen2", "int8")]
    model = load_reconstructed_model(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    tensors = read_all(out)
    with torch.no_grad():
        for prefix, stats in report["modules"].items():
            k = stats["k"]
            values = tensors[f"{prefix}.coef_values"].double() * tensors[f"{prefix}.coef_scales"].double()[:, None]
            coef = torch.zeros(k, values.shape[0], dtype=torch.float64)
            for j, atoms in enumerate(python_unpack(tensors[f"{prefix}.coef_mask"], k)):
                coef[atoms, j] = values[j]
            reference.get_submodule(prefix).weight.copy_((tensors[f"{prefix}.dictionary"].double() @ coef).T)
        ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(5))
        a, b = model(ids).logits, reference(ids).logits
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 1e-4
    errors = [m["whitened_rel_error"] for m in report["modules"].values()]
    assert all(0 < e < 1 for e in errors)


def test_svd_llm_is_dense_case_of_same_format(tiny_models, calib_file, tmp_path):
    out = tmp_path / "svd"
    report = compress_model(tiny_models["llama"], out, CompressOptions(method="svd-llm", calib=str(calib_file),
                                                                       calib_samples=4, seq_len=64), log=lambda m: None)
    tensors = read_all(out)
    for prefix, stats in report["modules"].items():
        assert stats["k"] == stats["s"]
        assert all(len(r) == stats["k"] for r in python_unpack(tensors[f"{prefix}.coef_mask"], stats["k"]))
    assert 0.3 <= report["totals"]["compression_ratio_actual"] <= 0.31


def test_resume_reuses_finished_layers(tiny_models, calib_file, tmp_path):
    """A run stopped after layer 0 resumes from the saved partial layer and gives the same checkpoint."""
    options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64)
    full = tmp_path / "full"
    compress_model(tiny_models["llama"], full, options, log=lambda m: None)
    # Simulate an interrupted run: compress into `resumed`, but keep its partial dir and drop the output.
    resumed = tmp_path / "resumed"
    import offline_compress.precision as precision  # the pipeline compresses each module through it

    calls = []
    original = precision.compress_linear

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:  # layer 0 done (7 linears), fail in layer 1
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    precision.compress_linear = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_model(tiny_models["llama"], resumed, options, log=lambda m: None)
    finally:
        precision.compress_linear = original
    assert not resumed.exists()
    partial = tmp_path / ".resumed.partial"
    assert (partial / "layer-00000.safetensors").is_file()
    calls.clear()
    precision.compress_linear = lambda *a, **kw: (calls.append(1), original(*a, **kw))[1]
    try:  # where the work runs (here: the memory budget; likewise --device) does not invalidate finished layers
        compress_model(tiny_models["llama"], resumed, replace(options, max_memory_gb=0.25), log=lambda m: None)
    finally:
        precision.compress_linear = original
    assert len(calls) == 7, "only layer 1 is recomputed"
    assert not partial.exists()
    a, b = read_all(full), read_all(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the options' defaults write int8 dictionaries, one float32 scale per atom
    assert json.loads((full / "config.json").read_text())["quantization_config"]["dictionary_dtype"] == "int8"
    dictionaries = [name for name in a if name.endswith(".dictionary")]
    assert dictionaries and all(a[name].dtype == torch.int8 and a[f"{name}_scales"].dtype == torch.float32
                                for name in dictionaries)


def test_compress_or_reuse_checks_options(tiny_models, calib_file, tmp_path):
    """A finished checkpoint is reused only when it was made from the same model with the same options."""
    out = tmp_path / "owned"
    options = CompressOptions(method="svd-llm", ratio=0.3, calib=str(calib_file), calib_samples=4, seq_len=64)
    messages = []
    first = compress_or_reuse(tiny_models["llama"], out, options, log=messages.append)
    assert first["options"]["ratio"] == 0.3 and first["model_dir"] == str(tiny_models["llama"].resolve())
    stamp = (out / "compress_report.json").stat().st_mtime_ns
    messages.clear()
    again = compress_or_reuse(tiny_models["llama"], out, replace(options, batch_size=2), log=messages.append)
    assert again == first and (out / "compress_report.json").stat().st_mtime_ns == stamp
    assert any("reusing" in m for m in messages), "batch size does not change the result: reused"
    messages.clear()
    other = compress_or_reuse(tiny_models["llama"], out, replace(options, ratio=0.4), log=messages.append)
    assert any("ratio 0.3 -> 0.4" in m for m in messages)
    assert other["options"]["ratio"] == 0.4 and other["totals"]["compression_ratio_actual"] >= 0.4
    assert json.loads((out / "compress_report.json").read_text())["options"]["ratio"] == 0.4
    messages.clear()
    qwen = compress_or_reuse(tiny_models["qwen2"], out, replace(options, ratio=0.4), log=messages.append)
    assert any("model" in m and "compressing again" in m for m in messages)
    assert qwen["architecture"] == "Qwen2ForCausalLM"


def test_only_one_decoder_layer_holds_weights_at_a_time(tiny_models, calib_file, tmp_path, monkeypatch):
    """Layer streaming: whenever a layer runs or a linear is compressed, every other decoder layer's
    weights are on the meta device (not in memory)."""
    import offline_compress.pipeline as pipeline
    import offline_compress.precision as precision

    built = []
    seen = []

    def skeleton(model_dir):
        built.append(pipeline_skeleton(model_dir))
        return built[-1]

    def materialized_layers() -> int:
        layers = built[0].model.layers
        return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)

    def check(original):
        def wrapper(*args, **kwargs):
            seen.append(materialized_layers())
            return original(*args, **kwargs)
        return wrapper

    pipeline_skeleton = pipeline.skeleton_model
    monkeypatch.setattr(pipeline, "skeleton_model", skeleton)
    monkeypatch.setattr(pipeline, "run_layer", check(pipeline.run_layer))
    monkeypatch.setattr(precision, "compress_linear", check(precision.compress_linear))  # per module, via compress_fused
    options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64)
    compress_model(tiny_models["qwen2"], tmp_path / "out", options, log=lambda m: None)
    assert len(seen) >= 2 * 7 and max(seen) == 1, seen
    assert materialized_layers() == 0


def test_resume_fingerprint_tracks_weights_not_where_the_work_runs(tiny_models, tmp_path):
    """--device / --batch-size / --max-memory keep finished layers; new weights at the same path do not."""
    import os
    import shutil

    from offline_compress.resume import fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    options = CompressOptions()
    first = fingerprint(options, model)
    assert fingerprint(replace(options, device="cuda", batch_size=2, max_memory_gb=0.5), model) == first
    assert fingerprint(replace(options, ratio=0.4), model) != first
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert fingerprint(options, model) != first


@pytest.mark.slow
@pytest.mark.parametrize("point", ["calibration", "layer", "export"])
def test_kill_9_then_same_command_gives_the_uninterrupted_checkpoint(tiny_models, tmp_path, point):
    """SIGKILL mid-calibration, mid-layer or mid-export, then the same command: byte-identical output."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    options = ["--iterations", "1", "--calib-samples", "4", "--seq-len", "64"]

    def compress(out, *runner):
        cmd = [sys.executable, "-m", *(runner or ("offline_compress",)), str(tiny_models["llama"]), str(out), *options]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)

    reference = tmp_path / "reference"
    assert compress(reference).returncode == 0
    out = tmp_path / "out"
    killed = compress(out, "tests.kill_runner", point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    resumed = compress(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(tmp_path.glob(".out*")), list(tmp_path.glob(".out*"))  # partial and export leftovers gone
    compared = sorted(p.name for p in reference.iterdir() if p.name != "compress_report.json")  # report has timings
    assert "model.safetensors" in compared
    for name in compared:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def synthetic_layer(spectrum: str, nonzeros: int = 4, in_features: int = 64, out_features: int = 384
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer and its input Gram: (weight [out, in], Gram [in, in] float64). The default 64 → 384 (out = 6·in; at
    CR 0.2 full rank fits with bytes to spare). Spectrum "random", "decaying" (singular values 1/i) or "sparse":
    every output column a combination of ``nonzeros`` of 48 random atoms (where a learned structure beats full
    rank; in ≥ 48)."""
    g = torch.Generator().manual_seed(len(spectrum))
    n, m = in_features, out_features
    if spectrum == "random":
        weight = torch.randn(m, n, generator=g)
    elif spectrum == "decaying":
        rank = min(n, m)
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
        weight = (u * (1.0 / torch.arange(1, rank + 1, dtype=torch.float64)) @ v.T).float()
    else:
        atoms = torch.randn(n, 48, generator=g)
        picks = torch.rand(m, 48, generator=g).argsort(1)[:, :nonzeros]
        coef = torch.zeros(m, 48).scatter_(1, picks, torch.randn(m, nonzeros, generator=g))
        weight = coef @ (atoms / atoms.norm(dim=0)).T
    x = torch.randn(2048, n, generator=g) * torch.linspace(0.2, 3.0, n)
    return weight, x.double().T @ x.double()


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_wide_layer_never_worse_than_full_rank_svd(spectrum):
    """Full-rank s = k (k = in) fits the budget. The default search stores nothing with a higher whitened
    error than full rank quantized as SVD-LLM does (an independent recomputation: the svd-llm method, no
    balancing or refit), and nothing over the budget."""
    from offline_compress.layer import LayerSettings, compress_linear

    weight, gram = synthetic_layer(spectrum)
    n, m = weight.shape[1], weight.shape[0]
    result = compress_linear(weight, gram, 0.2, LayerSettings())
    baseline = compress_linear(weight, gram, 0.2, LayerSettings(method="svd-llm"))
    assert baseline.shape.k == baseline.shape.s == n  # full rank fits: the case under test
    budget = 0.8 * fmt.dense_bf16_bytes(n, m)
    assert fmt.stored_bytes(result.shape, "int8") <= budget
    assert result.whitened_rel_error <= baseline.whitened_rel_error * (1 + 1e-9), (
        result.structure, result.whitened_rel_error, baseline.whitened_rel_error)


@pytest.mark.parametrize("k_over_s", [(1.5, 2.0), (3.0, 1.5)])  # (3, 1.5): a skipped trial, then a trialled one
@pytest.mark.parametrize("spectrum", ["random", "decaying", "sparse"])
def test_first_coding_rule_changes_no_choice(spectrum, k_over_s, monkeypatch):
    """Skipping the trials whose quick first coding is far above full rank's error (search.STOP_RULE)
    stores the very tensors the full trials store, and every trial it skipped would have lost to full
    rank after its trial iterations anyway."""
    from offline_compress import layer, search

    weight, gram = synthetic_layer(spectrum)
    settings = layer.LayerSettings(k_over_s=k_over_s)
    ruled = layer.compress_linear(weight, gram, 0.2, settings)
    ended = [key.removesuffix(" estimate") for key in ruled.candidates if key.endswith(" estimate")]
    if spectrum == "sparse":  # a learned structure beats full rank here: the rule must leave its trial alone
        assert ruled.structure != "svd", ruled.candidates
    else:
        assert ended, ruled.candidates  # the rule fired: the case under test
    monkeypatch.setattr(search, "ESTIMATE_MARGIN", float("inf"))
    full = layer.compress_linear(weight, gram, 0.2, settings)
    assert not any(key.endswith(" estimate") for key in full.candidates)
    assert ruled.structure == full.structure
    assert ruled.tensors.keys() == full.tensors.keys()
    for name, tensor in full.tensors.items():
        assert torch.equal(ruled.tensors[name], tensor), name
    for name in ended:
        assert full.candidates[f"{name} trial"] >= full.candidates["svd"], (name, full.candidates)


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_quantized_trial_rule_changes_no_choice(spectrum, monkeypatch):
    """On a 256 → 48 layer full rank fits at CR 0.2 and k/s = 1.5 and 2 buy k > out atoms, which hold every column
    before rounding. A trial below full rank's error before rounding (here ≈ 0) counts only if it is below it
    after rounding too (search.STOP_RULE). Where that drops a trial (random: k/s = 1.5), counting it anyway changes
    nothing stored."""
    from offline_compress import layer, search

    weight, gram = synthetic_layer(spectrum, in_features=256, out_features=48)  # like a down_proj: in = 5.3·out
    settings = layer.LayerSettings(dictionary_dtype="int8")
    ruled = layer.compress_linear(weight, gram, 0.2, settings)
    assert ruled.candidates["k/s=1.5 trial"] < ruled.candidates["svd"]  # the unquantized trial looks better
    dropped = [name for name in ("k/s=1.5", "k/s=2")
               if ruled.candidates[f"{name} trial quantized"] >= ruled.candidates["svd"]]
    assert bool(dropped) == (spectrum == "random"), ruled.candidates  # the case under test
    monkeypatch.setattr(search, "QUANTIZED_TRIAL_MARGIN", float("inf"))
    full = layer.compress_linear(weight, gram, 0.2, settings)
    assert ruled.structure == full.structure, (ruled.candidates, full.candidates)
    for name, tensor in full.tensors.items():
        assert torch.equal(ruled.tensors[name], tensor), name


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_exact_trials_ranked_after_rounding_and_stored_as_rounded(spectrum, monkeypatch):
    """On the 256 → 48 layer both k/s = 1.2 and 1.5 buy k > out atoms and hold every column before rounding
    (search.EXACT_TRIAL): they are ranked by their error after rounding, and the better one is stored as rounded
    after its trial — learning it further has nothing left to reduce, and here it only made the rounded layer worse."""
    from offline_compress import layer, search

    weight, gram = synthetic_layer(spectrum, in_features=256, out_features=48)
    settings = layer.LayerSettings(dictionary_dtype="int8", k_over_s=(1.2, 1.5))
    ruled = layer.compress_linear(weight, gram, 0.2, settings)
    trials = ["k/s=1.2", "k/s=1.5"]
    for name in trials:  # both exact before rounding: the case under test
        assert ruled.candidates[f"{name} trial"] <= search.EXACT_TRIAL * ruled.candidates["svd"], ruled.candidates
    best = min(trials, key=lambda name: ruled.candidates[f"{name} trial quantized"])
    assert ruled.candidates[best] == ruled.candidates[f"{best} trial quantized"]  # not learned further
    assert not any(name in ruled.candidates for name in trials if name != best)
    monkeypatch.setattr(search, "EXACT_TRIAL", 0.0)
    continued = layer.compress_linear(weight, gram, 0.2, settings)
    assert continued.candidates[best] != continued.candidates[f"{best} trial quantized"]  # the counterfactual
    assert ruled.whitened_rel_error <= continued.whitened_rel_error * (1 + search.TIE), (ruled.candidates,
                                                                                          continued.candidates)


def test_exactly_sparse_layer_compresses_to_finite_values():
    """Columns that are exact 8-term combinations under an identity Gram: the coding solves some rows
    exactly, and the CG step of such a row (curvature rounding to ≤ 0) once went to Inf and the
    dictionary update failed. The stored layer must be finite and no worse than full rank."""
    from offline_compress.layer import LayerSettings, compress_linear

    weight, _ = synthetic_layer("sparse", nonzeros=8)
    gram = 2048.0 * torch.eye(weight.shape[1], dtype=torch.float64)
    result = compress_linear(weight, gram, 0.2, LayerSettings())
    assert all(torch.isfinite(t.float()).all() for t in result.tensors.values())
    assert result.whitened_rel_error <= result.candidates["svd"] * 1.1, result.candidates


def test_summary_says_when_the_checkpoint_is_smaller_than_asked():
    from offline_compress.report import summary_table

    def module(k, s, in_f, out_f, stored):
        return {"k": k, "s": s, "in_features": in_f, "out_features": out_f, "bytes_dense_bf16": 2 * in_f * out_f,
                "bytes_stored": stored, "compression_ratio": 1 - stored / (2 * in_f * out_f),
                "whitened_rel_error": 0.01, "seconds": 1.0}

    full_rank = module(64, 64, 64, 384, 37376)  # CR 0.24 at --ratio 0.2
    learned = module(80, 40, 64, 64, 6553)
    report = {"options": {"ratio": 0.2}, "modules": {"a.gate_proj": full_rank, "a.q_proj": learned},
              "totals": {"bytes_dense_bf16": 2 * 64 * 448, "bytes_stored": 37376 + 6553,
                         "compression_ratio_actual": 1 - (37376 + 6553) / (2 * 64 * 448),
                         "compression_ratio_model": 0.2, "mean_whitened_rel_error": 0.01, "seconds": 2.0}}
    lines = summary_table(report).splitlines()
    assert lines[0].endswith("values/dictionary") and lines[1].endswith("?/?")  # a report without storage types
    assert lines[-1] == ("smaller than asked: CR 0.2339 for --ratio 0.2: 1 modules store full-rank s = k, which "
                         "fits in fewer bytes than their budget with a lower error")
    report["totals"]["compression_ratio_actual"] = 0.2
    assert not summary_table(report).splitlines()[-1].startswith("smaller than asked")
    # per-module types (the precision search's): counted per module kind where they differ
    report["modules"]["b.gate_proj"] = {**full_rank, "value_dtype": "int4", "dictionary_dtype": "int4"}
    report["modules"]["a.gate_proj"] = {**full_rank, "value_dtype": "int8", "dictionary_dtype": "int4"}
    assert summary_table(report).splitlines()[1].endswith("  int8/int4 ×1, int4/int4 ×1")


def test_peak_rss_is_this_runs_and_the_report_names_the_cpu(compressed):
    """The report's peak resident memory starts over at each run (an earlier, larger peak of the same process
    does not leak into it) and sees what the run touches; the report says which CPU its times come from."""
    from offline_compress.report import peak_rss_bytes, reset_peak_rss

    assert reset_peak_rss()
    base = peak_rss_bytes()
    block = torch.empty(256 * 2**20, dtype=torch.uint8).random_(0, 255)  # touched: 256 MiB resident
    touched = peak_rss_bytes()
    del block
    assert touched >= base + 250 * 2**20
    assert reset_peak_rss() and peak_rss_bytes() < touched - 200 * 2**20
    _, report = compressed[("llama", "int8")]
    assert 100 * 2**20 < report["totals"]["peak_rss_bytes"] < 24 * 2**30
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert report["machine"]["isa"] == ("AVX-512" if " avx512f" in cpuinfo else "AVX2" if " avx2" in cpuinfo
                                        else report["machine"]["isa"])
    assert report["machine"]["threads"] == torch.get_num_threads()
