// CoSpaDi CPU kernels: the coefficient product Y = Z·C with C read in its stored form.
//
// C is column-sparse: output j uses exactly s atoms, given by
//   coef_mask   [N, W] int32  bit t of row j set <=> atom atom_offsets[j] + t is used by output j
//   coef_values [N, S] 1-byte (int8 / float8_e4m3fn) or 2-byte (bfloat16) non-zeros in atom order
//   coef_scales [N]    float32 per-output scale
// and y[m, j] = scale_j * sum_t value(j, t) * z[m, atom(j, t)].
//
// coef_product          decode (few rows): walks the mask 16 bits at a time; on AVX-512 a byte shuffle
//                       puts the row's next values in the lanes of their set bits, so one masked FMA
//                       covers 16 atoms and C is read once, as stored.
// expand_coefficients   prefill: writes a tile of output rows of C densely ([rows, width], row-major)
//                       so that the product with many rows of Z runs on torch's GEMM.
//
// Values are decoded by kind: 0 = int8 (integer convert), 1 = 1-byte code through a 256-entry float
// table (float8_e4m3fn), 2 = bfloat16 (bit shift). Mask bits at positions >= k are zero (checked at
// load), so no atom outside the shard is ever touched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VPOPCNTDQ__)
#define COSPADI_AVX512 1
#include <immintrin.h>
#else
#define COSPADI_AVX512 0
#endif

namespace {

constexpr int kInt8 = 0;
constexpr int kTable = 1;
constexpr int kBf16 = 2;
constexpr int kRowBlock = 8;  // rows of Z per pass over a column of C (accumulators stay in registers)

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float decode_value(const uint8_t* values, int64_t t, int kind, const float* table) {
  if (kind == kInt8) return static_cast<float>(static_cast<int8_t>(values[t]));
  if (kind == kTable) return table[values[t]];
  uint16_t h;
  std::memcpy(&h, values + 2 * t, sizeof h);
  return bf16_bits_to_float(h);
}

struct Coefficients {
  const int32_t* mask;
  const uint8_t* values;
  const uint8_t* values_end;  // one past the last byte of the values tensor
  const float* scales;
  const int32_t* offsets;
  const float* table;
  int64_t words;
  int64_t values_row_bytes;
  int kind;
};

// One output column, rows [m0, m0 + rows) of Z, any CPU.
void column_portable(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, int64_t rows,
                     float* y, int64_t ldy) {
  float acc[kRowBlock] = {0};
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = c.values + j * c.values_row_bytes;
  const int64_t base = c.offsets[j];
  int64_t t = 0;
  for (int64_t w = 0; w < c.words; ++w) {
    uint32_t bits = mask[w];
    while (bits) {
      const int64_t atom = base + w * 32 + __builtin_ctz(bits);
      bits &= bits - 1;
      const float v = decode_value(values, t++, c.kind, c.table);
      for (int64_t r = 0; r < rows; ++r) acc[r] += v * z[(m0 + r) * ldz + atom];
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + j] = acc[r] * c.scales[j];
}

#if COSPADI_AVX512
// Lane i of a 16-lane group takes value number popcount(bits below i) of the group: computed for all
// lanes at once (broadcast, AND with the lane's prefix mask, per-lane popcount), then a lane permute
// of the group's values (converted to float) puts each in place. Plain loads: masked loads and
// vpexpand are slow on AMD Zen 4 (NOTES.md); only the last 64 bytes of the tensor, where a plain
// load could run past the allocation, take the masked form.
inline __m512 group_values(const uint8_t* p, const uint8_t* end, __mmask16 mk, __m512i ranks, int kind,
                           const float* table) {
  const bool tail = p + 64 > end;
  const __mmask16 first_n = static_cast<__mmask16>((1u << __builtin_popcount(static_cast<unsigned>(mk))) - 1);
  __m512 packed;
  if (kind == kBf16) {
    const __m256i raw = tail ? _mm256_maskz_loadu_epi16(first_n, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    packed = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    const __m128i raw = tail ? _mm_maskz_loadu_epi8(first_n, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    packed = kind == kInt8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw))
                           : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), first_n, _mm512_cvtepu8_epi32(raw), table, 4);
  }
  return _mm512_maskz_permutexvar_ps(mk, ranks, packed);
}

template <int R>
void column_avx512(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, float* y,
                   int64_t ldy) {
  // Two accumulators per row (low / high 16 bits of each mask word): the halves are independent,
  // so the FMA latency chain is split in two.
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i below_lo = _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_set1_epi32(1), lane), _mm512_set1_epi32(1));
  const __m512i below_hi = _mm512_slli_epi32(below_lo, 16);  // bits 16..16+i-1, compared on bits >> 0
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = c.values + j * c.values_row_bytes;
  const int64_t value_bytes = c.kind == kBf16 ? 2 : 1;
  const float* zrow = z + m0 * ldz + c.offsets[j];
  for (int64_t w = 0; w < c.words; ++w) {
    const uint32_t bits = mask[w];
    const __mmask16 mk_lo = static_cast<__mmask16>(bits), mk_hi = static_cast<__mmask16>(bits >> 16);
    const __m512i word = _mm512_set1_epi32(static_cast<int>(bits));
    const __m512i rank_lo = _mm512_popcnt_epi32(_mm512_and_si512(word, below_lo));
    // High lanes: bits of the high half below the lane (the low half's count is the pointer advance).
    const __m512i rank_hi = _mm512_popcnt_epi32(_mm512_and_si512(word, below_hi));
    const int64_t n_lo = __builtin_popcount(bits & 0xFFFFu);
    const __m512 v_lo = group_values(values, c.values_end, mk_lo, rank_lo, c.kind, c.table);
    const __m512 v_hi = group_values(values + n_lo * value_bytes, c.values_end, mk_hi, rank_hi, c.kind, c.table);
    values += __builtin_popcount(bits) * value_bytes;
    // Masked loads: lanes of clear bits are neither read nor faulted (the shard may end here).
    const float* zw = zrow + w * 32;
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm512_fmadd_ps(v_lo, _mm512_maskz_loadu_ps(mk_lo, zw + r * ldz), lo[r]);
      hi[r] = _mm512_fmadd_ps(v_hi, _mm512_maskz_loadu_ps(mk_hi, zw + r * ldz + 16), hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + j] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r])) * c.scales[j];
}

void column_block_avx512(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, int64_t rows,
                         float* y, int64_t ldy) {
  switch (rows) {
    case 1: return column_avx512<1>(c, j, z, ldz, m0, y, ldy);
    case 2: return column_avx512<2>(c, j, z, ldz, m0, y, ldy);
    case 3: return column_avx512<3>(c, j, z, ldz, m0, y, ldy);
    case 4: return column_avx512<4>(c, j, z, ldz, m0, y, ldy);
    case 5: return column_avx512<5>(c, j, z, ldz, m0, y, ldy);
    case 6: return column_avx512<6>(c, j, z, ldz, m0, y, ldy);
    case 7: return column_avx512<7>(c, j, z, ldz, m0, y, ldy);
    default: return column_avx512<8>(c, j, z, ldz, m0, y, ldy);
  }
}
#endif

Coefficients view(const at::Tensor& coef_mask, const at::Tensor& coef_values, const at::Tensor& coef_scales,
                  const at::Tensor& atom_offsets, const at::Tensor& value_table, int64_t value_kind) {
  TORCH_CHECK(coef_mask.scalar_type() == at::kInt && coef_mask.dim() == 2 && coef_mask.is_contiguous(),
              "coef_mask must be a contiguous [N, W] int32 tensor");
  TORCH_CHECK(coef_values.dim() == 2 && coef_values.stride(1) == 1 && coef_values.size(0) == coef_mask.size(0),
              "coef_values must be [N, S] with contiguous rows");
  TORCH_CHECK(coef_values.element_size() == (value_kind == kBf16 ? 2 : 1), "coef_values dtype does not match value_kind");
  TORCH_CHECK(coef_scales.scalar_type() == at::kFloat && coef_scales.is_contiguous() &&
                  coef_scales.numel() == coef_mask.size(0), "coef_scales must be a contiguous [N] float32 tensor");
  TORCH_CHECK(atom_offsets.scalar_type() == at::kInt && atom_offsets.is_contiguous() &&
                  atom_offsets.numel() == coef_mask.size(0), "atom_offsets must be a contiguous [N] int32 tensor");
  TORCH_CHECK(value_kind != kTable || (value_table.scalar_type() == at::kFloat && value_table.numel() == 256),
              "value_table must be 256 float32 entries");
  return Coefficients{coef_mask.data_ptr<int32_t>(),
                      static_cast<const uint8_t*>(coef_values.data_ptr()),
                      static_cast<const uint8_t*>(coef_values.data_ptr()) +
                          ((coef_values.size(0) - 1) * coef_values.stride(0) + coef_values.size(1)) * coef_values.element_size(),
                      coef_scales.data_ptr<float>(),
                      atom_offsets.data_ptr<int32_t>(),
                      value_kind == kTable ? value_table.data_ptr<float>() : nullptr,
                      coef_mask.size(1),
                      coef_values.stride(0) * coef_values.element_size(),
                      static_cast<int>(value_kind)};
}

at::Tensor coef_product(const at::Tensor& z, const at::Tensor& coef_mask, const at::Tensor& coef_values,
                        const at::Tensor& coef_scales, const at::Tensor& atom_offsets, const at::Tensor& value_table,
                        int64_t value_kind, bool portable) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.dim() == 2 && z.stride(1) == 1, "z must be [M, K] float32 with contiguous rows");
  const Coefficients c = view(coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind);
  const int64_t m = z.size(0), n = coef_mask.size(0), ldz = z.stride(0);
  at::Tensor y = at::empty({m, n}, z.options());
  const float* zp = z.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool vector = COSPADI_AVX512 && !portable;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m; m0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, m - m0);
      for (int64_t j = begin; j < end; ++j) {
#if COSPADI_AVX512
        if (vector) {
          column_block_avx512(c, j, zp, ldz, m0, rows, yp, n);
          continue;
        }
#endif
        column_portable(c, j, zp, ldz, m0, rows, yp, n);
      }
    }
  });
  return y;
}

template <typename T>
void expand_rows(const Coefficients& c, int64_t row_start, int64_t rows, int64_t width, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = row_start + i;
      T* row = out + i * width;
      std::fill(row, row + width, T(0));
      const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
      const uint8_t* values = c.values + j * c.values_row_bytes;
      const float scale = c.scales[j];
      int64_t t = 0;
      for (int64_t w = 0; w < c.words; ++w) {
        uint32_t bits = mask[w];
        while (bits) {
          const int64_t atom = w * 32 + __builtin_ctz(bits);
          bits &= bits - 1;
          const float v = decode_value(values, t++, c.kind, c.table) * scale;
          if (atom < width) row[atom] = static_cast<T>(v);
        }
      }
    }
  });
}

// out [rows, width] (float32 or bfloat16): rows row_start.. of C, shard-relative atoms 0..width.
void expand_coefficients(const at::Tensor& coef_mask, const at::Tensor& coef_values, const at::Tensor& coef_scales,
                         const at::Tensor& atom_offsets, const at::Tensor& value_table, int64_t value_kind,
                         int64_t row_start, at::Tensor out) {
  const Coefficients c = view(coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous [rows, width] tensor");
  const int64_t rows = out.size(0), width = out.size(1);
  TORCH_CHECK(row_start >= 0 && row_start + rows <= coef_mask.size(0), "rows out of range");
  if (out.scalar_type() == at::kFloat) {
    expand_rows<float>(c, row_start, rows, width, out.data_ptr<float>());
  } else {
    TORCH_CHECK(out.scalar_type() == at::kBFloat16, "out must be float32 or bfloat16");
    expand_rows<c10::BFloat16>(c, row_start, rows, width, out.data_ptr<c10::BFloat16>());
  }
}

bool has_vector_kernel() { return COSPADI_AVX512; }

}  // namespace

TORCH_LIBRARY(cospadi_cpu, m) {
  m.def("coef_product(Tensor z, Tensor coef_mask, Tensor coef_values, Tensor coef_scales, Tensor atom_offsets, "
        "Tensor value_table, int value_kind, bool portable) -> Tensor");
  m.def("expand_coefficients(Tensor coef_mask, Tensor coef_values, Tensor coef_scales, Tensor atom_offsets, "
        "Tensor value_table, int value_kind, int row_start, Tensor(a!) out) -> ()");
  m.def("has_vector_kernel() -> bool", &has_vector_kernel);
}

TORCH_LIBRARY_IMPL(cospadi_cpu, CPU, m) {
  m.impl("coef_product", &coef_product);
  m.impl("expand_coefficients", &expand_coefficients);
}
