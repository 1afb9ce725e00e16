"""The GPU op inside CUDA graphs and torch.compile: capture, replay with new inputs, equal to eager.

Needs a CUDA GPU (skipped without one: graphs cannot be captured on CPU); runs without vLLM.
"""

import pytest
import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.hf_quantizer import CoSpaDiLinear
from offline_compress.quantization import encode_coefficients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


def cospadi_linear(in_features: int, out_features: int, k: int, s: int, value_dtype: str, seed: int) -> CoSpaDiLinear:
    """A transformers CoSpaDiLinear on the GPU with random D and C (random supports of s atoms)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out_features)])
    tensors = encode_coefficients(idx, torch.randn(out_features, s, generator=g), k, value_dtype)
    module = CoSpaDiLinear(in_features, out_features, k, s, fmt.value_dtype_from_name(value_dtype), None, "cpu")
    module.dictionary.copy_(torch.randn(in_features, k, generator=g) / in_features**0.5)
    for name in (fmt.COEF_MASK, fmt.COEF_VALUES, fmt.COEF_SCALES):
        getattr(module, name).copy_(tensors[name])
    module = module.cuda()
    module.prepare(torch.bfloat16)  # kernel chosen and C repacked now, not inside the first forward
    return module


def replays_match_eager(fn, static_input: torch.Tensor, fresh_inputs: list[torch.Tensor]) -> None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compiles, the layer repacks) outside the capture
        for _ in range(2):
            fn(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn(static_input)
    previous = None
    for x in fresh_inputs:
        static_input.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        eager = fn(x)
        assert torch.isfinite(static_output).all()
        # Same kernels on the same inputs: equal up to cuBLAS picking another algorithm for x·D in capture.
        limit = 1e-6 if x.dtype == torch.float32 else 1e-3
        assert relative_difference(static_output, eager) < limit
        if previous is not None:  # the replay read the new input
            assert relative_difference(static_output, previous) > 0.1
        previous = static_output.clone()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("m", [1, 4, 16, 64, 600])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_layer_in_cuda_graph_equals_eager(m, x_dtype):
    layer = cospadi_linear(512, 1536, 700, 350, "int8", seed=m)
    g = torch.Generator(device="cuda").manual_seed(m)
    fresh = [torch.randn(m, 512, generator=g, device="cuda").to(x_dtype) for _ in range(3)]
    replays_match_eager(layer, torch.randn(m, 512, device="cuda").to(x_dtype), fresh)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_layer_under_torch_compile_in_cuda_graph(m):
    """torch.compile sees the layer's Z·C op through its fake impl (fullgraph: no graph break); the
    compiled function is then captured and replayed like vLLM's piecewise CUDA graphs."""
    layer = cospadi_linear(256, 640, 300, 150, "float8_e4m3fn" if torch.cuda.get_device_capability() >= (8, 9)
                           else "bfloat16", seed=10 + m)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return layer(x) * 2.0

    compiled = torch.compile(forward, fullgraph=True, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(m)
    fresh = [torch.randn(m, 256, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3)]
    for x in fresh:
        assert relative_difference(compiled(x), forward(x)) < 1e-2
    replays_match_eager(compiled, torch.randn(m, 256, device="cuda").to(torch.bfloat16), fresh)
