"""Error-feedback rounding of int4 values: one Cholesky per column (what the compressor does) against one shared
k × k factor with the values off each column's support held at zero — time and whitened error on real layers.

The compressor rounds each column's s int4 values with GPTQ's error feedback through the Gram of that column's own
atoms (``quantization.feedback_codes``): exact for the column, but one s × s Cholesky per column, O(out · s³), which
dominates int4-value compression where supports are nearly dense (the orthogonal structure: s close to k). The
alternative factors the whole dictionary's Gram once and rounds every column over all k atoms in the same order,
codes off the support fixed at zero (as SparseGPT treats pruned weights); it cannot see the residual of the rows it
skips, so its error can only be measured, not bounded. Both run inside the real ``compress_linear`` (``--fast``
structures) on SmolLM2-135M's layers 3 and 15, calibrated one-shot on the built-in split.

    python benchmarks/feedback_rounding_bench.py            # writes results/feedback-rounding-smollm2.{json,md}
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offline_compress import assets, quantization  # noqa: E402
from offline_compress.calibration import capture_layer_inputs, decoder_layers, gram_key, run_layer  # noqa: E402
from offline_compress.calibration_text import calibration_ids  # noqa: E402
from offline_compress.export import source_safetensors  # noqa: E402
from offline_compress.layer import compress_linear  # noqa: E402
from offline_compress.loading import SafetensorsSource, materialize, skeleton_model, validate_model_dir  # noqa: E402
from offline_compress.options import CompressOptions  # noqa: E402
from offline_compress.problem import LayerSettings  # noqa: E402
from offline_compress.report import machine  # noqa: E402

LAYERS = (3, 15)
TARGETS = ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
RATIOS = (0.5, 0.7305)
PAIRS = (("int4", "int8"), ("int4", "int4"))  # (values, dictionary)


def shared_factor_codes(scaled: torch.Tensor, support_idx: torch.Tensor, gram: torch.Tensor, qmax: float,
                        damp: float = 0.01) -> torch.Tensor:
    """``feedback_codes``'s signature and order (each column's first atom rounded first), over one factor of the
    whole k × k Gram: scaled [out, s], support_idx [out, s], gram [k, k] → codes [out, s]."""
    out, k = scaled.shape[0], gram.shape[0]
    reverse = torch.arange(k - 1, -1, -1)
    hessian = gram.float()[reverse][:, reverse]
    factor = torch.linalg.cholesky(hessian + damp * hessian.diagonal().mean() * torch.eye(k), upper=True)
    values = torch.zeros(out, k).scatter_(1, support_idx, scaled.float())[:, reverse]
    on_support = torch.zeros(out, k, dtype=torch.bool).scatter_(1, support_idx, True)[:, reverse]
    error, codes = torch.zeros_like(values), torch.zeros_like(values)
    for i in range(k - 1, -1, -1):
        shifted = values[:, i] + (error[:, i + 1:] @ factor[i, i + 1:]) / factor[i, i]
        codes[:, i] = torch.where(on_support[:, i], shifted.round().clamp(-qmax, qmax), 0.0)
        error[:, i] = values[:, i] - codes[:, i]
    return codes[:, reverse].gather(1, support_idx).to(scaled.dtype)


def layer_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"3.mlp.gate_proj": (weight [out, in], Gram [in, in])} of LAYERS' TARGETS, one-shot calibration."""
    model_dir = Path(assets.smollm2_dir())
    _, tokenizer = validate_model_dir(model_dir, Path("/nonexistent/feedback-rounding"), False)
    source = SafetensorsSource(source_safetensors(model_dir))
    model = skeleton_model(model_dir)
    cpu = torch.device("cpu")
    materialize(model.get_input_embeddings(), "model.embed_tokens", source, cpu)
    model.model.rotary_emb.to(cpu)
    inputs = capture_layer_inputs(model, calibration_ids(tokenizer, CompressOptions()), 8)
    problems = {}
    for index, layer in enumerate(decoder_layers(model)[: max(LAYERS) + 1]):
        materialize(layer, f"model.layers.{index}", source, cpu, torch.float32)
        targets = list(TARGETS) if index in LAYERS else []
        grams, inputs.hidden = run_layer(layer, inputs, cpu, targets) if targets else run_layer(layer, inputs, cpu)
        for target in targets:
            problems[f"{index}.{target}"] = (layer.get_submodule(target).weight.detach().clone(), grams[gram_key(target)])
    return problems


def main() -> None:
    exact = quantization.feedback_codes
    rows = []
    for name, (weight, gram) in layer_problems().items():
        for ratio in RATIOS:
            for values, dictionary in PAIRS:
                settings = LayerSettings(value_dtype=values, dictionary_dtype=dictionary, k_over_s=())
                row = {"module": name, "ratio": ratio, "values": values, "dictionary": dictionary}
                for label, rounding in (("per_column", exact), ("shared_factor", shared_factor_codes)):
                    quantization.feedback_codes = rounding
                    started = time.perf_counter()
                    result = compress_linear(weight, gram, ratio, settings)
                    row[label] = {"seconds": round(time.perf_counter() - started, 3),
                                  "whitened_rel_error": result.whitened_rel_error, "structure": result.structure,
                                  "k": result.shape.k, "s": result.shape.s}
                quantization.feedback_codes = exact
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results"
    meta = {"machine": machine(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    (out / "feedback-rounding-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# int4 value rounding: per-column factor vs one shared factor (SmolLM2-135M, `--fast` structures)", "",
             f"Machine: {meta['machine']}. Seconds: the whole `compress_linear` of the module.", "",
             "| module | CR | values / D | structure (k, s) | per-column s | shared s | speed-up | per-column error "
             "| shared error | error change |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["per_column"], r["shared_factor"]
        lines.append(f"| {r['module']} | {r['ratio']} | {r['values']} / {r['dictionary']} | {a['structure']} ({a['k']}, "
                     f"{a['s']}) | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['seconds'] / b['seconds']:.1f}× | "
                     f"{a['whitened_rel_error']:.5f} | {b['whitened_rel_error']:.5f} | "
                     f"{(b['whitened_rel_error'] / a['whitened_rel_error'] - 1) * 100:+.2f} % |")
    (out / "feedback-rounding-smollm2.md").write_text("\n".join(lines) + "\n")
    print("wrote benchmarks/results/feedback-rounding-smollm2.{json,md}")


if __name__ == "__main__":
    main()
