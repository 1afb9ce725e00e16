"""The structure search (CoSpaDi's default): which (k, s) one layer stores.

Every structure that fits the layer's byte budget is a candidate. The closed-form ones come first: the dense case
s = k (SVD-LLM's structure, from the SVD the dictionary starts from anyway) at the largest rank the budget buys
(full rank where it fits with bytes to spare), and an orthogonal dictionary (``orthogonal``: exact coding,
Procrustes updates); each k/s gets a short trial of dictionary learning and the best continues to the full
iteration count; the lowest whitened error after quantization is stored (ties: fewer bytes). So with the search
on, a module is never worse than SVD-LLM's structure on the same Gram within the same budget.
Trials that cannot beat the closed-form structures are cut short (``STOP_RULE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospadi_vllm import format as fmt
from offline_compress.budget import SVD_STRUCTURE
from offline_compress.dictionary import initial_dictionary, learn_dictionary, relative_error, sparse_code
from offline_compress.orthogonal import ORTHOGONAL_STRUCTURE, learn_orthogonal, orthogonal_shape
from offline_compress.problem import Factorization, LayerSettings, QuantizedStructure, WhitenedProblem, quantized


def cospadi(problem: WhitenedProblem, ratio: float, settings: LayerSettings
            ) -> tuple[QuantizedStructure, dict[str, float]]:
    """The structure search → (the chosen structure, {candidate: whitened error} of every one tried).

    Every structure whose stored bytes fit the budget is a candidate, the closed-form ones first: SVD's s = k (the
    SVD is already there) at the largest rank that fits — full rank where it fits with bytes to spare, so the
    checkpoint may be smaller than asked (the ratio is a ceiling) — and the orthogonal dictionary
    (``orthogonal``). Then each k/s gets a short trial, the best continues; the structure with the lowest whitened
    error after quantization is stored, and of two within ``TIE`` of each other the one with fewer bytes. Without
    k/s values (``--fast``) only the closed-form structures are compared."""
    candidates: dict[str, float] = {}
    closed_form: list[tuple[QuantizedStructure, float]] = []
    svd = None
    if settings.searches:
        svd_shape = settings.shape(problem.in_features, problem.out_features, ratio, SVD_STRUCTURE)
        svd, candidates[SVD_STRUCTURE] = quantized(problem, SVD_STRUCTURE, svd_shape,
                                                   problem.svd_factorization(svd_shape.k), settings)
        closed_form.append((svd, candidates[SVD_STRUCTURE]))
        orthogonal = orthogonal_candidate(problem, ratio, settings)
        if orthogonal is not None:
            candidates[ORTHOGONAL_STRUCTURE] = orthogonal[1]
            closed_form.append(orthogonal)
    learned = learned_candidate(problem, ratio, settings, candidates, svd) if settings.k_over_s else None
    # The learned structure first: a closed-form one replaces it only where better after quantization.
    best, *others = ([learned] if learned is not None else []) + closed_form
    for structure, error in others:
        if better(error, settings.stored_bytes(structure.shape), best[1], settings.stored_bytes(best[0].shape)):
            best = (structure, error)
    return best[0], candidates


def orthogonal_candidate(problem: WhitenedProblem, ratio: float, settings: LayerSettings
                         ) -> tuple[QuantizedStructure, float] | None:
    """The orthogonal dictionary at the budget's best (k, s), learned for ``settings.iterations`` and quantized
    → (it, its whitened error after quantization); None where the budget leaves it no shape with s < k."""
    shape = orthogonal_shape(problem.in_features, problem.out_features, ratio, problem.sigma, problem.vh,
                             settings.value_dtype, settings.dictionary_dtype)
    if shape is None:
        return None
    learned = Factorization(*learn_orthogonal(problem.target, problem.left, shape.k, shape.s, settings.iterations))
    return quantized(problem, ORTHOGONAL_STRUCTURE, shape, learned, settings)


def learned_candidate(problem: WhitenedProblem, ratio: float, settings: LayerSettings, candidates: dict[str, float],
                      svd: QuantizedStructure | None) -> tuple[QuantizedStructure, float] | None:
    """The learned (over-complete) dictionary: a trial of every k/s, the best continued to the full iteration
    count and quantized → (it, its whitened error after quantization); None if no trial is left (``STOP_RULE``)."""
    # Full rank leaves only the rounding of its coefficients, so it bounds what a learned structure must
    # beat: trials that cannot are cut short (STOP_RULE).
    full_rank = svd is not None and svd.shape.k == min(problem.in_features, problem.out_features)
    stop_above = candidates[SVD_STRUCTURE] if full_rank else None
    # The closed-form errors bound which trials are worth starting (the first-coding estimate of STOP_RULE).
    bars = [(margin, error) for margin, error in ((ESTIMATE_MARGIN, stop_above),
                                                  (ORTHOGONAL_ESTIMATE_MARGIN, candidates.get(ORTHOGONAL_STRUCTURE)))
            if error is not None]
    generator = torch.Generator().manual_seed(settings.seed)
    trial = best_trial(problem, ratio, settings, candidates, generator, stop_above,
                       min((margin * error for margin, error in bars), default=None))
    if trial is None:
        return None
    structure, shape = trial.name, trial.shape
    # Exact only measured against a closed-form error: without one, the trial is learned to the full count.
    if trial.rounded is not None and bars and trial.error <= EXACT_TRIAL * min(error for _, error in bars):
        # It holds every column already (k ≥ out): further iterations have nothing left to reduce and only move
        # the rounding error about, so the trial as rounded is the candidate (NOTES.md item 82).
        chosen, error = trial.rounded, trial.rounded_error
    else:
        learned = trial.learned
        if settings.searches and settings.iterations > settings.trial_iterations:
            learned = Factorization(*learn_dictionary(problem.target, shape.k, shape.s,
                                                      settings.iterations - settings.trial_iterations, generator,
                                                      settings.workspace_bytes,
                                                      start=(learned.dictionary, learned.coef, learned.mask)))
        chosen, error = quantized(problem, structure, shape, learned, settings)
    if settings.searches:
        candidates[structure] = error
    return chosen, error


TIE = 1e-3  # relative: errors closer than this are equal, and the structure with fewer bytes is stored


def better(error_a: float, bytes_a: int, error_b: float, bytes_b: int) -> bool:
    """Whether structure a is to be stored rather than b: a lower error, or an equal one in fewer bytes."""
    if abs(error_a - error_b) <= TIE * max(error_a, error_b):
        return bytes_a < bytes_b
    return error_a < error_b


STOP_RULE = ("a structure with fewer atoms than outputs whose first coding (estimated on a column sample) is "
             "ESTIMATE_MARGIN × full rank's quantized error (where full rank fits) or ORTHOGONAL_ESTIMATE_MARGIN × the "
             "orthogonal structure's or more is not trialled; where full rank fits, a trial counts only if it is below "
             "full rank's error both before and after quantization (× QUANTIZED_TRIAL_MARGIN); where full rank fits or "
             "the structure has as many atoms as outputs, trials are ranked after rounding, and one that holds every "
             "column already (EXACT_TRIAL) is stored as rounded, not learned further")
# Coding is per column, so the first coding's error (the trial's starting atoms, coded as learn_dictionary
# starts) is estimated on every j-th output column (j ≤ 8, ≥ 512 columns kept), at 1/j of the cost. A trial's
# error after its iterations was ≥ 1/2.1 of its first coding's on every SmolLM2 and Qwen2.5-0.5B trial
# measured (benchmarks/results/NOTES.md item 50): an estimate ≥ 2.5 × full rank's error marks a trial that would
# lose to full rank anyway (a trial must beat it before its continuation), so skipping it changes no choice.
# The orthogonal structure is not a floor, and a trial is continued to the full iteration count before it is
# compared with it: on SmolLM2 at CR 0.3 every learned structure stored had a first coding < 3.1 × the orthogonal
# error (NOTES.md item 89, benchmarks/results/stop-rule-smollm2.md). A structure with at least as many atoms as
# outputs holds every column after a few iterations whatever its first coding (SmolLM2's down_proj: 0.07 → 3e-6).
ESTIMATE_MAX_STRIDE, ESTIMATE_MIN_COLUMNS = 8, 512
ESTIMATE_MARGIN = 2.5
ORTHOGONAL_ESTIMATE_MARGIN = 4.0
# A trial's error before quantization says little when its structure is over-complete or holds every column
# (k ≥ out: 0 before rounding, 10× full rank's after, on Qwen2.5-0.5B's down_proj): quantizing the trial costs
# one more solve of its values, and continuing it costs six learning iterations (NOTES.md item 76).
QUANTIZED_TRIAL_MARGIN = 1.0
# A trial this far below the best closed-form quantized error before rounding holds every column (≈ 0): it is
# stored as rounded after its trial, not learned further.
EXACT_TRIAL = 1e-3


@dataclass
class Trial:
    """One k/s after its trial iterations: the factorization and, where full rank fits, it rounded as stored."""

    name: str  # "k/s=1.5"
    shape: fmt.LayerShape
    learned: Factorization
    error: float  # whitened error before rounding
    rounded: QuantizedStructure | None = None
    rounded_error: float = float("inf")

    @property
    def score(self) -> float:
        """What trials are ranked by: the error after rounding where it was measured (full rank fits), else before."""
        return self.rounded_error if self.rounded is not None else self.error


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
               generator: torch.Generator, stop_above: float | None = None, estimate_above: float | None = None
               ) -> Trial | None:
    """A trial of every k/s (``candidates`` gets each one's error) → the best one (learned to the full count
    when there is no search); None if none can beat full rank's error ``stop_above``, or every first coding is
    estimated at ``estimate_above`` or more (see STOP_RULE).

    Trials are ranked by their error; where full rank fits, by their error after rounding, since before it
    every structure that holds each column exactly (k ≥ out) looks the same (≈ 0). At most two candidates'
    factorizations (the best so far and the one in trial) are alive at once."""
    iterations = settings.trial_iterations if settings.searches else settings.iterations
    best: Trial | None = None
    for k_over_s in settings.k_over_s:
        name = f"k/s={k_over_s:g}"
        shape = settings.shape(problem.in_features, problem.out_features, ratio, k_over_s)
        holds_every_column = settings.searches and shape.k >= problem.out_features
        if estimate_above is not None and not holds_every_column:
            before = generator.get_state()  # a skipped trial leaves the generator as the trial would
            estimate = first_coding_estimate(problem, shape, generator, settings)
            if estimate >= estimate_above:
                candidates[f"{name} estimate"] = estimate
                continue
            candidates[f"{name} first coding"] = estimate  # kept: the margin's evidence (NOTES.md item 50)
            generator.set_state(before)
        learned = Factorization(*learn_dictionary(problem.target, shape.k, shape.s, iterations, generator,
                                                  settings.workspace_bytes, left=problem.left))
        trial = Trial(name, shape, learned, relative_error(problem.target, learned.dictionary, learned.coef))
        candidates[f"{name} trial"] = trial.error
        if stop_above is not None and trial.error >= stop_above:
            continue
        if stop_above is not None or holds_every_column:  # ≈ 0 before rounding: ranked after it
            trial.rounded, trial.rounded_error = quantized(problem, name, shape, learned, settings)
            candidates[f"{name} trial quantized"] = trial.rounded_error
            if stop_above is not None and trial.rounded_error >= QUANTIZED_TRIAL_MARGIN * stop_above:
                continue
        if best is None or trial.score < best.score:
            best = trial
        del learned, trial
    return best
