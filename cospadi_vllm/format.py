"""CoSpaDi checkpoint format, version 1 — the one source of truth.

Both the offline compressor and the vLLM plugin import this module; nothing else
defines tensor names, bit packing, value quantization or byte accounting.

A compressed linear layer ``y = x · W^T`` (W: [out, in]) is stored as ``W^T ≈ D · C``:

| tensor                   | shape              | dtype        |
| ------------------------ | ------------------ | ------------ |
| ``<prefix>.dictionary``  | [in, k]            | bfloat16     |
| ``<prefix>.coef_mask``   | [out, ceil(k/32)]  | int32        |
| ``<prefix>.coef_values`` | [out, s]           | value_dtype  |
| ``<prefix>.coef_scales`` | [out]              | float32      |
| ``<prefix>.bias``        | [out]              | model dtype (optional) |

Bit ``t % 32`` of word ``t // 32`` in row j of ``coef_mask`` is set iff atom t is
used by output column j; row j of ``coef_values`` holds that column's s non-zeros in
increasing atom order; ``C[t, j] = coef_values[j, rank of t] * coef_scales[j]``.
Layers of a group may share one dictionary (CoSpaDi's cross-layer sharing): it is stored once,
under the first module's prefix, and ``quantization_config.modules[name]["dictionary"]`` names that
module for every other member (see :func:`dictionary_owner`).

This module depends on torch only (no vLLM, no transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_METHOD = "cospadi"
FORMAT_VERSION = 1
BITS_PER_WORD = 32

DICTIONARY = "dictionary"
COEF_MASK = "coef_mask"
COEF_VALUES = "coef_values"
COEF_SCALES = "coef_scales"
BIAS = "bias"
TENSOR_SUFFIXES = (DICTIONARY, COEF_MASK, COEF_VALUES, COEF_SCALES)
COEF_SUFFIXES = (COEF_MASK, COEF_VALUES, COEF_SCALES)
# Key of a module's quantization_config entry naming the module whose stored dictionary it uses.
SHARED_DICTIONARY_KEY = "dictionary"

DICTIONARY_DTYPE = torch.bfloat16
MASK_DTYPE = torch.int32
SCALES_DTYPE = torch.float32

VALUE_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "bfloat16": torch.bfloat16,
}
# Largest representable magnitude used when choosing a per-column scale.
_VALUE_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


class FormatError(Exception):
    """A checkpoint or config does not follow CoSpaDi format version 1.

    Not a ValueError on purpose: vLLM builds its config in pydantic validators, which turn any
    ValueError into a multi-line ValidationError; this one reaches the caller as it is."""


def value_dtype_from_name(name: str) -> torch.dtype:
    if name not in VALUE_DTYPES:
        raise FormatError(f"value_dtype {name!r} is not one of {sorted(VALUE_DTYPES)}")
    return VALUE_DTYPES[name]


def mask_words(k: int) -> int:
    """Number of int32 words per output column for a dictionary of k atoms."""
    return (k + BITS_PER_WORD - 1) // BITS_PER_WORD


@dataclass(frozen=True)
class LayerShape:
    """Shape of one compressed linear layer: in_features → out_features with k atoms, s per column."""

    in_features: int
    out_features: int
    k: int
    s: int

    def tensor_specs(self, value_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{suffix: (shape, dtype)} of the layer's four tensors (the dictionary may be another module's)."""
        return {
            DICTIONARY: ((self.in_features, self.k), DICTIONARY_DTYPE),
            COEF_MASK: ((self.out_features, mask_words(self.k)), MASK_DTYPE),
            COEF_VALUES: ((self.out_features, self.s), value_dtype),
            COEF_SCALES: ((self.out_features,), SCALES_DTYPE),
        }


def dictionary_owner(modules: dict[str, dict], name: str) -> str:
    """The module under whose prefix module ``name``'s dictionary is stored (``name`` itself unless shared)."""
    return modules[name].get(SHARED_DICTIONARY_KEY, name)


def dictionary_users(modules: dict[str, dict], owner: str) -> list[str]:
    """The other modules that use the dictionary stored under ``owner``'s prefix."""
    return [name for name in modules if name != owner and dictionary_owner(modules, name) == owner]


def stored_bytes(shape: LayerShape, value_dtype_name: str, owns_dictionary: bool = True) -> int:
    """Bytes actually stored for one layer: dictionary + mask + values + scales (bias excluded).

    A layer that uses another module's dictionary (``owns_dictionary=False``) stores no dictionary.
    """
    value_bytes = VALUE_DTYPES[value_dtype_name].itemsize
    return (
        shape.in_features * shape.k * DICTIONARY_DTYPE.itemsize * owns_dictionary
        + shape.out_features * mask_words(shape.k) * MASK_DTYPE.itemsize
        + shape.out_features * shape.s * value_bytes
        + shape.out_features * SCALES_DTYPE.itemsize
    )


def dense_bf16_bytes(in_features: int, out_features: int) -> int:
    return 2 * in_features * out_features


def solve_k_s(
    in_features: int,
    out_features: int,
    ratio: float,
    k_over_s: float,
    value_dtype_name: str,
    dense_coefficients: bool = False,
) -> LayerShape:
    """Largest (k, s) whose stored bytes fit in ``(1 - ratio)`` of the dense bf16 layer.

    k is the largest atom count with s = floor(k / k_over_s) that fits; s is then raised
    while it still fits (by at most a few), so the budget is used up to one atom's bytes.
    ``dense_coefficients`` gives the SVD-LLM case s = k (k ≤ min(in, out)).
    """
    if not 0.0 < ratio < 1.0:
        raise FormatError(f"compression ratio must be in (0, 1), got {ratio}")
    if not k_over_s >= 1.0:
        raise FormatError(f"k/s must be >= 1, got {k_over_s}")
    budget = (1.0 - ratio) * dense_bf16_bytes(in_features, out_features)

    def s_for(k: int) -> int:
        return k if dense_coefficients else max(1, min(in_features, int(k / k_over_s)))

    def fits(k: int) -> bool:
        return stored_bytes(LayerShape(in_features, out_features, k, s_for(k)), value_dtype_name) <= budget

    k_cap = min(in_features, out_features) if dense_coefficients else 4 * max(in_features, out_features)
    lo, hi = 0, k_cap
    while lo < hi:  # largest k in [0, k_cap] with fits(k)
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    k = lo
    if k < 1:
        raise FormatError(
            f"ratio {ratio} leaves no room for even one atom in a {in_features}->{out_features} layer"
        )
    s = s_for(k)
    if not dense_coefficients:
        while s < min(k, in_features) and stored_bytes(
            LayerShape(in_features, out_features, k, s + 1), value_dtype_name
        ) <= budget:
            s += 1
    return LayerShape(in_features, out_features, k, s)


# ---------------------------------------------------------------- bit mask packing


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


# ---------------------------------------------------------------- value quantization


def quantize_values(values: torch.Tensor, value_dtype_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-column symmetric quantization.

    values: [out, s] float → (coef_values [out, s] value_dtype, coef_scales [out] float32)
    with ``values ≈ coef_values.float() * coef_scales[:, None]``.
    """
    dtype = value_dtype_from_name(value_dtype_name)
    values = values.float()
    if value_dtype_name == "bfloat16":
        return values.to(dtype), torch.ones(values.shape[0], dtype=SCALES_DTYPE, device=values.device)
    qmax = _VALUE_MAX[value_dtype_name]
    absmax = values.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = values / scales[:, None]
    if dtype == torch.int8:
        quantized = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    else:
        quantized = scaled.clamp(-qmax, qmax).to(dtype)
    return quantized, scales.to(SCALES_DTYPE)


def dequantize_values(coef_values: torch.Tensor, coef_scales: torch.Tensor) -> torch.Tensor:
    """[out, s] stored values + [out] scales → [out, s] float32."""
    return coef_values.float() * coef_scales.float()[:, None]


# ---------------------------------------------------------------- dense reconstruction


def encode_coefficients(
    support_idx: torch.Tensor, support_values: torch.Tensor, k: int, value_dtype_name: str
) -> dict[str, torch.Tensor]:
    """Column-sparse C given as (atom index, value) pairs → mask/values/scales tensors.

    support_idx: [out, s] int64 distinct atom indices per row (any order);
    support_values: [out, s] float. Values are re-ordered into increasing atom order.
    """
    order = support_idx.argsort(dim=1)
    idx_sorted = support_idx.gather(1, order)
    values_sorted = support_values.gather(1, order)
    support = torch.zeros(support_idx.shape[0], k, dtype=torch.bool, device=support_idx.device)
    support.scatter_(1, idx_sorted, True)
    coef_values, coef_scales = quantize_values(values_sorted, value_dtype_name)
    return {COEF_MASK: pack_mask(support), COEF_VALUES: coef_values, COEF_SCALES: coef_scales}


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stored tensors of a fused layer's shards (q/k/v or gate/up, in order; each
    {DICTIONARY: [in, k_i], COEF_MASK: [out_i, W_i], COEF_VALUES: [out_i, s_i], COEF_SCALES: [out_i]})
    in the layout the vLLM plugin holds them: dictionaries side by side [in, Σ k_i], masks and values
    zero-padded per row to the widest shard ([Σ out_i, max W_i], [Σ out_i, max s_i]), scales
    concatenated, and "atom_offsets" [Σ out_i] int32: each output's first atom in the merged dictionary."""
    words = max(shard[COEF_MASK].shape[1] for shard in shards)
    s_max = max(shard[COEF_VALUES].shape[1] for shard in shards)
    merged: dict[str, list[torch.Tensor]] = {DICTIONARY: [], COEF_MASK: [], COEF_VALUES: [], COEF_SCALES: [],
                                             "atom_offsets": []}
    k_offset = 0
    for shard in shards:
        mask, values = shard[COEF_MASK], shard[COEF_VALUES]
        merged[DICTIONARY].append(shard[DICTIONARY])
        merged[COEF_MASK].append(torch.nn.functional.pad(mask, (0, words - mask.shape[1])))
        merged[COEF_VALUES].append(torch.nn.functional.pad(values, (0, s_max - values.shape[1])))
        merged[COEF_SCALES].append(shard[COEF_SCALES])
        merged["atom_offsets"].append(torch.full((mask.shape[0],), k_offset, dtype=torch.int32, device=mask.device))
        k_offset += shard[DICTIONARY].shape[1]
    return {name: torch.cat(parts, 1 if name == DICTIONARY else 0) for name, parts in merged.items()}


def decode_coefficients(
    coef_mask: torch.Tensor, coef_values: torch.Tensor, coef_scales: torch.Tensor, k: int
) -> torch.Tensor:
    """Stored mask/values/scales → dense C [k, out] float32 (dequantized)."""
    support = unpack_mask(coef_mask, k)
    counts = support.sum(1)
    if not bool((counts == coef_values.shape[1]).all()):
        bad = int((counts != coef_values.shape[1]).nonzero()[0, 0])
        raise FormatError(
            f"coef_mask row {bad} has {int(counts[bad])} set bits but coef_values has "
            f"{coef_values.shape[1]} values per row"
        )
    dense_t = torch.zeros(support.shape, dtype=torch.float32, device=coef_mask.device)
    dense_t[support] = dequantize_values(coef_values, coef_scales).reshape(-1)
    return dense_t.t().contiguous()


def reconstruct_weight_t(tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """{suffix: tensor} of one layer → W^T ≈ D · C as float32 [in, out]."""
    coef = decode_coefficients(tensors[COEF_MASK], tensors[COEF_VALUES], tensors[COEF_SCALES], k)
    return tensors[DICTIONARY].float() @ coef


def check_layer_tensors(
    prefix: str, tensors: dict[str, torch.Tensor], shape: LayerShape, value_dtype: torch.dtype
) -> None:
    """Raise FormatError naming the first tensor that is missing or has the wrong shape/dtype."""
    for suffix, (want_shape, want_dtype) in shape.tensor_specs(value_dtype).items():
        name = f"{prefix}.{suffix}"
        if suffix not in tensors:
            raise FormatError(f"checkpoint is missing tensor {name}")
        got = tensors[suffix]
        if tuple(got.shape) != want_shape:
            raise FormatError(f"tensor {name} has shape {tuple(got.shape)}, expected {want_shape}")
        if got.dtype != want_dtype:
            raise FormatError(f"tensor {name} has dtype {got.dtype}, expected {want_dtype}")


# safetensors header dtype names of the dtypes the format uses.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32", torch.int8: "I8",
    torch.float8_e4m3fn: "F8_E4M3",
}


def layer_header_problems(
    prefix: str,
    headers: dict[str, tuple[str, tuple[int, ...]]],
    shape: LayerShape,
    value_dtype: torch.dtype,
    owner: str | None = None,
    users: list[str] | None = None,
) -> list[str]:
    """Problems of one compressed module from the checkpoint's safetensors headers alone.

    headers: {tensor name: (safetensors dtype string, shape)} of the whole checkpoint; ``owner``: the
    module whose stored dictionary this one uses (default: itself). One line per problem, each naming
    the tensor: missing, wrong shape, wrong dtype, a dense ``<prefix>.weight`` left next to the
    compressed tensors (loaders would take one and ignore the other), or a dictionary stored for a
    module that says it shares another's. ``users``: the modules sharing this module's dictionary,
    named when it is missing.
    """
    problems = []
    owner = owner or prefix
    for suffix, (want_shape, want_dtype) in shape.tensor_specs(value_dtype).items():
        name = f"{owner if suffix == DICTIONARY else prefix}.{suffix}"
        if name not in headers:
            shared = f"module {prefix} uses the dictionary of {owner}, but " if name != f"{prefix}.{suffix}" else ""
            also = f" (shared by {', '.join(users)})" if suffix == DICTIONARY and users and owner == prefix else ""
            problems.append(f"{shared}checkpoint is missing tensor {name}{also}")
            continue
        got_dtype, got_shape = headers[name]
        if tuple(got_shape) != want_shape:
            problems.append(f"tensor {name} has shape {tuple(got_shape)}, expected {want_shape}")
        if got_dtype != SAFETENSORS_DTYPES[want_dtype]:
            problems.append(f"tensor {name} has dtype {got_dtype}, expected {SAFETENSORS_DTYPES[want_dtype]}")
    if f"{prefix}.weight" in headers:
        problems.append(f"tensor {prefix}.weight is present next to the compressed tensors of {prefix}")
    if owner != prefix and f"{prefix}.{DICTIONARY}" in headers:
        problems.append(f"tensor {prefix}.{DICTIONARY} is stored although {prefix} uses the dictionary of {owner}")
    return problems


def read_safetensors_header(path) -> tuple[int, dict]:
    """(header length in bytes, parsed JSON header) of one safetensors file; FormatError if unreadable."""
    import json

    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        size = int.from_bytes(size_bytes, "little")
        try:
            return size, json.loads(f.read(size))
        except ValueError as err:
            raise FormatError(f"{path}: unreadable safetensors header ({err})") from err


def header_tensors(header: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype string, shape)} of a parsed safetensors header."""
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items() if name != "__metadata__"}


def read_safetensors_headers(files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype string, shape)} over safetensors files, from their headers only."""
    headers = {}
    for path in files:
        headers.update(header_tensors(read_safetensors_header(path)[1]))
    return headers


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each 32-bit word held in an int64 tensor (0 <= value < 2**32), same shape.

    SWAR bit counting: temporaries the size of the input, not 32× it as unpacking would be."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def check_mask_bits(name: str, coef_mask: torch.Tensor, k: int, s: int, rows_per_step: int = 4096) -> None:
    """coef_mask [rows, W >= mask_words(k)] of module ``name``: exactly s set bits per row and none at
    atom positions >= k (a stray bit would make a kernel read another shard's atoms, or past D).

    Counts a block of rows at a time: bounded temporaries even for a 70B gate_up."""
    full_words, rest = divmod(k, BITS_PER_WORD)
    for start in range(0, coef_mask.shape[0], rows_per_step):
        block = coef_mask[start : start + rows_per_step].to(torch.int64) & 0xFFFFFFFF
        outside = torch.zeros(block.shape[0], dtype=torch.int64, device=block.device)
        if rest:
            outside |= block[:, full_words] >> rest
        if block.shape[1] > full_words + (1 if rest else 0):
            outside |= block[:, full_words + (1 if rest else 0) :].amax(1)
        if bool((outside != 0).any()):
            raise FormatError(f"tensor {name}.coef_mask has bits set at atom positions >= k={k}")
        if not bool((popcount32(block).sum(1) == s).all()):
            raise FormatError(f"tensor {name}.coef_mask does not have exactly s={s} bits per row")


def parse_quantization_config(qc: dict) -> dict:
    """Validate a config.json ``quantization_config`` dict; return it with defaults filled."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"quant_method is {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"CoSpaDi format_version {version!r} is not supported (this build reads version {FORMAT_VERSION})"
        )
    value_dtype_from_name(qc.get("value_dtype", "int8"))
    if qc.get("dictionary_dtype", "bfloat16") != "bfloat16":
        raise FormatError(f"dictionary_dtype {qc.get('dictionary_dtype')!r} is not supported (bfloat16 only)")
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise FormatError("quantization_config.modules must be a non-empty {module: {k, s}} mapping")
    for name, spec in modules.items():
        k, s = spec.get("k"), spec.get("s")
        if not (isinstance(k, int) and isinstance(s, int) and 1 <= s <= k):
            raise FormatError(f"module {name}: need integers 1 <= s <= k, got k={k!r} s={s!r}")
    for name, spec in modules.items():
        owner = spec.get(SHARED_DICTIONARY_KEY, name)
        if owner == name:
            continue
        if not isinstance(owner, str) or owner not in modules:
            raise FormatError(f"module {name} uses the dictionary of {owner!r}, which is not in quantization_config.modules")
        if dictionary_owner(modules, owner) != owner:
            raise FormatError(f"module {name} uses the dictionary of {owner}, which itself uses another module's "
                              "dictionary (a shared dictionary must be named by the module that stores it)")
        if modules[owner]["k"] != spec["k"]:
            raise FormatError(f"module {name} uses the dictionary of {owner} but has k={spec['k']}, {owner} has "
                              f"k={modules[owner]['k']}")
    return {"value_dtype": "int8", "dictionary_dtype": "bfloat16", "ignore": [], **qc}
