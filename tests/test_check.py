"""Corrupted checkpoints: `cospadi-vllm check`, `cospadi-vllm serve` and vLLM's offline LLM each fail
with a line naming the tensor or field (never a raw torch / safetensors / KeyError traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cospadi_vllm.check import check_checkpoint

ROOT = Path(__file__).resolve().parent.parent
L0, L1 = "model.layers.0", "model.layers.1"


def _tensors(edit):
    def apply(directory: Path) -> None:
        path = directory / "model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return apply


def _config(edit):
    def apply(directory: Path) -> None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        edit(config["quantization_config"], config)
        path.write_text(json.dumps(config))
    return apply


def _flip_bit(t):
    mask = t[f"{L0}.self_attn.o_proj.coef_mask"]
    mask[3, 0] ^= 1  # s - 1 or s + 1 bits in row 3


def _padding_bit(k):
    def edit(t):
        mask = t[f"{L1}.mlp.down_proj.coef_mask"]
        word, bit = divmod(k, 32)  # position k: the first one past the dictionary
        mask[0, word] |= 1 << bit
    return edit


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])


def _missing_shard(directory: Path) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
    path.unlink()
    weight_map = {n: file for file, part in files.items() for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model-00002-of-00002.safetensors").unlink()


def _fused_group(directory: Path) -> None:
    """k_proj of layer 0 left dense (as if compression skipped it) while q/v are compressed."""
    name = f"{L0}.self_attn.k_proj"
    _config(lambda qc, c: qc["modules"].pop(name))(directory)

    def edit(t):
        for suffix in ("dictionary", "coef_mask", "coef_values", "coef_scales"):
            t.pop(f"{name}.{suffix}")
        t[f"{name}.weight"] = torch.randn(128, 256)
    _tensors(edit)(directory)


def variants(k_down: int) -> dict[str, tuple]:
    """name → (edit(directory), text the error must contain)."""
    shrink = {
        "dictionary-column-parallel": (f"{L0}.self_attn.q_proj.dictionary", lambda x: x[:, :-3]),
        "dictionary-row-parallel": (f"{L0}.self_attn.o_proj.dictionary", lambda x: x[:-1]),
        "coef_mask": (f"{L0}.mlp.gate_proj.coef_mask", lambda x: x[:, :-1]),
        "coef_values": (f"{L0}.mlp.up_proj.coef_values", lambda x: x[:, :-1]),
        "coef_scales": (f"{L1}.mlp.down_proj.coef_scales", lambda x: x[:-1]),
        "more-rows": (f"{L1}.self_attn.k_proj.coef_values", lambda x: torch.cat([x, x[:1]])),
    }
    out = {
        f"shape-{role}": (_tensors(lambda t, n=n, f=f: t.__setitem__(n, f(t[n]).contiguous())), f"tensor {n} has shape")
        for role, (n, f) in shrink.items()
    }
    out.update({
        "missing": (_tensors(lambda t: t.pop(f"{L1}.self_attn.v_proj.coef_values")),
                    f"missing tensor {L1}.self_attn.v_proj.coef_values"),
        "dtype": (_tensors(lambda t: t.__setitem__(f"{L0}.mlp.up_proj.coef_scales",
                                                   t[f"{L0}.mlp.up_proj.coef_scales"].to(torch.bfloat16))),
                  f"tensor {L0}.mlp.up_proj.coef_scales has dtype"),
        "bit-count": (_tensors(_flip_bit), f"{L0}.self_attn.o_proj.coef_mask does not have exactly"),
        "padding-bit": (_tensors(_padding_bit(k_down)), f"{L1}.mlp.down_proj.coef_mask has bits set at atom positions >= k"),
        "truncated": (_truncate, "model.safetensors: truncated"),
        "missing-shard": (_missing_shard, "names model-00002-of-00002.safetensors, which does not exist"),
        "stray-weight": (_tensors(lambda t: t.__setitem__(f"{L0}.mlp.up_proj.weight", torch.randn(512, 256))),
                         f"tensor {L0}.mlp.up_proj.weight is present next to the compressed tensors"),
        "value-dtype": (_config(lambda qc, c: qc.__setitem__("value_dtype", "int2")), "value_dtype 'int2'"),
        # The config says int4 values (packed, two per byte), the tensors hold int8 values.
        "value-int4": (_config(lambda qc, c: qc.__setitem__("value_dtype", "int4")),
                       f"tensor {L0}.self_attn.q_proj.coef_values has"),
        "format-version": (_config(lambda qc, c: qc.__setitem__("format_version", 99)), "format_version 99"),
        # The config says int8 dictionaries, the tensors are bfloat16 (and have no scales).
        "dictionary-int8": (_config(lambda qc, c: qc.__setitem__("dictionary_dtype", "int8")),
                            f"tensor {L0}.self_attn.q_proj.dictionary has dtype bfloat16, expected int8"),
        "dictionary-dtype": (_config(lambda qc, c: qc.__setitem__("dictionary_dtype", "int2")),
                             "dictionary_dtype 'int2' is not one of"),
        # The config says 4-bit dictionaries (int32-packed, grouped scales), the tensors are bfloat16.
        "dictionary-int4": (_config(lambda qc, c: qc.__setitem__("dictionary_dtype", "int4")),
                            f"tensor {L0}.self_attn.q_proj.dictionary has"),
        "fused-group": (_fused_group, "must be compressed together"),
    })
    return out


MASK_VARIANTS = ("bit-count", "padding-bit")  # found by reading the masks (check, serve, load), not headers


@pytest.fixture(scope="module")
def broken(tiny_checkpoints, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    source = tiny_checkpoints["llama"]
    k_down = json.loads((source / "config.json").read_text())["quantization_config"]["modules"][
        f"{L1}.mlp.down_proj"]["k"]
    assert k_down % 32, "the padding-bit variant needs k not a multiple of 32"
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (edit, needle) in variants(k_down).items():
        shutil.copytree(source, root / name)
        edit(root / name)
        out[name] = (root / name, needle)
    return out


def test_clean_checkpoint_passes(tiny_checkpoints):
    assert check_checkpoint(tiny_checkpoints["llama"]) == []


def test_check_function_names_each_problem(broken):
    for name, (directory, needle) in broken.items():
        problems = check_checkpoint(directory)
        assert any(needle in p for p in problems), (name, problems)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cospadi_vllm", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def _assert_one_line_errors(proc, needle, name):
    assert needle in proc.stderr, (name, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])


@pytest.mark.slow
def test_check_and_serve_commands_fail_naming_the_problem(broken):
    for name, (directory, needle) in broken.items():
        check = _cli("check", str(directory))
        assert check.returncode == 1, (name, check.stdout, check.stderr)
        _assert_one_line_errors(check, needle, name)
        serve = _cli("serve", str(directory), "--port", "0")
        assert serve.returncode == 2, (name, serve.stderr[-2000:])
        _assert_one_line_errors(serve, needle, name)


@pytest.mark.slow
def test_offline_llm_raises_format_error(broken, tiny_checkpoints):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}

    def run(dirs):
        proc = subprocess.run([sys.executable, "-m", "tests.llm_errors", *map(str, dirs)], capture_output=True,
                              text=True, timeout=900, cwd=ROOT, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, proc.stderr[-3000:]
        return json.loads(lines[-1])

    # Header-level problems fail when vLLM reads the quantization config: all in one process.
    header_variants = {n: v for n, v in broken.items() if n not in MASK_VARIANTS}
    results = run([d for d, _ in header_variants.values()])
    for name, (directory, needle) in header_variants.items():
        assert results[str(directory)].startswith("FormatError: ") and needle in results[str(directory)], (
            name, results[str(directory)])
    # Mask problems fail while the layer loads (one engine per process).
    for name in MASK_VARIANTS:
        directory, needle = broken[name]
        got = run([directory])[str(directory)]
        assert got.startswith("FormatError: ") and needle in got, (name, got)
