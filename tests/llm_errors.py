"""Construct vLLM's offline LLM on each checkpoint given; print {dir: "ExceptionType: message"} as JSON.

    python -m tests.llm_errors DIR [DIR ...]

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the exception the plugin raises
is the one the caller sees. "ok" for a checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM

    results = {}
    for model in sys.argv[1:]:
        try:
            LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
            results[model] = "ok"
        except Exception as err:  # the test inspects the type and message
            results[model] = f"{type(err).__name__}: {err}"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
