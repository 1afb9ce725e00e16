"""Whitening by the calibration Gram.

With G = Σ XᵀX = L Lᵀ, the output error of a layer is ‖X(A − Â)‖_F = ‖Lᵀ(A − Â)‖_F,
so dictionaries are learned on Ã = LᵀA and mapped back with D = L⁻ᵀ D̃.
"""

from __future__ import annotations

import torch

DAMPING_EPS = 1e-6


def whitening_factor(gram: torch.Tensor, eps: float = DAMPING_EPS) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L Lᵀ ≈ gram.

    gram: [in, in] symmetric PSD (float64). Returns (L [in, in] float64, damping λ).
    Plain Cholesky first; if it fails (rank-deficient or indefinite by rounding) use
    G + λI with λ = max(0, −λ_min) + eps · mean(diag G).
    """
    gram = gram.double()
    gram = 0.5 * (gram + gram.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(factor).all()):
        return factor, 0.0
    min_eig = float(torch.linalg.eigvalsh(gram)[0])
    mean_diag = float(gram.diagonal().mean())
    damping = max(0.0, -min_eig) + eps * (mean_diag if mean_diag > 0 else 1.0)
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(8):  # λ from the eigenvalue is exact up to rounding; grow it if Cholesky still fails
        factor, info = torch.linalg.cholesky_ex(gram + damping * identity)
        if int(info) == 0:
            return factor, damping
        damping *= 10.0
    raise ArithmeticError("Cholesky of the calibration Gram failed even with damping")


def whiten(weight_t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A [in, out] → Ã = Lᵀ A [in, out]."""
    return factor.T @ weight_t


def unwhiten(whitened: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """D̃ [in, k] → D = L⁻ᵀ D̃ [in, k] (triangular solve, no explicit inverse)."""
    return torch.linalg.solve_triangular(factor.T, whitened, upper=True)
