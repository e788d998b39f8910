// The SIMT 4-bit GEMV (fourbit_gemv.cuh) for bfloat16_t activations.
#include "fourbit_gemv.cuh"

namespace lowbit::cuda {

LOWBIT_GEMV_FAST(bfloat16_t, const float*)
LOWBIT_GEMV_FAST(bfloat16_t, BlockAbsmax)
LOWBIT_GEMV_FAST_AFFINE(bfloat16_t)

}  // namespace lowbit::cuda
