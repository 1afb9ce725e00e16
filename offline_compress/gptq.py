"""GPTQ (Frantar et al., 2022): round a linear layer's weight to a b-bit grid for the layer's inputs.

Inputs are rounded one at a time; each one's rounding error is pushed onto the inputs not rounded yet
through the inverse Hessian H⁻¹ (H = XᵀX, the Gram of the layer's inputs), so that what is minimised is
the output error ‖X·(W − Ŵ)ᵀ‖, not ‖W − Ŵ‖. Groups of ``group_size`` consecutive inputs share one scale
(and zero) per output row, taken from the group's weights as they stand when its first input is reached
(after the feedback of the groups before it), as the reference implementation does.

Here it rounds a CoSpaDi dictionary: x·D is a linear with outputs = atoms, so ``weight`` = Dᵀ [k, in]
and ``hessian`` = the module's input Gram [in, in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128  # inputs per lazy-update block (a multiple of every group size used)


@dataclass(frozen=True)
class GroupQuantized:
    """codes [rows, cols] int16 in [0, 2^bits − 1]; scales, zeros [rows, groups] float32; the weight they
    encode is (codes − zeros[:, g]) · scales[:, g] for input column c in group g = c // group_size."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(self.group_size, 1)[:, : self.codes.shape[1]]  # noqa: E731
        return (self.codes.float() - expand(self.zeros)) * expand(self.scales)


def group_grid(weights: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [rows, g] → (scale, zero) [rows] of the b-bit grid covering each row. Symmetric: zero at the
    middle code 2^(b−1) and scale 2·max|w| / (2^b − 1) (GPTQ's, vLLM's uint4b8 for 4 bits); else the
    row's [min, max] with an integer zero."""
    top = 2**bits - 1
    low, high = weights.amin(1).clamp(max=0), weights.amax(1).clamp(min=0)
    if symmetric:
        high = torch.maximum(-low, high)
        scale = 2 * high / top
        zero = torch.full_like(scale, (top + 1) / 2)
    else:
        scale = (high - low) / top
        zero = (-low / torch.where(scale > 0, scale, 1)).round()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale codes it exactly
    return scale, zero


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = True, damp: float = 0.01) -> GroupQuantized:
    """weight [rows, cols] (rows: outputs), hessian [cols, cols] = XᵀX of the inputs → the rounded weight.

    ``group_size`` must divide BLOCK (or be a multiple of it); ``damp`` · mean(diag H) is added to H's
    diagonal (GPTQ's dampening: H may be singular); inputs that never fire (H[i, i] = 0) are set to zero."""
    if BLOCK % group_size and group_size % BLOCK:
        raise ValueError(f"group_size {group_size} must divide {BLOCK} or be a multiple of it")
    rows, cols = weight.shape
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    # The upper Cholesky factor of H⁻¹: row i holds the feedback of input i onto the inputs after it.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    top = 2**bits - 1
    groups = -(-cols // group_size)
    codes = torch.zeros(rows, cols, dtype=torch.int16, device=w.device)
    scales = torch.zeros(rows, groups, device=w.device)
    zeros = torch.zeros(rows, groups, device=w.device)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # the group's grid, from its weights after the feedback so far
                ahead = torch.cat([block[:, i:], w[:, end:col + group_size]], 1)[:, :group_size]
                scales[:, col // group_size], zeros[:, col // group_size] = group_grid(ahead, bits, symmetric)
            scale, zero = scales[:, col // group_size], zeros[:, col // group_size]
            q = (block[:, i] / scale + zero).round().clamp(0, top)
            codes[:, col] = q.to(torch.int16)
            errors[:, i] = (block[:, i] - (q - zero) * scale) / h_inv[col, col]
            block[:, i:] -= errors[:, i:i + 1] * h_inv[col, col:end]
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GroupQuantized(codes, scales, zeros, group_size)


def round_to_nearest(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True
                     ) -> GroupQuantized:
    """The same grid without feedback (RTN): each group's scale from its weights, each weight to its nearest code."""
    rows, cols = weight.shape
    groups = -(-cols // group_size)
    padded = torch.nn.functional.pad(weight.float(), (0, groups * group_size - cols)).view(rows * groups, group_size)
    scale, zero = group_grid(padded, bits, symmetric)
    codes = (padded / scale[:, None] + zero[:, None]).round().clamp(0, 2**bits - 1)
    return GroupQuantized(codes.view(rows, -1)[:, :cols].to(torch.int16), scale.view(rows, groups),
                          zero.view(rows, groups), group_size)
