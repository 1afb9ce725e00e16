"""Does the structure search's early stop (``offline_compress.search.STOP_RULE``) change what a real model stores?

Compresses a model twice with the same options — once as shipped, once with every cut of the rule switched off
(``ESTIMATE_MARGIN``, ``ORTHOGONAL_ESTIMATE_MARGIN``, ``QUANTIZED_TRIAL_MARGIN`` = ∞: every k/s is trialled and counted) — and compares
per module the structure, (k, s) and whitened error stored, and the compression time. A checkpoint the quality
benchmark already wrote with the shipped rule can stand in for the first run (``--ruled``).

    python benchmarks/stop_rule_check.py                      # SmolLM2, CR 0.3, defaults
    python benchmarks/stop_rule_check.py --ruled ~/.cache/cospadi-vllm/quality/smollm2/cospadi-int8-d8@0.3

Writes benchmarks/results/stop-rule-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offline_compress import assets, search
from offline_compress.options import CompressOptions
from offline_compress.pipeline import compress_or_reuse

RESULTS = Path(__file__).parent / "results"


def compare(ruled: dict, unruled: dict) -> dict:
    """Per-module differences between the two reports (the same modules, in order)."""
    rows, changed = [], []
    for prefix, stats in ruled["modules"].items():
        other = unruled["modules"][prefix]
        row = {"module": prefix, "structure": stats["structure"], "k": stats["k"], "s": stats["s"],
               "error": stats["whitened_rel_error"], "structure_without_rule": other["structure"],
               "error_without_rule": other["whitened_rel_error"], "seconds": stats["seconds"],
               "seconds_without_rule": other["seconds"]}
        rows.append(row)
        if (stats["structure"], stats["k"], stats["s"]) != (other["structure"], other["k"], other["s"]):
            changed.append(row)
    return {"modules": rows, "changed": changed,
            "seconds": ruled["totals"]["seconds"], "seconds_without_rule": unruled["totals"]["seconds"],
            "mean_error": ruled["totals"]["mean_whitened_rel_error"],
            "mean_error_without_rule": unruled["totals"]["mean_whitened_rel_error"],
            "machine": ruled.get("machine"), "machine_without_rule": unruled.get("machine")}


def markdown(name: str, ratio: float, result: dict) -> str:
    machine = result["machine"] or {}
    lines = [f"# Structure search with and without its early stop — {name}, CR {ratio}", "",
             f"`search.STOP_RULE`: {search.STOP_RULE}.", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('isa', '?')}, {machine.get('threads', '?')} threads.", "",
             "| | with the rule (as shipped) | without |", "|---|---|---|",
             f"| whole compression | {result['seconds'] / 60:.1f} min | {result['seconds_without_rule'] / 60:.1f} min |",
             f"| mean whitened error | {result['mean_error']:.5f} | {result['mean_error_without_rule']:.5f} |",
             f"| modules whose stored structure differs | {len(result['changed'])} of {len(result['modules'])} | |", ""]
    if result["changed"]:
        lines += ["| module | with the rule | error | without | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['module']} | {r['structure']} | {r['error']:.5f} | {r['structure_without_rule']} | "
                  f"{r['error_without_rule']:.5f} |" for r in result["changed"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--ruled", type=Path, default=None,
                        help="a checkpoint already compressed with these options and the shipped rule")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the checkpoints go (default: the cache)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model = args.model or assets.smollm2_dir()
    work_dir = args.work_dir or assets.cache_dir() / "stop-rule"
    options = CompressOptions(ratio=args.ratio)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    ruled = compress_or_reuse(model, args.ruled or work_dir / f"{args.name}-ruled@{args.ratio}", options, log)
    search.ESTIMATE_MARGIN = search.ORTHOGONAL_ESTIMATE_MARGIN = search.QUANTIZED_TRIAL_MARGIN = float("inf")
    unruled = compress_or_reuse(model, work_dir / f"{args.name}-unruled@{args.ratio}", options, log)
    result = {"model": str(model), "ratio": args.ratio, "stop_rule": search.STOP_RULE, **compare(ruled, unruled)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"stop-rule-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(args.name, args.ratio, result))
    print(markdown(args.name, args.ratio, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
