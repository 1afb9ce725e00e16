"""What a checkpoint holds, read from its safetensors headers alone (no tensor data is read).

Used before any weight is loaded: by ``cospadi-vllm check``, by the vLLM plugin when vLLM reads the
quantization config, by the transformers quantizer, and by the compressor on its source model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cospadi_vllm.format import FormatError

# safetensors' dtype names → torch dtypes (those a checkpoint of this project can hold).
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "I64": torch.int64, "F64": torch.float64,
}

TensorInfo = tuple[torch.dtype | str, tuple[int, ...]]  # (dtype, or its safetensors name if unknown; shape)


def read_header(path: Path | str) -> tuple[int, dict]:
    """(header length in bytes, parsed JSON header) of one safetensors file; FormatError if unreadable."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        size = int.from_bytes(size_bytes, "little")
        try:
            return size, json.loads(f.read(size))
        except ValueError as err:
            raise FormatError(f"{path}: unreadable safetensors header ({err})") from err


def header_tensors(header: dict) -> dict[str, TensorInfo]:
    """{tensor name: (dtype, shape)} of a parsed safetensors header."""
    return {name: (DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


def read_tensor_infos(files) -> dict[str, TensorInfo]:
    """{tensor name: (dtype, shape)} over safetensors files."""
    found = {}
    for path in files:
        found.update(header_tensors(read_header(path)[1]))
    return found


def file_problems(path: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Tensors of one safetensors file and its problems (unreadable header, data shorter than the header says)."""
    try:
        header_len, header = read_header(path)
        size_bytes = path.stat().st_size
    except (OSError, FormatError) as err:
        return {}, [f"{path.name}: {err}"]
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    tensors = header_tensors(header)
    if 8 + header_len + end > size_bytes:
        return tensors, [f"{path.name}: truncated ({size_bytes} bytes, its header needs {8 + header_len + end})"]
    return tensors, []
