"""Per-layer CPU time of int8-dictionary vs bf16-dictionary CoSpaDi layers, split into x·D and Z·C.

Loads a few modules of two checkpoints of the same model (e.g. SmolLM2 at CR 0.3 with
``--dictionary-dtype int8`` and with the default bf16 dictionary), puts each behind the CPU kernel seam
(what vLLM and transformers call) with bfloat16 activations and one thread (what vLLM's CPU worker gets on
this 2-core machine), and times apply / x·D / Z·C at M = 1 and 8 rows.

    python benchmarks/dictionary_dtype_layer_bench.py INT8_D_CHECKPOINT BF16_D_CHECKPOINT

Writes benchmarks/results/dictionary-dtype-layers.json.
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
from tests.reference import HeldLayer  # noqa: E402

MODULES = ("model.layers.5.self_attn.q_proj", "model.layers.5.mlp.gate_proj", "model.layers.5.mlp.down_proj")
RESULTS = Path(__file__).parent / "results"


def microseconds(call, repeats: int = 300) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def time_module(checkpoint: Path, module: str, rows: int) -> dict:
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as fh:
        shard = {s: fh.get_tensor(f"{module}.{s}") for s in fmt.TENSOR_SUFFIXES if f"{module}.{s}" in fh.keys()}
    layer = HeldLayer.of(merge_shards([shard]))
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), torch.bfloat16, shard[fmt.COEF_VALUES].dtype,
                                        shard[fmt.DICTIONARY].dtype))
    kernel.process_weights_after_loading(layer)
    x = torch.randn(rows, shard[fmt.DICTIONARY].shape[0]).to(torch.bfloat16)
    z = kernel.dictionary_product(layer, x)
    return {"dictionary_dtype": qc["dictionary_dtype"], "k": qc["modules"][module]["k"], "s": qc["modules"][module]["s"],
            "dictionary_bytes": shard[fmt.DICTIONARY].numel() * shard[fmt.DICTIONARY].element_size(),
            "apply_us": microseconds(lambda: kernel.apply(layer, x)),
            "x_dot_d_us": microseconds(lambda: kernel.dictionary_product(layer, x)),
            "z_dot_c_us": microseconds(lambda: kernel.coefficient_product(layer, z))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("int8_checkpoint", type=Path)
    parser.add_argument("bf16_checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "dictionary-dtype-layers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for label, checkpoint in (("int8", args.int8_checkpoint), ("bfloat16", args.bf16_checkpoint)):
        for module in MODULES:
            for rows in (1, 8):
                key = f"{label} {module} M={rows}"
                results[key] = {k: round(v, 1) if isinstance(v, float) else v
                                for k, v in time_module(checkpoint, module, rows).items()}
                print(key, results[key], flush=True)
    args.out.write_text(json.dumps({"threads": 1, "activations": "bfloat16", "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
