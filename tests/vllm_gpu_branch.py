"""vLLM's real linear layers served by the GPU kernel, on a machine without a GPU.

    TRITON_INTERPRET=1 COSPADI_KERNEL=triton python -m tests.vllm_gpu_branch CHECKPOINT DTYPE

Builds vLLM's own QKVParallelLinear, MergedColumnParallelLinear and RowParallelLinear layers of decoder
layer 0 of a (tiny Llama) CoSpaDi checkpoint with the ``cospadi`` quantization config, loads the stored
tensors through the method's create_weights and the layers' own weight loaders (shard ids q/k/v, 0/1),
runs process_weights_after_loading (the GPU kernel: C repacked into the GPU layout) and apply (the
Triton kernel, interpreted). Prints one JSON line: per layer, the relative error against float64 dense
math of the stored tensors, the kernel that served it and what the layer holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def build_layers(config: dict, quant_config, dtype: torch.dtype) -> dict:
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    prefix = "model.layers.0"
    torch.set_default_dtype(dtype)  # vLLM layers take params_dtype from the default dtype
    return {
        "qkv_proj": QKVParallelLinear(hidden, head_dim, heads, kv, bias=False, quant_config=quant_config,
                                      prefix=f"{prefix}.self_attn.qkv_proj"),
        "o_proj": RowParallelLinear(heads * head_dim, hidden, bias=False, quant_config=quant_config,
                                    prefix=f"{prefix}.self_attn.o_proj"),
        "gate_up_proj": MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=quant_config,
                                                   prefix=f"{prefix}.mlp.gate_up_proj"),
        "down_proj": RowParallelLinear(inter, hidden, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.mlp.down_proj"),
    }


ROWS = (1, 5, 17)
SHARDS = {  # vLLM layer → (checkpoint modules, the shard ids its weight loader takes)
    "qkv_proj": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["q", "k", "v"]),
    "o_proj": (["self_attn.o_proj"], [None]),
    "gate_up_proj": (["mlp.gate_proj", "mlp.up_proj"], [0, 1]),
    "down_proj": (["mlp.down_proj"], [None]),
}


def dense_reference(tensors: dict, module: str, in_features: int) -> torch.Tensor:
    """Wᵀ = D·C [in, out] in float64 from the stored tensors."""
    from tests.reference import reference_weight_t

    prefix = f"{module}."
    return reference_weight_t({name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)},
                              in_features)


def main(checkpoint: Path, dtype_name: str) -> dict:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from cospadi_vllm.config import CoSpaDiConfig

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    dtype = getattr(torch, dtype_name)
    result = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:0",
                                     backend="gloo")
        initialize_model_parallel(1, 1)
        quant_config = CoSpaDiConfig.from_config(config["quantization_config"])
        layers = build_layers(config, quant_config, dtype)
        generator = torch.Generator().manual_seed(0)
        for name, layer in layers.items():
            modules, shard_ids = SHARDS[name]
            for module, shard_id in zip(modules, shard_ids, strict=True):
                for param_name, param in layer.named_parameters():
                    stored = tensors[f"model.layers.0.{module}.{param_name}"]
                    args = () if shard_id is None else (shard_id,)
                    param.weight_loader(param, stored, *args)
            layer.quant_method.process_weights_after_loading(layer)
            dense = torch.cat([dense_reference(tensors, f"model.layers.0.{m}", layer.input_size) for m in modules], 1)
            errors = {}
            for rows in ROWS:  # decode (FMA, 16-row dot) and prefill tiles
                x = torch.randn(rows, layer.input_size, generator=generator).to(dtype)
                y, _ = layer(x)
                reference = x.double() @ dense
                errors[rows] = float((y.double() - reference).norm() / reference.norm()) \
                    if torch.isfinite(y).all() else float("inf")
            result[name] = {
                "kernel": type(layer.quant_method.kernel).__name__,
                "relative_error": errors,
                "held": {n: [list(t.shape), str(t.dtype)] for n, t in [*layer.named_parameters(),
                                                                      *layer.named_buffers()]},
            }
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
