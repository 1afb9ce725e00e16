"""CPU decode/prefill step benchmark: every linear layer of a model, in model order, dense vs CoSpaDi.

For a dense HF model and its CoSpaDi checkpoint, it builds each decoder layer's merged qkv, o,
gate_up and down layers the way vLLM's CPU backend serves them with bf16 activations:
  dense    x · W through a prepacked oneDNN handle (vLLM's CPU dispatch for bf16 weights)
  cospadi  one call of the plugin's C++ op cospadi_cpu::linear, D held transposed, C as stored
and times all layers of one forward step in model order (weights come from DRAM, as in serving),
dense and CoSpaDi alternating, for several batch sizes M (M = 8: decode at concurrency 8; M = 1024:
the prefill of 8 prompts of 128 tokens). Attention, norms, sampling and the lm_head are not part of it
(they are the same for both models).

    python benchmarks/cpu_step_bench.py --checkpoint ./smollm2-cospadi          # dense = SmolLM2 from assets
    python benchmarks/cpu_step_bench.py --model DIR --checkpoint DIR --m 1 8 --threads 1

Default --threads 1: vLLM's CPU worker on this 2-core machine runs on one core (the other is
reserved for its engine process). Writes benchmarks/results/cpu-step-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors import safe_open

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import KernelConfig, choose_kernel, cpu_library, merge_shards
from offline_compress import assets

RESULTS = Path(__file__).parent / "results"
GROUPS = {  # vLLM's merged layers of a Llama / Qwen decoder layer, in execution order
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def dense_layer(weights: dict, prefixes: list[str], dtype: torch.dtype):
    from vllm import _custom_ops as ops

    w = torch.cat([weights[p + ".weight"] for p in prefixes]).to(dtype)  # [out, in]
    return ops.create_onednn_mm(w.t(), 32)


class Held(torch.nn.Module):
    """One merged layer's tensors under the names the kernels read, as vLLM's layer holds them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


def cospadi_layer(tensors: dict, prefixes: list[str], dtype: torch.dtype) -> tuple:
    """The merged layer as the plugin serves it on CPU: its tensors merged (D side by side, masks and values
    padded per row, shard offsets), the kernel chosen for ``dtype`` and the tensors laid out by it."""
    suffixes = (fmt.DICTIONARY, *fmt.COEF_SUFFIXES)
    merged = merge_shards([{suffix: tensors[f"{p}.{suffix}"] for suffix in suffixes} for p in prefixes])
    merged[fmt.COEF_SCALES] = merged[fmt.COEF_SCALES].float()
    layer = Held(merged)
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), dtype, merged[fmt.COEF_VALUES].dtype))
    kernel.process_weights_after_loading(layer)
    return layer, kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="dense HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="CoSpaDi checkpoint of that model")
    parser.add_argument("--name", help="name in the result files (default: smollm2 or the model directory name)")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 136, 1024], help="rows of x per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model and M (best and median kept)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="activations and dense weights; auto: bfloat16 where the CPU has bf16 matrix "
                             "instructions (AVX-512 BF16 / AMX), else float32 (what the serve command picks)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model_dir, name = assets.model_dir_and_name(args.model, args.name)
    torch.set_num_threads(args.threads)
    cpu_library.load()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if cpu_library.has_bf16_matmul() else "float32"
    dtype = getattr(torch, args.dtype)
    print(f"activations: {args.dtype}; CPU kernels: {cpu_library.vector_width() or 'portable'}-bit", flush=True)

    weights, tensors = read_tensors(model_dir), read_tensors(args.checkpoint)
    config = json.loads((args.checkpoint / "config.json").read_text())
    layers = range(config["num_hidden_layers"])
    names = {g: [[f"model.layers.{i}.{sub}.{m}" for m in mods] for i in layers] for g, (sub, mods) in GROUPS.items()}
    for per_layer in names.values():
        missing = [p for p in per_layer[0] if p + "." + fmt.COEF_MASK not in tensors]
        if missing:
            raise SystemExit(f"error: {args.checkpoint} does not compress {missing[0]} (this benchmark needs every "
                             f"q/k/v/o/gate/up/down layer compressed)")
    dense = {g: [dense_layer(weights, p, dtype) for p in per_layer] for g, per_layer in names.items()}
    cospadi = {g: [cospadi_layer(tensors, p, dtype) for p in per_layer] for g, per_layer in names.items()}
    in_features = {g: weights[f"{names[g][0][0]}.weight"].shape[1] for g in GROUPS}  # layer 0's first module
    del weights, tensors

    from vllm import _custom_ops as ops

    def dense_step(xs):
        for i in layers:
            for g in GROUPS:
                ops.onednn_mm(dense[g][i], xs[g], None)

    def cospadi_step(xs):  # what the vLLM layer's apply runs at TP = 1
        for i in layers:
            for g in GROUPS:
                layer, kernel = cospadi[g][i]
                kernel.apply(layer, xs[g])

    rows = []
    for m in args.m:
        xs = {g: torch.randn(m, in_features[g]).to(dtype) for g in GROUPS}
        times = {"dense": [], "cospadi": []}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for label, step in (("dense", dense_step), ("cospadi", cospadi_step)):
                start = time.perf_counter()
                step(xs)
                if repeat:
                    times[label].append((time.perf_counter() - start) * 1e3)
        best = {k: min(v) for k, v in times.items()}
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({"m": m, "dense_ms_best": best["dense"], "cospadi_ms_best": best["cospadi"],
                     "dense_ms_median": median["dense"], "cospadi_ms_median": median["cospadi"],
                     "ratio_best": best["cospadi"] / best["dense"], "ratio_median": median["cospadi"] / median["dense"]})
        print(f"M={m:5d}: dense {best['dense']:8.2f} ms, CoSpaDi {best['cospadi']:8.2f} ms (best of {args.repeats}); "
              f"CoSpaDi / dense time {rows[-1]['ratio_best']:.2f} (medians {rows[-1]['ratio_median']:.2f})", flush=True)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    md = [f"# CPU step benchmark — {name}", "",
          f"All {len(layers)} decoder layers' qkv, o, gate_up and down in model order, {args.dtype} activations, "
          f"{machine}, CPU kernels {cpu_library.vector_width() or 'portable'}-bit; dense through vLLM's prepacked oneDNN "
          f"handles, CoSpaDi through the plugin's CPU kernel (checkpoint `{args.checkpoint.name}`). Times per step; dense and CoSpaDi "
          f"alternate, best and median of {args.repeats}.", "",
          "| M | dense (ms) | CoSpaDi (ms) | CoSpaDi / dense (best) | (median) |", "|---|---|---|---|---|"]
    md += [f"| {r['m']} | {r['dense_ms_best']:.2f} | {r['cospadi_ms_best']:.2f} | {r['ratio_best']:.2f} | "
           f"{r['ratio_median']:.2f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    build = {"native": "", "x86-64-v3": "-avx2", "x86-64": "-portable"}.get(cpu_library.arch(), f"-{cpu_library.arch()}")
    stem = args.out / f"cpu-step-{name}{build}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "checkpoint": str(args.checkpoint),
                                                     "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
