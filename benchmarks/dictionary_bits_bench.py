"""What a 4-bit dictionary buys, per module, against 4-bit weight quantization at the same bytes.

SmolLM2-135M layer 3's q / o / gate / down projections with their real calibration Grams (as
``value_rounding_bench.py``), at each byte budget: the bytes of 4-bit groups-of-128 weight quantization
(``--budgets w4g128``: in·out/2 plus a float16 scale per group and output) and plain ratios. Rows:
  gptq-w4g128 / rtn-w4g128   the weight itself on a symmetric 4-bit grid, groups of 128 inputs
                             (``offline_compress.gptq``: GPTQ with the module's Gram, and round-to-nearest)
  cospadi d8/v4              CoSpaDi, int8 dictionary (one scale per atom) + int4 values
  cospadi d4/v4, d4/v8       CoSpaDi, 4-bit dictionary (GPTQ-rounded, groups of 128) + int4 / int8 values
Every error is ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ on the calibration Gram, float64, from the tensors as stored; bytes are the
stored bytes. Note SmolLM2's weights sit on a 4-bit grid already (GGUF source), which flatters the w4 rows.

    python benchmarks/dictionary_bits_bench.py [--budgets w4g128 0.5] [--modules mlp.gate_proj]

Writes benchmarks/results/dictionary-bits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.value_rounding_bench import CALIBRATION, LAYER, MODULES  # noqa: E402
from cospadi_vllm import codec  # noqa: E402
from cospadi_vllm import format as fmt  # noqa: E402
from offline_compress import assets  # noqa: E402
from offline_compress.gptq import quantize_gptq, round_to_nearest  # noqa: E402
from offline_compress.layer import LayerSettings, compress_linear  # noqa: E402
from offline_compress.layer_problems import real_layer_problems  # noqa: E402

GROUP = 128
COSPADI = {"cospadi d8/v4": ("int8", "int4"), "cospadi d4/v4": ("int4", "int4"), "cospadi d4/v8": ("int4", "int8")}


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F from the Gram XᵀX (weight, approx [out, in])."""
    delta = (weight.double() - approx.double())
    return float(((delta @ gram @ delta.T).trace() / (weight.double() @ gram @ weight.double().T).trace()).sqrt())


def w4g128_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features // 2 + out_features * -(-in_features // GROUP) * 2  # + float16 scales


def run_budget(weight: torch.Tensor, gram: torch.Tensor, budget: str) -> dict[str, dict]:
    out_features, in_features = weight.shape
    dense = fmt.dense_bf16_bytes(in_features, out_features)
    w4_bytes = w4g128_bytes(out_features, in_features)
    ratio = 1 - w4_bytes / dense if budget == "w4g128" else float(budget)
    rows = {}
    for name, quantize in (("gptq-w4g128", lambda: quantize_gptq(weight, gram, 4, GROUP)),
                           ("rtn-w4g128", lambda: round_to_nearest(weight, 4, GROUP))):
        started = time.perf_counter()
        approx = quantize().dequantize()
        rows[name] = {"bytes": w4_bytes, "error": output_error(weight, approx, gram),
                      "seconds": round(time.perf_counter() - started, 1)}
    for name, (dictionary_dtype, value_dtype) in COSPADI.items():
        started = time.perf_counter()
        result = compress_linear(weight, gram, ratio, LayerSettings(value_dtype=value_dtype,
                                                                    dictionary_dtype=dictionary_dtype))
        approx = (codec.dequantize_dictionary(result.tensors, in_features).double()
                  @ codec.decode_coefficients(result.tensors[fmt.COEF_MASK], result.tensors[fmt.COEF_VALUES],
                                            result.tensors[fmt.COEF_SCALES], result.shape.k).double()).T
        rows[name] = {"bytes": sum(t.numel() * t.element_size() for t in result.tensors.values()),
                      "error": output_error(weight, approx, gram), "k": result.shape.k, "s": result.shape.s,
                      "structure": result.structure, "seconds": round(time.perf_counter() - started, 1)}
    return {"ratio": round(ratio, 4), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["w4g128", "0.5"],
                        help="w4g128 (the bytes of 4-bit groups-of-128 weights) and/or compression ratios")
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dictionary-bits.json")
    args = parser.parse_args(argv)
    problems = real_layer_problems(assets.smollm2_dir(), [LAYER], args.modules, **CALIBRATION)
    results = {}
    for budget in args.budgets:
        for name in args.modules:
            weight, gram = problems[f"{LAYER}.{name}"]
            results[f"{budget} {name}"] = run_budget(weight, gram, budget)
            for row, values in results[f"{budget} {name}"]["rows"].items():
                print(budget, name, row, values, flush=True)
    args.out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "layer": LAYER, "machine":
                                    f"cpu, {torch.get_num_threads()} threads", "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
