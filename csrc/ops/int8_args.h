// Checks for the LLM.int8() ops, shared by the CPU and CUDA wrappers.
#pragma once

#include <cmath>
#include <optional>
#include <tuple>

#include "ops/common.h"

namespace lowbit::ops {

// The largest K for which an int8 x int8 dot product cannot overflow int32 whatever the codes:
// 128 * 128 * K < 2**31. lowbit's quantizers never emit -128 (127 * 127 would allow 133144), but
// int8_linear_matmul takes any int8 tensors, and a checkpoint may hold -128.
constexpr int64_t kMaxInt8K = 131071;

inline void check_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0, "lowbit.", op,
                    ": threshold must be a finite number >= 0 (0 disables outliers), got ",
                    threshold);
}

inline void check_k(const char* op, int64_t K) {
  TORCH_CHECK_VALUE(K <= kMaxInt8K, "lowbit.", op, ": K = ", K, " exceeds ", kMaxInt8K,
                    ", the largest inner dimension whose int32 accumulation cannot overflow "
                    "(128 * 128 * K < 2**31)");
}

// A int8 [..., K] times B int8 [N, K]^T; returns (M, N, K) with M the product of A's leading dims.
inline std::tuple<int64_t, int64_t, int64_t> check_int8_matmul(const char* op, const at::Tensor& A,
                                                               const at::Tensor& B) {
  check_dtype(op, "A", A, at::kChar);
  check_dtype(op, "B", B, at::kChar);
  check_device(op, "B", B, A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  TORCH_CHECK_VALUE(B.dim() == 2, "lowbit.", op, ": B must be 2-D [N, K], got shape ", B.sizes());
  const int64_t K = B.size(1), N = B.size(0);
  TORCH_CHECK_VALUE(A.size(-1) == K, "lowbit.", op, ": A's last dimension (", A.size(-1),
                    ") must equal B's K (", K, ")");
  check_k(op, K);
  return {leading_rows(A), N, K};
}

inline std::tuple<int64_t, int64_t> check_mm_dequant(const char* op, const at::Tensor& A,
                                                     const at::Tensor& row_stats,
                                                     const at::Tensor& col_stats,
                                                     at::ScalarType out_dtype,
                                                     const std::optional<at::Tensor>& bias) {
  check_dtype(op, "A", A, at::kInt);
  check_dtype(op, "row_stats", row_stats, at::kFloat);
  check_dtype(op, "col_stats", col_stats, at::kFloat);
  check_device(op, "row_stats", row_stats, A, "A");
  check_device(op, "col_stats", col_stats, A, "A");
  check_float(op, "dtype", out_dtype);
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t N = A.size(-1), rows = leading_rows(A);
  TORCH_CHECK_VALUE(row_stats.numel() == rows, "lowbit.", op,
                    ": row_stats must hold one value per row of A (", rows, "), got ",
                    row_stats.numel());
  TORCH_CHECK_VALUE(col_stats.numel() == N, "lowbit.", op,
                    ": col_stats must hold one value per column of A (", N, "), got ",
                    col_stats.numel());
  if (bias.has_value()) {
    check_float(op, "bias", bias->scalar_type());
    check_device(op, "bias", *bias, A, "A");
    TORCH_CHECK_VALUE(bias->numel() == N, "lowbit.", op, ": bias must hold ", N, " values, got ",
                      bias->numel());
  }
  return {rows, N};
}

// A float [..., K], W int8 [N, K], W_scale fp32 [N], bias float [N]; returns (M, N, K).
inline std::tuple<int64_t, int64_t, int64_t> check_int8_linear(
    const char* op, const at::Tensor& A, const at::Tensor& W, const at::Tensor& W_scale,
    const std::optional<at::Tensor>& bias, double threshold) {
  check_float(op, "A", A.scalar_type());
  check_dtype(op, "W", W, at::kChar);
  check_dtype(op, "W_scale", W_scale, at::kFloat);
  check_device(op, "W", W, A, "A");
  check_device(op, "W_scale", W_scale, A, "A");
  check_threshold(op, threshold);
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  TORCH_CHECK_VALUE(W.dim() == 2, "lowbit.", op, ": W must be 2-D [N, K], got shape ", W.sizes());
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK_VALUE(A.size(-1) == K, "lowbit.", op, ": A's last dimension (", A.size(-1),
                    ") must equal W's K (", K, ")");
  check_k(op, K);
  TORCH_CHECK_VALUE(W_scale.numel() == N, "lowbit.", op,
                    ": W_scale must hold one value per row of W (", N, "), got ", W_scale.numel());
  if (bias.has_value()) {
    check_float(op, "bias", bias->scalar_type());
    check_device(op, "bias", *bias, A, "A");
    TORCH_CHECK_VALUE(bias->numel() == N, "lowbit.", op, ": bias must hold ", N, " values, got ",
                      bias->numel());
  }
  return {leading_rows(A), N, K};
}

}  // namespace lowbit::ops
