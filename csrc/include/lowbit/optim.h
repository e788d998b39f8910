// The optimizer update of lowbit.optim, one element at a time (torch-free, CPU and CUDA).
//
// One place for the formulas: the generic CPU kernel and the CUDA kernel call
// optim_update_element(); the AVX2 kernel is a lane-wise transcription of it with the same
// operations in the same order. python/lowbit/optim/reference.py is the pure-torch spec, op by op.
//
// Every arithmetic operation is one fp32 operation, rounded once (no FMA contraction: the CPU
// kernels build with -ffp-contract=off, the CUDA ones spell __fmul_rn / __fadd_rn), so kernels and
// reference agree bit for bit. Scalars are computed on the host in double and rounded to fp32
// once (OptimScalars), exactly as the reference does.
//
// The formulas are bitsandbytes' (the same names: "adam", "momentum", "rmsprop", "lion"):
//   adam:     m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;  p *= 1 - lr*wd (decoupled, as AdamW);
//             p += (-lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   momentum: g += wd*p;  m = (t == 1) ? g : b1*m + g;  p += -lr * m        (state2 unused)
//   rmsprop:  g += wd*p;  m = b1*m + (1-b1)*g*g;  p += -lr * g / (sqrt(m) + eps)
//   lion:     p *= 1 - lr*wd;  p += -lr * sign(b1*m + (1-b1)*g);  m = b2*m + (1-b2)*g
// Squares are formed as ((1-b)*g)*g, the order of torch's addcmul that bitsandbytes' CPU path
// uses, so the two libraries' fp32 states agree more often to the last bit.
// g is first multiplied by gnorm_scale (percentile clipping; 1 otherwise). With skip_zeros an
// element whose gradient is exactly 0 keeps its parameter and state values.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowbit/numeric.h"

namespace lowbit {

enum class OptimKind : int { adam = 0, momentum = 1, rmsprop = 2, lion = 3 };

// Host-computed fp32 scalars of one update (see make_optim_scalars).
struct OptimScalars {
  OptimKind kind;
  float beta1, one_minus_beta1;  // b1, fp32(1 - b1)
  float beta2, one_minus_beta2;  // b2, fp32(1 - b2)
  float eps;
  float correction2;   // adam: fp32(sqrt(1 - b2^t))
  float step_size;     // adam: fp32(-lr / (1 - b1^t)); others: fp32(-lr)
  float decay;         // adam, lion: fp32(1 - lr*wd), applied when weight_decay > 0
  float weight_decay;  // momentum, rmsprop: fp32(wd), added to g when > 0
  float gnorm_scale;
  bool first_step;  // momentum: t == 1 (m = g)
  bool skip_zeros;
  // Stochastic rounding of bf16 parameters: on when sr_seed >= 0 (the seed's low 32 bits).
  bool stochastic;
  uint32_t seed;
};

inline OptimScalars make_optim_scalars(OptimKind kind, double beta1, double beta2, double eps,
                                       int64_t step, double lr, double weight_decay,
                                       double gnorm_scale, bool skip_zeros, int64_t sr_seed) {
  OptimScalars s{};
  s.kind = kind;
  s.beta1 = float(beta1);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.eps = float(eps);
  s.correction2 = 1.0f;
  s.step_size = float(-lr);
  if (kind == OptimKind::adam) {
    const double t = double(step);
    s.correction2 = float(std::sqrt(1.0 - std::pow(beta2, t)));
    s.step_size = float(-lr / (1.0 - std::pow(beta1, t)));
  }
  s.decay = float(1.0 - lr * weight_decay);
  s.weight_decay = float(weight_decay);
  s.gnorm_scale = float(gnorm_scale);
  s.first_step = step == 1;
  s.skip_zeros = skip_zeros;
  s.stochastic = sr_seed >= 0;
  s.seed = uint32_t(uint64_t(sr_seed) & 0xffffffffu);
  return s;
}

// One rounding per operation on every compiler (nvcc contracts a*b+c into an FMA otherwise).
LOWBIT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LOWBIT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LOWBIT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LOWBIT_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// sign(x) in {-1, 0, +1} (0 for +-0, and for NaN: the gradient is finite, but a state can be NaN
// after an overflow; every device gives 0).
LOWBIT_HD float sign_f(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// The arithmetic of optim_update_element: one rounding per operation. The CUDA kernels also
// instantiate it with a policy that gives x86's NaN bits (optim.cu, CpuNanArith): a CUDA operation
// with a NaN result returns the canonical NaN 0x7fffffff, the CPU the quieted NaN operand (the
// first one) or the default NaN 0xffc00000, and a NaN parameter or fp32 state is stored as is.
struct RoundedArith {
  static LOWBIT_HD float mul(float a, float b) { return mul_rn(a, b); }
  static LOWBIT_HD float add(float a, float b) { return add_rn(a, b); }
  static LOWBIT_HD float div(float a, float b) { return div_rn(a, b); }
  static LOWBIT_HD float sqrt(float a) { return sqrt_rn(a); }
};

// One element: g (already in fp32), the parameter p and the states m (state1) and v (state2) in
// fp32, updated in place. v is untouched by the one-state optimizers.
template <typename A = RoundedArith>
LOWBIT_HD void optim_update_element(const OptimScalars& s, float g_in, float& p, float& m,
                                    float& v) {
  if (s.skip_zeros && g_in == 0.0f) return;
  float g = A::mul(g_in, s.gnorm_scale);
  switch (s.kind) {
    case OptimKind::adam: {
      m = A::add(A::mul(m, s.beta1), A::mul(g, s.one_minus_beta1));
      v = A::add(A::mul(v, s.beta2), A::mul(A::mul(s.one_minus_beta2, g), g));
      const float denom = A::add(A::div(A::sqrt(v), s.correction2), s.eps);
      if (s.weight_decay > 0.0f) p = A::mul(p, s.decay);
      p = A::add(p, A::mul(s.step_size, A::div(m, denom)));
      break;
    }
    case OptimKind::momentum: {
      if (s.weight_decay > 0.0f) g = A::add(g, A::mul(p, s.weight_decay));
      m = s.first_step ? g : A::add(A::mul(m, s.beta1), g);
      p = A::add(p, A::mul(s.step_size, m));
      break;
    }
    case OptimKind::rmsprop: {
      if (s.weight_decay > 0.0f) g = A::add(g, A::mul(p, s.weight_decay));
      m = A::add(A::mul(m, s.beta1), A::mul(A::mul(s.one_minus_beta1, g), g));
      p = A::add(p, A::mul(s.step_size, A::div(g, A::add(A::sqrt(m), s.eps))));
      break;
    }
    case OptimKind::lion: {
      if (s.weight_decay > 0.0f) p = A::mul(p, s.decay);
      const float u = A::add(A::mul(m, s.beta1), A::mul(g, s.one_minus_beta1));
      p = A::add(p, A::mul(s.step_size, sign_f(u)));
      m = A::add(A::mul(m, s.beta2), A::mul(g, s.one_minus_beta2));
      break;
    }
  }
}

// ---- stochastic rounding of bf16 parameters ---------------------------------------------------
// A counter-based hash, so every element's random bits depend only on (seed, flat index): the same
// on every thread split, on CPU and CUDA, and in the reference (which computes it with int64
// tensor ops). lowbias32 is Chris Wellons' 32-bit integer finaliser.
LOWBIT_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// 32 random bits of element i: the high half of the index perturbs the key, the low half is hashed.
LOWBIT_HD uint32_t sr_bits(uint32_t seed, int64_t i) {
  const uint32_t key = lowbias32(seed + uint32_t(uint64_t(i) >> 32) * 0x9e3779b9u);
  return lowbias32(uint32_t(uint64_t(i)) ^ key);
}

// fp32 -> bf16, rounding up with probability (dropped bits) / 2^16: add 16 random bits below the
// kept ones and truncate. Non-finite values round to nearest even (their bits must not carry).
// Values within one bf16 step of the largest finite bf16 may round up to Inf.
LOWBIT_HD bfloat16_t to_bfloat16_stochastic(float f, uint32_t rnd) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return to_bfloat16(f);
  return bfloat16_t{uint16_t((u + (rnd & 0xffffu)) >> 16)};
}

// Store the updated parameter of element i.
template <typename P>
LOWBIT_HD void store_param(const OptimScalars&, P* p, int64_t i, float v) {
  p[i] = from_float<P>(v);
}
template <>
LOWBIT_HD void store_param<bfloat16_t>(const OptimScalars& s, bfloat16_t* p, int64_t i, float v) {
  p[i] = s.stochastic ? to_bfloat16_stochastic(v, sr_bits(s.seed, i)) : to_bfloat16(v);
}

}  // namespace lowbit
