"""Coefficient quantization that keeps the dictionary's accuracy.

Unit-norm atoms leave each atom's scale in its coefficients, and those scales differ by 100× and
more between atoms; one absmax scale per output column then rounds the small atoms' coefficients to
0 or ±1. Two steps fix that, both exact re-parametrisations or least-squares refits of Y ≈ D·coefᵀ:

* :func:`balance_atom_scales` moves each atom's scale g_t into the bf16 dictionary
  (D·diag(g), diag(1/g)·coef). g_t is the RMS of atom t's non-zero coefficients: afterwards every atom's
  typical coefficient is 1, so a column's absmax reflects how strongly the column uses an atom, not
  the atom's scale. (RMS rather than max: one outlier column should not shrink the rest.)
* :func:`quantize_and_refit` quantizes per column (:func:`encode_coefficients`), then refits the
  dictionary by least squares to the *dequantized* coefficients, so the bf16 dictionary absorbs the
  rounding error. ``rounds`` > 1 re-solves the values on the fixed support and repeats.

An int8 dictionary (:func:`quantize_dictionary`, one scale per atom) is rounded after that, in the stored
(un-whitened) space; the caller then re-solves the values on their support for the rounded dictionary
(:func:`resolve_values`), so the coefficients absorb the dictionary's rounding error.
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt
from offline_compress.dictionary import least_squares_dictionary, least_squares_on_support


def quantize_values(values: torch.Tensor, value_dtype_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-column symmetric quantization.

    values: [out, s] float → (coef_values [out, s] value_dtype, coef_scales [out] float32)
    with ``values ≈ coef_values.float() * coef_scales[:, None]`` (format.dequantize_values).
    """
    dtype = fmt.value_dtype_from_name(value_dtype_name)
    values = values.float()
    qmax = fmt.VALUE_TYPES[value_dtype_name].max_abs
    if qmax is None:  # stored unscaled
        return values.to(dtype), torch.ones(values.shape[0], dtype=fmt.SCALES_DTYPE, device=values.device)
    absmax = values.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = values / scales[:, None]
    if dtype == torch.int8:
        quantized = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    else:
        quantized = scaled.clamp(-qmax, qmax).to(dtype)
    return quantized, scales.to(fmt.SCALES_DTYPE)


def encode_coefficients(
    support_idx: torch.Tensor, support_values: torch.Tensor, k: int, value_dtype_name: str
) -> dict[str, torch.Tensor]:
    """Column-sparse C given as (atom index, value) pairs → the stored mask / values / scales tensors.

    support_idx: [out, s] int64 distinct atom indices per row (any order);
    support_values: [out, s] float. Values are re-ordered into increasing atom order.
    """
    order = support_idx.argsort(dim=1)
    idx_sorted = support_idx.gather(1, order)
    values_sorted = support_values.gather(1, order)
    support = torch.zeros(support_idx.shape[0], k, dtype=torch.bool, device=support_idx.device)
    support.scatter_(1, idx_sorted, True)
    coef_values, coef_scales = quantize_values(values_sorted, value_dtype_name)
    return {fmt.COEF_MASK: fmt.pack_mask(support), fmt.COEF_VALUES: coef_values, fmt.COEF_SCALES: coef_scales}


def balance_atom_scales(
    dictionary: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D [n, k], coef [m, k], mask [m, k]) → (D·diag(g), coef·diag(1/g)) with g_t = RMS of atom t's non-zeros.

    The product D·coefᵀ is unchanged; atoms no column uses keep g = 1.
    """
    counts = mask.sum(0)
    rms = ((coef * coef).sum(0) / counts.clamp_min(1)).sqrt()
    gains = torch.where((counts > 0) & (rms > 0), rms, torch.ones_like(rms))
    return dictionary * gains, coef / gains


def support_indices(mask: torch.Tensor) -> torch.Tensor:
    """bool [m, k] with exactly s True per row → int64 [m, s] atom indices in increasing order."""
    m = mask.shape[0]
    return mask.nonzero()[:, 1].view(m, -1)


def quantize(coef: torch.Tensor, mask: torch.Tensor, value_dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """coef [m, k] on mask → (stored {coef_mask, coef_values, coef_scales}, dequantized coef [m, k] float)."""
    idx = support_indices(mask)
    stored = encode_coefficients(idx, coef.gather(1, idx), coef.shape[1], value_dtype)
    dequantized = fmt.decode_coefficients(
        stored[fmt.COEF_MASK], stored[fmt.COEF_VALUES], stored[fmt.COEF_SCALES], coef.shape[1]
    ).T.to(coef.dtype)
    return stored, dequantized


def quantize_and_refit(
    target: torch.Tensor,
    dictionary: torch.Tensor,
    coef: torch.Tensor,
    mask: torch.Tensor,
    value_dtype: str,
    rounds: int = 1,
    refit: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Balance, quantize, refit the dictionary to the quantized coefficients (whitened space).

    target [n, m], dictionary [n, k], coef/mask [m, k]. Returns (dictionary [n, k] to store, stored
    coefficient tensors, their dequantized values as coef [m, k]). With ``rounds`` = 2 the values are re-solved on the same support for the
    refitted dictionary and the balance/quantize/refit is repeated.
    """
    stored: dict[str, torch.Tensor] = {}
    for round_index in range(rounds):
        if round_index:
            coef = solve_on_support(target, dictionary, mask, coef)
        dictionary, coef = balance_atom_scales(dictionary, coef, mask)
        stored, dequantized = quantize(coef, mask, value_dtype)
        if refit:
            dictionary = least_squares_dictionary(target, dequantized)
        coef = dequantized
    return dictionary, stored, coef


def quantize_dictionary(dictionary: torch.Tensor, dictionary_dtype_name: str) -> dict[str, torch.Tensor]:
    """D [in, k] float (as stored: un-whitened) → {DICTIONARY[, DICTIONARY_SCALES]} in the format's dtype.

    bfloat16: rounded. int8: symmetric per atom (column), scale = max |D[:, t]| / 127, so that
    ``format.dequantize_dictionary`` gives D back up to half a step per entry. Per atom rather than per
    group: the atoms' scales were balanced into D (``balance_atom_scales``), so a column's entries share one.
    """
    storage = fmt.DICTIONARY_TYPES[dictionary_dtype_name]
    if storage.max_abs is None:
        return {fmt.DICTIONARY: dictionary.to(storage.dtype)}
    absmax = dictionary.abs().amax(0).float()
    scales = torch.where(absmax > 0, absmax / storage.max_abs, torch.ones_like(absmax))
    quantized = (dictionary.float() / scales).round().clamp(-storage.max_abs, storage.max_abs).to(storage.dtype)
    return {fmt.DICTIONARY: quantized, fmt.DICTIONARY_SCALES: scales.to(fmt.SCALES_DTYPE)}


def resolve_values(target: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor,
                   value_dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Values re-solved on their fixed support for a fixed (rounded) dictionary, then quantized.

    target [n, m], dictionary [n, k] (whitened space), coef/mask [m, k] (coef: the start) →
    (stored coefficient tensors, their dequantized values as coef [m, k])."""
    return quantize(solve_on_support(target, dictionary, mask, coef), mask, value_dtype)


def solve_on_support(target: torch.Tensor, dictionary: torch.Tensor, mask: torch.Tensor, start: torch.Tensor
                     ) -> torch.Tensor:
    """argmin ‖target − dictionary·coefᵀ‖ over coef [m, k] supported on mask (CG from ``start``; on a dense
    support, SVD's s = k, one Cholesky solve of the normal equations instead)."""
    gram = dictionary.T @ dictionary
    alpha = target.T @ dictionary
    if bool(mask.all()):
        factor, info = torch.linalg.cholesky_ex(gram.double())
        if int(info) == 0:
            return torch.cholesky_solve(alpha.T.double(), factor).T.to(alpha.dtype)
    return least_squares_on_support(gram, alpha, mask, start, 50, 1e-5)
