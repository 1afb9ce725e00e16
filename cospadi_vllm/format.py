"""CoSpaDi checkpoint format, version 1 — the one source of truth (described for users in docs/format.md).

A compressed linear ``y = x · Wᵀ`` (W: [out, in]) stores Wᵀ ≈ D · C as ``<prefix>.dictionary`` D [in, k],
``<prefix>.coef_mask`` [out, ceil(k/32)] int32 (bit t%32 of word t//32 in row j ⇔ atom t used by output j),
``<prefix>.coef_values`` [out, s] (row j: column j's s non-zeros in increasing atom order) and
``<prefix>.coef_scales`` [out] float32: ``C[t, j] = coef_values[j, rank of t] · coef_scales[j]``. An int8
dictionary comes with ``<prefix>.dictionary_scales`` [k] float32 (D[:, t] = dictionary[:, t] · scale[t]). A shared
dictionary is stored once, by the module that ``quantization_config.modules[name]["dictionary"]`` names.

The compressor writes what this module describes and every reader (vLLM plugin, transformers, ``check``,
the compressor's own reader) validates against it; the bit layouts and the float decode of those tensors are
in ``cospadi_vllm.codec``. It imports torch only and has no side effects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUANT_METHOD = "cospadi"
FORMAT_VERSION = 1
BITS_PER_WORD = 32

DICTIONARY = "dictionary"
DICTIONARY_SCALES = "dictionary_scales"  # only with a scaled dictionary dtype (int8): one per atom
COEF_MASK = "coef_mask"
COEF_VALUES = "coef_values"
COEF_SCALES = "coef_scales"
BIAS = "bias"
TENSOR_SUFFIXES = (DICTIONARY, DICTIONARY_SCALES, COEF_MASK, COEF_VALUES, COEF_SCALES)  # every name there is
DICTIONARY_SUFFIXES = (DICTIONARY, DICTIONARY_SCALES)  # stored once per shared dictionary, by its owner
COEF_SUFFIXES = (COEF_MASK, COEF_VALUES, COEF_SCALES)
# What each axis of a layer's tensors runs over; readers that split or merge layers (tensor parallelism,
# fused q/k/v) place every tensor by these. PACKED: one output's mask words or values (never split).
IN, ATOMS, OUT, PACKED = "in", "atoms", "out", "packed"
# IN counts input rows in the tensor's own units (a 4-bit dictionary: 8 inputs per int32 row, its scales one row
# per group of inputs); :func:`tensor_axes` gives a role's axes for a dictionary dtype.
TENSOR_AXES: dict[str, tuple[str, ...]] = {
    DICTIONARY: (IN, ATOMS), DICTIONARY_SCALES: (ATOMS,), COEF_MASK: (OUT, PACKED), COEF_VALUES: (OUT, PACKED), COEF_SCALES: (OUT,),
}
GROUPED_DICTIONARY_SCALES_AXES = (IN, ATOMS)  # one scale per group of inputs and atom
# Key of a module's quantization_config entry naming the module whose stored dictionary it uses.
SHARED_DICTIONARY_KEY = "dictionary"
# Keys of a module's entry overriding the checkpoint-wide storage types for that module (a precision search's
# choice); the modules vLLM fuses into one layer, and the users of a shared dictionary, store the same types.
MODULE_DTYPE_KEYS = ("value_dtype", "dictionary_dtype")

MASK_DTYPE = torch.int32
SCALES_DTYPE = torch.float32


@dataclass(frozen=True)
class StorageType:
    """One entry of a dtype table: the stored torch dtype, its largest magnitude used for scales (None:
    stored unscaled), and whether this build reads it (a name can be reserved before it is served)."""

    dtype: torch.dtype
    max_abs: float | None = None
    supported: bool = True
    per_byte: int = 1  # values packed per stored element (int4 values: two per uint8; int4 D: eight per int32)
    group_size: int | None = None  # a dictionary's scales: one per atom (None) or per group of inputs and atom
    scales_dtype: torch.dtype = SCALES_DTYPE


# coef_values: one scale per output column (coef_scales). int4: two values per byte, value r of a row in
# byte r // 2, the low nibble for even r, two's complement in [-7, 7] (symmetric: -8 is never written);
# stored as uint8, the only value type with that torch dtype.
VALUE_TYPES: dict[str, StorageType] = {
    "int8": StorageType(torch.int8, 127.0),
    "int4": StorageType(torch.uint8, 7.0, per_byte=2),
    "float8_e4m3fn": StorageType(torch.float8_e4m3fn, 448.0),
    "bfloat16": StorageType(torch.bfloat16),
}
# dictionary: int8 has one scale per atom (dictionary_scales [k] float32), symmetric. int4 is GPTQ's layout
# (what vLLM's W4A16 kernels take, uint4b8): D [in, k] as int32 [ceil(in/8), k], input 8r+i of atom t in bits
# [4i, 4i+4) of element [r, t], code q in [0, 15] meaning (q − 8)·scale, one float16 scale per group of 128
# inputs and atom (dictionary_scales [ceil(in/128), k]).
INT4_DICTIONARY_ZERO = 8
DICTIONARY_TYPES: dict[str, StorageType] = {
    "bfloat16": StorageType(torch.bfloat16),
    "int8": StorageType(torch.int8, 127.0),
    "int4": StorageType(torch.int32, 7.5, per_byte=8, group_size=128, scales_dtype=torch.float16),
}
VALUE_DTYPES: dict[str, torch.dtype] = {name: t.dtype for name, t in VALUE_TYPES.items()}
DEFAULT_VALUE_DTYPE = "int8"
DEFAULT_DICTIONARY_DTYPE = "bfloat16"  # what a checkpoint without the field holds (the compressor writes int8 unless told)

# Checkpoint modules vLLM fuses into one layer (Llama / Qwen2 / Qwen3 / Mistral), by fused layer name,
# in shard order. The members read the same input, so the compressor calibrates them on one Gram.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FormatError(Exception):
    """A checkpoint or config does not follow CoSpaDi format version 1.

    Not a ValueError on purpose: vLLM builds its config in pydantic validators, which turn any
    ValueError into a multi-line ValidationError; this one reaches the caller as it is."""


def _storage_type(table: dict[str, StorageType], field: str, name: str) -> torch.dtype:
    if name not in table:
        raise FormatError(f"{field} {name!r} is not one of {sorted(table)}")
    if not table[name].supported:
        served = sorted(n for n, t in table.items() if t.supported)
        raise FormatError(f"{field} {name!r} is not supported yet (this build serves {', '.join(served)})")
    return table[name].dtype


def value_dtype_from_name(name: str) -> torch.dtype:
    return _storage_type(VALUE_TYPES, "value_dtype", name)


def dictionary_dtype_from_name(name: str) -> torch.dtype:
    return _storage_type(DICTIONARY_TYPES, "dictionary_dtype", name)


def values_per_byte(value_dtype: torch.dtype) -> int:
    """How many values one stored element of ``coef_values`` holds (2 for int4, stored as uint8)."""
    return next((t.per_byte for t in VALUE_TYPES.values() if t.dtype == value_dtype), 1)


def value_columns(s: int, value_dtype: torch.dtype) -> int:
    """Stored columns of ``coef_values`` for s values per row (ceil(s / 2) for int4)."""
    per_byte = values_per_byte(value_dtype)
    return (s + per_byte - 1) // per_byte


def dictionary_is_scaled(dictionary_dtype: torch.dtype) -> bool:
    """Whether a dictionary of this dtype is stored with ``dictionary_scales``."""
    return any(t.dtype == dictionary_dtype and t.max_abs is not None for t in DICTIONARY_TYPES.values())


def tensor_axes(role: str, dictionary_dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """What each axis of a ``role`` tensor runs over, for a dictionary stored as ``dictionary_dtype``."""
    if role == DICTIONARY_SCALES and dictionary_storage(dictionary_dtype).group_size is not None:
        return GROUPED_DICTIONARY_SCALES_AXES
    return TENSOR_AXES[role]


def dictionary_storage(dictionary_dtype: torch.dtype) -> StorageType:
    """The DICTIONARY_TYPES entry stored as ``dictionary_dtype``."""
    return next(t for t in DICTIONARY_TYPES.values() if t.dtype == dictionary_dtype)


def dictionary_tensor_shapes(in_features: int, k: int, dictionary_dtype: torch.dtype
                             ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(shape of ``dictionary``, shape of ``dictionary_scales`` or None) for D [in, k] stored as ``dictionary_dtype``."""
    storage = dictionary_storage(dictionary_dtype)
    rows = -(-in_features // storage.per_byte)
    if storage.max_abs is None:
        return (rows, k), None
    return (rows, k), ((k,) if storage.group_size is None else (-(-in_features // storage.group_size), k))


def fused_group(leaf: str) -> tuple[str, ...]:
    """The checkpoint modules fused with ``leaf`` (e.g. q_proj → q/k/v), ``(leaf,)`` if none."""
    return next((group for group in FUSED_MODULES.values() if leaf in group), (leaf,))


def fused_members(name: str) -> list[str]:
    """Full names of the modules vLLM fuses with module ``name`` into one layer, in shard order
    (``model.layers.0.self_attn.k_proj`` → its q/k/v), ``[name]`` if none."""
    parent, _, leaf = name.rpartition(".")
    return [f"{parent}.{member}" if parent else member for member in fused_group(leaf)]


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

    def tensor_specs(self, value_dtype: torch.dtype, dictionary_dtype: torch.dtype = torch.bfloat16
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{suffix: (shape, dtype)} of the layer's tensors, in TENSOR_SUFFIXES order (the dictionary's may
        be another module's; ``dictionary_scales`` only with a scaled dictionary dtype)."""
        dictionary_shape, scales_shape = dictionary_tensor_shapes(self.in_features, self.k, dictionary_dtype)
        specs = {
            DICTIONARY: (dictionary_shape, dictionary_dtype),
            DICTIONARY_SCALES: (scales_shape, dictionary_storage(dictionary_dtype).scales_dtype),
            COEF_MASK: ((self.out_features, mask_words(self.k)), MASK_DTYPE),
            COEF_VALUES: ((self.out_features, value_columns(self.s, value_dtype)), value_dtype),
            COEF_SCALES: ((self.out_features,), SCALES_DTYPE),
        }
        if scales_shape is None:
            del specs[DICTIONARY_SCALES]
        return specs


def dictionary_owner(modules: dict[str, dict], name: str) -> str:
    """The module under whose prefix module ``name``'s dictionary is stored (``name`` itself unless shared)."""
    return modules[name].get(SHARED_DICTIONARY_KEY, name)


def dictionary_users(modules: dict[str, dict], owner: str) -> list[str]:
    """The other modules that use the dictionary stored under ``owner``'s prefix."""
    return [name for name in modules if name != owner and dictionary_owner(modules, name) == owner]


def dictionary_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dictionary's tensors of one layer's {suffix: tensor} (what a shared dictionary's owner stores)."""
    return {suffix: tensors[suffix] for suffix in DICTIONARY_SUFFIXES if suffix in tensors}


def stored_bytes(shape: LayerShape, value_dtype_name: str, owns_dictionary: bool = True,
                 dictionary_dtype_name: str = DEFAULT_DICTIONARY_DTYPE) -> int:
    """Bytes actually stored for one layer: dictionary + mask + values + scales (bias excluded).

    A layer that uses another module's dictionary (``owns_dictionary=False``) stores no dictionary.
    """
    dictionary = DICTIONARY_TYPES[dictionary_dtype_name]
    dictionary_shape, scales_shape = dictionary_tensor_shapes(shape.in_features, shape.k, dictionary.dtype)
    dictionary_bytes = math.prod(dictionary_shape) * dictionary.dtype.itemsize
    if scales_shape is not None:
        dictionary_bytes += math.prod(scales_shape) * dictionary.scales_dtype.itemsize
    return (
        dictionary_bytes * owns_dictionary
        + shape.out_features * mask_words(shape.k) * MASK_DTYPE.itemsize
        + shape.out_features * value_columns(shape.s, VALUE_TYPES[value_dtype_name].dtype)
        * VALUE_TYPES[value_dtype_name].dtype.itemsize
        + shape.out_features * SCALES_DTYPE.itemsize
    )


def dense_bf16_bytes(in_features: int, out_features: int) -> int:
    return 2 * in_features * out_features


# ---------------------------------------------------------------- bit mask


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


# ---------------------------------------------------------------- validation of stored tensors


def missing_tensor(name: str, prefix: str | None = None, owner: str | None = None, users=()) -> str:
    """The one wording of a missing tensor; ``prefix`` uses ``owner``'s dictionary, ``users`` share it."""
    shared = f"module {prefix} uses the dictionary of {owner}, but " if owner and prefix and owner != prefix else ""
    also = f" (shared by {', '.join(users)})" if users else ""
    return f"{shared}checkpoint is missing tensor {name}{also}"


def tensor_problem(name: str, shape: tuple[int, ...], dtype: torch.dtype | str,
                   want_shape: tuple[int, ...], want_dtype: torch.dtype) -> str | None:
    """Wrong shape or dtype of one tensor, as one line naming it; None if it is right."""
    if tuple(shape) != tuple(want_shape):
        return f"tensor {name} has shape {tuple(shape)}, expected {tuple(want_shape)}"
    if dtype != want_dtype:
        return f"tensor {name} has dtype {_dtype_name(dtype)}, expected {_dtype_name(want_dtype)}"
    return None


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def layer_problems(
    prefix: str,
    found: dict[str, tuple[torch.dtype | str, tuple[int, ...]]],
    shape: LayerShape,
    value_dtype: torch.dtype,
    dictionary_dtype: torch.dtype = torch.bfloat16,
    owner: str | None = None,
    users: list[str] | None = None,
) -> list[str]:
    """Problems of one compressed module, one line each naming the tensor.

    found: {tensor name: (dtype, shape)} of the whole checkpoint (from safetensors headers or loaded
    tensors; a dtype this format has no name for stays a string); ``owner``: the module whose stored
    dictionary this one uses (default: itself); ``users``: the modules sharing this module's dictionary.
    Missing, wrong shape, wrong dtype, a dense ``<prefix>.weight`` beside the compressed tensors
    (loaders would take one and ignore the other), a dictionary stored by a module that uses another's.
    """
    problems = []
    owner = owner or prefix
    specs = shape.tensor_specs(value_dtype, dictionary_dtype)
    for suffix, (want_shape, want_dtype) in specs.items():
        shared = suffix in DICTIONARY_SUFFIXES
        name = f"{owner if shared else prefix}.{suffix}"
        if name not in found:
            named_users = users if shared and owner == prefix else ()
            problems.append(missing_tensor(name, prefix, owner if shared else None, named_users or ()))
            continue
        got_dtype, got_shape = found[name]
        problem = tensor_problem(name, got_shape, got_dtype, want_shape, want_dtype)
        if problem:
            problems.append(problem)
    for suffix in DICTIONARY_SUFFIXES:  # e.g. dictionary_scales beside a bfloat16 dictionary: no reader loads it
        if suffix not in specs and f"{owner}.{suffix}" in found:
            problems.append(f"tensor {owner}.{suffix} is stored, but a {_dtype_name(dictionary_dtype)} dictionary "
                            "has none (quantization_config.dictionary_dtype)")
    if f"{prefix}.weight" in found:
        problems.append(f"tensor {prefix}.weight is present next to the compressed tensors of {prefix}")
    for suffix in DICTIONARY_SUFFIXES if owner != prefix else ():
        if f"{prefix}.{suffix}" in found:
            problems.append(f"tensor {prefix}.{suffix} is stored although {prefix} uses the dictionary of {owner}")
    return problems


# ---------------------------------------------------------------- quantization_config


def build_quantization_config(
    modules: dict[str, LayerShape],
    value_dtype: str,
    dictionary_owners: dict[str, str] | None = None,
    dictionary_dtype: str = DEFAULT_DICTIONARY_DTYPE,
    module_dtypes: dict[str, tuple[str, str]] | None = None,
    **info,
) -> dict:
    """config.json's quantization_config. ``dictionary_owners``: {module: the module whose stored
    dictionary it uses} for the members of shared-dictionary groups (all but each group's first).
    ``module_dtypes``: {module: (value dtype, dictionary dtype)} where a module stores other types than the
    checkpoint-wide ``value_dtype`` / ``dictionary_dtype`` (only the differing keys are written).
    ``info``: informational fields (how the checkpoint was made), written after the format fields."""
    entries = {name: {"k": shape.k, "s": shape.s} for name, shape in modules.items()}
    for name, owner in (dictionary_owners or {}).items():
        entries[name][SHARED_DICTIONARY_KEY] = owner
    for name, dtypes in (module_dtypes or {}).items():
        for key, dtype, default in zip(MODULE_DTYPE_KEYS, dtypes, (value_dtype, dictionary_dtype), strict=True):
            if dtype != default:
                entries[name][key] = dtype
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "value_dtype": value_dtype,
        "dictionary_dtype": dictionary_dtype,
        **info,
        "modules": entries,
        "ignore": ["lm_head"],
    }


def parse_quantization_config(qc: dict) -> dict:
    """Validate a config.json ``quantization_config`` dict; return it with defaults filled, every module's entry
    holding its own ``value_dtype`` and ``dictionary_dtype`` names (``module_dtypes`` reads them)."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"quant_method is {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"CoSpaDi format_version {version!r} is not supported (this build reads version {FORMAT_VERSION})"
        )
    value_dtype_from_name(qc.get("value_dtype", DEFAULT_VALUE_DTYPE))
    dictionary_dtype_from_name(qc.get("dictionary_dtype", DEFAULT_DICTIONARY_DTYPE))
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
    parsed = {"value_dtype": DEFAULT_VALUE_DTYPE, "dictionary_dtype": DEFAULT_DICTIONARY_DTYPE, "ignore": [], **qc}
    parsed["modules"] = resolved_module_dtypes(modules, parsed["value_dtype"], parsed["dictionary_dtype"])
    return parsed


def resolved_module_dtypes(modules: dict[str, dict], value_dtype: str, dictionary_dtype: str) -> dict[str, dict]:
    """``modules`` with each entry's own storage types filled in (its keys, else the checkpoint-wide ones), checked:
    valid names, the same types across modules vLLM fuses, a shared dictionary's type the same for all users."""
    resolved = {name: {MODULE_DTYPE_KEYS[0]: value_dtype, MODULE_DTYPE_KEYS[1]: dictionary_dtype, **spec}
                for name, spec in modules.items()}
    for name, spec in resolved.items():
        value_dtype_from_name(spec["value_dtype"])
        dictionary_dtype_from_name(spec["dictionary_dtype"])
        dtypes = (spec["value_dtype"], spec["dictionary_dtype"])
        first = next(member for member in fused_members(name) if member in resolved)
        first_dtypes = (resolved[first]["value_dtype"], resolved[first]["dictionary_dtype"])
        if first_dtypes != dtypes:
            raise FormatError(f"modules {first} and {name} store {first_dtypes} and {dtypes} as (value_dtype, "
                              "dictionary_dtype), but vLLM fuses them into one layer: they must store the same types")
        owner = spec.get(SHARED_DICTIONARY_KEY, name)
        if resolved[owner]["dictionary_dtype"] != spec["dictionary_dtype"]:
            raise FormatError(f"module {name} uses the dictionary of {owner} but has dictionary_dtype "
                              f"{spec['dictionary_dtype']!r}, {owner} has {resolved[owner]['dictionary_dtype']!r}")
    return resolved


def module_dtypes(spec: dict) -> tuple[torch.dtype, torch.dtype]:
    """(value dtype, dictionary dtype) a module stores, from its entry in a parsed quantization_config."""
    return value_dtype_from_name(spec["value_dtype"]), dictionary_dtype_from_name(spec["dictionary_dtype"])
