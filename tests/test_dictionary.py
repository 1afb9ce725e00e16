"""Whitening, OMP and K-SVD on synthetic data with known answers (float64 references)."""

import pytest
import torch

from offline_compress.dictionary import batched_omp, ksvd, sparse_to_dense, truncated_svd
from offline_compress.whitening import unwhiten, whiten, whitening_factor


@pytest.mark.parametrize("atoms_per_step", [1, 2])
def test_omp_recovers_exactly_sparse_signal(atoms_per_step):
    g = torch.Generator().manual_seed(0)
    n, k, m, s = 256, 320, 300, 4
    dictionary = torch.randn(n, k, generator=g, dtype=torch.float64)
    dictionary /= dictionary.norm(dim=0)
    support = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(m)])
    values = torch.randn(m, s, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(m, s, generator=g, dtype=torch.float64))
    coef = sparse_to_dense(support, values, k)
    found_idx, found_values = batched_omp(dictionary, dictionary @ coef, s, atoms_per_step)
    assert torch.equal(found_idx.sort(1).values, support.sort(1).values)
    assert torch.allclose(sparse_to_dense(found_idx, found_values, k), coef, atol=1e-10)


def test_omp_values_are_least_squares_on_support():
    g = torch.Generator().manual_seed(1)
    dictionary = torch.randn(48, 80, generator=g, dtype=torch.float64)
    targets = torch.randn(48, 30, generator=g, dtype=torch.float64)
    idx, values = batched_omp(dictionary, targets, 12)
    for j in range(30):
        ref = torch.linalg.lstsq(dictionary[:, idx[j]], targets[:, j : j + 1]).solution.squeeze(1)
        assert torch.allclose(values[j], ref, atol=1e-9)
        assert len(set(idx[j].tolist())) == 12


def test_whitening_damping_on_rank_deficient_gram():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 32, generator=g, dtype=torch.float64)  # 10 samples, 32 features: rank 10
    gram = x.T @ x
    factor, damping = whitening_factor(gram)
    assert damping > 0
    assert torch.isfinite(factor).all()
    assert torch.allclose(factor @ factor.T, gram + damping * torch.eye(32, dtype=torch.float64), atol=1e-8)
    full_rank = torch.randn(100, 32, generator=g, dtype=torch.float64)
    factor2, damping2 = whitening_factor(full_rank.T @ full_rank)
    assert damping2 == 0.0
    # ‖X E‖ = ‖Lᵀ E‖ for any E
    err = torch.randn(32, 7, generator=g, dtype=torch.float64)
    assert torch.allclose((full_rank @ err).norm(), whiten(err, factor2).norm())
    assert torch.allclose(unwhiten(whiten(err, factor2), factor2), err)


def test_ksvd_beats_truncated_svd_at_equal_parameters_on_sparse_data():
    """Data drawn from a sparse dictionary model: K-SVD error falls with iterations and ends far
    below a dense low-rank factorisation with the same parameter count.

    (From the SVD start K-SVD leaves the low-rank subspace slowly on exactly-sparse synthetic data:
    0.36 vs 0.59 for the SVD at T=6, where random-column starts reached < 0.3; on real LLM layers the
    SVD start is the better one — benchmarks/results/NOTES.md, item 7.)"""
    g = torch.Generator().manual_seed(3)
    n, k, m, s = 64, 96, 400, 6
    true_dict = torch.randn(n, k, generator=g, dtype=torch.float64)
    true_dict /= true_dict.norm(dim=0)
    support = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(m)])
    target = true_dict @ sparse_to_dense(support, torch.randn(m, s, generator=g, dtype=torch.float64), k)
    errors = []
    for iterations in (0, 2, 6):
        d, idx, vals = ksvd(target, k, s, iterations, 8, torch.Generator().manual_seed(0))
        assert torch.allclose(d.norm(dim=0), torch.ones(k, dtype=torch.float64))
        errors.append(float((target - d @ sparse_to_dense(idx, vals, k)).norm() / target.norm()))
    assert errors[2] < errors[1] < errors[0]
    rank = (n * k + s * m) // (n + m)  # same parameter count
    left, right = truncated_svd(target, rank)
    assert errors[2] < 0.7 * float((target - left @ right).norm() / target.norm())
