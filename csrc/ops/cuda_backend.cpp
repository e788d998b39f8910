// The CUDA backend: each function launches its torch-free kernel on the current stream of the
// device the op's guard has made current, and raises at once on a launch error. Empty inputs
// launch nothing. Compiled only when the installed torch has CUDA (LOWBIT_WITH_CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"
#include "ops/backend.h"
#include "ops/common.h"

// torch's cuBLASLt handle and workspace (ATen/cuda/CUDAContextLight.h). Declared here rather than
// included: that header also pulls in cusparse.h and cusolverDn.h, which minimal CUDA toolkits and
// the compile check lack. Same names and signatures, so they bind to libtorch_cuda's definitions.
// Weak: a torch without one of them still loads lowbit (the address is then null), and the int8
// GEMM runs without a workspace, or without cuBLASLt when there is no handle.
struct cublasLtContext;
namespace at::cuda {
__attribute__((weak)) cublasLtContext* getCurrentCUDABlasLtHandle();
__attribute__((weak)) size_t getCUDABlasLtWorkspaceSize();
__attribute__((weak)) void* getCUDABlasLtWorkspace();
}  // namespace at::cuda

namespace lowbit::ops {

namespace {

// The stream of the device the op's guard has made current.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

cuda::Code16 code16_of(QuantType4 qt) {
  cuda::Code16 c;
  const float* v = code4_table(qt);
  for (int i = 0; i < 16; ++i) c.v[i] = v[i];
  return c;
}

// The CPU backend checks the order while it builds the midpoints on the host. Here the code lives
// on the device: one reduction and one device-to-host read of a bool; only when it fails is the
// code copied over to name the entry.
//
// That read synchronises, which a stream being captured into a CUDA graph does not allow (the
// capture would fail, and with it torch.compile(mode="reduce-overhead")). So the check is skipped
// while the current stream is capturing (cudaStreamIsCapturing is a host-side query that neither
// synchronises nor breaks a capture). Bad input is still caught there: the kernel checks the order
// itself and turns an unsorted code into NaN output (cuda_kernels.h), and since a captured graph
// replays on whatever the code tensor then holds, an in-kernel check is the only one that could
// see later contents anyway. The alternatives were worse: caching "checked" per data_ptr and
// version counter misses writes through .data or raw pointers and inference tensors (no version
// counter), and an exact kernel for unsorted codes would accept what the CPU backend rejects.
// Eager calls (quantize_blockwise runs at load time, not in the forward pass) keep the exact
// error.
void check_sorted256(const char* op, const at::Tensor& c) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const bool sorted = (c.slice(0, 1) >= c.slice(0, 0, 255)).all().item<bool>();
  if (sorted) return;
  const at::Tensor h = c.to(at::kCPU);
  const float* cv = h.data_ptr<float>();
  // The entry indices go to c10::str as strings (std::to_string), so the message never formats an
  // int through the stream's num_put facet. On the H200 machine (torch 2.11+cu130) this message
  // with int indices crashed inside libstdc++'s integer insertion, in code that the backtrace put
  // inside _C itself (../shared/gpu-runs/2026-11-30-h200.md), i.e. an _C that carries or binds to
  // its own copy of part of libstdc++ beside the process's; tools/gpu_run.sh records which std::
  // symbols _C defines and how it was linked, to confirm that there.
  for (int i = 0; i < 255; ++i) {
    if (cv[i] <= cv[i + 1]) continue;
    const std::string hi = std::to_string(i + 1), lo = std::to_string(i);
    TORCH_CHECK_VALUE(false, "lowbit.", op, ": code must be sorted ascending (entry ", hi,
                      " is below entry ", lo, ")");
  }
}

// The current device's multiprocessors and compute capability (10 * major + minor), for the
// product's tier table: from the runtime's cache, no device round trip.
struct DeviceFacts {
  int sms = 0, cc = 0;
};
DeviceFacts device_facts() {
  const int dev = c10::cuda::current_device();
  int sms = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return {sms, 10 * major + minor};
}

class CudaBackend final : public Backend {
 public:
  void quantize_blockwise(const char* op, const at::Tensor& a, const at::Tensor& code,
                          int64_t blocksize, at::Tensor& q, at::Tensor& absmax) const override {
    check_sorted256(op, code);
    const int64_t n = a.numel();
    if (n > 0)
      C10_CUDA_CHECK(cuda::quantize_blockwise(
          float_type(a.scalar_type()), a.data_ptr(), n, blocksize, code.data_ptr<float>(),
          q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), current_stream()));
  }

  void dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                            int64_t blocksize, at::Tensor& out) const override {
    C10_CUDA_CHECK(cuda::dequantize_blockwise(
        q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), q.numel(),
        blocksize, float_type(out.scalar_type()), out.data_ptr(), current_stream()));
  }

  void quantize_4bit(const at::Tensor& a, int64_t blocksize, QuantType4 qt, at::Tensor& packed,
                     at::Tensor& absmax) const override {
    const int64_t n = a.numel();
    if (n > 0)
      C10_CUDA_CHECK(cuda::quantize_4bit(
          float_type(a.scalar_type()), a.data_ptr(), n, blocksize, make_codebook16(code4_table(qt)),
          static_cast<uint8_t*>(packed.data_ptr()), absmax.data_ptr<float>(), current_stream()));
  }

  void dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       QuantType4 qt, at::Tensor& out) const override {
    C10_CUDA_CHECK(cuda::dequantize_4bit(
        static_cast<const uint8_t*>(packed.data_ptr()), absmax.data_ptr<float>(), code16_of(qt),
        out.numel(), blocksize, float_type(out.scalar_type()), out.data_ptr(), current_stream()));
  }

  // One call per product at any M: the tier (SIMT gemv, tensor cores, dequantize + cuBLAS, or the
  // generic kernel for odd K / misaligned data) is chosen by cuda::plan_gemm_4bit, the one
  // dispatch table (fourbit.cu). Every tier reads A in its own dtype, accumulates in fp32 and
  // rounds once to A's dtype; a double quantized absmax is decoded per block inside the kernels.
  // Nothing here synchronises, and the only allocations are the caching allocator's (the mma
  // tier's split-K partials, the dequantize tier's weight workspace): stream-ordered, released at
  // the end of the call and reused by the next, so the op is capturable in CUDA graphs and never
  // keeps a dequantized copy. LOWBIT_GEMM4_FORCE (tests, benchmarks) pins a tier.
  void gemv_4bit(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& absmax,
                 const at::Tensor& code, int64_t blocksize, const NestedAbsmax& nested,
                 at::Tensor& out) const override {
    const int64_t M = a2.size(0), K = a2.size(1), N = out.size(1);
    if (M <= 0 || N <= 0) return;
    const BlockAbsmax scales = block_scales(absmax, nested);
    const FloatType ft = float_type(a2.scalar_type());
    const bool a16 = reinterpret_cast<uintptr_t>(a2.data_ptr()) % 16 == 0;
    const bool p16 = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0;
    const DeviceFacts d = device_facts();
    const cuda::Gemm4Plan plan =
        cuda::plan_gemm_4bit(ft, M, N, K, a16, p16, d.cc, d.sms, std::getenv("LOWBIT_GEMM4_FORCE"));
    const auto* pk = static_cast<const uint8_t*>(packed.data_ptr());
    if (plan.tier == cuda::Gemm4Tier::dequant_gemm) {
      // Large M: the product is compute-bound, so dequantize W once into a workspace of A's dtype
      // at copy bandwidth and let cuBLAS run the GEMM.
      at::Tensor w = at::empty({N, K}, a2.options());
      C10_CUDA_CHECK(cuda::dequantize_4bit_weight(pk, scales, code.data_ptr<float>(), N * K,
                                                  blocksize, ft, w.data_ptr(), current_stream()));
      at::mm_out(out, a2, w.t());
      return;
    }
    at::Tensor ws;
    if (plan.workspace_floats > 0)
      ws = at::empty({plan.workspace_floats}, a2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::gemm_4bit(
        plan, ft, a2.data_ptr(), M, K, pk, scales, code.data_ptr<float>(), blocksize,
        out.data_ptr(), N, ws.defined() ? ws.data_ptr<float>() : nullptr, current_stream()));
  }

  void int8_outlier_columns(const at::Tensor& a2, float threshold,
                            at::Tensor& mask) const override {
    C10_CUDA_CHECK(cuda::int8_outlier_columns(float_type(a2.scalar_type()), a2.data_ptr(),
                                              a2.size(0), a2.size(1), threshold,
                                              mask.data_ptr<uint8_t>(), current_stream()));
  }

  void int8_vectorwise_quant(const at::Tensor& a2, float threshold, const at::Tensor& col_mask,
                             at::Tensor& q, at::Tensor& stats) const override {
    const uint8_t* mp = col_mask.defined() ? col_mask.data_ptr<uint8_t>() : nullptr;
    C10_CUDA_CHECK(cuda::int8_vectorwise_quant(
        float_type(a2.scalar_type()), a2.data_ptr(), a2.size(0), a2.size(1), threshold, mp,
        q.data_ptr<int8_t>(), stats.data_ptr<float>(), current_stream()));
  }

  void int8_vectorwise_dequant(const at::Tensor& q2, const at::Tensor& stats,
                               at::Tensor& out) const override {
    const int64_t rows = q2.size(0), K = q2.size(1);
    if (rows > 0 && K > 0)
      C10_CUDA_CHECK(cuda::int8_vectorwise_dequant(q2.data_ptr<int8_t>(), stats.data_ptr<float>(),
                                                   rows, K, out.data_ptr<float>(),
                                                   current_stream()));
  }

  void int8_gemm(const at::Tensor& a2, const at::Tensor& b, at::Tensor& c2) const override {
    int8_gemm_raw(a2.data_ptr<int8_t>(), b.data_ptr<int8_t>(), c2.data_ptr<int32_t>(), a2.size(0),
                  b.size(0), b.size(1));
  }

  // cuBLASLt on torch's handle and workspace (one kernel); the dp4a kernel of int8.cu only where
  // cuBLASLt cannot run (K or N not a multiple of 4, operands not 4-byte aligned).
  static void int8_gemm_raw(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N,
                            int64_t K) {
    const cudaStream_t stream = current_stream();
    if (K % 4 == 0 && N % 4 == 0) {
      void* handle = &at::cuda::getCurrentCUDABlasLtHandle != nullptr
                         ? static_cast<void*>(at::cuda::getCurrentCUDABlasLtHandle())
                         : nullptr;
      const bool ws = &at::cuda::getCUDABlasLtWorkspace != nullptr &&
                      &at::cuda::getCUDABlasLtWorkspaceSize != nullptr;
      const int st = cuda::int8_gemm_lt(handle, ws ? at::cuda::getCUDABlasLtWorkspace() : nullptr,
                                        ws ? at::cuda::getCUDABlasLtWorkspaceSize() : 0, A, B, C, M,
                                        N, K, stream);
      // Sizes as std::to_string, not ints through c10::str's ostream: the H200 machine's build
      // crashed inside ostream integer insertion while formatting an error (check_sorted256).
      TORCH_CHECK(st <= 0, "lowbit: cuBLASLt int8 GEMM failed: ", cuda::int8_lt_status_name(st),
                  " (M=", std::to_string(M), ", N=", std::to_string(N), ", K=", std::to_string(K),
                  ")");
      if (st == 0) return;
    }
    C10_CUDA_CHECK(cuda::int8_gemm(A, B, C, M, N, K, stream));
  }

  // LLM.int8() forward: quantize + outlier columns, int8 GEMM, epilogue; three launches, no host
  // synchronisation, so it can be captured in a CUDA graph. Scratch: one allocation from torch's
  // caching allocator (no launch), carved into aligned pieces.
  at::Tensor int8_linear(const at::Tensor& a2, const at::Tensor& w, const at::Tensor& w_scale,
                         const at::Tensor& bias, float threshold) const override {
    const int64_t M = a2.size(0), K = a2.size(1), N = w.size(0);
    const bool outliers = threshold > 0.0f;
    const bool one_block = cuda::int8_quant_one_block(M, K);
    const int64_t cap = cuda::kInt8OutlierCapacity;
    // Byte offsets, each rounded up to 256 (cuBLASLt reads the codes with 16-byte loads at best).
    auto up = [](int64_t b) { return (b + 255) / 256 * 256; };
    const int64_t o_q = 0;
    const int64_t o_rs = o_q + up(M * K);
    const int64_t o_c = o_rs + up(M * 4);
    const int64_t o_mask = o_c + up(M * N * 4);
    const int64_t o_count = o_mask + (outliers && !one_block ? up((K + 31) / 32 * 4) : 0);
    const int64_t o_cols = o_count + (outliers ? 256 : 0);
    const int64_t o_ag = o_cols + (outliers ? up(K * 4) : 0);
    const int64_t o_wg = o_ag + (outliers ? up(M * cap * 4) : 0);
    const int64_t total = o_wg + (outliers && !one_block ? up(cap * N) : 0);
    at::Tensor scratch = at::empty({total}, a2.options().dtype(at::kByte));
    uint8_t* base = scratch.data_ptr<uint8_t>();
    auto* q = reinterpret_cast<int8_t*>(base + o_q);
    auto* rs = reinterpret_cast<float*>(base + o_rs);
    auto* c = reinterpret_cast<int32_t*>(base + o_c);
    cuda::Int8Outliers ob;
    if (outliers) {
      ob.mask = one_block ? nullptr : reinterpret_cast<uint32_t*>(base + o_mask);
      ob.count = reinterpret_cast<int32_t*>(base + o_count);
      ob.cols = reinterpret_cast<int32_t*>(base + o_cols);
      ob.a_gather = reinterpret_cast<float*>(base + o_ag);
      ob.w_gather = one_block ? nullptr : reinterpret_cast<int8_t*>(base + o_wg);
    }
    at::Tensor out = at::empty({M, N}, a2.options());
    const FloatType t = float_type(a2.scalar_type());
    const auto* wp = w.data_ptr<int8_t>();
    C10_CUDA_CHECK(cuda::int8_linear_quant(t, a2.data_ptr(), M, K, threshold, q, rs, wp, N,
                                           outliers ? &ob : nullptr, current_stream()));
    int8_gemm_raw(q, wp, c, M, N, K);
    C10_CUDA_CHECK(cuda::int8_linear_epilogue(
        c, rs, w_scale.data_ptr<float>(),
        bias.defined() ? float_type(bias.scalar_type()) : FloatType::f32,
        bias.defined() ? bias.data_ptr() : nullptr, t, out.data_ptr(), M, N, a2.data_ptr(), wp, K,
        outliers ? &ob : nullptr, current_stream()));
    return out;
  }

  void int8_mm_dequant(const at::Tensor& c2, const at::Tensor& row_stats,
                       const at::Tensor& col_stats, const at::Tensor& bias,
                       at::Tensor& out) const override {
    C10_CUDA_CHECK(cuda::int8_mm_dequant(
        c2.data_ptr<int32_t>(), row_stats.data_ptr<float>(), col_stats.data_ptr<float>(),
        bias.defined() ? float_type(bias.scalar_type()) : FloatType::f32,
        bias.defined() ? bias.data_ptr() : nullptr, c2.size(0), c2.size(1),
        float_type(out.scalar_type()), out.data_ptr(), current_stream()));
  }

  // ---- affine 4/8-bit (issue #13) ----
  void quantize_affine(const at::Tensor& a, int64_t bits, int64_t group_size, bool symmetric,
                       at::Tensor& packed, at::Tensor& scales, at::Tensor& zeros) const override {
    C10_CUDA_CHECK(cuda::quantize_affine(float_type(a.scalar_type()), a.data_ptr(), a.numel(),
                                         group_size, int(bits), symmetric,
                                         packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                         zeros.data_ptr<float>(), current_stream()));
  }

  void dequantize_affine(const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group_size,
                         at::Tensor& out) const override {
    C10_CUDA_CHECK(cuda::dequantize_affine(
        packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), int(bits),
        group_size, out.numel(), float_type(out.scalar_type()), out.data_ptr(), current_stream()));
  }

  // The tiers of gemv_4bit (cuda::plan_gemm_affine reuses plan_gemm_4bit's table and
  // LOWBIT_GEMM4_FORCE) for 4-bit codes in groups of a multiple of 32; for the rest (8-bit codes,
  // other group sizes, misaligned data) the affine GEMV at M <= 8 and dequantize + cuBLAS above.
  // The bias is added to the fp32 sums before the one rounding to A's dtype, as on the CPU: inside
  // the kernels (gemv, mma), and in the dequantize tier through an fp32 cuBLAS output (mm with
  // out_dtype fp32) or addmm (fp32 A). No host synchronisation; the allocations are the caching
  // allocator's (stream-ordered).
  void gemm_affine(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& zeros, int64_t bits, int64_t group_size,
                   const at::Tensor& bias, at::Tensor& out) const override {
    const int64_t M = a2.size(0), K = a2.size(1), N = out.size(1);
    if (M <= 0 || N <= 0) return;
    const FloatType ft = float_type(a2.scalar_type());
    const at::Tensor b32 = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
    const bool a16 = reinterpret_cast<uintptr_t>(a2.data_ptr()) % 16 == 0;
    const bool p16 = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0;
    const DeviceFacts d = device_facts();
    const cuda::Gemm4Plan plan =
        cuda::plan_gemm_affine(ft, M, N, K, int(bits), group_size, a16, p16, d.cc, d.sms,
                               std::getenv("LOWBIT_GEMM4_FORCE"));
    if (plan.tier == cuda::Gemm4Tier::dequant_gemm) {
      at::Tensor w = K > 0 ? at::empty({N, K}, a2.options()) : at::zeros({N, K}, a2.options());
      if (K > 0)
        C10_CUDA_CHECK(cuda::dequantize_affine(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                               zeros.data_ptr<float>(), int(bits), group_size,
                                               N * K, ft, w.data_ptr(), current_stream()));
      if (!b32.defined()) {
        at::mm_out(out, a2, w.t());
      } else if (a2.scalar_type() == at::kFloat) {
        at::addmm_out(out, b32.unsqueeze(0).expand({M, N}), a2, w.t());
      } else {
        at::Tensor acc = at::mm(a2, w.t(), at::kFloat);  // fp32 sums, no rounding to A's dtype
        acc.add_(b32);
        out.copy_(acc);
      }
      return;
    }
    at::Tensor ws;
    if (plan.workspace_floats > 0)
      ws = at::empty({plan.workspace_floats}, a2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(
        cuda::gemm_affine(plan, ft, a2.data_ptr(), M, K, packed.data_ptr<uint8_t>(),
                          scales.data_ptr<float>(), zeros.data_ptr<float>(), group_size, int(bits),
                          b32.defined() ? b32.data_ptr<float>() : nullptr, out.data_ptr(), N,
                          ws.defined() ? ws.data_ptr<float>() : nullptr, current_stream()));
  }
};

}  // namespace

const Backend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace lowbit::ops
