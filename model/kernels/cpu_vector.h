// SIMD vectors for the CPU kernels (cpu_attention.cc, cpu_quant_matmul.cc) as GCC/Clang vector extensions: the
// widest float vector the target (-march=native) has, how many registers it has, and loads, stores and
// broadcasts that compile to single instructions.
#pragma once

#include <cstdint>
#include <cstring>

namespace jaxlm_simd {

#if defined(__AVX512F__)
#define VEC_WIDTH 16
constexpr int kRegs = 32;
#elif defined(__AVX__)
#define VEC_WIDTH 8
constexpr int kRegs = 16;
#else
#define VEC_WIDTH 4
constexpr int kRegs = 16;
#endif
constexpr int W = VEC_WIDTH;
typedef float vf __attribute__((vector_size(VEC_WIDTH * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VEC_WIDTH * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) {  // one broadcast (vf{} + x would add 0.0f first)
#if VEC_WIDTH == 16
  return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif VEC_WIDTH == 8
  return vf{x, x, x, x, x, x, x, x};
#else
  return vf{x, x, x, x};
#endif
}

}  // namespace jaxlm_simd
