"""Write a CoSpaDi checkpoint: a normal HF directory plus quantization_config (DESIGN §3).

The directory is assembled in a temporary sibling and renamed into place, so OUT_DIR
either holds a complete checkpoint or does not exist.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cospadi_vllm import format as fmt

MAX_SHARD_BYTES = 2 * 1024**3
# Files of the source model directory that the checkpoint rewrites or must not carry over.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "compress_report.json"}


def source_safetensors(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weight files (only safetensors models are supported)")
    return files


def iter_source_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the source model's safetensors files, one at a time."""
    for path in source_safetensors(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path) -> int:
    """Write tensors as model-0000i-of-0000N.safetensors (+ index if N > 1); return total bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.contiguous()
        sizes[-1] += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
        return sizes[0]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(sizes)


def quantization_config(
    modules: dict[str, fmt.LayerShape], value_dtype: str, k_over_s: float, ratio: float, method: str
) -> dict:
    return {
        "quant_method": fmt.QUANT_METHOD,
        "format_version": fmt.FORMAT_VERSION,
        "value_dtype": value_dtype,
        "dictionary_dtype": "bfloat16",
        "k_over_s": k_over_s,
        "target_compression_ratio": ratio,
        "method": method,
        "modules": {name: {"k": shape.k, "s": shape.s} for name, shape in modules.items()},
        "ignore": ["lm_head"],
    }


def write_checkpoint(
    model_dir: Path,
    out_dir: Path,
    compressed: dict[str, dict[str, torch.Tensor]],
    qconfig: dict,
    report: dict,
    dtype: torch.dtype | None = None,
) -> None:
    """Assemble the checkpoint in a temp dir next to out_dir, then rename it into place.

    compressed: {module prefix: {format suffix: tensor}}; the source's ``<prefix>.weight`` of
    those modules is dropped, every other source tensor is copied (cast to ``dtype`` if given).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        dropped = {f"{prefix}.weight" for prefix in compressed}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in iter_source_tensors(model_dir):
                if name in dropped:
                    continue
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield name, tensor
            for prefix, layer_tensors in compressed.items():
                for suffix, tensor in layer_tensors.items():
                    yield f"{prefix}.{suffix}", tensor

        report["checkpoint_bytes"] = _write_shards(tensors(), tmp)
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = qconfig
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in _NOT_COPIED_NAMES and not path.name.endswith(_NOT_COPIED_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
