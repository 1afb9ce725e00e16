"""The GPU kernel: x·D by cuBLAS, Z·C by the Triton kernel (``triton_gemm``) on C in the GPU layout.

At load, C is repacked into the layout the Triton kernel reads (``gpu_layout``): the stored mask and
values are replaced, not copied, so C is held once; :meth:`TritonKernel.stored_tensors` reads them back.
Z·C runs as the custom op ``torch.ops.vllm.cospadi_packed_coefficient_product`` (registered once, when
this module is imported: through vLLM's ``direct_register_custom_op`` where vLLM is installed, else
the same ``torch.library`` registration done here), so torch.compile and CUDA graphs see one opaque node.

Also serves a CPU device under ``TRITON_INTERPRET=1`` when forced (``COSPADI_KERNEL=triton``): that is
how the tests run the GPU branch of the vLLM and transformers layers on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import gpu_layout
from cospadi_vllm.kernels.base import (
    CoSpaDiKernel,
    KernelConfig,
    int4_dictionary_product,
    int8_dictionary_product,
    replace_tensor,
)

OP_NAME = "cospadi_packed_coefficient_product"
# Which decode kernel (M ≤ 16) serves: "lanes" (every atom position) or "bitwalk" (only the set bits);
# both are tested, the default stays "lanes" until a GPU run compares them (benchmarks/gpu_check.sh).
DECODE_KERNEL_ENV = "COSPADI_DECODE_KERNEL"
_LIBRARY: torch.library.Library | None = None  # keeps an op defined without vLLM alive


def packed_coefficient_product_impl(
    z: torch.Tensor,
    mask_words: torch.Tensor,
    values: torch.Tensor,
    value_starts: torch.Tensor,
    scales: torch.Tensor,
    shard_table: torch.Tensor,
    shard_outputs: list[int],
    bitwalk: bool,
) -> torch.Tensor:
    """The op's body: Z·C with C in the GPU layout (``gpu_layout.PackedCoefficients``)."""
    from cospadi_vllm.kernels.triton_gemm import packed_coef_product  # imports triton

    packed = gpu_layout.PackedCoefficients(mask_words, values, value_starts, scales, shard_table, tuple(shard_outputs))
    return packed_coef_product(z, packed, decode="bitwalk" if bitwalk else "lanes")


def _packed_coefficient_product_fake(z, mask_words, values, value_starts, scales, shard_table, shard_outputs,
                                     bitwalk):
    return z.new_empty((z.shape[0], mask_words.shape[1]))


def _register_op() -> None:
    global _LIBRARY
    if hasattr(torch.ops.vllm, OP_NAME):
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        _LIBRARY = torch.library.Library("vllm", "FRAGMENT")
        _LIBRARY.define(OP_NAME + torch.library.infer_schema(packed_coefficient_product_impl, mutates_args=()))
        for dispatch_key in ("CPU", "CUDA"):
            _LIBRARY.impl(OP_NAME, packed_coefficient_product_impl, dispatch_key=dispatch_key)
        _LIBRARY._register_fake(OP_NAME, _packed_coefficient_product_fake)
        return
    direct_register_custom_op(op_name=OP_NAME, op_func=packed_coefficient_product_impl, mutates_args=[],
                              fake_impl=_packed_coefficient_product_fake)


_register_op()


class TritonKernel(CoSpaDiKernel):
    name = "triton"

    @classmethod
    def can_implement(cls, config: KernelConfig) -> tuple[bool, str | None]:
        if config.dictionary_dtype not in (torch.bfloat16, torch.int8, torch.int32):
            return False, f"dictionary of dtype {config.dictionary_dtype} (bfloat16, int8 or int4 only)"
        if config.device.type == "cuda":
            try:
                gpu_layout.check_capability(config.value_dtype, config.device)
            except gpu_layout.UnsupportedGPUError as err:
                return False, str(err)
            return True, None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, None
        return False, f"tensors are on {config.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 in tests)"

    def __init__(self, config: KernelConfig) -> None:
        super().__init__(config)
        self.packed: gpu_layout.PackedCoefficients | None = None
        self.value_columns = 0  # columns of the stored coef_values (the GPU layout pads the rows)
        decode = os.environ.get(DECODE_KERNEL_ENV, "lanes")
        if decode not in ("lanes", "bitwalk"):
            raise ValueError(f"{DECODE_KERNEL_ENV}={decode!r} is not 'lanes' or 'bitwalk'")
        self.bitwalk = decode == "bitwalk"

    def process_weights_after_loading(self, layer: torch.nn.Module, owns_dictionary: bool = True) -> None:
        if owns_dictionary and self.int8_dictionary:  # held transposed ([K, in], same bytes) for int8_dictionary_product
            replace_tensor(layer, fmt.DICTIONARY, layer.dictionary.data.t().contiguous())
        elif owns_dictionary and not self.int4_dictionary and layer.dictionary.dtype != self.held_dictionary_dtype():
            replace_tensor(layer, fmt.DICTIONARY, self.held_dictionary(layer.dictionary.data))
        self.value_columns = layer.coef_values.shape[1]
        packed = gpu_layout.repack(layer.coef_mask.data, layer.coef_values.data, layer.coef_scales.data,
                                   layer.atom_offsets)
        for role, data in ((fmt.COEF_MASK, packed.mask_words), (fmt.COEF_VALUES, packed.values),
                           (fmt.COEF_SCALES, packed.scales)):
            replace_tensor(layer, role, data)
        layer.register_buffer("value_starts", packed.value_starts, persistent=False)
        layer.register_buffer("shard_table", packed.shard_table, persistent=False)
        self.packed = packed

    def dictionary_product(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        dictionary = layer.dictionary
        # An integer D: widened tile by tile for cuBLAS (no fused x·D kernel yet)
        if self.int8_dictionary:
            return int8_dictionary_product(x, dictionary, layer.dictionary_scales.to(x.dtype))
        if self.int4_dictionary:
            return int4_dictionary_product(x, dictionary, layer.dictionary_scales)
        if dictionary.dtype == x.dtype:
            return x @ dictionary  # cuBLAS
        if x.dtype == torch.float32:  # D stays bfloat16 (half the bytes): widened tile by tile, never copied
            from cospadi_vllm.kernels.triton_gemm import dictionary_product_float32

            return dictionary_product_float32(x, dictionary)
        return x @ dictionary.to(x.dtype)

    def coefficient_product(self, layer: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        # The layer's current tensors (they follow .to() and vLLM's parameter handling), the host-side
        # shard sizes from load time (the launch grid needs them without a device sync).
        return torch.ops.vllm.cospadi_packed_coefficient_product(
            z, layer.coef_mask, layer.coef_values, layer.value_starts, layer.coef_scales, layer.shard_table,
            list(self.packed.shard_outputs), self.bitwalk)

    def stored_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.int8_dictionary:
            dictionary = {fmt.DICTIONARY: layer.dictionary.t().contiguous(), fmt.DICTIONARY_SCALES: layer.dictionary_scales}
        elif self.int4_dictionary:
            dictionary = {fmt.DICTIONARY: layer.dictionary, fmt.DICTIONARY_SCALES: layer.dictionary_scales}
        else:
            dictionary = {fmt.DICTIONARY: layer.dictionary.to(self.config.dictionary_dtype)}
        return {**dictionary, fmt.COEF_MASK: layer.coef_mask.t().contiguous(),
                fmt.COEF_VALUES: layer.coef_values[:, : self.value_columns].contiguous(),
                fmt.COEF_SCALES: layer.coef_scales}
