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

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.dictionary import least_squares_dictionary, least_squares_on_support
from offline_compress.gptq import quantize_gptq


def quantize_values(values: torch.Tensor, value_dtype_name: str, atoms: tuple[torch.Tensor, torch.Tensor] | None = None,
                    shared_factor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-column symmetric quantization.

    values: [out, s] float → (coef_values [out, s] value_dtype (int4: [out, ceil(s/2)] packed uint8),
    coef_scales [out] float32) with ``values ≈ codec.dequantize_values(coef_values, coef_scales, s)``.
    ``atoms`` = (support_idx [out, s], gram [k, k] = DᵀD of the whitened dictionary): codes of ≤ 4 bits are
    rounded with error feedback (:func:`feedback_codes`, over one ``shared_factor`` if asked) instead of to nearest.
    """
    dtype = fmt.value_dtype_from_name(value_dtype_name)
    values = values.float()
    qmax = fmt.VALUE_TYPES[value_dtype_name].max_abs
    if qmax is None:  # stored unscaled
        return values.to(dtype), torch.ones(values.shape[0], dtype=fmt.SCALES_DTYPE, device=values.device)
    absmax = values.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    if qmax <= CLIP_SEARCH_MAX_LEVEL:
        scales = clipped_scales(values, scales, qmax)
    scaled = values / scales[:, None]
    if dtype.is_floating_point:
        quantized = scaled.clamp(-qmax, qmax).to(dtype)
    else:
        codes = (feedback_codes(scaled, *atoms, qmax, shared_factor=shared_factor) if atoms is not None and rounds_with_feedback(value_dtype_name)
                 else scaled.round().clamp(-qmax, qmax))
        quantized = codes.to(torch.int8)
        if fmt.values_per_byte(dtype) == 2:
            quantized = codec.pack_int4(quantized)
    return quantized, scales.to(fmt.SCALES_DTYPE)


# Codes up to this magnitude get a searched clipping scale (int4: 15 levels). With absmax scaling one large
# value per column sets a step of absmax / 7 for all ~s values (rounding noise ≈ 0.12 of a typical value); a
# smaller scale that clips the few largest values lowers the squared error of the values. Measured (NOTES.md
# items 59–60): alone it does not lower the whitened error and raised SmolLM2's perplexity (30.21 → 33.07);
# together with the feedback rounding it lowers the whitened error on 6 of 8 modules. With int8's 255 levels
# the step is already far below the spread: nothing to gain, and its checkpoints stay byte-identical.
CLIP_SEARCH_MAX_LEVEL = 7
# Codes up to this magnitude are rounded with error feedback when the dictionary is known (feedback_codes).
FEEDBACK_MAX_LEVEL = 7


def rounds_with_feedback(value_dtype_name: str) -> bool:
    """Whether values of this dtype are rounded with error feedback (then quantize needs the atoms' Gram)."""
    qmax = fmt.VALUE_TYPES[value_dtype_name].max_abs
    return qmax is not None and qmax <= FEEDBACK_MAX_LEVEL
CLIP_FRACTIONS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5 of absmax


def clipped_scales(values: torch.Tensor, scales: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per row of values [out, s], the scale among ``CLIP_FRACTIONS`` · (absmax / qmax) with the least squared
    rounding error (clamped codes included). scales [out] (absmax / qmax) → [out]."""
    best, best_error = scales, torch.full_like(scales, float("inf"))
    for fraction in CLIP_FRACTIONS:
        trial = scales * fraction
        codes = (values / trial[:, None]).round().clamp(-qmax, qmax)
        error = ((codes * trial[:, None] - values) ** 2).sum(1)
        better = error < best_error
        best, best_error = torch.where(better, trial, best), torch.where(better, error, best_error)
    return best


def feedback_codes(scaled: torch.Tensor, support_idx: torch.Tensor, gram: torch.Tensor, qmax: float,
                   block: int = 256, damp: float = 0.01, shared_factor: bool = False) -> torch.Tensor:
    """Each column's values rounded for the error that matters, ‖D_S·(c − q)‖ (the whitened error of the
    column's atoms S), not ‖c − q‖: an over-complete dictionary's atoms are far from orthogonal, so the
    rounding error of one value can be partly undone by moving the others. This is GPTQ's error feedback,
    computed in its Cholesky form (Babai's nearest plane; one Cholesky per column, no inverse): with the
    atoms in reverse order, P·D_SᵀD_S·P = RᵀR (R upper), (R·e)_i = R_ii·e_i + Σ_{j>i} R_ij·e_j, and the values
    are rounded from the last row to the first — i.e. from the column's first atom to its last — each to
    cancel what the already rounded ones left in its row. The order matters (the first atoms come from the
    SVD start and carry most of a column): rounding them first, as GPTQ does, measured 0.037 against 0.105
    the other way on a SmolLM2 q_proj (benchmarks/results/NOTES.md item 60).

    ``shared_factor``: factor the whole k × k Gram once and round every column over all k atoms, codes off its
    support held at zero (SparseGPT's treatment of pruned weights) — O(k³ + out·k²) instead of O(out·s³), but
    a held code cannot absorb its row's residual, so the error is higher, the more so the sparser the support
    (benchmarks/results/feedback-rounding-smollm2.md); only for roundings that are redone later
    (:func:`quantize_and_refit`). Columns that share their atoms (a dense support: SVD's s = k) share one
    factorisation either way, with the same codes.

    scaled [out, s] values in code units, support_idx [out, s] (increasing), gram [k, k] = DᵀD (whitened D)
    → codes [out, s] float (integers in [-qmax, qmax]). ``damp``: fraction of the mean diagonal added, as GPTQ
    does."""
    out, s = scaled.shape
    gram = gram.float()  # gathered per column below: [block, s, s] in float32, as factored (half the bytes moved)
    dense = bool((support_idx == support_idx[:1]).all())
    if shared_factor and not dense:
        k = gram.shape[0]
        spread = torch.zeros(out, k, dtype=torch.float32, device=scaled.device).scatter_(1, support_idx, scaled.float())
        held = torch.ones(out, k, dtype=torch.bool, device=scaled.device).scatter_(1, support_idx, False)
        atoms = torch.arange(k, device=scaled.device).expand(1, k)
        return nearest_plane_codes(spread, atoms, gram, qmax, block, damp, held).gather(1, support_idx).to(scaled.dtype)
    return nearest_plane_codes(scaled.float(), support_idx[:1] if dense else support_idx, gram, qmax, block, damp
                               ).to(scaled.dtype)


def nearest_plane_codes(values: torch.Tensor, atoms: torch.Tensor, gram: torch.Tensor, qmax: float, block: int,
                        damp: float, held: torch.Tensor | None = None) -> torch.Tensor:
    """values [out, n] rounded in the order of their atoms by Babai's nearest plane on each column's Gram
    ``gram[atoms_j][:, atoms_j]`` (atoms [out, n], or [1, n] when every column has the same atoms: one factor);
    ``held`` [out, n]: codes fixed at zero. → codes [out, n] float32."""
    out, n = values.shape
    reverse = torch.arange(n - 1, -1, -1, device=values.device)
    values, atoms = values[:, reverse], atoms[:, reverse]
    held = None if held is None else held[:, reverse]
    codes = torch.empty_like(values)
    eye = torch.eye(n, dtype=torch.float32, device=gram.device)
    factor = None
    for start in range(0, out, block):
        if factor is None or atoms.shape[0] > 1:
            idx = atoms[start: start + block] if atoms.shape[0] > 1 else atoms
            hessian = gram[idx[:, :, None], idx[:, None, :]]  # [B, n, n]: the Gram of each column's atoms
            hessian = hessian + damp * hessian.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
            factor = torch.linalg.cholesky(hessian, upper=True)
        chunk = values[start: start + block]
        error = torch.zeros_like(chunk)  # c − q of the values already rounded (zero for the rest)
        for i in range(n - 1, -1, -1):
            shifted = chunk[:, i] + (factor[:, i, i + 1:] * error[:, i + 1:]).sum(1) / factor[:, i, i]
            rounded = shifted.round().clamp(-qmax, qmax)
            if held is not None:
                rounded = rounded.masked_fill(held[start: start + block, i], 0.0)
            error[:, i] = chunk[:, i] - rounded
            codes[start: start + block, i] = rounded
    return codes[:, reverse]


def encode_coefficients(
    support_idx: torch.Tensor, support_values: torch.Tensor, k: int, value_dtype_name: str,
    gram: torch.Tensor | None = None, shared_factor: bool = False,
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
    atoms = None if gram is None else (idx_sorted, gram)
    coef_values, coef_scales = quantize_values(values_sorted, value_dtype_name, atoms, shared_factor)
    return {fmt.COEF_MASK: codec.pack_mask(support), fmt.COEF_VALUES: coef_values, fmt.COEF_SCALES: coef_scales}


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


def quantize(coef: torch.Tensor, mask: torch.Tensor, value_dtype: str, dictionary: torch.Tensor | None = None,
             shared_factor: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """coef [m, k] on mask → (stored {coef_mask, coef_values, coef_scales}, dequantized coef [m, k] float).
    ``dictionary`` [n, k] (whitened space): ≤ 4-bit values are rounded for it (:func:`feedback_codes`, over one
    ``shared_factor`` if asked)."""
    idx = support_indices(mask)
    # The Gram only where the rounding reads it (≤ 4-bit values): int8 / fp8 / bf16 never pay for it.
    gram = dictionary.T @ dictionary if dictionary is not None and rounds_with_feedback(value_dtype) else None
    stored = encode_coefficients(idx, coef.gather(1, idx), coef.shape[1], value_dtype, gram, shared_factor)
    dequantized = codec.decode_coefficients(
        stored[fmt.COEF_MASK], stored[fmt.COEF_VALUES], stored[fmt.COEF_SCALES], coef.shape[1]
    ).T.to(coef.dtype)
    return stored, dequantized


# A rounding that is redone later (the dictionary is then refitted and rounded, the values re-solved and rounded
# again) uses one shared factor where each column holds at least this fraction of the atoms: there the per-column
# factors cost most (s³ each, s close to k) and steering the refit with the shared one left the stored error
# unchanged (≤ 0.01 %); on sparser supports it cost up to +6.8 % on the stored layer (NOTES.md item 96).
SHARED_FACTOR_MIN_COVER = 0.8


def quantize_and_refit(
    target: torch.Tensor,
    dictionary: torch.Tensor,
    coef: torch.Tensor,
    mask: torch.Tensor,
    value_dtype: str,
    rounds: int = 1,
    refit: bool = True,
    provisional: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Balance, quantize, refit the dictionary to the quantized coefficients (whitened space).

    target [n, m], dictionary [n, k], coef/mask [m, k]. Returns (dictionary [n, k] to store, stored
    coefficient tensors, their dequantized values as coef [m, k]). With ``rounds`` = 2 the values are re-solved on the same support for the
    refitted dictionary and the balance/quantize/refit is repeated.

    Values that are rounded again later — every round but the last, and the last too when ``provisional`` (the
    caller re-solves and re-rounds them for a rounded dictionary) — are rounded over one shared factor
    (:func:`feedback_codes`) where the columns use at least ``SHARED_FACTOR_MIN_COVER`` of the atoms; the
    rounding that is stored is always the per-column one.
    """
    stored: dict[str, torch.Tensor] = {}
    for round_index in range(rounds):
        if round_index:
            coef = solve_on_support(target, dictionary, mask, coef)
        dictionary, coef = balance_atom_scales(dictionary, coef, mask)
        shared_factor = (provisional or round_index < rounds - 1) and bool(
            mask[:1].sum() >= SHARED_FACTOR_MIN_COVER * mask.shape[1])
        stored, dequantized = quantize(coef, mask, value_dtype, dictionary, shared_factor)
        if refit:
            dictionary = least_squares_dictionary(target, dequantized)
        coef = dequantized
    return dictionary, stored, coef


def quantize_dictionary(dictionary: torch.Tensor, dictionary_dtype_name: str, gram: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
    """D [in, k] float (as stored: un-whitened) → {DICTIONARY[, DICTIONARY_SCALES]} in the format's dtype.

    bfloat16: rounded. int8: symmetric per atom (column), scale = max |D[:, t]| / 127, so that
    ``codec.dequantize_dictionary`` gives D back up to half a step per entry. Per atom rather than per
    group: the atoms' scales were balanced into D (``balance_atom_scales``), so a column's entries share one.
    int4: GPTQ (``gptq.quantize_gptq``) on x·D — a linear whose outputs are the atoms — with ``gram`` [in, in],
    the module's input Gram, symmetric groups of 128 inputs (the layout of ``format.DICTIONARY_TYPES``).
    """
    storage = fmt.DICTIONARY_TYPES[dictionary_dtype_name]
    if storage.max_abs is None:
        return {fmt.DICTIONARY: dictionary.to(storage.dtype)}
    if storage.group_size is not None:
        if gram is None:
            raise ValueError(f"a {dictionary_dtype_name} dictionary is rounded for the module's inputs: pass its Gram")
        rounded = quantize_gptq(dictionary.T.float(), gram.float(), bits=4, group_size=storage.group_size)
        return {fmt.DICTIONARY: codec.pack_int4_dictionary(rounded.codes.T),
                fmt.DICTIONARY_SCALES: rounded.scales.T.contiguous().to(storage.scales_dtype)}
    absmax = dictionary.abs().amax(0).float()
    scales = torch.where(absmax > 0, absmax / storage.max_abs, torch.ones_like(absmax))
    quantized = (dictionary.float() / scales).round().clamp(-storage.max_abs, storage.max_abs).to(storage.dtype)
    return {fmt.DICTIONARY: quantized, fmt.DICTIONARY_SCALES: scales.to(fmt.SCALES_DTYPE)}


def resolve_values(target: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor,
                   value_dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Values re-solved on their fixed support for a fixed (rounded) dictionary, then quantized.

    target [n, m], dictionary [n, k] (whitened space), coef/mask [m, k] (coef: the start) →
    (stored coefficient tensors, their dequantized values as coef [m, k])."""
    return quantize(solve_on_support(target, dictionary, mask, coef), mask, value_dtype, dictionary)


def solve_on_support(target: torch.Tensor, dictionary: torch.Tensor, mask: torch.Tensor, start: torch.Tensor
                     ) -> torch.Tensor:
    """argmin ‖target − dictionary·coefᵀ‖ over coef [m, k] supported on mask (CG from ``start``; on a dense
    support, SVD's s = k, one Cholesky solve of the normal equations instead).

    The solve runs on unit-norm atoms (Jacobi preconditioning) and the values are scaled back: after balancing
    (``balance_atom_scales``) the atoms' norms differ by 100× and more, and CG needs more steps the wider the
    spread of its Gram — nearly orthogonal atoms (the orthogonal structure) converge in a few steps this way."""
    norms = dictionary.norm(dim=0).clamp_min(torch.finfo(dictionary.dtype).tiny)
    unit = dictionary / norms
    gram = unit.T @ unit
    alpha = target.T @ unit
    if bool(mask.all()):
        factor, info = torch.linalg.cholesky_ex(gram.double())
        if int(info) == 0:
            return (torch.cholesky_solve(alpha.T.double(), factor).T / norms).to(alpha.dtype)
    return least_squares_on_support(gram, alpha, mask, start * norms, 50, 1e-5) / norms
