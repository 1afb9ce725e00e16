"""The GPU layout of C (cospadi_vllm/kernels/gpu_layout.py), the capability check, the Triton kernel compiled
ahead of time for Ampere / Hopper (no GPU needed), and the GPU-side modules without vLLM."""

import os
import subprocess
import sys

import pytest
import torch

from cospadi_vllm.kernels import gpu_layout
from cospadi_vllm.launch import ROOT
from tests.reference import VALUE_DTYPES, merged_layer, reference_coefficients, stored_value


def dense_from_packed(packed: gpu_layout.PackedCoefficients, k_total: int) -> torch.Tensor:
    """C [k_total, N] in float64 read from the packed layout one output at a time (plain Python walk)."""
    dense = torch.zeros(k_total, packed.out_features, dtype=torch.float64)
    for first, count, atom_start, atom_end in packed.shard_table.tolist():
        for n in range(first, first + count):
            words = packed.mask_words[:, n].tolist()
            for g in range(packed.value_starts.shape[0]):  # every group's start is the running count
                counted = sum(bin(w & 0xFFFFFFFF).count("1") for w in words[: g * gpu_layout.WORDS_PER_GROUP])
                assert packed.value_starts[g, n] == counted
            position = 0
            for atom in range(min(atom_end, k_total) - atom_start):
                if words[atom // 32] >> (atom % 32) & 1:
                    value = stored_value(packed.values, torch.tensor([n]), torch.tensor([position]))
                    dense[atom_start + atom, n] = float(value) * float(packed.scales[n])
                    position += 1
    return dense


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_repacked_layout_holds_the_same_coefficients(value_dtype):
    g = torch.Generator().manual_seed(len(value_dtype))
    shards = [(300, 13, 120), (70, 20, 11), (33, 9, 2)]  # 10 mask words: two value groups
    _, coef, k_total = merged_layer(value_dtype, g, shards=shards)
    packed = gpu_layout.repack(*coef)
    assert packed.mask_words.shape == (10, 42) and packed.mask_words.is_contiguous()
    assert packed.values.shape[1] * packed.values.element_size() % gpu_layout.VALUE_ROW_ALIGN_BYTES == 0
    assert packed.value_starts.shape == (2, 42) and packed.shard_outputs == (13, 20, 9)
    assert packed.shard_table.tolist() == [[0, 13, 0, 300], [13, 20, 300, 370], [33, 9, 370, 370 + 320]]
    assert torch.equal(dense_from_packed(packed, k_total), reference_coefficients(*coef, k_total))


def test_capability_check_names_dtype_and_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    gpu_layout.check_capability(torch.int8, torch.device("cuda"))  # Ampere runs int8 / bf16 values
    with pytest.raises(gpu_layout.UnsupportedGPUError, match=r"float8_e4m3fn .*>= 8\.9.*NVIDIA A10 has 8\.6"):
        gpu_layout.check_capability(torch.float8_e4m3fn, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(gpu_layout.UnsupportedGPUError, match=r"bfloat16 .*>= 8\.0.*has 7\.5"):
        gpu_layout.check_capability(torch.bfloat16, torch.device("cuda"))


def _compile(kernel_fn, capability: int, signature: dict, constants: dict, num_warps: int):
    """Triton's NVIDIA backend and ptxas, ahead of time (no GPU): the compiled kernel, checked to fit in
    registers (no local-memory spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(fn=kernel_fn, signature=signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    case = (kernel_fn.__name__, capability, signature, constants)
    assert kernel.asm["cubin"] and kernel.metadata.num_warps == num_warps, case
    assert ".local" not in kernel.asm["ptx"], f"register spills: {case}"
    return kernel


def test_kernels_compile_for_ampere_and_hopper_without_spills(monkeypatch):
    """Ahead-of-time compilation for sm_80 and sm_90 of every kernel and regime: the lanes kernel for FMA
    tiles of 1, 2 and 4 rows, the decode and prefill tl.dot in each dtype, a split over atoms; the
    bit-walk decode kernel; the float32 x·D kernel. The interpreter accepts code the compiler rejects."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (it warns when unset)
    pytest.importorskip("triton")
    import triton.language as tl

    from cospadi_vllm.kernels import triton_gemm

    pointers = ("z_ptr", "mask_ptr", "values_ptr", "starts_ptr", "scales_ptr", "shards_ptr", "out_ptr")
    scalars = ("M", "N", "K", "S_PAD", "stride_zm", "stride_om", "stride_split")
    cases = [(90, "bf16", "i8", 1), (90, "bf16", "i8", 2), (90, "fp16", "i8", 4), (90, "fp16", "fp8e4nv", 9),
             (90, "bf16", "bf16", 64), (90, "fp32", "i8", 512), (80, "bf16", "i8", 1), (80, "fp32", "bf16", 16),
             (80, "bf16", "i8", 2048), (90, "bf16", "u8", 1), (90, "fp16", "u8", 16), (80, "bf16", "u8", 600)]
    dot_dtypes = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    for capability, act, values, m in cases:
        block_m, block_n, use_dot, num_warps = triton_gemm.launch_config(m)
        types = dict(zip(pointers, (f"*{act}", "*i32", f"*{values}", "*i32", "*fp32", "*i32", f"*{act}"), strict=True))
        signature = {**types, **dict.fromkeys(scalars, "i32")}
        common = {"NUM_SHARDS": 3, "BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": 2 if m <= 16 else 1,
                  "HARDWARE_POPCOUNT": True, "WORDS_PER_GROUP": gpu_layout.WORDS_PER_GROUP,
                  "PACKED_INT4": values == "u8"}
        _compile(triton_gemm._coef_product_kernel, capability, signature,
                 {**common, "USE_DOT": use_dot, "DOT_DTYPE": dot_dtypes[act]}, num_warps)
        if m <= triton_gemm.DECODE_MAX_ROWS:
            _compile(triton_gemm._coef_product_bitwalk_kernel, capability, signature, common, num_warps)
    for capability in (80, 90):
        signature = {"x_ptr": "*fp32", "d_ptr": "*bf16", "z_ptr": "*fp32",
                     **dict.fromkeys(("M", "K", "IN", "stride_xm", "stride_dn", "stride_zm"), "i32")}
        for block_m in (16, 64):
            _compile(triton_gemm._dictionary_product_kernel, capability, signature,
                     {"BLOCK_M": block_m, "BLOCK_K": 64, "BLOCK_IN": 32, "INPUT_PRECISION": "ieee"}, 4)


NO_VLLM = """
import os, sys
sys.modules["vllm"] = None  # import vllm raises ImportError, as on the GPU machines
import torch
import cospadi_vllm  # registers the transformers quantizer
from cospadi_vllm.kernels import KernelConfig, choose_kernel
from tests.reference import HeldLayer, merged_layer, reference_coefficients
dictionary, coef, k_total = merged_layer("int8", torch.Generator().manual_seed(3))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Triton compiled, or interpreted here
layer = HeldLayer(dictionary, coef).to(device)
kernel = choose_kernel(KernelConfig(device, torch.float32, torch.int8), name="triton")
kernel.process_weights_after_loading(layer)  # C repacked; Z·C through the op registered by torch.library
x = torch.randn(5, dictionary.shape[0])
y = kernel.apply(layer, x.to(device))
reference = x.double() @ dictionary.double() @ reference_coefficients(*coef, k_total)
assert float((y.double().cpu() - reference).norm() / reference.norm()) < 1e-3
assert "vllm" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def test_gpu_side_modules_run_without_vllm():
    """The GPU machines have torch, triton and transformers but no vLLM: the kernels (with the Triton op
    registered through torch.library) and the transformers integration must import and run there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", NO_VLLM], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:] + run.stderr[-3000:]
