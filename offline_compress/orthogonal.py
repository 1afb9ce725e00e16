"""An orthogonal dictionary in the whitened space (COMPOT, arXiv 2602.15200): the closed-form structure.

With orthonormal atoms (DᵀD = I, so k ≤ in) both steps of dictionary learning are exact and closed form, on the
whitened target Y = Ã [n, m]:
  * coding: ‖y − D·c‖² = ‖(I − DDᵀ)·y‖² + ‖Dᵀy − c‖², so the best s-sparse c keeps the s largest entries of Dᵀy;
  * update (orthogonal Procrustes): the orthonormal D minimising ‖Y − D·coefᵀ‖ is P·Qᵀ with Y·coef = P·Σ·Qᵀ.
Each step can only lower the error. Starting from the target's k leading left singular vectors, the first coding
is SVD-LLM's coefficients with each column keeping its own s largest — so its error is known for every k from the
SVD alone, which is how the atom count is chosen (:func:`orthogonal_shape`). One iteration costs a [n, m]×[m, k]
product and the SVD of its [n, k] result, against the learned dictionary's conjugate-gradient codings.
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt
from offline_compress.budget import largest_sparsity
from offline_compress.dictionary import topk_mask

ORTHOGONAL_STRUCTURE = "orthogonal"  # as named in reports
ATOM_STEP = 32  # atom counts tried: multiples of one mask word (a partial word stores its bits anyway)


def first_coding_error(sigma: torch.Tensor, vh: torch.Tensor, k: int, s: int) -> float:
    """Relative error of coding the target on its k leading left singular vectors with s non-zeros per column.

    sigma [r], vh [r, m] (Ã = U·diag(σ)·Vᵀ). The coefficients on U[:, :k] are diag(σ_k)·V_kᵀ; a column keeps its s
    largest, and what is dropped (the other k − s, and every direction past k) is its error."""
    coefficients = sigma[:k, None] * vh[:k]  # [k, m]
    kept = coefficients.abs().topk(s, dim=0, sorted=False).values
    total = float((sigma * sigma).sum())
    return max(total - float((kept * kept).sum()), 0.0) ** 0.5 / max(total, 1e-300) ** 0.5


def orthogonal_shape(in_features: int, out_features: int, ratio: float, sigma: torch.Tensor, vh: torch.Tensor,
                     value_dtype: str, dictionary_dtype: str) -> fmt.LayerShape | None:
    """The (k, s) of the orthogonal structure at this budget: of every k ≤ min(in, out) in steps of ``ATOM_STEP``
    (and min(in, out) itself) with its largest fitting s, the one whose first coding has the lowest error.
    None where no such k has 0 < s < k (s = k is SVD-LLM's structure, a candidate of its own)."""
    top = min(in_features, out_features)
    best: tuple[float, fmt.LayerShape] | None = None
    for k in sorted({top, *range(ATOM_STEP, top, ATOM_STEP)}, reverse=True):
        s = largest_sparsity(in_features, out_features, ratio, k, value_dtype, dictionary_dtype)
        if not 0 < s < k:
            continue
        error = first_coding_error(sigma, vh, k, s)
        if best is None or error < best[0]:
            best = (error, fmt.LayerShape(in_features, out_features, k, s))
    return None if best is None else best[1]


def orthogonal_code(dictionary: torch.Tensor, target: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact s-sparse coding of target [n, m] on orthonormal atoms [n, k] → (coef [m, k], mask [m, k] bool)."""
    projections = target.T @ dictionary
    mask = topk_mask(projections, s)
    return projections * mask, mask


def learn_orthogonal(target: torch.Tensor, left: torch.Tensor, k: int, s: int, iterations: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal dictionary learning on target [n, m] from its left singular vectors ``left`` [n, ≥ k] →
    (dictionary [n, k] with DᵀD = I, coef [m, k], mask [m, k]); ``iterations`` Procrustes updates, each followed
    by the exact coding."""
    dictionary = left[:, :k].contiguous()
    coef, mask = orthogonal_code(dictionary, target, s)
    for _ in range(iterations):
        rotation_left, _, rotation_right = torch.linalg.svd(target @ coef, full_matrices=False)  # [n, k], [k, k]
        dictionary = rotation_left @ rotation_right
        coef, mask = orthogonal_code(dictionary, target, s)
    return dictionary, coef, mask
