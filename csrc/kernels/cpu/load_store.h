// Typed element access for the CPU kernels. dispatch_float lives in lowbit/numeric.h (shared with
// the CUDA kernels); it is named here so the CPU kernels find it in their own namespace.
#pragma once

#include "lowbit/numeric.h"

namespace lowbit::cpu {

using lowbit::dispatch_float;

}  // namespace lowbit::cpu
