"""Serve a CoSpaDi checkpoint once, as a user would, and check vLLM against transformers.

  1. vLLM (the plugin, float32, TP = 1) greedy tokens for three prompts against transformers on the
     checkpoint's dense rebuild (Wᵀ = D·C in plain nn.Linear layers, the independent reference), up to
     the first numerical tie (top-2 logit gap < 1e-3);
  2. ``cospadi-vllm serve CHECKPOINT`` on 127.0.0.1 and one chat question through the ``openai`` client
     (temperature 0), then the server stopped.

    python benchmarks/serve_check.py CHECKPOINT --name qwen2.5-coder-0.5b-cr0.2

Writes benchmarks/results/serve-check-<name>.{json,md}; exits 1 if the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 16


def greedy_agreement(checkpoint: Path) -> dict:
    """vLLM's greedy tokens against the dense rebuild's; the prefix compared stops at the first tie."""
    from transformers import AutoTokenizer

    from offline_compress.reader import load_reconstructed_model
    from tests.vllm_helpers import PROMPTS, hf_reference, run_vllm, untied_prefix

    served = run_vllm(checkpoint, max_tokens=MAX_TOKENS)
    if "error" in served:
        raise RuntimeError(f"vLLM failed: {served['error']}")
    reference = hf_reference(load_reconstructed_model(checkpoint), AutoTokenizer.from_pretrained(checkpoint),
                             max_tokens=MAX_TOKENS)
    rows = []
    for prompt, got, want, margins in zip(PROMPTS, served["tokens"], reference["tokens"], reference["margins"],
                                          strict=True):
        compared = untied_prefix(margins)
        rows.append({"prompt": prompt, "vllm": got, "dense_rebuild": want, "compared": compared,
                     "same": got[:compared] == want[:compared]})
    return {"plugin_picked": "quantization=cospadi" in served["stderr"], "prompts": rows}


def chat_answer(checkpoint: Path) -> dict:
    """One chat question through ``cospadi-vllm serve`` and the openai client."""
    from openai import OpenAI

    from cospadi_vllm.launch import free_port, running_server, serve_command

    port = free_port()
    cmd = serve_command(checkpoint, port, ["--served-model-name", "cospadi", "--max-model-len", "1024"])
    started = time.perf_counter()
    with running_server(cmd, checkpoint.parent / f"{checkpoint.name}-server.log", port) as base_url:
        ready = time.perf_counter() - started
        chat = OpenAI(base_url=base_url, api_key="unused").chat.completions.create(
            model="cospadi", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0)
    return {"question": QUESTION, "answer": chat.choices[0].message.content, "server_ready_seconds": round(ready, 1)}


def markdown(result: dict) -> str:
    lines = [f"# Serve check — {result['name']}", "", f"Checkpoint: `{result['checkpoint']}`. "
             f"Machine: {result['machine']}.", "",
             f"vLLM picked the cospadi method: {result['greedy']['plugin_picked']}.", "",
             "| prompt | tokens compared | vLLM = dense rebuild |", "|---|---|---|"]
    for row in result["greedy"]["prompts"]:
        lines.append(f"| {row['prompt']} | {row['compared']} of {len(row['dense_rebuild'])} | "
                     f"{'yes' if row['same'] else '**no**'} |")
    chat = result["chat"]
    lines += ["", f"`cospadi-vllm serve` (healthy after {chat['server_ready_seconds']} s), openai client, "
              f"temperature 0:", "", f"> {chat['question']}", ">", f"> {chat['answer'].strip()}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", required=True, help="name in the result files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} is not a checkpoint directory (no config.json)")
    result = {"name": args.name, "checkpoint": str(args.checkpoint),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "greedy": greedy_agreement(args.checkpoint), "chat": chat_answer(args.checkpoint)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-check-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"serve-check-{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(row["same"] for row in result["greedy"]["prompts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
