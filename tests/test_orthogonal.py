"""The orthogonal dictionary (COMPOT's closed-form structure) and its place in the structure search."""

from __future__ import annotations

import pytest
import torch

from cospadi_vllm import format as fmt
from offline_compress import layer, search
from offline_compress.dictionary import relative_error
from offline_compress.orthogonal import (
    ORTHOGONAL_STRUCTURE,
    first_coding_error,
    learn_orthogonal,
    orthogonal_code,
    orthogonal_shape,
)
from tests.test_compressor import synthetic_layer


def _target(seed: int, n: int = 48, m: int = 160) -> torch.Tensor:
    """A float64 target [n, m] with a decaying spectrum and fresh random directions."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    return u * (1.0 / torch.arange(1, n + 1, dtype=torch.float64).sqrt()) @ v.T


def test_coding_is_the_best_s_sparse_code_on_orthonormal_atoms():
    """Top-s of Dᵀy is the exact s-sparse least-squares code: no other support of s atoms, solved by least squares
    in float64, has a lower error on any column."""
    target = _target(1)
    n, k, s = target.shape[0], 32, 12
    atoms, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    coef, mask = orthogonal_code(atoms, target, s)
    assert (mask.sum(1) == s).all() and torch.equal(coef != 0, mask)
    column_error = (target - atoms @ coef.T).norm(dim=0)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        support = torch.randperm(k, generator=g)[:s]
        solution = torch.linalg.lstsq(atoms[:, support], target).solution
        other = (target - atoms[:, support] @ solution).norm(dim=0)
        assert (column_error <= other + 1e-12).all()


def test_learning_keeps_atoms_orthonormal_and_never_raises_the_error():
    target = _target(4)
    left = torch.linalg.svd(target, full_matrices=False)[0]
    k, s = 40, 20
    errors = []
    for iterations in range(6):
        dictionary, coef, mask = learn_orthogonal(target, left, k, s, iterations)
        assert torch.allclose(dictionary.T @ dictionary, torch.eye(k, dtype=torch.float64), atol=1e-10)
        assert (mask.sum(1) == s).all()
        errors.append(relative_error(target, dictionary, coef))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.97 * errors[0], errors  # Procrustes updates do move the atoms


def test_first_coding_error_from_the_spectrum_equals_the_coded_error():
    target = _target(5)
    left, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    for k, s in ((48, 30), (32, 31), (16, 4)):
        dictionary, coef, _ = learn_orthogonal(target, left, k, s, 0)
        assert first_coding_error(sigma, vh, k, s) == pytest.approx(relative_error(target, dictionary, coef), rel=1e-9)


@pytest.mark.parametrize(("in_features", "out_features", "ratio"), [(64, 384, 0.4), (96, 96, 0.3), (256, 48, 0.6)])
def test_shape_fits_the_budget_and_has_the_lowest_first_coding_error(in_features, out_features, ratio):
    target = _target(6, in_features, out_features) if in_features <= out_features else _target(6, out_features,
                                                                                                 in_features).T
    _, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    shape = orthogonal_shape(in_features, out_features, ratio, sigma, vh, "int8", "int8")
    assert shape is not None and 0 < shape.s < shape.k <= min(in_features, out_features)
    budget = (1 - ratio) * fmt.dense_bf16_bytes(in_features, out_features)
    assert fmt.stored_bytes(shape, "int8", dictionary_dtype_name="int8") <= budget
    with_one_more = fmt.LayerShape(in_features, out_features, shape.k, shape.s + 1)
    assert fmt.stored_bytes(with_one_more, "int8", dictionary_dtype_name="int8") > budget  # s is the largest
    best = first_coding_error(sigma, vh, shape.k, shape.s)
    for k in range(8, min(in_features, out_features), 8):  # every atom count, not only the steps searched
        for s in range(1, k):
            fits = fmt.stored_bytes(fmt.LayerShape(in_features, out_features, k, s), "int8",
                                    dictionary_dtype_name="int8") <= budget
            if fits and k % 32 == 0:
                assert first_coding_error(sigma, vh, k, s) >= best - 1e-12, (k, s)


def test_wide_layer_where_full_rank_does_not_fit_stores_the_best_candidate():
    """A 64 → 384 layer at CR 0.4 (out = 6·in; full rank no longer fits, the orthogonal structure does): the
    search stores the structure with the lowest error among every candidate it scored, within the budget, and
    never one worse than the orthogonal dictionary or SVD-LLM's structure."""
    weight, gram = synthetic_layer("decaying")
    settings = layer.LayerSettings(dictionary_dtype="int8")
    result = layer.compress_linear(weight, gram, 0.4, settings)
    assert settings.shape(64, 384, 0.4, "svd").k < 64 and ORTHOGONAL_STRUCTURE in result.candidates  # the case
    final = {name: error for name, error in result.candidates.items()
             if name in ("svd", ORTHOGONAL_STRUCTURE) or name.startswith("k/s=") and " " not in name}
    assert result.whitened_rel_error <= min(final.values()) * (1 + search.TIE) + 1e-6, result.candidates
    budget = 0.6 * fmt.dense_bf16_bytes(64, 384)
    assert fmt.stored_bytes(result.shape, "int8", dictionary_dtype_name="int8") <= budget


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_estimate_rule_against_the_orthogonal_error_changes_no_choice(spectrum, monkeypatch):
    """At CR 0.4 on the 64 → 384 layer the first-coding estimate is compared with the orthogonal structure's error
    (full rank does not fit): the tensors stored are those of the search without the rule, and every trial it
    skipped lost after its trial iterations."""
    weight, gram = synthetic_layer(spectrum)
    settings = layer.LayerSettings(dictionary_dtype="int8")
    ruled = layer.compress_linear(weight, gram, 0.4, settings)
    skipped = [key.removesuffix(" estimate") for key in ruled.candidates if key.endswith(" estimate")]
    assert ORTHOGONAL_STRUCTURE in ruled.candidates and skipped, ruled.candidates  # the case under test
    monkeypatch.setattr(search, "ORTHOGONAL_ESTIMATE_MARGIN", float("inf"))
    full = layer.compress_linear(weight, gram, 0.4, settings)
    assert ruled.structure == full.structure
    for name, tensor in full.tensors.items():
        assert torch.equal(ruled.tensors[name], tensor), name
    for name in skipped:
        assert full.candidates[f"{name} trial"] >= full.candidates[ORTHOGONAL_STRUCTURE], (name, full.candidates)


def test_fast_settings_compare_only_closed_form_structures():
    """``--fast`` (no k/s values): SVD's s = k and the orthogonal dictionary are the only candidates, the better
    one is stored, and its error is the orthogonal structure's recomputed from the stored tensors."""
    weight, gram = synthetic_layer("decaying")
    result = layer.compress_linear(weight, gram, 0.4, layer.LayerSettings(dictionary_dtype="int8", k_over_s=()))
    assert set(result.candidates) == {"svd", ORTHOGONAL_STRUCTURE}, result.candidates
    best = min(result.candidates, key=result.candidates.get)
    assert result.structure == best
    assert result.whitened_rel_error == pytest.approx(result.candidates[best], rel=1e-3)
