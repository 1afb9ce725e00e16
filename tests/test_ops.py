"""Torch path of the CoSpaDi GEMM on a merged layer (3 shards, different k and s) vs float64."""

import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.ops import cospadi_gemm_torch, expand_coefficients


def test_merged_three_shard_layer_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    in_features = 48
    shards = [(40, 13, 5), (70, 20, 11), (33, 9, 2)]  # (k, out, s): k not multiples of 32
    dictionaries, masks, values, scales, offsets, blocks = [], [], [], [], [], []
    k_offset = 0
    s_max = max(s for _, _, s in shards)
    words = max(fmt.mask_words(k) for k, _, _ in shards)
    for k, out, s in shards:
        idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out)])
        tensors = fmt.encode_coefficients(idx, torch.randn(out, s, generator=g), k, "int8")
        dictionary = torch.randn(in_features, k, generator=g).to(torch.bfloat16)
        dictionaries.append(dictionary)
        masks.append(torch.nn.functional.pad(tensors[fmt.COEF_MASK], (0, words - tensors[fmt.COEF_MASK].shape[1])))
        values.append(torch.nn.functional.pad(tensors[fmt.COEF_VALUES], (0, s_max - s)))
        scales.append(tensors[fmt.COEF_SCALES])
        offsets.append(torch.full((out,), k_offset, dtype=torch.int32))
        k_offset += k
        coef = fmt.decode_coefficients(tensors[fmt.COEF_MASK], tensors[fmt.COEF_VALUES], tensors[fmt.COEF_SCALES], k)
        blocks.append(dictionary.double() @ coef.double())  # this shard's Wᵀ, in float64
    x = torch.randn(17, in_features, generator=g)
    merged = [torch.cat(t, dim=d) for t, d in ((dictionaries, 1), (masks, 0), (values, 0), (scales, 0), (offsets, 0))]
    reference = x.double() @ torch.cat(blocks, dim=1)
    for dense in (torch.empty(0), expand_coefficients(*merged[1:], k_offset)):
        y = cospadi_gemm_torch(x, *merged, dense)
        assert y.shape == reference.shape and torch.isfinite(y).all()
        assert float((y.double() - reference).norm() / reference.norm()) < 1e-5


def test_dispatch_triton_on_gpu_torch_on_cpu():
    from cospadi_vllm.ops import cospadi_gemm_impl, gemm_backend

    assert gemm_backend(torch.device("cpu")) == "torch"
    assert gemm_backend(torch.device("cuda", 0)) == "triton"
    g = torch.Generator().manual_seed(1)
    k, out, s = 70, 45, 20
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out)])
    tensors = fmt.encode_coefficients(idx, torch.randn(out, s, generator=g), k, "int8")
    args = [torch.randn(40, k, generator=g).to(torch.bfloat16), tensors[fmt.COEF_MASK], tensors[fmt.COEF_VALUES],
            tensors[fmt.COEF_SCALES], torch.zeros(out, dtype=torch.int32)]
    x = torch.randn(5, 40, generator=g).to(torch.bfloat16)
    # The op body on CPU tensors is exactly the torch path.
    assert torch.equal(cospadi_gemm_impl(x, *args, torch.empty(0)), cospadi_gemm_torch(x, *args, torch.empty(0)))
    if torch.cuda.is_available():  # and on GPU tensors exactly the Triton kernel
        from cospadi_vllm.triton_kernels import cospadi_gemm_triton

        gpu = [t.cuda() for t in (x, *args)]
        assert torch.equal(cospadi_gemm_impl(*gpu, torch.empty(0, device="cuda")), cospadi_gemm_triton(*gpu))
