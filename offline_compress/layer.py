"""One linear layer: whiten → choose structure and learn → quantize/refit → un-whiten → pack.

A pure function of (weight, Gram, ratio, settings); the checkpoint layout comes from
``cospadi_vllm.format``.

Structure search (CoSpaDi's default): at the layer's byte budget, each candidate k/s gets a short
trial of dictionary learning; the one with the lowest whitened error continues to the full
iteration count. The dense case s = k (SVD-LLM's structure, from the SVD the dictionary starts from
anyway) is evaluated after quantization too, and kept if it is better, so a module is never worse
than SVD-LLM at the same bytes — wherever its rank (at most min(in, out)) can spend the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cospadi_vllm import format as fmt
from offline_compress.dictionary import (
    DEFAULT_WORKSPACE_BYTES,
    learn_dictionary,
    relative_error,
)
from offline_compress.quantization import quantize, quantize_and_refit
from offline_compress.whitening import unwhiten, whiten, whitening_factor

METHODS = ("cospadi", "svd-llm")
DEFAULT_K_OVER_S = (1.5, 2.0)  # k/s = 3 never won on SmolLM2 (benchmarks/results/NOTES.md item 12)
SVD_STRUCTURE = "svd"  # name of the s = k candidate in reports
BUDGET_USED = 0.99  # a candidate structure must store at least this share of the layer's byte budget


@dataclass(frozen=True)
class LayerSettings:
    method: str = "cospadi"
    value_dtype: str = "int8"
    k_over_s: tuple[float, ...] = DEFAULT_K_OVER_S  # one value forces that structure (no search)
    iterations: int = 8
    trial_iterations: int = 2  # after 1, low k/s always looks better; after 2 the ranking matches T = 8
    refit_rounds: int = 1
    seed: int = 0
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    compute_dtype: torch.dtype = torch.float32

    @property
    def searches(self) -> bool:
        return self.method == "cospadi" and len(self.k_over_s) > 1


@dataclass
class CompressedLinear:
    """Stored tensors of one layer plus what the report says about it."""

    tensors: dict[str, torch.Tensor]  # {format suffix: tensor} on CPU
    shape: fmt.LayerShape
    structure: str  # "k/s=2.0", or SVD_STRUCTURE for s = k
    whitened_rel_error: float  # ‖Lᵀ(A − Â)‖ / ‖LᵀA‖ with Â rebuilt from the stored tensors
    unquantized_rel_error: float  # the same before quantization (float dictionary and coefficients)
    candidates: dict[str, float] = field(default_factory=dict)  # trial / final errors of the structures tried
    damping: float = 0.0
    seconds: float = 0.0


def whitened_error(weight: torch.Tensor, approx_t: torch.Tensor, factor: torch.Tensor) -> float:
    """‖Lᵀ(A − Â)‖_F / ‖LᵀA‖_F — relative output error on the calibration inputs.

    weight [out, in] (A = weightᵀ), approx_t = Â [in, out]; float64, a block of columns at a time.
    """
    error = reference = 0.0
    for cols in _column_blocks(weight.shape[0]):
        target = whiten(weight[cols].T.double(), factor)
        error += float((target - whiten(approx_t[:, cols].double(), factor)).square().sum())
        reference += float(target.square().sum())
    return (error / max(reference, 1e-300)) ** 0.5


def whitened_target(weight: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ã = Lᵀ·weightᵀ [in, out] in ``dtype``, computed in float64 a block of columns at a time."""
    target = torch.empty(weight.shape[1], weight.shape[0], dtype=dtype, device=factor.device)
    for cols in _column_blocks(weight.shape[0]):
        target[:, cols] = whiten(weight[cols].T.to(factor.device, torch.float64), factor).to(dtype)
    return target


def _column_blocks(m: int, block: int = 2048) -> list[slice]:
    """Float64 copies of a whole [in, out] matrix are the largest temporaries otherwise (8·in·out bytes)."""
    return [slice(lo, min(m, lo + block)) for lo in range(0, m, block)]


def layer_shape(in_features: int, out_features: int, ratio: float, structure: str | float, value_dtype: str):
    """The (k, s) of one candidate structure at the layer's byte budget."""
    dense = structure == SVD_STRUCTURE
    return fmt.solve_k_s(in_features, out_features, ratio, 1.0 if dense else float(structure), value_dtype,
                         dense_coefficients=dense)


def _svd_candidate(left, sigma, vh, k):
    """SVD-LLM's factorisation at rank k as (dictionary [n, k], coef [m, k], mask): Σ in the dictionary."""
    coef = vh[:k].T.contiguous()
    return left[:, :k] * sigma[:k], coef, torch.ones_like(coef, dtype=torch.bool)


def compress_linear(weight: torch.Tensor, gram: torch.Tensor, ratio: float, settings: LayerSettings) -> CompressedLinear:
    """weight [out, in] (nn.Linear layout), gram [in, in], byte budget ``ratio`` → CompressedLinear.

    The whitened target Ã = LᵀWᵀ [in, out] is factored as D̃·Cᵀ, C's non-zeros are quantized per
    output column, D̃ is refitted to the quantized C (cospadi), then D = L⁻ᵀD̃ is stored in bf16.
    At most two candidates' states (the best so far and the one in trial) are alive at once.
    """
    started = time.perf_counter()
    device = gram.device
    out_features, in_features = weight.shape
    factor, damping = whitening_factor(gram)
    target = whitened_target(weight, factor, settings.compute_dtype)
    left, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    candidates: dict[str, float] = {}
    svd_shape = layer_shape(in_features, out_features, ratio, SVD_STRUCTURE, settings.value_dtype)
    svd_state = _svd_candidate(left, sigma, vh, svd_shape.k)
    del sigma, vh
    # s = k is a candidate only where it can spend the budget: its rank stops at min(in, out), and a
    # structure that leaves bytes unused would make the checkpoint smaller than asked (a shared
    # gate/up group at CR 0.2 on SmolLM2 took full-rank SVD and ended at CR 0.223, not 0.2).
    budget = (1.0 - ratio) * fmt.dense_bf16_bytes(in_features, out_features)
    compare_svd = settings.searches and fmt.stored_bytes(svd_shape, settings.value_dtype) >= BUDGET_USED * budget

    if settings.method == "svd-llm":  # the baseline as published: no balancing, no refit
        structure, shape, (atoms, coef, mask) = SVD_STRUCTURE, svd_shape, svd_state
        unquantized = relative_error(target, atoms, coef)
        stored, _ = quantize(coef, mask, settings.value_dtype)
    elif settings.method == "cospadi":
        if compare_svd:  # s = k as a candidate too, scored after quantization below
            svd_unquantized = relative_error(target, *svd_state[:2])
            svd_atoms, svd_stored, svd_dequantized = quantize_and_refit(target, *svd_state, settings.value_dtype)
            candidates[SVD_STRUCTURE] = relative_error(target, svd_atoms, svd_dequantized)
            del svd_dequantized
        del svd_state
        generator = torch.Generator().manual_seed(settings.seed)
        trial = settings.trial_iterations if settings.searches else settings.iterations
        best = None
        for k_over_s in settings.k_over_s:
            name = f"k/s={k_over_s:g}"
            shape = layer_shape(in_features, out_features, ratio, k_over_s, settings.value_dtype)
            state = learn_dictionary(target, shape.k, shape.s, trial, generator, settings.workspace_bytes, left=left)
            candidates[f"{name} trial"] = relative_error(target, state[0], state[1])
            if best is None or candidates[f"{name} trial"] < candidates[f"{best[0]} trial"]:
                best = (name, shape, state)
            del state
        del left
        structure, shape, state = best
        del best
        if settings.searches and settings.iterations > settings.trial_iterations:
            state = learn_dictionary(target, shape.k, shape.s, settings.iterations - settings.trial_iterations,
                                     generator, settings.workspace_bytes, start=state)
        unquantized = relative_error(target, state[0], state[1])
        atoms, stored, dequantized = quantize_and_refit(target, *state, settings.value_dtype,
                                                        rounds=settings.refit_rounds)
        del state
        if compare_svd:  # keep whichever structure is better after quantization
            candidates[structure] = relative_error(target, atoms, dequantized)
            if candidates[SVD_STRUCTURE] < candidates[structure]:
                structure, shape, atoms, stored = SVD_STRUCTURE, svd_shape, svd_atoms, svd_stored
                unquantized = svd_unquantized
            del svd_atoms, svd_stored
        del dequantized
    else:
        raise ValueError(f"unknown method {settings.method!r}; choose from {METHODS}")
    del target

    dictionary = unwhiten(atoms.double(), factor).to(fmt.DICTIONARY_DTYPE)
    del atoms
    tensors = {fmt.DICTIONARY: dictionary, **stored}
    tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
    approx_t = fmt.reconstruct_weight_t(tensors, shape.k).to(device)
    return CompressedLinear(
        tensors=tensors,
        shape=shape,
        structure=structure,
        whitened_rel_error=whitened_error(weight.to(device), approx_t, factor),
        unquantized_rel_error=unquantized,
        candidates=candidates,
        damping=damping,
        seconds=time.perf_counter() - started,
    )



def shared_problem(weights: list[torch.Tensor], grams: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a shared dictionary is learned on: (stacked weight [Σ out_i, in], mean Gram [in, in]).

    See ``compress_shared`` for why the mean of the layers' Grams."""
    return torch.cat(weights, 0), torch.stack(grams).mean(0)


def compress_shared(
    weights: list[torch.Tensor], grams: list[torch.Tensor], ratio: float, settings: LayerSettings
) -> list[CompressedLinear]:
    """G layers that share one dictionary (CoSpaDi's cross-layer sharing) → one CompressedLinear each.

    weights: G × [out_i, in] (nn.Linear layout, same in), grams: G × [in, in] (each layer's own input
    Gram). The shared objective is Σ_i ‖X_i(A_i − D·C_i)‖², i.e. Σ_i tr(E_iᵀ G_i E_i). No single
    whitening turns that into one factorisation when the G_i differ, so the dictionary is learned
    on L̄ᵀ[A_1 … A_G] with L̄L̄ᵀ = mean_i G_i — exact when the layers' Grams are equal, and each
    layer's error is still weighted by its own activation energy through the mean. It is then
    ``compress_linear`` on the stacked [Σ out_i, in] weight: the byte budget of the group counts the
    dictionary once and the structure search (including SVD's s = k, which is Basis Sharing) runs
    for the group. Coefficients come back per layer; only the first layer's result holds the
    dictionary tensor. ``whitened_rel_error`` of each layer is measured under its own Gram.
    """
    group = compress_linear(*shared_problem(weights, grams), ratio, settings)
    approx_t = fmt.reconstruct_weight_t(group.tensors, group.shape.k).to(grams[0].device)
    results, row = [], 0
    for index, (weight, gram) in enumerate(zip(weights, grams, strict=True)):
        rows = slice(row, row + weight.shape[0])
        row = rows.stop
        tensors = {suffix: group.tensors[suffix][rows].contiguous() for suffix in fmt.COEF_SUFFIXES}
        if index == 0:
            tensors = {fmt.DICTIONARY: group.tensors[fmt.DICTIONARY], **tensors}
        factor, damping = whitening_factor(gram)
        results.append(CompressedLinear(
            tensors=tensors,
            shape=fmt.LayerShape(weight.shape[1], weight.shape[0], group.shape.k, group.shape.s),
            structure=group.structure,
            whitened_rel_error=whitened_error(weight.to(factor.device), approx_t[:, rows], factor),
            unquantized_rel_error=group.unquantized_rel_error,
            candidates=group.candidates,
            damping=damping,
            seconds=group.seconds / len(weights),
        ))
    return results
