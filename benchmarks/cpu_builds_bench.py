"""The CPU coefficient product Z·C in each build of the C++ kernels on this machine: AVX-512 (native here),
AVX2 + FMA (``COSPADI_CPU_ARCH=x86-64-v3``: what CPUs without AVX-512 run) and portable (x86-64).

    python benchmarks/cpu_builds_bench.py [--threads 1] [--m 1 8 64]

float32 Z (what such CPUs serve: they have no bf16 matrix instructions), int8 values, SmolLM2's merged
gate_up at CR 0.3 (two shards of k = 518, s = 345, 1536 outputs), the direct kernels at every M, random
C and Z; median of 30 calls after 5 warm-up calls, each build in its own process.
Writes benchmarks/results/cpu-builds.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUILDS = {"native": "AVX-512 (native)", "x86-64-v3": "AVX2 + FMA", "x86-64": "portable"}


def inner(ms: list[int], threads: int) -> dict:
    import torch

    from cospadi_vllm.kernels import cpu_library
    from tests.reference import merged_layer

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    _, coef, k = merged_layer("int8", g, shards=[(518, 1536, 345), (518, 1536, 345)], in_features=8)
    table, kind = cpu_library.value_decoding(torch.int8)
    result = {"vector_width": cpu_library.vector_width(), "microseconds": {}}
    for m in ms:
        z = torch.randn(m, k, generator=g)

        def call(z=z):
            return torch.ops.cospadi_cpu.coef_product(z, *coef, table, kind, False, True, 10**9)

        for _ in range(5):
            call()
        times = []
        for _ in range(30):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result["microseconds"][m] = round(sorted(times)[len(times) // 2] * 1e6, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(args.m, args.threads)), flush=True)
        return 0
    flags = Path("/proc/cpuinfo").read_text().split()
    rows = {}
    for arch, label in BUILDS.items():
        if arch == "native" and "avx512f" not in flags:
            label = "native (this CPU has no AVX-512)"
        env = {**os.environ, "COSPADI_CPU_ARCH": arch, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--inner", "--threads", str(args.threads), "--m",
                               *map(str, args.m)], env=env, capture_output=True, text=True, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"{arch}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        rows[label] = json.loads(lines[-1])
    portable = rows["portable"]["microseconds"]
    md = ["# Z·C on each CPU build", "", f"{platform.processor() or platform.machine()}, {args.threads} thread(s); "
          "float32 Z, int8 values, SmolLM2 gate_up at CR 0.3 (2 × k = 518, s = 345, 1536 outputs), direct kernels; "
          "median µs per call (`python benchmarks/cpu_builds_bench.py`).", "",
          "| build | kernels | " + " | ".join(f"M = {m} (µs)" for m in args.m) + " | vs portable |",
          "|---|---|" + "---|" * len(args.m) + "---|"]
    for label, r in rows.items():
        us = r["microseconds"]
        speedup = ", ".join(f"{portable[str(m)] / us[str(m)]:.1f}×" for m in args.m)
        md.append(f"| {label} | {str(r['vector_width']) + '-bit' if r['vector_width'] else 'scalar'} | "
                  + " | ".join(f"{us[str(m)]:.0f}" for m in args.m) + f" | {speedup} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-builds.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "cpu-builds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
