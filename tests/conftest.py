"""Shared fixtures: tiny random Llama/Qwen2/Qwen3 model directories and the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offline_compress import assets

TINY_ARCHS = ("llama", "qwen2", "qwen3")


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny causal LM of the given family, with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = dict(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    if arch == "qwen3":
        common["head_dim"] = 64
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init is N(0, 0.02): widen it so the tiny model's outputs are not flat
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
            elif name.endswith(".bias"):  # HF initialises biases to zero: a dropped bias would go unseen
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(assets.smollm2_dir()).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return assets.smollm2_dir()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, seed=i) for i, arch in enumerate(TINY_ARCHS)}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A real-text calibration file (a slice of the Wikipedia calibration split)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(assets.wikipedia_split("calibration")[:60_000])
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_models, calib_file, tmp_path_factory) -> dict[str, Path]:
    """CoSpaDi checkpoints of the tiny models with bfloat16 dictionaries (the float-D path; fast settings: one
    learning iteration). The compressor's default (int8 dictionaries) is ``int8_checkpoints``."""
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model

    root = tmp_path_factory.mktemp("cospadi-tiny")
    out = {}
    for arch in TINY_ARCHS:
        out[arch] = root / arch
        options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                                  dictionary_dtype="bfloat16")
        compress_model(tiny_models[arch], out[arch], options, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def int8_checkpoints(tiny_models, calib_file, tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama and Qwen2 (q/k/v biases) with int8 dictionaries, and Qwen2 with dictionaries shared by
    its two layers (--group-size 2)."""
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model

    root = tmp_path_factory.mktemp("cospadi-int8-dictionary")
    variants = {"llama": ("llama", 1), "qwen2": ("qwen2", 1), "qwen2-shared": ("qwen2", 2)}
    out = {}
    for name, (arch, group_size) in variants.items():
        out[name] = root / name
        options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                                  dictionary_dtype="int8", group_size=group_size)
        compress_model(tiny_models[arch], out[name], options, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def int4_checkpoints(tiny_models, calib_file, tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with int4 values (two per byte): Llama with a bfloat16 dictionary, and Qwen2 with
    int8 dictionaries shared by its two layers (--group-size 2), the stacked case."""
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model

    root = tmp_path_factory.mktemp("cospadi-int4-values")
    variants = {"llama": ("llama", 1, "bfloat16"), "qwen2-shared": ("qwen2", 2, "int8")}
    out = {}
    for name, (arch, group_size, dictionary_dtype) in variants.items():
        out[name] = root / name
        options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64, value_dtype="int4",
                                  dictionary_dtype=dictionary_dtype, group_size=group_size)
        compress_model(tiny_models[arch], out[name], options, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def int4_dictionary_checkpoints(tiny_models, calib_file, tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with 4-bit dictionaries (GPTQ layout): Llama with int8 values, and Qwen2 with the
    dictionaries shared by its two layers (--group-size 2) and int4 values — everything at 4 bits."""
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model

    root = tmp_path_factory.mktemp("cospadi-int4-dictionary")
    variants = {"llama": ("llama", 1, "int8"), "qwen2-shared": ("qwen2", 2, "int4")}
    out = {}
    for name, (arch, group_size, value_dtype) in variants.items():
        out[name] = root / name
        options = CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4, seq_len=64,
                                  value_dtype=value_dtype, dictionary_dtype="int4", group_size=group_size)
        compress_model(tiny_models[arch], out[name], options, log=lambda m: None)
    return out
