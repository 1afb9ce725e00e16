"""One linear layer's whitened problem, and the fitting of a structure to it.

Compression minimises the layer's output error on the calibration inputs, ‖X(A − Â)‖ with A = weightᵀ: with
LLᵀ = XᵀX (the Gram) that is ‖Lᵀ(A − Â)‖, a plain Frobenius problem on the whitened target Ã = LᵀA
(``WhitenedProblem``). A structure (k atoms, s non-zeros per column) is learned there, then balanced, quantized
and refitted (``quantized``); an integer dictionary is rounded as stored and the values re-solved for it
(``with_rounded_dictionary``). Pure functions of tensors; which structure is stored is ``search``'s concern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.budget import layer_shape
from offline_compress.dictionary import DEFAULT_WORKSPACE_BYTES, relative_error
from offline_compress.options import DEFAULT_K_OVER_S
from offline_compress.quantization import quantize_and_refit, quantize_dictionary, resolve_values
from offline_compress.whitening import unwhiten, whiten, whitening_factor


@dataclass(frozen=True)
class LayerSettings:
    method: str = "cospadi"
    value_dtype: str = "int8"
    # The layer API's default is the format's float dictionary; the compressor passes its own
    # (options.DEFAULT_DICTIONARY_DTYPE, int8) or the one asked for.
    dictionary_dtype: str = fmt.DEFAULT_DICTIONARY_DTYPE
    # Learned structures tried: one value forces it (no search); none: only the closed-form ones (SVD, orthogonal).
    k_over_s: tuple[float, ...] = DEFAULT_K_OVER_S
    iterations: int = 8
    trial_iterations: int = 2  # after 1, low k/s always looks better; after 2 the ranking matches T = 8
    refit_rounds: int = 1
    seed: int = 0
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    compute_dtype: torch.dtype = torch.float32

    @property
    def rounds_dictionary(self) -> bool:
        """Whether the dictionary is stored rounded (int8 / int4), the values then re-solved for it."""
        return fmt.DICTIONARY_TYPES[self.dictionary_dtype].max_abs is not None

    @property
    def searches(self) -> bool:
        return self.method == "cospadi" and len(self.k_over_s) != 1

    def shape(self, in_features: int, out_features: int, ratio: float, structure: str | float) -> fmt.LayerShape:
        """(k, s) of ``structure`` at this layer's byte budget, in these settings' storage dtypes."""
        return layer_shape(in_features, out_features, ratio, structure, self.value_dtype, self.dictionary_dtype)

    def stored_bytes(self, shape: fmt.LayerShape) -> int:
        return fmt.stored_bytes(shape, self.value_dtype, dictionary_dtype_name=self.dictionary_dtype)


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


def quantized(problem: WhitenedProblem, structure: str, shape: fmt.LayerShape, learned: Factorization,
              settings: LayerSettings) -> tuple[QuantizedStructure, float]:
    """Balance, quantize and refit one learned structure → (it, its whitened error after quantization)."""
    unquantized = relative_error(problem.target, learned.dictionary, learned.coef)
    dictionary, stored, dequantized = quantize_and_refit(problem.target, learned.dictionary, learned.coef,
                                                         learned.mask, settings.value_dtype,
                                                         rounds=settings.refit_rounds,
                                                         provisional=settings.rounds_dictionary)
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
    if not settings.rounds_dictionary:
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
