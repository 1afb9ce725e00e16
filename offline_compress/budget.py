"""How many atoms (k) and non-zeros per column (s) a layer's byte budget buys, for each structure."""

from __future__ import annotations

from collections.abc import Callable

from cospadi_vllm import format as fmt

SVD_STRUCTURE = "svd"  # the dense structure s = k (SVD-LLM's), as named in reports


class BudgetError(ValueError):
    """A ratio outside (0, 1) or a budget that leaves no room for one atom."""


def solve_k_s(
    in_features: int,
    out_features: int,
    ratio: float,
    k_over_s: float,
    value_dtype_name: str,
    dense_coefficients: bool = False,
    dictionary_dtype_name: str = fmt.DEFAULT_DICTIONARY_DTYPE,
) -> fmt.LayerShape:
    """Largest (k, s) whose stored bytes fit in ``(1 - ratio)`` of the dense bf16 layer.

    k is the largest atom count with s = floor(k / k_over_s) that fits; s is then raised
    while it still fits (by at most a few), so the budget is used up to one atom's bytes.
    ``dense_coefficients`` gives the SVD-LLM case s = k (k ≤ min(in, out)). A smaller dictionary dtype
    (int8) buys more atoms at the same budget.
    """
    if not 0.0 < ratio < 1.0:
        raise BudgetError(f"compression ratio must be in (0, 1), got {ratio}")
    if not k_over_s >= 1.0:
        raise BudgetError(f"k/s must be >= 1, got {k_over_s}")
    budget = (1.0 - ratio) * fmt.dense_bf16_bytes(in_features, out_features)

    def s_for(k: int) -> int:
        return k if dense_coefficients else max(1, min(in_features, int(k / k_over_s)))

    def stored(k: int, s: int) -> int:
        shape = fmt.LayerShape(in_features, out_features, k, s)
        return fmt.stored_bytes(shape, value_dtype_name, dictionary_dtype_name=dictionary_dtype_name)

    def fits(k: int) -> bool:
        return stored(k, s_for(k)) <= budget

    k_cap = min(in_features, out_features) if dense_coefficients else 4 * max(in_features, out_features)
    k = largest_fitting(k_cap, fits)
    if k < 1:
        raise BudgetError(f"ratio {ratio} leaves no room for even one atom in a {in_features}->{out_features} layer")
    s = s_for(k)
    if not dense_coefficients:
        while s < min(k, in_features) and stored(k, s + 1) <= budget:
            s += 1
    return fmt.LayerShape(in_features, out_features, k, s)


def layer_shape(in_features: int, out_features: int, ratio: float, structure: str | float,
                value_dtype: str, dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE) -> fmt.LayerShape:
    """The (k, s) of one candidate structure (a k/s value, or ``SVD_STRUCTURE``) at the layer's budget."""
    dense = structure == SVD_STRUCTURE
    return solve_k_s(in_features, out_features, ratio, 1.0 if dense else float(structure), value_dtype,
                     dense_coefficients=dense, dictionary_dtype_name=dictionary_dtype)


def largest_sparsity(in_features: int, out_features: int, ratio: float, k: int, value_dtype: str,
                     dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE) -> int:
    """The most non-zeros per column (≤ min(k, in)) that k atoms leave room for in the budget; 0 if none fits."""
    budget = (1.0 - ratio) * fmt.dense_bf16_bytes(in_features, out_features)

    def fits(s: int) -> bool:
        shape = fmt.LayerShape(in_features, out_features, k, s)
        return fmt.stored_bytes(shape, value_dtype, dictionary_dtype_name=dictionary_dtype) <= budget

    return largest_fitting(min(k, in_features), fits)


def largest_fitting(cap: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [0, cap] with fits(n), for a ``fits`` that holds up to some n and fails above (stored
    bytes grow with k and with s); 0 when fits(1) fails. Bisection: log2(cap) byte counts."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
