"""Read a CoSpaDi checkpoint back as a plain dense transformers model (Wᵀ = D·C per layer).

Used by tests and the quality benchmark as the independent reference for the vLLM plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress.export import iter_file_tensors, source_safetensors


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """→ (config dict, plain tensors {name: tensor}, compressed {prefix: {suffix: tensor}}).

    Modules that share a dictionary all map ``dictionary`` to the one stored tensor."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    qc = fmt.parse_quantization_config(config.get("quantization_config", {}))
    modules = qc["modules"]
    plain: dict[str, torch.Tensor] = {}
    compressed: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in modules}
    found = {}
    for name, tensor in iter_file_tensors(source_safetensors(checkpoint_dir)):
        found[name] = (tensor.dtype, tuple(tensor.shape))
        prefix, _, suffix = name.rpartition(".")
        if prefix in modules and suffix in fmt.TENSOR_SUFFIXES:
            compressed[prefix][suffix] = tensor
        else:
            plain[name] = tensor
    for prefix, spec in modules.items():
        value_dtype, dictionary_dtype = fmt.module_dtypes(spec)
        owner = fmt.dictionary_owner(modules, prefix)
        # in/out come from the tensors themselves; a missing one is reported by layer_problems.
        dictionary, scales = compressed[owner].get(fmt.DICTIONARY), compressed[prefix].get(fmt.COEF_SCALES)
        rows_to_inputs = fmt.dictionary_storage(dictionary_dtype).per_byte  # a 4-bit D packs 8 inputs per row
        shape = fmt.LayerShape(dictionary.shape[0] * rows_to_inputs if dictionary is not None else -1,
                               scales.shape[0] if scales is not None else -1, spec["k"], spec["s"])
        problems = fmt.layer_problems(prefix, found, shape, value_dtype, dictionary_dtype, owner)
        if problems:
            raise fmt.FormatError(problems[0])
    for prefix in modules:  # a shared dictionary is stored once: every member of the group gets that tensor
        compressed[prefix].update(fmt.dictionary_tensors(compressed[fmt.dictionary_owner(modules, prefix)]))
    return config, plain, compressed


def reconstructed_state_dict(checkpoint_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """→ (config without quantization_config, state dict with ``<prefix>.weight`` = (D·C)ᵀ in float32)."""
    config, plain, compressed = read_checkpoint(checkpoint_dir)
    modules = config.pop("quantization_config")["modules"]
    state = dict(plain)
    for prefix, tensors in compressed.items():
        state[f"{prefix}.weight"] = codec.reconstruct_weight_t(tensors, modules[prefix]["k"]).T.contiguous()
    return config, state


def load_reconstructed_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers CausalLM whose compressed linears hold the dense reconstruction."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict, state = reconstructed_state_dict(checkpoint_dir)
    config_dict.pop("dtype", None)
    config_dict.pop("torch_dtype", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise fmt.FormatError(f"checkpoint tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()
