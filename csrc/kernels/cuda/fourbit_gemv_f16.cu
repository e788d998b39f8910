// The SIMT 4-bit GEMV (fourbit_gemv.cuh) for half_t activations.
#include "fourbit_gemv.cuh"

namespace lowbit::cuda {

LOWBIT_GEMV_FAST(half_t, const float*)
LOWBIT_GEMV_FAST(half_t, BlockAbsmax)
LOWBIT_GEMV_FAST_AFFINE(half_t)

}  // namespace lowbit::cuda
