"""CoSpaDi checkpoints in transformers (cospadi_vllm/hf_quantizer.py) against the dense rebuild."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import cospadi_vllm  # noqa: F401  (registers the quantizer)
from cospadi_vllm import format as fmt
from cospadi_vllm.hf_quantizer import CoSpaDiLinear
from offline_compress.reader import load_reconstructed_model
from tests.conftest import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_equal_dense_rebuild(tiny_checkpoints, arch):
    checkpoint = tiny_checkpoints[arch]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    modules = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["modules"]
    replaced = {name for name, m in model.named_modules() if isinstance(m, CoSpaDiLinear)}
    assert replaced == set(modules)
    state = model.state_dict()
    for name in replaced:  # no dense weight anywhere in a compressed module: not held, not saved
        module = model.get_submodule(name)
        held = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        assert held and not any(n.endswith("weight") for n in held), held
        assert f"{name}.weight" not in state and f"{name}.coef_mask" in state
    if arch == "qwen2":  # the biases came through (random, non-zero in the tiny model)
        assert float(model.model.layers[0].self_attn.q_proj.bias.abs().mean()) > 0.1
    reference = load_reconstructed_model(checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(len(arch)))
    with torch.no_grad():
        got, want = model(ids).logits.double(), reference(ids).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_save_pretrained_round_trips_compressed_tensors(tiny_checkpoints, tmp_path):
    assert_save_pretrained_round_trips(tiny_checkpoints["qwen2"], tmp_path)


def assert_save_pretrained_round_trips(checkpoint, tmp_path):
    """save_pretrained of the loaded model writes every compressed tensor byte-identical to the checkpoint."""
    AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(tmp_path)
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    config_before = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == config_before
    names = [n for n in before if n.rpartition(".")[0] in config_before["modules"]]
    assert names and all(n in after for n in names)
    for name in names:
        assert after[name].dtype == before[name].dtype, name
        assert after[name].view(torch.uint8).equal(before[name].view(torch.uint8)), name  # byte-identical
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, CoSpaDiLinear)


def _broken(checkpoint, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    edit(tensors)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda t: t.pop("model.layers.1.self_attn.v_proj.coef_values"),
         "missing tensor model.layers.1.self_attn.v_proj.coef_values"),
        (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.dictionary",
                                 t["model.layers.0.mlp.down_proj.dictionary"][:, :-3].contiguous()),
         r"tensor model.layers.0.mlp.down_proj.dictionary has shape \(512, \d+\), expected"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.coef_scales",
                                 t["model.layers.0.mlp.up_proj.coef_scales"].to(torch.bfloat16)),
         "tensor model.layers.0.mlp.up_proj.coef_scales has dtype bfloat16, expected float32"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.randn(512, 256)),
         "tensor model.layers.0.mlp.up_proj.weight is present next to the compressed tensors"),
    ],
    ids=["missing", "shape", "dtype", "stray-weight"],
)
def test_bad_checkpoint_fails_naming_the_tensor(tiny_checkpoints, tmp_path, edit, needle):
    broken = _broken(tiny_checkpoints["llama"], tmp_path, edit)
    with pytest.raises(fmt.FormatError, match=needle):
        AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)


def test_dictionary_dtype_disagreeing_with_the_tensors_fails_in_one_line(tiny_checkpoints, tmp_path):
    """A config saying int8 dictionaries over bfloat16 tensors: one line naming the first such tensor."""
    broken = tmp_path / "int8-dictionary"
    shutil.copytree(tiny_checkpoints["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["dictionary_dtype"] = "int8"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(fmt.FormatError, match=r"^tensor model\.layers\.\d+\.\w+\.\w+\.dictionary has dtype "
                                              r"bfloat16, expected int8$"):
        AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)


def test_mask_bits_are_checked_after_loading(tiny_checkpoints, tmp_path):
    def set_extra_bit(tensors):
        mask = tensors["model.layers.0.self_attn.o_proj.coef_mask"]
        mask[3, 0] = mask[3, 0] ^ 1  # one bit flipped: s - 1 or s + 1 bits in row 3

    broken = _broken(tiny_checkpoints["llama"], tmp_path, set_extra_bit)
    with pytest.raises(fmt.FormatError, match="model.layers.0.self_attn.o_proj.coef_mask does not have exactly"):
        AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)


def test_registration_is_idempotent():
    from cospadi_vllm.hf_quantizer import register

    register()
    register()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["cospadi"].__name__ == "CoSpaDiHfQuantizer"
