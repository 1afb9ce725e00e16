// x·D for a 4-bit dictionary read as stored (GPTQ's layout, docs/format.md):
//   packed [R, K] int32   input 8r+i of atom t in bits [4i, 4i+4) of packed[r, t] (R = ceil(in/8)), code c in [0, 15]
//   scales [G, K] float16 one per group of 128 inputs and atom
//   D[i, t] = (c − 8) · scales[i / 128, t]
// so z[m, t] = Σ_g scales[g, t] · (Σ_{i∈g} x[m, i]·c[i, t] − 8·Σ_{i∈g} x[m, i]).
//
// One pass over the packed words, never a widened copy of D: a vector of 8 consecutive atoms' words is
// decoded nibble by nibble (and, convert, shift: 3 instructions per 8 codes, shared by every row of x in the
// pass) into per-group float accumulators; each group's scale and its −8·Σx term are applied once per group.
// At one row of x the decode is the cost (≈ 3 instructions per FMA), and it still takes 0.33–1.0× the time of a
// float32 GEMM reading a dense D (8× the bytes). More rows (above the caller's fused_max_rows): 256-atom tiles
// decoded to float32 and torch's GEMM, 1.1–1.4× a dense GEMM's time (NOTES.md item 68).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define COSPADI_INT4_DICTIONARY_VECTOR 1
#include <immintrin.h>
#else
#define COSPADI_INT4_DICTIONARY_VECTOR 0
#endif

namespace {

constexpr int64_t kGroup = 128;  // inputs per scale: format.DICTIONARY_TYPES["int4"].group_size
constexpr int64_t kWordsPerGroup = kGroup / 8;
constexpr float kZero = 8.0f;  // format.INT4_DICTIONARY_ZERO (uint4b8)
constexpr int kMaxPassRows = 8;  // rows of x sharing one decode of D

// What every kernel reads: x widened to float32 and zero-padded to whole groups (so the codes of padding inputs,
// whatever they are, meet zeros), and each row's per-group sums for the −8 term.
struct Operands {
  const float* x;          // [m, G·128]
  const float* x_sums;     // [m, G]
  const int32_t* packed;   // [R, K]
  const at::Half* scales;  // [G, K]
  int64_t words, atoms, groups;
};

// Atoms [t0, t1) for rows [m0, m0 + rows): the scalar walk of portable builds.
void atoms_scalar(const Operands& d, int64_t m0, int64_t rows, int64_t t0, int64_t t1, float* z) {
  const int64_t ldx = d.groups * kGroup;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = m0; m < m0 + rows; ++m) {
      const float* x = d.x + m * ldx;
      float total = 0.0f;
      for (int64_t g = 0; g < d.groups; ++g) {
        float acc = 0.0f;
        for (int64_t r = g * kWordsPerGroup; r < std::min(d.words, (g + 1) * kWordsPerGroup); ++r) {
          const uint32_t word = static_cast<uint32_t>(d.packed[r * d.atoms + t]);
          for (int i = 0; i < 8; ++i) acc += x[8 * r + i] * static_cast<float>((word >> (4 * i)) & 0xF);
        }
        total += static_cast<float>(d.scales[g * d.atoms + t]) * (acc - kZero * d.x_sums[m * d.groups + g]);
      }
      z[m * d.atoms + t] = total;
    }
}

#if COSPADI_INT4_DICTIONARY_VECTOR
// Group g's part of atoms [t0, t0 + 8V) for R rows from m0, added into z (pointing at z[m0, t0], rows ldz apart;
// written, not added, for the first group): R·V accumulators of 8 atoms over the group's 16 rows of words; V
// independent vectors keep one row's FMA chains from waiting on each other (4-cycle latency), and each word's
// decode is shared by the R rows.
template <int R, int V>
void group_vector(const Operands& d, int64_t g, int64_t m0, int64_t t0, float* z, int64_t ldz) {
  const int64_t ldx = d.groups * kGroup;
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  __m256 acc[R][V];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t r = g * kWordsPerGroup; r < std::min(d.words, (g + 1) * kWordsPerGroup); ++r) {
    __m256i word[V];
    for (int v = 0; v < V; ++v)
      word[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.packed + r * d.atoms + t0 + 8 * v));
    const float* x = d.x + (m0 * ldx) + 8 * r;
    for (int i = 0; i < 8; ++i) {
      __m256 code[V];
      for (int v = 0; v < V; ++v) {
        code[v] = _mm256_cvtepi32_ps(_mm256_and_si256(word[v], low_nibble));
        word[v] = _mm256_srli_epi32(word[v], 4);
      }
      for (int m = 0; m < R; ++m) {
        const __m256 xi = _mm256_broadcast_ss(x + m * ldx + i);
        for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(xi, code[v], acc[m][v]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    const __m256 scale =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d.scales + g * d.atoms + t0 + 8 * v)));
    for (int m = 0; m < R; ++m) {
      const __m256 zero_term = _mm256_set1_ps(kZero * d.x_sums[(m0 + m) * d.groups + g]);
      const __m256 before = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(z + m * ldz + 8 * v);
      _mm256_storeu_ps(z + m * ldz + 8 * v, _mm256_fmadd_ps(scale, _mm256_sub_ps(acc[m][v], zero_term), before));
    }
  }
}

// Vectors of 8 atoms per block for R rows: ≥ 4 accumulators in flight where the 16 registers allow.
constexpr int vectors_for(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }

using VectorKernel = void (*)(const Operands&, int64_t, int64_t, int64_t, float*, int64_t);
template <int... R>
constexpr std::array<VectorKernel, sizeof...(R)> wide_kernels(std::integer_sequence<int, R...>) {
  return {&group_vector<R + 1, vectors_for(R + 1)>...};
}
template <int... R>
constexpr std::array<VectorKernel, sizeof...(R)> narrow_kernels(std::integer_sequence<int, R...>) {
  return {&group_vector<R + 1, 1>...};
}
constexpr auto kWide = wide_kernels(std::make_integer_sequence<int, kMaxPassRows>{});
constexpr auto kNarrow = narrow_kernels(std::make_integer_sequence<int, kMaxPassRows>{});
#endif

#if COSPADI_INT4_DICTIONARY_VECTOR
// The last n < 8 atoms: their words and scales copied into 8-lane buffers (zero lanes past n), one vector kernel
// call, n columns copied out (instead of a scalar walk down the strided words).
void tail_atoms(const Operands& d, int64_t m0, int64_t rows, int64_t t0, int64_t n, float* z) {
  std::vector<int32_t> words(d.words * 8, 0);
  std::vector<at::Half> scales(d.groups * 8, at::Half(0.0f));
  for (int64_t r = 0; r < d.words; ++r) std::copy_n(d.packed + r * d.atoms + t0, n, words.data() + r * 8);
  for (int64_t g = 0; g < d.groups; ++g) std::copy_n(d.scales + g * d.atoms + t0, n, scales.data() + g * 8);
  const Operands tail{d.x, d.x_sums, words.data(), scales.data(), d.words, 8, d.groups};
  std::array<float, kMaxPassRows * 8> out;
  for (int64_t g = 0; g < d.groups; ++g) kNarrow[rows - 1](tail, g, m0, 0, out.data(), 8);
  for (int64_t m = 0; m < rows; ++m) std::copy_n(out.data() + m * 8, n, z + (m0 + m) * d.atoms + t0);
}
#endif

// Atoms [t0, t1) for rows [m0, m0 + rows), rows ≤ kMaxPassRows: wide blocks, then single vectors, then the tail.
// Groups outermost: a pass reads 16 rows of words along the atoms (16 sequential streams the prefetchers follow)
// instead of walking all ceil(in/8) rows down one block of atoms, which at one row of x left it waiting on DRAM
// (NOTES.md item 68: 576 → 486 at M = 1 took as long as M = 8).
void atom_range(const Operands& d, int64_t m0, int64_t rows, int64_t t0, int64_t t1, float* z) {
#if COSPADI_INT4_DICTIONARY_VECTOR
  const int64_t wide = 8 * vectors_for(static_cast<int>(rows));
  float* z_rows = z + m0 * d.atoms;
  int64_t t = t0;
  for (int64_t g = 0; g < d.groups; ++g) {
    for (t = t0; t + wide <= t1; t += wide) kWide[rows - 1](d, g, m0, t, z_rows + t, d.atoms);
    for (; t + 8 <= t1; t += 8) kNarrow[rows - 1](d, g, m0, t, z_rows + t, d.atoms);
  }
  if (t < t1) tail_atoms(d, m0, rows, t, t1 - t, z);
#else
  atoms_scalar(d, m0, rows, t0, t1, z);
#endif
}

// Atoms [t0, t0 + width) of D decoded to float32 [G·128, width] (rows past `in`: whatever the padding codes say,
// met by x's zero padding): the tile path's operand for torch's GEMM. Written as plain loops over atoms, which the
// compiler vectorizes for the build's instruction set.
// `scales` [G, K] as float32 (widened once per call, so that the loops are float arithmetic alone).
void decode_tile(const Operands& d, const float* scales, int64_t t0, int64_t width, float* tile) {
  for (int64_t r = 0; r < d.words; ++r) {
    const int32_t* word = d.packed + r * d.atoms + t0;
    const float* scale = scales + (r / kWordsPerGroup) * d.atoms + t0;
    for (int i = 0; i < 8; ++i) {
      float* out = tile + (8 * r + i) * width;
      for (int64_t t = 0; t < width; ++t)
        out[t] = (static_cast<float>((static_cast<uint32_t>(word[t]) >> (4 * i)) & 0xF) - kZero) * scale[t];
    }
  }
}

// More rows than the caller's fused_max_rows: D decoded a tile of kTileAtoms atoms at a time (≤ 5 MB for
// in = 4864) and multiplied by torch's GEMM.
constexpr int64_t kTileAtoms = 256;

void tiles_times_gemm(const Operands& d, const at::Tensor& scales_in, const at::Tensor& x_padded, at::Tensor& z) {
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const int64_t width_max = std::min(kTileAtoms, d.atoms);
  at::Tensor tile = at::empty({d.groups * kGroup, width_max}, x_padded.options());
  if (d.words * 8 < d.groups * kGroup) tile.narrow(0, d.words * 8, d.groups * kGroup - d.words * 8).zero_();
  for (int64_t t0 = 0; t0 < d.atoms; t0 += kTileAtoms) {
    const int64_t width = std::min(kTileAtoms, d.atoms - t0);
    at::Tensor view = tile.narrow(1, 0, width);
    at::Tensor dense = width == width_max ? tile : view.contiguous();
    decode_tile(d, scales.data_ptr<float>(), t0, width, dense.data_ptr<float>());
    z.narrow(1, t0, width).copy_(at::mm(x_padded, dense));
  }
}

at::Tensor int4_dictionary_product(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& scales_in,
                                   int64_t fused_max_rows) {
  TORCH_CHECK(x.dim() == 2 && packed_in.dim() == 2 && scales_in.dim() == 2,
              "int4_dictionary_product: x [M, in], packed [ceil(in/8), K] and scales [groups, K] must be 2-D");
  TORCH_CHECK(packed_in.scalar_type() == at::kInt, "int4_dictionary_product: packed dictionary must be int32, got ",
              packed_in.scalar_type());
  TORCH_CHECK(scales_in.scalar_type() == at::kHalf, "int4_dictionary_product: dictionary scales must be float16, got ",
              scales_in.scalar_type());
  const int64_t m = x.size(0), in = x.size(1), words = packed_in.size(0), atoms = packed_in.size(1);
  const int64_t groups = (in + kGroup - 1) / kGroup;
  TORCH_CHECK(words == (in + 7) / 8, "int4_dictionary_product: ", in, " inputs need ", (in + 7) / 8,
              " rows of packed words, got ", words);
  TORCH_CHECK(scales_in.size(0) == groups && scales_in.size(1) == atoms, "int4_dictionary_product: scales must be [",
              groups, ", ", atoms, "], got [", scales_in.size(0), ", ", scales_in.size(1), "]");
  const at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous();

  at::Tensor x_padded = at::zeros({m, groups * kGroup}, x.options().dtype(at::kFloat));
  x_padded.narrow(1, 0, in).copy_(x);
  // Per-group sums of x: only the fused path needs them (the tiles fold the −8 into the decoded entries).
  const bool fused = m <= fused_max_rows;
  const at::Tensor x_sums = fused ? x_padded.view({m, groups, kGroup}).sum(-1) : at::Tensor();
  at::Tensor z = at::empty({m, atoms}, x.options().dtype(at::kFloat));
  const Operands d{x_padded.data_ptr<float>(), fused ? x_sums.data_ptr<float>() : nullptr, packed.data_ptr<int32_t>(),
                   scales.data_ptr<at::Half>(), words, atoms, groups};
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

bool int4_dictionary_vector_kernel() { return COSPADI_INT4_DICTIONARY_VECTOR; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(cospadi_cpu, m) {
  m.def("int4_dictionary_product(Tensor x, Tensor packed, Tensor scales, int fused_max_rows) -> Tensor");
  m.def("int4_dictionary_vector_kernel() -> bool", &int4_dictionary_vector_kernel);
}

TORCH_LIBRARY_IMPL(cospadi_cpu, CPU, m) { m.impl("int4_dictionary_product", &int4_dictionary_product); }
