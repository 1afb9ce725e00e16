"""The precision search (``--value-dtype auto`` / ``--dictionary-dtype auto``): which storage types a layer keeps.

At one byte budget, a smaller dictionary or value type buys more atoms and non-zeros but rounds each one more
coarsely; which wins depends on the layer (SmolLM2 at CR 0.3: int8 everywhere; at CR 0.5 a 4-bit dictionary;
``benchmarks/results/quality-smollm2.md``). So each candidate pair of types gets the closed-form structure search
(SVD's s = k and the orthogonal dictionary, as ``--fast``) at the module's own budget, and the pair with the lowest
whitened error after quantization is kept; the full structure search then runs at that pair only (with ``--fast``
the comparison's own results are stored). Modules vLLM fuses into one layer (q/k/v, gate/up) read one input and are
held in one tensor per role, so they store the same types: the pair is chosen for the fused layer, by the output
error of all its modules together, Σ_i ‖X(A_i − Â_i)‖² = Σ_i (rel_error_i · ‖X A_i‖)².
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from offline_compress.layer import CompressedLinear, compress_linear
from offline_compress.options import AUTO
from offline_compress.problem import LayerSettings
from offline_compress.search import better

# What ``auto`` compares: the integer types the serving kernels read in place (a bfloat16 dictionary or float
# values never won at the same bytes: quality-smollm2.md).
AUTO_VALUE_DTYPES = ("int8", "int4")
AUTO_DICTIONARY_DTYPES = ("int8", "int4")


def searches_precision(settings: LayerSettings) -> bool:
    return AUTO in (settings.value_dtype, settings.dictionary_dtype)


def precision_candidates(settings: LayerSettings) -> list[LayerSettings]:
    """``settings`` once per (value dtype, dictionary dtype) pair that ``auto`` leaves open."""
    values = AUTO_VALUE_DTYPES if settings.value_dtype == AUTO else (settings.value_dtype,)
    dictionaries = AUTO_DICTIONARY_DTYPES if settings.dictionary_dtype == AUTO else (settings.dictionary_dtype,)
    return [replace(settings, value_dtype=v, dictionary_dtype=d) for v in values for d in dictionaries]


def precision_name(settings: LayerSettings) -> str:
    return f"values {settings.value_dtype} + dictionary {settings.dictionary_dtype}"


def output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X·weightᵀ‖² = tr(W G Wᵀ) for weight [out, in], gram [in, in] = XᵀX."""
    w = weight.to(gram.device, torch.float64)
    return float(((w @ gram.double()) * w).sum())


def compress_fused(weights: list[torch.Tensor], gram: torch.Tensor, ratios: list[float], settings: LayerSettings
                   ) -> list[CompressedLinear]:
    """The modules that read one input (one vLLM layer: q/k/v or gate/up, or a single module) → one
    CompressedLinear each, all in the same storage types: ``settings``' own, or the pair the precision search
    chooses where one of them is ``auto``. weights: [out_i, in] each, gram [in, in], ratios: each one's budget."""
    if not searches_precision(settings):
        return [compress_linear(w, gram, r, settings) for w, r in zip(weights, ratios, strict=True)]
    started = time.perf_counter()
    energies = [output_energy(w, gram) for w in weights]
    best: tuple[LayerSettings, list[CompressedLinear], float, int] | None = None
    errors: dict[str, float] = {}
    for candidate in precision_candidates(settings):
        closed_form = replace(candidate, k_over_s=())  # the --fast search at this pair
        results = [compress_linear(w, gram, r, closed_form) for w, r in zip(weights, ratios, strict=True)]
        # Relative error of the fused layer's output: its modules' errors weighted by their output energy.
        error = (sum(r.whitened_rel_error**2 * e for r, e in zip(results, energies, strict=True))
                 / max(sum(energies), 1e-300)) ** 0.5
        stored = sum(candidate.stored_bytes(r.shape) for r in results)
        errors[f"precision: {precision_name(candidate)}"] = error
        if best is None or better(error, stored, best[2], best[3]):
            best = (candidate, results, error, stored)
        del results
    chosen, results = best[0], best[1]
    comparison_seconds = time.perf_counter() - started
    if settings.k_over_s:  # the full structure search at the chosen pair (its time: each result's own seconds)
        results = [compress_linear(w, gram, r, chosen) for w, r in zip(weights, ratios, strict=True)]
    else:  # the comparison's results are stored: its time is theirs
        for result in results:
            result.seconds = 0.0
    for result in results:
        result.candidates = {**errors, **result.candidates}
        result.seconds += comparison_seconds / len(results)
    return results
