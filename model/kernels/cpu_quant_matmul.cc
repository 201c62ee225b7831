// y = x @ dequantize(W) for a few rows x (decoding) and a quantized W, as XLA FFI custom calls, float32.
//
// Why: XLA:CPU does not fuse a dequantization into its dot, so model/weights.py's tiled_matmul converts each tile
// of codes to float32 in memory before multiplying; at batch 1 that conversion costs about what the smaller reads
// save. Here the codes are loaded, widened to int32 and converted to float in registers, and multiplied into
// float32 accumulators straight away: each weight byte is read once, and nothing is written but y.
//
// Layouts (model/quant/schemes.py): x [M, K] float32; codes [K, N] int8 (int8: ggml q8_0's rule) or, for int4,
// [K/2, N] uint8 with input channel 2i in the low nibble of row i and 2i+1 in the high one (two's complement
// nibbles in [-8, 7]); scales [K/G, N] float16, one per group of G input channels and output column (G = K: per
// output channel); y [M, N] float32. y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] * code[k, n].
//
// Columns are contiguous in the codes, so a register tile takes NV vectors of W adjacent columns and walks down K
// one code row at a time (one cache line of int8 codes per row for NV * W = 64); each group's partial sums are
// scaled into y (held in L1) at the group's end. One thread: on the 2-core machine of BENCHMARKS.md, spreading the
// column blocks over XLA's thread pool was slower in most decoding shapes of configs/bench_10m.py (BENCHMARKS.md).
// Built by model/kernels/cpu_quant_matmul.py with -march=native.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "cpu_vector.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef CPU_QUANT_MATMUL_NO_FFI
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
#endif

namespace {

using namespace jaxlm_simd;

// W int8 codes widened to int32: one sign-extending load (vpmovsxbd) where the CPU has it; GCC turns
// __builtin_convertvector of a byte vector into scalar code.
inline vi load_codes(const int8_t* p) {
#if VEC_WIDTH == 16
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif VEC_WIDTH == 8 && defined(__AVX2__)
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vi v;
  for (int l = 0; l < W; ++l) v[l] = p[l];
#endif
  vi out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24, exact in float
    float f = float(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline vf load_scales(const uint16_t* p) {
#if VEC_WIDTH == 16
  __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif VEC_WIDTH == 8 && defined(__F16C__)
  __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int l = 0; l < W; ++l) v[l] = half_to_float(p[l]);
#endif
  vf out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

struct Problem {
  int M, K, N, G;          // G: input channels per group (K: one group per column)
  const float* x;          // [M, K]
  const void* codes;       // int8 [K, N] or packed uint8 [K/2, N]
  const uint16_t* scales;  // float16 [K/G, N]
  float* y;                // [M, N]
};

// The codes of input channel k at columns n .. n + W as floats, into w[0].
struct Int8 {
  static constexpr int kRowsPerLoad = 1;
  static inline void dequantize(const Problem& p, int k, int n, vf* w) {
    w[0] = __builtin_convertvector(load_codes(static_cast<const int8_t*>(p.codes) + int64_t(k) * p.N + n), vf);
  }
};

// The codes of input channels k and k + 1 (k even) at columns n .. n + W as floats, into w[0] and w[1]: byte row
// k / 2 holds k in its low nibble and k + 1 in its high one; shifting the sign-extended byte right arithmetically
// gives the high nibble's value, shifting it left by 28 first the low one's.
struct Int4 {
  static constexpr int kRowsPerLoad = 2;
  static inline void dequantize(const Problem& p, int k, int n, vf* w) {
    const vi b = load_codes(static_cast<const int8_t*>(p.codes) + int64_t(k / 2) * p.N + n);
    w[0] = __builtin_convertvector((b << 28) >> 28, vf);
    w[1] = __builtin_convertvector(b >> 4, vf);
  }
};

// y[m0 : m0+MR, n0 : n0+NV*W] for all K: per group, partial sums in registers, then y (+)= partial * scale.
template <class Codes, int MR, int NV>
inline void tile(const Problem& p, int m0, int n0) {
  constexpr int R = Codes::kRowsPerLoad;
  const float* x = p.x + int64_t(m0) * p.K;
  for (int g0 = 0; g0 < p.K; g0 += p.G) {
    vf part[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) part[r][v] = vf{};
    for (int k = g0; k < g0 + p.G; k += R) {
      vf w[NV][R];
      for (int v = 0; v < NV; ++v) Codes::dequantize(p, k, n0 + v * W, w[v]);
      for (int i = 0; i < R; ++i)
        for (int r = 0; r < MR; ++r) {
          const vf a = splat(x[int64_t(r) * p.K + k + i]);
          for (int v = 0; v < NV; ++v) part[r][v] += a * w[v][i];
        }
    }
    vf s[NV];
    for (int v = 0; v < NV; ++v) s[v] = load_scales(p.scales + int64_t(g0 / p.G) * p.N + n0 + v * W);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        float* out = p.y + int64_t(m0 + r) * p.N + n0 + v * W;
        store(out, (g0 == 0 ? vf{} : load(out)) + part[r][v] * s[v]);
      }
  }
}

// Rows of a register tile with NV vectors of columns: as many as the registers hold (partial sums + codes + x).
template <class Codes>
constexpr int rows_for(int nv) {
  return std::max(1, std::min(8, (kRegs - nv * Codes::kRowsPerLoad - 1) / nv));
}

template <class Codes, int NV, int MR = rows_for<Codes>(NV)>
inline void tile_rows(const Problem& p, int rows, int m0, int n0) {
  if constexpr (MR > 1) {
    if (rows < MR) return tile_rows<Codes, NV, MR - 1>(p, rows, m0, n0);
  }
  tile<Codes, MR, NV>(p, m0, n0);
}

// All rows of columns n0 .. n0 + nv*W (nv <= 4 whole vectors).
template <class Codes>
void columns(const Problem& p, int nv, int n0) {
  const int mr = rows_for<Codes>(nv);
  for (int m0 = 0; m0 < p.M; m0 += mr) {
    const int rows = std::min(mr, p.M - m0);
    switch (nv) {
      case 1: tile_rows<Codes, 1>(p, rows, m0, n0); break;
      case 2: tile_rows<Codes, 2>(p, rows, m0, n0); break;
      case 3: tile_rows<Codes, 3>(p, rows, m0, n0); break;
      default: tile_rows<Codes, 4>(p, rows, m0, n0); break;
    }
  }
}

// The last N % W columns, one at a time.
template <class Codes>
void tail_columns(const Problem& p, int n0) {
  const bool int4 = Codes::kRowsPerLoad == 2;
  for (int n = n0; n < p.N; ++n)
    for (int m = 0; m < p.M; ++m) {
      const float* x = p.x + int64_t(m) * p.K;
      float y = 0.0f;
      for (int g0 = 0; g0 < p.K; g0 += p.G) {
        float part = 0.0f;
        for (int k = g0; k < g0 + p.G; ++k) {
          int q;
          if (int4) {
            const int8_t b = static_cast<const int8_t*>(p.codes)[int64_t(k / 2) * p.N + n];
            q = k % 2 ? b >> 4 : int8_t(uint8_t(b) << 4) >> 4;
          } else {
            q = static_cast<const int8_t*>(p.codes)[int64_t(k) * p.N + n];
          }
          part += x[k] * float(q);
        }
        y += part * half_to_float(p.scales[int64_t(g0 / p.G) * p.N + n]);
      }
      p.y[int64_t(m) * p.N + n] = y;
    }
}

// y = x @ dequantize(codes): blocks of up to 4 vectors of columns (64 columns, one cache line of int8 codes per
// row, for W = 16), then the last N % W columns.
template <class Codes>
void run(const Problem& p) {
  const int whole = p.N / W;
  for (int v0 = 0; v0 < whole; v0 += 4) columns<Codes>(p, std::min(4, whole - v0), v0 * W);
  tail_columns<Codes>(p, whole * W);
}

#ifndef CPU_QUANT_MATMUL_NO_FFI
template <class Codes, ffi::DataType T>
ffi::Error matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<T> codes, ffi::Buffer<ffi::F16> scales,
                  ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  const int64_t K = Codes::kRowsPerLoad * (cd.size() == 2 ? cd[0] : 0);
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || xd[1] != K || sd[1] != cd[1] || sd[0] == 0 ||
      K % sd[0] != 0 || (K / sd[0]) % Codes::kRowsPerLoad != 0)
    return ffi::Error::InvalidArgument("cpu quant matmul: x [M, K], codes [K / " +
                                       std::to_string(Codes::kRowsPerLoad) +
                                       ", N], scales [K / G, N] with G dividing K (and even for int4)");
  const Problem p{int(xd[0]), int(K), int(cd[1]), int(K / sd[0]), x.typed_data(), codes.untyped_data(),
                  reinterpret_cast<const uint16_t*>(scales.typed_data()), y->typed_data()};
  run<Codes>(p);
  return ffi::Error::Success();
}
#endif

}  // namespace

#ifndef CPU_QUANT_MATMUL_NO_FFI
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLmCpuQuantMatmulInt8, (matmul<Int8, ffi::S8>),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLmCpuQuantMatmulInt4, (matmul<Int4, ffi::U8>),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif

extern "C" int JaxLmCpuQuantMatmulVectorWidth() { return W; }
