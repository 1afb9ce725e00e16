"""The kernel interface: y = (x·D)·C for one (possibly merged) layer, chosen once per layer.

Modelled on vLLM's mixed-precision linear kernels (``MPLinearKernel``): a class per implementation
with ``can_implement`` / ``process_weights_after_loading`` / ``apply``, picked by :func:`choose_kernel`
when the layer's weights are ready. vLLM's linear method and the transformers ``CoSpaDiLinear`` both
hold one and call nothing else.

The layer a kernel serves holds the stored tensors under the format's names, merged the way
:func:`merge_shards` lays them out: ``dictionary`` [in, K] (K = the shards' atoms side by side; it may
be another layer's tensor when shared), ``coef_mask`` [N, W], ``coef_values`` [N, S] (rows padded to the
widest shard), ``coef_scales`` [N] and ``atom_offsets`` [N] int32 (each output's first atom in Z = x·D).
``process_weights_after_loading`` may rearrange them for its hardware (never expanding C);
``stored_tensors`` gives them back as stored.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt

# Implementations in the order they are tried; the first that can implement a layer serves it. "cpu-wna16" (x·D of a
# 4-bit D through vLLM's W4A16 CPU kernel) serves 4-bit dictionaries where vLLM's op exists, "cpu" every other CPU layer.
KERNELS = {"cpu-wna16": "cospadi_vllm.kernels.cpu_wna16:CPUWNA16Kernel", "cpu": "cospadi_vllm.kernels.cpu:CPUKernel",
           "triton": "cospadi_vllm.kernels.gpu:TritonKernel"}
# Names one implementation for every layer (e.g. "triton" on a CPU under TRITON_INTERPRET=1, in tests).
FORCE_KERNEL_ENV = "COSPADI_KERNEL"


@dataclass(frozen=True)
class KernelConfig:
    """What a kernel must serve: where, at which activation dtype, which stored dtypes."""

    device: torch.device
    act_dtype: torch.dtype  # x, and y
    value_dtype: torch.dtype  # coef_values
    dictionary_dtype: torch.dtype = torch.bfloat16
    name: str = ""  # the layer, for error messages


class KernelUnavailableError(RuntimeError):
    """No implementation can serve a layer here (names each one's reason)."""


class CoSpaDiKernel(ABC):
    name: str = ""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        # An int8 D: held as stored by the CPU kernel (its C++ x·D reads the codes along the atoms), transposed
        # ([K, in] int8, the same bytes) by the GPU kernel for int8_dictionary_product, float32 scales as stored.
        self.int8_dictionary = config.dictionary_dtype == torch.int8
        # A 4-bit D is held as stored (GPTQ layout: int32 [ceil(in/8), K], float16 scales [groups, K]); x·D reads the
        # packed codes (CPU: csrc/quantized_dictionary.cpp) or widens tiles of atoms for the GEMM (int4_dictionary_product),
        # never the whole D.
        self.int4_dictionary = config.dictionary_dtype == fmt.DICTIONARY_TYPES["int4"].dtype

    @classmethod
    @abstractmethod
    def can_implement(cls, config: KernelConfig) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) in one line."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module, owns_dictionary: bool = True) -> None:
        """Prepare the loaded tensors once (``owns_dictionary=False``: ``layer.dictionary`` is another
        layer's, already prepared by its own kernel)."""

    @abstractmethod
    def dictionary_product(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → Z = x·D [M, K] in x's dtype."""

    @abstractmethod
    def coefficient_product(self, layer: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Z [M, K] → Z·C [M, N] in Z's dtype, C read as held (never expanded whole)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → y [M, N]; implementations may fuse the two products."""
        return self.coefficient_product(layer, self.dictionary_product(layer, x))

    @abstractmethod
    def stored_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{DICTIONARY, COEF_MASK, COEF_VALUES, COEF_SCALES} in their stored layout (for saving)."""

    def held_dictionary_dtype(self) -> torch.dtype:
        """The dtype D is held in: float16 activations get D in float16 once (same bytes) instead of a
        conversion per call; float32 activations keep the stored bfloat16 (half the bytes)."""
        act, stored = self.config.act_dtype, self.config.dictionary_dtype
        return act if act.itemsize == stored.itemsize and act.is_floating_point else stored

    def held_dictionary(self, dictionary: torch.Tensor) -> torch.Tensor:
        """``dictionary`` in ``held_dictionary_dtype()``. bfloat16 → float16 keeps 3 more mantissa bits but
        overflows above 65504 (an atom's scale is folded into D, so entries can be large): refuse that in
        one line instead of serving infinities."""
        dtype = self.held_dictionary_dtype()
        if dtype == torch.float16 and dictionary.dtype != torch.float16:
            largest = float(dictionary.abs().max()) if dictionary.numel() else 0.0
            if not largest <= torch.finfo(torch.float16).max:
                raise KernelUnavailableError(
                    f"{self.config.name or 'a CoSpaDi layer'}: dictionary entries reach {largest:.4g}, beyond "
                    "float16's 65504; serve this checkpoint with bfloat16 or float32 activations")
        return dictionary.to(dtype)


def choose_kernel(config: KernelConfig, name: str | None = None) -> CoSpaDiKernel:
    """The first implementation of ``KERNELS`` that can serve ``config`` (or the one ``name`` /
    ``$COSPADI_KERNEL`` names); KernelUnavailableError with every implementation's reason if none can."""
    name = name or os.environ.get(FORCE_KERNEL_ENV) or None
    if name is not None and name not in KERNELS:
        raise KernelUnavailableError(f"{FORCE_KERNEL_ENV}={name!r} is not one of {', '.join(KERNELS)}")
    reasons = []
    for candidate in [name] if name else list(KERNELS):
        module, _, cls_name = KERNELS[candidate].partition(":")
        kernel_class: type[CoSpaDiKernel] = getattr(importlib.import_module(module), cls_name)
        ok, why = kernel_class.can_implement(config)
        if ok:
            return kernel_class(config)
        reasons.append(f"{candidate}: {why}")
    raise KernelUnavailableError(f"no CoSpaDi kernel can serve values of {config.value_dtype} with {config.act_dtype} "
                       f"activations on {config.device} ({'; '.join(reasons)})")


# x·D with an int8 D held transposed — the GPU kernel's path (the CPU kernel reads D as stored in C++: NOTES.md item 69).
# On CPU tensors (the Triton kernel under the interpreter; the benchmark's "torch" row) torch's int8-weight GEMM
# (``_weight_int8pack_mm``) for up to this many rows of bf16 / fp16 x; above it, and for float32 x (its float32 kernel
# is 7–40× slower than a GEMM), tiles of INT8_TILE_ATOMS atoms widened to x's dtype and torch's GEMM (item 53).
INT8_GEMM_MAX_ROWS = 128
INT8_TILE_ATOMS = 256


@torch.no_grad()  # an inference kernel (its output feeds ops that refuse tensors requiring grad)
def int8_dictionary_product(x: torch.Tensor, dictionary_t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, in] · D with D = (dictionary_t [K, in] int8)ᵀ · diag(scales [K], in x's dtype) → Z [M, K] in x's dtype.

    The int8 GEMM (CPU) reads D as held (per-output-channel scales: the layout of D held transposed); it needs
    ``in`` to be a multiple of 16 (it crashes otherwise, torch 2.13). GPUs take the tiles (cuBLAS). The tiles
    hold at most INT8_TILE_ATOMS·in widened entries at a time (freed after the call), never the whole D."""
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= INT8_GEMM_MAX_ROWS
            and x.shape[1] % 16 == 0):
        return torch._weight_int8pack_mm(x.contiguous(), dictionary_t, scales)
    z = x.new_empty(x.shape[0], dictionary_t.shape[0])
    for start in range(0, dictionary_t.shape[0], INT8_TILE_ATOMS):
        tile = dictionary_t[start: start + INT8_TILE_ATOMS]
        z[:, start: start + tile.shape[0]] = (x @ tile.t().to(x.dtype)) * scales[start: start + tile.shape[0]]
    return z


@torch.no_grad()
def int4_dictionary_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, in] · D, D 4-bit in GPTQ's layout (packed int32 [ceil(in/8), K], scales [groups, K]) → Z [M, K] in x's
    dtype, INT8_TILE_ATOMS atoms at a time; a tile is freed after its product, so D is never held widened.

    The GPU path (the CPU has a C++ op reading the packed codes, 1.6–55× faster there: NOTES.md 68). The tile's codes
    come from ``codec.unpack_int4_dictionary`` (int32), but its scales are not applied to the [in, tile] codes as
    ``codec.dequantize_dictionary`` (the reference the tests compare against) does: each group's scale multiplies
    the [M, tile] result of a batched GEMM over its 128 inputs — 1.04–7.2× faster than decoding tiles with
    ``dequantize_dictionary`` (NOTES.md 65)."""
    m, in_features = x.shape
    rows, atoms_total = packed.shape
    group = fmt.DICTIONARY_TYPES["int4"].group_size
    groups = scales.shape[0]
    x_groups = torch.nn.functional.pad(x, (0, groups * group - in_features)).view(m, groups, group).transpose(0, 1)
    z = x.new_empty(m, atoms_total)
    for start in range(0, atoms_total, INT8_TILE_ATOMS):
        atoms = slice(start, min(start + INT8_TILE_ATOMS, atoms_total))
        codes = codec.unpack_int4_dictionary(packed[:, atoms], 8 * rows).sub_(fmt.INT4_DICTIONARY_ZERO)
        codes = torch.nn.functional.pad(codes, (0, 0, 0, groups * group - 8 * rows))  # padded inputs meet x's zeros
        per_group = torch.bmm(x_groups, codes.to(x.dtype).view(groups, group, -1))  # [G, M, tile]
        z[:, atoms] = (per_group.float() * scales[:, None, atoms].float()).sum(0).to(x.dtype)
    return z


def replace_tensor(layer: torch.nn.Module, name: str, data: torch.Tensor) -> None:
    """Put ``data`` under ``name`` as the same kind of attribute it was (parameter, buffer), so that
    TorchDynamo and ``state_dict`` see what they saw before."""
    if name in layer._parameters:
        layer._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    elif name in layer._buffers:
        layer._buffers[name] = data
    else:
        layer.register_buffer(name, data, persistent=False)


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stored tensors of a fused layer's shards (q/k/v or gate/up, in order; each
    {DICTIONARY: [in, k_i], COEF_MASK: [out_i, W_i], COEF_VALUES: [out_i, s_i], COEF_SCALES: [out_i]})
    in the layout kernels take: dictionaries side by side [in, Σ k_i], masks and values zero-padded per
    row to the widest shard ([Σ out_i, max W_i], [Σ out_i, max s_i]), scales concatenated, and
    "atom_offsets" [Σ out_i] int32: each output's first atom in the merged dictionary. An int8 dictionary's
    "dictionary_scales" ([k_i] each) go side by side like its atoms."""
    words = max(shard[fmt.COEF_MASK].shape[1] for shard in shards)
    s_max = max(shard[fmt.COEF_VALUES].shape[1] for shard in shards)
    names = [name for name in fmt.TENSOR_SUFFIXES if name in shards[0]]  # dictionary_scales: int8 dictionaries
    merged: dict[str, list[torch.Tensor]] = {name: [] for name in (*names, "atom_offsets")}
    k_offset = 0
    for shard in shards:
        mask, values = shard[fmt.COEF_MASK], shard[fmt.COEF_VALUES]
        for name, tensor in fmt.dictionary_tensors(shard).items():
            merged[name].append(tensor)
        merged[fmt.COEF_MASK].append(torch.nn.functional.pad(mask, (0, words - mask.shape[1])))
        merged[fmt.COEF_VALUES].append(torch.nn.functional.pad(values, (0, s_max - values.shape[1])))
        merged[fmt.COEF_SCALES].append(shard[fmt.COEF_SCALES])
        merged["atom_offsets"].append(torch.full((mask.shape[0],), k_offset, dtype=torch.int32, device=mask.device))
        k_offset += shard[fmt.DICTIONARY].shape[1]
    dictionary_dtype = shards[0][fmt.DICTIONARY].dtype
    return {name: torch.cat(parts, fmt.tensor_axes(name, dictionary_dtype).index(fmt.ATOMS)
                            if name in fmt.DICTIONARY_SUFFIXES else 0)
            for name, parts in merged.items()}
