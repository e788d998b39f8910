// 4-bit quantization (NF4 / FP4) and the fused dequantize + product: the ops for every device
// (kernels behind ops/backend.h).
#include <vector>

#include "lowbit/codebook.h"
#include "ops/backend.h"
#include "ops/common.h"
#include "ops/fourbit_args.h"
#include "ops/ops.h"

namespace lowbit::ops {

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                 c10::string_view quant_type,
                                                 at::ScalarType quant_storage) {
  const char* op = "quantize_4bit";
  check_float(op, "A", A.scalar_type());
  check_blocksize(op, blocksize, kMin4bitBlock, kMax4bitBlock);
  const QuantType4 qt = parse_quant_type(op, quant_type);
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize), nbytes = (n + 1) / 2;
  const int64_t storage_elems = packed_storage_elems(op, nbytes, quant_storage);
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a = A.contiguous();
  at::Tensor packed = at::empty({storage_elems, 1}, A.options().dtype(quant_storage));
  at::Tensor absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  backend_for(op, A).quantize_4bit(a, blocksize, qt, packed, absmax);
  return {packed, absmax};
}

void dequantize_4bit_out(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                         c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                         at::Tensor& out) {
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
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a = A.contiguous(), m = absmax.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(shape, out.options());
  backend_for(op, A).dequantize_4bit(a, m, blocksize, qt, dst);
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                           c10::string_view quant_type, at::IntArrayRef shape,
                           at::ScalarType dtype) {
  check_float("dequantize_4bit", "dtype", dtype);
  check_shape("dequantize_4bit", shape);
  at::Tensor out = at::empty(shape, A.options().dtype(dtype));
  dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out);
  return out;
}

at::Tensor gemv_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                     const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, double nested_offset,
                     int64_t nested_blocksize) {
  const char* op = "gemv_4bit";
  check_float(op, "A", A.scalar_type());
  check_device(op, "B", B, A, "A");
  TORCH_CHECK_VALUE(shapeB.size() == 2, "lowbit.", op, ": shapeB must be [N, K], got ", shapeB);
  TORCH_CHECK_TYPE(nested_absmax.has_value() || absmax.scalar_type() != at::kByte, "lowbit.", op,
                   ": absmax is torch.uint8, i.e. double quantized: pass nested_absmax, "
                   "nested_code and nested_offset too, or a torch.float32 absmax");
  check_4bit_weight(op, B, absmax, blocksize, shapeB, nested_absmax.has_value());
  const NestedAbsmax nested = check_nested_absmax(op, B, absmax.numel(), nested_absmax, nested_code,
                                                  nested_offset, nested_blocksize);
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
  const c10::OptionalDeviceGuard guard(guard_device(A));
  const at::Tensor a2 = A.reshape({M, K}).contiguous();
  const at::Tensor b = B.contiguous(), m = absmax.contiguous(), c = code.contiguous();
  // fp32 accumulation, rounded once to A's dtype.
  at::Tensor out = at::empty({M, N}, A.options());
  backend_for(op, A).gemv_4bit(a2, b, m, c, blocksize, nested, out);
  return out.reshape(out_shape);
}

}  // namespace lowbit::ops
