"""Validate a CoSpaDi checkpoint without starting an engine: ``cospadi-vllm check CKPT``.

Checks, each problem reported on one line naming the field, file or tensor:
- config.json: readable JSON, ``quantization_config`` (method, format_version, value_dtype, modules' k/s);
- files: every ``*.safetensors`` header readable and its data complete (not truncated); with a shard
  index, every file it names exists and holds exactly the tensors the index assigns to it;
- per compressed module: the four tensors present with the shapes the model config implies and the
  stored dtypes, no dense ``<prefix>.weight`` beside them, and modules vLLM fuses (q/k/v, gate/up)
  compressed together;
- no stray compressed tensors of modules the config does not list;
- every mask (``masks=True``): exactly s set bits per row and none at positions >= k.

``cospadi-vllm serve`` runs it (with masks) before starting vLLM; the vLLM plugin runs the header part
(``masks=False``) when vLLM reads the quantization config, so ``LLM(...)`` / ``vllm serve`` fail with a
``FormatError`` naming the problem before any weight is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cospadi_vllm import format as fmt
from cospadi_vllm.safetensors_headers import file_problems


def module_dims(hf_config: dict, leaf: str) -> tuple[int, int] | None:
    """(in_features, out_features) of a Llama / Qwen2 / Qwen3 linear from config.json; None if unknown."""
    hidden = hf_config.get("hidden_size")
    heads = hf_config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return None
    head_dim = hf_config.get("head_dim") or hidden // heads
    kv = hf_config.get("num_key_value_heads") or heads
    inter = hf_config.get("intermediate_size")
    dims = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim), "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return dims.get(leaf)


def check_checkpoint(checkpoint: str | Path, masks: bool = True) -> list[str]:
    """All problems found in ``checkpoint`` (empty list: valid)."""
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        return [f"{checkpoint}: no config.json (not a model directory)"]
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as err:
        return [f"config.json: not valid JSON ({err})"]
    try:
        qc = fmt.parse_quantization_config(hf_config.get("quantization_config") or {})
    except fmt.FormatError as err:
        return [f"config.json quantization_config: {err}"]
    headers, where, problems = files_problems(checkpoint)
    if headers is None:
        return problems
    problems += module_problems(hf_config, qc, headers)
    if masks and not problems:
        problems += mask_problems(qc["modules"], where)
    return problems


def files_problems(checkpoint: Path) -> tuple[dict | None, dict[str, Path], list[str]]:
    """The checkpoint's tensors from its safetensors headers, the file holding each, and the problems of
    its files: shard index (files it names that are missing, tensors it misplaces), unreadable or
    truncated files. ``None`` tensors: nothing readable to check further."""
    headers: dict = {}
    where: dict[str, Path] = {}
    problems: list[str] = []
    index_path = checkpoint / "model.safetensors.index.json"
    files = sorted(checkpoint.glob("*.safetensors"))
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            return None, where, [f"{index_path.name}: unreadable ({err})"]
        for missing in sorted({f for f in weight_map.values() if not (checkpoint / f).is_file()}):
            problems.append(f"{index_path.name} names {missing}, which does not exist")
        files = sorted({checkpoint / f for f in weight_map.values() if (checkpoint / f).is_file()})
    elif not files:
        return None, where, [f"{checkpoint}: no *.safetensors files"]
    for path in files:
        file_headers, file_issues = file_problems(path)
        problems += file_issues
        for name, info in file_headers.items():
            headers[name] = info
            where[name] = path
    if weight_map is not None:
        for name, file in weight_map.items():
            if (checkpoint / file).is_file() and where.get(name) != checkpoint / file:
                problems.append(f"tensor {name}: {index_path.name} puts it in {file}, which does not hold it")
        for name, path in where.items():
            if name not in weight_map:
                problems.append(f"tensor {name} in {path.name} is not in {index_path.name}")
    return headers, where, problems


def module_problems(hf_config: dict, qc: dict, headers: dict) -> list[str]:
    """Every compressed module's tensors against the shapes the model config implies, fused groups
    compressed together, and no compressed tensors of modules the config does not list."""
    modules: dict[str, dict] = qc["modules"]
    problems: list[str] = []
    for name, spec in modules.items():
        value_dtype, dictionary_dtype = fmt.module_dtypes(spec)
        dims = module_dims(hf_config, name.rpartition(".")[2])
        owner = fmt.dictionary_owner(modules, name)
        if dims is None:  # unknown module kind: take the sizes from its own tensors
            dictionary = headers.get(f"{owner}.{fmt.DICTIONARY}")
            scales = headers.get(f"{name}.{fmt.COEF_SCALES}")
            dims = (dictionary[1][0] if dictionary else -1, scales[1][0] if scales else -1)
        shape = fmt.LayerShape(dims[0], dims[1], spec["k"], spec["s"])
        problems += fmt.layer_problems(name, headers, shape, value_dtype, dictionary_dtype, owner,
                                       fmt.dictionary_users(modules, name))
        problems += fused_group_problems(modules, name)
    for tensor in headers:
        prefix, _, suffix = tensor.rpartition(".")
        if suffix in fmt.TENSOR_SUFFIXES and prefix not in modules:
            problems.append(f"tensor {tensor} belongs to no module in quantization_config.modules")
    return problems


def fused_group_problems(modules: dict[str, dict], name: str) -> list[str]:
    """Modules vLLM fuses into one layer (``format.FUSED_MODULES``) must be compressed together, and share
    one other layer's dictionaries together or none."""
    members = fmt.fused_members(name)
    if len(members) == 1:
        return []
    missing = [member for member in members if member not in modules]
    if missing:
        return [f"quantization_config.modules has {name} but not {', '.join(missing)}: "
                "vLLM fuses them, so they must be compressed together"]
    if name != members[0]:
        return []
    owners = [fmt.dictionary_owner(modules, member) for member in members]
    if owners != fmt.fused_members(owners[0]):
        leaves = ", ".join(member.rpartition(".")[2] for member in members)
        return [f"{name.rpartition('.')[0]}: {leaves} use the dictionaries of {owners}; vLLM fuses them into one "
                "layer, so they must share one other layer's dictionaries together or none"]
    return []


def mask_problems(modules: dict[str, dict[str, int]], where: dict[str, Path]) -> list[str]:
    from safetensors import safe_open

    problems = []
    by_file: dict[Path, list[str]] = {}
    for name in modules:
        by_file.setdefault(where[f"{name}.{fmt.COEF_MASK}"], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                try:
                    fmt.check_mask_bits(name, f.get_tensor(f"{name}.{fmt.COEF_MASK}"), modules[name]["k"],
                                        modules[name]["s"])
                except fmt.FormatError as err:
                    problems.append(str(err))
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cospadi-vllm check", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--no-masks", action="store_true", help="headers and config only (skip reading the masks)")
    args = parser.parse_args(argv)
    problems = check_checkpoint(args.checkpoint, masks=not args.no_masks)
    for problem in problems:
        print(f"cospadi-vllm check: {args.checkpoint}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.checkpoint}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
