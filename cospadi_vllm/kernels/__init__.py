"""Kernels for y = (x·D)·C behind one interface (``base.CoSpaDiKernel``), chosen once per layer.

- ``cpu``: the C++ ops (``cpu_library``, ``csrc/cpu_kernels.cpp``);
- ``cpu-wna16``: the same, with a 4-bit dictionary's x·D through vLLM's W4A16 CPU kernel (only when named);
- ``gpu``: cuBLAS for x·D and the Triton kernel (``triton_gemm``) on C repacked (``gpu_layout``).

Importing this package imports neither implementation; :func:`choose_kernel` loads the one it picks.
"""

from cospadi_vllm.kernels.base import (
    FORCE_KERNEL_ENV,
    CoSpaDiKernel,
    KernelConfig,
    KernelUnavailableError,
    choose_kernel,
    merge_shards,
)

__all__ = ["FORCE_KERNEL_ENV", "CoSpaDiKernel", "KernelConfig", "KernelUnavailableError", "choose_kernel",
           "merge_shards"]
