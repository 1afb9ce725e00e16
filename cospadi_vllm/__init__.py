"""CoSpaDi quantization plugin for vLLM, and the same checkpoints in Hugging Face transformers.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process it starts;
it registers the ``cospadi`` quantization config, after which vLLM picks the method up from a
checkpoint's ``config.json`` (``quantization_config.quant_method == "cospadi"``).

Importing this package also registers ``cospadi`` with transformers (when it is installed), so
``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads CoSpaDi checkpoints (hf_quantizer.py).
"""

from __future__ import annotations

import os

# oneDNN keeps a JIT-compiled primitive per GEMM shape it has run (1024 by default, about 1 MB each).
# On CPU, CoSpaDi's prefill runs torch's bf16 GEMM (x·D, expanded tiles of C) at a new M nearly every
# step, which filled ~600 MB of that cache in the load test's first round (benchmarks/results/NOTES.md
# item 38); a step needs ~8 shapes. A user's own setting wins.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "128"


def register() -> None:
    """Idempotent: importing the config module registers it once per process. Runs before the worker
    builds the model, so oneDNN reads the cache capacity set here when it creates its first primitive."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    from cospadi_vllm import config  # noqa: F401


def _register_with_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # vLLM-only installs still work
        return
    from cospadi_vllm.hf_quantizer import register as register_hf

    register_hf()


_register_with_transformers()
