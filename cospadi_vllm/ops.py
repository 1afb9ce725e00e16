"""CoSpaDi GEMM Y = (X·D)·C in two stages, each usable on its own (tensor parallelism communicates Z).

- ``dictionary_product``: Z = X·D, a dense GEMM (torch / cuBLAS / oneDNN). D stays in its stored
  bfloat16; float32 activations multiply a transient float32 copy.
- ``coefficient_product``: Y = Z·C with C read as stored (mask + values + scales). On GPUs the Triton
  kernel (``triton_kernels``); on CPU one C++ op (``cpu_kernels``): a direct sparse product for
  decode-sized M, and for prefill-sized M dense tiles of C expanded on the fly (a few MB, freed after
  the call) multiplied by torch's GEMM. No layer keeps a dense copy of C.

Merged layers (qkv, gate_up) keep each shard's mask bits relative to that shard's dictionary;
``atom_offsets[j]`` is the column of the concatenated dictionary (of Z) where output j's shard starts.
Values rows are padded to the largest s of the merged shards; only the first popcount(row)
entries of a row are read.
"""

from __future__ import annotations

import torch

from cospadi_vllm import cpu_kernels
from cospadi_vllm import format as fmt
from cospadi_vllm.gpu_layout import PackedCoefficients, repack

# CPU: up to this many rows of Z the direct sparse kernels win; above it, tiles of C expanded to
# bf16/float32 (≤ 8 MiB, freed after the call) and multiplied by torch's GEMM. Both inside one C++
# op (cpu_kernels); measured on the 2-core AVX-512 machine (benchmarks/results/NOTES.md).
CPU_DIRECT_MAX_ROWS = 32
# The same for int8 values × bfloat16 Z on the int16 kernel (AVX-512 VNNI + VBMI2): on SmolLM2's
# layers it beats the expanded tiles up to ~150 rows with 2 threads and up to ~64–100 rows with one
# (what vLLM's CPU worker gets on a 2-core machine; NOTES.md item 28).
CPU_INT16_MAX_ROWS = 96

def dictionary_product(x: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """x [M, in] · D [in, k] → Z [M, k] in x's dtype."""
    return x @ (dictionary if dictionary.dtype == x.dtype else dictionary.to(x.dtype))


def gemm_backend(device: torch.device) -> str:
    """Which implementation serves tensors on ``device``: the Triton kernel on GPUs, C++ on CPU.

    Triton has no CPU backend (its interpreter is for tests, far too slow to serve).
    """
    return "triton" if device.type == "cuda" else "cpu"


def int16_path(z_dtype: torch.dtype, value_dtype: torch.dtype) -> bool:
    """Whether Z·C takes the int16 kernel (int8 values × bfloat16 Z on AVX-512 VNNI + VBMI2: int16
    dot products, C expanded in registers or once per chunk of rows) up to ``CPU_INT16_MAX_ROWS``."""
    return z_dtype == torch.bfloat16 and value_dtype == torch.int8 and cpu_kernels.has_int16_kernel()


def cpu_direct_max_rows(z_dtype: torch.dtype, value_dtype: torch.dtype) -> int:
    """Rows of Z up to which the C++ op uses its direct kernels (above: expanded tiles + GEMM)."""
    return CPU_INT16_MAX_ROWS if int16_path(z_dtype, value_dtype) else CPU_DIRECT_MAX_ROWS


def coefficient_product_cpu(
    z: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    out_dtype: torch.dtype,
    direct_max_rows: int | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """z [M, K] · C → [M, N] on CPU, one C++ op call. ``direct_max_rows`` and ``portable`` (the scalar
    kernels) let tests force each path."""
    table, kind = cpu_kernels.value_decoding(coef_values.dtype)
    if direct_max_rows is None:
        direct_max_rows = CPU_DIRECT_MAX_ROWS if portable else cpu_direct_max_rows(z.dtype, coef_values.dtype)
    y = torch.ops.cospadi_cpu.coef_product(z, coef_mask, coef_values, coef_scales, atom_offsets, table, kind,
                                           portable, out_dtype == torch.float32, direct_max_rows)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def coefficient_product_impl(
    z: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
) -> torch.Tensor:
    """The body of ``torch.ops.vllm.cospadi_coefficient_product``: dispatch on the device."""
    if gemm_backend(z.device) == "triton":
        from cospadi_vllm.triton_kernels import packed_coef_product  # imports triton: GPU machines only

        # C as stored on a GPU: repacked per call (layers repack once at load and use the packed op).
        return packed_coef_product(z, repack(coef_mask, coef_values, coef_scales, atom_offsets))
    return coefficient_product_cpu(z, coef_mask, coef_values, coef_scales, atom_offsets, z.dtype)


def _coefficient_product_fake(
    z: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
) -> torch.Tensor:
    return z.new_empty((z.shape[0], coef_mask.shape[0]))


_REGISTERED = False
_LIBRARY: torch.library.Library | None = None  # keeps ops defined without vLLM alive


def _define_op(op_name: str, op_func, fake_impl) -> None:
    """``torch.ops.vllm.<op_name>`` through vLLM's ``direct_register_custom_op`` where vLLM is
    installed, else the same low-overhead ``torch.library`` registration done here (GPU machines with
    only torch + transformers run the transformers integration through the same ops)."""
    global _LIBRARY
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("vllm", "FRAGMENT")
        _LIBRARY.define(op_name + torch.library.infer_schema(op_func, mutates_args=()))
        for dispatch_key in ("CPU", "CUDA"):
            _LIBRARY.impl(op_name, op_func, dispatch_key=dispatch_key)
        _LIBRARY._register_fake(op_name, fake_impl)
        return
    direct_register_custom_op(op_name=op_name, op_func=op_func, mutates_args=[], fake_impl=fake_impl)


def packed_coefficient_product_impl(
    z: torch.Tensor,
    mask_words: torch.Tensor,
    values: torch.Tensor,
    value_starts: torch.Tensor,
    scales: torch.Tensor,
    shard_table: torch.Tensor,
    shard_outputs: list[int],
) -> torch.Tensor:
    """The body of ``torch.ops.vllm.cospadi_packed_coefficient_product``: C in the GPU layout."""
    from cospadi_vllm.triton_kernels import packed_coef_product  # imports triton: GPU machines only

    packed = PackedCoefficients(mask_words, values, value_starts, scales, shard_table, tuple(shard_outputs))
    return packed_coef_product(z, packed)


def _packed_coefficient_product_fake(z, mask_words, values, value_starts, scales, shard_table, shard_outputs):
    return z.new_empty((z.shape[0], mask_words.shape[1]))


def register_custom_op() -> None:
    """Register ``torch.ops.vllm.cospadi_coefficient_product`` (C as stored) and
    ``cospadi_packed_coefficient_product`` (C in the GPU layout) once per process (opaque to
    torch.compile / CUDA graphs)."""
    global _REGISTERED
    if _REGISTERED or hasattr(torch.ops.vllm, "cospadi_coefficient_product"):
        _REGISTERED = True
        return
    _define_op("cospadi_coefficient_product", coefficient_product_impl, _coefficient_product_fake)
    _define_op("cospadi_packed_coefficient_product", packed_coefficient_product_impl,
               _packed_coefficient_product_fake)
    _REGISTERED = True


def coefficient_product(
    z: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
) -> torch.Tensor:
    """Z [M, K] · C → [M, N] in Z's dtype, through the registered custom op."""
    register_custom_op()
    return torch.ops.vllm.cospadi_coefficient_product(z, coef_mask, coef_values, coef_scales, atom_offsets)


def packed_coefficient_product(z: torch.Tensor, packed: PackedCoefficients) -> torch.Tensor:
    """Z [M, K] · C → [M, N] in Z's dtype, C in the GPU layout, through the registered custom op."""
    register_custom_op()
    return torch.ops.vllm.cospadi_packed_coefficient_product(z, *packed.tensors(), list(packed.shard_outputs))


def reference_coefficients(
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    k_total: int,
) -> torch.Tensor:
    """Dense C [k_total, N] in float64 (tests and benchmarks only: it is what the kernels avoid)."""
    out_features, words = coef_mask.shape
    bits = fmt.unpack_mask(coef_mask, words * fmt.BITS_PER_WORD)  # [out, W*32]
    rows, cols = bits.nonzero(as_tuple=True)  # row-major: each row's atoms in increasing order
    rank = bits.to(torch.int32).cumsum(1)[rows, cols].long() - 1  # position of the bit in its row
    dense = torch.zeros(k_total, out_features, dtype=torch.float64, device=coef_mask.device)
    vals = coef_values[rows, rank].double() * coef_scales.double()[rows]
    dense[atom_offsets.long()[rows] + cols, rows] = vals
    return dense
