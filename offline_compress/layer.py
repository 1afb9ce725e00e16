"""One linear layer: whiten → choose structure and learn → quantize/refit → un-whiten → pack.

Pure functions of (weight, Gram, ratio, settings); the checkpoint layout comes from ``cospadi_vllm.format``,
the whitened problem from ``problem``, the structure search (CoSpaDi's default) from ``search``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.budget import SVD_STRUCTURE
from offline_compress.dictionary import relative_error
from offline_compress.problem import (
    LayerSettings,
    QuantizedStructure,
    WhitenedProblem,
    whitened_error,
    whitened_problem,
    with_rounded_dictionary,
)
from offline_compress.quantization import quantize, quantize_dictionary
from offline_compress.search import cospadi
from offline_compress.whitening import unwhiten, whitening_factor


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
    value_dtype: str = "int8"  # the storage types of its tensors (format names)
    dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE


def compress_linear(weight: torch.Tensor, gram: torch.Tensor, ratio: float, settings: LayerSettings) -> CompressedLinear:
    """weight [out, in] (nn.Linear layout), gram [in, in], byte budget ``ratio`` → CompressedLinear,
    by ``settings.method``: the CoSpaDi structure search or the SVD-LLM baseline."""
    started = time.perf_counter()
    problem = whitened_problem(weight, gram, settings)
    if settings.method == "svd-llm":
        chosen, candidates = svd_llm(problem, ratio, settings), {}
    elif settings.method == "cospadi":
        chosen, candidates = cospadi(problem, ratio, settings)
    else:
        raise ValueError(f"unknown method {settings.method!r}")
    return pack(weight, problem, chosen, candidates, settings, started)


def svd_llm(problem: WhitenedProblem, ratio: float, settings: LayerSettings) -> QuantizedStructure:
    """The baseline as published: truncated SVD at the budget's rank, quantized without balancing or refit."""
    shape = settings.shape(problem.in_features, problem.out_features, ratio, SVD_STRUCTURE)
    svd = problem.svd_factorization(shape.k)
    stored, dequantized = quantize(svd.coef, svd.mask, settings.value_dtype)
    structure = QuantizedStructure(SVD_STRUCTURE, shape, svd.dictionary, stored,
                                   relative_error(problem.target, svd.dictionary, svd.coef))
    return with_rounded_dictionary(problem, structure, svd.mask, dequantized, settings)[0]  # no error needed


def pack(weight: torch.Tensor, problem: WhitenedProblem, chosen: QuantizedStructure, candidates: dict[str, float],
         settings: LayerSettings, started: float) -> CompressedLinear:
    """Un-whiten the chosen dictionary (D = L⁻ᵀD̃, stored in bf16) unless it is stored rounded already, and
    measure the stored layer's error."""
    stored_dictionary = chosen.stored_dictionary or quantize_dictionary(
        unwhiten(chosen.dictionary.double(), problem.factor), "bfloat16")
    tensors = {name: t.contiguous().cpu() for name, t in {**stored_dictionary, **chosen.stored}.items()}
    approx_t = codec.reconstruct_weight_t(tensors, chosen.shape.k).to(problem.factor.device)
    return CompressedLinear(
        tensors=tensors,
        shape=chosen.shape,
        structure=chosen.structure,
        whitened_rel_error=whitened_error(weight.to(problem.factor.device), approx_t, problem.factor),
        unquantized_rel_error=chosen.unquantized_error,
        candidates=candidates,
        damping=problem.damping,
        seconds=time.perf_counter() - started,
        value_dtype=settings.value_dtype,
        dictionary_dtype=settings.dictionary_dtype,
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
    approx_t = codec.reconstruct_weight_t(group.tensors, group.shape.k).to(grams[0].device)
    results, row = [], 0
    for index, (weight, gram) in enumerate(zip(weights, grams, strict=True)):
        rows = slice(row, row + weight.shape[0])
        row = rows.stop
        tensors = {suffix: group.tensors[suffix][rows].contiguous() for suffix in fmt.COEF_SUFFIXES}
        if index == 0:
            tensors = {**fmt.dictionary_tensors(group.tensors), **tensors}
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
            value_dtype=group.value_dtype,
            dictionary_dtype=group.dictionary_dtype,
        ))
    return results
