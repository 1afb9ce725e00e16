"""Bit layouts and decoding of the stored tensors that ``cospadi_vllm.format`` names.

Packing: the coefficient mask (bit t%32 of word t//32), int4 values (two per byte, low nibble first) and the
4-bit dictionary (GPTQ's layout: 8 inputs per int32). Decoding: stored tensors → dequantized C [k, out],
D [in, k] and Wᵀ = D·C in float32 — the reference every reader and test compares against. The compressor
packs with these functions and every reader decodes with them, so each layout is written down once.
"""

from __future__ import annotations

import torch

from cospadi_vllm.format import (
    BITS_PER_WORD,
    COEF_MASK,
    COEF_SCALES,
    COEF_VALUES,
    DICTIONARY,
    DICTIONARY_SCALES,
    DICTIONARY_TYPES,
    INT4_DICTIONARY_ZERO,
    MASK_DTYPE,
    FormatError,
    mask_words,
    value_columns,
    values_per_byte,
)

# ---------------------------------------------------------------- packing


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 [rows, s] in [-7, 7] → uint8 [rows, ceil(s/2)]: value 2i in the low nibble of byte i, 2i+1 in the high."""
    if values.shape[1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    nibbles = values.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, s: int | None = None) -> torch.Tensor:
    """uint8 [rows, B] → int8 [rows, s] (s defaults to 2·B; inverse of :func:`pack_int4`)."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(packed.shape[0], -1).to(torch.int8)
    values = torch.where(nibbles > 7, nibbles - 16, nibbles)
    return values if s is None else values[:, :s]


def pack_int4_dictionary(codes: torch.Tensor) -> torch.Tensor:
    """codes [in, k] in [0, 15] → int32 [ceil(in/8), k]: input 8r+i in bits [4i, 4i+4) of row r (GPTQ's packing)."""
    rows = -(-codes.shape[0] // 8)
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, 0, 0, 8 * rows - codes.shape[0]))
    shifts = (4 * torch.arange(8, dtype=torch.int64, device=codes.device)).view(1, 8, 1)
    words = (padded.view(rows, 8, -1) << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_dictionary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [ceil(in/8), k] → codes [in, k] int32 in [0, 15] (inverse of :func:`pack_int4_dictionary`; int32
    throughout, since the serving kernel decodes its tiles with it: the mask drops the sign bits a shift copies)."""
    shifts = (4 * torch.arange(8, dtype=torch.int32, device=packed.device)).view(1, 8, 1)
    codes = (packed.unsqueeze(1) >> shifts) & 0xF
    return codes.reshape(-1, packed.shape[1])[:in_features]


def pack_mask(support: torch.Tensor) -> torch.Tensor:
    """Bool [out, k] → int32 [out, ceil(k/32)], bit t%32 of word t//32 ⇔ support[:, t]."""
    out_features, k = support.shape
    words = mask_words(k)
    padded = torch.zeros(out_features, words * BITS_PER_WORD, dtype=torch.int64, device=support.device)
    padded[:, :k] = support.to(torch.int64)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=support.device) << torch.arange(
        BITS_PER_WORD, device=support.device
    )
    packed = (padded.view(out_features, words, BITS_PER_WORD) * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(MASK_DTYPE)


def unpack_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [out, words] → bool [out, k] (inverse of :func:`pack_mask`)."""
    shifts = torch.arange(BITS_PER_WORD, device=mask.device, dtype=torch.int64)
    bits = (mask.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :k].bool()


# ---------------------------------------------------------------- reading C and W back


def dequantize_values(coef_values: torch.Tensor, coef_scales: torch.Tensor, s: int | None = None) -> torch.Tensor:
    """[out, s] stored values (int4: [out, ceil(s/2)] packed, ``s`` given) + [out] scales → [out, s] float32."""
    if values_per_byte(coef_values.dtype) == 2:
        coef_values = unpack_int4(coef_values, s)
    return coef_values.float() * coef_scales.float()[:, None]


def decode_coefficients(
    coef_mask: torch.Tensor, coef_values: torch.Tensor, coef_scales: torch.Tensor, k: int
) -> torch.Tensor:
    """Stored mask/values/scales → dense C [k, out] float32 (dequantized)."""
    support = unpack_mask(coef_mask, k)
    counts = support.sum(1)
    s = int(counts[0]) if counts.numel() else 0
    uneven = (counts != s).nonzero()
    if uneven.numel() or value_columns(s, coef_values.dtype) != coef_values.shape[1]:
        bad = int(uneven[0, 0]) if uneven.numel() else 0
        raise FormatError(
            f"coef_mask row {bad} has {int(counts[bad])} set bits but coef_values has "
            f"{coef_values.shape[1]} columns per row"
        )
    dense_t = torch.zeros(support.shape, dtype=torch.float32, device=coef_mask.device)
    dense_t[support] = dequantize_values(coef_values, coef_scales, s).reshape(-1)
    return dense_t.t().contiguous()


def dequantize_dictionary(tensors: dict[str, torch.Tensor], in_features: int | None = None) -> torch.Tensor:
    """{DICTIONARY[, DICTIONARY_SCALES]} → D [in, k] float32 (an int8 dictionary times its atoms' scales; an
    int4 one (code − 8) times its group's scale, ``in_features`` rows: default 8 per stored row)."""
    stored = tensors[DICTIONARY]
    if stored.dtype == DICTIONARY_TYPES["int4"].dtype:
        in_features = in_features or 8 * stored.shape[0]
        codes = unpack_int4_dictionary(stored, in_features).float() - INT4_DICTIONARY_ZERO
        group_size = DICTIONARY_TYPES["int4"].group_size
        return codes * tensors[DICTIONARY_SCALES].float().repeat_interleave(group_size, 0)[:in_features]
    dictionary = stored.float()
    if DICTIONARY_SCALES in tensors:
        dictionary = dictionary * tensors[DICTIONARY_SCALES].float()
    return dictionary


def reconstruct_weight_t(tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """{suffix: tensor} of one layer → W^T ≈ D · C as float32 [in, out]."""
    coef = decode_coefficients(tensors[COEF_MASK], tensors[COEF_VALUES], tensors[COEF_SCALES], k)
    return dequantize_dictionary(tensors) @ coef
