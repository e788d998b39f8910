// LLM.int8(): row-wise quantization with outlier columns, the int8 GEMM, its dequantization and
// the fused linear layer: the ops for every device (kernels behind ops/backend.h).
#include <algorithm>
#include <vector>

#include "ops/backend.h"
#include "ops/common.h"
#include "ops/int8_args.h"
#include "ops/ops.h"

namespace lowbit::ops {

namespace {

// A uint8 mask of the K columns of a contiguous [rows, K] float tensor holding an outlier.
at::Tensor outlier_mask(const Backend& backend, const at::Tensor& a2, float threshold) {
  at::Tensor mask = at::empty({a2.size(1)}, a2.options().dtype(at::kByte));
  backend.int8_outlier_columns(a2, threshold, mask);
  return mask;
}

// The indices (int64 [count]) of the set entries of a uint8 mask. Most activations have no
// outlier column, and at M = 1 at::nonzero is then pure overhead: on the CPU a scan of the bytes
// answers first. On CUDA at::nonzero stays the one device-to-host synchronisation (an any()
// before it would add a second one whenever there are outliers).
at::Tensor outlier_columns(const at::Tensor& mask) {
  if (mask.is_cpu()) {
    const int64_t K = mask.numel();
    const uint8_t* p = mask.data_ptr<uint8_t>();
    if (K == 0 || std::all_of(p, p + K, [](uint8_t v) { return v == 0; }))
      return at::empty({0}, mask.options().dtype(at::kLong));
  }
  return at::nonzero(mask).reshape({-1});
}

// Dequantizes the int32 product c2 [rows, N] (+ bias, which may be undefined) into out_dtype.
at::Tensor mm_dequant_2d(const Backend& backend, const at::Tensor& c2, const at::Tensor& row_stats,
                         const at::Tensor& col_stats, const at::Tensor& bias,
                         at::ScalarType out_dtype) {
  at::Tensor out = at::empty({c2.size(0), c2.size(1)}, c2.options().dtype(out_dtype));
  const at::Tensor rs = row_stats.contiguous(), cs = col_stats.contiguous();
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias;
  backend.int8_mm_dequant(c2, rs, cs, bc, out);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> int8_vectorwise_quant(
    const at::Tensor& A, double threshold) {
  const char* op = "int8_vectorwise_quant";
  check_float(op, "A", A.scalar_type());
  check_threshold(op, threshold);
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const Backend& backend = backend_for(op, A);
  const at::Tensor a2 = A.contiguous().reshape({rows, K});
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, A.options().dtype(at::kFloat));
  std::optional<at::Tensor> outlier_cols;
  at::Tensor mask;
  if (threshold > 0.0) {
    mask = outlier_mask(backend, a2, float(threshold));
    outlier_cols = outlier_columns(mask);
  }
  at::Tensor q2 = q.view({rows, K});
  backend.int8_vectorwise_quant(a2, float(threshold), mask, q2, stats);
  return {q, stats, outlier_cols};
}

at::Tensor int8_vectorwise_dequant(const at::Tensor& A, const at::Tensor& stats) {
  const char* op = "int8_vectorwise_dequant";
  check_dtype(op, "A", A, at::kChar);
  check_dtype(op, "stats", stats, at::kFloat);
  check_device(op, "stats", stats, A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  TORCH_CHECK_VALUE(stats.numel() == rows, "lowbit.", op, ": stats must hold one value per row (",
                    rows, "), got ", stats.numel());
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a = A.contiguous(), s = stats.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kFloat));
  at::Tensor out2 = out.view({rows, K});
  backend_for(op, A).int8_vectorwise_dequant(a.view({rows, K}), s, out2);
  return out;
}

void int8_linear_matmul_out(const at::Tensor& A, const at::Tensor& B, at::Tensor& out) {
  const char* op = "int8_linear_matmul";
  const auto [M, N, K] = check_int8_matmul(op, A, B);
  check_device(op, "out", out, A, "A");
  check_dtype(op, "out", out, at::kInt);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), "lowbit.", op, ": out must have shape ",
                    at::IntArrayRef(shape), ", got ", out.sizes());
  if (M == 0 || N == 0) return;
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a2 = A.contiguous().reshape({M, K}), b = B.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(shape, out.options());
  at::Tensor c2 = dst.view({M, N});
  if (K == 0)
    c2.zero_();
  else
    backend_for(op, A).int8_gemm(a2, b, c2);
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor int8_linear_matmul(const at::Tensor& A, const at::Tensor& B) {
  const auto [M, N, K] = check_int8_matmul("int8_linear_matmul", A, B);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, A.options().dtype(at::kInt));
  int8_linear_matmul_out(A, B, out);
  return out;
}

at::Tensor int8_mm_dequant(const at::Tensor& A, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, std::optional<at::ScalarType> dtype,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "int8_mm_dequant";
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  const auto [rows, N] = check_mm_dequant(op, A, row_stats, col_stats, out_dtype, bias);
  const c10::OptionalDeviceGuard guard(guard_device(A));
  at::Tensor out = mm_dequant_2d(backend_for(op, A), A.contiguous().reshape({rows, N}), row_stats,
                                 col_stats, bias.has_value() ? *bias : at::Tensor(), out_dtype);
  return out.reshape(A.sizes());
}

// The whole LLM.int8() forward: outlier columns, row quantization with those columns zeroed, int8
// GEMM, dequantization (+ bias), and the outlier columns' product in fp32 added before the one
// rounding to A's dtype.
at::Tensor int8_linear(const at::Tensor& A, const at::Tensor& W, const at::Tensor& W_scale,
                       const std::optional<at::Tensor>& bias, double threshold) {
  const char* op = "int8_linear";
  const auto [M, N, K] = check_int8_linear(op, A, W, W_scale, bias, threshold);
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end());
  out_shape.back() = N;
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const Backend& backend = backend_for(op, A);
  const at::Tensor a2 = A.contiguous().reshape({M, K});
  const at::Tensor w = W.contiguous();
  if (K > 0) {
    // CUDA: three launches, no host synchronisation (cuda_backend.cpp); the CPU: one pass per
    // step and the outlier product fused into the dequantization (cpu_backend.cpp). The
    // composition below serves K = 0 and any backend without a fused path.
    const at::Tensor fused =
        backend.int8_linear(a2, w, W_scale.contiguous(),
                            bias_t.defined() ? bias_t.contiguous() : bias_t, float(threshold));
    if (fused.defined()) return fused.reshape(out_shape);
  }
  at::Tensor mask;
  at::Tensor cols;
  if (threshold > 0.0) {
    mask = outlier_mask(backend, a2, float(threshold));
    cols = outlier_columns(mask);
  }
  at::Tensor q = at::empty({M, K}, A.options().dtype(at::kChar));
  at::Tensor row_stats = at::empty({M}, A.options().dtype(at::kFloat));
  backend.int8_vectorwise_quant(a2, float(threshold), mask, q, row_stats);
  at::Tensor c = at::empty({M, N}, A.options().dtype(at::kInt));
  if (K == 0)
    c.zero_();
  else
    backend.int8_gemm(q, w, c);
  const bool has_outliers = cols.defined() && cols.numel() > 0;
  // Without outliers, dequantize + bias straight into A's dtype. With them, stay in fp32 until
  // the outlier product (activation columns x dequantized weight columns, fp32) is added.
  at::Tensor out = mm_dequant_2d(backend, c, row_stats, W_scale, bias_t,
                                 has_outliers ? at::kFloat : A.scalar_type());
  if (has_outliers) {
    const at::Tensor a_out = a2.index_select(1, cols).to(at::kFloat);
    const at::Tensor w_out = w.index_select(1, cols).to(at::kFloat) *
                             (W_scale.to(at::kFloat).reshape({N, 1}) * (1.0f / 127.0f));
    out.addmm_(a_out, w_out.t());
    out = out.to(A.scalar_type());
  }
  return out.reshape(out_shape);
}

}  // namespace lowbit::ops
