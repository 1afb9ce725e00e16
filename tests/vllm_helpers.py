"""Helpers shared by the vLLM tests: run the engine out of process; the HF reference side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The history of the city begins in",
    "In mathematics, a prime number is",
    "Water boils at a temperature of",
]


def run_vllm(model_dir: Path, prompts=PROMPTS, tp: int = 1, max_tokens: int = 8, timeout: int = 900,
             dtype: str = "float32", pp: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vllm_runner", str(model_dir), "--prompts-json", json.dumps(prompts),
         "--tp", str(tp), "--pp", str(pp), "--max-tokens", str(max_tokens), "--dtype", dtype],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"vLLM runner printed no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1])
    result["stderr"] = proc.stdout + proc.stderr  # vLLM logs to stdout
    return result


@torch.no_grad()
def hf_reference(model, tokenizer, prompts=PROMPTS, max_tokens: int = 8) -> dict:
    """Greedy tokens and prompt logprobs from a transformers model: the independent reference when it is
    the dense rebuild (reader.load_reconstructed_model: Wᵀ = D·C in float32, plain nn.Linear)."""
    result = {"tokens": [], "prompt_logprobs": [], "margins": []}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        logits = model(ids).logits[0].double().log_softmax(-1)
        result["prompt_logprobs"].append(logits[:-1].gather(1, ids[0, 1:, None]).squeeze(1).tolist())
        generated, margins = ids, []
        for _ in range(max_tokens):
            step = model(generated).logits[0, -1].double()
            top2 = step.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            generated = torch.cat([generated, step.argmax().view(1, 1)], dim=1)
        result["tokens"].append(generated[0, ids.shape[1]:].tolist())
        result["margins"].append(margins)
    return result


def untied_prefix(margins: list[float], min_margin: float = 1e-3) -> int:
    """How many greedy tokens to compare: those before the first step whose top-2 logit gap is below
    min_margin (a numerical tie, where either pick is right)."""
    return next((i for i, m in enumerate(margins) if m < min_margin), len(margins))


def assert_same_greedy(vllm_tokens, hf, min_margin: float = 1e-3, every_prompt: bool = True):
    """Tokens must match up to the first numerical tie of HF's picks (``untied_prefix``); at least one token per
    prompt (``every_prompt``) or in all."""
    compared = 0
    for got, want, margins in zip(vllm_tokens, hf["tokens"], hf["margins"], strict=True):
        n = untied_prefix(margins, min_margin)
        assert got[:n] == want[:n], (got, want, margins)
        assert n >= 1 or not every_prompt, (got, want, margins)
        compared += n
    assert compared >= 1


# Top-2 logit gaps below which either greedy pick is right: float32 sums in another order; bfloat16 activations
# (vLLM) against the float32 dense rebuild (transformers), whose prompt log-probabilities differed by ≤ 0.011 on
# the tiny shared Qwen2 — there, every prompt's logprobs must stay within BF16_LOGPROB_TOL, and the tiny random
# model's near-ties (top-2 gaps of 0.003–0.4) leave some prompts without a token to compare.
MIN_MARGIN = {"float32": 1e-3, "bfloat16": 0.025}
BF16_LOGPROB_TOL = 0.03


def assert_vllm_matches_dense_rebuild(checkpoint: Path, tensor_parallel: tuple[int, ...] = (1,),
                                      dtype: str = "float32") -> None:
    """vLLM (CPU) at TP = 1 gives the greedy tokens of transformers on the checkpoint's dense rebuild, and every
    other TP size in ``tensor_parallel`` the same tokens as TP = 1; at bfloat16, every TP size the rebuild's
    tokens up to each prompt's first near-tie (``MIN_MARGIN``) and its prompt log-probabilities within
    ``BF16_LOGPROB_TOL``."""
    from transformers import AutoTokenizer

    from offline_compress.reader import load_reconstructed_model

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = hf_reference(load_reconstructed_model(checkpoint), tokenizer)
    tp1 = None
    for tp in sorted(set(tensor_parallel) | {1}):
        run = run_vllm(checkpoint, tp=tp, dtype=dtype)
        assert "error" not in run, (tp, run.get("error"))
        assert "quantization=cospadi" in run["stderr"]
        if dtype == "float32":
            if tp == 1:
                tp1 = run
                assert_same_greedy(run["tokens"], reference)
            else:
                assert run["tokens"] == tp1["tokens"], tp
            continue
        assert_same_greedy(run["tokens"], reference, MIN_MARGIN[dtype], every_prompt=False)
        for got, want in zip(run["prompt_logprobs"], reference["prompt_logprobs"], strict=True):
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= BF16_LOGPROB_TOL, (tp, got, want)
