"""Layer streaming: the model's skeleton lives on the meta device; weights are read from the source
safetensors one decoder layer at a time.

Only the embeddings (to compute the calibration inputs of layer 0) and the rotary embedding are
materialised for the whole run; a decoder layer is materialised on the compute device in float32
while it is calibrated and compressed, then sent back to meta. Peak weight memory is therefore one
decoder layer plus the embeddings, not the model.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cospadi_vllm.safetensors_headers import file_problems
from offline_compress.calibration import LayerInputs, capture_layer_inputs
from offline_compress.export import source_safetensors
from offline_compress.options import CompressError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def validate_model_dir(model_dir: Path, out_dir: Path, overwrite: bool):
    """Check the source model and the output path before any work; return (config.json as a dict, tokenizer)."""
    if not model_dir.is_dir():
        raise CompressError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CompressError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CompressError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CompressError(f"{config_path} is not a JSON object")
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise CompressError(
            f"{model_dir}: architecture {architectures or config.get('model_type')} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise CompressError(f"{model_dir} is already quantized ({method}); compress an unquantized model")
    try:
        files = source_safetensors(model_dir)
    except FileNotFoundError as err:
        raise CompressError(str(err)) from None
    for path in files:
        problems = file_problems(path)[1]
        if problems:
            raise CompressError(f"{model_dir}/{problems[0]}")
    tokenizer = load_tokenizer(model_dir)
    if out_dir.exists() and not overwrite:
        raise CompressError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.resolve() == model_dir.resolve():
        raise CompressError("output directory must differ from the model directory")
    return config, tokenizer


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError… depending on what is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompressError(f"{model_dir}: no usable tokenizer ({first})") from None


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


def check_finite_weights(source: SafetensorsSource) -> None:
    """Raise CompressError naming the first tensor with NaN or Inf (reads one tensor at a time)."""
    for name in source.names():
        tensor = source.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressError(f"weight {name} in {source.location[name].name} contains NaN or Inf")


def materialize(module: nn.Module, prefix: str, source: SafetensorsSource, device: torch.device,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Give every parameter of ``module`` the source tensor ``<prefix>.<name>``, on ``device``, in
    ``dtype`` (default: as stored). Nothing else is allocated: a meta module stays meta until here.
    A missing or mis-shaped source tensor is a CompressError naming it."""
    for name, param in list(module.named_parameters()):
        key = f"{prefix}.{name}"
        if key not in source.location:
            raise CompressError(f"source checkpoint has no tensor {key}")
        tensor = source.get(key)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CompressError(f"source tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                                f"{tuple(param.shape)}")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype or tensor.dtype), requires_grad=False))
    return module


def first_layer_inputs(model: nn.Module, source: SafetensorsSource, input_ids: torch.Tensor, device: torch.device,
                       batch_size: int) -> LayerInputs:
    """The calibration inputs of decoder layer 0 for ``input_ids`` [samples, seq_len]: the embeddings are
    materialised on ``device`` only for this and released after."""
    embed = model.get_input_embeddings()
    materialize(embed, next(name for name, m in model.named_modules() if m is embed), source, device)
    if getattr(model.model, "rotary_emb", None) is not None:
        model.model.rotary_emb.to(device)
    inputs = capture_layer_inputs(model, input_ids.to(device), batch_size)
    release(embed)
    return inputs


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to the meta device)."""
    module.to("meta")
