"""Triton kernel vs a float64 reference of X·D·dequant(C).

Collected through tests/test_triton_kernel.py: on a CUDA machine directly (compiled kernel); without a
GPU in a child pytest with TRITON_INTERPRET=1, because Triton picks the interpreter when its modules
are first imported and other tests import Triton (through vLLM/torch) long before this file runs.
"""

import os

import pytest
import torch

from cospadi_vllm import format as fmt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "without a GPU run these through test_triton_kernel.py"
    import cospadi_vllm.triton_kernels as module

    return module


def random_layer(shards, in_features, value_dtype, generator):
    """A merged layer of len(shards) shards (k, out, s) with random D and random supports/values.

    Returns the kernel's tensors and the float64 dense Wᵀ [in, out] they encode.
    """
    s_max = max(s for _, _, s in shards)
    words = max(fmt.mask_words(k) for k, _, _ in shards)
    parts = {"dictionary": [], "mask": [], "values": [], "scales": [], "offsets": [], "dense": []}
    k_offset = 0
    for k, out, s in shards:
        idx = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(out)])
        tensors = fmt.encode_coefficients(idx, torch.randn(out, s, generator=generator), k, value_dtype)
        dictionary = torch.randn(in_features, k, generator=generator).to(fmt.DICTIONARY_DTYPE)
        coef = fmt.decode_coefficients(tensors[fmt.COEF_MASK], tensors[fmt.COEF_VALUES], tensors[fmt.COEF_SCALES], k)
        parts["dictionary"].append(dictionary)
        parts["mask"].append(torch.nn.functional.pad(tensors[fmt.COEF_MASK], (0, words - tensors[fmt.COEF_MASK].shape[1])))
        parts["values"].append(torch.cat([tensors[fmt.COEF_VALUES], tensors[fmt.COEF_VALUES][:, :1].expand(out, s_max - s)], 1))
        parts["scales"].append(tensors[fmt.COEF_SCALES])
        parts["offsets"].append(torch.full((out,), k_offset, dtype=torch.int32))
        parts["dense"].append(dictionary.double() @ coef.double())
        k_offset += k
    layer = {
        "dictionary": torch.cat(parts["dictionary"], 1),
        "coef_mask": torch.cat(parts["mask"], 0),
        "coef_values": torch.cat(parts["values"], 0),  # padding holds real values: must not be read
        "coef_scales": torch.cat(parts["scales"], 0),
        "atom_offsets": torch.cat(parts["offsets"], 0),
    }
    return {name: t.to(DEVICE) for name, t in layer.items()}, torch.cat(parts["dense"], 1)


# bf16 rounds Z = X·D and Y to 8 significant bits (relative 2⁻⁹ per entry, errors of random sign
# add in quadrature), fp16 to 11: relative Frobenius error bounds with ~3× margin.
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("value_dtype", ["int8", "float8_e4m3fn", "bfloat16"])
@pytest.mark.parametrize("m", [1, 3, 17, 130])
def test_kernel_matches_float64_reference(kernels, value_dtype, m):
    g = torch.Generator().manual_seed(m)
    layer, dense_t = random_layer([(150, 50, 61)], 40, value_dtype, g)  # k=150 (5 mask words, several K steps), out=50
    for x_dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, 40, generator=g).to(x_dtype).to(DEVICE)
        out = torch.full((m, 50), float("nan"), dtype=x_dtype, device=DEVICE)  # poisoned: every entry must be written
        z = x @ layer["dictionary"].to(x_dtype)
        y = kernels.sparse_coef_matmul(
            z, layer["coef_mask"], layer["coef_values"], layer["coef_scales"], layer["atom_offsets"], x_dtype, out=out
        )
        assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        reference = x.double().cpu() @ dense_t
        error = float((out.double().cpu() - reference).norm() / reference.norm())
        assert error < TOLERANCE[x_dtype], (value_dtype, m, x_dtype, error)


@pytest.mark.parametrize("m", [1, 17, 130])
def test_merged_three_shards_with_different_k(kernels, m):
    g = torch.Generator().manual_seed(100 + m)
    shards = [(70, 40, 30), (33, 24, 8), (90, 70, 41)]  # q/k/v-like, k and out not multiples of 32/64
    layer, dense_t = random_layer(shards, 56, "int8", g)
    x = torch.randn(m, 56, generator=g).to(torch.bfloat16).to(DEVICE)
    y = kernels.cospadi_gemm_triton(x, **layer)
    assert y.shape == (m, 134) and torch.isfinite(y).all()
    reference = x.double().cpu() @ dense_t
    error = float((y.double().cpu() - reference).norm() / reference.norm())
    assert error < TOLERANCE[torch.bfloat16], error
    # Each shard on its own block of columns: a kernel reading another shard's atoms fails here.
    for lo, hi in ((0, 40), (40, 64), (64, 134)):
        block_error = (y[:, lo:hi].double().cpu() - reference[:, lo:hi]).norm() / reference[:, lo:hi].norm()
        assert float(block_error) < TOLERANCE[torch.bfloat16]


def test_block_shapes_cover_both_regimes(kernels):
    assert kernels.block_shape(1)[0] == 16 and kernels.block_shape(16)[0] == 16
    assert kernels.block_shape(2048)[0] >= 64
