"""The CPU kernel: the C++ ops of ``cpu_library`` (csrc/cpu_kernels.cpp), called directly.

Calling ``torch.ops.cospadi_cpu.*`` directly (not through a Python custom-op wrapper) saves ~15 µs per
call, 10–25 % of a SmolLM2 layer at decode (benchmarks/results/NOTES.md item 29); the ops have fake
kernels, so torch.compile still sees each as one opaque node.

With bfloat16 or float32 activations D is held transposed ([K, in], the same bytes, bfloat16): the ≤ 8-row
x·D kernels stream it front to back (float32 x: D widened in registers) and torch's GEMM reads the
transposed view for more rows (NOTES items 30, 44), and :meth:`CPUKernel.apply` runs the whole layer in
one call (``cospadi_cpu::linear``).
"""

from __future__ import annotations

import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import cpu_library
from cospadi_vllm.kernels.base import CoSpaDiKernel, KernelConfig, replace_tensor

# Up to this many rows of Z the direct sparse kernels win; above it, tiles of C expanded to bf16/float32
# (≤ 8 MiB, freed after the call) and multiplied by torch's GEMM. Measured on the 2-core AVX-512 machine.
DIRECT_MAX_ROWS = 32
# The same for int8 (or int4) values × bfloat16 Z on the int16 kernel (AVX-512 VNNI + VBMI2): on SmolLM2's
# layers it beats the expanded tiles up to ~150 rows with 2 threads and ~64–100 with one (what vLLM's CPU
# worker gets on a 2-core machine; NOTES.md item 28).
INT16_MAX_ROWS = 96
# x·D for an integer D (4-bit or int8): up to this many rows of x the C++ op widens the codes in registers, one pass
# over D; more rows would read D once per 8 rows, and C++-decoded tiles of 256 atoms with torch's GEMM (which decode D
# once) are faster from 16 rows on for both layouts (benchmarks/quantized_dictionary_bench.py, NOTES.md items 68, 69).
QUANTIZED_DICTIONARY_FUSED_MAX_ROWS = 8


def direct_max_rows(z_dtype: torch.dtype, value_dtype: torch.dtype) -> int:
    """Rows of Z up to which the C++ op uses its direct kernels (above: expanded tiles + GEMM)."""
    integer = cpu_library.value_kind(value_dtype) in (cpu_library.INT8, cpu_library.INT4)
    int16 = z_dtype == torch.bfloat16 and integer and cpu_library.has_int16_kernel()
    return INT16_MAX_ROWS if int16 else DIRECT_MAX_ROWS


class CPUKernel(CoSpaDiKernel):
    name = "cpu"

    @classmethod
    def can_implement(cls, config: KernelConfig) -> tuple[bool, str | None]:
        if config.device.type != "cpu":
            return False, f"tensors are on {config.device.type}, not the CPU"
        if config.dictionary_dtype not in (torch.bfloat16, torch.int8, torch.int32):
            return False, f"dictionary of dtype {config.dictionary_dtype} (bfloat16, int8 or int4 only)"
        try:
            cpu_library.value_kind(config.value_dtype)
        except TypeError as err:
            return False, str(err)
        return True, None

    def __init__(self, config: KernelConfig) -> None:
        super().__init__(config)
        # D held transposed ([K, in], the same bytes) for the C++ x·D kernels: bf16 activations, and float32
        # ones (D widened in registers for few rows, instead of a float32 copy of D per call). An integer D (int8,
        # 4-bit) is held as stored: the C++ x·D reads its codes along the atoms.
        self.dictionary_transposed = config.dictionary_dtype == torch.bfloat16 and config.act_dtype in (
            torch.bfloat16, torch.float32)
        self.value_table: torch.Tensor | None = None
        self.value_kind = 0
        self.direct_max_rows = DIRECT_MAX_ROWS

    def process_weights_after_loading(self, layer: torch.nn.Module, owns_dictionary: bool = True) -> None:
        # Build / load the C++ library now, not inside the first forward.
        self.value_table, self.value_kind = cpu_library.value_decoding(self.config.value_dtype)
        self.direct_max_rows = direct_max_rows(self.config.act_dtype, self.config.value_dtype)
        if not owns_dictionary or self.int4_dictionary or self.int8_dictionary:  # (an integer D is held as stored)
            return
        dictionary = self.held_dictionary(layer.dictionary.data)
        replace_tensor(layer, fmt.DICTIONARY, dictionary.t().contiguous() if self.dictionary_transposed else dictionary)

    def dictionary_product(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.int4_dictionary or self.int8_dictionary:  # the codes read as stored (csrc/quantized_dictionary.cpp)
            return torch.ops.cospadi_cpu.quantized_dictionary_product(x, layer.dictionary, layer.dictionary_scales,
                                                                      QUANTIZED_DICTIONARY_FUSED_MAX_ROWS)
        if self.dictionary_transposed:
            return torch.ops.cospadi_cpu.dictionary_product(x, layer.dictionary)
        dictionary = layer.dictionary
        return x @ (dictionary if dictionary.dtype == x.dtype else dictionary.to(x.dtype))

    def coefficient_product(self, layer: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return torch.ops.cospadi_cpu.coef_product(
            z, layer.coef_mask, layer.coef_values, layer.coef_scales, layer.atom_offsets, self.value_table,
            self.value_kind, False, z.dtype == torch.float32, self.direct_max_rows)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.dictionary_transposed:  # (an integer D: x·D and Z·C as two ops)
            return super().apply(layer, x)
        return torch.ops.cospadi_cpu.linear(x, layer.dictionary, layer.coef_mask, layer.coef_values,
                                            layer.coef_scales, layer.atom_offsets, self.value_table,
                                            self.value_kind, self.direct_max_rows)

    def stored_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        coefficients = {fmt.COEF_MASK: layer.coef_mask, fmt.COEF_VALUES: layer.coef_values,
                        fmt.COEF_SCALES: layer.coef_scales}
        if self.int4_dictionary or self.int8_dictionary:
            return {fmt.DICTIONARY: layer.dictionary, fmt.DICTIONARY_SCALES: layer.dictionary_scales, **coefficients}
        dictionary = layer.dictionary.t() if self.dictionary_transposed else layer.dictionary
        return {fmt.DICTIONARY: dictionary.to(self.config.dictionary_dtype).contiguous(), **coefficients}
