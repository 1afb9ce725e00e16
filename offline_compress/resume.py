"""Resumable runs: finished decoder layers are kept in ``.<OUT>.partial/`` until the checkpoint is written.

A run that stops (killed, out of memory, Ctrl-C) and is started again with the same model and the
same result-affecting options picks up after the last finished layer group; anything else starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offline_compress.export import source_safetensors
from offline_compress.options import CompressOptions


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _header_hash(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(min(size, 100 << 20))).hexdigest()[:16]


def fingerprint(options: CompressOptions, model_dir: Path) -> str:
    """Identifies a run for resuming: same model files and same result-affecting options.

    A file is identified by its size, mtime and a hash of its safetensors header (tensor names,
    dtypes, shapes, offsets): replacing the weights means writing the file again (new mtime), and
    a different model has a different header; hashing the data itself would read the whole model.
    """
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns, _header_hash(p)] for p in source_safetensors(model_dir)}
    payload = json.dumps({"model": str(model_dir.resolve()), "files": files, **options.affecting()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def open_partial(out_dir: Path, options: CompressOptions, model_dir: Path) -> Path:
    """The partial directory of this run: kept if an earlier run with the same fingerprint left it, else new."""
    partial = partial_dir(out_dir)
    stamp = partial / "run.json"
    run = fingerprint(options, model_dir)
    if partial.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("fingerprint") != run):
        shutil.rmtree(partial)  # left by a run with other options or other weights: not resumable
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": run, "options": asdict(options)}, default=str))
    return partial


def group_file(partial: Path, first_layer: int) -> Path:
    return partial / f"layer-{first_layer:05d}.safetensors"


def load_group(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A finished group's ({module: {suffix: tensor}}, {module: report entry})."""
    with safe_open(str(path), framework="pt") as fh:
        stats = json.loads(fh.metadata()["stats"])
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in fh.keys():
            prefix, suffix = name.rsplit(".", 1)
            tensors.setdefault(prefix, {})[suffix] = fh.get_tensor(name)
    return tensors, stats


def save_group(path: Path, tensors: dict[str, dict[str, torch.Tensor]], stats: dict) -> None:
    """Write a finished group atomically (a kill mid-write leaves no file that looks finished)."""
    flat = {f"{prefix}.{suffix}": t for prefix, group in tensors.items() for suffix, t in group.items()}
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={"stats": json.dumps(stats)})
    tmp.rename(path)


def differing_options(report: dict, model_dir: Path, options: CompressOptions) -> dict[str, tuple]:
    """{option: (in the report, asked for)} for every result-affecting option a finished run did differently."""
    defaults = CompressOptions().affecting()  # options a report predates were at their defaults then
    made = {**defaults, **report.get("options", {}), "model": report.get("model_dir")}
    asked = {**options.affecting(), "model": str(Path(model_dir).resolve())}
    return {k: (made.get(k), v) for k, v in asked.items() if made.get(k) != v}
