"""Serving benchmark: ``vllm bench serve --dataset-name random`` against the dense and the CoSpaDi model.

For each model it starts the documented serve command on 127.0.0.1 (serve_configs/cpu-demo.yaml
on CPU, serve_configs/single-gpu.yaml with --gpu), runs vLLM's own load generator against it
through the OpenAI completions endpoint, and stops the server. Same prompts (fixed seed), same
server settings for both models.

    python benchmarks/serve_bench.py --checkpoint ./smollm2-cospadi          # dense = SmolLM2 from assets
    python benchmarks/serve_bench.py --model /models/Llama-3.1-8B --checkpoint ./llama-cospadi --gpu
    python benchmarks/serve_bench.py --checkpoint ./smollm2-int8-dictionary --also bf16-dictionary=./smollm2-cospadi \
        --name smollm2-int8-dictionary --rounds 3      # a second checkpoint in the same alternating rounds
    python benchmarks/serve_bench.py --checkpoint ./smollm2-int4-dictionary --kernel wna16=cpu-wna16 --rounds 3
                                                       # the same checkpoint again with COSPADI_KERNEL=cpu-wna16

Then it loads each model once more with ``cospadi-vllm memory`` (parameter + buffer bytes as
loaded by vLLM). Writes benchmarks/results/serve-<name>-<label>.json (vLLM's result file, one per
model), serve-<name>-memory.json and serve-<name>.md (side-by-side tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from cospadi_vllm.launch import ROOT, ServerError, free_port, running_server, serve_command
from cospadi_vllm.memory import run_isolated
from cospadi_vllm.memory import table as memory_table
from offline_compress import assets

RESULTS = Path(__file__).parent / "results"
METRICS = [  # (vLLM result key, column title)
    ("request_throughput", "req/s"),
    ("output_throughput", "output tok/s"),
    ("total_token_throughput", "total tok/s"),
    ("median_ttft_ms", "median TTFT (ms)"),
    ("median_tpot_ms", "median TPOT (ms)"),
    ("p99_itl_ms", "p99 ITL (ms)"),
]


def platform_line() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from cospadi_vllm.kernels import cpu_library

    line = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CoSpaDi CPU kernels "
            f"{cpu_library.build_name()}")
    if os.environ.get("COSPADI_CPU_ARCH"):
        line += f" (built with COSPADI_CPU_ARCH={os.environ['COSPADI_CPU_ARCH']})"
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        line += f", oneDNN capped at ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
    return line


def bench_one(label: str, model_dir: Path, args, name: str, env: dict[str, str]) -> dict:
    port = free_port()
    config = ROOT / "serve_configs" / ("single-gpu.yaml" if args.gpu else "cpu-demo.yaml")
    extra = ["--served-model-name", label, "--max-model-len", str(args.input_len + args.output_len + 16),
             "--dtype", args.dtype]
    log_path = args.out / f"serve-{name}-{label}.server.log"
    filename = f"serve-{name}-{label}.json"
    with running_server(serve_command(model_dir, port, extra, config), log_path, port, env=env) as base_url:
        cmd = [
            sys.executable, "-m", "cospadi_vllm", "bench", "serve",
            "--backend", "vllm", "--base-url", base_url.removesuffix("/v1"), "--model", label,
            "--tokenizer", str(model_dir), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
            "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl",
            "--save-result", "--result-dir", str(args.out), "--result-filename", filename,
        ]
        print(f"== {label}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    log_path.unlink()  # kept only when something failed
    return json.loads((args.out / filename).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="dense HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="CoSpaDi checkpoint of that model")
    parser.add_argument("--name", help="name in the result files (default: smollm2 or the model directory name)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--gpu", action="store_true", help="serve with serve_configs/single-gpu.yaml")
    parser.add_argument("--dtype", default="auto",
                        help="activation dtype of both servers; auto: bfloat16 on GPUs and on CPUs with bf16 matrix "
                             "instructions (AVX-512 BF16 / AMX), float32 on other CPUs (bf16 runs far slower there)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="dense and CoSpaDi served this many times, alternating; the tables show the round "
                             "with the median CoSpaDi / dense ratio and list every round's (these machines are noisy)")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=CHECKPOINT",
                        help="another checkpoint served in the same rounds, after dense and --checkpoint (repeatable)")
    parser.add_argument("--kernel", action="append", default=[], metavar="LABEL=KERNEL",
                        help="serve --checkpoint once more per round with COSPADI_KERNEL=KERNEL (e.g. wna16=cpu-wna16)")
    parser.add_argument("--no-memory", action="store_true", help="skip the weight-memory measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        from cospadi_vllm.kernels.cpu_library import has_bf16_matmul

        args.dtype = "bfloat16" if args.gpu or has_bf16_matmul() else "float32"
    print(f"== serving dtype: {args.dtype}", flush=True)
    model_dir, name = assets.model_dir_and_name(args.model, args.name)
    models = [("dense", model_dir), ("cospadi", args.checkpoint)]
    envs: dict[str, dict[str, str]] = {}  # label → extra environment of its server
    for option, values in (("--also", args.also), ("--kernel", args.kernel)):
        for value in values:
            label, _, target = value.partition("=")
            if not target or label in dict(models):
                parser.error(f"{option} {value}: expected LABEL={option[2:].upper()} with a new label")
            models.append((label, Path(target) if option == "--also" else args.checkpoint))
            if option == "--kernel":
                envs[label] = {"COSPADI_KERNEL": target}
    for _, path in models:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: no config.json there (expected a model or checkpoint directory)")
    args.out.mkdir(parents=True, exist_ok=True)
    rounds, memory = [], {}
    try:
        for _ in range(args.rounds):
            rounds.append({label: bench_one(label, path, args, name, envs.get(label, {})) for label, path in models})
        if not args.no_memory:
            for label, path in models:
                print(f"== {label}: weight memory as loaded by vLLM ({args.dtype})", flush=True)
                memory[label] = run_isolated(path, args.dtype, tp=1, env=envs.get(label))
                memory[label]["model"] = label
    except (ServerError, subprocess.CalledProcessError, RuntimeError) as err:
        print(f"serve_bench: error: {err}", file=sys.stderr)
        return 1
    lines = [
        f"# Serving benchmark — {name}",
        "",
        f"`vllm bench serve --dataset-name random`: {args.num_prompts} prompts, {args.input_len} input / "
        f"{args.output_len} output tokens (ignore EOS), max concurrency {args.max_concurrency}, seed 0; "
        f"server config {'single-gpu' if args.gpu else 'cpu-demo'}.yaml with --dtype {args.dtype}; all runs back "
        f"to back on one machine ({platform_line()}).",
        "",
        "| model | " + " | ".join(title for _, title in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    ratios = [r["cospadi"]["output_throughput"] / r["dense"]["output_throughput"] for r in rounds]
    median_round = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]
    results = rounds[median_round]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r.get(key, float('nan')):.2f}" for key, _ in METRICS) + " |")
    lines += ["", f"CoSpaDi / dense output throughput: {ratios[median_round]:.2f}×"]
    if len(rounds) > 1:
        lines[-1] += (f" (the median of {len(rounds)} rounds, dense and CoSpaDi alternating; every round: "
                      + ", ".join(f"{x:.3f}" for x in ratios) + "; the table shows that round)")
    for label, _ in models[2:]:
        also = [r[label]["output_throughput"] / r["dense"]["output_throughput"] for r in rounds]
        served = f" (the cospadi checkpoint with COSPADI_KERNEL={envs[label]['COSPADI_KERNEL']})" if label in envs else ""
        lines += ["", f"{label}{served} / dense output throughput, every round: " + ", ".join(f"{x:.3f}" for x in also)
                  + f" (median {sorted(also)[len(also) // 2]:.3f})"]
    for label, _ in models:  # vLLM's result files: the median round's
        (args.out / f"serve-{name}-{label}.json").write_text(json.dumps(results[label], indent=1))
    if memory:
        dense, cospadi = (memory[label]["ranks"][0] for label in ("dense", "cospadi"))
        lines += ["", "## Weight memory as loaded (`cospadi-vllm memory`)", "", memory_table(list(memory.values())), "",
                  f"CoSpaDi / dense weight bytes: whole model {cospadi['total'] / dense['total']:.3f}×, "
                  f"linear layers {cospadi['cospadi_linear'] / dense['dense_linear']:.3f}×. "
                  "vLLM's CPU runner logs no \"Model loading took\" figure (only its GPU runner does); the "
                  "byte counts are every parameter and buffer of the loaded model, plus, for dense linear "
                  "weights handed to vLLM's CPU GEMM (`.weight` left empty), rows × columns × dtype bytes (the "
                  "packed copy holds as many)."]
        (args.out / f"serve-{name}-memory.json").write_text(json.dumps(memory, indent=1))
    table = "\n".join(lines) + "\n"
    (args.out / f"serve-{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
