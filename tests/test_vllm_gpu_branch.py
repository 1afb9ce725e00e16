"""The vLLM linear method's GPU branch without a GPU: vLLM's own merged and row-parallel layers, loaded
through their weight loaders, processed with the GPU kernel forced (C repacked into the GPU layout) and
run through the Triton kernel under the interpreter, against float64 dense math (tests/vllm_gpu_branch.py).

Checked to fail when the GPU repack or the shard offsets are wrong (see benchmarks/results/NOTES.md)."""

import json
import os
import subprocess
import sys

import pytest

from cospadi_vllm.launch import ROOT

# Interpreted Triton multiplies in float32 (triton_gemm._dot_dtype): float32 activations are exact up to
# summation order; bf16 rounds x, Z and y to 8 bits.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "dtype"), [(variant, dtype) for variant in ("bfloat16", "int8", "int4")
                                                 for dtype in TOLERANCE] + [("int4-values", "bfloat16")])
def test_vllm_layers_on_the_gpu_kernel_match_float64(tiny_checkpoints, int8_checkpoints, int4_checkpoints,
                                                     int4_dictionary_checkpoints, dtype, variant):
    """variant: the dictionary dtype (int8 values), or int4 values with a bfloat16 dictionary."""
    checkpoint = {"bfloat16": tiny_checkpoints, "int8": int8_checkpoints, "int4": int4_dictionary_checkpoints,
                  "int4-values": int4_checkpoints}[variant]["llama"]
    # the dictionary as held: a 4-bit one stays in its GPTQ words (int32, eight codes each)
    dictionary = {"int8": "int8", "int4": "int32"}.get(variant, "bfloat16")
    env = {**os.environ, "TRITON_INTERPRET": "1", "COSPADI_KERNEL": "triton", "PYTHONPATH": str(ROOT),
           "VLLM_HOST_IP": "127.0.0.1"}
    run = subprocess.run([sys.executable, "-m", "tests.vllm_gpu_branch", str(checkpoint), dtype],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(lines[-1])
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(result) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    for name, layer in result.items():
        assert layer["kernel"] == "TritonKernel", name
        held = layer["held"]
        # the GPU layout, held once: mask word-major [W, N], value rows padded to 16 bytes, no stored copy
        words, outputs = held["coef_mask"][0]
        assert outputs == held["coef_scales"][0][0] and words < outputs, (name, held)
        assert {"value_starts", "shard_table"} <= set(held), (name, held)
        assert held["dictionary"][1] == f"torch.{dictionary}", (name, held)  # never widened at load
        if variant == "int4":  # [in / 8, k] words and one float16 scale per (128 inputs, atom)
            in_features = {"down_proj": config["intermediate_size"]}.get(name, config["hidden_size"])
            words, atoms = held["dictionary"][0]
            assert words * 8 == in_features and held["dictionary_scales"] == [[-(-in_features // 128), atoms],
                                                                               "torch.float16"], (name, held)
        assert held["shard_table"][0][0] == {"qkv_proj": 3, "gate_up_proj": 2}.get(name, 1), (name, held)
        for rows, error in layer["relative_error"].items():
            assert error < TOLERANCE[dtype], (name, rows, error)
