"""CoSpaDi quantization plugin for vLLM, and the same checkpoints in Hugging Face transformers.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process it starts;
it registers the ``cospadi`` quantization config, after which vLLM picks the method up from a
checkpoint's ``config.json`` (``quantization_config.quant_method == "cospadi"``).

Importing this package also registers ``cospadi`` with transformers (when it is installed), so
``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads CoSpaDi checkpoints (hf_quantizer.py).
"""

from __future__ import annotations


def register() -> None:
    """Idempotent: importing the config module registers it once per process."""
    from cospadi_vllm import config  # noqa: F401


def _register_with_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # vLLM-only installs still work
        return
    from cospadi_vllm.hf_quantizer import register as register_hf

    register_hf()


_register_with_transformers()
