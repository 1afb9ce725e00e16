"""Kernel benchmark: one linear layer, dense vs SVD-LLM low-rank pair vs CoSpaDi (Triton, CPU kernels).

For each Llama linear shape, compression ratio and batch M it times, on random data:
  dense          x · W                    (bf16 or --act-dtype: torch.matmul on GPU; vLLM's oneDNN handle on CPU)
  svd-llm        (x · U) · V               (same dtype, rank r = CR·in·out/(in+out): same bytes as CR·dense)
  cospadi-triton (x · D) · C, C compressed  (cospadi_vllm/kernels/triton_gemm.py on C repacked once, as served; CUDA)
  cospadi-triton-bitwalk                   (the same with the decode kernel that walks only set bits, M ≤ 16)
  cospadi-cpu    (x · D) · C, C compressed  (the CPU serving path: one C++ call, cospadi_cpu::linear)
and reports time, bytes moved (each operand read once, output written once), the floor
max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) with both ceilings measured in the same run,
time ÷ floor, and speed-up over dense.

    python benchmarks/kernel_bench.py                 # full grid on CUDA, reduced grid on CPU
    python benchmarks/kernel_bench.py --models llama3.2-1b --ratios 0.3 --m 1 16
    python benchmarks/kernel_bench.py --threads 1     # CPU: one thread, as vLLM serves on a 2-core machine
    python benchmarks/kernel_bench.py --threads 1 --act-dtype float32 --value-dtype int4   # AVX2 CPUs serve float32

On CUDA every case is timed as vLLM's decode runs it: one CUDA graph holding one call per weight copy
(copies rotated until they overflow L2, so weights come from HBM), replayed after warm-up, timed with
CUDA events; the median replay over the copies is one call's time. "qkv" is Llama's merged q/k/v
layer (three shards with their own k and s; SVD-LLM: x·[U_q U_k U_v] then one GEMM per shard).
With TRITON_INTERPRET=1 on CPU, ``--impls cospadi-triton`` runs the kernel interpreted: a smoke test
of this script, its times mean nothing.

Writes benchmarks/results/kernels-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import cpu_library, merge_shards
from cospadi_vllm.kernels.cpu import direct_max_rows
from offline_compress.budget import solve_k_s
from offline_compress.quantization import encode_coefficients

RESULTS = Path(__file__).parent / "results"

# (name, in_features, out_features) per model; k/v are GQA projections.
MODELS = {
    "llama3-8b": [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096),
                  ("qkv", 4096, (4096, 1024, 1024))],
    "llama3.2-1b": [("q/o", 2048, 2048), ("k/v", 2048, 512), ("gate/up", 2048, 8192), ("down", 8192, 2048)],
    "smollm2-135m": [("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576),
                     ("qkv", 576, (576, 192, 192))],
}
IMPLS = ("dense", "svd-llm", "cospadi-triton", "cospadi-triton-bitwalk", "cospadi-cpu")
ROTATE_BYTES = 256 * 2**20  # weights of one case are replicated until ≥ this, so GPU L2 never holds them


@dataclass
class Row:
    model: str
    layer: str
    in_features: int
    out_features: int
    ratio: float
    m: int
    impl: str
    k: int
    s: int
    seconds: float
    bytes_moved: int
    flops: int
    floor_seconds: float
    time_over_floor: float
    speedup_vs_dense: float | None


# ------------------------------------------------------------------ timing


def timer(device: torch.device):
    """Median seconds of fn(): triton.testing.do_bench (device events) on CUDA, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3

    def cpu_median(fn, repeats: int = 15) -> float:
        fn()
        samples = []
        budget = time.perf_counter() + 5.0
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
            if time.perf_counter() > budget and len(samples) >= 3:
                break
        return statistics.median(samples)

    return cpu_median


def weight_sets(make, bytes_per_set: int) -> list:
    """Copies of make()'s operands, enough to overflow the GPU's L2 / the CPU's L3 (at most 16)."""
    copies = max(1, ROTATE_BYTES // max(bytes_per_set, 1))  # on CPU too: decode streams weights from DRAM
    return [make() for _ in range(min(copies, 16))]


def seconds_per_call(call, sets: list, device: torch.device, measure, replays: int = 30) -> float:
    """Median seconds of one call(set) over the rotating weight sets.

    CUDA: one graph of len(sets) calls (no launch gaps, as vLLM's decode graphs), warm-up replays,
    then CUDA events around each replay. CPU: wall-clock median, cycling through the sets.
    """
    if device.type != "cuda":
        state = {"i": 0}

        def next_call():
            state["i"] = (state["i"] + 1) % len(sets)
            return call(sets[state["i"]])

        return measure(next_call)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile / autotune / allocate outside the capture
        for operands in sets:
            call(operands)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for operands in sets:
            call(operands)
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(sets))
    del graph
    return statistics.median(samples)


def measure_ceilings(device: torch.device, measure, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, matmul rate in ``dtype`` in FLOP/s)."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n_bytes / measure(lambda: dst.copy_(src))
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rate = 2 * size**3 / measure(lambda: a @ b)
    return bandwidth, rate


# ------------------------------------------------------------------ operands


def random_cospadi(in_features: int, shard_outs: tuple[int, ...], shapes: list[fmt.LayerShape],
                   device: torch.device, value_dtype: str = "int8"):
    """Random dictionary and random column-sparse C (s atoms per output) in the checkpoint format,
    shards merged as the plugin merges q/k/v (dictionaries side by side, mask/values padded per row)."""
    shards = []
    for out_features, shape in zip(shard_outs, shapes, strict=True):  # drawn on the device: fast for 8B shapes
        support_idx = torch.rand(out_features, shape.k, device=device).argsort(dim=1)[:, : shape.s]
        shard = encode_coefficients(support_idx, torch.randn(out_features, shape.s, device=device), shape.k,
                                        value_dtype)
        shard[fmt.DICTIONARY] = (torch.randn(in_features, shape.k, device=device) / in_features**0.5).to(torch.bfloat16)
        shards.append(shard)
    return merge_shards(shards)


def cpu_operands(layer_tensors: dict) -> dict:
    """The layer as the plugin holds it on CPU (bf16 activations): D transposed to [k, in]."""
    dictionary = layer_tensors.pop("dictionary")
    return {**layer_tensors, "dictionary_t": dictionary.t().contiguous()}


_ONEDNN_HANDLES: dict[int, tuple[torch.Tensor, object]] = {}  # id(weight) → (weight kept alive, handle)


def cpu_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · w [in, out] as vLLM's CPU backend runs a bf16 weight: a prepacked oneDNN handle (made once
    per weight, outside the timing), or ``torch.matmul`` where vLLM's oneDNN ops are missing."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return x @ w
    if not ops._supports_onednn:
        return x @ w
    if id(w) not in _ONEDNN_HANDLES:
        _ONEDNN_HANDLES[id(w)] = (w, ops.create_onednn_mm(w, 32))
    return ops.onednn_mm(_ONEDNN_HANDLES[id(w)][1], x, None)


def bench_case(model, layer, in_f, out_spec, ratio, ms, impls, device, measure, ceilings,
               value_dtype: str = "int8", act_dtype: torch.dtype = torch.bfloat16) -> list[Row]:
    """One layer shape: dense and SVD-LLM weights in ``act_dtype`` (what vLLM serves a model of that dtype with),
    CoSpaDi's D in bfloat16 and C as stored, x in ``act_dtype``."""
    bandwidth, rate = ceilings
    act = act_dtype.itemsize
    _ONEDNN_HANDLES.clear()  # one case's weights at a time
    shard_outs = out_spec if isinstance(out_spec, tuple) else (out_spec,)
    out_f = sum(shard_outs)
    shapes = [solve_k_s(in_f, out, ratio, 2.0, value_dtype) for out in shard_outs]
    ranks = [int(ratio * in_f * out / (in_f + out)) for out in shard_outs]
    k_total, rank = sum(s.k for s in shapes), sum(ranks)
    cospadi_bytes = sum(fmt.stored_bytes(shape, value_dtype) for shape in shapes)
    weight_bytes = {"dense": in_f * out_f * act, "svd-llm": (in_f + out_f) * rank * act,
                    "cospadi-triton": cospadi_bytes, "cospadi-triton-bitwalk": cospadi_bytes, "cospadi-cpu": cospadi_bytes}
    inner = {"dense": 0, "svd-llm": rank, "cospadi-triton": k_total, "cospadi-triton-bitwalk": k_total,
             "cospadi-cpu": k_total}
    cospadi_flops = 2 * k_total * in_f + 2 * sum(s.k * out for s, out in zip(shapes, shard_outs, strict=True))
    flops_per_row = {
        "dense": 2 * in_f * out_f,
        "svd-llm": 2 * rank * in_f + 2 * sum(r * out for r, out in zip(ranks, shard_outs, strict=True)),
        "cospadi-triton": cospadi_flops,  # every atom position of a column is walked / multiplied
        "cospadi-triton-bitwalk": cospadi_flops,  # (counted the same: the floor is by bytes at decode)
        "cospadi-cpu": cospadi_flops,
    }

    def svd_operands():
        return {"u": (torch.randn(in_f, rank) / in_f**0.5).to(act_dtype).to(device),
                "v": [(torch.randn(r, out) / r**0.5).to(act_dtype).to(device)
                      for r, out in zip(ranks, shard_outs, strict=True)]}

    def triton_operands():
        from cospadi_vllm.kernels.gpu_layout import repack

        layer_tensors = random_cospadi(in_f, shard_outs, shapes, device, value_dtype)
        coef = [layer_tensors[n] for n in ("coef_mask", "coef_values", "coef_scales", "atom_offsets")]
        return {"dictionary": layer_tensors["dictionary"], "packed": repack(*coef)}  # repacked once, as served

    operands = {
        "dense": lambda: {"w": (torch.randn(in_f, out_f) / in_f**0.5).to(act_dtype).to(device)},
        "svd-llm": svd_operands,
        "cospadi-triton": triton_operands,
        "cospadi-triton-bitwalk": triton_operands,
        "cospadi-cpu": lambda: cpu_operands(random_cospadi(in_f, shard_outs, shapes, device, value_dtype)),
    }
    matmul = cpu_matmul if device.type == "cpu" else (lambda x, w: x @ w)

    def svd_llm(x, o):
        z = matmul(x, o["u"])
        if len(o["v"]) == 1:
            return matmul(z, o["v"][0])
        parts, start = [], 0
        for v in o["v"]:
            parts.append(matmul(z[:, start:start + v.shape[0]], v))
            start += v.shape[0]
        return torch.cat(parts, 1)

    run = {
        "dense": lambda x, o: matmul(x, o["w"]),
        "svd-llm": svd_llm,
        # what the plugin serves on CPU with bf16 activations: one C++ call, D held transposed
        "cospadi-cpu": lambda x, o: torch.ops.cospadi_cpu.linear(
            x, o["dictionary_t"], o["coef_mask"], o["coef_values"], o["coef_scales"], o["atom_offsets"],
            *cpu_library.value_decoding(o["coef_values"].dtype),
            direct_max_rows(x.dtype, o["coef_values"].dtype)),
    }
    if any(impl.startswith("cospadi-triton") for impl in impls):
        from cospadi_vllm.kernels.triton_gemm import packed_coef_product

        run["cospadi-triton"] = lambda x, o: packed_coef_product(x @ o["dictionary"], o["packed"])
        run["cospadi-triton-bitwalk"] = lambda x, o: packed_coef_product(x @ o["dictionary"], o["packed"],
                                                                         decode="bitwalk")
    rows = []
    for impl in impls:
        sets = weight_sets(operands[impl], weight_bytes[impl])
        warm_x = torch.randn(1, in_f, device=device).to(act_dtype)
        for operand_set in sets:  # every copy once: oneDNN handles are made here, not inside the timing
            run[impl](warm_x, operand_set)
        for m in ms:
            x = torch.randn(m, in_f, device=device).to(act_dtype)
            seconds = seconds_per_call(lambda o, x=x, impl=impl: run[impl](x, o), sets, device, measure)
            moved = weight_bytes[impl] + act * m * (in_f + out_f + 2 * inner[impl])
            flops = flops_per_row[impl] * m
            floor = max(moved / bandwidth, flops / rate)
            rows.append(Row(model, layer, in_f, out_f, ratio, m, impl, k_total, sum(s.s for s in shapes), seconds,
                            moved, flops, floor, seconds / floor, None))
        del sets
    dense = {r.m: r.seconds for r in rows if r.impl == "dense"}
    for r in rows:
        r.speedup_vs_dense = dense[r.m] / r.seconds if r.m in dense else None
    return rows


# ------------------------------------------------------------------ report


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}threads-{platform.machine()}"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        f"# Kernel benchmark on {meta['device']}",
        "",
        f"Measured ceilings in this run: copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s (read + write), "
        f"{meta['act_dtype']} matmul {meta['matmul_tflops'] * 1e3:.1f} GFLOP/s. Floor = max(bytes / bandwidth, FLOPs / rate). "
        f"Timing: {meta['timing']}. {meta['note']}",
        "",
        "| model | layer | in→out | CR | k | s | M | impl | time (µs) | bytes (MB) | time/floor | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r.speedup_vs_dense:.2f}×" if r.speedup_vs_dense is not None else "–"
        lines.append(
            f"| {r.model} | {r.layer} | {r.in_features}→{r.out_features} | {r.ratio} | {r.k} | {r.s} | {r.m} | "
            f"{r.impl} | {r.seconds * 1e6:.1f} | {r.bytes_moved / 1e6:.2f} | {r.time_over_floor:.2f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: llama3-8b on CUDA, smollm2-135m llama3.2-1b on CPU")
    parser.add_argument("--ratios", nargs="+", type=float, help="default: 0.2 0.3 0.4 on CUDA, 0.3 on CPU")
    parser.add_argument("--m", nargs="+", type=int, help="batch rows; default 1 4 16 64 512 2048 on CUDA, 1 8 64 512 on CPU")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: dense svd-llm and cospadi-triton on CUDA, cospadi-cpu on CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (vLLM's CPU worker on a 2-core machine gets 1: "
                        "one core is reserved for its engine process)")
    parser.add_argument("--value-dtype", default="int8", choices=sorted(fmt.VALUE_DTYPES),
                        help="CoSpaDi's coefficient values (k and s solved for the same bytes); results of a dtype other "
                             "than int8 go to kernels-<device>-<dtype>.*")
    parser.add_argument("--act-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="activations (and dense / SVD-LLM weights); vLLM serves float32 on CPUs without AVX-512 "
                             "BF16, where oneDNN has no bf16 matmul. Results of float32 go to kernels-<device>-float32*")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    act_dtype = getattr(torch, args.act_dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cospadi-cpu" in (args.impls or ["cospadi-cpu"]) and args.device != "cuda":
        cpu_library.load()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    models = args.models or (["llama3-8b"] if gpu else ["smollm2-135m", "llama3.2-1b"])
    ratios = args.ratios or ([0.2, 0.3, 0.4] if gpu else [0.3])
    ms = args.m or ([1, 4, 16, 64, 512, 2048] if gpu else [1, 8, 64, 512])
    triton_impls = [i for i in IMPLS if i.startswith("cospadi-triton")]
    impls = args.impls or [i for i in IMPLS if (i != "cospadi-cpu" if gpu else i not in triton_impls)]
    if set(impls) & set(triton_impls) and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("cospadi-triton needs a CUDA device (or TRITON_INTERPRET=1 for a smoke run whose times mean nothing)")

    torch.manual_seed(0)
    measure = timer(device)
    bandwidth, rate = measure_ceilings(device, measure, act_dtype)
    print(f"device {device_label(device)}: copy {bandwidth / 1e9:.1f} GB/s, {args.act_dtype} matmul {rate / 1e9:.1f} GFLOP/s")
    rows: list[Row] = []
    for model in models:
        for layer, in_f, out_spec in MODELS[model]:
            for ratio in ratios:
                case = bench_case(model, layer, in_f, out_spec, ratio, ms, impls, device, measure, (bandwidth, rate),
                                  args.value_dtype, act_dtype)
                for r in case:
                    print(f"{model:12s} {layer:8s} CR {ratio} M={r.m:5d} {r.impl:15s} {r.seconds * 1e6:10.1f} µs "
                          f"{r.time_over_floor:6.2f}× floor  {r.speedup_vs_dense or 0:5.2f}× dense", flush=True)
                rows.extend(case)
    meta = {
        "device": device_label(device),
        "torch": torch.__version__,
        "value_dtype": args.value_dtype,
        "act_dtype": args.act_dtype,
        "bandwidth_gbs": bandwidth / 1e9,
        "matmul_tflops": rate / 1e12,
        "timing": "median CUDA-graph replay (one call per weight copy, copies rotated over ≥256 MB so weights "
                  "come from HBM) ÷ copies, CUDA events; ceilings by triton.testing.do_bench" if gpu else
                  "median of wall-clock repeats, weights rotated over up to 16 copies (≥256 MB where that fits) "
                  "so they come from DRAM as in decode (CPU)",
        "note": "" if gpu else "CPU run: the Triton kernel is not timed here (no GPU). Dense and both SVD-LLM "
                "factors run through prepacked oneDNN handles, as vLLM's CPU backend serves bf16 weights; "
                "cospadi-cpu is the plugin's one C++ call (x·D by its own kernel up to 8 rows, torch's GEMM above; "
                "Z·C by the int16 kernel up to 96 rows, expanded tiles + GEMM above).",
    }
    suffix = "" if args.act_dtype == "bfloat16" else f"-{args.act_dtype}"
    suffix += "" if args.value_dtype == "int8" else f"-{args.value_dtype}"
    write_results(args.out / f"kernels-{meta['device']}{suffix}", meta, "rows", rows, markdown(rows, meta))
    return 0


def write_results(stem: Path, meta: dict, key: str, rows: list, table: str) -> None:
    """STEM.json ({"meta", key: rows}) and STEM.md (the markdown table), also printed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, key: [asdict(r) for r in rows]}, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    raise SystemExit(main())
