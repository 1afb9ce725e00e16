"""The CoSpaDi GEMM on CPU (C++ ops, every code path, and the CPU kernel seam) against dense float64 math."""

import pytest
import torch

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import KernelConfig, choose_kernel, cpu_library
from cospadi_vllm.kernels.cpu import QUANTIZED_DICTIONARY_FUSED_MAX_ROWS
from cospadi_vllm.kernels.cpu import direct_max_rows as serving_direct_max_rows
from offline_compress.quantization import encode_coefficients
from tests.reference import SHARDS, VALUE_DTYPES, HeldLayer, merged_layer, reference_coefficients


def coefficient_product_cpu(z, coef_mask, coef_values, coef_scales, atom_offsets, out_dtype,
                            direct_max_rows=None, portable=False):
    """z [M, K] · C → [M, N] through the C++ op, forcing a path: ``direct_max_rows`` (direct kernels up
    to that many rows, expanded tiles above) and ``portable`` (the scalar kernels)."""
    table, kind = cpu_library.value_decoding(coef_values.dtype)
    if direct_max_rows is None:
        direct_max_rows = 32 if portable else serving_direct_max_rows(z.dtype, coef_values.dtype)
    y = torch.ops.cospadi_cpu.coef_product(z, coef_mask, coef_values, coef_scales, atom_offsets, table, kind,
                                           portable, out_dtype == torch.float32, direct_max_rows)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def int16_error_bound(z: torch.Tensor, dense_c: torch.Tensor) -> torch.Tensor:
    """|y - z·C| allowed for the int16 path: each Z entry moves by at most half a step of its row's
    grid (max |z| / 32767), times Σ_t |C[t, j]|; plus float32 rounding of the chunk sums."""
    step = z.double().abs().amax(1, keepdim=True) / 32767
    return step / 2 * dense_c.abs().sum(0, keepdim=True) + 1e-6 * (z.double().abs() @ dense_c.abs())


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 9, 13, 40, 300])
def test_cpu_coefficient_product_matches_float64(value_dtype, rows):
    g = torch.Generator().manual_seed(1000 * rows + len(value_dtype))
    _, coef, k_total = merged_layer(value_dtype, g)
    z = torch.randn(rows, k_total, generator=g)
    reference = z.double() @ reference_coefficients(*coef, k_total)
    paths = {"direct": 10**9, "expanded": 0}
    for portable in (False, True):
        for path, direct_max_rows in paths.items():
            y = coefficient_product_cpu(z, *coef, torch.float32, direct_max_rows=direct_max_rows, portable=portable)
            assert y.shape == reference.shape and y.dtype == torch.float32
            err = float((y.double() - reference).norm() / reference.norm())
            assert err < 1e-6, (path, portable, err)


@pytest.mark.parametrize("rows", [2, 5, 8])
def test_cpu_coefficient_product_with_rows_of_z_4kib_apart(rows):
    """K = 1030 float32 atoms (4120 bytes per row of Z, within 512 bytes of 4 KiB): the direct kernels read
    a copy of Z with its rows spread over the L1 sets; still the float64 product of the same numbers."""
    g = torch.Generator().manual_seed(77 + rows)
    _, coef, k_total = merged_layer("int8", g, shards=[(515, 24, 40), (515, 20, 33)])
    assert (k_total * 4) % 4096 < 512
    z = torch.randn(rows, k_total, generator=g)
    reference = z.double() @ reference_coefficients(*coef, k_total)
    y = coefficient_product_cpu(z, *coef, torch.float32, direct_max_rows=10**9)
    err = float((y.double() - reference).norm() / reference.norm())
    assert err < 1e-6, err


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_cpu_bf16_z_products_exact_sums_float32(value_dtype):
    """bf16 Z (vdpbf16ps kernel, one and two columns at a time): bf16 values and Z are exact, so only
    float32 summation separates it from the float64 product of the same numbers. int8 values on the
    int16 path: within the bound of rounding Z to int16 (int16_error_bound)."""
    int16_path = value_dtype in ("int8", "int4") and cpu_library.has_int16_kernel()  # Z rounded to int16 there
    g = torch.Generator().manual_seed(len(value_dtype))
    _, coef, k_total = merged_layer(value_dtype, g)
    reference_c = reference_coefficients(*coef, k_total)
    for rows in (1, 2, 7, 8, 9, 16, 17, 32):
        z = torch.randn(rows, k_total, generator=g).to(torch.bfloat16)
        y = coefficient_product_cpu(z, *coef, torch.float32)
        reference = z.double() @ reference_c
        if int16_path:
            assert ((y.double() - reference).abs() <= int16_error_bound(z, reference_c)).all(), rows
        else:
            assert float((y.double() - reference).norm() / reference.norm()) < 1e-6, rows


@pytest.mark.parametrize(
    "shards",
    [SHARDS, [(8200, 6, 4100), (300, 5, 100)]],  # 8200 atoms = 257 words: past the 255-word int32 chunk
    ids=["merged-3-shards", "long-rows"],
)
def test_cpu_int16_path_within_its_quantization_bound(shards):
    """int8 values × bf16 Z on the int16 path (AVX-512 VNNI + VBMI2): within the bound set by rounding
    Z to int16 per row, for rows of very different scales; bf16 output = the float output rounded."""
    if not cpu_library.has_int16_kernel():
        pytest.skip("this CPU has no AVX-512 VNNI + VBMI2: bf16 Z takes the float kernels")
    g = torch.Generator().manual_seed(len(shards))
    _, coef, k_total = merged_layer("int8", g, shards=shards, in_features=8)
    dense_c = reference_coefficients(*coef, k_total)
    int16 = 10**9  # direct_max_rows: the int16 kernel for every M here, whatever the serving crossover
    for rows in (1, 2, 3, 4, 5, 8, 9, 17, 32, 97, 150):  # 97, 150: the many-row kernel, past a 96-row chunk
        row_scale = 10.0 ** torch.empty(rows, 1).uniform_(-3, 3, generator=g)
        z = (torch.randn(rows, k_total, generator=g) * row_scale).to(torch.bfloat16)
        z[0, 3] *= 300  # an outlier: the row's grid is set by it
        y = coefficient_product_cpu(z, *coef, torch.float32, direct_max_rows=int16)
        reference = z.double() @ dense_c
        assert y.dtype == torch.float32
        excess = (y.double() - reference).abs() - int16_error_bound(z, dense_c)
        assert float(excess.max()) <= 0, (rows, float(excess.max()))
        y_bf16 = coefficient_product_cpu(z, *coef, torch.bfloat16, direct_max_rows=int16)
        assert y_bf16.dtype == torch.bfloat16 and torch.equal(y_bf16, y.to(torch.bfloat16)), rows


def test_cpu_int16_path_propagates_non_finite_rows():
    """A Z row holding inf or NaN gives NaN outputs in that row only, as a float GEMM would."""
    if not cpu_library.has_int16_kernel():
        pytest.skip("this CPU has no AVX-512 VNNI + VBMI2")
    g = torch.Generator().manual_seed(9)
    _, coef, k_total = merged_layer("int8", g)
    z = torch.randn(4, k_total, generator=g).to(torch.bfloat16)
    z[1, 5], z[2, 0] = float("inf"), float("nan")
    y = coefficient_product_cpu(z, *coef, torch.float32)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", sorted(fmt.VALUE_DTYPES))
def test_cpu_kernel_seam_matches_float64(act_dtype, value_dtype):
    """What vLLM and transformers call: choose_kernel on a CPU layer, process its tensors, apply, and the
    two stages tensor parallelism calls separately; float64 dense math of the same stored numbers is
    the reference (bf16 activations: within bf16 rounding of x, Z and y)."""
    g = torch.Generator().manual_seed(7 + len(value_dtype))
    dictionary, coef, k_total = merged_layer(value_dtype, g)
    dense = dictionary.double() @ reference_coefficients(*coef, k_total)
    layer = HeldLayer(dictionary, coef)
    kernel = choose_kernel(KernelConfig(torch.device("cpu"), act_dtype, coef[1].dtype))
    assert kernel.name == "cpu"
    kernel.process_weights_after_loading(layer)
    assert kernel.stored_tensors(layer)[fmt.DICTIONARY].equal(dictionary)  # the stored layout comes back
    bound = 1e-5 if act_dtype == torch.float32 else 3e-2
    for rows in (1, 3, 8, 9, 64, 300):  # direct, int16, expanded paths
        x = torch.randn(rows, dictionary.shape[0], generator=g).to(act_dtype)
        reference = x.double() @ dense
        for y in (kernel.apply(layer, x), kernel.coefficient_product(layer, kernel.dictionary_product(layer, x))):
            assert y.dtype == act_dtype and y.shape == reference.shape
            assert float((y.double() - reference).norm() / reference.norm()) < bound, (rows, y.dtype)


def test_float16_dictionary_out_of_range_fails_naming_the_layer():
    """float16 activations hold D in float16 once; an entry beyond 65504 would become inf: refused in
    one line naming the layer (bf16 and float32 activations keep D in bf16 and serve it)."""
    from cospadi_vllm.kernels import KernelUnavailableError

    g = torch.Generator().manual_seed(21)
    dictionary, coef, _ = merged_layer("int8", g)
    dictionary[3, 5] = 1.0e5
    for act, fails in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, False)):
        kernel = choose_kernel(KernelConfig(torch.device("cpu"), act, torch.int8, name="model.layers.3.mlp.down_proj"))
        if fails:
            with pytest.raises(KernelUnavailableError, match=r"^model.layers.3.mlp.down_proj: dictionary entries "
                                                             r"reach 9\.984e\+04, beyond float16's 65504"):
                kernel.process_weights_after_loading(HeldLayer(dictionary, coef))
        else:
            kernel.process_weights_after_loading(HeldLayer(dictionary, coef))
    dictionary[3, 5] = 6.0e4  # within range: served
    choose_kernel(KernelConfig(torch.device("cpu"), torch.float16, torch.int8)).process_weights_after_loading(
        HeldLayer(dictionary, coef))


@pytest.mark.parametrize("value_dtype", ["int8", "int4"])
def test_cpu_kernel_reads_only_the_stored_integer_values(value_dtype):
    """int8 / int4 values (bf16 Z: the int16 path where built; int4 rows unpacked whole): values past each row's
    popcount never reach a lane — filling the padding with the largest code changes nothing."""
    g = torch.Generator().manual_seed(4)
    _, (mask, values, scales, offsets), k_total = merged_layer(value_dtype, g)
    counts = codec.unpack_mask(mask, mask.shape[1] * 32).sum(1)
    codes = codec.unpack_int4(values) if value_dtype == "int4" else values.clone()
    for row, count in enumerate(counts.tolist()):
        codes[row, count:] = 7 if value_dtype == "int4" else 127
    poisoned = codec.pack_int4(codes) if value_dtype == "int4" else codes
    assert not torch.equal(poisoned, values)
    for rows in (4, 40):  # values expanded in registers (decode) and into a buffer (many rows)
        z = torch.randn(rows, k_total, generator=g).to(torch.bfloat16)
        clean = coefficient_product_cpu(z, mask, values, scales, offsets, torch.float32)
        y = coefficient_product_cpu(z, mask, poisoned, scales, offsets, torch.float32)
        assert torch.equal(y, clean), rows


def test_cpu_kernel_reads_only_the_stored_values():
    """Values past each row's popcount are never read: filling the padding with NaN changes nothing."""
    g = torch.Generator().manual_seed(3)
    _, (mask, values, scales, offsets), k_total = merged_layer("bfloat16", g)
    z = torch.randn(4, k_total, generator=g)
    clean = coefficient_product_cpu(z, mask, values, scales, offsets, torch.float32)
    counts = codec.unpack_mask(mask, mask.shape[1] * 32).sum(1)
    poisoned = values.clone()
    for row, count in enumerate(counts.tolist()):
        poisoned[row, count:] = float("nan")
    for portable in (False, True):
        for direct_max_rows in (10**9, 0):
            y = coefficient_product_cpu(z, mask, poisoned, scales, offsets, torch.float32, direct_max_rows, portable)
            assert torch.isfinite(y).all() and torch.allclose(y, clean, rtol=1e-6, atol=1e-6)


def test_mask_check_rejects_bits_beyond_k_and_wrong_counts():
    k, out, s = 40, 6, 5
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(out)])
    mask = encode_coefficients(idx, torch.randn(out, s, generator=g), k, "int8")[fmt.COEF_MASK]
    mask = torch.nn.functional.pad(mask, (0, 1))  # a merged layer's extra word
    fmt.check_mask_bits("m", mask, k, s)
    beyond = mask.clone()
    beyond[2, 1] |= 1 << 9  # atom 41 >= k
    with pytest.raises(fmt.FormatError, match=r"m.coef_mask has bits set at atom positions >= k=40"):
        fmt.check_mask_bits("m", beyond, k, s)
    extra_word = mask.clone()
    extra_word[4, 2] = 1
    with pytest.raises(fmt.FormatError, match="atom positions >= k"):
        fmt.check_mask_bits("m", extra_word, k, s)
    too_many = mask.clone()
    word = int(too_many[0, 0]) & 0xFFFFFFFF
    word |= ~word & (word + 1)  # set the lowest clear bit: s + 1 bits in row 0
    too_many[0, 0] = word - (1 << 32) if word >= 1 << 31 else word
    with pytest.raises(fmt.FormatError, match="exactly s=5 bits"):
        fmt.check_mask_bits("m", too_many, k, s)


def test_vector_kernels_match_the_build():
    """The kernels compiled in are the best the build's instruction set allows: AVX-512 (native build on
    an AVX-512 CPU), AVX2 + FMA (native on an AVX2 CPU, or COSPADI_CPU_ARCH=x86-64-v3), else portable."""
    flags = open("/proc/cpuinfo").read().split()
    native = cpu_library.arch() == "native"
    avx512 = native and all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq"))
    avx2 = not avx512 and (cpu_library.arch() == "x86-64-v3" or (native and "avx2" in flags and "fma" in flags))
    assert cpu_library.vector_width() == (512 if avx512 else 256 if avx2 else 0)
    assert cpu_library.has_vector_kernel() == (avx512 or avx2)
    assert torch.ops.cospadi_cpu.quantized_dictionary_vector_kernel() == (avx512 or avx2)
    assert cpu_library.has_int16_kernel() == (avx512 and all(f in flags for f in ("avx512_vnni", "avx512_vbmi2")))


def test_cpu_op_is_opaque_to_torch_compile():
    """vLLM's CPU layers call the C++ ops directly; their fake kernels let torch.compile trace each as one
    opaque node (fullgraph, dynamic M) with results equal to eager on both sides of the crossover."""
    g = torch.Generator().manual_seed(12)
    dictionary, coef, k_total = merged_layer("int8", g)
    dictionary_t = dictionary.t().contiguous()
    table, kind = cpu_library.value_decoding(torch.int8)

    def product(z):
        return torch.ops.cospadi_cpu.coef_product(z, *coef, table, kind, False, False, 32) * 2

    def layer(x):
        return torch.ops.cospadi_cpu.linear(x, dictionary_t, *coef, table, kind, 32) + 1

    compiled = torch.compile(product, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled_layer = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 64):
        z = torch.randn(rows, k_total, generator=g).to(torch.bfloat16)
        assert torch.equal(compiled(z), product(z)), rows
        x = torch.randn(rows, dictionary_t.shape[1], generator=g).to(torch.bfloat16)
        assert torch.equal(compiled_layer(x), layer(x)), rows


def test_cpu_float32_dictionary_product_reads_bf16_d():
    """float32 x · D held in bf16 and transposed: the C++ op (≤ 8 rows: D widened in registers; more: torch's
    GEMM) equals the float64 product of the same numbers within float32 summation."""
    cpu_library.load()
    g = torch.Generator().manual_seed(15)
    # 1540 inputs: all 8 float32 rows in one pass (64 KiB budget), not a multiple of 8 (scalar tail)
    for in_features, k in ((48, 37), (70, 64), (576, 31), (1540, 19)):
        dictionary = torch.randn(in_features, k, generator=g).to(torch.bfloat16)
        dictionary_t = dictionary.t().contiguous()
        for rows in (1, 3, 8, 9, 40):
            x = torch.randn(rows, in_features, generator=g)
            z = torch.ops.cospadi_cpu.dictionary_product(x, dictionary_t)
            reference = x.double() @ dictionary.double()
            assert z.shape == (rows, k) and z.dtype == torch.float32
            bound = 1e-6 * (x.double().abs() @ dictionary.double().abs())
            assert ((z.double() - reference).abs() <= bound).all(), (in_features, k, rows)


def test_cpu_dictionary_product_matches_float64():
    """x·D with D held transposed ([k, in]): the own kernel (≤ 8 rows) and torch's GEMM (more rows)
    against float64, within bf16 rounding of Z; inputs not a multiple of 32 (masked last step), odd k."""
    cpu_library.load()
    g = torch.Generator().manual_seed(13)
    for in_features, k in ((48, 37), (70, 64), (576, 31)):
        dictionary = torch.randn(in_features, k, generator=g).to(torch.bfloat16)
        dictionary_t = dictionary.t().contiguous()
        for rows in (1, 3, 8, 9, 40):
            x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
            z = torch.ops.cospadi_cpu.dictionary_product(x, dictionary_t)
            reference = x.double() @ dictionary.double()
            assert z.shape == (rows, k) and z.dtype == torch.bfloat16
            # bf16 output: half an ulp (2⁻⁸ relative) plus float32 summation
            bound = reference.abs() * 2.0**-8 + 1e-5 * (x.double().abs() @ dictionary.double().abs())
            assert ((z.double() - reference).abs() <= bound).all(), (in_features, k, rows)


def quantized_dictionary(layout: str, in_features: int, k: int, g: torch.Generator):
    """Random stored codes and scales of an integer D, and the float64 D they mean with the largest |code|·|scale| per
    entry (the float32 rounding bound's scale: the fused 4-bit kernel sums c·x and subtracts 8·Σx per group)."""
    if layout == "int4":
        codes = torch.randint(0, 16, (in_features, k), generator=g)
        scales = (0.5 + torch.rand(-(-in_features // 128), k, generator=g)).to(torch.float16)
        entry_scales = scales.double()[torch.arange(in_features) // 128]
        return codec.pack_int4_dictionary(codes), scales, (codes.double() - 8) * entry_scales, 16 * entry_scales
    codes = torch.randint(-127, 128, (in_features, k), generator=g, dtype=torch.int8)
    scales = torch.randn(k, generator=g) * 0.01  # signed: a scale folds nothing in the kernel
    return codes, scales, codes.double() * scales.double(), (127 * scales.double().abs()).expand(in_features, k)


@pytest.mark.parametrize("layout", ["int4", "int8"])
def test_cpu_quantized_dictionary_product_matches_float64(layout):
    """x·D with D as stored (4-bit: GPTQ words, float16 scales per 128 inputs; int8: [in, K], a float32 scale per
    atom), decoded here in float64: several and partial chunks, inputs not a multiple of 8 or 16, atoms not a multiple
    of the vector blocks or of the 256-atom tiles, 1–300 rows through the fused kernel (passes of 8) and through the
    tiles + GEMM path, float32 and bfloat16 x."""
    cpu_library.load()
    g = torch.Generator().manual_seed(16)
    for in_features, k in ((48, 37), (200, 70), (576, 301), (1540, 19)):
        codes, scales, dictionary, largest = quantized_dictionary(layout, in_features, k, g)
        for rows in (1, 2, 3, 5, 8, 9, 17, 32, 33, 300):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, in_features, generator=g).to(dtype)
                reference = x.double() @ dictionary
                bound = 1e-6 * (x.double().abs() @ largest)
                if dtype == torch.bfloat16:
                    bound += reference.abs() * 2.0**-8
                for fused_max_rows in (0, QUANTIZED_DICTIONARY_FUSED_MAX_ROWS, 1 << 20):  # tiles, as served, fused
                    z = torch.ops.cospadi_cpu.quantized_dictionary_product(x, codes, scales, fused_max_rows)
                    assert z.shape == (rows, k) and z.dtype == dtype
                    assert ((z.double() - reference).abs() <= bound).all(), (in_features, k, rows, dtype, fused_max_rows)


def test_cpu_quantized_dictionary_product_names_a_mis_shaped_operand():
    cpu_library.load()
    product = torch.ops.cospadi_cpu.quantized_dictionary_product
    packed = codec.pack_int4_dictionary(torch.randint(0, 16, (200, 9)))
    x = torch.randn(2, 200)
    with pytest.raises(RuntimeError, match=r"scales must be \[2, 9\], got \[1, 9\]"):
        product(x, packed, torch.ones(1, 9, dtype=torch.float16), 32)
    with pytest.raises(RuntimeError, match="201 inputs need 26 rows of packed words, got 25"):
        product(torch.randn(2, 201), packed, torch.ones(2, 9, dtype=torch.float16), 32)
    with pytest.raises(RuntimeError, match="4-bit dictionary's scales must be float16"):
        product(x, packed, torch.ones(2, 9), 32)
    codes = torch.randint(-127, 128, (200, 9), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="201 inputs need an int8 dictionary of 201 rows, got 200"):
        product(torch.randn(2, 201), codes, torch.ones(9), 32)
    with pytest.raises(RuntimeError, match=r"scales must be \[9\], got \[8\]"):
        product(x, codes, torch.ones(8), 32)
    with pytest.raises(RuntimeError, match="int8 dictionary's scales must be float32"):
        product(x, codes, torch.ones(9, dtype=torch.float16), 32)
    with pytest.raises(RuntimeError, match="codes must be int32 .4-bit, packed. or int8, got Short"):
        product(x, codes.short(), torch.ones(9), 32)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_cpu_linear_matches_float64(value_dtype):
    """The fused layer op y = (x·D)·C against float64 dense math of the same stored numbers, every path:
    int8 values ≤ 8 rows keep Z in float32 and round it once to int16; otherwise Z is rounded to bf16
    (2⁻⁸ relative), then int8 values up to 160 rows take the int16 path (Z rounded per row, within
    int16_error_bound) and more rows expanded bf16 tiles of C (2⁻⁸ relative); y is rounded to bf16
    (2⁻⁸ relative); float32 sums add 1e-5."""
    g = torch.Generator().manual_seed(14 + len(value_dtype))
    dictionary, coef, k_total = merged_layer(value_dtype, g)
    dictionary_t = dictionary.t().contiguous()
    dense_c = reference_coefficients(*coef, k_total)
    table, kind = cpu_library.value_decoding(coef[1].dtype)
    int16 = value_dtype in ("int8", "int4") and cpu_library.has_int16_kernel()
    for rows in (1, 2, 5, 8, 9, 40, 300):
        x = torch.randn(rows, dictionary.shape[0], generator=g).to(torch.bfloat16)
        y = torch.ops.cospadi_cpu.linear(x, dictionary_t, *coef, table, kind, 160)
        assert y.shape == (rows, coef[0].shape[0]) and y.dtype == torch.bfloat16
        z64 = x.double() @ dictionary.double()
        reference = z64 @ dense_c
        spread = z64.abs() @ dense_c.abs()
        bound = reference.abs() * 2.0**-8 + 1e-5 * spread
        if not (int16 and rows <= 8):
            bound = bound + 2.0**-8 * spread  # Z rounded to bf16 between the products
        if int16 and rows <= 160:
            bound = bound + int16_error_bound(z64, dense_c) * 1.01
        if rows > 160:  # expanded tiles: C's dequantized values rounded to bf16 for torch's GEMM
            bound = bound + 2.0**-8 * spread
        assert ((y.double() - reference).abs() <= bound).all(), rows
