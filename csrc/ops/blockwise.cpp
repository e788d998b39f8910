// ATen wrappers for 8-bit blockwise quantization (CPU).
#include <cmath>

#include "lowbit/cpu_kernels.h"
#include "ops/common.h"
#include "ops/ops.h"

namespace lowbit::ops {

namespace {

constexpr int64_t kMinBlock = 64, kMaxBlock = 4096;

void check_code(const char* op, const at::Tensor& code, const at::Tensor& A) {
  check_dtype(op, "code", code, at::kFloat);
  check_device(op, "code", code, A, "A");
  TORCH_CHECK_VALUE(code.numel() == 256, "lowbit.", op,
                    ": code must hold 256 values (an 8-bit code), got ", code.numel());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A,
                                                          const at::Tensor& code,
                                                          int64_t blocksize) {
  const char* op = "quantize_blockwise";
  check_float(op, "A", A.scalar_type());
  check_code(op, code, A);
  check_blocksize(op, blocksize, kMinBlock, kMaxBlock);
  const at::Tensor a = A.contiguous();
  const at::Tensor c = code.contiguous();
  const float* cv = c.data_ptr<float>();
  // Midpoints of the sorted code: the quantization rule of codebook.h.
  float bound[255];
  for (int i = 0; i < 255; ++i) {
    TORCH_CHECK_VALUE(cv[i] <= cv[i + 1], "lowbit.", op, ": code must be sorted ascending (entry ",
                      i + 1, " is below entry ", i, ")");
    bound[i] = (cv[i] + cv[i + 1]) / 2.0f;
  }
  uint8_t zero_code = 0;
  for (int i = 1; i < 256; ++i)
    if (std::fabs(cv[i]) < std::fabs(cv[zero_code])) zero_code = uint8_t(i);

  const int64_t n = a.numel(), blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  const FloatType t = float_type(a.scalar_type());
  const void* ap = a.data_ptr();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* mp = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
    cpu::quantize_blockwise(t, ap, n, blocksize, bound, zero_code, qp, mp, b0, b1);
  });
  return {q, absmax};
}

void dequantize_blockwise_out_cpu(const at::Tensor& A, const at::Tensor& absmax,
                                  const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                  at::Tensor& out) {
  const char* op = "dequantize_blockwise";
  check_dtype(op, "A", A, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_device(op, "absmax", absmax, A, "A");
  check_code(op, code, A);
  check_float(op, "dtype", dtype);
  check_blocksize(op, blocksize, kMinBlock, kMaxBlock);
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "lowbit.", op, ": absmax must hold ceil(", n, " / ",
                    blocksize, ") = ", blocks, " values, got ", absmax.numel());
  check_device(op, "out", out, A, "A");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "lowbit.", op, ": out must be ", dtype_name(dtype),
                   ", got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.sizes() == A.sizes(), "lowbit.", op, ": out must have shape ", A.sizes(),
                    ", got ", out.sizes());
  const at::Tensor a = A.contiguous(), m = absmax.contiguous(), c = code.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(A.sizes(), out.options());
  const uint8_t* qp = a.data_ptr<uint8_t>();
  const float* mp = m.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  void* op_ = dst.data_ptr();
  const FloatType t = float_type(dtype);
  at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
    cpu::dequantize_blockwise(qp, mp, cp, n, blocksize, t, op_, b0, b1);
  });
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize,
                                    at::ScalarType dtype) {
  check_float("dequantize_blockwise", "dtype", dtype);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  dequantize_blockwise_out_cpu(A, absmax, code, blocksize, dtype, out);
  return out;
}

}  // namespace lowbit::ops
