"""CoSpaDi quantization plugin for vLLM.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process it starts;
it registers the ``cospadi`` quantization config, after which vLLM picks the method up from a
checkpoint's ``config.json`` (``quantization_config.quant_method == "cospadi"``).
"""

from __future__ import annotations


def register() -> None:
    """Idempotent: importing the config module registers it once per process."""
    from cospadi_vllm import config  # noqa: F401
