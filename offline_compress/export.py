"""Write a CoSpaDi checkpoint: a normal HF directory plus quantization_config (docs/format.md).

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
from offline_compress.report import shapes

MAX_SHARD_BYTES = 2 * 1024**3
# Files of the source model directory that the checkpoint rewrites or must not carry over.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "compress_report.json"}


def source_safetensors(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weight files (only safetensors models are supported)")
    return files


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path) -> int:
    """Write tensors as model-0000i-of-0000N.safetensors (+ index if N > 1); return total bytes.

    Each shard is written as soon as it is full, so at most one shard (≤ MAX_SHARD_BYTES) is in memory.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out_dir / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > MAX_SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out_dir / "model.safetensors")
        return total
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        file_name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out_dir / file_name)
        weight_map.update({name: file_name for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def quantization_config(stats: dict[str, dict], options, dictionary_owners: dict[str, str]) -> dict:
    """config.json's quantization_config for a finished run (``stats``: its modules' report entries, ``options``:
    its CompressOptions): the format's fields, then how the checkpoint was made (informational). The checkpoint-wide
    storage types are the ones most modules store; a module storing others (the precision search's choice) names
    them in its entry."""
    k_over_s = options.learned_k_over_s
    dtypes = {prefix: (s.get("value_dtype", options.value_dtype), s.get("dictionary_dtype", options.dictionary_dtype))
              for prefix, s in stats.items()}
    pairs = list(dtypes.values())
    value_dtype, dictionary_dtype = max(pairs, key=pairs.count)
    return fmt.build_quantization_config(
        shapes(stats), value_dtype, dictionary_owners, dictionary_dtype, dtypes,
        # The k/s tried per module (the chosen k and s of each module are in ``modules``).
        k_over_s=k_over_s[0] if len(k_over_s) == 1 else list(k_over_s),
        target_compression_ratio=options.ratio,
        method=options.method,
        group_size=options.group_size,
        allocation=options.allocation,
    )


def iter_file_tensors(paths: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from safetensors files, one tensor at a time."""
    for path in paths:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def remove_stale_writes(out_dir: Path) -> None:
    """Delete ``.OUT.writing-*`` directories a killed earlier export left behind."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.writing-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_checkpoint(
    model_dir: Path,
    out_dir: Path,
    compressed_files: list[Path],
    qconfig: dict,
    report: dict,
    dtype: torch.dtype | None = None,
) -> None:
    """Assemble the checkpoint in a temp dir next to out_dir, then rename it into place.

    compressed_files: safetensors files of ``<prefix>.<format suffix>`` tensors (the compressor's
    per-layer partial files), read one tensor at a time; the source's ``<prefix>.weight`` of every
    module in ``qconfig["modules"]`` is dropped, every other source tensor is copied (cast to
    ``dtype`` if given).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        dropped = {f"{prefix}.weight" for prefix in qconfig["modules"]}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in iter_file_tensors(source_safetensors(model_dir)):
                if name in dropped:
                    continue
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield name, tensor
            yield from iter_file_tensors(compressed_files)

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
        if out_dir.exists():  # --overwrite: move the old one aside first, so a failure never loses both
            old = out_dir.parent / f".{out_dir.name}.writing-old"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
