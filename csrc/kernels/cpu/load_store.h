// Typed element access for the CPU kernels: dispatch a FloatType once, then run a loop that the
// compiler can vectorise for that element type.
#pragma once

#include "lowbit/numeric.h"

namespace lowbit::cpu {

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

}  // namespace lowbit::cpu
