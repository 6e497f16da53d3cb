// Vectors for t5lite's XLA:CPU kernels (cpu_attention.cc, cpu_matmul.cc): the vector type of
// the CPU the library is compiled for, its loads, stores and broadcasts, bf16 values and their
// widening and rounding, and the element type of an FFI buffer.
#ifndef T5LITE_KERNELS_CPU_VECTORS_H_
#define T5LITE_KERNELS_CPU_VECTORS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace t5lite {

// Vectors and register tiles for the CPU compiled for (-march=native): AVX-512's 16 floats in
// 32 registers, else AVX2's 8 floats in 16 registers (kWide false). Other CPUs (no AVX2 with
// FMA, ARM) build with 8-float vectors that the compiler splits; the kernels are not tuned for
// them and cpu_attention.py does not load their library there (T5liteCpuAttentionLanes() is 0).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr bool kTuned = true;
#else
constexpr int kLanes = 8;
#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kTuned = true;
#else
constexpr bool kTuned = false;
#endif
#endif
constexpr bool kWide = kLanes == 16;

typedef float V __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t I __attribute__((vector_size(4 * kLanes), aligned(4)));

// Unaligned loads and stores through a may_alias vector type. (Through memcpy, GCC tuned for
// Haswell copied each 32 bytes as two 16-byte halves to the stack and loaded them back whole,
// a failed store forwarding per load: the kernel ran at 7 GFLOP/s.)
typedef float VMem __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
inline V Load(const float* p) { return *reinterpret_cast<const VMem*>(p); }
inline void Store(float* p, V v) { *reinterpret_cast<VMem*>(p) = v; }
// All lanes x, as an initializer list. (Not V{} + x: 0 + x is not x for x = -0, so GCC emits a
// scalar add before the broadcast, where this form is one broadcast from memory, or folds into
// the FMA on AVX-512 where one FMA uses it.)
template <size_t... kI>
inline V SplatLanes(float x, std::index_sequence<kI...>) { return V{((void)kI, x)...}; }
inline V Splat(float x) { return SplatLanes(x, std::make_index_sequence<kLanes>()); }

inline float Max(V v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float Sum(V v) {
  float t = 0.0f;
  for (int i = 0; i < kLanes; ++i) t += v[i];
  return t;
}

// A bf16 value as its bits (XLA FFI's native type for BF16 is uint16_t; a type of its own picks
// the overloads below).
struct Bf16 {
  uint16_t bits;
};

inline float Widen(float x) { return x; }
inline float Widen(Bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as XLA's convert does; NaN stays a (quiet) NaN.
inline void Narrow(float f, float* out) { *out = f; }
inline void Narrow(float f, Bf16* out) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = static_cast<uint16_t>(u >> 16);
}

// kLanes values from p as fp32 (bf16: each 16-bit pattern shifted into a float's top half).
typedef uint16_t HMem __attribute__((vector_size(2 * kLanes), aligned(2), may_alias));
typedef uint32_t U __attribute__((vector_size(4 * kLanes), aligned(4)));
inline V LoadWide(const float* p) { return Load(p); }
inline V LoadWide(const Bf16* p) {
  U bits = __builtin_convertvector(*reinterpret_cast<const HMem*>(p), U) << 16;
  V out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The type a handler reads an FFI buffer's elements as (F32: float, BF16: Bf16), and its data.
template <xla::ffi::DataType kType>
using Kernel = std::conditional_t<kType == xla::ffi::DataType::F32, float, Bf16>;

template <xla::ffi::DataType kType>
Kernel<kType>* Data(xla::ffi::Buffer<kType>& x) {
  return reinterpret_cast<Kernel<kType>*>(x.typed_data());
}

}  // namespace t5lite

#endif  // T5LITE_KERNELS_CPU_VECTORS_H_
