// ATen wrappers for LLM.int8(): row-wise quantization with outlier columns, the int8 GEMM, its
// dequantization and the fused linear layer (CPU).
#include <cmath>
#include <vector>

#include "lowbit/cpu_kernels.h"
#include "ops/common.h"
#include "ops/int8_args.h"
#include "ops/ops.h"

namespace lowbit::ops {

namespace {

// Flags the outlier columns of a [rows, K] float tensor; returns a uint8 mask of K entries.
at::Tensor outlier_mask(const at::Tensor& a2, float threshold) {
  const int64_t rows = a2.size(0), K = a2.size(1);
  at::Tensor mask = at::empty({K}, a2.options().dtype(at::kByte));
  const FloatType t = float_type(a2.scalar_type());
  const void* ap = a2.data_ptr();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  at::parallel_for(0, K, std::max<int64_t>(256, grain_for(rows)), [&](int64_t c0, int64_t c1) {
    cpu::int8_outlier_columns(t, ap, rows, K, threshold, mp, c0, c1);
  });
  return mask;
}

// Quantizes a contiguous [rows, K] float tensor; col_mask may be undefined.
void quantize_rows(const at::Tensor& a2, float threshold, const at::Tensor& col_mask, at::Tensor& q,
                   at::Tensor& stats) {
  const int64_t rows = a2.size(0), K = a2.size(1);
  if (K == 0) {  // empty rows: scale 0, no codes (and no kernel call on null data pointers)
    stats.zero_();
    return;
  }
  const FloatType t = float_type(a2.scalar_type());
  const void* ap = a2.data_ptr();
  const uint8_t* mp = col_mask.defined() ? col_mask.data_ptr<uint8_t>() : nullptr;
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = stats.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(K), [&](int64_t r0, int64_t r1) {
    cpu::int8_vectorwise_quant(t, ap, rows, K, threshold, mp, qp, sp, r0, r1);
  });
}

void gemm_into(const at::Tensor& a2, const at::Tensor& b, at::Tensor& c2) {
  const int64_t M = a2.size(0), N = b.size(0), K = b.size(1);
  const int8_t* ap = a2.data_ptr<int8_t>();
  const int8_t* bp = b.data_ptr<int8_t>();
  int32_t* cp = c2.data_ptr<int32_t>();
  at::parallel_for(0, N, grain_for(K * std::max<int64_t>(M, 1), 65536),
                   [&](int64_t n0, int64_t n1) { cpu::int8_gemm(ap, bp, cp, M, N, K, n0, n1); });
}

at::Tensor mm_dequant_2d(const at::Tensor& c2, const at::Tensor& row_stats,
                         const at::Tensor& col_stats, const at::Tensor& bias,
                         at::ScalarType out_dtype) {
  const int64_t rows = c2.size(0), N = c2.size(1);
  at::Tensor out = at::empty({rows, N}, c2.options().dtype(out_dtype));
  const at::Tensor rs = row_stats.contiguous(), cs = col_stats.contiguous();
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias;
  const int32_t* cp = c2.data_ptr<int32_t>();
  const float* rp = rs.data_ptr<float>();
  const float* colp = cs.data_ptr<float>();
  const void* bp = bc.defined() ? bc.data_ptr() : nullptr;
  const FloatType bt = bc.defined() ? float_type(bc.scalar_type()) : FloatType::f32;
  const FloatType ot = float_type(out_dtype);
  void* op_ = out.data_ptr();
  at::parallel_for(0, rows, grain_for(N), [&](int64_t r0, int64_t r1) {
    cpu::int8_mm_dequant(cp, rp, colp, bt, bp, N, ot, op_, r0, r1);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> int8_vectorwise_quant_cpu(
    const at::Tensor& A, double threshold) {
  const char* op = "int8_vectorwise_quant";
  check_float(op, "A", A.scalar_type());
  check_threshold(op, threshold);
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  const at::Tensor a2 = A.contiguous().reshape({rows, K});
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, A.options().dtype(at::kFloat));
  std::optional<at::Tensor> outlier_cols;
  at::Tensor mask;
  if (threshold > 0.0) {
    mask = outlier_mask(a2, float(threshold));
    outlier_cols = at::nonzero(mask).reshape({-1});
  }
  at::Tensor q2 = q.view({rows, K});
  quantize_rows(a2, float(threshold), mask, q2, stats);
  return {q, stats, outlier_cols};
}

at::Tensor int8_vectorwise_dequant_cpu(const at::Tensor& A, const at::Tensor& stats) {
  const char* op = "int8_vectorwise_dequant";
  check_dtype(op, "A", A, at::kChar);
  check_dtype(op, "stats", stats, at::kFloat);
  check_device(op, "stats", stats, A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  TORCH_CHECK_VALUE(stats.numel() == rows, "lowbit.", op, ": stats must hold one value per row (",
                    rows, "), got ", stats.numel());
  const at::Tensor a = A.contiguous(), s = stats.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kFloat));
  const int8_t* ap = a.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(K), [&](int64_t r0, int64_t r1) {
    cpu::int8_vectorwise_dequant(ap, sp, K, op_, r0, r1);
  });
  return out;
}

void int8_linear_matmul_out_cpu(const at::Tensor& A, const at::Tensor& B, at::Tensor& out) {
  const char* op = "int8_linear_matmul";
  const auto [M, N, K] = check_int8_matmul(op, A, B);
  check_device(op, "out", out, A, "A");
  check_dtype(op, "out", out, at::kInt);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), "lowbit.", op, ": out must have shape ",
                    at::IntArrayRef(shape), ", got ", out.sizes());
  const at::Tensor a2 = A.contiguous().reshape({M, K}), b = B.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(shape, out.options());
  at::Tensor c2 = dst.view({M, N});
  if (K == 0)
    c2.zero_();
  else
    gemm_into(a2, b, c2);
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor int8_linear_matmul_cpu(const at::Tensor& A, const at::Tensor& B) {
  const auto [M, N, K] = check_int8_matmul("int8_linear_matmul", A, B);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, A.options().dtype(at::kInt));
  int8_linear_matmul_out_cpu(A, B, out);
  return out;
}

at::Tensor int8_mm_dequant_cpu(const at::Tensor& A, const at::Tensor& row_stats,
                               const at::Tensor& col_stats, std::optional<at::ScalarType> dtype,
                               const std::optional<at::Tensor>& bias) {
  const char* op = "int8_mm_dequant";
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  const auto [rows, N] = check_mm_dequant(op, A, row_stats, col_stats, out_dtype, bias);
  at::Tensor out = mm_dequant_2d(A.contiguous().reshape({rows, N}), row_stats, col_stats,
                                 bias.has_value() ? *bias : at::Tensor(), out_dtype);
  return out.reshape(A.sizes());
}

at::Tensor int8_linear_cpu(const at::Tensor& A, const at::Tensor& W, const at::Tensor& W_scale,
                           const std::optional<at::Tensor>& bias, double threshold) {
  const char* op = "int8_linear";
  const auto [M, N, K] = check_int8_linear(op, A, W, W_scale, bias, threshold);
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end());
  out_shape.back() = N;
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());
  const at::Tensor a2 = A.contiguous().reshape({M, K});
  const at::Tensor w = W.contiguous();
  at::Tensor mask;
  at::Tensor cols;
  if (threshold > 0.0) {
    mask = outlier_mask(a2, float(threshold));
    cols = at::nonzero(mask).reshape({-1});
  }
  at::Tensor q = at::empty({M, K}, A.options().dtype(at::kChar));
  at::Tensor row_stats = at::empty({M}, A.options().dtype(at::kFloat));
  quantize_rows(a2, float(threshold), mask, q, row_stats);
  at::Tensor c = at::empty({M, N}, A.options().dtype(at::kInt));
  if (K == 0)
    c.zero_();
  else
    gemm_into(q, w, c);
  const bool has_outliers = cols.defined() && cols.numel() > 0;
  // Without outliers, dequantize + bias straight into A's dtype. With them, stay in fp32 until
  // the outlier product (activation columns x dequantized weight columns, fp32) is added.
  at::Tensor out =
      mm_dequant_2d(c, row_stats, W_scale, bias_t, has_outliers ? at::kFloat : A.scalar_type());
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
