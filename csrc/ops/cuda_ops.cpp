// ATen wrappers for the CUDA kernels, and their registration under the CUDA dispatch key.
//
// Each wrapper runs the same argument checks as its CPU twin (common.h, fourbit_args.h,
// int8_args.h), makes the inputs contiguous, allocates the outputs on the input's device, sets a
// device guard and launches on the current stream; a launch error raises at once. Empty inputs
// launch nothing. Compiled only when the installed torch has CUDA (LOWBIT_WITH_CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"
#include "ops/common.h"
#include "ops/fourbit_args.h"
#include "ops/int8_args.h"
#include "ops/ops.h"

namespace lowbit::ops {

namespace {

// The stream of the device the guard has made current.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- 8-bit blockwise ----------------------------------------------------------------------------

constexpr int64_t kMinBlock8 = 64, kMaxBlock8 = 4096;

// As blockwise.cpp's check_code.
void check_code256(const char* op, const at::Tensor& code, const at::Tensor& A) {
  check_dtype(op, "code", code, at::kFloat);
  check_device(op, "code", code, A, "A");
  TORCH_CHECK_VALUE(code.numel() == 256, "lowbit.", op,
                    ": code must hold 256 values (an 8-bit code), got ", code.numel());
}

// The CPU wrapper checks the order while it builds the midpoints on the host. Here the code lives
// on the device: one reduction and one device-to-host read of a bool (quantization runs at load
// time, not in the forward pass); only when it fails is the code copied over to name the entry.
void check_sorted256(const char* op, const at::Tensor& c) {
  const bool sorted = (c.slice(0, 1) >= c.slice(0, 0, 255)).all().item<bool>();
  if (sorted) return;
  const at::Tensor h = c.to(at::kCPU);
  const float* cv = h.data_ptr<float>();
  for (int i = 0; i < 255; ++i)
    TORCH_CHECK_VALUE(cv[i] <= cv[i + 1], "lowbit.", op, ": code must be sorted ascending (entry ",
                      i + 1, " is below entry ", i, ")");
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A,
                                                           const at::Tensor& code,
                                                           int64_t blocksize) {
  const char* op = "quantize_blockwise";
  check_float(op, "A", A.scalar_type());
  check_code256(op, code, A);
  check_blocksize(op, blocksize, kMinBlock8, kMaxBlock8);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const at::Tensor c = code.contiguous();
  check_sorted256(op, c);
  const int64_t n = a.numel(), blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  if (n > 0)
    C10_CUDA_CHECK(cuda::quantize_blockwise(float_type(a.scalar_type()), a.data_ptr(), n, blocksize,
                                            c.data_ptr<float>(), q.data_ptr<uint8_t>(),
                                            absmax.data_ptr<float>(), current_stream()));
  return {q, absmax};
}

void dequantize_blockwise_out_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                   const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                   at::Tensor& out) {
  const char* op = "dequantize_blockwise";
  check_dtype(op, "A", A, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_device(op, "absmax", absmax, A, "A");
  check_code256(op, code, A);
  check_float(op, "dtype", dtype);
  check_blocksize(op, blocksize, kMinBlock8, kMaxBlock8);
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "lowbit.", op, ": absmax must hold ceil(", n, " / ",
                    blocksize, ") = ", blocks, " values, got ", absmax.numel());
  check_device(op, "out", out, A, "A");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "lowbit.", op, ": out must be ", dtype_name(dtype),
                   ", got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.sizes() == A.sizes(), "lowbit.", op, ": out must have shape ", A.sizes(),
                    ", got ", out.sizes());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous(), m = absmax.contiguous(), c = code.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(A.sizes(), out.options());
  C10_CUDA_CHECK(cuda::dequantize_blockwise(a.data_ptr<uint8_t>(), m.data_ptr<float>(),
                                            c.data_ptr<float>(), n, blocksize, float_type(dtype),
                                            dst.data_ptr(), current_stream()));
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  check_float("dequantize_blockwise", "dtype", dtype);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  dequantize_blockwise_out_cuda(A, absmax, code, blocksize, dtype, out);
  return out;
}

// ---- 4-bit --------------------------------------------------------------------------------------

cuda::Code16 code16_of(QuantType4 qt) {
  cuda::Code16 c;
  const float* v = code4_table(qt);
  for (int i = 0; i < 16; ++i) c.v[i] = v[i];
  return c;
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type,
                                                      at::ScalarType quant_storage) {
  const char* op = "quantize_4bit";
  check_float(op, "A", A.scalar_type());
  check_blocksize(op, blocksize, kMin4bitBlock, kMax4bitBlock);
  const QuantType4 qt = parse_quant_type(op, quant_type);
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize), nbytes = (n + 1) / 2;
  const int64_t storage_elems = packed_storage_elems(op, nbytes, quant_storage);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  at::Tensor packed = at::empty({storage_elems, 1}, A.options().dtype(quant_storage));
  at::Tensor absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  if (n > 0)
    C10_CUDA_CHECK(cuda::quantize_4bit(
        float_type(a.scalar_type()), a.data_ptr(), n, blocksize, make_codebook16(code4_table(qt)),
        static_cast<uint8_t*>(packed.data_ptr()), absmax.data_ptr<float>(), current_stream()));
  return {packed, absmax};
}

void dequantize_4bit_out_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                              c10::string_view quant_type, at::IntArrayRef shape,
                              at::ScalarType dtype, at::Tensor& out) {
  const char* op = "dequantize_4bit";
  const QuantType4 qt = parse_quant_type(op, quant_type);
  const int64_t n = check_4bit_weight(op, A, absmax, blocksize, shape);
  check_float(op, "dtype", dtype);
  check_device(op, "out", out, A, "A");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "lowbit.", op, ": out must be ", dtype_name(dtype),
                   ", got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.sizes() == shape, "lowbit.", op, ": out must have shape ", shape, ", got ",
                    out.sizes());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous(), m = absmax.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(shape, out.options());
  C10_CUDA_CHECK(cuda::dequantize_4bit(static_cast<const uint8_t*>(a.data_ptr()),
                                       m.data_ptr<float>(), code16_of(qt), n, blocksize,
                                       float_type(dtype), dst.data_ptr(), current_stream()));
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape,
                                at::ScalarType dtype) {
  check_float("dequantize_4bit", "dtype", dtype);
  check_shape("dequantize_4bit", shape);
  at::Tensor out = at::empty(shape, A.options().dtype(dtype));
  dequantize_4bit_out_cuda(A, absmax, blocksize, quant_type, shape, dtype, out);
  return out;
}

at::Tensor gemv_4bit_cuda(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  const char* op = "gemv_4bit";
  check_float(op, "A", A.scalar_type());
  check_device(op, "B", B, A, "A");
  TORCH_CHECK_VALUE(shapeB.size() == 2, "lowbit.", op, ": shapeB must be [N, K], got ", shapeB);
  check_4bit_weight(op, B, absmax, blocksize, shapeB);
  check_dtype(op, "code", code, at::kFloat);
  check_device(op, "code", code, A, "A");
  TORCH_CHECK_VALUE(code.numel() == 16, "lowbit.", op, ": code must hold 16 values, got ",
                    code.numel());
  const int64_t N = shapeB[0], K = shapeB[1];
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == K, "lowbit.", op,
                    ": A's last dimension must equal the weight's K = ", K, ", got shape ",
                    A.sizes());
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end());
  out_shape.back() = N;
  const int64_t M = leading_rows(A);
  const c10::cuda::CUDAGuard guard(A.device());
  // The kernel reads A in its own dtype, accumulates in fp32 and rounds once to A's dtype, which
  // is what the CPU path's fp32 product followed by .to(A.dtype) computes.
  const at::Tensor a = A.reshape({M, K}).contiguous();
  const at::Tensor b = B.contiguous(), m = absmax.contiguous(), c = code.contiguous();
  at::Tensor out = at::empty({M, N}, A.options());
  if (M > 0 && N > 0)
    C10_CUDA_CHECK(cuda::gemv_4bit(
        float_type(a.scalar_type()), a.data_ptr(), M, K, static_cast<const uint8_t*>(b.data_ptr()),
        m.data_ptr<float>(), c.data_ptr<float>(), blocksize, out.data_ptr(), N, current_stream()));
  return out.reshape(out_shape);
}

// ---- LLM.int8() ---------------------------------------------------------------------------------

// A uint8 mask of the K columns of a contiguous [rows, K] float tensor holding an outlier.
at::Tensor outlier_mask(const at::Tensor& a2, float threshold) {
  const int64_t rows = a2.size(0), K = a2.size(1);
  at::Tensor mask = at::empty({K}, a2.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::int8_outlier_columns(float_type(a2.scalar_type()), a2.data_ptr(), rows, K,
                                            threshold, mask.data_ptr<uint8_t>(), current_stream()));
  return mask;
}

// Quantizes a contiguous [rows, K] float tensor into q [rows, K] and stats [rows]; col_mask may
// be undefined.
void quantize_rows(const at::Tensor& a2, float threshold, const at::Tensor& col_mask, at::Tensor& q,
                   at::Tensor& stats) {
  const int64_t rows = a2.size(0), K = a2.size(1);
  const uint8_t* mp = col_mask.defined() ? col_mask.data_ptr<uint8_t>() : nullptr;
  C10_CUDA_CHECK(cuda::int8_vectorwise_quant(float_type(a2.scalar_type()), a2.data_ptr(), rows, K,
                                             threshold, mp, q.data_ptr<int8_t>(),
                                             stats.data_ptr<float>(), current_stream()));
}

// c2 [M, N] = a2 [M, K] @ b [N, K]^T in int32; all contiguous.
void gemm_into(const at::Tensor& a2, const at::Tensor& b, at::Tensor& c2) {
  C10_CUDA_CHECK(cuda::int8_gemm(a2.data_ptr<int8_t>(), b.data_ptr<int8_t>(),
                                 c2.data_ptr<int32_t>(), a2.size(0), b.size(0), b.size(1),
                                 current_stream()));
}

at::Tensor mm_dequant_2d(const at::Tensor& c2, const at::Tensor& row_stats,
                         const at::Tensor& col_stats, const at::Tensor& bias,
                         at::ScalarType out_dtype) {
  const int64_t rows = c2.size(0), N = c2.size(1);
  at::Tensor out = at::empty({rows, N}, c2.options().dtype(out_dtype));
  const at::Tensor rs = row_stats.contiguous(), cs = col_stats.contiguous();
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias;
  C10_CUDA_CHECK(cuda::int8_mm_dequant(c2.data_ptr<int32_t>(), rs.data_ptr<float>(),
                                       cs.data_ptr<float>(),
                                       bc.defined() ? float_type(bc.scalar_type()) : FloatType::f32,
                                       bc.defined() ? bc.data_ptr() : nullptr, rows, N,
                                       float_type(out_dtype), out.data_ptr(), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> int8_vectorwise_quant_cuda(
    const at::Tensor& A, double threshold) {
  const char* op = "int8_vectorwise_quant";
  check_float(op, "A", A.scalar_type());
  check_threshold(op, threshold);
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a2 = A.contiguous().reshape({rows, K});
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, A.options().dtype(at::kFloat));
  std::optional<at::Tensor> outlier_cols;
  at::Tensor mask;
  if (threshold > 0.0) {
    mask = outlier_mask(a2, float(threshold));
    outlier_cols = at::nonzero(mask).reshape({-1});  // synchronises, as every nonzero does
  }
  at::Tensor q2 = q.view({rows, K});
  quantize_rows(a2, float(threshold), mask, q2, stats);
  return {q, stats, outlier_cols};
}

at::Tensor int8_vectorwise_dequant_cuda(const at::Tensor& A, const at::Tensor& stats) {
  const char* op = "int8_vectorwise_dequant";
  check_dtype(op, "A", A, at::kChar);
  check_dtype(op, "stats", stats, at::kFloat);
  check_device(op, "stats", stats, A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "lowbit.", op, ": A must have at least 1 dimension");
  const int64_t K = A.size(-1), rows = leading_rows(A);
  TORCH_CHECK_VALUE(stats.numel() == rows, "lowbit.", op, ": stats must hold one value per row (",
                    rows, "), got ", stats.numel());
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous(), s = stats.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kFloat));
  if (rows > 0 && K > 0)
    C10_CUDA_CHECK(cuda::int8_vectorwise_dequant(a.data_ptr<int8_t>(), s.data_ptr<float>(), rows, K,
                                                 out.data_ptr<float>(), current_stream()));
  return out;
}

void int8_linear_matmul_out_cuda(const at::Tensor& A, const at::Tensor& B, at::Tensor& out) {
  const char* op = "int8_linear_matmul";
  const auto [M, N, K] = check_int8_matmul(op, A, B);
  check_device(op, "out", out, A, "A");
  check_dtype(op, "out", out, at::kInt);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), "lowbit.", op, ": out must have shape ",
                    at::IntArrayRef(shape), ", got ", out.sizes());
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a2 = A.contiguous().reshape({M, K}), b = B.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(shape, out.options());
  at::Tensor c2 = dst.view({M, N});
  if (K == 0)
    c2.zero_();
  else
    gemm_into(a2, b, c2);
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor int8_linear_matmul_cuda(const at::Tensor& A, const at::Tensor& B) {
  const auto [M, N, K] = check_int8_matmul("int8_linear_matmul", A, B);
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, A.options().dtype(at::kInt));
  int8_linear_matmul_out_cuda(A, B, out);
  return out;
}

at::Tensor int8_mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats,
                                const at::Tensor& col_stats, std::optional<at::ScalarType> dtype,
                                const std::optional<at::Tensor>& bias) {
  const char* op = "int8_mm_dequant";
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  const auto [rows, N] = check_mm_dequant(op, A, row_stats, col_stats, out_dtype, bias);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = mm_dequant_2d(A.contiguous().reshape({rows, N}), row_stats, col_stats,
                                 bias.has_value() ? *bias : at::Tensor(), out_dtype);
  return out.reshape(A.sizes());
}

// The whole LLM.int8() forward, composed as on the CPU: outlier columns, row quantization with
// those columns zeroed, int8 GEMM, dequantization (+ bias), and the outlier columns' product in
// fp32 added before the one rounding to A's dtype.
at::Tensor int8_linear_cuda(const at::Tensor& A, const at::Tensor& W, const at::Tensor& W_scale,
                            const std::optional<at::Tensor>& bias, double threshold) {
  const char* op = "int8_linear";
  const auto [M, N, K] = check_int8_linear(op, A, W, W_scale, bias, threshold);
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end());
  out_shape.back() = N;
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());
  const c10::cuda::CUDAGuard guard(A.device());
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

}  // namespace

}  // namespace lowbit::ops

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  using namespace lowbit::ops;
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cuda);
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cuda);
  m.impl("gemv_4bit", &gemv_4bit_cuda);
  m.impl("int8_vectorwise_quant", &int8_vectorwise_quant_cuda);
  m.impl("int8_vectorwise_dequant", &int8_vectorwise_dequant_cuda);
  m.impl("int8_linear_matmul", &int8_linear_matmul_cuda);
  m.impl("int8_linear_matmul.out", &int8_linear_matmul_out_cuda);
  m.impl("int8_mm_dequant", &int8_mm_dequant_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
}
