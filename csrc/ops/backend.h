// The device-specific half of the ops: one Backend per device type, each a thin layer over the
// torch-free kernels of that device.
//
// The op implementations in csrc/ops/<family>.cpp are device-generic: they check the arguments,
// make the inputs contiguous, allocate the outputs on the input's device, hold the device guard
// and compose multi-kernel ops (int8_linear). Then they call a Backend function with tensors that
// are already checked, contiguous and allocated. A backend only picks the kernel and runs it: the
// CPU one spreads the work over torch's thread pool (cpu_backend.cpp), the CUDA one launches on
// the current stream and raises on a launch error (cuda_backend.cpp, built only with
// LOWBIT_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <optional>

#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"

namespace lowbit::ops {

// The double quantization of a 4-bit weight's absmax (QLoRA): absmax then holds one uint8 code
// per block, and block b's scale is code[absmax[b]] * absmax2[b / blocksize] + offset in fp32
// (lowbit/blockscale.h). Undefined tensors: the absmax is plain fp32.
struct NestedAbsmax {
  at::Tensor absmax;  // fp32 [ceil(blocks / blocksize)], contiguous
  at::Tensor code;    // fp32 [256], contiguous
  float offset = 0.0f;
  int64_t blocksize = 256;  // a power of two in [64, 4096]
  bool defined() const { return absmax.defined(); }
};

// The kernels' view of a 4-bit weight's block scales: the fp32 absmax, or (nested defined) the
// uint8 codes with their double-quantization tables. Pointers into the tensors, which must outlive
// it.
inline BlockAbsmax block_scales(const at::Tensor& absmax, const NestedAbsmax& nested) {
  BlockAbsmax s;
  if (!nested.defined()) {
    s.absmax = absmax.data_ptr<float>();
    return s;
  }
  s.code_index = absmax.data_ptr<uint8_t>();
  s.nested_absmax = nested.absmax.data_ptr<float>();
  s.nested_code = nested.code.data_ptr<float>();
  s.nested_offset = nested.offset;
  s.nested_log2 = 0;  // nested.blocksize is a power of two (checked by the op)
  while ((int64_t(1) << s.nested_log2) < nested.blocksize) ++s.nested_log2;
  return s;
}

class Backend {
 public:
  virtual ~Backend() = default;

  // ---- 8-bit blockwise ----
  // a: contiguous float [n]; code: contiguous fp32 [256], not yet checked for order (the backend
  // checks it where the values are; the error names op); q: uint8 like a; absmax: fp32 [blocks].
  virtual void quantize_blockwise(const char* op, const at::Tensor& a, const at::Tensor& code,
                                  int64_t blocksize, at::Tensor& q, at::Tensor& absmax) const = 0;
  // q: contiguous uint8 [n], n > 0; code: contiguous fp32 [256]; out: contiguous, n elements, of
  // the output dtype.
  virtual void dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize,
                                    at::Tensor& out) const = 0;

  // ---- 4-bit ----
  // packed: contiguous, (n + 1) / 2 bytes of any storage dtype; absmax: fp32 [blocks].
  virtual void quantize_4bit(const at::Tensor& a, int64_t blocksize, QuantType4 qt,
                             at::Tensor& packed, at::Tensor& absmax) const = 0;
  // n = out.numel() > 0.
  virtual void dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, QuantType4 qt, at::Tensor& out) const = 0;
  // a2: contiguous float [M, K]; packed: the [N, K] weight; absmax: contiguous fp32 [blocks], or
  // uint8 [blocks] when nested is defined; code: contiguous fp32 [16]; out: contiguous [M, N] of
  // a2's dtype (fp32 accumulation, one rounding to that dtype).
  virtual void gemv_4bit(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& absmax,
                         const at::Tensor& code, int64_t blocksize, const NestedAbsmax& nested,
                         at::Tensor& out) const = 0;

  // ---- LLM.int8() ----
  // a2: contiguous float [rows, K]; mask: uint8 [K], every entry written.
  virtual void int8_outlier_columns(const at::Tensor& a2, float threshold,
                                    at::Tensor& mask) const = 0;
  // q: int8 [rows, K], stats: fp32 [rows]; col_mask: uint8 [K] or undefined.
  virtual void int8_vectorwise_quant(const at::Tensor& a2, float threshold,
                                     const at::Tensor& col_mask, at::Tensor& q,
                                     at::Tensor& stats) const = 0;
  // q2: contiguous int8 [rows, K]; stats: fp32 [rows]; out: fp32 [rows, K].
  virtual void int8_vectorwise_dequant(const at::Tensor& q2, const at::Tensor& stats,
                                       at::Tensor& out) const = 0;
  // c2 [M, N] = a2 [M, K] @ b [N, K]^T in int32; all contiguous, K > 0.
  virtual void int8_gemm(const at::Tensor& a2, const at::Tensor& b, at::Tensor& c2) const = 0;
  // out [rows, N] = c2 * row_stats * col_stats / 127^2 (+ bias); bias may be undefined.
  virtual void int8_mm_dequant(const at::Tensor& c2, const at::Tensor& row_stats,
                               const at::Tensor& col_stats, const at::Tensor& bias,
                               at::Tensor& out) const = 0;
  // The whole LLM.int8() forward in one backend call: the int8_linear op's result [M, N] (a2's
  // dtype) for a2 [M, K] (contiguous, K > 0), w [N, K] (contiguous), w_scale fp32 [N]
  // (contiguous), bias [N] (contiguous) or undefined. An undefined result: the backend has no fused
  // path and the op composes it from the functions above (CUDA and the CPU both have one; the
  // CPU's adds the outlier product per row block, cpu_backend.cpp).
  virtual at::Tensor int8_linear(const at::Tensor& /*a2*/, const at::Tensor& /*w*/,
                                 const at::Tensor& /*w_scale*/, const at::Tensor& /*bias*/,
                                 float /*threshold*/) const {
    return at::Tensor();
  }

  // ---- affine 4/8-bit (GPTQ / AWQ / HQQ / compressed-tensors) ----
  // a: contiguous float [N, K] (N * K > 0, K % group_size == 0); packed: uint8 [(N*K+1)/2]
  // (bits 4, zero-filled) or [N*K] (bits 8); scales, zeros: fp32 [N * K / group_size].
  virtual void quantize_affine(const at::Tensor& a, int64_t bits, int64_t group_size,
                               bool symmetric, at::Tensor& packed, at::Tensor& scales,
                               at::Tensor& zeros) const = 0;
  // packed/scales/zeros contiguous as above; out: contiguous [N, K], N * K > 0.
  virtual void dequantize_affine(const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                 at::Tensor& out) const = 0;
  // a2: contiguous float [M, K]; out: contiguous [M, N] of a2's dtype = a2 @ W^T (+ bias, any
  // float dtype, [N], contiguous, or undefined), fp32 accumulation and one rounding.
  virtual void gemm_affine(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size,
                           const at::Tensor& bias, at::Tensor& out) const = 0;
};

const Backend& cpu_backend();
#ifdef LOWBIT_WITH_CUDA
const Backend& cuda_backend();
#endif

// The backend for t's device. The ops are registered for the CPU and (with LOWBIT_WITH_CUDA) the
// CUDA dispatch keys only, so the error is a guard against a registration mistake.
inline const Backend& backend_for(const char* op, const at::Tensor& t) {
#ifdef LOWBIT_WITH_CUDA
  if (t.is_cuda()) return cuda_backend();
#endif
  TORCH_CHECK(t.is_cpu(), "lowbit.", op, ": no kernels for device ", t.device(),
              " in this build of lowbit");
  return cpu_backend();
}

// The device an op's guard makes current: t's device for a CUDA tensor, none for a CPU one (so
// the CPU path pays nothing). Use: const c10::OptionalDeviceGuard guard(guard_device(A));
inline std::optional<at::Device> guard_device(const at::Tensor& t) {
  if (t.is_cuda()) return t.device();
  return std::nullopt;
}

}  // namespace lowbit::ops
