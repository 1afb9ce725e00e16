"""x·D for a quantized dictionary on CPU: the C++ op reading the stored codes against the torch paths and a dense GEMM.

For each shape (in → k: SmolLM2-135M's and Qwen2.5-0.5B's widths, k as a quantized D at CR 0.3 gives them) it builds
random dictionaries in the stored layout — 4-bit (GPTQ: int32 words, float16 scales per 128 inputs) or int8 ([in, k],
a float32 scale per atom) — and times, one thread, alternating rounds, weights rotated over copies past the
last-level cache:
  c++ fused     ``cospadi_cpu::quantized_dictionary_product`` (csrc/quantized_dictionary.cpp) forced to widen the codes
                in registers (what it does up to ``kernels.cpu.QUANTIZED_DICTIONARY_FUSED_MAX_ROWS`` rows)
  c++ tiles     the same op forced to its other path: 256-atom tiles decoded in C++, torch's GEMM (more rows)
  torch         the torch path: 4-bit ``kernels.base.int4_dictionary_product`` (tiles decoded by torch ops, batched
                GEMM); int8 ``kernels.base.int8_dictionary_product`` on D held transposed (torch's int8 GEMM for
                bf16 / fp16 x, widened tiles for float32) — the GPU paths, and the CPU's before the C++ op
  dense-gemm    x @ D with D dense in the activation dtype (what a bf16 / float32 layer of the same k costs)
  vllm wna16    (4-bit, where vLLM's op exists: AVX-512 builds, bf16 / fp16 x) the plugin's ``cpu-wna16`` x·D
                (``kernels.cpu_wna16``): vLLM's own CPU W4A16 kernel, ``CPUWNA16LinearKernel`` of
                ``choose_mp_linear_kernel``, on the same stored tensors padded to whole groups of 128 inputs and 32
                atoms (x padded per call, padded atoms dropped)
Reported per variant: best and median per-call µs, and the median over rounds of the per-round ratio to
dense-gemm (< 1: faster than the dense GEMM).

    python benchmarks/quantized_dictionary_bench.py [--layout int4 int8] [--m 1 8 16 32 64 128] [--rounds 7]

Activations: bfloat16 where the CPU multiplies it (AVX-512 BF16), else float32 (``--act-dtype`` overrides).
Writes benchmarks/results/<int4|int8>-dictionary-<avx512|avx2|portable>[-<act dtype>].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.value_kernel_bench import COPIES_BYTES, one_thread_cpu, per_call_seconds, write_results  # noqa: E402
from cospadi_vllm import codec  # noqa: E402
from cospadi_vllm import format as fmt  # noqa: E402
from cospadi_vllm.kernels import base  # noqa: E402
from cospadi_vllm.kernels.cpu import QUANTIZED_DICTIONARY_FUSED_MAX_ROWS  # noqa: E402
from cospadi_vllm.kernels.cpu_wna16 import CPUWNA16Kernel, wna16_unavailable  # noqa: E402
from offline_compress import report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# (name, in, k): SmolLM2 q/k/v merged, gate/up merged, o, down; Qwen2.5-0.5B gate/up merged and down.
SHAPES = (("smollm2 qkv", 576, 700), ("smollm2 gate+up", 576, 1100), ("smollm2 o", 576, 486),
          ("smollm2 down", 1536, 576), ("qwen0.5b gate+up", 896, 1800), ("qwen0.5b down", 4864, 896))
VARIANTS = ("c++ fused", "c++ tiles", "torch", "dense-gemm")
BITS = {"int4": 4, "int8": 8}


def stored_dictionary(layout: str, in_f: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a random D as stored."""
    if layout == "int4":
        codes = torch.randint(0, 16, (in_f, k))
        return codec.pack_int4_dictionary(codes), (0.01 * (0.5 + torch.rand(-(-in_f // 128), k))).to(torch.float16)
    return torch.randint(-127, 128, (in_f, k), dtype=torch.int8), 0.01 * (0.5 + torch.rand(k))


def operands(layout: str, in_f: int, k: int, act_dtype: torch.dtype) -> dict[str, list]:
    """Weight copies per variant, enough of each to pass the last-level cache."""
    stored_bytes = in_f * k * BITS[layout] // 8
    dense_bytes = in_f * k * act_dtype.itemsize
    stored = [stored_dictionary(layout, in_f, k) for _ in range(max(2, min(64, COPIES_BYTES // stored_bytes)))]
    # torch's int8 path takes D transposed, its scales in x's dtype (as the GPU kernel holds them)
    torch_held = stored if layout == "int4" else [(codes.t().contiguous(), scales.to(act_dtype)) for codes, scales in stored]
    dense = [torch.randn(in_f, k).to(act_dtype) for _ in range(max(2, min(16, COPIES_BYTES // dense_bytes)))]
    held = {"c++ fused": stored, "c++ tiles": stored, "torch": torch_held, "dense-gemm": dense}
    if layout == "int4" and wna16_unavailable(act_dtype) is None:
        held["vllm wna16"] = [vllm_wna16_layer(codes, scales, act_dtype) for codes, scales in stored]
    return held


def vllm_wna16_layer(codes: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype) -> tuple:
    """(the plugin's ``cpu-wna16`` kernel, a module holding D) with the stored GPTQ tensors processed for vLLM's CPU
    W4A16 kernel (padded to whole groups of 128 inputs and 32 atoms, re-laid in vLLM's blocks)."""
    layer = torch.nn.Module()
    layer.register_buffer(fmt.DICTIONARY, codes.clone())
    layer.register_buffer(fmt.DICTIONARY_SCALES, scales.clone())
    kernel = CPUWNA16Kernel(base.KernelConfig(torch.device("cpu"), act_dtype, torch.int8, torch.int32))
    kernel.process_weights_after_loading(layer)
    return kernel, layer


def runs(layout: str) -> dict:
    torch_path = base.int4_dictionary_product if layout == "int4" else base.int8_dictionary_product
    return {
        "c++ fused": lambda x, o: torch.ops.cospadi_cpu.quantized_dictionary_product(x, *o, 1 << 30),
        "c++ tiles": lambda x, o: torch.ops.cospadi_cpu.quantized_dictionary_product(x, *o, 0),
        "torch": lambda x, o: torch_path(x, *o),
        "dense-gemm": lambda x, o: x @ o,
        "vllm wna16": lambda x, o: o[0].dictionary_product(o[1], x),
    }


def bench_shape(layout: str, shape: tuple[str, int, int], ms: list[int], rounds: int, act_dtype: torch.dtype) -> list[dict]:
    name, in_f, k = shape
    weights, run = operands(layout, in_f, k, act_dtype), runs(layout)
    rows = []
    for m in ms:
        x = torch.randn(m, in_f).to(act_dtype)
        calls = max(4, 64 // m)
        variants = [v for v in (*VARIANTS, "vllm wna16") if v in weights]
        for variant in variants:  # warm: every copy once
            per_call_seconds(run[variant], weights[variant], x, len(weights[variant]))
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant in variants:
                times[variant].append(per_call_seconds(run[variant], weights[variant], x, calls))
        for variant in variants:
            ratios = [t / base_t for t, base_t in zip(times[variant], times["dense-gemm"], strict=True)]
            rows.append({"shape": name, "in": in_f, "k": k, "m": m, "variant": variant,
                         "best_us": min(times[variant]) * 1e6, "median_us": statistics.median(times[variant]) * 1e6,
                         "median_ratio_to_dense": statistics.median(ratios)})
            print(f"{layout} {name:17s} M={m:4d} {variant:11s} best {rows[-1]['best_us']:9.1f} µs  median "
                  f"{rows[-1]['median_us']:9.1f} µs  ÷ dense {rows[-1]['median_ratio_to_dense']:.2f}", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    layout = meta["layout"]
    described = ("GPTQ-layout dictionaries (int32 words, float16 scales per 128 inputs)" if layout == "int4"
                 else "int8 dictionaries ([in, k], a float32 scale per atom)")
    torch_path = ("`kernels.base.int4_dictionary_product` (tiles decoded by torch ops)" if layout == "int4" else
                  "`kernels.base.int8_dictionary_product` on D held transposed (int8 GEMM for bf16 x, widened tiles "
                  "for float32)")
    lines = [f"# x·D with an {layout} dictionary on CPU ({meta['cpu']}, {meta['build']} build, {meta['act_dtype']}, "
             "1 thread)", "",
             f"Random {described}, {meta['rounds']} alternating rounds, weights rotated past the cache. "
             "`c++ fused` / `c++ tiles`: `cospadi_cpu::quantized_dictionary_product` forced to either path (served: "
             f"fused up to {meta['fused_max_rows']} rows); `torch`: {torch_path}; `dense-gemm`: x @ D with a dense D "
             "in the activation dtype; `vllm wna16`: the plugin's `cpu-wna16` x·D, vLLM's CPU W4A16 kernel "
             "(`CPUWNA16LinearKernel`) on the same stored tensors padded to whole groups of 128 inputs and 32 atoms"
             + (f" (not measured: {meta['vllm_wna16_not']})" if meta.get("vllm_wna16_not") else "") + ".", "",
             "| shape | in → k | M | variant | best µs | median µs | median ÷ dense-gemm |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['in']} → {r['k']} | {r['m']} | {r['variant']} | {r['best_us']:.1f} | "
                     f"{r['median_us']:.1f} | {r['median_ratio_to_dense']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", nargs="+", choices=sorted(BITS), default=sorted(BITS))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", nargs="+", choices=[s[0] for s in SHAPES], default=[s[0] for s in SHAPES])
    parser.add_argument("--act-dtype", choices=["float32", "bfloat16"], help="default: what vLLM serves on this CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    served_dtype, build = one_thread_cpu()
    act_dtype = getattr(torch, args.act_dtype) if args.act_dtype else served_dtype
    machine = report.machine()
    for layout in args.layout:
        rows = [row for shape in SHAPES if shape[0] in args.shapes
                for row in bench_shape(layout, shape, args.m, args.rounds, act_dtype)]
        meta = {"layout": layout, "build": build, "cpu": f"{machine['cpu']} ({machine['isa']})",
                "act_dtype": str(act_dtype).removeprefix("torch."), "rounds": args.rounds, "threads": 1,
                "torch": torch.__version__, "fused_max_rows": QUANTIZED_DICTIONARY_FUSED_MAX_ROWS}
        if layout == "int4":
            meta["vllm_wna16_not"] = wna16_unavailable(act_dtype)
        suffix = "" if act_dtype == served_dtype else f"-{meta['act_dtype']}"
        write_results(args.out / f"{layout}-dictionary-{build}{suffix}", meta, rows, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
