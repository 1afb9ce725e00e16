"""Kernels for y = (x·D)·C behind one interface (``base.CoSpaDiKernel``), chosen once per layer.

- ``cpu``: the C++ ops (``cpu_library``, ``csrc/cpu_kernels.cpp``);
- ``cpu-wna16``: for a 4-bit dictionary, x·D through vLLM's W4A16 CPU kernel (AVX-512 builds, bf16 / fp16), Z·C as ``cpu``;
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
