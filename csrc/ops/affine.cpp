// Affine 4/8-bit weights (GPTQ / AWQ / HQQ / compressed-tensors checkpoints, issue #13): the ops
// for every device (kernels behind ops/backend.h).
//
// Format: a weight W [N, K] holds unsigned codes q of `bits` bits (4 or 8) and, per group of
// group_size consecutive elements along K (group of element (n, k) = (n * K + k) / group_size;
// group_size divides K), an fp32 scale and an fp32 zero: w = (float(q) - zero) * scale in fp32.
// 4-bit codes are packed two per byte over the flat index, element 2j in the high nibble of byte j
// (the NF4 packing), uint8 [(N * K + 1) / 2]; 8-bit codes are uint8 [N * K].
#include <vector>

#include "ops/backend.h"
#include "ops/common.h"
#include "ops/fourbit_args.h"
#include "ops/ops.h"

namespace lowbit::ops {

namespace {

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "lowbit.", op, ": bits must be 4 or 8, got ", bits);
}

void check_group_size(const char* op, int64_t group_size, int64_t K) {
  TORCH_CHECK_VALUE(group_size >= 1 && (K == 0 || K % group_size == 0), "lowbit.", op,
                    ": group_size must be a positive divisor of K = ", K,
                    " (K for one group per output channel), got ", group_size);
}

int64_t affine_packed_bytes(int64_t n, int64_t bits) { return bits == 4 ? (n + 1) / 2 : n; }

// The packed codes, scales and zeros of an affine weight of logical shape [N, K]; returns {N, K}.
std::pair<int64_t, int64_t> check_affine_weight(const char* op, const at::Tensor& packed,
                                                const at::Tensor& scales, const at::Tensor& zeros,
                                                int64_t bits, int64_t group_size,
                                                at::IntArrayRef shape, const char* shape_arg) {
  check_bits(op, bits);
  TORCH_CHECK_VALUE(shape.size() == 2, "lowbit.", op, ": ", shape_arg, " must be [N, K], got ",
                    shape);
  const int64_t n = check_shape(op, shape);
  const int64_t N = shape[0], K = shape[1];
  check_group_size(op, group_size, K);
  check_dtype(op, "packed", packed, at::kByte);
  const int64_t want = affine_packed_bytes(n, bits);
  TORCH_CHECK_VALUE(packed.numel() == want, "lowbit.", op, ": packed must hold ", want,
                    " bytes for ", bits, "-bit codes of shape ", shape, ", got ", packed.numel());
  const int64_t groups = K == 0 ? 0 : n / group_size;
  check_dtype(op, "scales", scales, at::kFloat);
  check_dtype(op, "zeros", zeros, at::kFloat);
  check_device(op, "scales", scales, packed, "packed");
  check_device(op, "zeros", zeros, packed, "packed");
  TORCH_CHECK_VALUE(scales.numel() == groups, "lowbit.", op, ": scales must hold N * K / ",
                    "group_size = ", groups, " values, got ", scales.numel());
  TORCH_CHECK_VALUE(zeros.numel() == groups, "lowbit.", op, ": zeros must hold N * K / ",
                    "group_size = ", groups, " values, got ", zeros.numel());
  return {N, K};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_affine(const at::Tensor& A, int64_t bits,
                                                               int64_t group_size, bool symmetric) {
  const char* op = "quantize_affine";
  check_float(op, "A", A.scalar_type());
  check_bits(op, bits);
  TORCH_CHECK_VALUE(A.dim() == 2, "lowbit.", op, ": A must be a 2-D weight [N, K], got shape ",
                    A.sizes());
  const int64_t N = A.size(0), K = A.size(1), n = N * K;
  check_group_size(op, group_size, K);
  const int64_t groups = K == 0 ? 0 : n / group_size;
  const c10::OptionalDeviceGuard guard(guard_device(A));
  // Zero-filled: 4-bit codes are OR-ed in nibble by nibble (and an odd count pads with 0).
  at::Tensor packed = at::zeros({affine_packed_bytes(n, bits)}, A.options().dtype(at::kByte));
  at::Tensor scales = at::empty({groups}, A.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({groups}, A.options().dtype(at::kFloat));
  if (n > 0)
    backend_for(op, A).quantize_affine(A.contiguous(), bits, group_size, symmetric, packed, scales,
                                       zeros);
  return {packed, scales, zeros};
}

at::Tensor dequantize_affine(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "dequantize_affine";
  check_float(op, "dtype", dtype);
  check_affine_weight(op, packed, scales, zeros, bits, group_size, shape, "shape");
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const c10::OptionalDeviceGuard guard(guard_device(packed));
  backend_for(op, packed)
      .dequantize_affine(packed.contiguous(), scales.contiguous(), zeros.contiguous(), bits,
                         group_size, out);
  return out;
}

at::Tensor gemm_affine(const at::Tensor& A, const at::Tensor& packed, at::IntArrayRef shapeB,
                       const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                       int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "gemm_affine";
  check_float(op, "A", A.scalar_type());
  check_device(op, "packed", packed, A, "A");
  const auto [N, K] =
      check_affine_weight(op, packed, scales, zeros, bits, group_size, shapeB, "shapeB");
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == K, "lowbit.", op,
                    ": A's last dimension must equal the weight's K = ", K, ", got shape ",
                    A.sizes());
  at::Tensor b;
  if (bias.has_value()) {
    b = *bias;
    check_float(op, "bias", b.scalar_type());
    check_device(op, "bias", b, A, "A");
    TORCH_CHECK_VALUE(b.numel() == N, "lowbit.", op, ": bias must hold N = ", N,
                      " values, got shape ", b.sizes());
    b = b.reshape({N}).contiguous();
  }
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end());
  out_shape.back() = N;
  const int64_t M = leading_rows(A);
  at::Tensor out = at::empty({M, N}, A.options());
  if (M > 0 && N > 0) {
    const c10::OptionalDeviceGuard guard(guard_device(A));
    const at::Tensor a2 = A.reshape({M, K}).contiguous();
    backend_for(op, A).gemm_affine(a2, packed.contiguous(), scales.contiguous(), zeros.contiguous(),
                                   bits, group_size, b, out);
  }
  return out.reshape(out_shape);
}

}  // namespace lowbit::ops
