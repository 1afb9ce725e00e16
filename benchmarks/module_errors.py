"""Per-module check: is CoSpaDi's structure search ever worse than SVD-LLM at the same bytes?

Reads the ``compress_report.json`` of the quality benchmark's checkpoints (``<variant>@CR``, by default
the compressor's defaults ``cospadi-int8-d8``, and ``svd-llm@CR`` in its work directory) and compares, for every compressed module, the whitened
error after quantization two ways:

  * against the separate SVD-LLM run at the same CR (its own sequential calibration, so the two
    runs' Grams differ after the first layer: small differences either way are calibration noise);
  * against the SVD-LLM structure evaluated inside the same run on the same Gram (``candidates.svd``
    in the report: SVD-LLM's factors, balanced and refitted) — the like-for-like comparison.

    python benchmarks/module_errors.py                 # SmolLM2, CR 0.2 / 0.3 / 0.4
    python benchmarks/module_errors.py --work-dir DIR --name NAME --ratios 0.3
    python benchmarks/module_errors.py --variant cospadi-int8   # the bf16-dictionary rows

The one-shot comparison in results/ was made from checkpoints written with
``cospadi-compress MODEL DIR/cospadi-int8@CR --ratio CR --one-shot --dictionary-dtype bfloat16`` and
``cospadi-compress MODEL DIR/svd-llm@CR --ratio CR --method svd-llm --one-shot --dictionary-dtype bfloat16``, then
``python benchmarks/module_errors.py --work-dir DIR --name smollm2-one-shot``.

Writes benchmarks/results/module-errors-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offline_compress import assets

RESULTS = Path(__file__).parent / "results"


def compare(cospadi: dict, svd: dict, ratio: float) -> dict:
    """Both runs must fit every module in the same budget, (1 − ratio) of its bf16 bytes."""
    rows = []
    for prefix, stats in cospadi["modules"].items():
        other = svd["modules"][prefix]
        budget = (1 - ratio) * stats["bytes_dense_bf16"]
        if max(stats["bytes_stored"], other["bytes_stored"]) > budget:
            raise SystemExit(f"{prefix}: over the CR {ratio} budget of {budget:.0f} B (CoSpaDi "
                             f"{stats['bytes_stored']} B, SVD-LLM {other['bytes_stored']} B)")
        rows.append({
            "module": prefix,
            "structure": stats.get("structure"),
            "cospadi": stats["whitened_rel_error"],
            "svd_llm_run": other["whitened_rel_error"],
            "svd_same_gram": stats.get("candidates", {}).get("svd"),
        })
    worse_run = [r for r in rows if r["cospadi"] > r["svd_llm_run"]]
    # A module that stores SVD's structure is that candidate (its stored error only adds the bf16 rounding of D).
    worse_same = [r for r in rows if r["structure"] != "svd" and r["svd_same_gram"] is not None
                  and r["cospadi"] > r["svd_same_gram"] * (1 + 1e-3)]
    return {"modules": rows, "violations_vs_svd_llm_run": len(worse_run), "violations_vs_same_gram": len(worse_same),
            "worst_vs_run": sorted(worse_run, key=lambda r: r["svd_llm_run"] / r["cospadi"])[:5]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--work-dir", type=Path, help="the quality benchmark's work directory (default: its cache dir)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--variant", default="cospadi-int8-d8",
                        help="the CoSpaDi rows to compare (a benchmarks/quality.py variant; default: the compressor's defaults)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or assets.cache_dir() / "quality" / args.name
    results, lines = {}, [
        f"# Per-module whitened error: CoSpaDi (`{args.variant}`) vs SVD-LLM at the same bytes — {args.name}", "",
        "Whitened error after quantization, every compressed module. `vs SVD-LLM run`: the separate "
        "`--method svd-llm` checkpoint, calibrated the same way (sequential, the default: each run on its own "
        "compressed earlier layers, so the two runs' Grams differ after layer 0; `--one-shot`: both on the "
        "original model's activations, identical Grams); `vs same Gram`: SVD-LLM's structure evaluated inside "
        "the CoSpaDi run on the same Gram (modules that store it are not counted: they are that candidate, plus the "
        "rounding of D where it is stored in bf16). SVD-LLM is the published baseline: a bf16 dictionary, int8 values.", "",
        "| CR | modules | worse than SVD-LLM run | worse than SVD on the same Gram | mean error CoSpaDi | mean error SVD-LLM run | structures chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        paths = [work_dir / f"{variant}@{ratio}" / "compress_report.json" for variant in (args.variant, "svd-llm")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            print(f"module_errors: no report {missing[0]} (run benchmarks/quality.py for CR {ratio} first)", file=sys.stderr)
            return 2
        cospadi, svd = (json.loads(p.read_text()) for p in paths)
        result = compare(cospadi, svd, ratio)
        results[str(ratio)] = result
        rows = result["modules"]
        structures: dict[str, int] = {}
        for r in rows:
            structures[r["structure"]] = structures.get(r["structure"], 0) + 1
        mean_cospadi = sum(r["cospadi"] for r in rows) / len(rows)
        mean_svd = sum(r["svd_llm_run"] for r in rows) / len(rows)
        lines.append(f"| {ratio} | {len(rows)} | {result['violations_vs_svd_llm_run']} | {result['violations_vs_same_gram']} "
                     f"| {mean_cospadi:.4f} | {mean_svd:.4f} | "
                     + ", ".join(f"{k} × {v}" for k, v in sorted(structures.items())) + " |")
        for r in result["worst_vs_run"]:
            lines.append(f"|  | {r['module']} | {r['cospadi']:.4f} vs {r['svd_llm_run']:.4f} | | | | |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Suffixes appended, not swapped: with_suffix would cut a name like "qwen2.5-coder-0.5b" at its last dot.
    (RESULTS / f"module-errors-{args.name}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"module-errors-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
