"""One linear layer: whiten → learn (K-SVD or truncated SVD) → un-whiten → quantize/pack.

A pure function of (weight, Gram, budget); the checkpoint layout comes from
``cospadi_vllm.format``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cospadi_vllm import format as fmt
from offline_compress.dictionary import ksvd, truncated_svd
from offline_compress.whitening import unwhiten, whiten, whitening_factor

METHODS = ("cospadi", "svd-llm")


@dataclass(frozen=True)
class LayerSettings:
    method: str = "cospadi"
    value_dtype: str = "int8"
    iterations: int = 3
    power_iterations: int = 1
    omp_atoms_per_step: int = 4
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32


@dataclass
class CompressedLinear:
    """Stored tensors of one layer plus what the report says about it."""

    tensors: dict[str, torch.Tensor]  # {format suffix: tensor} on CPU
    shape: fmt.LayerShape
    whitened_rel_error: float  # ‖Lᵀ(A − Â)‖ / ‖LᵀA‖ with Â rebuilt from the stored tensors
    damping: float
    seconds: float


def whitened_error(weight_t: torch.Tensor, approx_t: torch.Tensor, factor: torch.Tensor) -> float:
    """‖Lᵀ(A − Â)‖_F / ‖LᵀA‖_F — relative output error on the calibration inputs."""
    target = whiten(weight_t.double(), factor)
    return float((target - whiten(approx_t.double(), factor)).norm() / target.norm().clamp_min(1e-30))


def compress_linear(
    weight: torch.Tensor, gram: torch.Tensor, shape: fmt.LayerShape, settings: LayerSettings
) -> CompressedLinear:
    """weight [out, in] (nn.Linear layout), gram [in, in] → CompressedLinear.

    The whitened target Ã = LᵀWᵀ [in, out] is factored as D̃·C, then D = L⁻ᵀD̃ is stored in bf16
    and C's non-zeros are quantized per output column.
    """
    started = time.perf_counter()
    device = gram.device
    weight_t = weight.to(device=device, dtype=torch.float64).T
    factor, damping = whitening_factor(gram)
    target = whiten(weight_t, factor)
    work = target.to(settings.compute_dtype)
    if settings.method == "cospadi":
        generator = torch.Generator().manual_seed(settings.seed)
        atoms, support_idx, values = ksvd(
            work, shape.k, shape.s, settings.iterations, settings.power_iterations, generator,
            settings.omp_atoms_per_step,
        )
    elif settings.method == "svd-llm":
        atoms, right = truncated_svd(work, shape.k)
        support_idx = torch.arange(shape.k, device=device).expand(shape.out_features, shape.k)
        values = right.T
    else:
        raise ValueError(f"unknown method {settings.method!r}; choose from {METHODS}")
    dictionary = unwhiten(atoms.double(), factor).to(fmt.DICTIONARY_DTYPE)
    tensors = {fmt.DICTIONARY: dictionary}
    tensors.update(fmt.encode_coefficients(support_idx, values.float(), shape.k, settings.value_dtype))
    tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
    approx_t = fmt.reconstruct_weight_t(tensors, shape.k).to(device)
    return CompressedLinear(
        tensors=tensors,
        shape=shape,
        whitened_rel_error=whitened_error(weight_t, approx_t, factor),
        damping=damping,
        seconds=time.perf_counter() - started,
    )
