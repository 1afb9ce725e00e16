"""On a real SmolLM2-135M layer with real calibration activations: CoSpaDi ≤ SVD-LLM at equal bytes.

Layer 3, CR 0.3 real bytes, int8, default settings (structure search, T = 8), whitened error after
quantization; both methods must fit the same byte budget (benchmarks/results/NOTES.md items 10–12).
"""

import pytest
import torch

from cospadi_vllm import format as fmt
from offline_compress import assets
from offline_compress.calibration import capture_layer_inputs, decoder_layers, gram_key, run_layer
from offline_compress.layer import LayerSettings, compress_linear


@pytest.fixture(scope="module")
def layer_grams(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    stream = assets.tokenize_stream(tokenizer, assets.wikipedia_split("calibration")[:200_000])
    ids = assets.random_windows(stream, 8, 256, seed=0)
    inputs = capture_layer_inputs(model, ids, batch_size=8)
    layers = decoder_layers(model)
    for index in range(3):  # hidden states entering layer 3
        _, inputs.hidden = run_layer(layers[index], inputs, torch.device("cpu"))
    grams, _ = run_layer(layers[3], inputs, torch.device("cpu"), ["self_attn.q_proj", "self_attn.o_proj"])
    return layers[3], grams


@pytest.mark.parametrize("name", ["self_attn.q_proj", "self_attn.o_proj"])
def test_cospadi_beats_svd_llm_at_equal_bytes(layer_grams, name):
    layer, grams = layer_grams
    linear = layer.get_submodule(name)
    gram = grams[gram_key(name)]
    results = {}
    for method in ("cospadi", "svd-llm"):
        result = compress_linear(linear.weight.detach(), gram, 0.3, LayerSettings(method=method))
        assert fmt.stored_bytes(result.shape, "int8") <= 0.7 * fmt.dense_bf16_bytes(linear.in_features, linear.out_features)
        assert result.whitened_rel_error <= 1.05 * result.unquantized_rel_error  # quantization costs ≤ 5 %
        results[method] = result.whitened_rel_error
    assert 0 < results["cospadi"] <= results["svd-llm"], results
