#!/usr/bin/env bash
# Every GPU check in one run, for a CUDA machine with torch + triton + transformers (no vLLM, no network).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else benchmarks/results/gpu
#
# Parts, with a time limit each (expected on one H100 in parentheses; ≤ 10 min in all):
#   tests     (≈ 3 min, limit 240 s)  the Triton kernel compiled, against float64 (both decode kernels, every
#             regime, split over atoms, offsets past 2³¹, the float32 x·D kernel), the GPU layout, CUDA graphs
#             and torch.compile around the transformers layer, the GPU modules without vLLM
#   kernels   (≈ 2 min, limit 180 s)  kernel_bench.py: Llama-3-8B shapes, CR 0.2 / 0.3, M ∈ {1, 16, 256, 2048},
#             dense bf16 and both decode kernels, with the bytes / FLOPs floor measured in the same run
#   decode    (≈ 2 min, limit 150 s)  decode_bench.py: transformers greedy decode in CUDA graphs, dense vs
#             CoSpaDi CR 0.3 with each decode kernel, batch 1 and 16
#   compress  (≈ 2 min, limit 150 s)  compress_bench.py --device cuda: the Llama-3-8B gate shape (phases) and
#             Llama-3.2-1B's four shapes (whole recipe), projecting the 1B model's compression time
# Each part writes its log and result files to OUT_DIR; parts.txt lists each part's exit code and seconds.
# pytest is installed from ./.gpu-wheels (pip download pytest -d .gpu-wheels) when the image lacks it.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record exit and time
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/parts.txt"
}

: > "$OUT_DIR/parts.txt"
nvidia-smi > "$OUT_DIR/gpu.txt" 2>&1
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" >> "$OUT_DIR/gpu.txt" 2>&1
if ! $PY -c "import pytest" 2>/dev/null && [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --find-links .gpu-wheels pytest >> "$OUT_DIR/gpu.txt" 2>&1
fi

part tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py tests/test_gpu_layout.py \
  tests/test_cuda_graphs.py
part kernels 180 $PY benchmarks/kernel_bench.py --models llama3-8b --ratios 0.2 0.3 --m 1 16 256 2048 \
  --impls dense cospadi-triton cospadi-triton-bitwalk --out "$OUT_DIR"
part decode 150 $PY benchmarks/decode_bench.py --ratios 0.3 --decode-kernels lanes bitwalk --repeats 3 \
  --out "$OUT_DIR"
part compress 150 $PY benchmarks/compress_bench.py --device cuda --ratios 0.2 --no-real-layer \
  --shapes llama3-8b-gate llama3.2-1b-q llama3.2-1b-kv llama3.2-1b-gate llama3.2-1b-down \
  --full llama3.2-1b-q llama3.2-1b-kv llama3.2-1b-gate llama3.2-1b-down --out "$OUT_DIR"
cat "$OUT_DIR/parts.txt"
