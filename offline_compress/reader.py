"""Read a CoSpaDi checkpoint back as a plain dense transformers model (Wᵀ = D·C per layer).

Used by tests and the quality benchmark as the independent reference for the vLLM plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    for name, tensor in iter_file_tensors(source_safetensors(checkpoint_dir)):
        prefix, _, suffix = name.rpartition(".")
        if prefix in modules and suffix in fmt.TENSOR_SUFFIXES:
            compressed[prefix][suffix] = tensor
        else:
            plain[name] = tensor
    value_dtype = fmt.value_dtype_from_name(qc["value_dtype"])
    for prefix in modules:  # a shared dictionary is stored once: every member of the group gets that tensor
        owner = fmt.dictionary_owner(modules, prefix)
        if owner != prefix:
            if fmt.DICTIONARY in compressed[prefix]:
                raise fmt.FormatError(f"tensor {prefix}.{fmt.DICTIONARY} is stored although {prefix} uses the "
                                      f"dictionary of {owner}")
            if fmt.DICTIONARY not in compressed[owner]:
                raise fmt.FormatError(f"module {prefix} uses the dictionary of {owner}, but the checkpoint is "
                                      f"missing tensor {owner}.{fmt.DICTIONARY}")
            compressed[prefix][fmt.DICTIONARY] = compressed[owner][fmt.DICTIONARY]
    for prefix, spec in modules.items():
        tensors = compressed[prefix]
        # in/out come from the tensors themselves; a missing one is reported by check_layer_tensors.
        in_features = tensors[fmt.DICTIONARY].shape[0] if fmt.DICTIONARY in tensors else -1
        out_features = tensors[fmt.COEF_SCALES].shape[0] if fmt.COEF_SCALES in tensors else -1
        shape = fmt.LayerShape(in_features, out_features, spec["k"], spec["s"])
        fmt.check_layer_tensors(prefix, compressed[prefix], shape, value_dtype)
    return config, plain, compressed


def reconstructed_state_dict(checkpoint_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """→ (config without quantization_config, state dict with ``<prefix>.weight`` = (D·C)ᵀ in float32)."""
    config, plain, compressed = read_checkpoint(checkpoint_dir)
    modules = config.pop("quantization_config")["modules"]
    state = dict(plain)
    for prefix, tensors in compressed.items():
        state[f"{prefix}.weight"] = fmt.reconstruct_weight_t(tensors, modules[prefix]["k"]).T.contiguous()
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
