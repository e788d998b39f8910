// The per-block scale policy shared by every blockwise quantizer (torch-free, CPU and CUDA), so
// that CPU and CUDA kernels and reference.py agree bit for bit.
//
// A block's absmax is max |x| in fp32. The element is normalised as x * (1 / absmax), the
// reciprocal rounded to fp32 once per block (as bitsandbytes does). Special blocks:
//   * absmax == 0 (all zeros): every element gets the code nearest 0 and absmax stays 0, so the
//     block dequantizes to exact zeros (never 0/0 = NaN).
//   * 1 / absmax overflows (absmax is a tiny subnormal): x / absmax instead, so nothing becomes
//   Inf.
//   * the block holds a NaN or +-Inf: absmax is stored as NaN and every code is the zero code, so
//     the whole block dequantizes to NaN: the damage stays visible and stays inside the block.
#pragma once

#include <cstdint>

#include "lowbit/numeric.h"

namespace lowbit {

enum class BlockMode : int { normal = 0, zero = 1, divide = 2, nonfinite = 3 };

struct BlockScale {
  float absmax;  // what is stored
  float inv;     // 1 / absmax, used in mode normal
  BlockMode mode;
};

LOWBIT_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }

// Fold one element into a running (max, nonfinite) pair. fmax-style max ignores NaN, so the
// nonfinite flag is tracked apart: !(|x| <= FLT_MAX) is true for NaN and +-Inf.
LOWBIT_HD void absmax_fold(float x, float& m, bool& bad) {
  const float a = abs_f(x);
  m = a > m ? a : m;
  bad = bad || !(a <= 3.4028234663852886e38f);
}

LOWBIT_HD BlockScale make_block_scale(float m, bool bad) {
  BlockScale s;
  if (bad) {
    s.absmax = bits_float(0x7fc00000u);
    s.inv = 0.0f;
    s.mode = BlockMode::nonfinite;
  } else if (m == 0.0f) {
    s.absmax = 0.0f;
    s.inv = 0.0f;
    s.mode = BlockMode::zero;
  } else {
    s.absmax = m;
    s.inv = 1.0f / m;
    s.mode = (s.inv <= 3.4028234663852886e38f) ? BlockMode::normal : BlockMode::divide;
  }
  return s;
}

// The normalised value of x in a block of mode normal or divide.
LOWBIT_HD float normalize(float x, const BlockScale& s) {
  return s.mode == BlockMode::normal ? x * s.inv : x / s.absmax;
}

// The scale of each block of a 4-bit tensor, read by the fused products: stored as fp32 (one
// absmax per block), or double quantized (QLoRA, "nested"): one uint8 code q[b] per block and
//     scale(b) = nested_code[q[b]] * nested_absmax[b / nested_blocksize] + nested_offset
// in fp32, the product rounded before the sum (never one FMA): exactly dequantize_blockwise to
// fp32 followed by `+ offset` in fp32, so a fused product equals the one on the decoded absmax.
// A kernel reads one scale per block (per 32..4096 weights), so the nested decode costs a byte
// load, two table loads, a multiply and an add per block.
struct BlockAbsmax {
  const float* absmax = nullptr;         // plain: fp32 [blocks]; null when nested
  const uint8_t* code_index = nullptr;   // nested: uint8 [blocks]
  const float* nested_absmax = nullptr;  // nested: fp32 [ceil(blocks / nested_blocksize)]
  const float* nested_code = nullptr;    // nested: fp32 [256]
  float nested_offset = 0.0f;
  int nested_log2 = 8;  // log2(nested_blocksize)

  LOWBIT_HD static BlockAbsmax plain(const float* absmax) {
    BlockAbsmax s;
    s.absmax = absmax;
    return s;
  }
  LOWBIT_HD bool nested() const { return absmax == nullptr; }
  LOWBIT_HD float operator[](int64_t b) const {
    if (absmax != nullptr) return absmax[b];
#if defined(__CUDA_ARCH__)
    return __fadd_rn(__fmul_rn(nested_code[code_index[b]], nested_absmax[b >> nested_log2]),
                     nested_offset);
#else
    // Two roundings: the SIMD translation units build with -ffp-contract=off and the generic one
    // without FMA, so the compiler cannot fuse them.
    const float v = nested_code[code_index[b]] * nested_absmax[b >> nested_log2];
    return v + nested_offset;
#endif
  }
};

// LLM.int8() row scaling: v * (127 / absmax). When 127 / absmax overflows (absmax below ~3.7e-37)
// the row divides instead, (v / absmax) * 127, so a 0 stays 0 (never 0 * Inf = NaN) and tiny
// values still get their codes.
LOWBIT_HD bool int8_scale_overflows(float scale) { return !(scale <= 3.4028234663852886e38f); }

LOWBIT_HD float int8_scale_value(float v, float absmax, float scale) {
  return int8_scale_overflows(scale) ? (v / absmax) * 127.0f : v * scale;
}

}  // namespace lowbit
