"""Triton kernel (cospadi_vllm/kernels/triton_gemm.py) vs a float64 reference of X·D·dequant(C).

Collected through tests/test_triton_kernel.py: on a CUDA machine directly (compiled kernel); without a
GPU in a child pytest with TRITON_INTERPRET=1, because Triton picks the interpreter when its modules
are first imported and other tests import Triton (through vLLM/torch) long before this file runs.
Interpreted runs use small layers (the interpreter runs every program in numpy); compiled runs the
full-size ones. Needs only torch + triton (no vLLM).
"""

import os

import pytest
import torch

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels.gpu_layout import repack
from offline_compress.quantization import encode_coefficients
from tests.reference import reference_coefficients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = DEVICE == "cuda"
# (k, out, s) of a single-shard layer and its input width: several mask words, value groups and
# column blocks in both modes.
SINGLE = ((600, 1000, 250), 512) if COMPILED else ((300, 70, 121), 40)
MERGED = ([(700, 512, 300), (330, 128, 80), (900, 128, 410)], 256) if COMPILED else \
    ([(70, 40, 30), (33, 24, 8), (290, 70, 141)], 56)  # q/k/v-like, k and out not multiples of 32/64
ROWS = [1, 2, 3, 4, 16, 17, 130, 600, 2048]  # 1–4: FMA tiles of 1, 2, 4 rows; 16: decode tl.dot; 17+: prefill
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative Frobenius error bounds (~3× margin): float32 exact up to summation order when interpreted,
# tf32 (10-bit mantissa) in tl.dot on GPUs; bf16 rounds Z and Y to 8 bits, fp16 to 11.
TOLERANCE = {torch.float32: 2e-3 if COMPILED else 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def kernels():
    if not COMPILED:
        assert os.environ.get("TRITON_INTERPRET") == "1", "without a GPU run these through test_triton_kernel.py"
    import cospadi_vllm.kernels.triton_gemm as module

    return module


def random_layer(shards, in_features, value_dtype, generator):
    """A merged layer of len(shards) shards (k, out, s) with random D and random supports/values, in
    the stored layout (mask [N, W], values [N, S_max] padded with real values that must not be read).

    Returns the stored tensors (on DEVICE) and the float64 dense Wᵀ [in, out] they encode.
    """
    s_max = max(s for _, _, s in shards)
    words = max(fmt.mask_words(k) for k, _, _ in shards)
    parts = {"dictionary": [], "mask": [], "values": [], "scales": [], "offsets": []}
    k_offset = 0
    for k, out, s in shards:
        idx = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(out)])
        tensors = encode_coefficients(idx, torch.randn(out, s, generator=generator), k, value_dtype)
        parts["dictionary"].append(torch.randn(in_features, k, generator=generator).to(torch.bfloat16))
        parts["mask"].append(torch.nn.functional.pad(tensors[fmt.COEF_MASK], (0, words - tensors[fmt.COEF_MASK].shape[1])))
        values = tensors[fmt.COEF_VALUES]
        padding = fmt.value_columns(s_max, values.dtype) - values.shape[1]
        parts["values"].append(torch.cat([values, values[:, :1].expand(out, padding)], 1))
        parts["scales"].append(tensors[fmt.COEF_SCALES])
        parts["offsets"].append(torch.full((out,), k_offset, dtype=torch.int32))
        k_offset += k
    layer = {
        "dictionary": torch.cat(parts["dictionary"], 1),
        "coef_mask": torch.cat(parts["mask"], 0),
        "coef_values": torch.cat(parts["values"], 0),
        "coef_scales": torch.cat(parts["scales"], 0),
        "atom_offsets": torch.cat(parts["offsets"], 0),
    }
    coef = reference_coefficients(layer["coef_mask"], layer["coef_values"], layer["coef_scales"],
                                  layer["atom_offsets"], k_offset)
    return {name: t.to(DEVICE) for name, t in layer.items()}, layer["dictionary"].double() @ coef


def coefficients(layer):
    return [layer[n] for n in ("coef_mask", "coef_values", "coef_scales", "atom_offsets")]


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double().cpu() - reference).norm() / reference.norm())


@pytest.mark.parametrize("value_dtype", ["int8", "float8_e4m3fn", "bfloat16", "int4"])
@pytest.mark.parametrize("m,decode", [(m, "lanes") for m in ROWS] + [(m, "bitwalk") for m in ROWS if m <= 16])
def test_kernel_matches_float64_reference(kernels, value_dtype, m, decode):
    """Both decode kernels (the bit-walk one serves M ≤ 16 only; above, both names run the prefill tiles)."""
    g = torch.Generator().manual_seed(m)
    (k, out_features, s), in_features = SINGLE
    layer, dense_t = random_layer([(k, out_features, s)], in_features, value_dtype, g)
    packed = repack(*coefficients(layer))
    for x_dtype in X_DTYPES:
        x = torch.randn(m, in_features, generator=g).to(x_dtype).to(DEVICE)
        out = torch.full((m, out_features), float("nan"), dtype=x_dtype, device=DEVICE)  # poisoned
        z = x @ layer["dictionary"].to(x_dtype)
        y = kernels.packed_coef_product(z, packed, out=out, decode=decode)
        assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        error = relative_error(out, x.double().cpu() @ dense_t)
        assert error < TOLERANCE[x_dtype], (value_dtype, m, x_dtype, error)


@pytest.mark.parametrize("m", [1, 5, 17, 130])
@pytest.mark.parametrize("decode", ["lanes", "bitwalk"])
def test_merged_three_shards_with_different_k(kernels, m, decode):
    g = torch.Generator().manual_seed(100 + m)
    shards, in_features = MERGED
    layer, dense_t = random_layer(shards, in_features, "int8", g)
    x = torch.randn(m, in_features, generator=g).to(torch.bfloat16).to(DEVICE)
    z = x @ layer["dictionary"].to(x.dtype)
    y = kernels.packed_coef_product(z, repack(*coefficients(layer)), decode=decode)
    assert y.shape == (m, sum(out for _, out, _ in shards)) and torch.isfinite(y).all()
    reference = x.double().cpu() @ dense_t
    assert relative_error(y, reference) < TOLERANCE[torch.bfloat16]
    # Each shard on its own block of columns: a kernel reading another shard's atoms fails here.
    start = 0
    for _, out, _ in shards:
        assert relative_error(y[:, start:start + out], reference[:, start:start + out]) < TOLERANCE[torch.bfloat16]
        start += out


@pytest.mark.parametrize("m", [1, 4, 9])
def test_every_split_over_atoms_gives_the_same_product(kernels, m):
    """Decode splits the atoms over programs at group boundaries (value_starts): any split count,
    including more splits than groups (programs with no words), gives the float64 product."""
    g = torch.Generator().manual_seed(200 + m)
    shards, in_features = MERGED
    layer, dense_t = random_layer(shards, in_features, "float8_e4m3fn", g)
    packed = repack(*coefficients(layer))
    z = torch.randn(m, layer["dictionary"].shape[1], generator=g).to(DEVICE)
    reference = z.double().cpu() @ reference_coefficients(*[t.cpu() for t in coefficients(layer)], z.shape[1])
    groups = packed.value_starts.shape[0]
    for split in sorted({1, 2, 3, groups, groups + 2}):
        for decode in kernels.DECODE_KERNELS:
            y = kernels.packed_coef_product(z, packed, split_k=split, decode=decode)
            assert relative_error(y, reference) < TOLERANCE[torch.float32], (split, decode)


def test_float32_activations_beyond_float16_range(kernels):
    """float32 activations are multiplied in float32 / tf32, not fp16: |Z| ≫ 65504 stays finite."""
    g = torch.Generator().manual_seed(5)
    layer, dense_t = random_layer([SINGLE[0]], SINGLE[1], "int8", g)
    packed = repack(*coefficients(layer))
    for m in (1, 9, 130):  # FMA, decode tl.dot, prefill tl.dot
        x = (torch.randn(m, SINGLE[1], generator=g) * 1e5).to(DEVICE)
        z = x @ layer["dictionary"].float()
        assert float(z.abs().max()) > 1e6
        y = kernels.packed_coef_product(z, packed)
        assert torch.isfinite(y).all()
        assert relative_error(y, x.double().cpu() @ dense_t) < TOLERANCE[torch.float32], m


@pytest.mark.parametrize("m", [9, 17])
def test_offsets_past_two_to_the_31(kernels, m):
    """Row offsets rows × stride ≥ 2³¹ elements (a 70B gate_up at ~37k tokens): Z and Y are views with
    a 2²⁸-element row stride, so row 8 starts at element 2³¹. Memory is reserved, not touched (CPU),
    or 2 × m × 512 MiB on a GPU."""
    g = torch.Generator().manual_seed(300 + m)
    layer, _ = random_layer([(100, 48, 40)], 24, "int8", g)
    packed = repack(*coefficients(layer))
    stride = 2**28
    z_rows = torch.empty((m, stride), dtype=torch.bfloat16, device=DEVICE)
    y_rows = torch.empty((m, stride), dtype=torch.bfloat16, device=DEVICE)
    z = z_rows[:, :100]
    z.copy_(torch.randn(m, 100, generator=g).to(torch.bfloat16))
    y = y_rows[:, :48]
    y.fill_(float("nan"))
    assert z.stride(0) * (m - 1) >= 2**31
    kernels.packed_coef_product(z, packed, out=y)
    reference = z.double().cpu() @ reference_coefficients(*[t.cpu() for t in coefficients(layer)], 100)
    assert torch.isfinite(y).all()
    assert relative_error(y, reference) < TOLERANCE[torch.bfloat16]


def test_launch_config_by_rows(kernels):
    assert [kernels.launch_config(m)[2] for m in (1, 4, 5, 16, 17, 2048)] == [False, False, True, True, True, True]
    assert kernels.launch_config(1)[0] == 1 and kernels.launch_config(3)[0] == 4
    assert kernels.launch_config(2048)[0] >= 64


@pytest.mark.parametrize("m", [1, 17, 130])
def test_float32_dictionary_product_reads_bfloat16_d(kernels, m):
    """float32 activations with D held in bf16: x·D widened tile by tile in the kernel (no float32 copy of
    D), float32 products and sums: within float32 rounding of the float64 product; in and K not multiples
    of the tiles."""
    g = torch.Generator().manual_seed(400 + m)
    dictionary = torch.randn(70, 150, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(m, 70, generator=g).to(DEVICE)
    z = kernels.dictionary_product_float32(x, dictionary)
    reference = x.double().cpu() @ dictionary.double().cpu()
    assert z.dtype == torch.float32 and z.shape == (m, 150)
    assert relative_error(z, reference) < 1e-6


@pytest.mark.parametrize("value_dtype", ["int8", "float8_e4m3fn", "bfloat16", "int4"])
@pytest.mark.parametrize("dictionary_dtype", ["bfloat16", "int8", "int4"])
def test_gpu_kernel_serves_every_dictionary_and_value_dtype(dictionary_dtype, value_dtype):
    """The GPU kernel class (x·D for the stored dictionary, then the Triton Z·C on C repacked) on a merged
    3-shard layer, every (dictionary dtype × value dtype) pair: float64 math of the stored tensors, decoded
    bit by bit in tests/reference.py, is the reference; D is held in its stored dtype, never widened, and
    given back as stored."""
    from cospadi_vllm.kernels import KernelConfig, choose_kernel
    from tests.reference import HeldLayer, merged_layer_tensors, reference_weight_t

    g = torch.Generator().manual_seed(500 + 7 * len(dictionary_dtype) + len(value_dtype))
    tensors = merged_layer_tensors(value_dtype, g, dictionary_dtype=dictionary_dtype)
    in_features = 48
    dense = reference_weight_t(tensors, in_features)
    layer = HeldLayer.of(tensors).to(DEVICE)
    config = KernelConfig(torch.device(DEVICE), torch.float32, fmt.VALUE_DTYPES[value_dtype],
                          tensors[fmt.DICTIONARY].dtype)
    kernel = choose_kernel(config, name="triton")
    kernel.process_weights_after_loading(layer)
    assert layer.dictionary.dtype == tensors[fmt.DICTIONARY].dtype and layer.dictionary.numel() == \
        tensors[fmt.DICTIONARY].numel()
    stored = kernel.stored_tensors(layer)
    for name in (fmt.DICTIONARY, fmt.DICTIONARY_SCALES):
        if name in tensors:
            assert stored[name].cpu().equal(tensors[name]), name
    for rows in (1, 3, 16, 17, 130):
        x = torch.randn(rows, in_features, generator=g)
        y = kernel.apply(layer, x.to(DEVICE))
        assert y.dtype == torch.float32 and y.shape == (rows, dense.shape[1])
        assert relative_error(y, x.double() @ dense) < TOLERANCE[torch.float32], (rows, dictionary_dtype, value_dtype)
