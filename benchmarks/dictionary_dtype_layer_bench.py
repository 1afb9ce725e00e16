"""Per-layer CPU time of CoSpaDi layers whose dictionaries are stored in different dtypes, split into x·D and Z·C.

Loads a few modules of checkpoints of the same model (e.g. SmolLM2 at CR 0.3 with ``--dictionary-dtype int4``,
``int8`` and the default bf16 dictionary), puts each behind the CPU kernel seam (what vLLM and transformers
call) with the activation dtype vLLM would serve here (bfloat16 on CPUs with bf16 matrix instructions,
float32 otherwise) and one thread (what vLLM's CPU worker gets on this 2-core machine), and times
apply / x·D / Z·C at M = 1 and 8 rows, the checkpoints alternating module by module.

    python benchmarks/dictionary_dtype_layer_bench.py int8=INT8_D_CHECKPOINT bfloat16=BF16_D_CHECKPOINT
    python benchmarks/dictionary_dtype_layer_bench.py int4=./d4 bfloat16=./bf16 --out results/dictionary-dtype-layers-avx2.json

Writes benchmarks/results/dictionary-dtype-layers.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cospadi_vllm import format as fmt  # noqa: E402
from cospadi_vllm.kernels import KernelConfig, choose_kernel, merge_shards  # noqa: E402
from cospadi_vllm.kernels.cpu_library import has_bf16_matmul  # noqa: E402
from tests.reference import HeldLayer  # noqa: E402

MODULES = ("model.layers.5.self_attn.q_proj", "model.layers.5.mlp.gate_proj", "model.layers.5.mlp.down_proj")
RESULTS = Path(__file__).parent / "results"


def microseconds(call, repeats: int = 300) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def time_module(checkpoint: Path, module: str, rows: int, act_dtype: torch.dtype) -> dict:
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as fh:
        shard = {s: fh.get_tensor(f"{module}.{s}") for s in fmt.TENSOR_SUFFIXES if f"{module}.{s}" in fh.keys()}
    layer = HeldLayer.of(merge_shards([shard]))
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, shard[fmt.COEF_VALUES].dtype,
                                        shard[fmt.DICTIONARY].dtype))
    kernel.process_weights_after_loading(layer)
    # SmolLM2's widths are multiples of 8, so a 4-bit D's packed rows × 8 is its input width exactly
    in_features = shard[fmt.DICTIONARY].shape[0] * fmt.dictionary_storage(shard[fmt.DICTIONARY].dtype).per_byte
    x = torch.randn(rows, in_features).to(act_dtype)
    z = kernel.dictionary_product(layer, x)
    return {"dictionary_dtype": qc["dictionary_dtype"], "k": qc["modules"][module]["k"], "s": qc["modules"][module]["s"],
            "dictionary_bytes": shard[fmt.DICTIONARY].numel() * shard[fmt.DICTIONARY].element_size(),
            "apply_us": microseconds(lambda: kernel.apply(layer, x)),
            "x_dot_d_us": microseconds(lambda: kernel.dictionary_product(layer, x)),
            "z_dot_c_us": microseconds(lambda: kernel.coefficient_product(layer, z))}


def labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not (Path(path) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=CHECKPOINT_DIR with a config.json")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=labelled, metavar="LABEL=CHECKPOINT")
    parser.add_argument("--act-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 where this CPU multiplies it in hardware, float32 otherwise")
    parser.add_argument("--out", type=Path, default=RESULTS / "dictionary-dtype-layers.json")
    args = parser.parse_args(argv)
    act = args.act_dtype if args.act_dtype != "auto" else "bfloat16" if has_bf16_matmul() else "float32"
    torch.set_num_threads(1)
    results = {}
    for module in MODULES:
        for rows in (1, 8):
            for label, checkpoint in args.checkpoints:
                key = f"{label} {module} M={rows}"
                results[key] = {k: round(v, 1) if isinstance(v, float) else v
                                for k, v in time_module(checkpoint, module, rows, getattr(torch, act)).items()}
                print(key, results[key], flush=True)
    args.out.write_text(json.dumps({"threads": 1, "activations": act, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
