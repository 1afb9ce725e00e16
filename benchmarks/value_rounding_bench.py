"""How much each way of rounding int4 coefficient values costs, on real SmolLM2-135M layers.

Layer 3's q / o / gate / down projections with their real calibration Grams (8 × 256 tokens of the
calibration split, the layers before it dense), compressed with an int8 dictionary and int4 values at
each --ratio, four ways: values rounded to nearest with absmax / 7 per column (``nearest``), with a
searched clipping scale (``clip``), with error feedback through the column's atoms at absmax / 7
(``feedback``) and at the clipping scale (``feedback+clip``); int8 values at the same ratio for comparison. Reports the whitened error after quantization (and before it), the structure and seconds.

    python benchmarks/value_rounding_bench.py [--ratios 0.5 0.7]

Writes benchmarks/results/value-rounding.json.
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

from offline_compress import assets, quantization  # noqa: E402
from offline_compress.layer import LayerSettings, compress_linear  # noqa: E402
from offline_compress.layer_problems import real_layer_problems  # noqa: E402

MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
LAYER = 3
CALIBRATION = {"samples": 8, "seq_len": 256, "text_chars": 200_000}  # the first 200 k characters


def nearest_codes(scaled, support_idx, gram, qmax, **_):
    return scaled.round().clamp(-qmax, qmax)


def run(weight, gram, ratio, variant):
    """One compression with the rounding of ``variant`` patched in (the compressor's code otherwise)."""
    feedback, clip = quantization.feedback_codes, quantization.CLIP_SEARCH_MAX_LEVEL
    if variant in ("nearest", "clip"):
        quantization.feedback_codes = nearest_codes
    quantization.CLIP_SEARCH_MAX_LEVEL = 7 if "clip" in variant else 0
    try:
        started = time.perf_counter()
        value_dtype = "int8" if variant == "int8 values" else "int4"
        result = compress_linear(weight, gram, ratio, LayerSettings(value_dtype=value_dtype, dictionary_dtype="int8"))
        return {"k": result.shape.k, "s": result.shape.s, "structure": result.structure,
                "whitened_rel_error": round(result.whitened_rel_error, 5),
                "unquantized_rel_error": round(result.unquantized_rel_error, 5),
                "seconds": round(time.perf_counter() - started, 1)}
    finally:
        quantization.feedback_codes, quantization.CLIP_SEARCH_MAX_LEVEL = feedback, clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "value-rounding.json")
    args = parser.parse_args(argv)
    problems = real_layer_problems(assets.smollm2_dir(), [LAYER], args.modules, **CALIBRATION)
    results = {}
    for ratio in args.ratios:
        for name in args.modules:
            weight, gram = problems[f"{LAYER}.{name}"]
            for variant in ("nearest", "clip", "feedback", "feedback+clip", "int8 values"):
                row = run(weight, gram, ratio, variant)
                results[f"{ratio} {name} {variant}"] = row
                print(ratio, name, variant, row, flush=True)
    args.out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "layer": LAYER, "machine":
                                    f"cpu, {torch.get_num_threads()} threads", "rows": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
