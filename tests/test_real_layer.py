"""On a real SmolLM2-135M layer with real calibration activations: CoSpaDi ≤ SVD-LLM at equal bytes.

Layer 3, CR 0.3 real bytes, int8, default settings (structure search, T = 8), whitened error after
quantization; both methods must fit the same byte budget (benchmarks/results/NOTES.md items 10–12).
"""

import pytest

from cospadi_vllm import format as fmt
from offline_compress.layer import LayerSettings, compress_linear
from offline_compress.layer_problems import real_layer_problems


@pytest.fixture(scope="module")
def problems(smollm2_dir):
    """8 × 256 tokens of the first 200 k characters of the calibration split, the layers before 3 dense."""
    return real_layer_problems(smollm2_dir, [3], ["self_attn.q_proj", "self_attn.o_proj"], 8, 256, 200_000)


@pytest.mark.parametrize("name", ["self_attn.q_proj", "self_attn.o_proj"])
def test_cospadi_beats_svd_llm_at_equal_bytes(problems, name):
    weight, gram = problems[f"3.{name}"]
    out_features, in_features = weight.shape
    results = {}
    for method in ("cospadi", "svd-llm"):
        result = compress_linear(weight, gram, 0.3, LayerSettings(method=method))
        assert fmt.stored_bytes(result.shape, "int8") <= 0.7 * fmt.dense_bf16_bytes(in_features, out_features)
        assert result.whitened_rel_error <= 1.05 * result.unquantized_rel_error  # quantization costs ≤ 5 %
        results[method] = result.whitened_rel_error
    assert 0 < results["cospadi"] <= results["svd-llm"], results
