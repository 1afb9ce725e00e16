"""Triton kernel for the CoSpaDi GEMM: Y = (X·D)·C with C read compressed.

Stage 1, Z = X·D [M, K], is a plain dense GEMM and goes to cuBLAS (``torch.matmul``): K is small,
the dictionary is dense, and nothing custom beats the vendor library there.
Stage 2, Y = Z·C, is the kernel here. Each program owns a [BLOCK_M, BLOCK_N] output tile and walks
the atoms in BLOCK_K steps; for every step it rebuilds the [BLOCK_K, BLOCK_N] tile of C on chip from

- ``coef_mask``  [N, W] int32: bit t of row j set ⇔ atom ``atom_offsets[j] + t`` is used by output j,
- ``coef_values`` [N, S] int8 / float8_e4m3fn / bf16: the non-zeros of row j in increasing atom order,
- ``coef_scales`` [N] float32: per-output scale (applied once to the accumulator, since it factors
  out of the sum over atoms),

and multiplies it with the matching Z tile with ``tl.dot``. A value's position in its row is the
number of set bits before it: a running per-column count across K steps plus a ``tl.cumsum``
inside the step. Merged layers (qkv, gate_up) need nothing special: mask bits are shard-relative
and ``atom_offsets`` says where each output's shard starts in the concatenated dictionary; a tile
only walks the atom range its columns can touch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cospadi_vllm import format as fmt


@triton.jit
def _sparse_coef_matmul_kernel(
    z_ptr, mask_ptr, values_ptr, scales_ptr, offsets_ptr, y_ptr,
    M, N, K, WORDS, S_MAX, stride_zm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    atom_offset = tl.load(offsets_ptr + rn, mask=n_ok, other=0)
    local_atoms = WORDS * 32
    # Only the atoms this tile's columns can use: [min offset, max offset + 32·W) ∩ [0, K).
    k_lo = tl.min(tl.where(n_ok, atom_offset, K), axis=0)
    k_lo = (k_lo // BLOCK_K) * BLOCK_K
    k_hi = tl.minimum(tl.max(tl.where(n_ok, atom_offset, 0), axis=0) + local_atoms, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seen = tl.zeros((BLOCK_N,), dtype=tl.int32)  # set bits already consumed in each column's row
    for k_start in range(k_lo, k_hi, BLOCK_K):
        rk = k_start + tl.arange(0, BLOCK_K)
        local = rk[:, None] - atom_offset[None, :]  # [BLOCK_K, BLOCK_N] shard-relative atom index
        in_row = (local >= 0) & (local < local_atoms) & n_ok[None, :] & (rk[:, None] < K)
        safe_local = tl.where(in_row, local, 0)
        word = tl.load(mask_ptr + rn[None, :] * WORDS + safe_local // 32, mask=in_row, other=0)
        bit = tl.where(in_row, (word >> (safe_local % 32)) & 1, 0)
        rank = seen[None, :] + tl.cumsum(bit, axis=0) - 1
        coef = tl.load(values_ptr + rn[None, :] * S_MAX + rank, mask=bit != 0, other=0.0)
        seen += tl.sum(bit, axis=0)
        z = tl.load(z_ptr + rm[:, None] * stride_zm + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        acc += tl.dot(z.to(DOT_DTYPE), coef.to(DOT_DTYPE))

    scale = tl.load(scales_ptr + rn, mask=n_ok, other=0.0)
    out = acc * scale[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def block_shape(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per regime.

    Decode (M ≤ 16): one M tile (tl.dot's minimum is 16) and narrow N tiles so a 4096-wide layer
    still spreads over ≥ 128 programs; the work is reading C, so parallelism is what matters.
    Prefill: square-ish tiles that reuse each expanded C tile across 64–128 rows of Z.
    """
    if m <= 16:
        return 16, 32, 64, 4
    if m <= 256:
        return 64, 64, 64, 4
    return 128, 128, 32, 8


def _dot_dtype(x: torch.Tensor):
    # The CPU interpreter (TRITON_INTERPRET=1) computes bf16 tl.dot wrongly (checked on Triton 3.9),
    # so interpreted runs multiply in float32; on GPUs the tensor cores take the activation dtype.
    if not x.is_cuda:
        return tl.float32
    return tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16


def sparse_coef_matmul(
    z: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z [M, K] · C → [M, N] with C given compressed (mask [N, W], values [N, S], scales [N], offsets [N]).

    ``out`` (optional, [M, N] contiguous, ``out_dtype``) receives the result.
    """
    m, k = z.shape
    n, words = coef_mask.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=z.device) if out is None else out
    if y.shape != (m, n) or y.dtype != out_dtype or y.stride(1) != 1:
        raise ValueError(f"out must be a contiguous [{m}, {n}] {out_dtype} tensor")
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k, num_warps = block_shape(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _sparse_coef_matmul_kernel[grid](
        z, coef_mask, coef_values, coef_scales, atom_offsets, y,
        m, n, k, words, coef_values.shape[1], z.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=_dot_dtype(z), num_warps=num_warps,
    )
    return y


def cospadi_gemm_triton(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
) -> torch.Tensor:
    """x [M, in] → [M, out]: Z = x·D by cuBLAS, then Z·C by the kernel above."""
    if coef_mask.dtype != fmt.MASK_DTYPE:
        raise TypeError(f"coef_mask must be {fmt.MASK_DTYPE}, got {coef_mask.dtype}")
    z = x @ dictionary.to(x.dtype)
    return sparse_coef_matmul(z, coef_mask, coef_values, coef_scales, atom_offsets, x.dtype)
