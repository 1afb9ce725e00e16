"""Triton kernel for the CoSpaDi GEMM: Y = (X·D)·C with C read compressed, in the GPU layout.

Stage 1, Z = X·D [M, K], is a plain dense GEMM and goes to cuBLAS (``torch.matmul``).
Stage 2, Y = Z·C, is the kernel here. It reads C as ``gpu_layout.repack`` lays it out at load time
(word-major mask, 16-byte aligned value rows, value starts per group of mask words, a shard table).

One kernel serves every M; what changes with M is the tile and how the product is summed:

- decode (M ≤ 16): GEMV-like. A program owns BLOCK_N outputs of one shard and walks their mask one
  word (32 atoms) at a time: the BLOCK_N words are one contiguous load, each set bit's value is found
  by its rank (popcount of the lower bits, plus the running count of the output's earlier values) in
  the output's contiguous value row. For M ≤ 4 the products are float32 FMAs kept per atom lane and
  summed once at the end (no tensor cores for a single row); for 4 < M ≤ 16 one 16-row ``tl.dot``.
  Where output tiles alone would leave SMs idle, programs also split the atoms (SPLIT_K > 1, at
  group boundaries where ``value_starts`` gives the first value) and add float32 partials after.
- prefill (M > 16): the same expansion of each [32, BLOCK_N] piece of C in registers, multiplied with
  the matching Z tile by ``tl.dot`` on tensor cores over 64–128-row tiles of Z.

Precision: float32 activations multiply in float32 (FMA path) or tf32 (tl.dot's float32 mode); bf16
and fp16 activations multiply in their own dtype with float32 accumulation. The per-output scale
factors out of the sum and is applied once. Offsets that can pass 2³¹ (rows × row stride, outputs ×
padded value row) are computed in int64.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels.gpu_layout import WORDS_PER_GROUP, PackedCoefficients

DECODE_MAX_ROWS = 16  # M up to here: the decode configuration (split over atoms allowed)
FMA_MAX_ROWS = 4  # M up to here: float32 FMAs instead of tl.dot
# Decode kernels (M ≤ DECODE_MAX_ROWS): "lanes" walks every atom position, "bitwalk" only the set bits.
DECODE_KERNELS = ("lanes", "bitwalk")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _popcount(x, HARDWARE: tl.constexpr):
    """Set bits of each uint32 element (int32 result): the POPC instruction when compiled, bit counting
    by halves when interpreted (the interpreter has no libdevice)."""
    if HARDWARE:
        return libdevice.popc(x.to(tl.int32, bitcast=True))
    else:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _load_values(value_rows, index, mask, PACKED_INT4: tl.constexpr):
    """Value number ``index`` of each output's row (pointers ``value_rows``, broadcast with ``index``): as
    stored, or for int4 rows (two per byte, low nibble first) byte index // 2, its nibble sign-extended."""
    if PACKED_INT4:
        byte = tl.load(value_rows + (index >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((index & 1) * 4)) & 0xF
        return (nibble ^ 8) - 8  # 4-bit two's complement
    else:
        return tl.load(value_rows + index, mask=mask, other=0.0)


@triton.jit
def _column_block(shards_ptr, pid_n, NUM_SHARDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first output, end output, first atom, end atom) of column block ``pid_n``: blocks are numbered shard
    after shard, each shard's outputs cut into blocks of BLOCK_N."""
    col_start = tl.full((), 0, tl.int32)
    col_end = tl.full((), 0, tl.int32)
    atom_start = tl.full((), 0, tl.int32)
    atom_end = tl.full((), 0, tl.int32)
    blocks_before = tl.full((), 0, tl.int32)
    for i in tl.static_range(NUM_SHARDS):
        first = tl.load(shards_ptr + 4 * i)
        count = tl.load(shards_ptr + 4 * i + 1)
        blocks = tl.cdiv(count, BLOCK_N)
        mine = (pid_n >= blocks_before) & (pid_n < blocks_before + blocks)
        col_start = tl.where(mine, first + (pid_n - blocks_before) * BLOCK_N, col_start)
        col_end = tl.where(mine, first + count, col_end)
        atom_start = tl.where(mine, tl.load(shards_ptr + 4 * i + 2), atom_start)
        atom_end = tl.where(mine, tl.load(shards_ptr + 4 * i + 3), atom_end)
        blocks_before += blocks
    return col_start, col_end, atom_start, atom_end


@triton.jit
def _program_tile(starts_ptr, shards_ptr, M, N, K, NUM_SHARDS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, WORDS_PER_GROUP: tl.constexpr):
    """What this program computes: rows rm, outputs rn (one shard's), that shard's first atom and atom
    count, its mask words [w_lo, w_hi) (a run of whole groups: value_starts gives a group's first value)
    and, per output, how many values lie before w_lo."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(2)
    col_start, col_end, atom_start, atom_end = _column_block(shards_ptr, tl.program_id(1), NUM_SHARDS, BLOCK_N)
    atoms = tl.minimum(atom_end, K) - atom_start  # this shard's columns of Z
    words = tl.cdiv(atoms, 32)
    groups_per_split = tl.cdiv(tl.cdiv(words, WORDS_PER_GROUP), SPLIT_K)
    w_lo = pid_k * groups_per_split * WORDS_PER_GROUP
    w_hi = tl.minimum(w_lo + groups_per_split * WORDS_PER_GROUP, words)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = col_start + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < col_end
    has_words = (tl.zeros((BLOCK_N,), tl.int32) + w_lo) < w_hi  # a split past the shard's last group reads nothing
    seen = tl.load(starts_ptr + (w_lo // WORDS_PER_GROUP) * N + rn, mask=n_ok & has_words, other=0)
    return rm, rn, m_ok, n_ok, atom_start, atoms, w_lo, w_hi, seen


@triton.jit
def _store_scaled(total, scales_ptr, out_ptr, rm, rn, m_ok, n_ok, stride_om, stride_split):
    """out[split, rm, rn] = total · scale[rn] (the per-output scale factors out of the sum)."""
    scale = tl.load(scales_ptr + rn, mask=n_ok, other=0.0)
    out = total * scale[None, :]
    out_ptrs = out_ptr + tl.program_id(2).to(tl.int64) * stride_split + rm.to(tl.int64)[:, None] * stride_om \
        + rn[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _coef_product_kernel(
    z_ptr, mask_ptr, values_ptr, starts_ptr, scales_ptr, shards_ptr, out_ptr,
    M, N, K, S_PAD, stride_zm, stride_om, stride_split,
    NUM_SHARDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, HARDWARE_POPCOUNT: tl.constexpr,
    WORDS_PER_GROUP: tl.constexpr, PACKED_INT4: tl.constexpr,
):
    """out[split, m, n] (+)= Σ_atoms z[m, atom] · C[atom, n], walking every atom position of a word: each
    of the 32 lanes finds its value by rank (popcount of the bits below it)."""
    rm, rn, m_ok, n_ok, atom_start, atoms, w_lo, w_hi, seen = _program_tile(
        starts_ptr, shards_ptr, M, N, K, NUM_SHARDS, BLOCK_M, BLOCK_N, SPLIT_K, WORDS_PER_GROUP)
    lane = tl.arange(0, 32)
    lane_bit = tl.full((32,), 1, tl.uint32) << lane.to(tl.uint32)
    below = lane_bit - 1  # bits under each lane: a set bit's rank inside its word
    z_rows = z_ptr + rm.to(tl.int64) * stride_zm + atom_start  # [BLOCK_M] pointers to this shard's Z
    value_rows = values_ptr + rn.to(tl.int64) * S_PAD  # [BLOCK_N] pointers to each output's values
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, 32, BLOCK_N), dtype=tl.float32)  # one partial sum per atom lane
    for w in range(w_lo, w_hi):
        word = tl.load(mask_ptr + w * N + rn, mask=n_ok, other=0).to(tl.uint32, bitcast=True)  # [BLOCK_N]
        used = (word[None, :] & lane_bit[:, None]) != 0  # [32, BLOCK_N]
        rank = _popcount(word[None, :] & below[:, None], HARDWARE_POPCOUNT)
        coef = _load_values(value_rows[None, :], seen[None, :] + rank, used, PACKED_INT4)
        seen += _popcount(word, HARDWARE_POPCOUNT)
        atom = w * 32 + lane
        z = tl.load(z_rows[:, None] + atom[None, :], mask=m_ok[:, None] & (atom < atoms)[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(z.to(DOT_DTYPE), coef.to(DOT_DTYPE))
        else:
            acc += z.to(tl.float32)[:, :, None] * coef.to(tl.float32)[None, :, :]
    if USE_DOT:
        total = acc
    else:
        total = tl.sum(acc, axis=1)
    _store_scaled(total, scales_ptr, out_ptr, rm, rn, m_ok, n_ok, stride_om, stride_split)


@triton.jit
def _coef_product_bitwalk_kernel(
    z_ptr, mask_ptr, values_ptr, starts_ptr, scales_ptr, shards_ptr, out_ptr,
    M, N, K, S_PAD, stride_zm, stride_om, stride_split,
    NUM_SHARDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    HARDWARE_POPCOUNT: tl.constexpr, WORDS_PER_GROUP: tl.constexpr, PACKED_INT4: tl.constexpr,
):
    """Decode alternative: the same product walking only the set bits. Per mask word, each output takes
    its lowest set bit, its next value (values are in atom order, so no rank is needed) and that atom's
    Z, as many times as the block's busiest output has bits — work per non-zero, not per atom position
    (at k/s = 2, half the positions)."""
    rm, rn, m_ok, n_ok, atom_start, atoms, w_lo, w_hi, seen = _program_tile(
        starts_ptr, shards_ptr, M, N, K, NUM_SHARDS, BLOCK_M, BLOCK_N, SPLIT_K, WORDS_PER_GROUP)
    z_rows = z_ptr + rm.to(tl.int64) * stride_zm + atom_start  # [BLOCK_M] pointers to this shard's Z
    value_rows = values_ptr + rn.to(tl.int64) * S_PAD  # [BLOCK_N] pointers to each output's values
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w in range(w_lo, w_hi):
        word = tl.load(mask_ptr + w * N + rn, mask=n_ok, other=0).to(tl.uint32, bitcast=True)  # [BLOCK_N]
        for _ in range(tl.max(_popcount(word, HARDWARE_POPCOUNT), axis=0)):
            rest = word & (word - 1)  # the word without its lowest set bit
            has = rest != word
            atom = w * 32 + _popcount((word ^ rest) - 1, HARDWARE_POPCOUNT)  # the lowest set bit's position
            coef = _load_values(value_rows, seen, n_ok & has, PACKED_INT4)
            z = tl.load(z_rows[:, None] + atom[None, :], mask=m_ok[:, None] & (has & (atom < atoms))[None, :],
                        other=0.0)
            acc += z.to(tl.float32) * coef.to(tl.float32)[None, :]
            seen += has.to(tl.int32)
            word = rest
    _store_scaled(acc, scales_ptr, out_ptr, rm, rn, m_ok, n_ok, stride_om, stride_split)


@triton.jit
def _dictionary_product_kernel(x_ptr, d_ptr, z_ptr, M, K, IN, stride_xm, stride_dn, stride_zm,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr):
    """z [M, K] = x [M, IN] · D [IN, K] for float32 x with D held in bfloat16: each D tile is widened in
    registers, so no float32 copy of D is ever written (float32 accumulation, ieee products)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, IN, BLOCK_IN):
        ri = start + tl.arange(0, BLOCK_IN)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + ri[None, :],
                    mask=(rm < M)[:, None] & (ri < IN)[None, :], other=0.0)
        d = tl.load(d_ptr + ri.to(tl.int64)[:, None] * stride_dn + rk[None, :],
                    mask=(ri < IN)[:, None] & (rk < K)[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), d.to(tl.float32), input_precision=INPUT_PRECISION)
    tl.store(z_ptr + rm.to(tl.int64)[:, None] * stride_zm + rk[None, :], acc, mask=(rm < M)[:, None] & (rk < K)[None, :])


def dictionary_product_float32(x: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """x [M, in] float32 · D [in, K] (bfloat16, as held) → Z [M, K] float32, without a float32 copy of D."""
    if x.dtype != torch.float32 or dictionary.dim() != 2 or x.shape[1] != dictionary.shape[0]:
        raise ValueError("x must be float32 [M, in] and the dictionary [in, K]")
    x = x.contiguous()
    dictionary = dictionary if dictionary.stride(1) == 1 else dictionary.contiguous()
    m, k = x.shape[0], dictionary.shape[1]
    z = torch.empty((m, k), dtype=torch.float32, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, 64))
    # float32 stays float32 on GPUs (as torch's own float32 matmul, without TF32); the interpreter has no tf32.
    _dictionary_product_kernel[grid](x, dictionary, z, m, k, x.shape[1], x.stride(0), dictionary.stride(0), z.stride(0),
                                     BLOCK_M=block_m, BLOCK_K=64, BLOCK_IN=32, INPUT_PRECISION="ieee", num_warps=4)
    return z


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(m: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, USE_DOT, num_warps) for M rows of Z.

    Decode (M ≤ 16): one row tile; float32 FMAs up to 4 rows, one 16-row tl.dot above; 64 outputs
    per program (a warp's word loads are 128 contiguous bytes per 32 outputs). Prefill: 64×64 tiles up
    to 256 rows, 128×128 above, so each expanded piece of C serves 64–128 rows of Z.
    """
    if m <= FMA_MAX_ROWS:
        return triton.next_power_of_2(m), 64, False, 4
    if m <= DECODE_MAX_ROWS:
        return 16, 64, True, 4
    if m <= 256:
        return 64, 64, True, 4
    return 128, 128, True, 8


def split_count(m: int, column_blocks: int, words: int, device: torch.device) -> int:
    """Splits over atoms for decode: enough programs for ~4 per SM (latency hiding for the value
    gathers), at most one split per group of mask words. Prefill grids are large enough without."""
    if m > DECODE_MAX_ROWS:
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    wanted = -(-4 * sms // max(column_blocks, 1))
    return max(1, min(wanted, -(-words // WORDS_PER_GROUP)))


def _dot_dtype(z: torch.Tensor):
    # On GPUs float32 stays float32 (tf32 tensor cores), bf16 / fp16 keep their dtype. Triton 3.9's
    # interpreter runs fp16 tl.dot correctly but not bf16 (numpy has no bfloat16: the interpreter holds
    # bf16 tiles as their 16-bit patterns and its dot multiplies those; 16×16 random inputs came back
    # ~1e9 off), so interpreted bf16 runs multiply in float32 and fp16 ones take the fp16 branch.
    if z.dtype == torch.float32 or (z.dtype == torch.bfloat16 and not z.is_cuda):
        return tl.float32
    return tl.bfloat16 if z.dtype == torch.bfloat16 else tl.float16


def packed_coef_product(
    z: torch.Tensor,
    packed: PackedCoefficients,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    decode: str = "lanes",
) -> torch.Tensor:
    """z [M, K] · C → [M, N] with C in the GPU layout (``gpu_layout.repack``).

    ``out`` (optional, [M, N] with unit column stride, any row stride) receives the result in
    ``out_dtype`` (default: z's). ``split_k`` overrides the split over atoms (tests). ``decode`` picks the
    kernel for M ≤ DECODE_MAX_ROWS (``DECODE_KERNELS``).
    """
    if decode not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {decode!r} is not one of {DECODE_KERNELS}")
    out_dtype = out_dtype or z.dtype
    m, k = z.shape
    n = packed.out_features
    if z.stride(1) != 1:
        z = z.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=z.device) if out is None else out
    if tuple(y.shape) != (m, n) or y.dtype != out_dtype or (n > 1 and y.stride(1) != 1):
        raise ValueError(f"out must be a [{m}, {n}] {out_dtype} tensor with unit column stride")
    if m == 0 or n == 0:
        return y
    block_m, block_n, use_dot, num_warps = launch_config(m)
    column_blocks = sum(triton.cdiv(c, block_n) for c in packed.shard_outputs)
    words = packed.mask_words.shape[0]
    split = split_k or split_count(m, column_blocks, words, z.device)
    target = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=z.device)
    grid = (triton.cdiv(m, block_m), column_blocks, split)
    args = (z, packed.mask_words, packed.values, packed.value_starts, packed.scales, packed.shard_table, target,
            m, n, k, packed.values.shape[1], z.stride(0), target.stride(-2), target.stride(0) if split > 1 else 0)
    common = dict(NUM_SHARDS=len(packed.shard_outputs), BLOCK_N=block_n, SPLIT_K=split,
                  HARDWARE_POPCOUNT=not _interpreted(), WORDS_PER_GROUP=WORDS_PER_GROUP,
                  PACKED_INT4=fmt.values_per_byte(packed.values.dtype) == 2, num_warps=num_warps)
    if decode == "bitwalk" and m <= DECODE_MAX_ROWS:
        _coef_product_bitwalk_kernel[grid](*args, BLOCK_M=block_m, **common)
    else:
        _coef_product_kernel[grid](*args, BLOCK_M=block_m, USE_DOT=use_dot, DOT_DTYPE=_dot_dtype(z), **common)
    if split > 1:
        y.copy_(target.sum(0))
    return y
