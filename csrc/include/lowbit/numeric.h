// Scalar types and conversions shared by the CPU and CUDA kernels (torch-free).
//
// fp16 and bf16 travel as raw 16-bit patterns; every conversion rounds to nearest-even, exactly as
// torch's own casts do, so a kernel's output is bit-identical to `x.float().to(dtype)` in torch.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

LOWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LOWBIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 is the upper half of an fp32.
LOWBIT_HD float to_float(bfloat16_t h) { return bits_float(uint32_t(h.bits) << 16); }

// Round to nearest-even on bit 16; NaN stays a quiet NaN with its sign.
LOWBIT_HD bfloat16_t to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

// fp16 layout: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Exact widening: move the exponent
// from bias 15 to bias 127; subnormals are renormalised through a float subtraction.
LOWBIT_HD float to_float(half_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = uint32_t(h.bits & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalise
    o = float_bits(bits_float(o) - bits_float(113u << 23));
  }
  return bits_float(o | (uint32_t(h.bits & 0x8000u) << 16));
}

// Narrowing with round-to-nearest-even, overflow to Inf, subnormals rounded through a float add.
LOWBIT_HD half_t to_half(float f) {
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16_max) {
    o = (u > f32_inf) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {
    o = uint16_t(float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu;
    u += mant_odd;
    o = uint16_t(u >> 13);
  }
  return half_t{uint16_t(o | (sign >> 16))};
}

LOWBIT_HD float to_float(float f) { return f; }

// Store a float into a tensor element of type T.
template <typename T>
LOWBIT_HD T from_float(float f);
template <>
LOWBIT_HD float from_float<float>(float f) {
  return f;
}
template <>
LOWBIT_HD half_t from_float<half_t>(float f) {
  return to_half(f);
}
template <>
LOWBIT_HD bfloat16_t from_float<bfloat16_t>(float f) {
  return to_bfloat16(f);
}

// The float element types a kernel accepts; the ATen wrappers map torch dtypes onto these.
enum class FloatType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Dispatch a FloatType once on the host; the functor receives a value of the element type and
// runs a loop compiled (and vectorised) for it. Shared by the CPU and CUDA kernels.
template <typename F>
inline void dispatch_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::f32:
      f(float{});
      break;
    case FloatType::f16:
      f(half_t{});
      break;
    case FloatType::bf16:
      f(bfloat16_t{});
      break;
  }
}

}  // namespace lowbit
