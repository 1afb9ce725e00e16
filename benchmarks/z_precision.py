"""What rounding Z = x·D costs in quality: perplexity of a CoSpaDi checkpoint with Z kept float32,
rounded per row to int16 (what the CPU kernels do for up to 96 rows) and rounded per row to int8
(what an int8 Z·C — vpdpbusd on CPU, an int8 GEMM for prefill — would need; not implemented).

The checkpoint is loaded through transformers (``CoSpaDiLinear``, float32); every layer's Z is
rounded symmetrically to the row's peak |z| before Z·C. Same held-out windows as the quality
benchmark and the demo.

    python benchmarks/z_precision.py --checkpoint ./smollm2-cospadi

Writes benchmarks/results/z-precision-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PRECISIONS = {"float32": None, "int16 per row": 16, "int8 per row": 8}


def round_rows(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z [..., k] rounded to `bits`-bit integers scaled by each row's peak |z| (symmetric), back in z's dtype."""
    levels = 2 ** (bits - 1) - 1
    scale = z.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny) / levels
    return torch.round(z / scale) * scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="CoSpaDi checkpoint directory")
    parser.add_argument("--name", default="smollm2", help="name in the result files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"error: {args.checkpoint} is not a checkpoint directory (no config.json)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cospadi_vllm  # noqa: F401  (registers the CoSpaDi quantizer with transformers)
    from cospadi_vllm import hf_quantizer
    from offline_compress.evaluate import evaluation_windows, perplexity

    windows = evaluation_windows(AutoTokenizer.from_pretrained(args.checkpoint))
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    exact_product, bits_now = hf_quantizer.dictionary_product, {"bits": None}

    def rounded_product(x: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        z = exact_product(x, dictionary)
        return z if bits_now["bits"] is None else round_rows(z, bits_now["bits"])

    hf_quantizer.dictionary_product = rounded_product  # CoSpaDiLinear.forward looks it up at call time
    rows = []
    try:
        for label, bits in PRECISIONS.items():
            bits_now["bits"] = bits
            start = time.perf_counter()
            ppl = perplexity(model, windows, desc=f"Z {label}")
            rows.append({"z": label, "bits": bits, "perplexity": ppl, "seconds": time.perf_counter() - start})
            print(f"Z {label:14s} perplexity {ppl:.3f}", flush=True)
    finally:
        hf_quantizer.dictionary_product = exact_product
    base = rows[0]["perplexity"]
    md = [f"# Z precision — {args.name}", "",
          f"Checkpoint `{args.checkpoint.name}` through transformers in float32; Z = x·D of every compressed layer "
          f"rounded per row (symmetric, scale = row peak) before Z·C; {windows.shape[0]} held-out windows of "
          f"{windows.shape[1]} tokens.", "",
          "| Z | perplexity | vs float32 Z |", "|---|---|---|"]
    md += [f"| {r['z']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f} % |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"z-precision-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
