"""The structure search (CoSpaDi's default): which (k, s) one layer stores.

Every structure that fits the layer's byte budget is a candidate. The dense case s = k (SVD-LLM's structure,
from the SVD the dictionary starts from anyway) comes first, at the largest rank the budget buys (full rank
where it fits with bytes to spare); each k/s gets a short trial of dictionary learning and the best continues
to the full iteration count; the lowest whitened error after quantization is stored (ties: fewer bytes). So
with the search on, a module is never worse than SVD-LLM's structure on the same Gram within the same budget.
Where full rank fits, trials that cannot beat it are cut short (``STOP_RULE``).
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt
from offline_compress.budget import SVD_STRUCTURE
from offline_compress.dictionary import initial_dictionary, learn_dictionary, relative_error, sparse_code
from offline_compress.problem import Factorization, LayerSettings, QuantizedStructure, WhitenedProblem, quantized


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
