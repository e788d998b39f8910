// The int8 GEMM kernel of the AVX2 set (avx2_int8_gemm.cpp), also the AVX-512 set's fallback.
#pragma once

#include <cstdint>

namespace lowbit::cpu::avx2 {

// C[m, n] = sum_k A[m, k] * B[n, k] for n in [n_begin, n_end); exact int32.
void int8_gemm_avx2(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                    int64_t n_begin, int64_t n_end);

}  // namespace lowbit::cpu::avx2
