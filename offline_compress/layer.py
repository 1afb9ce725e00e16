"""One linear layer: whiten → choose structure and learn → quantize/refit → un-whiten → pack.

Pure functions of (weight, Gram, ratio, settings); the checkpoint layout comes from ``cospadi_vllm.format``.

Structure search (CoSpaDi's default): every structure that fits the layer's byte budget is a
candidate. The dense case s = k (SVD-LLM's structure, from the SVD the dictionary starts from anyway)
comes first, at the largest rank the budget buys (full rank where it fits with bytes to spare); each
k/s gets a short trial of dictionary learning and the best continues to the full iteration count; the
lowest whitened error after quantization is stored (ties: fewer bytes). So with the search on, a module
is never worse than SVD-LLM's structure on the same Gram within the same budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.budget import SVD_STRUCTURE, layer_shape
from offline_compress.dictionary import (
    DEFAULT_WORKSPACE_BYTES,
    initial_dictionary,
    learn_dictionary,
    relative_error,
    sparse_code,
)
from offline_compress.options import DEFAULT_K_OVER_S
from offline_compress.quantization import quantize, quantize_and_refit, quantize_dictionary, resolve_values
from offline_compress.whitening import unwhiten, whiten, whitening_factor


@dataclass(frozen=True)
class LayerSettings:
    method: str = "cospadi"
    value_dtype: str = "int8"
    # The layer API's default is the format's float dictionary; the compressor passes its own
    # (options.DEFAULT_DICTIONARY_DTYPE, int8) or the one asked for.
    dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE
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

    def shape(self, in_features: int, out_features: int, ratio: float, structure: str | float) -> fmt.LayerShape:
        """(k, s) of ``structure`` at this layer's byte budget, in these settings' storage dtypes."""
        return layer_shape(in_features, out_features, ratio, structure, self.value_dtype, self.dictionary_dtype)

    def stored_bytes(self, shape: fmt.LayerShape) -> int:
        return fmt.stored_bytes(shape, self.value_dtype, dictionary_dtype_name=self.dictionary_dtype)


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


@dataclass
class Factorization:
    """Whitened target [in, out] ≈ dictionary [in, k] · coefᵀ, coef [out, k] non-zero only on mask."""

    dictionary: torch.Tensor
    coef: torch.Tensor
    mask: torch.Tensor


@dataclass
class QuantizedStructure:
    """One structure ready to store: its (refitted) whitened dictionary and its stored coefficient tensors."""

    structure: str
    shape: fmt.LayerShape
    dictionary: torch.Tensor  # [in, k], whitened space
    stored: dict[str, torch.Tensor]  # {COEF_MASK, COEF_VALUES, COEF_SCALES}
    unquantized_error: float
    # {DICTIONARY, DICTIONARY_SCALES} where the dictionary was rounded before the values were solved (int8);
    # None: ``pack`` un-whitens ``dictionary`` and rounds it to bfloat16.
    stored_dictionary: dict[str, torch.Tensor] | None = None


@dataclass
class WhitenedProblem:
    """What every structure is fitted to: Ã = LᵀWᵀ [in, out] (LLᵀ = Gram) and its SVD Ã = U·diag(σ)·Vᵀ."""

    target: torch.Tensor
    factor: torch.Tensor  # L [in, in]
    damping: float
    left: torch.Tensor  # U [in, r]
    sigma: torch.Tensor  # [r]
    vh: torch.Tensor  # Vᵀ [r, out]

    @property
    def in_features(self) -> int:
        return self.target.shape[0]

    @property
    def out_features(self) -> int:
        return self.target.shape[1]

    def svd_factorization(self, k: int) -> Factorization:
        """SVD-LLM's factorisation at rank k: Σ in the dictionary, a dense coefficient matrix."""
        coef = self.vh[:k].T.contiguous()
        return Factorization(self.left[:, :k] * self.sigma[:k], coef, torch.ones_like(coef, dtype=torch.bool))


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


def whitened_problem(weight: torch.Tensor, gram: torch.Tensor, settings: LayerSettings) -> WhitenedProblem:
    """weight [out, in], gram [in, in] → the whitened target and its SVD (every method starts from it)."""
    factor, damping = whitening_factor(gram)
    target = whitened_target(weight, factor, settings.compute_dtype)
    left, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    return WhitenedProblem(target, factor, damping, left, sigma, vh)


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
    return pack(weight, problem, chosen, candidates, started)


def svd_llm(problem: WhitenedProblem, ratio: float, settings: LayerSettings) -> QuantizedStructure:
    """The baseline as published: truncated SVD at the budget's rank, quantized without balancing or refit."""
    shape = settings.shape(problem.in_features, problem.out_features, ratio, SVD_STRUCTURE)
    svd = problem.svd_factorization(shape.k)
    stored, dequantized = quantize(svd.coef, svd.mask, settings.value_dtype)
    structure = QuantizedStructure(SVD_STRUCTURE, shape, svd.dictionary, stored,
                                   relative_error(problem.target, svd.dictionary, svd.coef))
    return with_rounded_dictionary(problem, structure, svd.mask, dequantized, settings)[0]  # no error needed


def quantized(problem: WhitenedProblem, structure: str, shape: fmt.LayerShape, learned: Factorization,
              settings: LayerSettings) -> tuple[QuantizedStructure, float]:
    """Balance, quantize and refit one learned structure → (it, its whitened error after quantization)."""
    unquantized = relative_error(problem.target, learned.dictionary, learned.coef)
    dictionary, stored, dequantized = quantize_and_refit(problem.target, learned.dictionary, learned.coef,
                                                         learned.mask, settings.value_dtype,
                                                         rounds=settings.refit_rounds)
    chosen, dequantized = with_rounded_dictionary(problem, QuantizedStructure(structure, shape, dictionary, stored,
                                                                              unquantized),
                                                  learned.mask, dequantized, settings)
    return chosen, relative_error(problem.target, chosen.dictionary, dequantized)


def with_rounded_dictionary(problem: WhitenedProblem, structure: QuantizedStructure, mask: torch.Tensor,
                            coef: torch.Tensor, settings: LayerSettings) -> tuple[QuantizedStructure, torch.Tensor]:
    """A quantized structure whose dictionary is stored in an integer dtype: round D (un-whitened, as stored),
    then re-solve the values on their support for the rounded D, so that they absorb its rounding error.
    → (the structure as stored, its dequantized values [m, k]). bfloat16 dictionaries are left to ``pack``.

    mask / coef [m, k]: the support and the dequantized values of ``structure``."""
    storage = fmt.DICTIONARY_TYPES[settings.dictionary_dtype]
    if storage.max_abs is None:
        return structure, coef
    # Grouped (4-bit) dictionaries are rounded for the module's inputs (GPTQ), whose Gram is LLᵀ.
    gram = problem.factor.double() @ problem.factor.double().T if storage.group_size is not None else None
    stored_dictionary = quantize_dictionary(unwhiten(structure.dictionary.double(), problem.factor),
                                            settings.dictionary_dtype, gram)
    rounded = whiten(codec.dequantize_dictionary(stored_dictionary, problem.in_features).double(),
                     problem.factor).to(problem.target.dtype)
    stored, coef = resolve_values(problem.target, rounded, coef, mask, settings.value_dtype)
    structure = QuantizedStructure(structure.structure, structure.shape, rounded, stored, structure.unquantized_error,
                                   stored_dictionary)
    return structure, coef


def cospadi(problem: WhitenedProblem, ratio: float, settings: LayerSettings
            ) -> tuple[QuantizedStructure, dict[str, float]]:
    """The structure search → (the chosen structure, {candidate: whitened error} of every one tried).

    Every structure whose stored bytes fit the budget is a candidate, SVD's s = k first (it is cheap: the
    SVD is already there), at the largest rank that fits — full rank where it fits with bytes to spare,
    so the checkpoint may be smaller than asked (the ratio is a ceiling). Each k/s gets a short trial, the
    best continues; the structure with the lowest whitened error after quantization is stored, and of two
    within ``TIE`` of each other the one with fewer bytes."""
    candidates: dict[str, float] = {}
    svd = None
    if settings.searches:
        svd_shape = settings.shape(problem.in_features, problem.out_features, ratio, SVD_STRUCTURE)
        svd, candidates[SVD_STRUCTURE] = quantized(problem, SVD_STRUCTURE, svd_shape,
                                                   problem.svd_factorization(svd_shape.k), settings)
    # Full rank leaves only the rounding of its coefficients, so it bounds what a learned structure must
    # beat: trials that cannot are cut short (STOP_RULE).
    full_rank = svd is not None and svd.shape.k == min(problem.in_features, problem.out_features)
    stop_above = candidates[SVD_STRUCTURE] if full_rank else None
    generator = torch.Generator().manual_seed(settings.seed)
    trial = best_trial(problem, ratio, settings, candidates, generator, stop_above)
    if trial is None:
        return svd, candidates
    structure, shape, learned = trial
    if stop_above is not None:
        _, candidates[f"{structure} trial quantized"] = quantized(problem, structure, shape, learned, settings)
        if candidates[f"{structure} trial quantized"] >= QUANTIZED_TRIAL_MARGIN * stop_above:
            return svd, candidates
    if settings.searches and settings.iterations > settings.trial_iterations:
        learned = Factorization(*learn_dictionary(problem.target, shape.k, shape.s,
                                                  settings.iterations - settings.trial_iterations, generator,
                                                  settings.workspace_bytes,
                                                  start=(learned.dictionary, learned.coef, learned.mask)))
    chosen, error = quantized(problem, structure, shape, learned, settings)
    if svd is not None:  # keep whichever structure is better after quantization
        candidates[structure] = error
        if better(candidates[SVD_STRUCTURE], settings.stored_bytes(svd.shape), error, settings.stored_bytes(shape)):
            chosen = svd
    return chosen, candidates


TIE = 1e-3  # relative: errors closer than this are equal, and the structure with fewer bytes is stored


def better(error_a: float, bytes_a: int, error_b: float, bytes_b: int) -> bool:
    """Whether structure a is to be stored rather than b: a lower error, or an equal one in fewer bytes."""
    if abs(error_a - error_b) <= TIE * max(error_a, error_b):
        return bytes_a < bytes_b
    return error_a < error_b


STOP_RULE = ("where full rank fits, a structure whose first coding (estimated on a column sample) is ESTIMATE_MARGIN "
             "× full rank's quantized error or more is not trialled, and the best trial is continued only if it is "
             "below that error both before and after quantization (× QUANTIZED_TRIAL_MARGIN)")
# Coding is per column, so the first coding's error (the trial's starting atoms, coded as learn_dictionary
# starts) is estimated on every j-th output column (j ≤ 8, ≥ 512 columns kept), at 1/j of the cost. A trial's
# error after its iterations was ≥ 1/2.1 of its first coding's on every SmolLM2 and Qwen2.5-0.5B trial
# measured (benchmarks/results/NOTES.md item 50): an estimate ≥ 2.5 × full rank's error marks a trial that
# would lose to full rank anyway, so skipping it changes no choice.
ESTIMATE_MAX_STRIDE, ESTIMATE_MIN_COLUMNS = 8, 512
ESTIMATE_MARGIN = 2.5
# A trial's error before quantization says little when its structure is over-complete or holds every column
# (k ≥ out: 0 before rounding, 10× full rank's after, on Qwen2.5-0.5B's down_proj): quantizing the trial costs
# one more solve of its values, and continuing it costs six learning iterations (NOTES.md item 76).
QUANTIZED_TRIAL_MARGIN = 1.0


def first_coding_estimate(problem: WhitenedProblem, shape: fmt.LayerShape, generator: torch.Generator,
                          settings: LayerSettings) -> float:
    """Whitened error of structure ``shape``'s first coding on a column sample; ``generator`` advances as the
    trial's start would advance it."""
    atoms = initial_dictionary(problem.target, shape.k, generator, problem.left)
    stride = max(1, min(ESTIMATE_MAX_STRIDE, problem.out_features // ESTIMATE_MIN_COLUMNS))
    sample = problem.target[:, ::stride]
    coef, _ = sparse_code(atoms, sample, shape.s, workspace_bytes=settings.workspace_bytes)
    return relative_error(sample, atoms, coef)


def best_trial(problem: WhitenedProblem, ratio: float, settings: LayerSettings, candidates: dict[str, float],
               generator: torch.Generator, stop_above: float | None = None
               ) -> tuple[str, fmt.LayerShape, Factorization] | None:
    """A trial of every k/s (``candidates`` gets each one's error) → the best one (learned to the full count
    when there is no search); None if no trial's error is below ``stop_above`` (see STOP_RULE).

    At most two candidates' factorizations (the best so far and the one in trial) are alive at once."""
    trial = settings.trial_iterations if settings.searches else settings.iterations
    best: tuple[str, fmt.LayerShape, Factorization] | None = None
    for k_over_s in settings.k_over_s:
        name = f"k/s={k_over_s:g}"
        shape = settings.shape(problem.in_features, problem.out_features, ratio, k_over_s)
        if stop_above is not None:
            before = generator.get_state()  # a skipped trial leaves the generator as the trial would
            estimate = first_coding_estimate(problem, shape, generator, settings)
            if estimate >= ESTIMATE_MARGIN * stop_above:
                candidates[f"{name} estimate"] = estimate
                continue
            candidates[f"{name} first coding"] = estimate  # kept: the margin's evidence (NOTES.md item 50)
            generator.set_state(before)
        learned = Factorization(*learn_dictionary(problem.target, shape.k, shape.s, trial, generator,
                                                  settings.workspace_bytes, left=problem.left))
        candidates[f"{name} trial"] = relative_error(problem.target, learned.dictionary, learned.coef)
        if best is None or candidates[f"{name} trial"] < candidates[f"{best[0]} trial"]:
            best = (name, shape, learned)
        del learned
    if best is None or (stop_above is not None and candidates[f"{best[0]} trial"] >= stop_above):
        return None
    return best


def pack(weight: torch.Tensor, problem: WhitenedProblem, chosen: QuantizedStructure, candidates: dict[str, float],
         started: float) -> CompressedLinear:
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
        ))
    return results
