"""Independent references for kernel tests: dense float64 math from the stored tensors, and random layers."""

from __future__ import annotations

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import merge_shards
from offline_compress.quantization import encode_coefficients, quantize_dictionary

SHARDS = [(40, 13, 5), (70, 20, 11), (33, 9, 2)]  # (k, out, s): k not multiples of 32, s differ
VALUE_DTYPES = sorted(fmt.VALUE_DTYPES)  # every stored value dtype: the kernels read each as stored


def reference_coefficients(
    coef_mask: torch.Tensor,
    coef_values: torch.Tensor,
    coef_scales: torch.Tensor,
    atom_offsets: torch.Tensor,
    k_total: int,
) -> torch.Tensor:
    """Dense C [k_total, N] in float64 from a merged layer's mask / values / scales / atom offsets."""
    out_features, words = coef_mask.shape
    bits = codec.unpack_mask(coef_mask, words * fmt.BITS_PER_WORD)  # [out, W*32]
    rows, cols = bits.nonzero(as_tuple=True)  # row-major: each row's atoms in increasing order
    rank = bits.to(torch.int32).cumsum(1)[rows, cols].long() - 1  # position of the bit in its row
    dense = torch.zeros(k_total, out_features, dtype=torch.float64, device=coef_mask.device)
    vals = stored_value(coef_values, rows, rank) * coef_scales.double()[rows]
    dense[atom_offsets.long()[rows] + cols, rows] = vals
    return dense


def stored_value(coef_values: torch.Tensor, rows: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Value number ``rank`` of output ``rows`` as float64, read bit by bit from the stored row (int4: byte
    rank // 2, low nibble for even rank, two's complement)."""
    if coef_values.dtype == torch.uint8:
        nibbles = (coef_values[rows, rank // 2].long() >> (4 * (rank % 2))) & 0xF
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).double()
    return coef_values[rows, rank].double()


def reference_dictionary(tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """D [in, K] in float64 from a layer's stored dictionary, decoded here bit by bit: bfloat16 as is, int8 atoms
    times their scales, 4-bit GPTQ words (eight codes per int32 along the input, zero 8) times their group's
    scale."""
    stored = tensors[fmt.DICTIONARY]
    if stored.dtype == torch.int32:
        codes = torch.stack([(stored.long() >> (4 * i)) & 0xF for i in range(8)], 1).reshape(-1, stored.shape[1])
        group = torch.arange(in_features) // fmt.DICTIONARY_TYPES["int4"].group_size
        return (codes[:in_features].double() - 8) * tensors[fmt.DICTIONARY_SCALES].double()[group]
    if stored.dtype == torch.int8:
        return stored.double() * tensors[fmt.DICTIONARY_SCALES].double()
    return stored.double()


def reference_weight_t(tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """Wᵀ = D·C [in, N] in float64 of one layer's stored tensors (a merged layer's, or one module's: without
    ``atom_offsets`` every output reads atoms from 0)."""
    dictionary = reference_dictionary(tensors, in_features)
    mask = tensors[fmt.COEF_MASK]
    offsets = tensors.get("atom_offsets", torch.zeros(mask.shape[0], dtype=torch.int32))
    return dictionary @ reference_coefficients(mask, tensors[fmt.COEF_VALUES], tensors[fmt.COEF_SCALES], offsets,
                                               dictionary.shape[1])


def merged_layer_tensors(value_dtype: str, g: torch.Generator, shards=SHARDS, in_features: int = 48,
                         dictionary_dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """A merged layer of len(shards) shards (k, out, s) with random D (atoms of different scales) and random
    supports / values, laid out as every kernel takes it (kernels.merge_shards)."""
    stored = []
    for k, out, s in shards:
        idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out)])
        shard = encode_coefficients(idx, torch.randn(out, s, generator=g), k, value_dtype)
        atoms = torch.randn(in_features, k, generator=g) * torch.rand(k, generator=g).add(0.05)
        shard.update(quantize_dictionary(atoms, dictionary_dtype, torch.eye(in_features)))  # (a 4-bit D's Gram)
        stored.append(shard)
    return merge_shards(stored)


def merged_layer(value_dtype: str, g: torch.Generator, shards=SHARDS, in_features: int = 48):
    """:func:`merged_layer_tensors` with a bf16 dictionary → (dictionary [in, K], (mask, values, scales, atom
    offsets), K)."""
    layer = merged_layer_tensors(value_dtype, g, shards, in_features)
    coef = tuple(layer[name] for name in (fmt.COEF_MASK, fmt.COEF_VALUES, fmt.COEF_SCALES, "atom_offsets"))
    return layer[fmt.DICTIONARY], coef, layer[fmt.DICTIONARY].shape[1]


class HeldLayer(torch.nn.Module):
    """A bare module holding a merged layer's tensors under the names kernels read (what vLLM's layer and
    transformers' CoSpaDiLinear hold), for driving a kernel directly."""

    def __init__(self, dictionary: torch.Tensor, coef: tuple[torch.Tensor, ...]):
        super().__init__()
        self.register_buffer(fmt.DICTIONARY, dictionary.clone())
        for name, tensor in zip((fmt.COEF_MASK, fmt.COEF_VALUES, fmt.COEF_SCALES, "atom_offsets"), coef, strict=True):
            self.register_buffer(name, tensor.clone())

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> HeldLayer:
        """From a merged layer's {name: tensor} (any dictionary dtype)."""
        coef = tuple(tensors[name] for name in (fmt.COEF_MASK, fmt.COEF_VALUES, fmt.COEF_SCALES, "atom_offsets"))
        layer = cls(tensors[fmt.DICTIONARY], coef)
        if fmt.DICTIONARY_SCALES in tensors:
            layer.register_buffer(fmt.DICTIONARY_SCALES, tensors[fmt.DICTIONARY_SCALES].clone())
        return layer


def assert_kernel_matches_float64(kernel, layer, dense: torch.Tensor, act_dtype: torch.dtype, g: torch.Generator,
                                  bound: float) -> None:
    """The kernel seam on fresh x [M, in] for M ∈ {1, 3, 16, 17, 130}: ``apply`` and x·D then Z·C both give x·Wᵀ of
    float64 ``dense`` [in, N] within relative ``bound``, in the activation dtype."""
    for rows in (1, 3, 16, 17, 130):
        x = torch.randn(rows, dense.shape[0], generator=g).to(act_dtype)
        reference = x.double() @ dense
        for y in (kernel.apply(layer, x), kernel.coefficient_product(layer, kernel.dictionary_product(layer, x))):
            assert y.dtype == act_dtype and y.shape == reference.shape
            assert float((y.double() - reference).norm() / reference.norm()) < bound, (rows, act_dtype)
