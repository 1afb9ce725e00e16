"""The layout the GPU kernels read C in: built from the stored tensors at load time (pure torch).

The checkpoint stores C row per output (docs/format.md): ``coef_mask`` [N, W] int32,
``coef_values`` [N, S], ``coef_scales`` [N] and, in a merged layer, ``atom_offsets`` [N]. The Triton
kernel (``triton_gemm``) reads it repacked:

- ``mask_words`` [W, N] int32: word w of every output side by side (column-interleaved), so the 32
  lanes of a warp reading word w of 32 consecutive outputs load 128 contiguous bytes;
- ``values`` [N, S_pad]: each output's values contiguous, rows padded with zeros to a multiple of
  16 bytes (every row starts 16-byte aligned);
- ``value_starts`` [G, N] int32, G = ceil(W / WORDS_PER_GROUP): how many of output n's values lie
  before word group g. A program that starts at any group (a split over atoms) finds its first value
  without reading the mask words before it;
- ``scales`` [N] float32, as stored;
- ``shard_table`` [num_shards, 4] int32: per shard of a merged layer (q/k/v, gate/up) its first
  output, output count, first atom (column of Z = X·D) and end atom; a shard's outputs share one atom
  offset, so the kernels tile outputs shard by shard and read one Z tile per program.

Bytes over the stored C: the value padding (< 16 bytes per output) and 4 bytes per output per
WORDS_PER_GROUP mask words (+12.5 % of the mask, ~0.6 % of a Llama-3-8B layer at CR 0.3). ``atom_offsets``
is not needed by the kernel (the shard table replaces it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospadi_vllm import format as fmt

WORDS_PER_GROUP = 8  # value_starts granularity: 256 atoms; a split over atoms starts at a group boundary
VALUE_ROW_ALIGN_BYTES = 16

# What the Triton kernels need of the GPU (compute capability): bfloat16 tl.dot needs Ampere (8.0);
# Triton converts float8 e4m3 only from Ada / Hopper (8.9) on.
MIN_CAPABILITY = (8, 0)
FP8_E4M3_MIN_CAPABILITY = (8, 9)


class UnsupportedGPUError(RuntimeError):
    """The GPU is too old for a CoSpaDi layer's value dtype."""


@dataclass(frozen=True)
class PackedCoefficients:
    """C of one (possibly merged) layer in the GPU layout described in the module docstring."""

    mask_words: torch.Tensor  # [W, N] int32
    values: torch.Tensor  # [N, S_pad] value dtype
    value_starts: torch.Tensor  # [G, N] int32
    scales: torch.Tensor  # [N] float32
    shard_table: torch.Tensor  # [num_shards, 4] int32: first output, outputs, first atom, end atom
    shard_outputs: tuple[int, ...]  # output count per shard, on the host (the launch grid needs it)

    @property
    def out_features(self) -> int:
        return self.mask_words.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.mask_words, self.values, self.value_starts, self.scales, self.shard_table


def required_capability(value_dtype: torch.dtype) -> tuple[int, int]:
    return FP8_E4M3_MIN_CAPABILITY if value_dtype == torch.float8_e4m3fn else MIN_CAPABILITY


def check_capability(value_dtype: torch.dtype, device: torch.device) -> None:
    """Raise UnsupportedGPUError naming the value dtype and the GPU's capability if the kernels cannot run."""
    if device.type != "cuda":
        return
    have = torch.cuda.get_device_capability(device)
    need = required_capability(value_dtype)
    if have < need:
        raise UnsupportedGPUError(
            f"CoSpaDi values of dtype {str(value_dtype).removeprefix('torch.')} need a GPU of compute capability "
            f">= {need[0]}.{need[1]} for the Triton kernels; {torch.cuda.get_device_name(device)} has "
            f"{have[0]}.{have[1]}"
        )


def shard_bounds(atom_offsets: torch.Tensor, words: int) -> list[tuple[int, int, int, int]]:
    """(first output, outputs, first atom, end atom) per run of equal ``atom_offsets`` (one host sync).

    A shard's atoms end where the next shard's begin; the last shard's at its mask width (32·W), which
    the kernels clamp to Z's width.
    """
    offsets, counts = torch.unique_consecutive(atom_offsets.cpu(), return_counts=True)
    offsets, counts = offsets.tolist(), counts.tolist()
    if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise ValueError(f"atom_offsets must increase from shard to shard, got runs starting at {offsets}")
    bounds, first = [], 0
    for i, (offset, count) in enumerate(zip(offsets, counts, strict=True)):
        end = offsets[i + 1] if i + 1 < len(offsets) else offset + words * fmt.BITS_PER_WORD
        bounds.append((first, count, offset, end))
        first += count
    return bounds


def repack(
    coef_mask: torch.Tensor, coef_values: torch.Tensor, coef_scales: torch.Tensor, atom_offsets: torch.Tensor
) -> PackedCoefficients:
    """Stored C (mask [N, W], values [N, S], scales [N], offsets [N]) → the GPU layout, on the same device."""
    n, words = coef_mask.shape
    if coef_mask.dtype != fmt.MASK_DTYPE:
        raise TypeError(f"coef_mask must be {fmt.MASK_DTYPE}, got {coef_mask.dtype}")
    bounds = shard_bounds(atom_offsets, words)
    value_row = coef_values.shape[1] * coef_values.element_size()
    padded_row = -(-max(value_row, 1) // VALUE_ROW_ALIGN_BYTES) * VALUE_ROW_ALIGN_BYTES
    values = coef_values.new_zeros((n, padded_row // coef_values.element_size()))
    values[:, : coef_values.shape[1]] = coef_values
    groups = -(-words // WORDS_PER_GROUP)
    per_word = fmt.popcount32(coef_mask.long() & 0xFFFFFFFF)  # [N, W]
    per_group = torch.nn.functional.pad(per_word, (0, groups * WORDS_PER_GROUP - words))
    per_group = per_group.view(n, groups, WORDS_PER_GROUP).sum(2)  # [N, G]
    value_starts = (per_group.cumsum(1) - per_group).t().contiguous().to(torch.int32)  # exclusive, [G, N]
    return PackedCoefficients(
        mask_words=coef_mask.t().contiguous(),
        values=values,
        value_starts=value_starts,
        scales=coef_scales.to(torch.float32).contiguous(),
        shard_table=torch.tensor(bounds, dtype=torch.int32, device=coef_mask.device).view(-1, 4),
        shard_outputs=tuple(b[1] for b in bounds),
    )
