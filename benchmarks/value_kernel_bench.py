"""What reading int4 values costs the CPU kernels: int8 and int4 values side by side, alternating rounds.

For SmolLM2-135M's layer shapes at one compression ratio it builds random CoSpaDi layers three ways:
  int8            the structure (k, s) the budget gives int8 values
  int4-same-ks    the same k and s with int4 values (half the value bytes): the cost of the nibble unpacking
  int4            the structure the budget gives int4 values (same bytes as int8, more atoms and non-zeros)
and times the serving op (``cospadi_cpu::linear``: x·D, then Z·C with C as stored) with one thread, weights
rotated over copies so they come from DRAM. Each round times every variant once (alternating, so drifts of
a shared VM's speed hit all of them alike); reported per variant: the best and the median per-call time over
the rounds, and the median over rounds of each round's time ratio to int8.

    python benchmarks/value_kernel_bench.py [--ratio 0.3] [--m 1 8 64] [--rounds 15]

Activations: bfloat16 where the CPU has AVX-512 BF16, else float32 (what vLLM serves there). Writes
benchmarks/results/value-kernels-<avx512|avx2|portable>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.kernel_bench import MODELS, cpu_operands, random_cospadi  # noqa: E402
from cospadi_vllm import format as fmt  # noqa: E402
from cospadi_vllm.kernels import cpu_library  # noqa: E402
from cospadi_vllm.kernels.cpu import direct_max_rows  # noqa: E402
from offline_compress.budget import solve_k_s  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("int8", "int4-same-ks", "int4")
COPIES_BYTES = 64 << 20  # weight copies per variant: past the L3 of the machines measured


def shapes_for(variant: str, in_f: int, outs: tuple[int, ...], ratio: float) -> tuple[str, list[fmt.LayerShape]]:
    value_dtype = "int8" if variant == "int8" else "int4"
    solved_for = "int4" if variant == "int4" else "int8"
    return value_dtype, [solve_k_s(in_f, out, ratio, 2.0, solved_for) for out in outs]


def per_call_seconds(run, operand_sets: list, x: torch.Tensor, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        run(x, operand_sets[i % len(operand_sets)])
    return (time.perf_counter() - started) / calls


def bench_layer(name: str, in_f: int, outs: tuple[int, ...], ratio: float, ms: list[int], rounds: int,
                act_dtype: torch.dtype) -> list[dict]:
    operands, structures = {}, {}
    for variant in VARIANTS:
        value_dtype, shapes = shapes_for(variant, in_f, outs, ratio)
        one = sum(fmt.stored_bytes(shape, value_dtype) for shape in shapes)
        copies = max(2, min(32, COPIES_BYTES // one))
        operands[variant] = [cpu_operands(random_cospadi(in_f, outs, shapes, torch.device("cpu"), value_dtype))
                             for _ in range(copies)]
        structures[variant] = {"k": sum(s.k for s in shapes), "s": sum(s.s for s in shapes), "stored_bytes": one}

    def run(x, o):
        return torch.ops.cospadi_cpu.linear(
            x, o["dictionary_t"], o["coef_mask"], o["coef_values"], o["coef_scales"], o["atom_offsets"],
            *cpu_library.value_decoding(o["coef_values"].dtype), direct_max_rows(x.dtype, o["coef_values"].dtype))

    rows = []
    for m in ms:
        x = torch.randn(m, in_f).to(act_dtype)
        calls = max(4, 64 // m)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for variant in VARIANTS:  # warm: every copy once
            per_call_seconds(run, operands[variant], x, len(operands[variant]))
        for _ in range(rounds):
            for variant in VARIANTS:
                times[variant].append(per_call_seconds(run, operands[variant], x, calls))
        for variant in VARIANTS:
            ratios = [t / base for t, base in zip(times[variant], times["int8"], strict=True)]
            rows.append({"layer": name, "in": in_f, "out": sum(outs), "m": m, "variant": variant, **structures[variant],
                         "best_us": min(times[variant]) * 1e6, "median_us": statistics.median(times[variant]) * 1e6,
                         "median_ratio_to_int8": statistics.median(ratios)})
            print(f"{name:8s} M={m:3d} {variant:13s} k={structures[variant]['k']:5d} s={structures[variant]['s']:5d} "
                  f"best {rows[-1]['best_us']:8.1f} µs  median {rows[-1]['median_us']:8.1f} µs  "
                  f"÷ int8 {rows[-1]['median_ratio_to_int8']:.2f}", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# int4 vs int8 values in the CPU kernels ({meta['build']}, {meta['act_dtype']}, 1 thread)", "",
             f"SmolLM2-135M layer shapes, CR {meta['ratio']}, random layers, {meta['rounds']} alternating rounds; "
             "`int4-same-ks`: int8's k and s with int4 values; `int4`: the structure int4's bytes buy.", "",
             "| layer | M | variant | k | s | stored KB | best µs | median µs | median ÷ int8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['m']} | {r['variant']} | {r['k']} | {r['s']} | {r['stored_bytes'] / 1e3:.0f} | "
                     f"{r['best_us']:.1f} | {r['median_us']:.1f} | {r['median_ratio_to_int8']:.2f} |")
    return "\n".join(lines) + "\n"


def one_thread_cpu() -> tuple[torch.dtype, str]:
    """Set up a one-thread CPU kernel run: (the activation dtype vLLM serves here, the kernel build's name)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu_library.load()
    act_dtype = torch.bfloat16 if cpu_library.has_bf16_matmul() else torch.float32
    return act_dtype, {512: "avx512", 256: "avx2"}.get(cpu_library.vector_width(), "portable")


def write_results(stem: Path, meta: dict, rows: list[dict], table: str) -> None:
    """``stem``.json ({meta, rows}) and ``stem``.md (``table``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    act_dtype, build = one_thread_cpu()
    rows = []
    for name, in_f, out_spec in MODELS["smollm2-135m"]:
        outs = out_spec if isinstance(out_spec, tuple) else (out_spec,)
        rows += bench_layer(name, in_f, outs, args.ratio, args.m, args.rounds, act_dtype)
    meta = {"build": build, "act_dtype": str(act_dtype).removeprefix("torch."), "ratio": args.ratio,
            "rounds": args.rounds, "threads": 1, "torch": torch.__version__}
    write_results(args.out / f"value-kernels-{build}", meta, rows, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
