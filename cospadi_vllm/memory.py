"""What a model's weights take once vLLM has loaded them: ``cospadi-vllm memory MODEL [MODEL ...]``.

For each model it starts vLLM's offline engine in a fresh process (enforce-eager, small KV cache),
counts every parameter and buffer byte of the loaded model on every TP rank, and reads vLLM's own
"Model loading took … GiB" line (GPU runner only). On CPU, vLLM hands dense linear weights to
oneDNN / its packed GEMM and leaves ``.weight`` empty; those are counted from their shapes
(rows × columns × dtype bytes, what the packed copy holds) and reported separately so the total
stays honest. CoSpaDi layers keep every tensor they use as parameters and buffers.

    cospadi-vllm memory ./smollm2 ./smollm2-cospadi --dtype bfloat16 [--tp 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

LOADING_LINE = re.compile(r"Model loading took ([0-9.]+) GiB")


def count_weight_bytes(model) -> dict:
    """Parameter + buffer bytes of a loaded vLLM model on this rank (runs inside the worker)."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    from cospadi_vllm import format as fmt
    from cospadi_vllm.config import CoSpaDiLinearMethod

    def own_bytes(module: torch.nn.Module) -> int:
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    seen: set[int] = set()  # tied embeddings / lm_head share storage: count it once
    result = {"parameters_and_buffers": 0, "packed_from_shapes": 0, "cospadi_linear": 0,
              "dense_linear": 0, "other": 0, "cospadi_layers": {}}
    for name, module in model.named_modules():
        held = 0
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            held += t.numel() * t.element_size()
        result["parameters_and_buffers"] += held
        method = getattr(module, "quant_method", None)
        if isinstance(method, CoSpaDiLinearMethod):
            result["cospadi_linear"] += held
            stored = sum(
                fmt.stored_bytes(fmt.LayerShape(module.input_size, s.out_full, s.k, s.s), method.value_dtype_name,
                                 owns_dictionary=method.dictionary_owner is None,
                                 dictionary_dtype_name=method.dictionary_dtype_name)
                for s in method.layout.shards
            )
            result["cospadi_layers"][name] = {
                "held_bytes": held, "stored_bytes_tp1": stored,
                # layers of a shared-dictionary group hold the very same tensor
                "dictionary_data_ptr": module.dictionary.data_ptr(), "dictionary_numel": module.dictionary.numel(),
                "dictionary_dtype": str(module.dictionary.dtype).removeprefix("torch."),
                "dictionary_bytes": module.dictionary.numel() * module.dictionary.element_size(),
                "values_dtype": str(module.coef_values.dtype).removeprefix("torch."),
            }
        elif isinstance(module, LinearBase):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.numel() == 0:  # packed by vLLM's CPU GEMM dispatch
                rows = sum(getattr(module, "output_partition_sizes", [module.output_size_per_partition]))
                packed = rows * module.input_size_per_partition * weight.element_size()
                result["packed_from_shapes"] += packed
                result["dense_linear"] += held + packed
            else:
                result["dense_linear"] += held
        else:
            result["other"] += held
    result["total"] = result["parameters_and_buffers"] + result["packed_from_shapes"]
    return result


def measure(model: str, dtype: str, tp: int) -> dict:
    """Run in this process: load ``model`` in vLLM, return per-rank byte counts (list) and config."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    from vllm import LLM

    from cospadi_vllm import memory  # by module name: under `python -m` this file is __main__, unpicklable

    llm = LLM(model=model, dtype=dtype, max_model_len=512, enforce_eager=True, tensor_parallel_size=tp, seed=0)
    return {"ranks": llm.apply_model(memory.count_weight_bytes)}


def run_isolated(model: Path, dtype: str, tp: int, timeout: float = 900, env: dict[str, str] | None = None) -> dict:
    """``measure`` in a fresh process (one engine per process, ``env`` added to its environment); adds vLLM's
    loading figure(s)."""
    cmd = [sys.executable, "-m", "cospadi_vllm.memory", "--inner", str(model), "--dtype", dtype, "--tp", str(tp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"vLLM could not load {model} (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1])
    result["vllm_loading_gib"] = [float(x) for x in LOADING_LINE.findall(proc.stdout + proc.stderr)]
    result.update(model=str(model), dtype=dtype, tp=tp)
    return result


def table(results: list[dict]) -> str:
    head = ("| model | TP | vLLM \"Model loading took\" (GiB, per rank) | parameters + buffers (MB, rank 0) "
            "| + weights packed for vLLM's CPU GEMM (MB) | total (MB, rank 0) | CoSpaDi linears (MB) | dense linears (MB) |")
    rows = [head, "|" + "---|" * 8]
    for r in results:
        rank0 = r["ranks"][0]
        mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
        rows.append(f"| {r['model']} | {r['tp']} | {', '.join(f'{g:.2f}' for g in r['vllm_loading_gib']) or '-'} "
                    f"| {mb(rank0['parameters_and_buffers'])} | {mb(rank0['packed_from_shapes'])} "
                    f"| {mb(rank0['total'])} | {mb(rank0['cospadi_linear'])} | {mb(rank0['dense_linear'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cospadi-vllm memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model or CoSpaDi checkpoint directories")
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype vLLM loads with (default bfloat16)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--json", type=Path, help="also write the full result here")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(measure(str(args.models[0]), args.dtype, args.tp)), flush=True)
        return 0
    for path in args.models:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: no config.json there (expected a model or checkpoint directory)")
    try:
        results = [run_isolated(path, args.dtype, args.tp) for path in args.models]
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"cospadi-vllm memory: error: {err}", file=sys.stderr)
        return 1
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
