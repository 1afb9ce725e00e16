"""Quality benchmark: perplexity against real model bytes for dense, RTN int8, SVD-LLM and CoSpaDi.

Perplexity is HF transformers on each checkpoint as stored (``import cospadi_vllm`` registers the
``cospadi`` quantizer: the linears compute (x·D)·C with the serving kernels, float32 activations), over
fixed non-overlapping windows of the held-out Wikipedia split (offline_compress.evaluate:
16 windows × 512 tokens spread evenly over the split, no BOS prepended, every position after the
first scored). Bytes are real stored bytes: compressed layers as stored, everything else at bf16.

Rows (each one resumable: finished rows are kept in the JSON and skipped on the next run):
  dense               the original weights, counted at bf16
  rtn-int8            round-to-nearest int8 per output channel (fp32 scale) on the same target layers
  rtn-int4-gG, rtn-int3-gG    round-to-nearest, asymmetric groups of G inputs (benchmarks/baselines.py)
  gptq-int4-gG, gptq-int3-gG  GPTQ from llm-compressor, same groups (needs `make baselines-setup` once;
                              skipped with a note without it)
  svd-llm@CR          whitened truncated SVD at the CR's byte budget
  cospadi-int8@CR     K-SVD dictionary + int8 coefficient values
  cospadi-bf16@CR     K-SVD dictionary + bf16 coefficient values
  cospadi-int8-g2@CR  dictionaries of q/k/v/gate/up shared by 2 consecutive layers (--group-size 2)
  cospadi-int8-sens@CR  per-module ratios by sensitivity, same total bytes (--allocation sensitivity)
  cospadi-int8-g2-sens@CR  both
  cospadi-int8-d8@CR  int8 dictionary (one scale per atom) + int8 values (--dictionary-dtype int8): the
                      byte D saves buys more atoms and non-zeros at the same CR
  cospadi-int8-d8-fast@CR  the same, closed-form structures only (--fast)
  cospadi-int8-d8-quick@CR  --fast --iterations 2 --calib-samples 16 (the quick recipe)
  cospadi-int4-d8@CR  int8 dictionary + int4 values (two per byte, rounded with error feedback)
  cospadi-int8-d4@CR, cospadi-int4-d4@CR  4-bit dictionary (--dictionary-dtype int4) + int8 / int4 values
  cospadi-int4-d4-fast@CR  the latter with closed-form structures only (--fast)
  cospadi-auto@CR     per vLLM layer the (value, dictionary) types of int8 / int4 with the lowest error at the
                      same bytes (--value-dtype auto --dictionary-dtype auto)
  cospadi-int8-1shot@CR, cospadi-int8-g2-1shot@CR  per-layer and grouped, both calibrated --one-shot

    python benchmarks/quality.py                          # SmolLM2-135M, CR 0.2 0.3 0.4
    python benchmarks/quality.py --model /models/Llama-3.2-1B --device cuda --ratios 0.3

Writes benchmarks/results/quality-<model>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from baselines import BASELINES_PYTHON, baseline_rows, gptq_row, group_size_for, rtn_, stored_bytes

from offline_compress import assets
from offline_compress.evaluate import evaluation_windows, perplexity
from offline_compress.options import DEFAULT_TARGETS, CompressOptions
from offline_compress.pipeline import compress_or_reuse

RESULTS = Path(__file__).parent / "results"
# Row name -> compressor options, every dtype spelled out, so a row keeps its meaning whatever the compressor's
# defaults are: "cospadi-int8…" rows hold a bfloat16 dictionary and int8 values; "-d8" / "-d4" rows an int8 / 4-bit
# dictionary (cospadi-int8-d8 is the compressor's default). SVD-LLM is stored like CoSpaDi-int8 with s = k.
BF16_D = {"dictionary_dtype": "bfloat16"}
VARIANTS: dict[str, dict] = {
    "svd-llm": {"method": "svd-llm", "value_dtype": "int8", **BF16_D},
    "cospadi-int8": {"method": "cospadi", "value_dtype": "int8", **BF16_D},
    "cospadi-bf16": {"method": "cospadi", "value_dtype": "bfloat16", **BF16_D},
    # cross-layer sharing: q/k/v/gate/up dictionaries shared by 2 consecutive layers
    "cospadi-int8-g2": {"method": "cospadi", "value_dtype": "int8", "group_size": 2, **BF16_D},
    # per-module ratios from the whitened spectra, same total bytes
    "cospadi-int8-sens": {"method": "cospadi", "value_dtype": "int8", "allocation": "sensitivity", **BF16_D},
    "cospadi-int8-g2-sens": {"method": "cospadi", "value_dtype": "int8", "group_size": 2, "allocation": "sensitivity",
                             **BF16_D},
    # stacked with quantization: an int8 dictionary (one scale per atom), the compressor's default
    "cospadi-int8-d8": {"method": "cospadi", "value_dtype": "int8", "dictionary_dtype": "int8"},
    # ... closed-form structures only (--fast: SVD's s = k or the orthogonal dictionary per module)
    "cospadi-int8-d8-fast": {"method": "cospadi", "value_dtype": "int8", "dictionary_dtype": "int8", "fast": True},
    # ... and the quick recipe: --fast --iterations 2 --calib-samples 16
    "cospadi-int8-d8-quick": {"method": "cospadi", "value_dtype": "int8", "dictionary_dtype": "int8", "fast": True,
                              "iterations": 2, "calib_samples": 16},
    # ... with per-module ratios from the whitened spectra, same total bytes
    "cospadi-int8-d8-sens": {"method": "cospadi", "value_dtype": "int8", "dictionary_dtype": "int8",
                             "allocation": "sensitivity"},
    # ... and int4 values (two per byte, one scale per output column)
    "cospadi-int4-d8": {"method": "cospadi", "value_dtype": "int4", "dictionary_dtype": "int8"},
    # a 4-bit dictionary (GPTQ layout, rounded by GPTQ for the module's inputs) + int8 / int4 values
    "cospadi-int8-d4": {"method": "cospadi", "value_dtype": "int8", "dictionary_dtype": "int4"},
    "cospadi-int4-d4": {"method": "cospadi", "value_dtype": "int4", "dictionary_dtype": "int4"},
    "cospadi-int4-d4-fast": {"method": "cospadi", "value_dtype": "int4", "dictionary_dtype": "int4", "fast": True},
    "cospadi-auto": {"method": "cospadi", "value_dtype": "auto", "dictionary_dtype": "auto"},
    # diagnostics for grouped sharing: both calibrated one-shot (every layer on the original model's
    # activations), so a group's second layer sees the same inputs in both
    "cospadi-int8-1shot": {"method": "cospadi", "value_dtype": "int8", "sequential": False, **BF16_D},
    "cospadi-int8-g2-1shot": {"method": "cospadi", "value_dtype": "int8", "group_size": 2, "sequential": False,
                              **BF16_D},
}


KEPT_SUFFIX = "-ksvd"  # rows kept from the previous compressor's grid (not re-runnable)


def row_id(variant: str, ratio: float | None) -> str:
    return variant if ratio is None else f"{variant}@{ratio}"


def model_bytes(model) -> int:
    """bf16 bytes of every parameter, tied weights once."""
    return 2 * sum({id(p): p.numel() for p in model.parameters()}.values())


def target_linears(model) -> list[torch.nn.Linear]:
    suffixes = tuple(f".{t}" for t in DEFAULT_TARGETS)
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)]


def empty_model(model_dir: Path):
    """The model built from its config alone, on the meta device: shapes and parameter counts, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def evaluate_baseline(model_dir: Path, windows, args, method: str = "dense", bits: int = 16,
                      group_size: int | None = None) -> dict:
    """dense (method "dense"), RTN in place, or GPTQ through llm-compressor; bytes by baselines' rule."""
    skeleton = empty_model(model_dir)
    shapes = [tuple(m.weight.shape) for m in target_linears(skeleton)]
    layer_dense = 2 * sum(o * i for o, i in shapes)
    row = {"layer_bytes_dense_bf16": layer_dense,
           "layer_bytes": layer_dense if method == "dense" else sum(stored_bytes(o, i, bits, group_size)
                                                                   for o, i in shapes)}
    if method == "gptq":
        calibration = {"calib_samples": args.calib_samples, "seq_len": args.seq_len, "seed": args.seed}
        row.update(gptq_row(model_dir, bits, group_size, args.work_dir / "gptq", calibration, DEFAULT_TARGETS))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
        if method == "rtn":
            rtn_(target_linears(model), bits, group_size)
        row["perplexity"] = perplexity(model, windows, desc=method if method == "dense" else f"rtn-int{bits}")
    row["model_bytes"] = model_bytes(skeleton) - layer_dense + row["layer_bytes"]
    return row


def evaluate_compressed(model_dir: Path, work_dir: Path, variant: str, ratio: float, windows, args) -> dict:
    run = {"iterations": args.iterations, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
           "device": args.device, "seed": args.seed}
    options = CompressOptions(ratio=ratio, **{**run, **VARIANTS[variant]})  # a variant may set its own run options
    checkpoint = work_dir / row_id(variant, ratio)
    report = compress_or_reuse(model_dir, checkpoint, options, log=lambda msg: print(msg, file=sys.stderr))
    totals = report["totals"]
    from transformers import AutoModelForCausalLM

    import cospadi_vllm  # noqa: F401  (registers the cospadi quantizer with transformers)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=args.device).eval()
    return {
        "evaluated_with": "transformers cospadi quantizer (checkpoint as stored)",
        "model_bytes": totals["model_bytes_stored"],
        "layer_bytes": totals["bytes_stored"],
        "layer_bytes_dense_bf16": totals["bytes_dense_bf16"],
        "perplexity": perplexity(model, windows, desc=row_id(variant, ratio)),
        "compression_ratio_actual": totals["compression_ratio_actual"],
        "mean_whitened_rel_error": totals["mean_whitened_rel_error"],
        "compress_seconds": totals["seconds"],
        "compress_peak_rss_bytes": totals.get("peak_rss_bytes"),
        "compress_machine": report.get("machine"),
        "options": report["options"],
    }


def model_bytes_of(row: dict, dense: dict | None) -> int:
    """The dense model's bytes with the compressed layers at their stored bytes (one rule for every row,
    whatever the compressor version that wrote the row counted)."""
    if dense is None:
        return row["model_bytes"]
    return dense["model_bytes"] - row["layer_bytes_dense_bf16"] + row["layer_bytes"]


def pareto_frontier(results: dict) -> list[str]:
    """Rows no other row beats on both model bytes and perplexity, smallest first."""
    dense = results.get("dense")
    frontier, best = [], math.inf
    for rid, row in sorted(results.items(), key=lambda item: (model_bytes_of(item[1], dense), item[1]["perplexity"])):
        if row["perplexity"] < best:
            frontier.append(rid)
            best = row["perplexity"]
    return frontier


def markdown(results: dict, meta: dict, missing: list[str]) -> str:
    dense = results.get("dense")
    lines = [
        f"# Perplexity vs bytes — {meta['model']}",
        "",
        f"Held-out Wikipedia split, {meta['windows']} windows × {meta['seq_len']} tokens, no BOS. "
        f"Machine: {meta['machine']}. Bytes: compressed layers as stored, the rest at bf16.",
        "",
        "| row | model MB | compressed-layer MB | layer CR | perplexity | Δ vs dense | mean whitened error | compress time "
        "| compress peak RSS | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    frontier = pareto_frontier(results)
    for rid, r in sorted(results.items(), key=lambda item: -model_bytes_of(item[1], dense)):
        cr = 1 - r["layer_bytes"] / r["layer_bytes_dense_bf16"]
        delta = f"{r['perplexity'] - dense['perplexity']:+.2f}" if dense else "–"
        secs = f"{r['compress_seconds'] / 60:.1f} min" if "compress_seconds" in r else "–"
        if r.get("compress_machine"):  # times before this field: machine not recorded
            secs += f" ({r['compress_machine']['isa']})"
        rss = f"{r['compress_peak_rss_bytes'] / 2**30:.2f} GiB" if r.get("compress_peak_rss_bytes") else "–"
        err = f"{r['mean_whitened_rel_error']:.4f}" if "mean_whitened_rel_error" in r else "–"
        lines.append(f"| {rid} | {model_bytes_of(r, dense) / 1e6:.1f} | {r['layer_bytes'] / 1e6:.1f} | {cr:.3f} | "
                     f"{r['perplexity']:.2f} | {delta} | {err} | {secs} | {rss} | {'●' if rid in frontier else ''} |")
    lines += ["", "Compress time and peak RSS: the whole compression (calibration and every layer, in that row's process) "
              "on the CPU whose widest vector ISA is in brackets (not recorded for older rows).",
              "", "Pareto (●): no other row is both smaller and lower in perplexity; the plot draws the frontier."]
    gptq_dense = sorted({f"{r['dense_perplexity_same_env']:.2f}" for r in results.values()
                         if "dense_perplexity_same_env" in r})
    if gptq_dense:
        lines[-1] += (" GPTQ rows come from llm-compressor in its own environment, whose transformers scores the "
                      f"dense model at {', '.join(gptq_dense)} on the same windows.")
    sharing = []
    for ratio in meta["ratios"]:
        for variant, what, reference in (
                ("cospadi-int8-g2", "grouped (G = 2)", "cospadi-int8"),
                ("cospadi-int8-sens", "sensitivity allocation", "cospadi-int8"),
                ("cospadi-int8-d8-sens", "sensitivity allocation (int8 dictionary)", "cospadi-int8-d8"),
                ("cospadi-int8-g2-sens", "grouped + sensitivity", "cospadi-int8"),
                ("cospadi-int8-g2-1shot", "grouped (G = 2), one-shot", "cospadi-int8-1shot")):
            row, base = results.get(row_id(variant, ratio)), results.get(row_id(reference, ratio))
            if base and row:
                change = row["perplexity"] / base["perplexity"] - 1
                cost = row["compress_seconds"] / base["compress_seconds"]
                against = "per-layer uniform" + (", one-shot" if reference.endswith("1shot") else "")
                sharing.append(f"- CR {ratio}: {what} {row['perplexity']:.2f} vs {against} {base['perplexity']:.2f} "
                               f"({change * 100:+.1f} %) → **{'lower' if change < 0 else 'NOT lower'}**; compression "
                               f"time {cost:.2f}× (layer CR {row['compression_ratio_actual']:.4f} vs "
                               f"{base['compression_ratio_actual']:.4f})")
    if sharing:
        lines += ["", "Cross-layer sharing and sensitivity allocation against per-layer uniform CoSpaDi with the same dtypes, "
                  "same budget:",
                  "", *sharing]
    verdicts = []
    for ratio in meta["ratios"]:
        svd = results.get(row_id("svd-llm", ratio))
        for variant in ("cospadi-int8-d8", "cospadi-int8-d8-sens", "cospadi-int8", "cospadi-bf16"):
            cos = results.get(row_id(variant, ratio))
            if svd and cos:
                better = cos["perplexity"] < svd["perplexity"]
                verdicts.append(f"- CR {ratio}: CoSpaDi {variant.removeprefix('cospadi-')} {cos['perplexity']:.2f} vs SVD-LLM "
                                f"{svd['perplexity']:.2f} → **{'CoSpaDi lower' if better else 'CoSpaDi NOT lower'}**")
    if verdicts:
        lines += ["", "CoSpaDi against SVD-LLM at the same byte budget:", "", *verdicts]
    through = [r for r in results.values() if r.get("evaluated_with", "").startswith("transformers cospadi")]
    if through:
        lines += ["", "Compressed rows are evaluated on the checkpoint as stored, through transformers' `cospadi` "
                  "quantizer (the serving kernels, float32 activations)."]
        rebuilt = [r for r in through if "previous_perplexity" in r and "rebuild" in r.get("previous_evaluated_with", "")]
        if rebuilt:
            worst = max(abs(r["perplexity"] / r["previous_perplexity"] - 1) for r in rebuilt)
            lines.append(f"The dense rebuild (Wᵀ = D·C in a plain model) gave the same perplexities to within "
                         f"{worst * 100:.5f} % on the {len(rebuilt)} rows evaluated both ways.")
    if any(rid.partition("@")[0].endswith(KEPT_SUFFIX) for rid in results):
        lines += ["", f"Rows `*{KEPT_SUFFIX}@CR` were measured with the previous compressor (K-SVD with OMP coding, T = 3, "
                  "k/s = 2, no atom-scale balancing or refit; commit 178ba59) and are kept for comparison; the "
                  "current code does not reproduce them."]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"svd-llm": ("tab:orange", "s", "-"), "cospadi-int8": ("tab:blue", "o", "-"),
              "cospadi-bf16": ("tab:cyan", "^", "-"), f"cospadi-int8{KEPT_SUFFIX}": ("tab:blue", "o", ":"),
              f"cospadi-bf16{KEPT_SUFFIX}": ("tab:cyan", "^", ":"), "cospadi-int8-g2": ("tab:green", "D", "-"),
              "cospadi-int8-sens": ("tab:red", "v", "-"), "cospadi-int8-g2-sens": ("tab:purple", "P", "-"),
              "cospadi-int8-d8": ("tab:olive", "h", "-"), "cospadi-int8-d8-sens": ("tab:olive", "v", ":"), "cospadi-int8-d8-fast": ("tab:olive", "*", "--"),
              "cospadi-int8-d8-quick": ("tab:olive", "d", "--"), "cospadi-int4-d8": ("tab:pink", "X", "-"),
              "cospadi-int8-d4": ("tab:brown", "v", "--"), "cospadi-int4-d4": ("tab:gray", "P", "--"),
              "cospadi-int4-d4-fast": ("tab:gray", "*", ":"),
              "cospadi-auto": ("black", "*", "-")}
    for variant, (color, marker, line) in styles.items():
        pts = sorted((model_bytes_of(r, results.get("dense")) / 1e6, r["perplexity"])
                     for rid, r in results.items() if rid.startswith(variant + "@"))
        if pts:
            label = f"{variant.removesuffix(KEPT_SUFFIX)} (previous compressor)" if variant.endswith(KEPT_SUFFIX) else variant
            ax.plot(*zip(*pts, strict=True), marker=marker, color=color, linestyle=line, label=label, alpha=0.6 if line == ":" else 1)
    dense = results.get("dense")
    for prefix, color, marker in (("rtn-", "tab:gray", "x"), ("gptq-", "tab:brown", "+")):
        pts = sorted((model_bytes_of(r, dense) / 1e6, r["perplexity"], rid.removeprefix(prefix))
                     for rid, r in results.items() if rid.startswith(prefix))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, linestyle="--", markersize=9,
                    label=f"{prefix.rstrip('-').upper()} ({', '.join(p[2] for p in pts)})")
    if dense:
        ax.scatter(dense["model_bytes"] / 1e6, dense["perplexity"], color="black", marker="*", s=120, label="dense (bf16)",
                   zorder=3)
    frontier = [(model_bytes_of(results[rid], dense) / 1e6, results[rid]["perplexity"]) for rid in pareto_frontier(results)]
    if len(frontier) > 1:
        ax.step(*zip(*frontier, strict=True), where="post", color="black", linestyle=":", linewidth=1.2,
                label="Pareto frontier", zorder=1)
    ppl = [r["perplexity"] for r in results.values()]
    if ppl and max(ppl) / min(ppl) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("model size (MB, real stored bytes)")
    ax.set_ylabel("perplexity (Wikipedia held-out)")
    ax.set_title(f"{meta['model']}: perplexity vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: SmolLM2-135M-Instruct from assets)")
    parser.add_argument("--name", help="name in the result files (default: smollm2 or the directory name)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--rows", nargs="+", help="only these rows, e.g. dense svd-llm@0.3 cospadi-int8@0.3 (compressed rows must use a ratio in --ratios)")
    parser.add_argument("--iterations", type=int, default=CompressOptions.iterations, help="dictionary-learning iterations T")
    parser.add_argument("--calib-samples", type=int, default=CompressOptions.calib_samples)
    parser.add_argument("--seq-len", type=int, default=CompressOptions.seq_len)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="where checkpoints are kept (default: cache dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the results JSON")
    parser.add_argument("--redo", action="store_true", help="evaluate the --rows again even if the JSON has them "
                        "(the previous perplexity is kept in the row as previous_perplexity)")
    args = parser.parse_args(argv)

    model_dir, name = assets.model_dir_and_name(args.model, args.name)
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {model_dir}: no config.json there (expected a Hugging Face model directory)")
    baselines = baseline_rows(group_size_for([m.in_features for m in target_linears(empty_model(model_dir))]))
    planned = ["dense", *baselines] + [row_id(v, r) for r in args.ratios for v in VARIANTS]
    unknown = [rid for rid in args.rows or [] if rid not in planned]
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: not a row of this run (rows: {' '.join(planned)})")
    args.work_dir = args.work_dir or assets.cache_dir() / "quality" / name
    from transformers import AutoTokenizer

    windows = evaluation_windows(AutoTokenizer.from_pretrained(model_dir))
    meta = {
        "model": name, "model_dir": str(model_dir), "ratios": args.ratios, "windows": windows.shape[0],
        "seq_len": windows.shape[1], "machine": f"{args.device}, {torch.get_num_threads()} threads",
        "iterations": args.iterations,
    }
    json_path = args.out / f"quality-{name}.json"
    stored = {} if args.fresh or not json_path.exists() else json.loads(json_path.read_text())
    results = stored.get("rows", {})
    # The per-CR comparisons cover every CR the JSON holds rows of, not only this run's --ratios.
    meta["ratios"] = sorted({*args.ratios, *stored.get("meta", {}).get("ratios", [])})
    todo = [rid for rid in planned if (not args.rows or rid in args.rows) and (rid not in results or args.redo)]
    if args.redo and not args.rows:
        parser.error("--redo needs --rows (which rows to evaluate again)")
    gptq = [rid for rid in todo if baselines.get(rid, ("",))[0] == "gptq"]
    if gptq and not BASELINES_PYTHON.exists():
        if args.rows:
            parser.error(f"--rows {' '.join(gptq)}: GPTQ rows need llm-compressor (run `make baselines-setup` once)")
        print(f"quality: skipping {' '.join(gptq)} (llm-compressor not set up: `make baselines-setup`)", file=sys.stderr)
        todo = [rid for rid in todo if rid not in gptq]
    previous = {rid: results[rid] for rid in todo if rid in results}
    args.out.mkdir(parents=True, exist_ok=True)
    for rid in todo:
        started = time.perf_counter()
        print(f"== {rid}", file=sys.stderr, flush=True)
        if rid == "dense":
            results[rid] = evaluate_baseline(model_dir, windows, args)
        elif rid in baselines:
            results[rid] = evaluate_baseline(model_dir, windows, args, *baselines[rid])
        else:
            variant, _, ratio = rid.partition("@")
            results[rid] = evaluate_compressed(model_dir, args.work_dir, variant, float(ratio), windows, args)
        results[rid]["wall_seconds"] = round(time.perf_counter() - started, 1)
        if rid in previous:
            old = previous[rid]
            results[rid]["previous_perplexity"] = old["perplexity"]
            results[rid]["previous_evaluated_with"] = old.get("evaluated_with", "dense rebuild (Wᵀ = D·C)")
        print(f"{rid}: perplexity {results[rid]['perplexity']:.3f}, model {results[rid]['model_bytes'] / 1e6:.1f} MB",
              flush=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))  # after every row: resumable
    missing = [rid for rid in planned if rid not in results]
    table = markdown(results, meta, missing)
    json_path.write_text(json.dumps({"meta": meta, "rows": results, "missing": missing}, indent=1))
    (args.out / f"quality-{name}.md").write_text(table)
    if results:
        plot(results, meta, args.out / f"quality-{name}.png")
    print(table)
    print(f"wrote {json_path.with_suffix('')}.json/.md/.png")
    return 0 if all(math.isfinite(r["perplexity"]) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
