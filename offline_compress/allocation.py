"""Per-module byte budgets chosen by measured sensitivity (``--allocation sensitivity``).

Under one uniform ratio the whitened errors of SmolLM2's modules differ by 4× at CR 0.3 (v_proj
0.25, down_proj 0.20 against q_proj 0.06): some modules lose much more per byte removed than others.
Here every compression unit (one module, or one shared-dictionary group) gets its own ratio so that
the total stored bytes stay those of the uniform ratio while Σ_u e_u² — the sum of the units'
squared relative output errors on the calibration data — is as small as the measured curves allow.

The curve e_u(ratio) is measured on the unit's whitened target Ã = LᵀA from its singular values
σ: at the byte budget of a ratio, SVD's rank r (s = k, stored like CoSpaDi) leaves
e² = Σ_{i>r} σ_i² / Σ σ_i². That is the SVD-LLM error, not CoSpaDi's (which is lower at the same
bytes), but both are set by how fast the whitened spectrum decays, and it costs one SVD per unit
instead of a dictionary learning per unit and candidate ratio.

The split is the Lagrangian one: for a price λ per byte, each unit takes the ratio minimising
e_u(r)² + λ·(1 − r)·dense_u / dense_total; λ is bisected until the units' bytes fit the budget.
Ratios stay within ``SPREAD`` of the target so that no module is pushed to a regime the proxy
does not describe (very low ranks, or nearly dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospadi_vllm import format as fmt
from offline_compress.budget import BudgetError, solve_k_s
from offline_compress.problem import whitened_target

SPREAD = 0.25  # unit ratios in [target − SPREAD, target + SPREAD] ∩ [MIN_RATIO, MAX_RATIO]
MIN_RATIO, MAX_RATIO = 0.02, 0.9
STEP = 0.01  # ratio grid


@dataclass(frozen=True)
class UnitSpectrum:
    """What the allocation needs of one compression unit (a module, or a group sharing a dictionary)."""

    key: str  # the first member's prefix
    in_features: int
    out_features: int  # of all members together (a shared dictionary is one factorisation)
    energy: torch.Tensor  # [min(in, out)] float64: squared singular values of the whitened target, descending

    @property
    def dense_bytes(self) -> int:
        return fmt.dense_bf16_bytes(self.in_features, self.out_features)


def spectrum(key: str, weight: torch.Tensor, factor: torch.Tensor) -> UnitSpectrum:
    """weight [out, in] (stacked over a group's members), factor L [in, in] of its (mean) Gram."""
    sigma = torch.linalg.svdvals(whitened_target(weight, factor, torch.float64))  # of Ã [in, out]
    return UnitSpectrum(key, weight.shape[1], weight.shape[0], (sigma * sigma).cpu())


def ratio_grid(target: float) -> list[float]:
    lo, hi = max(MIN_RATIO, target - SPREAD), min(MAX_RATIO, target + SPREAD)
    steps = round((hi - lo) / STEP)
    return [round(lo + i * STEP, 4) for i in range(steps + 1)]


def error_curve(unit: UnitSpectrum, ratios: list[float], value_dtype: str,
                dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE) -> list[float]:
    """e_u(r)² for each ratio: the whitened energy left outside SVD's rank at that byte budget."""
    tail = unit.energy.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j ≥ i} σ_j²
    total = float(tail[0]) if tail.numel() else 0.0
    errors = []
    for ratio in ratios:
        try:
            rank = solve_k_s(unit.in_features, unit.out_features, ratio, 1.0, value_dtype,
                             dense_coefficients=True, dictionary_dtype_name=dictionary_dtype).k
        except BudgetError:  # not even one atom fits: everything is lost
            rank = 0
        errors.append(float(tail[rank]) / total if rank < tail.numel() and total > 0 else 0.0)
    return errors


def allocate(units: list[UnitSpectrum], target: float, value_dtype: str,
             dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE) -> dict[str, float]:
    """{unit key: ratio}: Σ_u (1 − r_u)·dense_u ≤ (1 − target)·Σ_u dense_u, Σ_u e_u(r_u)² minimal on the grid."""
    grid = ratio_grid(target)
    dense_total = sum(u.dense_bytes for u in units)
    curves = [error_curve(u, grid, value_dtype, dictionary_dtype) for u in units]

    def choose(price: float) -> list[float]:
        chosen = []
        for unit, curve in zip(units, curves, strict=True):
            kept = unit.dense_bytes / dense_total
            costs = [err + price * (1.0 - r) * kept for r, err in zip(grid, curve, strict=True)]
            chosen.append(grid[min(range(len(grid)), key=costs.__getitem__)])
        return chosen

    def saved(ratios: list[float]) -> float:
        return sum(r * u.dense_bytes for r, u in zip(ratios, units, strict=True)) / dense_total

    lo, hi = 0.0, 1.0
    while saved(choose(hi)) < target and hi < 1e12:  # a high enough price compresses every unit to the grid's top
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if saved(choose(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return {u.key: r for u, r in zip(units, choose(hi), strict=True)}
