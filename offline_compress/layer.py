"""One linear layer: whiten → choose structure and learn → quantize/refit → un-whiten → pack.

A pure function of (weight, Gram, ratio, settings); the checkpoint layout comes from
``cospadi_vllm.format``.

Structure search (CoSpaDi's default): at the layer's byte budget, each candidate k/s gets a short
trial of dictionary learning; the one with the lowest whitened error continues to the full
iteration count. The dense case s = k (SVD-LLM's structure, from the SVD the dictionary starts from
anyway) is always evaluated after quantization too, and kept if it is better, so a module is never
worse than SVD-LLM at the same bytes.
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
DEFAULT_K_OVER_S = (1.5, 2.0, 3.0)
SVD_STRUCTURE = "svd"  # name of the s = k candidate in reports


@dataclass(frozen=True)
class LayerSettings:
    method: str = "cospadi"
    value_dtype: str = "int8"
    k_over_s: tuple[float, ...] = DEFAULT_K_OVER_S  # one value forces that structure (no search)
    iterations: int = 8
    trial_iterations: int = 1
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


def whitened_error(weight_t: torch.Tensor, approx_t: torch.Tensor, factor: torch.Tensor) -> float:
    """‖Lᵀ(A − Â)‖_F / ‖LᵀA‖_F — relative output error on the calibration inputs."""
    target = whiten(weight_t.double(), factor)
    return float((target - whiten(approx_t.double(), factor)).norm() / target.norm().clamp_min(1e-30))


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
    """
    started = time.perf_counter()
    device = gram.device
    out_features, in_features = weight.shape
    weight_t = weight.to(device=device, dtype=torch.float64).T
    factor, damping = whitening_factor(gram)
    target = whiten(weight_t, factor).to(settings.compute_dtype)
    left, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    candidates: dict[str, float] = {}

    if settings.method == "svd-llm":  # the baseline as published: no balancing, no refit
        shape = layer_shape(in_features, out_features, ratio, SVD_STRUCTURE, settings.value_dtype)
        atoms, coef, mask = _svd_candidate(left, sigma, vh, shape.k)
        structure, unquantized = SVD_STRUCTURE, relative_error(target, atoms, coef)
        stored, _ = quantize(coef, mask, settings.value_dtype)
    elif settings.method == "cospadi":
        generator = torch.Generator().manual_seed(settings.seed)
        learned = {}
        for k_over_s in settings.k_over_s:
            shape = layer_shape(in_features, out_features, ratio, k_over_s, settings.value_dtype)
            trial = settings.trial_iterations if settings.searches else settings.iterations
            state = learn_dictionary(target, shape.k, shape.s, trial, generator, settings.workspace_bytes, left=left)
            learned[f"k/s={k_over_s:g}"] = (shape, state)
            candidates[f"k/s={k_over_s:g} trial"] = relative_error(target, state[0], state[1])
        structure = min(learned, key=lambda name: candidates[f"{name} trial"])
        shape, state = learned[structure]
        if settings.searches and settings.iterations > settings.trial_iterations:
            state = learn_dictionary(target, shape.k, shape.s, settings.iterations - settings.trial_iterations,
                                     generator, settings.workspace_bytes, start=state)
        unquantized = relative_error(target, state[0], state[1])
        atoms, stored = quantize_and_refit(target, *state, settings.value_dtype, rounds=settings.refit_rounds)
        if settings.searches:  # s = k as a candidate too: keep whichever is better after quantization
            candidates[structure] = _quantized_error(target, atoms, stored, shape.k)
            svd_shape = layer_shape(in_features, out_features, ratio, SVD_STRUCTURE, settings.value_dtype)
            svd_state = _svd_candidate(left, sigma, vh, svd_shape.k)
            svd_atoms, svd_stored = quantize_and_refit(target, *svd_state, settings.value_dtype)
            candidates[SVD_STRUCTURE] = _quantized_error(target, svd_atoms, svd_stored, svd_shape.k)
            if candidates[SVD_STRUCTURE] < candidates[structure]:
                structure, shape, atoms, stored = SVD_STRUCTURE, svd_shape, svd_atoms, svd_stored
                unquantized = relative_error(target, *svd_state[:2])
    else:
        raise ValueError(f"unknown method {settings.method!r}; choose from {METHODS}")

    dictionary = unwhiten(atoms.double(), factor).to(fmt.DICTIONARY_DTYPE)
    tensors = {fmt.DICTIONARY: dictionary, **stored}
    tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
    approx_t = fmt.reconstruct_weight_t(tensors, shape.k).to(device)
    return CompressedLinear(
        tensors=tensors,
        shape=shape,
        structure=structure,
        whitened_rel_error=whitened_error(weight_t, approx_t, factor),
        unquantized_rel_error=unquantized,
        candidates=candidates,
        damping=damping,
        seconds=time.perf_counter() - started,
    )


def _quantized_error(target: torch.Tensor, atoms: torch.Tensor, stored: dict[str, torch.Tensor], k: int) -> float:
    """Whitened error of (refitted atoms, stored quantized coefficients), before bf16 rounding of D."""
    dequantized = fmt.decode_coefficients(stored[fmt.COEF_MASK], stored[fmt.COEF_VALUES], stored[fmt.COEF_SCALES], k)
    return relative_error(target, atoms, dequantized.T.to(atoms.dtype))
