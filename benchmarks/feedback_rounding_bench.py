"""Error-feedback rounding of int4 values: one Cholesky per column, one shared k × k factor, and the compressor's
mix of the two — time and whitened error on real layers.

``quantization.feedback_codes`` rounds each column's s int4 values with GPTQ's error feedback through the Gram of
that column's own atoms: exact for the column, but one s × s Cholesky per column, O(out · s³), which dominates
int4-value compression where supports are large. With ``shared_factor`` it factors the whole dictionary's Gram
once and rounds every column over all k atoms in the same order, codes off the support held at zero (as SparseGPT
treats pruned weights): it cannot absorb the residual of the rows it holds, so its error can only be measured.
The compressor ("product") uses the shared factor for the roundings it redoes later (before a rounded dictionary
the values are re-solved and rounded again) and the per-column one for the rounding it stores. All three run
inside the real ``compress_linear`` (the default structure search) on SmolLM2-135M's layers 3 and 15, calibrated
one-shot on the built-in split.

    python benchmarks/feedback_rounding_bench.py            # writes results/feedback-rounding-smollm2.{json,md}
"""

from __future__ import annotations

import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offline_compress import assets, quantization  # noqa: E402
from offline_compress.layer import compress_linear  # noqa: E402
from offline_compress.layer_problems import real_layer_problems  # noqa: E402
from offline_compress.problem import LayerSettings  # noqa: E402
from offline_compress.report import machine  # noqa: E402

LAYERS = (3, 15)
TARGETS = ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
RATIOS = (0.5, 0.7305)
PAIRS = (("int4", "int8"), ("int4", "int4"))  # (values, dictionary)


VARIANTS = {  # how every int4 rounding of a compression is done
    "per_column": False,  # each column's own factor everywhere
    "shared_factor": True,  # one factor everywhere
    "product": None,  # what the compressor does: shared for roundings redone later, the stored one per column
}


def main() -> None:
    exact = quantization.feedback_codes
    rows = []
    for name, (weight, gram) in real_layer_problems(assets.smollm2_dir(), LAYERS, TARGETS).items():
        for ratio in RATIOS:
            for values, dictionary in PAIRS:
                settings = LayerSettings(value_dtype=values, dictionary_dtype=dictionary)
                row = {"module": name, "ratio": ratio, "values": values, "dictionary": dictionary}
                for label, forced in VARIANTS.items():
                    if forced is not None:
                        quantization.feedback_codes = partial(forced_rounding, exact, forced)
                    started = time.perf_counter()
                    result = compress_linear(weight, gram, ratio, settings)
                    row[label] = {"seconds": round(time.perf_counter() - started, 3),
                                  "whitened_rel_error": result.whitened_rel_error, "structure": result.structure,
                                  "k": result.shape.k, "s": result.shape.s}
                    quantization.feedback_codes = exact
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows)


def forced_rounding(exact, forced: bool, *args, **kwargs):
    """``feedback_codes`` with ``shared_factor`` = ``forced``, whatever the caller asked."""
    return exact(*args, **{**kwargs, "shared_factor": forced})


def write(rows: list[dict]) -> None:
    out = ROOT / "benchmarks" / "results"
    meta = {"machine": machine(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    (out / "feedback-rounding-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# int4 value rounding: per-column factor, one shared factor, and the product's mix (SmolLM2-135M)", "",
             f"Machine: {meta['machine']}. Default structure search. Seconds: the whole `compress_linear` of the module; "
             "error: whitened relative error of the stored layer (change against per-column).", "",
             "| module | CR | values / D | per-column: structure (k, s), s, error | shared: s, error | product: s, error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a = r["per_column"]
        cells = [f"{a['structure']} ({a['k']}, {a['s']}), {a['seconds']:.2f}, {a['whitened_rel_error']:.5f}"]
        for label in ("shared_factor", "product"):
            b = r[label]
            change = (b["whitened_rel_error"] / a["whitened_rel_error"] - 1) * 100
            moved = "" if b["structure"] == a["structure"] else f" ({b['structure']})"
            cells.append(f"{b['seconds']:.2f}{moved}, {b['whitened_rel_error']:.5f} ({change:+.2f} %)")
        lines.append(f"| {r['module']} | {r['ratio']} | {r['values']} / {r['dictionary']} | " + " | ".join(cells) + " |")
    total = {label: sum(r[label]["seconds"] for r in rows) for label in VARIANTS}
    lines += ["", "Total seconds: " + ", ".join(f"{label} {t:.1f}" for label, t in total.items()) + "."]
    (out / "feedback-rounding-smollm2.md").write_text("\n".join(lines) + "\n")
    print("wrote benchmarks/results/feedback-rounding-smollm2.{json,md}")


if __name__ == "__main__":
    main()
