// The one list of lowbit op schemas, and their registration for the CPU (and CUDA) dispatch keys.
//
// Schemas follow bitsandbytes' op set (names, argument order, defaults) so each pipeline step can
// be checked and timed alone; int8_linear fuses the whole LLM.int8() forward into one op.
// Fake (meta) kernels and autograd formulas are registered in python/lowbit/_ops.py.
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(lowbit, m) {
  // 8-bit blockwise over a sorted 256-entry code.
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType "
      "dtype) -> Tensor");
  m.def(
      "dequantize_blockwise.out(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType "
      "dtype, Tensor(a!) out) -> ()");
  // 4-bit NF4 / FP4, packed two per byte in quant_storage.
  m.def(
      "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> "
      "(Tensor, Tensor)");
  m.def(
      "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] "
      "shape, ScalarType dtype, Tensor(a!) out) -> ()");
  // A [..., K] @ dequant(B)[N, K]^T with any 16-entry codebook; fp32 accumulation. With
  // nested_absmax (double quantization), absmax holds one uint8 code per block and the kernels
  // decode the block scale nested_code[absmax[b]] * nested_absmax[b / nested_blocksize] +
  // nested_offset themselves (bitsandbytes' positional arguments stay valid).
  m.def(
      "gemv_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int "
      "blocksize, Tensor? nested_absmax=None, Tensor? nested_code=None, float nested_offset=0.0, "
      "int nested_blocksize=256) -> Tensor");
  // LLM.int8()
  m.def("int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)");
  m.def("int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor");
  m.def("int8_linear_matmul(Tensor A, Tensor B) -> Tensor");
  m.def("int8_linear_matmul.out(Tensor A, Tensor B, Tensor(a!) out) -> ()");
  m.def(
      "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, "
      "Tensor? bias=None) -> Tensor");
  m.def(
      "int8_linear(Tensor A, Tensor W, Tensor W_scale, Tensor? bias=None, float threshold=0.0) "
      "-> Tensor");
  // Affine 4/8-bit weights (GPTQ / AWQ / HQQ / compressed-tensors, issue #13): unsigned codes q,
  // fp32 scale and zero per group of group_size elements along K, w = (float(q) - zero) * scale.
  // 4-bit codes are packed as NF4 (flat uint8 [(N*K+1)/2]), 8-bit ones one per byte.
  m.def(
      "quantize_affine(Tensor A, int bits, int group_size, bool symmetric) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "dequantize_affine(Tensor packed, Tensor scales, Tensor zeros, int bits, int group_size, "
      "SymInt[] shape, ScalarType dtype) -> Tensor");
  m.def(
      "gemm_affine(Tensor A, Tensor packed, SymInt[] shapeB, Tensor scales, Tensor zeros, int "
      "bits, int group_size, Tensor? bias=None) -> Tensor");
  // Optimizers (lowbit.optim): one call updates a list of parameters in place, with their
  // blockwise 8-bit states (blocksize 256; state2/absmax2 empty for one-state optimizers) or fp32
  // states. Returns a bool per parameter: false where the gradient held NaN/Inf (nothing updated).
  m.def(
      "optimizer_update_8bit_blockwise(str optimizer_name, Tensor[] g, Tensor(a!)[] p, "
      "Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, "
      "Tensor qmap1, Tensor? qmap2, float beta1, float beta2, float eps, int step, float lr, "
      "float weight_decay=0.0, float gnorm_scale=1.0, bool skip_zeros=False, int sr_seed=-1) -> "
      "Tensor");
  m.def(
      "optimizer_update_32bit(str optimizer_name, Tensor[] g, Tensor(a!)[] p, Tensor(b!)[] "
      "state1, Tensor(c!)[] state2, float beta1, float beta2, float eps, int step, float lr, "
      "float weight_decay=0.0, float gnorm_scale=1.0, bool skip_zeros=False, int sr_seed=-1) -> "
      "Tensor");
}

namespace {

// One implementation per op for both dispatch keys: each op picks its device's kernels itself
// (csrc/ops/backend.h).
void impl_all_ops(torch::Library& m) {
  using namespace lowbit::ops;
  m.impl("quantize_blockwise", &quantize_blockwise);
  m.impl("dequantize_blockwise", &dequantize_blockwise);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out);
  m.impl("quantize_4bit", &quantize_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out);
  m.impl("gemv_4bit", &gemv_4bit);
  m.impl("int8_vectorwise_quant", &int8_vectorwise_quant);
  m.impl("int8_vectorwise_dequant", &int8_vectorwise_dequant);
  m.impl("int8_linear_matmul", &int8_linear_matmul);
  m.impl("int8_linear_matmul.out", &int8_linear_matmul_out);
  m.impl("int8_mm_dequant", &int8_mm_dequant);
  m.impl("int8_linear", &int8_linear);
  m.impl("quantize_affine", &quantize_affine);
  m.impl("dequantize_affine", &dequantize_affine);
  m.impl("gemm_affine", &gemm_affine);
  m.impl("optimizer_update_8bit_blockwise", &optimizer_update_8bit_blockwise);
  m.impl("optimizer_update_32bit", &optimizer_update_32bit);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { impl_all_ops(m); }

#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { impl_all_ops(m); }
#endif
