// 8-bit blockwise quantization: the ops for every device (kernels behind ops/backend.h).
#include "ops/backend.h"
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

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code,
                                                      int64_t blocksize) {
  const char* op = "quantize_blockwise";
  check_float(op, "A", A.scalar_type());
  check_code(op, code, A);
  check_blocksize(op, blocksize, kMinBlock, kMaxBlock);
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a = A.contiguous();
  const at::Tensor c = code.contiguous();
  const int64_t n = a.numel(), blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  // The backend checks that the code is sorted (even for an empty A).
  backend_for(op, A).quantize_blockwise(op, a, c, blocksize, q, absmax);
  return {q, absmax};
}

void dequantize_blockwise_out(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, at::ScalarType dtype, at::Tensor& out) {
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
  if (n == 0) return;
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a = A.contiguous(), m = absmax.contiguous(), c = code.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(A.sizes(), out.options());
  backend_for(op, A).dequantize_blockwise(a, m, c, blocksize, dst);
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  check_float("dequantize_blockwise", "dtype", dtype);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out);
  return out;
}

}  // namespace lowbit::ops
