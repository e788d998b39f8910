// The ATen-facing entry points, one block per op family; registration.cpp binds each to its schema
// for both the CPU and the CUDA dispatch keys. Each is implemented once, for every device, in
// csrc/ops/<family>.cpp; the device-specific kernel calls sit behind ops/backend.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lowbit::ops {

// 8-bit blockwise (blockwise.cpp)
std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code,
                                                      int64_t blocksize);
at::Tensor dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype);
void dequantize_blockwise_out(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, at::ScalarType dtype, at::Tensor& out);

// 4-bit (fourbit.cpp)
std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                 c10::string_view quant_type,
                                                 at::ScalarType quant_storage);
at::Tensor dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                           c10::string_view quant_type, at::IntArrayRef shape,
                           at::ScalarType dtype);
void dequantize_4bit_out(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                         c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                         at::Tensor& out);
at::Tensor gemv_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                     const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, double nested_offset,
                     int64_t nested_blocksize);

// LLM.int8() (int8.cpp)
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> int8_vectorwise_quant(
    const at::Tensor& A, double threshold);
at::Tensor int8_vectorwise_dequant(const at::Tensor& A, const at::Tensor& stats);
at::Tensor int8_linear_matmul(const at::Tensor& A, const at::Tensor& B);
void int8_linear_matmul_out(const at::Tensor& A, const at::Tensor& B, at::Tensor& out);
at::Tensor int8_mm_dequant(const at::Tensor& A, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, std::optional<at::ScalarType> dtype,
                           const std::optional<at::Tensor>& bias);
at::Tensor int8_linear(const at::Tensor& A, const at::Tensor& W, const at::Tensor& W_scale,
                       const std::optional<at::Tensor>& bias, double threshold);

// Affine 4/8-bit weights (affine.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_affine(const at::Tensor& A, int64_t bits,
                                                               int64_t group_size, bool symmetric);
at::Tensor dequantize_affine(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             at::IntArrayRef shape, at::ScalarType dtype);
at::Tensor gemm_affine(const at::Tensor& A, const at::Tensor& packed, at::IntArrayRef shapeB,
                       const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                       int64_t group_size, const std::optional<at::Tensor>& bias);

// Optimizers (optim.cpp): fused in-place updates of lists of parameters and their states; each
// returns a bool per parameter, false where the gradient held NaN/Inf and nothing was updated.
at::Tensor optimizer_update_8bit_blockwise(
    c10::string_view optimizer_name, at::TensorList g, at::TensorList p, at::TensorList state1,
    at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, double beta1, double beta2, double eps, int64_t step,
    double lr, double weight_decay, double gnorm_scale, bool skip_zeros, int64_t sr_seed);
at::Tensor optimizer_update_32bit(c10::string_view optimizer_name, at::TensorList g,
                                  at::TensorList p, at::TensorList state1, at::TensorList state2,
                                  double beta1, double beta2, double eps, int64_t step, double lr,
                                  double weight_decay, double gnorm_scale, bool skip_zeros,
                                  int64_t sr_seed);

}  // namespace lowbit::ops
