"""Sparse dictionary learning for CoSpaDi, and the truncated-SVD baseline.

Everything here works on a whitened target Y = Ã [n, m] (n = in_features, m = out_features):
Y ≈ D · coefᵀ with D [n, k] atoms and ``coef`` [m, k] holding exactly s non-zeros per row (row j = the coefficients of output column j; ``mask`` [m, k] bool marks
them). Row-major coefficients keep every step a plain GEMM over [m, k] blocks.

The learning loop alternates
  * sparse coding (:func:`sparse_code`): support by hard thresholding, values by least squares on the
    support (batched conjugate gradients on the atom Gram), a few support-swap steps (hard
    thresholding pursuit) warm-started from the previous iterate. CoSpaDi keeps s ≈ k/2 non-zeros
    per column, far denser than classic OMP use: there, adding atoms one at a time costs an
    [m, s, s] factor and s sequential steps, while thresholding + CG costs a few [m, k]×[k, k] GEMMs;
  * dictionary update by least squares (MOD: D = Y·coef·(coefᵀcoef)⁻¹), atoms renormalised, unused
    atoms replaced by distinct badly represented columns.
Columns are processed in chunks whose size comes from a memory budget, so the coding workspace is
bounded whatever out_features is (see benchmarks/README.md for the peak-memory formula).
"""

from __future__ import annotations

import torch

# Workspace floats per (column, atom) of one coding chunk: alpha, x, u, r, p, Ap, mask and temporaries.
CODING_FLOATS_PER_ENTRY = 10
DEFAULT_WORKSPACE_BYTES = 1 << 30
# CG steps per coding inside the learning loop. The loop alternates inexact solves anyway, and on
# over-complete structures (k > in) the batched CG ran to its 50-step cap waiting for its slowest column:
# 8 steps halved SmolLM2's gate_proj time at CR 0.3 with a lower stored error (NOTES.md item 75). Under-
# complete codings converge within 8 steps, so they are unchanged. Values that are stored are re-solved
# to ``quantization.solve_on_support``'s tolerance, and the structure search's estimate codes exactly.
LEARNING_CG_STEPS = 8


def chunk_columns(m: int, k: int, workspace_bytes: int, itemsize: int = 4) -> int:
    """Columns per coding chunk so that the chunk's [c, k] work tensors fit in ``workspace_bytes``."""
    per_column = CODING_FLOATS_PER_ENTRY * k * itemsize
    return max(1, min(m, workspace_bytes // per_column))


def topk_mask(scores: torch.Tensor, s: int) -> torch.Tensor:
    """[c, k] scores → bool [c, k] marking each row's s largest |scores|."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # Unsorted: only the set matters, and sorting the s kept entries cost 2–3× the selection.
    mask.scatter_(1, scores.abs().topk(s, dim=1, sorted=False).indices, True)
    return mask


def least_squares_on_support(
    gram: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, iterations: int, tol: float
) -> torch.Tensor:
    """Per row j: argmin_x ‖y_j − D x‖ with x supported on mask[j], by batched conjugate gradients.

    gram [k, k] = DᵀD, alpha [c, k] = YᵀD (rows = columns of Y), mask [c, k] bool, start [c, k] warm
    start. Solves G[S,S] x_S = α_S for every row at once: each CG step is one [c, k] × [k, k] GEMM with
    the off-support entries masked to zero, so no per-column s×s factor is ever formed. Stops when
    every row's residual is below ``tol`` relative to ‖α_S‖ or after ``iterations`` steps.
    """
    weights = mask.to(alpha.dtype)
    x = start * weights
    residual = (alpha - x @ gram) * weights
    direction = residual.clone()
    rs = (residual * residual).sum(1)
    reference = ((alpha * weights) ** 2).sum(1).clamp_min(torch.finfo(alpha.dtype).tiny)
    tiny = torch.finfo(alpha.dtype).tiny
    for _ in range(iterations):
        if float((rs / reference).max()) <= tol * tol:
            break
        g_dir = (direction @ gram) * weights
        curvature = (direction * g_dir).sum(1)
        # A row solved exactly has direction ≈ 0 and a curvature that rounds to ≤ 0: it takes no step
        # (dividing by a clamped tiny value sent it to Inf).
        step = torch.where(curvature > tiny, rs / curvature.clamp_min(tiny), 0.0)
        x += step[:, None] * direction
        residual -= step[:, None] * g_dir
        rs_new = (residual * residual).sum(1)
        direction = residual + (rs_new / rs.clamp_min(tiny))[:, None] * direction
        rs = rs_new
    return x


def largest_eigenvalue(gram: torch.Tensor, iterations: int = 30) -> float:
    """λ_max of a PSD [k, k] matrix by power iteration (fixed start, deterministic)."""
    vector = torch.ones(gram.shape[0], 1, dtype=gram.dtype, device=gram.device)
    value = 1.0
    for _ in range(iterations):
        vector = gram @ vector
        value = float(vector.norm())
        if value == 0.0:
            return 1.0
        vector = vector / value
    return value


def sparse_code(
    dictionary: torch.Tensor,
    targets: torch.Tensor,
    s: int,
    start: torch.Tensor | None = None,
    swap_steps: int = 1,
    cg_iterations: int = 50,
    cg_tol: float = 1e-3,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly-s-sparse least-squares coding of every column of ``targets`` [n, m] on ``dictionary`` [n, k].

    Returns (coef [m, k], mask [m, k] bool, exactly s True per row; coef is zero off the mask).
    Support: the s largest entries (scaled by atom norm) of ``start`` moved one gradient step towards
    the targets, or, without ``start``, of the least-squares coefficients on all atoms (ridge-damped
    when k > n); values: least squares on that support. Then up to ``swap_steps`` hard-thresholding-
    pursuit steps (gradient step, re-threshold, re-solve) while any column's support still changes.
    """
    n, k = dictionary.shape
    m = targets.shape[1]
    if not 1 <= s <= min(n, k):
        raise ValueError(f"sparsity s={s} must be in [1, min(n={n}, k={k})]")
    gram = dictionary.T @ dictionary
    atom_norm = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    step = 1.0 / largest_eigenvalue(gram)
    ridge_inverse = None
    if start is None:  # least squares on all atoms, shared factor for every column (ridge-damped when k > n)
        ridge_inverse = damped_cholesky(gram, 1e-3)
    coef = torch.empty(m, k, dtype=targets.dtype, device=targets.device)
    mask = torch.empty(m, k, dtype=torch.bool, device=targets.device)
    chunk = chunk_columns(m, k, workspace_bytes, targets.element_size())
    for lo in range(0, m, chunk):
        hi = min(m, lo + chunk)
        alpha = targets[:, lo:hi].T @ dictionary  # [c, k]
        if ridge_inverse is None:
            x = start[lo:hi]
            guess = x + step * (alpha - x @ gram)
        else:
            guess = torch.cholesky_solve(alpha.T.double(), ridge_inverse).T.to(alpha.dtype)
        support = topk_mask(guess * atom_norm, s)
        x = least_squares_on_support(gram, alpha, support, guess, cg_iterations, cg_tol)
        for _ in range(swap_steps):
            guess = x + step * (alpha - x @ gram)
            new_support = topk_mask(guess * atom_norm, s)
            if torch.equal(new_support, support):
                break
            support = new_support
            x = least_squares_on_support(gram, alpha, support, guess, cg_iterations, cg_tol)
        coef[lo:hi] = x
        mask[lo:hi] = support
    return coef, mask


def damped_cholesky(matrix: torch.Tensor, relative_damping: float) -> torch.Tensor:
    """Cholesky factor (float64) of a PSD [k, k] matrix + λI, λ = relative_damping · mean diagonal,
    grown tenfold until the factorisation succeeds (float32 Grams of near-collinear rows round to
    slightly indefinite)."""
    matrix = matrix.double()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    damping = relative_damping * max(float(matrix.diagonal().mean()), torch.finfo(torch.float64).tiny)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(matrix + damping * eye)
        if int(info) == 0:
            return factor
        damping *= 10.0
    raise ArithmeticError("Cholesky failed even with damping: the matrix has NaN or Inf entries")


def least_squares_dictionary(targets: torch.Tensor, coef: torch.Tensor, ridge: float = 1e-7) -> torch.Tensor:
    """argmin_D ‖targets − D·coefᵀ‖ for fixed coef [m, k]: D = Y·coef·(coefᵀcoef)⁻¹, shape [n, k].

    The MOD dictionary update, and the refit after quantization (coef then holds the dequantized
    values). ``ridge`` (relative to the mean diagonal) keeps unused atoms' rows solvable; the k × k
    solve runs in float64.
    """
    factor = damped_cholesky(coef.T @ coef, ridge)
    return torch.cholesky_solve((targets @ coef).T.double(), factor).T.to(targets.dtype)


def replace_unused_atoms(
    dictionary: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Give every atom no column uses a *different* badly represented target column (unit norm).

    The u unused atoms get the residuals of the u worst-represented columns, one each, so no two
    replacements coincide. Returns (dictionary, u).
    """
    unused = (~mask.any(0)).nonzero().squeeze(1)
    if unused.numel() == 0:
        return dictionary, 0
    residual = targets - dictionary @ coef.T
    worst = residual.norm(dim=0).topk(min(unused.numel(), residual.shape[1])).indices
    columns = residual[:, worst]
    dictionary = dictionary.clone()
    dictionary[:, unused[: worst.numel()]] = columns / columns.norm(dim=0).clamp_min(1e-12)
    return dictionary, int(unused.numel())


def initial_dictionary(
    target: torch.Tensor, k: int, generator: torch.Generator, left: torch.Tensor | None = None
) -> torch.Tensor:
    """Starting atoms [n, k]: the leading left singular vectors of the target (``left``, if the caller
    has them), then (when k exceeds the rank available) distinct random target columns, unit-normalised.

    Starting in SVD-LLM's subspace means the first coding already picks, per column, the best s of
    the k strongest directions (benchmarks/results/NOTES.md item 7).
    """
    n, m = target.shape
    if left is None:
        left = torch.linalg.svd(target, full_matrices=False)[0]  # [n, min(n, m)]
    atoms = left[:, : min(k, left.shape[1])]
    extra = k - atoms.shape[1]
    if extra > 0:
        picks = torch.randperm(m, generator=generator)[: min(extra, m)]
        if extra > m:
            picks = torch.cat([picks, torch.randint(0, m, (extra - m,), generator=generator)])
        columns = target[:, picks.to(target.device)].clone()
        noise = torch.randn(columns.shape, generator=generator, dtype=columns.dtype).to(columns.device)
        # Repeated or zero columns would give identical atoms: nudge them apart.
        columns = columns + 1e-3 * columns.norm(dim=0, keepdim=True).clamp_min(1e-12) * noise / n**0.5
        atoms = torch.cat([atoms, columns / columns.norm(dim=0, keepdim=True).clamp_min(1e-12)], dim=1)
    return atoms.contiguous()


def learn_dictionary(
    target: torch.Tensor,
    k: int,
    s: int,
    iterations: int,
    generator: torch.Generator,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    left: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dictionary learning on target [n, m] → (dictionary [n, k] unit-norm, coef [m, k], mask [m, k]).

    From the SVD start (or from ``start`` = the (dictionary, coef, mask) of an earlier call, to continue it),
    ``iterations`` rounds of: dictionary update by least squares, renormalisation, replacement of
    unused atoms, sparse coding warm-started from the previous coefficients.
    ``iterations = 0`` returns the coding of the starting dictionary; ``left`` = the target's left
    singular vectors, if already computed.
    """
    if start is None:
        dictionary = initial_dictionary(target, k, generator, left)
        coef, mask = sparse_code(dictionary, target, s, cg_iterations=LEARNING_CG_STEPS,
                                 workspace_bytes=workspace_bytes)
    else:
        dictionary, coef, mask = start
    for _ in range(iterations):
        dictionary = least_squares_dictionary(target, coef)
        norms = dictionary.norm(dim=0)
        dictionary = dictionary / norms.clamp_min(1e-12)
        coef = coef * norms  # same product; the atoms carry unit norm again
        dictionary, _ = replace_unused_atoms(dictionary, coef, mask, target)
        coef, mask = sparse_code(dictionary, target, s, start=coef, cg_iterations=LEARNING_CG_STEPS,
                                 workspace_bytes=workspace_bytes)
    return dictionary, coef, mask


def relative_error(target: torch.Tensor, dictionary: torch.Tensor, coef: torch.Tensor) -> float:
    """‖target − D·coefᵀ‖ / ‖target‖ (in whatever space target lives: whitened here)."""
    return float((target - dictionary @ coef.T).norm() / target.norm().clamp_min(1e-30))


def truncated_svd(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation target [n, m] ≈ left [n, r] · right [r, m] (SVD-LLM baseline).

    Σ goes into ``left`` (stored in bf16, relative precision per entry) so that ``right`` = V_rᵀ
    has entries of similar magnitude per column, which suits per-column int8 scales.
    """
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    return u[:, :rank] * sigma[:rank], vh[:rank]
