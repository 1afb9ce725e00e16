// CoSpaDi CPU kernels: the coefficient product Y = Z·C with C read in its stored form.
//
// C is column-sparse: output j uses exactly s atoms, given by
//   coef_mask   [N, W] int32  bit t of row j set <=> atom atom_offsets[j] + t is used by output j
//   coef_values [N, S] 1-byte (int8 / float8_e4m3fn), 2-byte (bfloat16) or half-byte (int4, two per
//               uint8) non-zeros in atom order
//   coef_scales [N]    float32 per-output scale
// and y[m, j] = scale_j * sum_t value(j, t) * z[m, atom(j, t)].
//
// coef_product, one op for every M:
//   direct kernels (up to direct_max_rows rows of Z), C read as stored. int8 values with bfloat16 Z
//     (what a bf16 model serves) on AVX-512 VNNI + VBMI2: Z is scaled per row to int16, one vpexpandb
//     places a mask word's 32 values in their atom lanes and vpdpwssd multiplies them exactly in
//     int32 — in registers as they are used (≤ 8 rows), or once per chunk of 96 rows into an L1
//     buffer shared by 6-row × 4-column register blocks (more rows). Other value dtypes / float32 Z:
//     a float lane placement (popcount ranks + permute) and one FMA (float32) or vdpbf16ps (bf16 Z)
//     per 16 / 32 atoms.
//   expanded tiles (more rows): tiles of output rows of C written densely, multiplied by torch's GEMM.
//
// Values are decoded by kind: 0 = int8 (integer convert), 1 = 1-byte code through a 256-entry float
// table (float8_e4m3fn), 2 = bfloat16 (bit shift), 3 = int4 (unpacked to int8 per chunk of outputs, in L1,
// then served by the int8 kernels). Mask bits at positions >= k are zero (checked at
// load), so no atom outside the shard is ever touched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VPOPCNTDQ__)
#define COSPADI_AVX512 1
#include <immintrin.h>
#else
#define COSPADI_AVX512 0
#endif
// AVX2 + FMA (x86-64-v3: AMD Zen 2/3, desktop CPUs) where AVX-512 is missing: the float32 decode kernel
// and the expanded tiles, eight atom lanes at a time.
#if !COSPADI_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define COSPADI_AVX2 1
#else
#define COSPADI_AVX2 0
#endif
#if COSPADI_AVX512 && defined(__AVX512BF16__)
#define COSPADI_AVX512_BF16 1
#else
#define COSPADI_AVX512_BF16 0
#endif
#if COSPADI_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI2__)
#define COSPADI_AVX512_INT16 1
#else
#define COSPADI_AVX512_INT16 0
#endif

namespace {

constexpr int kInt8 = 0;
constexpr int kTable = 1;
constexpr int kBf16 = 2;
constexpr int kInt4 = 3;  // two per byte: unpacked to int8 per chunk of outputs (for_output_chunks)
// Rows of Z per pass over a column of C: the accumulators stay in registers (2 per row in float32,
// 1 per row with bf16 dot products; 32 zmm registers in all).
constexpr int kRowBlock = 8;
constexpr int kRowBlockBf16 = 16;

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__)
#include <immintrin.h>
// Sum of the 8 float lanes of an AVX register.
inline float sum8f(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// z [M, K] float32 = x [M, in] · D for few rows, D given as dictionary_t [K, in] (bf16): one atom's row of
// D at a time against blocks of x rows that stay in L1 (down_proj's 8 rows × 1536 bf16 inputs = 24 KB did
// not), kernels[r - 1] taking r rows. x is bfloat16 (as uint16_t) or float32.
template <typename X, size_t N>
at::Tensor atom_by_atom(const at::Tensor& x, const X* xp, const at::Tensor& dictionary_t,
                        const std::array<void (*)(const X*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t),
                                         N>& kernels) {
  const int64_t m = x.size(0), in = x.size(1), k = dictionary_t.size(0), ldx = x.stride(0);
  at::Tensor z = at::empty({m, k}, x.options().dtype(at::kFloat));
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dictionary_t.data_ptr<at::BFloat16>());
  float* zp = z.data_ptr<float>();
  // bf16 x: blocks of rows that fit 16 KiB (tuned on AVX-512). float32 x: up to 64 KiB, i.e. all 8 rows
  // of down_proj from L2 — with AVX2's 16 registers, splitting rows into more passes cost more (each pass
  // widens D again, for fewer FMAs) than reading x from L2 (NOTES.md item 46: down 10.4 -> 7.9 ms).
  const int64_t budget = std::is_same_v<X, float> ? 64 << 10 : 16 << 10;
  const int64_t rows_per_block = std::clamp<int64_t>(budget / (in * int64_t(sizeof(X))), 1, int64_t(N));
  at::parallel_for(0, k, 32, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t r0 = 0; r0 < m; r0 += rows_per_block)
        kernels[std::min(rows_per_block, m - r0) - 1](xp + r0 * ldx, ldx, dp, in, t, zp + r0 * k, k);
  });
  return z;
}
#endif

// {kernel<1>, …, kernel<N>}: one instantiation per row count, indexed by rows - 1. ``make(r)`` returns
// the kernel for r = std::integral_constant<int, rows>.
template <typename Make, int... R>
constexpr auto row_kernels_of(Make make, std::integer_sequence<int, R...>) {
  return std::array{make(std::integral_constant<int, R + 1>{})...};
}
template <int N, typename Make>
constexpr auto row_kernels(Make make) {
  return row_kernels_of(make, std::make_integer_sequence<int, N>{});
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
  int64_t values_row_bytes;  // row stride of the values
  int kind;
  int64_t n;  // outputs (rows of the mask)
  int64_t values_first_row = 0;  // the output whose values `values` points at (a chunk's first; else 0)
  int64_t values_row_width = 0;  // bytes of a row that hold values (int4: read by the unpacking)
};

// Output j's values (column j of C, in atom order).
inline const uint8_t* column_values(const Coefficients& c, int64_t j) {
  return c.values + (j - c.values_first_row) * c.values_row_bytes;
}

// int4 values (two per byte, low nibble first, two's complement) are held packed. Every kernel reads
// 1-byte int8 values, so each thread unpacks the rows of the outputs it is about to multiply, a chunk at
// a time, into an int8 buffer that stays in L1 (kInt4ChunkBytes): C is read from memory at its stored
// size and never expanded whole; the unpacking adds ~1 instruction per 8 values, in cache.
constexpr int64_t kInt4ChunkBytes = 16 << 10;
constexpr int64_t kInt4Padding = 64;  // after the buffer: the kernels' whole-vector loads stay inside it

// rows × width packed bytes (row stride src_stride) → rows × 2·width int8 values (row stride 2·width).
void unpack_int4_rows(const uint8_t* src, int64_t src_stride, int64_t rows, int64_t width, int8_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = src + r * src_stride;
    int8_t* out = dst + r * 2 * width;
    int64_t b = 0;
#if defined(__SSE2__)
    const __m128i low4 = _mm_set1_epi8(0x0F), sign = _mm_set1_epi8(8);
    for (; b + 16 <= width; b += 16) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + b));
      // (n ^ 8) - 8 sign-extends a 4-bit two's complement code n.
      const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(packed, low4), sign), sign);
      const __m128i hi = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), sign), sign);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * b), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * b + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; b < width; ++b) {
      out[2 * b] = static_cast<int8_t>(((in[b] & 0x0F) ^ 8) - 8);
      out[2 * b + 1] = static_cast<int8_t>(((in[b] >> 4) ^ 8) - 8);
    }
  }
}

// Runs body(coefficients, begin, end) over outputs [begin, end): as they are, or — int4 values — chunk by
// chunk of outputs, each with a view whose int8 values are that chunk's unpacked rows (multiples of 4
// outputs, so the kernels' 2- and 4-column blocks stay whole inside a chunk).
template <typename Body>
void for_output_chunks(const Coefficients& c, int64_t begin, int64_t end, Body body) {
  if (c.kind != kInt4) {
    body(c, begin, end);
    return;
  }
  const int64_t row_bytes = 2 * c.values_row_width;
  const int64_t chunk = std::max<int64_t>(4, kInt4ChunkBytes / std::max<int64_t>(row_bytes, 1) / 4 * 4);
  std::vector<int8_t> buffer(std::min(chunk, end - begin) * row_bytes + kInt4Padding, 0);
  const uint8_t* unpacked = reinterpret_cast<const uint8_t*>(buffer.data());
  for (int64_t first = begin; first < end; first += chunk) {
    const int64_t rows = std::min(chunk, end - first);
    unpack_int4_rows(c.values + first * c.values_row_bytes, c.values_row_bytes, rows, c.values_row_width, buffer.data());
    Coefficients chunk_view = c;
    chunk_view.values = unpacked;
    chunk_view.values_end = unpacked + buffer.size();
    chunk_view.values_row_bytes = row_bytes;
    chunk_view.values_row_width = row_bytes;
    chunk_view.values_first_row = first;
    chunk_view.kind = kInt8;
    body(static_cast<const Coefficients&>(chunk_view), first, first + rows);
  }
}

// Calls visit(atom, value) for output j's non-zeros, atom relative to its shard, in atom order
// (the portable bit walk both portable kernels share).
template <typename Visit>
inline void for_each_coefficient(const Coefficients& c, int64_t j, Visit visit) {
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = column_values(c, j);
  int64_t t = 0;
  for (int64_t w = 0; w < c.words; ++w) {
    for (uint32_t bits = mask[w]; bits; bits &= bits - 1)
      visit(w * 32 + __builtin_ctz(bits), decode_value(values, t++, c.kind, c.table));
  }
}

// One output column, rows [m0, m0 + rows) of Z, any CPU.
void column_portable(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, int64_t rows,
                     float* y, int64_t ldy) {
  float acc[kRowBlock] = {0};
  const float* zrow = z + m0 * ldz + c.offsets[j];
  for_each_coefficient(c, j, [&](int64_t atom, float v) {
    for (int64_t r = 0; r < rows; ++r) acc[r] += v * zrow[r * ldz + atom];
  });
  for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + j] = acc[r] * c.scales[j];
}

#if COSPADI_AVX2
// For each mask byte, the packed value that lands in each of its 8 atom lanes: lane i takes value
// number popcount(bits below i). The sign bit of a lane's entry says whether its bit is set (the
// permute reads only the low 3 bits): the entry is at once the permute index, the masked-load mask and
// the blend mask, one load instead of a broadcast, an AND and a compare per byte (NOTES.md item 47).
struct ByteLanes {
  alignas(32) int32_t index[256][8];
};
constexpr ByteLanes make_byte_lanes() {
  ByteLanes t{};
  for (int byte = 0; byte < 256; ++byte) {
    int rank = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool set = byte >> lane & 1;
      t.index[byte][lane] = set ? static_cast<int32_t>(0x80000000u | static_cast<uint32_t>(rank)) : 0;
      rank += set;
    }
  }
  return t;
}
constexpr ByteLanes kByteLanes = make_byte_lanes();

// The permute index of a mask byte, sign bit set in the lanes whose bit is set.
inline __m256i byte_lanes(uint32_t byte) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteLanes.index[byte]));
}

// Up to 8 packed values at p as float32 lanes 0..count-1. Near the end of the tensor a plain 8- or
// 16-byte load could run past the allocation: the values are copied out first there.
inline __m256 packed8(const uint8_t* p, const uint8_t* end, int count, int kind, const float* table) {
  const int64_t width = kind == kBf16 ? 2 : 1;
  alignas(16) uint8_t copy[16] = {0};
  if (p + 8 * width > end) {
    std::memcpy(copy, p, count * width);
    p = copy;
  }
  if (kind == kBf16) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (kind == kInt8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(raw), 4);
}

// The values of one mask byte in their 8 atom lanes (zero where the bit is clear); advances *values.
inline __m256 byte_values(uint32_t byte, const uint8_t** values, const Coefficients& c, __m256i lanes) {
  const int count = __builtin_popcount(byte);
  const __m256 packed = packed8(*values, c.values_end, count, c.kind, c.table);
  *values += count * (c.kind == kBf16 ? 2 : 1);
  return _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(packed, lanes), _mm256_castsi256_ps(lanes));
}

template <int R>
void column_vector(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, float* y, int64_t ldy) {
  // Below 4 rows, two accumulators per row (even / odd bytes of the mask words) split the FMA latency
  // chain; from 4 rows on the rows' own chains suffice, and a second set would not fit AVX2's 16
  // registers beside the values, lanes and Z (at 8 rows GCC spilled every accumulator).
  // The loops over rows and bytes are unrolled by pragma before scalar replacement: without it GCC kept
  // every accumulator on the stack (a load and a store around each FMA).
  constexpr int kSets = R >= 4 ? 1 : 2;
  __m256 acc[kSets][R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[0][r] = acc[kSets - 1][r] = _mm256_setzero_ps();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = column_values(c, j);
  const float* zrow = z + m0 * ldz + c.offsets[j];
  for (int64_t w = 0; w < c.words; ++w) {
    #pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = mask[w] >> (8 * b) & 0xFF;
      if (!byte) continue;
      const __m256i lanes = byte_lanes(byte);
      const __m256 v = byte_values(byte, &values, c, lanes);
      // Masked loads: lanes of clear bits are neither read nor faulted (the shard may end here).
      const float* zb = zrow + w * 32 + 8 * b;
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __m256& a = acc[b % kSets][r];
        a = _mm256_fmadd_ps(v, _mm256_maskload_ps(zb + r * ldz, lanes), a);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m256 sum = kSets == 2 ? _mm256_add_ps(acc[0][r], acc[kSets - 1][r]) : acc[0][r];
    y[(m0 + r) * ldy + j] = sum8f(sum) * c.scales[j];
  }
}

// One row of C stored densely (the expanded-tile prefill path), eight atoms at a time.
template <typename T>
void expand_row_avx2(const Coefficients& c, int64_t j, int64_t width, T* row) {
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = column_values(c, j);
  const __m256 scale = _mm256_set1_ps(c.scales[j]);
  alignas(32) float lanes[8];
  for (int64_t start = 0; start < width; start += 8) {
    const int64_t w = start / 32;
    const uint32_t byte = w < c.words ? mask[w] >> (start % 32) & 0xFF : 0;
    const __m256 v = _mm256_mul_ps(scale, byte_values(byte, &values, c, byte_lanes(byte)));
    const int64_t inside = std::min<int64_t>(8, width - start);
    if constexpr (std::is_same_v<T, float>) {
      if (inside == 8) {
        _mm256_storeu_ps(row + start, v);
        continue;
      }
    }
    _mm256_store_ps(lanes, v);
    for (int64_t i = 0; i < inside; ++i) row[start + i] = static_cast<T>(lanes[i]);
  }
}
#endif

#if COSPADI_AVX512
// Lane i of a 16-lane group takes value number popcount(bits below i) of the group: computed for all
// lanes at once (broadcast, AND with the lane's prefix mask, per-lane popcount), then a lane permute
// of the group's values (converted to float) puts each in place. Plain loads: masked loads and
// vpexpand are slow on AMD Zen 4 (NOTES.md); only the last 64 bytes of the tensor, where a plain
// load could run past the allocation, take the masked form.
__attribute__((always_inline)) inline __m512 group_values(const uint8_t* p, const uint8_t* end, __mmask16 mk, __m512i ranks, int kind,
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

// The 32 values of one mask word in their atom lanes (zero where the bit is clear), as float32:
// low 16 lanes in *lo, high 16 in *hi; advances *values past them. Shared by every AVX-512 kernel.
__attribute__((always_inline)) inline void word_values(uint32_t bits, const uint8_t** values, const Coefficients& c, __m512* lo, __m512* hi) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i below_lo = _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_set1_epi32(1), lane), _mm512_set1_epi32(1));
  const __m512i below_hi = _mm512_slli_epi32(below_lo, 16);  // the high half's bits below the lane
  const int64_t value_bytes = c.kind == kBf16 ? 2 : 1;
  const __m512i word = _mm512_set1_epi32(static_cast<int>(bits));
  const int64_t n_lo = __builtin_popcount(bits & 0xFFFFu);
  *lo = group_values(*values, c.values_end, static_cast<__mmask16>(bits),
                     _mm512_popcnt_epi32(_mm512_and_si512(word, below_lo)), c.kind, c.table);
  *hi = group_values(*values + n_lo * value_bytes, c.values_end, static_cast<__mmask16>(bits >> 16),
                     _mm512_popcnt_epi32(_mm512_and_si512(word, below_hi)), c.kind, c.table);
  *values += __builtin_popcount(bits) * value_bytes;
}

// float32 lanes rounded to bfloat16 (nearest even, as c10::BFloat16 does; values here are finite).
inline __m512i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

template <int R>
void column_vector(const Coefficients& c, int64_t j, const float* z, int64_t ldz, int64_t m0, float* y,
                   int64_t ldy) {
  // Two accumulators per row (low / high 16 bits of each mask word): the halves are independent,
  // so the FMA latency chain is split in two. Row loops unrolled by pragma, as in the AVX2 kernel (GCC
  // kept the accumulators on the stack from 4 rows on without it).
  __m512 lo[R], hi[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = column_values(c, j);
  const float* zrow = z + m0 * ldz + c.offsets[j];
  for (int64_t w = 0; w < c.words; ++w) {
    const uint32_t bits = mask[w];
    const __mmask16 mk_lo = static_cast<__mmask16>(bits), mk_hi = static_cast<__mmask16>(bits >> 16);
    __m512 v_lo, v_hi;
    word_values(bits, &values, c, &v_lo, &v_hi);
    // Masked loads: lanes of clear bits are neither read nor faulted (the shard may end here).
    const float* zw = zrow + w * 32;
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm512_fmadd_ps(v_lo, _mm512_maskz_loadu_ps(mk_lo, zw + r * ldz), lo[r]);
      hi[r] = _mm512_fmadd_ps(v_hi, _mm512_maskz_loadu_ps(mk_hi, zw + r * ldz + 16), hi[r]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + j] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r])) * c.scales[j];
}


#endif

#if COSPADI_AVX512 || COSPADI_AVX2
// The float32 decode kernels for 1..kRowBlock rows (column_vector: the AVX-512 or the AVX2 one).
constexpr auto kFp32Kernels = row_kernels<kRowBlock>([](auto r) { return &column_vector<r()>; });
#endif

#if COSPADI_AVX512
#if COSPADI_AVX512_BF16
// The 32 values of one mask word as bf16 lanes (zero where the bit is clear); advances *values.
__attribute__((always_inline)) inline __m512bh word_values_bf16(uint32_t bits, const uint8_t** values, const Coefficients& c) {
  __m512 v_lo, v_hi;
  word_values(bits, values, c, &v_lo, &v_hi);
  return _mm512_cvtne2ps_pbh(v_hi, v_lo);  // lanes 0-15 from v_lo, 16-31 from v_hi
}

// bfloat16 Z (what a bf16 model's x·D gives): both halves of a mask word become one 32-lane bf16
// vector of values (exact: int8, e4m3 and bf16 values all fit bf16), and one vdpbf16ps per word and
// row replaces two float32 FMAs (products exact, sums in float32). P adjacent columns of one shard
// share each load of Z (the union of their masks; a lane outside a column's mask has value 0).
template <int R, int P>
void columns_avx512_bf16(const Coefficients& c, int64_t j, const uint16_t* z, int64_t ldz, int64_t m0, float* y,
                         int64_t ldy) {
  // Loops unrolled by pragma so that the accumulators stay in registers (GCC spilled them otherwise).
  __m512 acc[P][R];
  const uint32_t* mask[P];
  const uint8_t* values[P];
  #pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_ps();
    mask[p] = reinterpret_cast<const uint32_t*>(c.mask + (j + p) * c.words);
    values[p] = column_values(c, j + p);
  }
  const uint16_t* zrow = z + m0 * ldz + c.offsets[j];
  for (int64_t w = 0; w < c.words; ++w) {
    __m512bh v[P];
    uint32_t any = 0;
    #pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      any |= mask[p][w];
      v[p] = word_values_bf16(mask[p][w], &values[p], c);
    }
    const uint16_t* zw = zrow + w * 32;
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh zr = (__m512bh)_mm512_maskz_loadu_epi16(any, zw + r * ldz);
      #pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[p][r] = _mm512_dpbf16_ps(acc[p][r], v[p], zr);
    }
  }
  #pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + j + p] = _mm512_reduce_add_ps(acc[p][r]) * c.scales[j + p];
}

using Bf16Kernel = void (*)(const Coefficients&, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t);
template <int P, int... R>
constexpr auto bf16_kernels(std::integer_sequence<int, R...>) {
  return std::array<Bf16Kernel, sizeof...(R)>{&columns_avx512_bf16<R + 1, P>...};
}
constexpr auto kBf16Kernels = bf16_kernels<1>(std::make_integer_sequence<int, kRowBlockBf16>{});
// Two columns at a time up to 8 rows (2·8 accumulators + 8 Z vectors fit the 32 registers).
constexpr int kPairMaxRows = 8;
constexpr auto kBf16PairKernels = bf16_kernels<2>(std::make_integer_sequence<int, kPairMaxRows>{});
#endif

#if COSPADI_AVX512_INT16
// int8 values × int16 Z (each row of Z scaled to ±32767 by quantize_rows): a mask word's 32 values
// reach their atom lanes with one vpexpandb (register form) and one sign extension, against ~14
// vector ops for the float lane placement above, and one vpdpwssd per word and row multiplies 32
// atoms exactly in int32 — no float conversion of C at all.
// Overflow: a lane takes 2 products of at most 128 · 32767 per word, so 255 words fit in int32; longer
// rows are summed in chunks of 255 words into float32.
constexpr int64_t kInt16ChunkWords = 255;
// Register blocking: up to 8 rows of Z × 2 columns of C = 16 int32 accumulators, 2 expanded value
// vectors, one Z vector. Chosen on SmolLM2's gate_up with C coming from DRAM, as in serving (30
// layers rotated, 2 threads; benchmarks/results/NOTES.md item 27): 8 × 2 98–110 µs at M = 8 and
// 40–45 µs at M = 1; 4 × 4, the fastest with C in cache, took 187 / 133 µs there.
constexpr int kInt16Rows = 8;
constexpr int kInt16Cols = 2;

// acc + the int16 pair products of a and b (vpdpwssd). With the intrinsic, GCC 12 copies every
// accumulator to a fresh register and back on each call and spills at 16+ accumulators (the 6 × 4
// block ran at a third of its rate); the asm, and the loops over the accumulator arrays unrolled by
// pragma before scalar replacement, keep each accumulator in one register.
__attribute__((always_inline)) inline __m512i dot_accumulate(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The 32 int8 values of one mask word in their atom lanes (zero where the bit is clear), as int8 or
// sign-extended to int16; advances *values. Tail: the column's values lie within 32 bytes of the
// tensor's end, where a plain 32-byte load could run past the allocation — a masked load, in its own
// instantiation so that every other column's loop has no branch.
template <bool Tail>
__attribute__((always_inline)) inline __m256i word_values_int8(uint32_t bits, const uint8_t** values) {
  const int n = __builtin_popcount(bits);
  const __m256i raw = Tail ? _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << n) - 1), *values)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(*values));
  *values += n;
  return _mm256_maskz_expand_epi8(bits, raw);
}

template <bool Tail>
__attribute__((always_inline)) inline __m512i word_values_int16(uint32_t bits, const uint8_t** values) {
  return _mm512_cvtepi8_epi16(word_values_int8<Tail>(bits, values));
}

template <typename Out>
inline void store(Out* y, int64_t i, float v) {
  y[i] = static_cast<Out>(v);  // c10::BFloat16 rounds to nearest even
}

// Four float32 lanes as bfloat16 bits (low 64 bits), rounded as c10::BFloat16 does (nearest even;
// NaN → 0x7FC0).
inline __m128i bf16x4(__m128 v) {
  const __m128i bits = _mm_castps_si128(v);
  const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  __m128i rounded = _mm_srli_epi32(_mm_add_epi32(bits, _mm_add_epi32(odd, _mm_set1_epi32(0x7FFF))), 16);
  rounded = _mm_blendv_epi8(rounded, _mm_set1_epi32(0x7FC0), _mm_castps_si128(_mm_cmpunord_ps(v, v)));
  return _mm_packus_epi32(rounded, rounded);
}

// Four outputs in a row.
inline void store4(float* y, __m128 v) { _mm_storeu_ps(y, v); }
inline void store4(c10::BFloat16* y, __m128 v) { _mm_storel_epi64(reinterpret_cast<__m128i*>(y), bf16x4(v)); }

// Lanes 0-1 to y0, lanes 2-3 to y1 (two outputs of two rows).
inline void store2x2(float* y0, float* y1, __m128 v) {
  _mm_storel_pi(reinterpret_cast<__m64*>(y0), v);
  _mm_storeh_pi(reinterpret_cast<__m64*>(y1), v);
}
inline void store2x2(c10::BFloat16* y0, c10::BFloat16* y1, __m128 v) {
  const __m128i b = bf16x4(v);
  const uint32_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(b)), hi = static_cast<uint32_t>(_mm_extract_epi32(b, 1));
  std::memcpy(y0, &lo, sizeof lo);
  std::memcpy(y1, &hi, sizeof hi);
}

// Four float32 sums at once: lane i of the result = the sum of all 16 lanes of v[i]. A shuffle tree
// (13 vector ops for 4 sums) instead of four separate horizontal reductions (~8 ops each); with
// ~17 mask words per column on SmolLM2's gate_up the reductions were a third of the blocked kernel.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // per 128-bit block
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Words [w0, w1) of columns mask[0..P) (at most kInt16ChunkWords) against rows 0..R-1 of zw (Z from the
// columns' shard offset on): adds the R × P sums to total, four per vector — P = 2: total[r / 2] =
// (row r, column 0), (r, 1), (r + 1, 0), (r + 1, 1); P = 1: total[r / 4] = rows r .. r + 3.
template <int R, int P, bool Tail>
inline void dot_words(const uint32_t* const* mask, const uint8_t** values, const int16_t* zw,
                      int64_t ldq, int64_t w0, int64_t w1, __m128* total) {
  static_assert(P == 1 || P == 2);
  __m512i acc[P][R];
  #pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_si512();
  const uint8_t* v_ptr[P];
  #pragma GCC unroll 16
  for (int p = 0; p < P; ++p) v_ptr[p] = values[p];
  for (int64_t w = w0; w < w1; ++w) {
    __m512i v[P];
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p) v[p] = word_values_int16<Tail>(mask[p][w], &v_ptr[p]);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      // Z rows are zero-padded past the last shard's last word (coef_product_int16).
      __m512i zr = _mm512_loadu_si512(zw + r * ldq + w * 32);
      // Keep Z in a register: GCC otherwise folds it into each dot as a memory operand, loading it
      // P times (0.39 → 0.31 ns per row and column-word with C in cache).
      __asm__("" : "+v"(zr));
      #pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc[p][r] = dot_accumulate(acc[p][r], v[p], zr);
    }
  }
  #pragma GCC unroll 16
  for (int p = 0; p < P; ++p) values[p] = v_ptr[p];
  // Row r of column p as float32 (zero past the last row).
  const auto lanes = [&](int p, int r) { return r < R ? _mm512_cvtepi32_ps(acc[p][r]) : _mm512_setzero_ps(); };
  if constexpr (P == 2) {
    #pragma GCC unroll 16
    for (int r = 0; r < R; r += 2)
      total[r / 2] = _mm_add_ps(total[r / 2], sum4(lanes(0, r), lanes(1, r), lanes(0, r + 1), lanes(1, r + 1)));
  } else {
    #pragma GCC unroll 16
    for (int r = 0; r < R; r += 4)
      total[r / 4] = _mm_add_ps(total[r / 4], sum4(lanes(0, r), lanes(0, r + 1), lanes(0, r + 2), lanes(0, r + 3)));
  }
}

// Columns j .. j+P-1 (one shard, `words` mask words each), rows m0 .. m0+R-1 of the quantized Z.
template <int R, int P, bool Tail, typename Out>
void columns_avx512_int16(const Coefficients& c, int64_t j, int64_t words, const int16_t* zq, int64_t ldq,
                          const float* zscale, int64_t m0, Out* y, int64_t ldy) {
  const uint32_t* mask[P];
  const uint8_t* values[P];
  constexpr int kTotals = P == 2 ? (R + 1) / 2 : (R + 3) / 4;
  __m128 total[kTotals];
  for (int i = 0; i < kTotals; ++i) total[i] = _mm_setzero_ps();
  for (int p = 0; p < P; ++p) {
    mask[p] = reinterpret_cast<const uint32_t*>(c.mask + (j + p) * c.words);
    values[p] = column_values(c, j + p);
  }
  for (int64_t w0 = 0; w0 < words; w0 += kInt16ChunkWords)
    dot_words<R, P, Tail>(mask, values, zq + m0 * ldq + c.offsets[j], ldq, w0, std::min(words, w0 + kInt16ChunkWords),
                          total);
  // The same float32 operations, in the same order, as the many-row kernel: (sum · row scale) · column scale.
  if constexpr (P == 2) {
    const __m128 column_scale = _mm_set_ps(c.scales[j + 1], c.scales[j], c.scales[j + 1], c.scales[j]);
    for (int r = 0; r < R; r += 2) {
      const float next = r + 1 < R ? zscale[m0 + r + 1] : 0.f;
      const __m128 v = _mm_mul_ps(_mm_mul_ps(total[r / 2], _mm_set_ps(next, next, zscale[m0 + r], zscale[m0 + r])),
                                  column_scale);
      if (r + 1 < R) {
        store2x2(y + (m0 + r) * ldy + j, y + (m0 + r + 1) * ldy + j, v);
      } else {
        alignas(16) float out[4];
        _mm_store_ps(out, v);
        store(y, (m0 + r) * ldy + j, out[0]);
        store(y, (m0 + r) * ldy + j + 1, out[1]);
      }
    }
  } else {
    for (int r = 0; r < R; r += 4) {
      alignas(16) float sums[4];
      _mm_store_ps(sums, total[r / 4]);
      for (int i = 0; i < 4 && r + i < R; ++i)
        store(y, (m0 + r + i) * ldy + j, sums[i] * zscale[m0 + r + i] * c.scales[j]);
    }
  }
}

template <typename Out>
using Int16Kernel = void (*)(const Coefficients&, int64_t, int64_t, const int16_t*, int64_t, const float*, int64_t, Out*,
                             int64_t);
template <typename Out, int P, bool Tail, int... R>
constexpr auto int16_kernels(std::integer_sequence<int, R...>) {
  return std::array<Int16Kernel<Out>, sizeof...(R)>{&columns_avx512_int16<R + 1, P, Tail, Out>...};
}
template <typename Out>
struct Int16Kernels {
  static constexpr auto block = int16_kernels<Out, kInt16Cols, false>(std::make_integer_sequence<int, kInt16Rows>{});
  static constexpr auto single = int16_kernels<Out, 1, false>(std::make_integer_sequence<int, kInt16Rows>{});
  static constexpr auto tail = int16_kernels<Out, 1, true>(std::make_integer_sequence<int, kInt16Rows>{});
};

// Writes one row of Z as int16 [ldq] (zero after column K), scaled to ±32767 by its peak |z|, and its
// scale = peak / 32767 (1 for an all-zero row; NaN for a row holding inf or NaN, whose outputs then
// become NaN, as a float GEMM's would). lanes(t, in) gives Z[t .. t+16) as float32 (masked by in).
// Rounding is to nearest even (the default MXCSR mode).
template <typename Lanes>
inline void write_scaled_row(Lanes lanes, int64_t k, float peak, bool non_finite, int16_t* out, int64_t ldq,
                             float* scale) {
  if (non_finite) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    std::fill(out, out + ldq, int16_t(0));
    return;
  }
  *scale = peak > 0.f ? peak / 32767.f : 1.f;
  const __m512 inv = _mm512_set1_ps(peak > 0.f ? 32767.f / peak : 0.f);
  for (int64_t t = 0; t < k; t += 16) {
    const __mmask16 in = k - t >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (k - t)) - 1);
    _mm256_mask_storeu_epi16(out + t, in, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lanes(t, in), inv))));
  }
  std::fill(out + k, out + ldq, int16_t(0));
}

// bfloat16 Z [M, K] → int16 [M, ldq] and scale [M] (write_scaled_row). Serial and vectorised (M·K is
// small next to the product): a parallel region of its own costs more than the work in vLLM's thread
// setup. |bf16| bit patterns order like the magnitudes, so the peak is an unsigned 16-bit max.
void quantize_rows(const uint16_t* z, int64_t m, int64_t k, int64_t ldz, int16_t* zq, int64_t ldq, float* scale) {
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), exponent = _mm512_set1_epi16(0x7F80);
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* row = z + r * ldz;
    __m512i peak_bits = _mm512_setzero_si512();
    __mmask32 non_finite = 0;
    for (int64_t t = 0; t < k; t += 32) {
      const __mmask32 in = k - t >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (k - t)) - 1);
      const __m512i h = _mm512_maskz_loadu_epi16(in, row + t);
      peak_bits = _mm512_max_epu16(peak_bits, _mm512_and_si512(h, magnitude));
      non_finite |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, exponent), exponent);
    }
    const float peak = bf16_bits_to_float(static_cast<uint16_t>(_mm512_reduce_max_epu32(_mm512_cvtepu16_epi32(
        _mm256_max_epu16(_mm512_castsi512_si256(peak_bits), _mm512_extracti64x4_epi64(peak_bits, 1))))));
    const auto lanes = [row](int64_t t, __mmask16 in) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, row + t)), 16));
    };
    write_scaled_row(lanes, k, peak, non_finite != 0, zq + r * ldq, ldq, scale + r);
  }
}

// The same from float32 Z (the fused layer op's x·D, never rounded to bf16).
void quantize_rows(const float* z, int64_t m, int64_t k, int64_t ldz, int16_t* zq, int64_t ldq, float* scale) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = z + r * ldz;
    const auto lanes = [row](int64_t t, __mmask16 in) { return _mm512_maskz_loadu_ps(in, row + t); };
    __m512 peak = _mm512_setzero_ps();
    __mmask16 non_finite = 0;
    for (int64_t t = 0; t < k; t += 16) {
      const __mmask16 in = k - t >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (k - t)) - 1);
      const __m512 v = lanes(t, in);
      peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
      non_finite |= _mm512_fpclass_ps_mask(v, 0x01 | 0x80 | 0x08 | 0x10);  // QNaN, SNaN, +inf, -inf
    }
    write_scaled_row(lanes, k, _mm512_reduce_max_ps(peak), non_finite != 0, zq + r * ldq, ldq, scale + r);
  }
}

// Many rows of Z (M > kInt16Rows: prefill and large decode batches). Each column's words are expanded
// to int16 lanes once per chunk of kInt16ChunkRows rows, into a buffer in L1, and reused by every block
// of kBlockRows rows; kBlockCols columns of one shard share each load of Z. Register blocking: 6 rows ×
// 4 columns = 24 int32 accumulators + 4 value vectors + 1 Z vector.
constexpr int kBlockRows = 6;
constexpr int kBlockCols = 4;
constexpr int64_t kInt16ChunkRows = 96;  // Z rows per pass over a thread's columns (≤ 200 KB: stays in L2)

// The int16 lanes of column col's first `words` mask words into lanes [words × 32].
template <bool Tail>
void expand_column_int16(const Coefficients& c, int64_t col, int64_t words, int16_t* lanes) {
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + col * c.words);
  const uint8_t* values = column_values(c, col);
  for (int64_t w = 0; w < words; ++w) _mm512_storeu_si512(lanes + w * 32, word_values_int16<Tail>(mask[w], &values));
}

// Rows m0 .. m0+R-1 × P columns whose expanded lanes are lanes[p * words * 32 ...]: adds the sums to
// total[r] (lane p of total[r] = row r, column p; P = 1 uses lane 0).
template <int R, int P>
inline void block_from_lanes(const int16_t* lanes, int64_t words, const int16_t* zw, int64_t ldq, __m128* total) {
  for (int64_t w0 = 0; w0 < words; w0 += kInt16ChunkWords) {
    const int64_t w1 = std::min(words, w0 + kInt16ChunkWords);
    __m512i acc[P][R];
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_si512();
    for (int64_t w = w0; w < w1; ++w) {
      __m512i v[P];
      #pragma GCC unroll 16
      for (int p = 0; p < P; ++p) v[p] = _mm512_loadu_si512(lanes + (p * words + w) * 32);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __m512i zr = _mm512_loadu_si512(zw + r * ldq + w * 32);
        __asm__("" : "+v"(zr));  // one load of Z per row and word, not one per column (see dot_words)
        #pragma GCC unroll 16
        for (int p = 0; p < P; ++p) acc[p][r] = dot_accumulate(acc[p][r], v[p], zr);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if constexpr (P == 4) {
        total[r] = _mm_add_ps(total[r], sum4(_mm512_cvtepi32_ps(acc[0][r]), _mm512_cvtepi32_ps(acc[1][r]),
                                             _mm512_cvtepi32_ps(acc[2][r]), _mm512_cvtepi32_ps(acc[3][r])));
      } else {
        total[r] = _mm_add_ss(total[r], _mm_set_ss(_mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[0][r]))));
      }
    }
  }
}

// Rows m0 .. m0+R-1, columns j .. j+P-1 from their expanded lanes; writes y.
template <int R, int P, typename Out>
void block_int16(const Coefficients& c, int64_t j, int64_t words, const int16_t* lanes, const int16_t* zq, int64_t ldq,
                 const float* zscale, int64_t m0, Out* y, int64_t ldy) {
  __m128 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm_setzero_ps();
  block_from_lanes<R, P>(lanes, words, zq + m0 * ldq + c.offsets[j], ldq, total);
  if constexpr (P == 4) {
    const __m128 column_scale = _mm_loadu_ps(c.scales + j);
    for (int r = 0; r < R; ++r)
      store4(y + (m0 + r) * ldy + j, _mm_mul_ps(_mm_mul_ps(total[r], _mm_set1_ps(zscale[m0 + r])), column_scale));
  } else {
    for (int r = 0; r < R; ++r) store(y, (m0 + r) * ldy + j, _mm_cvtss_f32(total[r]) * zscale[m0 + r] * c.scales[j]);
  }
}

template <typename Out>
using BlockKernel = void (*)(const Coefficients&, int64_t, int64_t, const int16_t*, const int16_t*, int64_t, const float*,
                             int64_t, Out*, int64_t);
template <typename Out, int P, int... R>
constexpr auto block_kernels(std::integer_sequence<int, R...>) {
  return std::array<BlockKernel<Out>, sizeof...(R)>{&block_int16<R + 1, P, Out>...};
}
template <typename Out>
struct BlockKernels {
  static constexpr auto wide = block_kernels<Out, kBlockCols>(std::make_integer_sequence<int, kBlockRows>{});
  static constexpr auto single = block_kernels<Out, 1>(std::make_integer_sequence<int, kBlockRows>{});
};

// Decode reads C once, from DRAM (SmolLM2 gate_up, M = 8, one core: ~270 µs with C from DRAM, 210 µs
// with C in cache). Prefetching kPrefetchColumns ahead (≈ 4 column pairs ≈ 0.4 µs of work) gained a
// little: M = 1 125 → 115 µs, M = 8 292 → 285 µs (best of 15, NOTES.md item 29).
constexpr int64_t kPrefetchColumns = 8;
inline void prefetch_columns(const Coefficients& c, int64_t col, int64_t count) {
  const char* mask = reinterpret_cast<const char*>(c.mask + col * c.words);
  const char* values = reinterpret_cast<const char*>(column_values(c, col));
  for (int64_t b = 0; b < count * c.words * 4; b += 64) _mm_prefetch(mask + b, _MM_HINT_T0);
  for (int64_t b = 0; b < count * c.values_row_bytes; b += 64) _mm_prefetch(values + b, _MM_HINT_T0);
}

// y [M, N]: the int16 path of coef_product (int8 values; Z bfloat16, or float32 from the fused op).
template <typename Out>
void coef_product_int16(const Coefficients& c, const at::Tensor& z, Out* y) {
  const int64_t m = z.size(0), k = z.size(1), n = c.n;
  // Each column walks only its own shard's words (merged shards pad their masks to the longest
  // shard: for SmolLM2's qkv, k and v would walk 9 words for 4). Shards are runs of equal offsets,
  // in increasing order; a shard ends where the next begins (the last at k).
  std::vector<int32_t> column_words(n);
  int64_t shard_end = k;
  for (int64_t j = n; j-- > 0;) {
    if (j + 1 < n && c.offsets[j + 1] != c.offsets[j]) shard_end = c.offsets[j + 1];
    TORCH_CHECK(c.offsets[j] <= shard_end, "atom_offsets must be non-decreasing");
    column_words[j] = static_cast<int32_t>(std::min<int64_t>(c.words, (shard_end - c.offsets[j] + 31) / 32));
  }
  // Every column reads its words of Z whole from its shard's offset: the padded row covers that,
  // and the padding is zero.
  const int64_t ldq = std::max<int64_t>(k, c.offsets[n - 1] + 32 * column_words[n - 1]);
  at::Tensor zq = at::empty({m, ldq}, z.options().dtype(at::kShort));
  at::Tensor zscale = at::empty({m}, z.options().dtype(at::kFloat));
  int16_t* q = zq.data_ptr<int16_t>();
  float* sc = zscale.data_ptr<float>();
  if (z.scalar_type() == at::kFloat)
    quantize_rows(z.data_ptr<float>(), m, k, z.stride(0), q, ldq, sc);
  else
    quantize_rows(reinterpret_cast<const uint16_t*>(z.data_ptr<at::BFloat16>()), m, k, z.stride(0), q, ldq, sc);
  // Columns whose 32-byte value loads could pass the end of the tensor (the last one or two).
  const auto near_end = [](const Coefficients& cc, int64_t col) { return column_values(cc, col + 1) + 32 > cc.values_end; };
  if (m <= kInt16Rows) {
    // Decode: one pass, C read once from memory; each word expanded in registers as it is used.
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for_output_chunks(c, begin, end, [&](const Coefficients& cc, int64_t first, int64_t last) {
        for (int64_t j = first; j < last;) {
          prefetch_columns(cc, std::min(j + kPrefetchColumns, last - 1), kInt16Cols);
          const bool block = j + kInt16Cols <= last && cc.offsets[j + kInt16Cols - 1] == cc.offsets[j] &&
                             !near_end(cc, j + kInt16Cols - 1);
          (block ? Int16Kernels<Out>::block : near_end(cc, j) ? Int16Kernels<Out>::tail : Int16Kernels<Out>::single)[m - 1](
              cc, j, column_words[j], q, ldq, sc, 0, y, n);
          j += block ? kInt16Cols : 1;
        }
      });
    });
    return;
  }
  int64_t max_words = 0;
  for (int64_t j = 0; j < n; ++j) max_words = std::max<int64_t>(max_words, column_words[j]);
  at::parallel_for(0, n, kBlockCols * 4, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> lanes(kBlockCols * max_words * 32);
    for (int64_t r0 = 0; r0 < m; r0 += kInt16ChunkRows) {
      const int64_t r1 = std::min(m, r0 + kInt16ChunkRows);
      for_output_chunks(c, begin, end, [&](const Coefficients& cc, int64_t first, int64_t last) {
        for (int64_t j = first; j < last;) {
          const int64_t words = column_words[j];
          const bool wide = j + kBlockCols <= last && cc.offsets[j + kBlockCols - 1] == cc.offsets[j];
          const int64_t cols = wide ? kBlockCols : 1;
          for (int64_t p = 0; p < cols; ++p)
            (near_end(cc, j + p) ? expand_column_int16<true> : expand_column_int16<false>)(
                cc, j + p, words, lanes.data() + p * words * 32);
          for (int64_t m0 = r0; m0 < r1; m0 += kBlockRows) {
            const int64_t rows = std::min<int64_t>(kBlockRows, r1 - m0);
            (wide ? BlockKernels<Out>::wide : BlockKernels<Out>::single)[rows - 1](cc, j, words, lanes.data(), q, ldq,
                                                                                   sc, m0, y, n);
          }
          j += cols;
        }
      });
    }
  });
}

#if COSPADI_AVX512_BF16
#define COSPADI_OWN_DICTIONARY_PRODUCT 1
// x·D for decode-sized M, D stored transposed (dictionary_t [K, in]: each atom's weights contiguous, so
// the kernel streams D once, front to back). Dot-product form like the int16 kernel: one atom × up to 8
// rows of x per pass (two atoms per pass read D as two interleaved streams, at half the DRAM rate), one
// vdpbf16ps per 32 inputs and row (products exact, sums float32). vLLM's oneDNN GEMM took 1.3–2× the
// DRAM time of D at M = 8 on SmolLM2's layers (NOTES.md item 30).
constexpr int kDictionaryRows = 8;  // rows of x up to which the own kernel serves (above: torch's GEMM)
constexpr int64_t kPrefetchBytes = 4096;

__attribute__((always_inline)) inline __m512 dot_accumulate_bf16(__m512 acc, __m512i a, __m512i b) {
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));  // see dot_accumulate
  return acc;
}

// z[r, t] (float32) for rows r < R of x and atom t: one vdpbf16ps per 32 inputs and row.
template <int R>
void atom_product(const uint16_t* x, int64_t ldx, const uint16_t* dt, int64_t in, int64_t t, float* z, int64_t ldz) {
  __m512 acc[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint16_t* d = dt + t * in;
  // Plain loads for whole steps of 32 inputs, masked loads only for the last partial step.
  const auto step = [&](int64_t i, __mmask32 live, bool whole) {
    // Each atom's row is only `in` values long: the hardware prefetcher did not follow the short rows
    // well (from DRAM 2× oneDNN's time, equal to it in cache), so fetch kPrefetchBytes ahead.
    _mm_prefetch(reinterpret_cast<const char*>(d + i) + kPrefetchBytes, _MM_HINT_T0);
    const __m512i dv = whole ? _mm512_loadu_si512(d + i) : _mm512_maskz_loadu_epi16(live, d + i);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i xr = whole ? _mm512_loadu_si512(x + r * ldx + i) : _mm512_maskz_loadu_epi16(live, x + r * ldx + i);
      acc[r] = dot_accumulate_bf16(acc[r], dv, xr);
    }
  };
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) step(i, ~__mmask32(0), true);
  if (i < in) step(i, static_cast<__mmask32>((1u << (in - i)) - 1), false);
  for (int r = 0; r < R; r += 4) {
    const auto lanes = [&](int q) { return r + q < R ? acc[r + q] : _mm512_setzero_ps(); };
    alignas(16) float sums[4];
    _mm_store_ps(sums, sum4(lanes(0), lanes(1), lanes(2), lanes(3)));
    for (int q = 0; q < 4 && r + q < R; ++q) z[(r + q) * ldz + t] = sums[q];
  }
}

constexpr auto kAtomKernels = row_kernels<kDictionaryRows>([](auto r) { return &atom_product<r()>; });

// z [M, K] float32 = x [M, in] (bfloat16) · D, D given as dictionary_t [K, in] (bfloat16), M ≤ kDictionaryRows.
at::Tensor dictionary_product_small(const at::Tensor& x, const at::Tensor& dictionary_t) {
  return atom_by_atom(x, reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), dictionary_t, kAtomKernels);
}
#endif
#endif
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define COSPADI_FLOAT_DICTIONARY_PRODUCT 1
// x·D for decode-sized M with float32 x (CPUs without bf16 matrix instructions serve float32) and D held
// in bf16, transposed: each atom's row of D is widened to float32 in registers (a shift), never copied
// (torch's GEMM needed a float32 copy of D on every call, a write and a read of twice D's bytes).
constexpr int kFloatDictionaryRows = 8;

inline __m256 widen_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// z[r, t] for rows r < R of x and atom t: 8 inputs per FMA and row.
template <int R>
void atom_product_f32(const float* x, int64_t ldx, const uint16_t* dt, int64_t in, int64_t t, float* z, int64_t ldz) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const uint16_t* d = dt + t * in;
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 dv = widen_bf16x8(d + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i), dv, acc[r]);
  }
  float rest[R] = {0};
  for (; i < in; ++i) {
    const float dv = bf16_bits_to_float(d[i]);
    for (int r = 0; r < R; ++r) rest[r] += x[r * ldx + i] * dv;
  }
  for (int r = 0; r < R; ++r) z[r * ldz + t] = sum8f(acc[r]) + rest[r];
}

constexpr auto kFloatAtomKernels = row_kernels<kFloatDictionaryRows>([](auto r) { return &atom_product_f32<r()>; });

// z [M, K] float32 = x [M, in] (float32) · D, D given as dictionary_t [K, in] (bfloat16), M ≤ kFloatDictionaryRows.
at::Tensor dictionary_product_float_small(const at::Tensor& x, const at::Tensor& dictionary_t) {
  return atom_by_atom(x, x.data_ptr<float>(), dictionary_t, kFloatAtomKernels);
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
                      static_cast<int>(value_kind),
                      coef_mask.size(0),
                      0,
                      coef_values.size(1) * coef_values.element_size()};
}

// The direct kernels (C read as stored, once per call); z float32, or bfloat16 with the BF16 kernel.
at::Tensor coef_product_direct(const Coefficients& c, const at::Tensor& z, int64_t value_kind, bool portable,
                               bool float_out) {
  const bool bf16 = z.scalar_type() == at::kBFloat16;
  const int64_t m = z.size(0), n = c.n, ldz = z.stride(0);
#if COSPADI_AVX512_INT16
  if (bf16 && (value_kind == kInt8 || value_kind == kInt4)) {
    at::Tensor out = at::empty({m, n}, z.options().dtype(float_out ? at::kFloat : at::kBFloat16));
    if (float_out)
      coef_product_int16(c, z, out.data_ptr<float>());
    else
      coef_product_int16(c, z, reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
#endif
  at::Tensor y = at::empty({m, n}, z.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const bool vector = (COSPADI_AVX512 || COSPADI_AVX2) && !portable;
  const int64_t block = bf16 ? kRowBlockBf16 : kRowBlock;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m; m0 += block) {
      const int64_t rows = std::min<int64_t>(block, m - m0);
      for_output_chunks(c, begin, end, [&](const Coefficients& cc, int64_t first, int64_t last) {
        for (int64_t j = first; j < last; ++j) {
#if COSPADI_AVX512_BF16
          if (bf16) {
            const uint16_t* zb = reinterpret_cast<const uint16_t*>(z.data_ptr<at::BFloat16>());
            if (rows <= kPairMaxRows && j + 1 < last && cc.offsets[j + 1] == cc.offsets[j]) {
              kBf16PairKernels[rows - 1](cc, j, zb, ldz, m0, yp, n);
              ++j;
            } else {
              kBf16Kernels[rows - 1](cc, j, zb, ldz, m0, yp, n);
            }
            continue;
          }
#endif
#if COSPADI_AVX512 || COSPADI_AVX2
          if (vector) {
            kFp32Kernels[rows - 1](cc, j, z.data_ptr<float>(), ldz, m0, yp, n);
            continue;
          }
#endif
          column_portable(cc, j, z.data_ptr<float>(), ldz, m0, rows, yp, n);
        }
      });
    }
  });
  return y;
}

template <typename T>
void expand_row_portable(const Coefficients& c, int64_t j, int64_t width, T* row) {
  std::fill(row, row + width, T(0));
  const float scale = c.scales[j];
  for_each_coefficient(c, j, [&](int64_t atom, float v) {
    if (atom < width) row[atom] = static_cast<T>(v * scale);
  });
}

#if COSPADI_AVX512
// The same lane placement as the decode kernel, stored densely (32 atoms per mask word).
template <typename T>
void expand_row_avx512(const Coefficients& c, int64_t j, int64_t width, T* row) {
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(c.mask + j * c.words);
  const uint8_t* values = column_values(c, j);
  const __m512 scale = _mm512_set1_ps(c.scales[j]);
  for (int64_t w = 0; w * 32 < width; ++w) {
    __m512 v_lo, v_hi;
    word_values(w < c.words ? mask[w] : 0, &values, c, &v_lo, &v_hi);
    v_lo = _mm512_mul_ps(scale, v_lo);
    v_hi = _mm512_mul_ps(scale, v_hi);
    const int64_t left = width - w * 32;  // lanes inside the row
    const uint32_t inside = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(row + w * 32, static_cast<__mmask16>(inside), v_lo);
      _mm512_mask_storeu_ps(row + w * 32 + 16, static_cast<__mmask16>(inside >> 16), v_hi);
    } else {
      const __m512i both = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16(v_lo), 16))),
          _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16(v_hi), 16)), 1);
      _mm512_mask_storeu_epi16(row + w * 32, inside, both);
    }
  }
}
#endif

template <typename T>
void expand_rows(const Coefficients& c, int64_t row_start, int64_t rows, int64_t width, T* out, bool portable) {
  at::parallel_for(row_start, row_start + rows, 16, [&](int64_t begin, int64_t end) {
    for_output_chunks(c, begin, end, [&](const Coefficients& cc, int64_t first, int64_t last) {
      for (int64_t j = first; j < last; ++j) {
        T* row = out + (j - row_start) * width;
#if COSPADI_AVX512
        if (!portable) {
          expand_row_avx512<T>(cc, j, width, row);
          continue;
        }
#elif COSPADI_AVX2
        if (!portable) {
          expand_row_avx2<T>(cc, j, width, row);
          continue;
        }
#endif
        expand_row_portable<T>(cc, j, width, row);
      }
    });
  });
}

// Prefill-sized M: per shard, tiles of C expanded densely (at most kTileBytes; a whole SmolLM2 shard, 1–2k
// output rows of an 8B layer) and multiplied by torch's GEMM straight into their columns of y.
// bfloat16 Z multiplies bfloat16 tiles (what a dense bf16 model does), other dtypes float32 tiles.
constexpr int64_t kTileBytes = 8 << 20;

at::Tensor coef_product_expanded(const Coefficients& c, const at::Tensor& z_in, bool portable) {
  const at::ScalarType tile_type = z_in.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor z = z_in.to(tile_type);
  const int64_t m = z.size(0), k_total = z.size(1), n = c.n;
  at::Tensor y = at::empty({m, n}, z.options());
  for (int64_t start = 0, end; start < n; start = end) {  // one shard (a run of equal offsets) at a time
    for (end = start; end < n && c.offsets[end] == c.offsets[start];) ++end;
    // The shard's own atoms: up to the next shard's first atom (merged masks are padded to the longest
    // shard's words; SmolLM2's qkv multiplied 236 columns of Z for k_proj's 118 atoms).
    const int64_t offset = c.offsets[start], shard_end = end < n ? c.offsets[end] : k_total;
    const int64_t width = std::min<int64_t>(c.words * 32, shard_end - offset);
    const at::Tensor z_shard = z.narrow(1, offset, width);
    const int64_t tile_rows = std::max<int64_t>(1, kTileBytes / (width * z.element_size()));
    for (int64_t row = start; row < end; row += tile_rows) {
      const int64_t rows = std::min(tile_rows, end - row);
      at::Tensor tile = at::empty({rows, width}, z.options());
      if (tile_type == at::kFloat)
        expand_rows<float>(c, row, rows, width, tile.data_ptr<float>(), portable);
      else
        expand_rows<c10::BFloat16>(c, row, rows, width, tile.data_ptr<c10::BFloat16>(), portable);
      at::Tensor y_columns = y.narrow(1, row, rows);
      at::mm_out(y_columns, z_shard, tile.t());
    }
  }
  return y;
}

// Z for the direct kernels: in ``dtype``, contiguous — or, where that would put its rows within 512 bytes
// of a multiple of 4 KiB apart, with rows 4 KiB + 512 bytes apart (one copy either way). L1 is 8-way with
// 4 KiB per way: such rows put the same atoms of every row in the same few sets, and the stream of C
// evicts them (SmolLM2's gate_up at CR 0.3: 1036 float32 atoms, 4144 bytes per row; NOTES.md item 46);
// the spread rows cover all 64 sets with 8 rows.
at::Tensor direct_z(const at::Tensor& z, at::ScalarType dtype) {
  const int64_t element = c10::elementSize(dtype);
  const int64_t row_bytes = z.size(1) * element;
  const int64_t phase = row_bytes % 4096;
  if (z.size(0) < 2 || (phase >= 512 && phase <= 4096 - 512)) return z.to(dtype).contiguous();
  const int64_t stride = ((row_bytes + 4095) / 4096 * 4096 + 512) / element;
  at::Tensor spread = at::empty({z.size(0), stride}, z.options().dtype(dtype)).narrow(1, 0, z.size(1));
  spread.copy_(z);
  return spread;
}

// y [M, N] = z [M, K] · C, float32 if float_out else in z's dtype. Up to direct_max_rows rows of Z the
// direct kernels, above it expanded tiles + GEMM (the caller passes the crossover measured for the
// kernel that serves its dtypes: cospadi_vllm/ops.py).
at::Tensor coef_product(const at::Tensor& z_in, const at::Tensor& coef_mask, const at::Tensor& coef_values,
                        const at::Tensor& coef_scales, const at::Tensor& atom_offsets, const at::Tensor& value_table,
                        int64_t value_kind, bool portable, bool float_out, int64_t direct_max_rows) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(1) > 0, "z must be [M, K]");
  const Coefficients c = view(coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind);
  const at::ScalarType out_type = float_out ? at::kFloat : z_in.scalar_type();
  if (z_in.size(0) == 0) return at::empty({0, c.n}, z_in.options().dtype(out_type));
  at::Tensor y;
  if (z_in.size(0) <= direct_max_rows) {
    // bfloat16 Z goes to the kernels as it is where the CPU has AVX-512 BF16; anything else as float32.
    const bool keep_bf16 = z_in.scalar_type() == at::kBFloat16 && COSPADI_AVX512_BF16 && !portable;
    y = coef_product_direct(c, direct_z(z_in, keep_bf16 ? at::kBFloat16 : at::kFloat), value_kind, portable,
                            float_out);
  } else {
    y = coef_product_expanded(c, z_in, portable);
  }
  return y.scalar_type() == out_type ? y : y.to(out_type);
}

void check_dictionary(const at::Tensor& x, const at::Tensor& dictionary_t) {
  TORCH_CHECK(x.dim() == 2 && dictionary_t.dim() == 2 && x.size(1) == dictionary_t.size(1),
              "x [M, in] and dictionary_t [K, in] must agree on in");
  TORCH_CHECK(dictionary_t.is_contiguous(), "dictionary_t must be contiguous");
}

// Own kernel for this x·D: bfloat16 x and D, few rows, AVX-512 BF16.
bool own_dictionary_kernel(const at::Tensor& x, const at::Tensor& dictionary_t) {
#ifdef COSPADI_OWN_DICTIONARY_PRODUCT
  return x.size(0) >= 1 && x.size(0) <= kDictionaryRows && x.scalar_type() == at::kBFloat16 &&
         dictionary_t.scalar_type() == at::kBFloat16;
#else
  return false;
#endif
}

// Z [M, K] = x [M, in] · D in x's dtype, D given transposed (dictionary_t [K, in]): the own kernel for
// few rows, torch's GEMM on the transposed view otherwise.
at::Tensor dictionary_product(const at::Tensor& x_in, const at::Tensor& dictionary_t) {
  check_dictionary(x_in, dictionary_t);
  const at::Tensor x = x_in.contiguous();
#ifdef COSPADI_OWN_DICTIONARY_PRODUCT
  if (own_dictionary_kernel(x, dictionary_t)) return dictionary_product_small(x, dictionary_t).to(x.scalar_type());
#endif
#ifdef COSPADI_FLOAT_DICTIONARY_PRODUCT
  if (x.scalar_type() == at::kFloat && dictionary_t.scalar_type() == at::kBFloat16 && x.size(0) >= 1 &&
      x.size(0) <= kFloatDictionaryRows)
    return dictionary_product_float_small(x, dictionary_t);
#endif
  return at::mm(x, dictionary_t.t().to(x.scalar_type()));
}

// y = (x·D)·C in one call (what a layer with its whole dictionary serves). For few rows with int8
// values, Z stays float32 between the two products and is rounded once, to int16 (no bfloat16 step);
// otherwise dictionary_product, then coef_product.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& dictionary_t, const at::Tensor& coef_mask,
                  const at::Tensor& coef_values, const at::Tensor& coef_scales, const at::Tensor& atom_offsets,
                  const at::Tensor& value_table, int64_t value_kind, int64_t direct_max_rows) {
  check_dictionary(x_in, dictionary_t);
#if defined(COSPADI_OWN_DICTIONARY_PRODUCT) && COSPADI_AVX512_INT16
  const at::Tensor x = x_in.contiguous();
  if ((value_kind == kInt8 || value_kind == kInt4) && own_dictionary_kernel(x, dictionary_t)) {
    const Coefficients c = view(coef_mask, coef_values, coef_scales, atom_offsets, value_table, value_kind);
    const at::Tensor z = dictionary_product_small(x, dictionary_t);
    at::Tensor y = at::empty({x.size(0), c.n}, x.options());
    coef_product_int16(c, z, reinterpret_cast<c10::BFloat16*>(y.data_ptr<at::BFloat16>()));
    return y;
  }
#endif
  return coef_product(dictionary_product(x_in, dictionary_t), coef_mask, coef_values, coef_scales, atom_offsets,
                      value_table, value_kind, false, false, direct_max_rows);
}

bool has_vector_kernel() { return COSPADI_AVX512 || COSPADI_AVX2; }
// Which vector kernels were compiled in: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (the portable bit walk).
int64_t vector_width() { return COSPADI_AVX512 ? 512 : COSPADI_AVX2 ? 256 : 0; }
bool has_bf16_kernel() { return COSPADI_AVX512_BF16; }
bool has_int16_kernel() { return COSPADI_AVX512_INT16; }

}  // namespace

TORCH_LIBRARY(cospadi_cpu, m) {
  m.def("coef_product(Tensor z, Tensor coef_mask, Tensor coef_values, Tensor coef_scales, Tensor atom_offsets, "
        "Tensor value_table, int value_kind, bool portable, bool float_out, int direct_max_rows) -> Tensor");
  m.def("dictionary_product(Tensor x, Tensor dictionary_t) -> Tensor");
  m.def("linear(Tensor x, Tensor dictionary_t, Tensor coef_mask, Tensor coef_values, Tensor coef_scales, "
        "Tensor atom_offsets, Tensor value_table, int value_kind, int direct_max_rows) -> Tensor");
  m.def("has_vector_kernel() -> bool", &has_vector_kernel);
  m.def("vector_width() -> int", &vector_width);
  m.def("has_bf16_kernel() -> bool", &has_bf16_kernel);
  m.def("has_int16_kernel() -> bool", &has_int16_kernel);
}

TORCH_LIBRARY_IMPL(cospadi_cpu, CPU, m) {
  m.impl("coef_product", &coef_product);
  m.impl("dictionary_product", &dictionary_product);
  m.impl("linear", &linear);
}
