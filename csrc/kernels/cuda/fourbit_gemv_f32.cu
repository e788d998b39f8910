// The SIMT 4-bit GEMV (fourbit_gemv.cuh) for float activations.
#include "fourbit_gemv.cuh"

namespace lowbit::cuda {

LOWBIT_GEMV_FAST(float, const float*)
LOWBIT_GEMV_FAST(float, BlockAbsmax)
LOWBIT_GEMV_FAST_AFFINE(float)

}  // namespace lowbit::cuda
