"""The C++ CPU ops (csrc/cpu_kernels.cpp, csrc/quantized_dictionary.cpp), built once per machine with the system compiler.

``make setup`` builds it (``cpu_kernels.main()``); otherwise the first CoSpaDi layer
that vLLM loads on CPU does (about a minute on 2 cores; torch's file lock makes concurrent TP workers
wait for one build). The library is compiled for the build machine's CPU (``-march=native``) and cached
under ``~/.cache/cospadi-vllm/cpu-kernels/<cpu-flags-hash>/``, so a home directory shared between
different CPUs never loads a binary built for another one.

Ops (namespace ``torch.ops.cospadi_cpu``):
- ``coef_product(z, mask, values, scales, offsets, table, kind, portable, float_out, direct_max_rows)``
  → y [M, N] (float32 if ``float_out``, else z's dtype) for any M. Up to ``direct_max_rows`` rows of
  Z the direct kernels read C as stored; above it, tiles of C are expanded densely (≤ 8 MiB) and
  multiplied by torch's GEMM. bfloat16 Z with int8 values (AVX-512 VNNI + VBMI2) takes the int16
  kernel: Z rounded per row to int16 (max |z| ↦ 32767; a relative error ≤ 2⁻¹⁶ of the row's largest
  entry, below bf16's own 2⁻⁹ for every entry ≥ 1/128 of it), products and sums exact in int32.
- ``dictionary_product(x, dictionary_t)`` → Z = x·D [M, K] in x's dtype, D given transposed
  (``dictionary_t`` [K, in]): for up to 8 rows of bfloat16 x an AVX-512 BF16 kernel streaming D once
  (one vdpbf16ps per 32 inputs, atom and row), otherwise torch's GEMM on the transposed view.
- ``linear(x, dictionary_t, mask, values, scales, offsets, table, kind, direct_max_rows)`` → y = (x·D)·C
  in one call. Few rows with int8 values: Z stays float32 between the products and is rounded once,
  to int16 (the two-op path rounds it to bfloat16 first); otherwise ``dictionary_product`` +
  ``coef_product``.
- ``quantized_dictionary_product(x, codes, scales, fused_max_rows)`` → Z = x·D [M, K] in x's dtype for an integer D
  as stored (csrc/quantized_dictionary.cpp): 4-bit in GPTQ's layout (int32 codes, float16 scales per group) or
  int8 ([in, K], float32 scales per atom). Up to ``fused_max_rows`` rows: the codes read once per 8 rows of x,
  widened in registers (AVX2 + FMA + F16C; a scalar walk otherwise) into per-chunk float32 accumulators; more
  rows: tiles of 256 atoms decoded to float32 and torch's GEMM.
Fake kernels are registered, so torch.compile treats the ops as opaque.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from cospadi_vllm import format as fmt

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_kernels.cpp", "quantized_dictionary.cpp")]
# The instruction set the library is compiled for: this CPU's (native), or another x86-64 level named here
# (x86-64-v3: AVX2 + FMA, the kernels AVX2-only machines get; x86-64: the portable bit walk alone) — how
# the tests build and check every variant on one machine. It must not exceed what the CPU runs.
ARCH_ENV = "COSPADI_CPU_ARCH"

# value_kind codes of the C++ ops (INT4: two values per uint8, as stored).
INT8, TABLE, BF16, INT4 = 0, 1, 2, 3

_lock = threading.Lock()
BUILD_LOCK = "build.flock"  # ours: an flock on it serialises builds across processes
TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
_loaded = False
_features: dict[str, bool | int] = {}


def _flags_line() -> str | None:
    """The ``flags`` line of /proc/cpuinfo (None where there is none)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None


def cpu_flags() -> set[str]:
    line = _flags_line()
    return set(line.split(":", 1)[1].split()) if line else set()


def has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), and oneDNN may use it
    (``ONEDNN_MAX_CPU_ISA`` can cap it below): without it, bf16 GEMMs (vLLM's dense layers, torch's) run
    ~20× slower than float32 ones or cannot be created at all, so float32 serves."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if capped not in ("ALL", "DEFAULT") and "BF16" not in capped and "AMX" not in capped:
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def arch() -> str:
    return os.environ.get(ARCH_ENV, "native")


def cflags() -> list[str]:
    return ["-O3", f"-march={arch()}", "-fopenmp", "-std=c++17"]


def _cpu_tag() -> str:
    flags = _flags_line() or os.uname().machine
    tag = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return tag if arch() == "native" else f"{tag}-{arch()}"


def build_directory() -> Path:
    root = Path(os.environ.get("COSPADI_CACHE", Path.home() / ".cache" / "cospadi-vllm"))
    return root / "cpu-kernels" / _cpu_tag()


def load() -> None:
    """Build (if needed) and load the library into this process; idempotent and thread-safe."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded or hasattr(torch.ops.cospadi_cpu, "coef_product"):
            _loaded = True
            return
        from torch.utils import cpp_extension

        # The venv's ninja (a vLLM dependency) may not be on PATH when python is run by its full path.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with _build_lock(directory):
                cpp_extension.load(
                    name="cospadi_cpu_kernels", sources=[str(source) for source in SOURCES], extra_cflags=cflags(),
                    extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False, verbose=False,
                )
        except (RuntimeError, OSError, ImportError) as err:
            raise RuntimeError(
                f"could not build the CoSpaDi CPU kernels ({', '.join(map(str, SOURCES))}) with the system C++ compiler: {err}. "
                "Install g++ (Debian: apt install g++) and run `make setup` again."
            ) from err
        _register_fake()
        _loaded = True


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """One build or load at a time per build directory, across processes (TP workers), by an OS file lock that
    dies with its holder. torch's own lock is a file whose existence is the lock: a build killed part-way
    (Ctrl-C, kill) left it behind and every later process waited for it forever, silently. Holding this
    lock means no other process is building here, so such a file is stale and is removed."""
    with open(directory / BUILD_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / TORCH_BATON).unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register_fake() -> None:
    """Shapes for torch.compile's tracing: the ops are opaque to it (no Python runs inside)."""

    @torch.library.register_fake("cospadi_cpu::coef_product")
    def _coef_product_fake(z, coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind,
                           portable, float_out, direct_max_rows):
        return z.new_empty((z.shape[0], coef_mask.shape[0]), dtype=torch.float32 if float_out else z.dtype)

    @torch.library.register_fake("cospadi_cpu::dictionary_product")
    def _dictionary_product_fake(x, dictionary_t):
        return x.new_empty((x.shape[0], dictionary_t.shape[0]))

    @torch.library.register_fake("cospadi_cpu::quantized_dictionary_product")
    def _quantized_dictionary_product_fake(x, codes, scales, fused_max_rows):
        return x.new_empty((x.shape[0], codes.shape[1]))

    @torch.library.register_fake("cospadi_cpu::linear")
    def _linear_fake(x, dictionary_t, coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind,
                     direct_max_rows):
        return x.new_empty((x.shape[0], coef_mask.shape[0]))


def value_kind(dtype: torch.dtype) -> int:
    if dtype == torch.int8:
        return INT8
    if fmt.values_per_byte(dtype) == 2:
        return INT4
    if dtype == torch.bfloat16:
        return BF16
    if dtype.itemsize == 1:
        return TABLE
    raise TypeError(f"coefficient values of dtype {dtype} have no CPU kernel")


def value_table(dtype: torch.dtype) -> torch.Tensor:
    """The 256 float32 values of a 1-byte value dtype's codes (what ``TABLE`` decodes through)."""
    if value_kind(dtype) != TABLE:
        return torch.empty(0)
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


_DECODING: dict[torch.dtype, tuple[torch.Tensor, int]] = {}


def value_decoding(dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(value_table, value_kind) arguments of the ops, in their order, for values of ``dtype``; the first call
    also loads the kernels."""
    if dtype not in _DECODING:
        load()
        _DECODING[dtype] = (value_table(dtype), value_kind(dtype))
    return _DECODING[dtype]


def _feature(name: str) -> bool:
    if name not in _features:  # asked on every call of the op: answer from a dict after the first time
        load()
        _features[name] = bool(getattr(torch.ops.cospadi_cpu, name)())
    return _features[name]


def has_vector_kernel() -> bool:
    """Whether vector kernels (AVX-512, or AVX2 + FMA) were compiled in (else the portable bit walk serves)."""
    return _feature("has_vector_kernel")


def vector_width() -> int:
    """512 (AVX-512 kernels), 256 (AVX2 + FMA) or 0 (portable)."""
    if "vector_width" not in _features:
        load()
        _features["vector_width"] = int(torch.ops.cospadi_cpu.vector_width())
    return _features["vector_width"]


def build_name() -> str:
    """Which kernels were compiled in, in words: AVX-512, AVX2 + FMA or portable (scalar bit walk)."""
    return {512: "AVX-512", 256: "AVX2 + FMA", 0: "portable (scalar bit walk)"}[vector_width()]


def has_bf16_kernel() -> bool:
    """Whether ``coef_product`` takes bfloat16 Z directly (AVX-512 BF16: vdpbf16ps)."""
    return _feature("has_bf16_kernel")


def has_int16_kernel() -> bool:
    """Whether bfloat16 Z with int8 values takes the int16 path (AVX-512 VNNI + VBMI2)."""
    return _feature("has_int16_kernel")


def main() -> int:
    """Build now (``make setup`` calls this), print what was built."""
    load()
    kind = build_name()
    kind += " + BF16 dot products" if has_bf16_kernel() else ""
    kind += " + int16 dot products for int8 values" if has_int16_kernel() else ""
    print(f"[setup] CoSpaDi CPU kernels built in {build_directory()}: {kind}; value dtypes "
          f"{', '.join(fmt.VALUE_DTYPES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
