"""Layer streaming: the model's skeleton lives on the meta device; weights are read from the source
safetensors one decoder layer at a time.

Only the embeddings (to compute the calibration inputs of layer 0) and the rotary embedding are
materialised for the whole run; a decoder layer is materialised on the compute device in float32
while it is calibrated and compressed, then sent back to meta. Peak weight memory is therefore one
decoder layer plus the embeddings, not the model (×2–3 as when the model was loaded whole in float32).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def return_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after each large free, so later tensors of up to ~32 MB come from
    heap arenas that are not returned on free: compressing SmolLM2 layer by layer then held ~1.2 GB
    above the post-import RSS although one layer (4 MB) was live (benchmarks/results/NOTES.md item 13).
    Trimming once per decoder layer keeps the RSS at what is live; a fixed small mmap threshold did too
    but made every temporary a fresh mapping (1.9× slower on gate_proj).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SafetensorsSource:
    """Which file holds each tensor of a model directory; reads tensors one at a time."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.location: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    self.location[name] = path

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.location if name.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file (the file is mapped only while reading it)."""
        with safe_open(str(self.location[name]), framework="pt") as fh:
            return fh.get_tensor(name).clone()


def skeleton_model(model_dir: Path) -> nn.Module:
    """The model built on the meta device (no weight memory), with its rotary embedding rebuilt on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:  # its inv_freq is a computed buffer, not a checkpoint tensor
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config=model.config)
    return model


def materialize(module: nn.Module, prefix: str, source: SafetensorsSource, device: torch.device,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Give every parameter of ``module`` the source tensor ``<prefix>.<name>``, on ``device``, in
    ``dtype`` (default: as stored). Nothing else is allocated: a meta module stays meta until here."""
    for name, param in list(module.named_parameters()):
        key = f"{prefix}.{name}"
        if key not in source.location:
            raise ValueError(f"source checkpoint has no tensor {key}")
        tensor = source.get(key)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"source tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype or tensor.dtype), requires_grad=False))
    return module


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to the meta device)."""
    module.to("meta")
