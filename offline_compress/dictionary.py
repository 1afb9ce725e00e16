"""Sparse dictionary learning (K-SVD with batched OMP) and the truncated-SVD baseline.

Everything here works on a whitened target Y = Ã [n, m] (n = in_features, m = out_features):
Y ≈ D · C with D [n, k] unit-norm atoms and C [k, m] holding exactly s non-zeros per column.
Sparse C is carried as (support_idx [m, s], values [m, s]): column j uses atoms
support_idx[j] with coefficients values[j].
"""

from __future__ import annotations

import torch


def batched_omp(
    dictionary: torch.Tensor, targets: torch.Tensor, s: int, atoms_per_step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for all columns at once (Batch-OMP).

    dictionary: [n, k] (columns need not be unit norm), targets: [n, m], s ≤ min(n, k).
    Returns (support_idx [m, s] int64 in selection order, values [m, s]) — the least-squares
    coefficients of each column on its s selected atoms.

    Works in the atom Gram G = DᵀD, so a step never touches the n-dimensional signals:
    correlations are α − x·G (one [m, k] × [k, k] GEMM). The inverse Cholesky factor L⁻¹ of
    the selected atoms' Gram grows by a block row per step and the least-squares solution is
    updated in O(t) from it, so the per-column work is two batched mat-vecs, no solves.
    ``atoms_per_step`` = p > 1 adds the p best-correlated atoms per step (generalised OMP):
    s/p steps instead of s, at a small loss in accuracy; p = 1 is exact OMP.
    """
    n, k = dictionary.shape
    m = targets.shape[1]
    if not 1 <= s <= min(n, k):
        raise ValueError(f"sparsity s={s} must be in [1, min(n={n}, k={k})]")
    dtype, device = targets.dtype, targets.device
    gram = dictionary.T @ dictionary  # [k, k]
    alpha = (targets.T @ dictionary).contiguous()  # [m, k] correlations of targets with atoms
    tiny = torch.finfo(dtype).eps ** 0.5
    jitter = 100 * torch.finfo(dtype).eps
    atom_norm = gram.diagonal().clamp_min(tiny).sqrt()
    support_idx = torch.zeros(m, s, dtype=torch.int64, device=device)
    chol_inv = torch.zeros(m, s, s, dtype=dtype, device=device)  # L⁻¹, lower triangular
    forward = torch.zeros(m, s, dtype=dtype, device=device)  # z = L⁻¹ α_S
    values = torch.zeros(m, s, dtype=dtype, device=device)  # x = L⁻ᵀ z, least squares on S
    dense_coef = torch.zeros(m, k, dtype=dtype, device=device)
    correlation = alpha
    t = 0
    while t < s:
        p = min(atoms_per_step, s - t)
        score = correlation.abs() / atom_norm
        if t:
            score.scatter_(1, support_idx[:, :t], -1.0)  # never pick an atom twice
        new = score.topk(p, dim=1).indices if p > 1 else score.argmax(dim=1, keepdim=True)  # [m, p]
        schur = gram[new[:, :, None], new[:, None, :]]  # [m, p, p] = G[J, J]
        alpha_new = alpha.gather(1, new)  # [m, p]
        if t:
            cross = gram[support_idx[:, :t, None], new[:, None, :]]  # [m, t, p] = G[S, J]
            inv_old = chol_inv[:, :t, :t]
            w = torch.bmm(inv_old, cross)  # W = L⁻¹ G[S, J]
            schur = schur - w.transpose(1, 2) @ w
            alpha_new = alpha_new - (w.transpose(1, 2) @ forward[:, :t, None]).squeeze(-1)
        # An atom (nearly) in the span of the selected ones has a ~0 Schur complement: floor it.
        schur = schur + jitter * torch.eye(p, dtype=dtype, device=device)
        chol_new, _ = torch.linalg.cholesky_ex(schur)
        inv_new = torch.linalg.solve_triangular(
            chol_new, torch.eye(p, dtype=dtype, device=device).expand(m, p, p), upper=False
        )  # L_J⁻¹ [m, p, p]
        z_new = (inv_new @ alpha_new.unsqueeze(-1)).squeeze(-1)  # [m, p]
        chol_inv[:, t : t + p, t : t + p] = inv_new
        if t:
            block = -inv_new @ (w.transpose(1, 2) @ inv_old)  # new block row −L_J⁻¹WᵀL⁻¹ [m, p, t]
            chol_inv[:, t : t + p, :t] = block
            values[:, :t] += (block.transpose(1, 2) @ z_new.unsqueeze(-1)).squeeze(-1)
        values[:, t : t + p] = (inv_new.transpose(1, 2) @ z_new.unsqueeze(-1)).squeeze(-1)
        forward[:, t : t + p] = z_new
        support_idx[:, t : t + p] = new
        t += p
        if t < s:
            dense_coef.zero_()
            dense_coef.scatter_(1, support_idx[:, :t], values[:, :t])
            correlation = alpha - dense_coef @ gram
    return support_idx, values


def sparse_to_dense(support_idx: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """(support_idx [m, s], values [m, s]) → dense C [k, m]."""
    m = support_idx.shape[0]
    dense = values.new_zeros(k, m)
    dense[support_idx, torch.arange(m, device=values.device)[:, None]] = values
    return dense


def initial_dictionary(target: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Starting atoms [n, k]: the leading left singular vectors of the target, then (when k exceeds
    the rank available) distinct random target columns, unit-normalised.

    Starting in SVD-LLM's subspace means the first OMP pass already picks, per column, the best s of
    the k strongest directions; on SmolLM2 layers this reaches after one K-SVD iteration the error
    that random-column starts needed six for (benchmarks/results/NOTES.md).
    """
    n, m = target.shape
    left, _, _ = torch.linalg.svd(target, full_matrices=False)  # [n, min(n, m)]
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


def update_atoms(
    target: torch.Tensor,
    dictionary: torch.Tensor,
    support_idx: torch.Tensor,
    values: torch.Tensor,
    power_iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One K-SVD sweep: each atom and its coefficients become the rank-1 approximation
    (by power iteration) of the residual restricted to the columns that use the atom.

    Supports stay fixed. Returns the new (dictionary [n, k], values [m, s]).
    An unused atom is replaced by the worst-represented target column.
    """
    n, k = dictionary.shape
    m, s = support_idx.shape
    dictionary = dictionary.clone()
    coef = sparse_to_dense(support_idx, values, k)  # [k, m]
    support = torch.zeros(k, m, dtype=torch.bool, device=target.device)
    support[support_idx, torch.arange(m, device=target.device)[:, None]] = True
    residual = target - dictionary @ coef
    for j in range(k):
        cols = support[j].nonzero().squeeze(1)
        if cols.numel() == 0:
            worst = residual.norm(dim=0).argmax()
            dictionary[:, j] = residual[:, worst] / residual[:, worst].norm().clamp_min(1e-12)
            continue
        atom = dictionary[:, j : j + 1]
        row = coef[j, cols]
        local = residual[:, cols] + atom * row  # residual without atom j, on its columns
        for _ in range(power_iterations):
            atom = local @ row.unsqueeze(1)
            atom = atom / atom.norm().clamp_min(1e-30)
            row = (atom.T @ local).squeeze(0)
        residual[:, cols] = local - atom * row
        dictionary[:, j] = atom.squeeze(1)
        coef[j, cols] = row
    return dictionary, coef.T.gather(1, support_idx)


def ksvd(
    target: torch.Tensor,
    k: int,
    s: int,
    iterations: int,
    power_iterations: int,
    generator: torch.Generator,
    atoms_per_step: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-SVD on target [n, m]: returns (dictionary [n, k] unit-norm, support_idx [m, s], values [m, s]).

    Each iteration: batched OMP for all columns, then one atom-update sweep (which also
    refits the coefficients on the fixed supports). ``iterations = 0`` returns the OMP coding
    of the initial dictionary.
    """
    dictionary = initial_dictionary(target, k, generator)
    support_idx, values = batched_omp(dictionary, target, s, atoms_per_step)
    for it in range(iterations):
        if it:
            support_idx, values = batched_omp(dictionary, target, s, atoms_per_step)
        dictionary, values = update_atoms(target, dictionary, support_idx, values, power_iterations)
    return dictionary, support_idx, values


def truncated_svd(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation target [n, m] ≈ left [n, r] · right [r, m] (SVD-LLM baseline).

    Σ goes into ``left`` (stored in bf16, relative precision per entry) so that ``right`` = V_rᵀ
    has entries of similar magnitude per column, which suits per-column int8 scales.
    """
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    return u[:, :rank] * sigma[:rank], vh[:rank]
