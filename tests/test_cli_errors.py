"""Bad input: a one-line error naming the problem, exit code 2, and no OUT_DIR left behind."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline_compress.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def check_failed(code, message, out_dir, *needles):
    assert code == 2
    assert message.startswith("cospadi-compress: error:")
    for needle in needles:
        assert needle in message, message
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}*"))


def test_missing_model_dir(tmp_path, capsys):
    out = tmp_path / "out"
    check_failed(*run_cli([tmp_path / "nope", out], capsys), out, "does not exist", "nope")


def test_not_a_causal_lm(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, "BertModel", "not supported")


def test_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, "GPT2LMHeadModel")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(tiny_models, tmp_path, capsys, ratio):
    out = tmp_path / "out"
    check_failed(*run_cli([tiny_models["llama"], out, "--ratio", ratio], capsys), out, "--ratio")


@pytest.mark.parametrize("value", ["0.5", "1.5,0.5"])
def test_k_over_s_below_one(tiny_models, tmp_path, capsys, value):
    out = tmp_path / "out"
    check_failed(*run_cli([tiny_models["llama"], out, "--k-over-s", value], capsys), out, "--k-over-s")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_memory_must_be_positive(tiny_models, tmp_path, capsys, value):
    out = tmp_path / "out"
    check_failed(*run_cli([tiny_models["llama"], out, "--max-memory", value], capsys), out, "--max-memory")


def test_calibration_text_too_short(tiny_models, tmp_path, capsys):
    calib = tmp_path / "short.txt"
    calib.write_text("Only a few words of calibration text.")
    out = tmp_path / "out"
    code, message = run_cli([tiny_models["llama"], out, "--calib", calib, "--seq-len", "128"], capsys)
    check_failed(code, message, out, "calibration text has", "--seq-len 128")


def test_missing_calibration_file(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    check_failed(*run_cli([tiny_models["llama"], out, "--calib", tmp_path / "absent.jsonl"], capsys), out, "absent.jsonl")


def test_chat_calibration_needs_a_chat_template(tiny_models, tmp_path, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_models["llama"], model)
    (model / "chat_template.jinja").unlink()
    out = tmp_path / "out"
    check_failed(*run_cli([model, out, "--calib", "wikipedia-chat"], capsys), out, "wikipedia-chat", "chat template")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight(tiny_models, tmp_path, capsys, bad):
    model = tmp_path / "bad-model"
    shutil.copytree(tiny_models["llama"], model)
    tensors = load_file(str(model / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())  # the fixture is clean: the fault is ours
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, name, "NaN or Inf")


def test_existing_output_is_not_touched(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, message = run_cli([tiny_models["llama"], out], capsys)
    assert code == 2 and "already exists" in message
    assert (out / "keep.txt").read_text() == "user data"


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "offline_compress", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--ratio", "--method", "--k-over-s", "--value-dtype", "--iterations", "--calib", "--one-shot"):
        assert option in result.stdout




def test_invalid_config_json(tiny_models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, "config.json is not valid JSON")


def test_truncated_source_safetensors(tiny_models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, "model.safetensors: truncated")


def test_missing_tokenizer(tiny_models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    check_failed(*run_cli([model, out], capsys), out, "no usable tokenizer")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_bad_device_string(tiny_models, tmp_path, capsys, device):
    out = tmp_path / "out"
    check_failed(*run_cli([tiny_models["llama"], out, "--device", device], capsys), out, f"--device {device!r}")


def test_out_of_memory_names_the_layer(tiny_models, tmp_path, capsys, monkeypatch):
    """Running out of memory in a layer: one line naming the module and the memory option, exit 2, no
    OUT_DIR (the finished layers stay in .OUT.partial for the resumed run)."""
    from offline_compress import precision

    calls = {"n": 0}
    real = precision.compress_linear  # what the pipeline's compress_fused calls per module

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # layer 1's second module
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(precision, "compress_linear", failing)
    out = tmp_path / "out"
    code, message = run_cli([tiny_models["llama"], out, "--iterations", "1", "--calib-samples", "4",
                             "--seq-len", "64"], capsys)
    assert code == 2 and message.startswith("cospadi-compress: error: out of memory compressing model.layers.1.")
    assert "--max-memory" in message
    assert not out.exists()
    assert (tmp_path / ".out.partial" / "layer-00000.safetensors").is_file()  # resumable
