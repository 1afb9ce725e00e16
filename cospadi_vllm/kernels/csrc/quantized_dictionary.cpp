// x·D for a quantized dictionary read as stored (docs/format.md), one op for both integer layouts:
//   4-bit (GPTQ's): codes [ceil(in/8), K] int32, input 8r+i of atom t in bits [4i, 4i+4) of codes[r, t], code c
//                   in [0, 15]; scales [G, K] float16, one per group of 128 inputs and atom; D[i, t] = (c − 8)·s[i/128, t]
//   int8:           codes [in, K] int8; scales [K] float32, one per atom; D[i, t] = c·s[t]
// so z[m, t] = Σ_g s[g, t] · (Σ_{i∈g} x[m, i]·c[i, t] − zero·Σ_{i∈g} x[m, i]) over chunks g of the code rows.
//
// One pass over the codes, never a widened copy of D: a vector of 8 consecutive atoms' codes is widened in registers
// (4-bit: and, convert, shift per 8 codes; int8: sign-extending load, convert), shared by every row of x in the pass,
// into per-chunk float accumulators; the chunk's scale (and the 4-bit zero term) is applied once per chunk. One row:
// 0.29–0.75× (4-bit) and 0.50–1.28× (int8) the time of a float32 GEMM reading a dense D, cold, one AVX2 thread. More
// rows (above the caller's fused_max_rows): 256-atom tiles decoded to float32 and torch's GEMM, 1.0–1.4× a dense
// GEMM's time (NOTES.md items 68, 69).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define COSPADI_QUANTIZED_DICTIONARY_VECTOR 1
#include <immintrin.h>
#else
#define COSPADI_QUANTIZED_DICTIONARY_VECTOR 0
#endif

namespace {

constexpr int kMaxPassRows = 8;  // rows of x sharing one widening of the codes
// How far ahead along each row of codes a pass asks for the next lines: the hardware prefetchers alone left the 16
// row streams of a chunk waiting on DRAM at one row of x (cold D, one thread: int8 4864 → 896 813 → 501 µs, 576 →
// 1100 165 → 134 µs; 256 and 4096 bytes were no better within the noise; NOTES.md item 69).
constexpr int64_t kPrefetchBytes = 1024;

// The 4-bit layout: a chunk is one scale group (128 inputs: 16 rows of words); code c means c − 8.
struct Int4Codes {
  using Code = int32_t;
  using Scale = at::Half;
  static constexpr int64_t kInputsPerRow = 8;
  static constexpr int64_t kRowsPerChunk = 16;  // format.DICTIONARY_TYPES["int4"].group_size / 8
  static constexpr float kZero = 8.0f;          // format.INT4_DICTIONARY_ZERO (uint4b8)
  static int64_t scale_row(int64_t chunk) { return chunk; }
  static float scalar(const Code* codes, int64_t atoms, int64_t input, int64_t t) {
    return static_cast<float>((static_cast<uint32_t>(codes[(input / 8) * atoms + t]) >> (4 * (input % 8))) & 0xF);
  }
#if COSPADI_QUANTIZED_DICTIONARY_VECTOR
  using Vector = __m256i;  // 8 words, consumed a nibble at a time
  static Vector load(const Code* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static __m256 next(Vector& words) {
    const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(words, _mm256_set1_epi32(0xF)));
    words = _mm256_srli_epi32(words, 4);
    return code;
  }
  static __m256 load_scale(const Scale* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};

// The int8 layout: chunks of 16 input rows (16 sequential streams for the prefetchers, like the 4-bit layout's
// group); every chunk has the atom's one scale.
struct Int8Codes {
  using Code = int8_t;
  using Scale = float;
  static constexpr int64_t kInputsPerRow = 1;
  static constexpr int64_t kRowsPerChunk = 16;
  static constexpr float kZero = 0.0f;
  static int64_t scale_row(int64_t) { return 0; }
  static float scalar(const Code* codes, int64_t atoms, int64_t input, int64_t t) {
    return static_cast<float>(codes[input * atoms + t]);
  }
#if COSPADI_QUANTIZED_DICTIONARY_VECTOR
  using Vector = __m256;  // 8 codes, widened on load
  static Vector load(const Code* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static __m256 next(Vector& codes) { return codes; }
  static __m256 load_scale(const Scale* p) { return _mm256_loadu_ps(p); }
#endif
};

// What every kernel reads: x widened to float32 and zero-padded to whole chunks (so the codes of padding inputs,
// whatever they are, meet zeros), and, where the layout has a zero point, each row's per-chunk sums.
template <class Codes>
struct Operands {
  const float* x;       // [m, chunks · inputs per chunk]
  const float* x_sums;  // [m, chunks] (4-bit only)
  const typename Codes::Code* codes;
  const typename Codes::Scale* scales;
  int64_t rows, atoms, chunks;  // rows of codes, K, ceil(rows / kRowsPerChunk)
  static constexpr int64_t kInputsPerChunk = Codes::kRowsPerChunk * Codes::kInputsPerRow;
  int64_t ldx() const { return chunks * kInputsPerChunk; }
};

// Atoms [t0, t1) for rows [m0, m0 + rows): the scalar walk of portable builds.
template <class Codes>
void atoms_scalar(const Operands<Codes>& d, int64_t m0, int64_t rows, int64_t t0, int64_t t1, float* z) {
  const int64_t inputs = d.rows * Codes::kInputsPerRow, per_chunk = Operands<Codes>::kInputsPerChunk;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = m0; m < m0 + rows; ++m) {
      const float* x = d.x + m * d.ldx();
      float total = 0.0f;
      for (int64_t g = 0; g < d.chunks; ++g) {
        float acc = 0.0f;
        for (int64_t i = g * per_chunk; i < std::min(inputs, (g + 1) * per_chunk); ++i)
          acc += x[i] * Codes::scalar(d.codes, d.atoms, i, t);
        const float zero_term = Codes::kZero == 0.0f ? 0.0f : Codes::kZero * d.x_sums[m * d.chunks + g];
        total += static_cast<float>(d.scales[Codes::scale_row(g) * d.atoms + t]) * (acc - zero_term);
      }
      z[m * d.atoms + t] = total;
    }
}

#if COSPADI_QUANTIZED_DICTIONARY_VECTOR
// Chunk g's part of atoms [t0, t0 + 8V) for R rows from m0, added into z (pointing at z[m0, t0], rows ldz apart;
// written, not added, for the first chunk): R·V accumulators of 8 atoms over the chunk's rows of codes; V
// independent vectors keep one row's FMA chains from waiting on each other (4-cycle latency), and each widening
// of the codes is shared by the R rows.
template <class Codes, int R, int V>
void chunk_vector(const Operands<Codes>& d, int64_t g, int64_t m0, int64_t t0, float* z, int64_t ldz) {
  const int64_t ldx = d.ldx();
  __m256 acc[R][V];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t r = g * Codes::kRowsPerChunk; r < std::min(d.rows, (g + 1) * Codes::kRowsPerChunk); ++r) {
    const typename Codes::Code* codes = d.codes + r * d.atoms + t0;
    for (int64_t byte = 0; byte < 8 * V * static_cast<int64_t>(sizeof(typename Codes::Code)); byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes) + byte + kPrefetchBytes, _MM_HINT_T0);
    typename Codes::Vector row[V];
    for (int v = 0; v < V; ++v) row[v] = Codes::load(codes + 8 * v);
    const float* x = d.x + m0 * ldx + Codes::kInputsPerRow * r;
    for (int i = 0; i < Codes::kInputsPerRow; ++i) {
      __m256 code[V];
      for (int v = 0; v < V; ++v) code[v] = Codes::next(row[v]);
      for (int m = 0; m < R; ++m) {
        const __m256 xi = _mm256_broadcast_ss(x + m * ldx + i);
        for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(xi, code[v], acc[m][v]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    const __m256 scale = Codes::load_scale(d.scales + Codes::scale_row(g) * d.atoms + t0 + 8 * v);
    for (int m = 0; m < R; ++m) {
      __m256 sum = acc[m][v];
      if constexpr (Codes::kZero != 0.0f)
        sum = _mm256_sub_ps(sum, _mm256_set1_ps(Codes::kZero * d.x_sums[(m0 + m) * d.chunks + g]));
      const __m256 before = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(z + m * ldz + 8 * v);
      _mm256_storeu_ps(z + m * ldz + 8 * v, _mm256_fmadd_ps(scale, sum, before));
    }
  }
}

// Vectors of 8 atoms per block for R rows: ≥ 4 accumulators in flight where the 16 registers allow.
constexpr int vectors_for(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }

template <class Codes>
using VectorKernel = void (*)(const Operands<Codes>&, int64_t, int64_t, int64_t, float*, int64_t);
template <class Codes, int... R>
constexpr std::array<VectorKernel<Codes>, sizeof...(R)> wide_kernels(std::integer_sequence<int, R...>) {
  return {&chunk_vector<Codes, R + 1, vectors_for(R + 1)>...};
}
template <class Codes, int... R>
constexpr std::array<VectorKernel<Codes>, sizeof...(R)> narrow_kernels(std::integer_sequence<int, R...>) {
  return {&chunk_vector<Codes, R + 1, 1>...};
}
template <class Codes>
constexpr auto kWide = wide_kernels<Codes>(std::make_integer_sequence<int, kMaxPassRows>{});
template <class Codes>
constexpr auto kNarrow = narrow_kernels<Codes>(std::make_integer_sequence<int, kMaxPassRows>{});

// The last n < 8 atoms: their codes and scales copied into 8-lane buffers (zero lanes past n), one vector kernel
// call per chunk, n columns copied out (instead of a scalar walk down the strided rows).
template <class Codes>
void tail_atoms(const Operands<Codes>& d, int64_t m0, int64_t rows, int64_t t0, int64_t n, float* z) {
  const int64_t scale_rows = Codes::scale_row(d.chunks - 1) + 1;
  std::vector<typename Codes::Code> codes(d.rows * 8, 0);
  std::vector<typename Codes::Scale> scales(scale_rows * 8, typename Codes::Scale(0.0f));
  for (int64_t r = 0; r < d.rows; ++r) std::copy_n(d.codes + r * d.atoms + t0, n, codes.data() + r * 8);
  for (int64_t g = 0; g < scale_rows; ++g) std::copy_n(d.scales + g * d.atoms + t0, n, scales.data() + g * 8);
  const Operands<Codes> tail{d.x, d.x_sums, codes.data(), scales.data(), d.rows, 8, d.chunks};
  std::array<float, kMaxPassRows * 8> out;
  for (int64_t g = 0; g < d.chunks; ++g) kNarrow<Codes>[rows - 1](tail, g, m0, 0, out.data(), 8);
  for (int64_t m = 0; m < rows; ++m) std::copy_n(out.data() + m * 8, n, z + (m0 + m) * d.atoms + t0);
}
#endif

// Atoms [t0, t1) for rows [m0, m0 + rows), rows ≤ kMaxPassRows: wide blocks, then single vectors, then the tail.
// Chunks outermost: a pass reads 16 rows of codes along the atoms (16 sequential streams the prefetchers follow)
// instead of walking every row down one block of atoms, which at one row of x left it waiting on DRAM (NOTES.md
// item 68: 576 → 486 at M = 1 took as long as M = 8).
template <class Codes>
void atom_range(const Operands<Codes>& d, int64_t m0, int64_t rows, int64_t t0, int64_t t1, float* z) {
#if COSPADI_QUANTIZED_DICTIONARY_VECTOR
  const int64_t wide = 8 * vectors_for(static_cast<int>(rows));
  float* z_rows = z + m0 * d.atoms;
  int64_t t = t0;
  for (int64_t g = 0; g < d.chunks; ++g) {
    for (t = t0; t + wide <= t1; t += wide) kWide<Codes>[rows - 1](d, g, m0, t, z_rows + t, d.atoms);
    for (; t + 8 <= t1; t += 8) kNarrow<Codes>[rows - 1](d, g, m0, t, z_rows + t, d.atoms);
  }
  if (t < t1) tail_atoms(d, m0, rows, t, t1 - t, z);
#else
  atoms_scalar(d, m0, rows, t0, t1, z);
#endif
}

// Atoms [t0, t0 + width) of D decoded to float32 [inputs padded, width] (inputs past the codes: zero rows, set by
// the caller): the tile path's operand for torch's GEMM. Plain loops over atoms, which the compiler vectorizes for
// the build's instruction set. `scales` as float32 (widened once per call, so the loops are float arithmetic alone).
template <class Codes>
void decode_tile(const Operands<Codes>& d, const float* scales, int64_t t0, int64_t width, float* tile) {
  for (int64_t i = 0; i < d.rows * Codes::kInputsPerRow; ++i) {
    const float* scale = scales + Codes::scale_row(i / Operands<Codes>::kInputsPerChunk) * d.atoms + t0;
    float* out = tile + i * width;
    for (int64_t t = 0; t < width; ++t) out[t] = (Codes::scalar(d.codes, d.atoms, i, t0 + t) - Codes::kZero) * scale[t];
  }
}

// More rows than the caller's fused_max_rows: D decoded a tile of kTileAtoms atoms at a time (≤ 5 MB for
// in = 4864) and multiplied by torch's GEMM.
constexpr int64_t kTileAtoms = 256;

template <class Codes>
void tiles_times_gemm(const Operands<Codes>& d, const at::Tensor& scales_in, const at::Tensor& x_padded, at::Tensor& z) {
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const int64_t inputs = d.rows * Codes::kInputsPerRow, width_max = std::min(kTileAtoms, d.atoms);
  at::Tensor tile = at::empty({d.ldx(), width_max}, x_padded.options());
  if (inputs < d.ldx()) tile.narrow(0, inputs, d.ldx() - inputs).zero_();
  for (int64_t t0 = 0; t0 < d.atoms; t0 += kTileAtoms) {
    const int64_t width = std::min(kTileAtoms, d.atoms - t0);
    at::Tensor view = tile.narrow(1, 0, width);
    at::Tensor dense = width == width_max ? tile : view.contiguous();
    decode_tile(d, scales.data_ptr<float>(), t0, width, dense.data_ptr<float>());
    z.narrow(1, t0, width).copy_(at::mm(x_padded, dense));
  }
}

template <class Codes>
at::Tensor product(const at::Tensor& x, const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t fused_max_rows) {
  const int64_t m = x.size(0), in = x.size(1), rows = codes_in.size(0), atoms = codes_in.size(1);
  const int64_t chunks = (rows + Codes::kRowsPerChunk - 1) / Codes::kRowsPerChunk;
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor x_padded = at::zeros({m, chunks * Operands<Codes>::kInputsPerChunk}, x.options().dtype(at::kFloat));
  x_padded.narrow(1, 0, in).copy_(x);
  // Per-chunk sums of x: only the fused path of a layout with a zero point needs them (the tiles fold it in).
  const bool fused = m <= fused_max_rows, sums = fused && Codes::kZero != 0.0f;
  const at::Tensor x_sums = sums ? x_padded.view({m, chunks, -1}).sum(-1) : at::Tensor();
  at::Tensor z = at::empty({m, atoms}, x.options().dtype(at::kFloat));
  const Operands<Codes> d{x_padded.data_ptr<float>(), sums ? x_sums.data_ptr<float>() : nullptr,
                          codes.data_ptr<typename Codes::Code>(),
                          reinterpret_cast<const typename Codes::Scale*>(scales.data_ptr()), rows, atoms, chunks};
  if (!fused) {
    tiles_times_gemm(d, scales, x_padded, z);
  } else {
    float* zp = z.data_ptr<float>();
    // Threads split the atoms in blocks of 32 (a wide block for ≤ 2 rows); every pass of ≤ 8 rows reads its block.
    constexpr int64_t kBlock = 32;
    at::parallel_for(0, (atoms + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
      const int64_t t0 = begin * kBlock, t1 = std::min(atoms, end * kBlock);
      for (int64_t m0 = 0; m0 < m; m0 += kMaxPassRows)
        atom_range(d, m0, std::min<int64_t>(kMaxPassRows, m - m0), t0, t1, zp);
    });
  }
  return x.scalar_type() == at::kFloat ? z : z.to(x.scalar_type());
}

// x [M, in] · D → Z [M, K] in x's dtype; the layout is read off the codes' dtype (int32: 4-bit, int8: int8).
at::Tensor quantized_dictionary_product(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                        int64_t fused_max_rows) {
  constexpr const char* kOp = "quantized_dictionary_product: ";
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2, kOp, "x [M, in] and the dictionary's codes must be 2-D");
  const int64_t in = x.size(1), atoms = codes.size(1);
  if (codes.scalar_type() == at::kInt) {
    const int64_t groups = (in + 127) / 128;
    TORCH_CHECK(codes.size(0) == (in + 7) / 8, kOp, in, " inputs need ", (in + 7) / 8, " rows of packed words, got ",
                codes.size(0));
    TORCH_CHECK(scales.scalar_type() == at::kHalf, kOp, "a 4-bit dictionary's scales must be float16, got ",
                scales.scalar_type());
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == atoms, kOp, "scales must be [",
                groups, ", ", atoms, "], got ", scales.sizes());
    return product<Int4Codes>(x, codes, scales, fused_max_rows);
  }
  TORCH_CHECK(codes.scalar_type() == at::kChar, kOp, "dictionary codes must be int32 (4-bit, packed) or int8, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.size(0) == in, kOp, in, " inputs need an int8 dictionary of ", in, " rows, got ", codes.size(0));
  TORCH_CHECK(scales.scalar_type() == at::kFloat, kOp, "an int8 dictionary's scales must be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == atoms, kOp, "scales must be [", atoms, "], got ", scales.sizes());
  return product<Int8Codes>(x, codes, scales, fused_max_rows);
}

bool quantized_dictionary_vector_kernel() { return COSPADI_QUANTIZED_DICTIONARY_VECTOR; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(cospadi_cpu, m) {
  m.def("quantized_dictionary_product(Tensor x, Tensor codes, Tensor scales, int fused_max_rows) -> Tensor");
  m.def("quantized_dictionary_vector_kernel() -> bool", &quantized_dictionary_vector_kernel);
}

TORCH_LIBRARY_IMPL(cospadi_cpu, CPU, m) { m.impl("quantized_dictionary_product", &quantized_dictionary_product); }
