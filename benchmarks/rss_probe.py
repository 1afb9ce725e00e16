"""Where a served model's memory grows under load: resident memory of vLLM's offline engine (one process,
bf16, 32 sequences at a time, as the load test serves them) before and after rounds of the load test's
request mix (prompts of 8–900 tokens, 1–128 new tokens).

    python benchmarks/rss_probe.py --model ./smollm2-cospadi --model ./smollm2 [--env NAME=VALUE] [--rounds 3]

Each model runs in a fresh process; ``--env`` sets variables for those processes (e.g. allocator or
oneDNN settings, to test a cause). Writes benchmarks/results/rss-probe.{json,md} (``--tag`` names them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def inner(model: str, rounds: int, prompts: int, seed: int) -> dict:
    """In this process: load the model, then ``rounds`` rounds of ``prompts`` prompts of distinct lengths."""
    import random

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its RSS is ours
    from vllm import LLM, SamplingParams

    from offline_compress import assets

    text = assets.wikipedia_split("evaluation")
    # as `cospadi-vllm serve --config serve_configs/cpu-demo.yaml --max-num-seqs 32` runs in the load test
    llm = LLM(model=model, dtype="bfloat16", max_model_len=2048, enforce_eager=True, seed=0, max_num_seqs=32)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer(text[:400_000]).input_ids
    rng = random.Random(seed)
    result = {"after_load_mb": rss_mb(), "rounds_mb": []}
    for _ in range(rounds):  # the load test's mix: prompts of 8–900 tokens, 1–128 new tokens, 32 at a time
        batch, params = [], []
        for _ in range(prompts):
            length = rng.randint(8, 900)
            start = rng.randint(0, len(ids) - length - 1)
            batch.append({"prompt_token_ids": ids[start:start + length]})
            params.append(SamplingParams(max_tokens=rng.randint(1, 128), temperature=0.0, ignore_eos=True))
        llm.generate(batch, params, use_tqdm=False)
        result["rounds_mb"].append(rss_mb())
    return result


def run(model: Path, env: dict[str, str], rounds: int, prompts: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", "--model", str(model), "--rounds", str(rounds),
           "--prompts", str(prompts)]
    proc = subprocess.run(cmd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{model}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return {"model": str(model), "env": env, **json.loads(lines[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, type=Path)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the engine processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=250, help="prompts per round")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(str(args.model[0]), args.rounds, args.prompts, seed=0)), flush=True)
        return 0
    env = dict(item.split("=", 1) for item in args.env)
    results = [run(model, env, args.rounds, args.prompts) for model in args.model]
    lines = ["| model | env | after load (MB) | after each round (MB) | growth (MB) |", "|---|---|---|---|---|"]
    for r in results:
        growth = r["rounds_mb"][-1] - r["after_load_mb"]
        lines.append(f"| {r['model']} | {' '.join(f'{k}={v}' for k, v in r['env'].items()) or '-'} "
                     f"| {r['after_load_mb']:.0f} | {' → '.join(f'{x:.0f}' for x in r['rounds_mb'])} | {growth:+.0f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / f"rss-probe{'-' + args.tag if args.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
