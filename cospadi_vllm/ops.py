"""CoSpaDi GEMM: Y = (X·D)·C with C given as (mask, values, scales) — torch path and custom op.

Merged layers (qkv, gate_up) keep each shard's mask bits relative to that shard's dictionary;
``atom_offsets[j]`` is the column of the concatenated dictionary where output j's shard starts.
Values rows are padded to the largest s of the merged shards; only the first popcount(row)
entries of a row are read.
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt


def expand_coefficients(
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    k_total: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """mask [out, W] int32, values [out, s_max], scales [out], atom_offsets [out] → dense C [k_total, out]."""
    out_features, words = coef_mask.shape
    bits = fmt.unpack_mask(coef_mask, words * fmt.BITS_PER_WORD)  # [out, W*32]
    rows, cols = bits.nonzero(as_tuple=True)  # row-major: each row's atoms in increasing order
    rank = bits.to(torch.int32).cumsum(1)[rows, cols].long() - 1  # position of the bit in its row
    dense = torch.zeros(k_total, out_features, dtype=torch.float32, device=coef_mask.device)
    vals = coef_values[rows, rank].float() * coef_scales.float()[rows]
    dense[atom_offsets.long()[rows] + cols, rows] = vals
    return dense.to(dtype)


def cospadi_gemm_torch(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    coef_dense: torch.Tensor,
) -> torch.Tensor:
    """Torch path (CPU, and the reference). x [M, in] → [M, out].

    Uses the pre-expanded C when given (non-empty), otherwise expands it for this call.
    """
    if coef_dense.numel() == 0:
        coef_dense = expand_coefficients(
            coef_mask, coef_values, coef_scales, atom_offsets, dictionary.shape[1], x.dtype
        )
    return (x @ dictionary.to(x.dtype)) @ coef_dense.to(x.dtype)


def gemm_backend(device: torch.device) -> str:
    """Which implementation serves tensors on ``device``: the Triton kernel on GPUs, torch elsewhere.

    Triton has no CPU backend (its interpreter is for tests, far too slow to serve).
    """
    return "triton" if device.type == "cuda" else "torch"


def cospadi_gemm_impl(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    coef_dense: torch.Tensor,
) -> torch.Tensor:
    """The body of ``torch.ops.vllm.cospadi_gemm``: dispatch on the activations' device."""
    if gemm_backend(x.device) == "triton":
        from cospadi_vllm.triton_kernels import cospadi_gemm_triton  # imports triton: GPU machines only

        return cospadi_gemm_triton(x, dictionary, coef_mask, coef_values, coef_scales, atom_offsets)
    return cospadi_gemm_torch(x, dictionary, coef_mask, coef_values, coef_scales, atom_offsets, coef_dense)


def _cospadi_gemm_fake(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    coef_dense: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], coef_mask.shape[0]))


_REGISTERED = False


def register_custom_op() -> None:
    """Register ``torch.ops.vllm.cospadi_gemm`` once per process (opaque to torch.compile / CUDA graphs)."""
    global _REGISTERED
    if _REGISTERED or hasattr(torch.ops.vllm, "cospadi_gemm"):
        _REGISTERED = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name="cospadi_gemm", op_func=cospadi_gemm_impl, mutates_args=[], fake_impl=_cospadi_gemm_fake)
    _REGISTERED = True


def cospadi_gemm(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    coef_dense: torch.Tensor,
) -> torch.Tensor:
    register_custom_op()
    return torch.ops.vllm.cospadi_gemm(x, dictionary, coef_mask, coef_values, coef_scales, atom_offsets, coef_dense)
