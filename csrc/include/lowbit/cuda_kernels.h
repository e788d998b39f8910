// Torch-free CUDA kernels: raw device pointers + sizes + the stream to launch on.
//
// Every function enqueues its kernel(s) on `stream` and returns the launch status
// (cudaGetLastError() after the launch; cudaSuccess when there was nothing to launch). They never
// synchronise, never allocate and never touch the current device: the ATen wrappers check the
// arguments and set the device guard (csrc/ops/<family>.cpp), and csrc/ops/cuda_backend.cpp picks
// the current stream and launches.
//
// The semantics are those of the CPU kernels in cpu_kernels.h, bit for bit: the same per-block
// scale policy (blockscale.h), the same nearest-code rule (codebook.h) and the same
// round-to-nearest-even conversions (numeric.h). Only fp32 sums whose order is not fixed by the
// format (the dot products of gemv_4bit) may differ in the last bits. A NaN output has the CPU
// kernels' bits too (the NaN operand propagated, quieted; the host's default NaN for 0 * Inf),
// not the GPU's canonical 0x7fffffff (common.cuh, mul_cpu).
//
// All element counts and offsets are int64: a tensor may hold more than 2^31 elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/numeric.h"

namespace lowbit::cuda {

// A 16-entry code table passed by value (kernel parameter space), so no device copy is needed.
struct Code16 {
  float v[16];
};

// ---- 8-bit blockwise (csrc/kernels/cuda/blockwise.cu) -----------------------------------------
// Blocks run over the flattened tensor of n elements; block b covers [b*bs, min(n, (b+1)*bs)).
// code256: the 256-entry code, in device memory, meant to be sorted ascending. Each thread block
// derives the 255 midpoints and the code nearest 0 from it in shared memory, exactly as the CPU
// wrapper does on the host. The kernel also checks the order (the CPU wrapper's test, c[i] <=
// c[i+1], so NaN fails): with an unsorted code every block is treated as non-finite (absmax NaN,
// every code the zero code), so the output dequantizes to NaN instead of to wrong values. The
// ATen wrapper raises on an unsorted code before launching, except while the stream is being
// captured into a CUDA graph, where its host check (a device-to-host read) is not allowed.
// blocksize: a power of two in [64, 4096].
cudaError_t quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                               const float* code256, uint8_t* q, float* absmax,
                               cudaStream_t stream);
// out[i] = code256[q[i]] * absmax[i / bs], rounded once to the output type.
cudaError_t dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256,
                                 int64_t n, int64_t blocksize, FloatType t, void* out,
                                 cudaStream_t stream);

// ---- 4-bit (csrc/kernels/cuda/fourbit.cu) -----------------------------------------------------
// Packing: element 2j in the HIGH nibble of byte j, element 2j+1 in the low nibble; an odd n pads
// the last low nibble with cb.zero_code. blocksize: a power of two in [32, 4096] (so even: a block
// never splits a byte).
cudaError_t quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize,
                          const Codebook16& cb, uint8_t* packed, float* absmax,
                          cudaStream_t stream);
cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const Code16& code,
                            int64_t n, int64_t blocksize, FloatType t, void* out,
                            cudaStream_t stream);
// The weight of a product as T [n] for the dequantize + cuBLAS tier: the code in device memory
// and the scales as gemm_4bit takes them (a nested absmax decoded per block in the kernel). packed
// 8-byte and out 16-byte aligned (cudaErrorMisalignedAddress otherwise).
cudaError_t dequantize_4bit_weight(const uint8_t* packed, const BlockAbsmax& scales,
                                   const float* code16, int64_t n, int64_t blocksize, FloatType t,
                                   void* out, cudaStream_t stream);

// ---- 4-bit products: out[m, j] = sum_k a[m, k] * W[j, k] ----------------------------------------
// a [M, K] and out [M, N] both of type t (contiguous), W [N, K] 4-bit packed over its flattened
// index j*K + k with blocks of `blocksize` on that index. code16: the 16-entry code in device
// memory. fp32 products and sums, rounded once to t. scales: the per-block scales, all pointers in
// device memory: BlockAbsmax::plain(absmax) for an fp32 absmax, or a double quantized one,
// decoded inside the kernels with blockscale.h's expression (no temporary).
//
// Four tiers, chosen by plan_gemm_4bit from ONE table (kGemm4Table in fourbit.cu):
//   gemv:         SIMT, M <= gemv_max_m, warp per column(s), split-K inside the block
//                 (fourbit_gemv.cu); fp16, bf16 and fp32;
//   mma:          tensor cores (mma.sync m16n8k16), fp16/bf16 only, up to mma_max_m
//                 (fourbit_mma.cu), split-K over blocks when the tiles do not fill the GPU;
//   dequant_gemm: the caller dequantizes into a workspace (dequantize_4bit) and calls cuBLAS;
//   generic:      any K and alignment (K % 32 != 0, misaligned pointers), any M.
enum class Gemm4Tier : int { gemv = 0, mma = 1, dequant_gemm = 2, generic = 3 };
struct Gemm4Plan {
  Gemm4Tier tier = Gemm4Tier::generic;
  int config = 0;                // gemv: warps per column group (split-K); mma: tile configuration
  int split = 1;                 // mma: blocks along K (> 1 needs a workspace)
  int64_t workspace_floats = 0;  // fp32 workspace gemm_4bit needs (mma split-K partials)
};
// a_aligned16 / packed_aligned16: the data pointers are 16-byte aligned. cc: the device's compute
// capability as 10 * major + minor (the tensor cores need 80). sm_count: its multiprocessors.
// force: "" (the table), or "gemv[:warps per column]", "mma[:config[:split]]", "dequant",
// "generic" (tests and
// benchmarks pin a tier; a tier that cannot run the shape falls back to the table's choice).
Gemm4Plan plan_gemm_4bit(FloatType t, int64_t M, int64_t N, int64_t K, bool a_aligned16,
                         bool packed_aligned16, int cc, int sm_count, const char* force);
// Runs the gemv, mma or generic tier of `plan` (not dequant_gemm: the caller does that one).
// workspace: plan.workspace_floats fp32 of device memory (null when 0).
cudaError_t gemm_4bit(const Gemm4Plan& plan, FloatType t, const void* a, int64_t M, int64_t K,
                      const uint8_t* packed, const BlockAbsmax& scales, const float* code16,
                      int64_t blocksize, void* out, int64_t N, float* workspace,
                      cudaStream_t stream);

// ---- LLM.int8() (csrc/kernels/cuda/int8.cu) ---------------------------------------------------
// mask[c] = 1 if any |a[r, c]| >= threshold over the rows of a [rows, K], else 0 (all K entries
// are written).
cudaError_t int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K,
                                 float threshold, uint8_t* mask, cudaStream_t stream);
// Per row: row_stats[r] = max |a[r, c]| over elements with |a| < threshold (every element when
// threshold == 0); q = round-half-even(a * (127 / row_stats)), 0 for elements at or above the
// threshold and in columns flagged in col_mask (may be null). A row holding NaN/Inf below the
// threshold gets row_stats NaN and zero codes; an all-zero row gets 0 and zero codes.
cudaError_t int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K,
                                  float threshold, const uint8_t* col_mask, int8_t* q,
                                  float* row_stats, cudaStream_t stream);
// out[r, c] = q[r, c] * stats[r] / 127 in fp32 (as (q * stats) * (1 / 127)).
cudaError_t int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t rows, int64_t K,
                                    float* out, cudaStream_t stream);
// C[m, n] = sum_k A[m, k] * B[n, k] with A [M, K], B [N, K] (both K-contiguous), int32 sums.
// K <= 131071 (the wrapper checks it) so |C| < 128 * 128 * K < 2^31 for every int8 code, -128
// included. K == 0 writes zeros.
cudaError_t int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                      cudaStream_t stream);
// out[m, n] = float(C[m, n]) * (row[m] * col[n]) * (1 / 16129) + bias[n]; bias may be null.
cudaError_t int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,
                            FloatType bias_t, const void* bias, int64_t rows, int64_t N,
                            FloatType out_t, void* out, cudaStream_t stream);

// ---- LLM.int8() int8 GEMM through cuBLASLt (csrc/kernels/cuda/int8_gemm_lt.cu) ----------------
// C [M, N] = A [M, K] . B [N, K]^T in int32 (same contract as int8_gemm) with cuBLASLt on
// lt_handle (a cublasLtHandle_t) and the given workspace, on `stream`; one kernel. Returns 0 when
// it ran, kInt8LtUnsupported when cuBLASLt cannot take this problem (K or N not a multiple of 4, a
// pointer not 4-byte aligned, no algorithm: the caller runs int8_gemm instead, nothing was
// enqueued), or a cublasStatus_t (> 0) on a library error (int8_lt_status_name names it).
constexpr int kInt8LtUnsupported = -1;
int int8_gemm_lt(void* lt_handle, void* workspace, size_t workspace_bytes, const int8_t* A,
                 const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, cudaStream_t stream);
const char* int8_lt_status_name(int status);

// ---- LLM.int8() forward in three launches (csrc/kernels/cuda/int8_linear.cu) -------------------
// int8_linear_quant -> int8_gemm_lt (or int8_gemm) -> int8_linear_epilogue; nothing waits for the
// host, so the sequence can be captured in a CUDA graph.
//
// Outlier columns: every column c with some |a[r, c]| >= threshold (threshold > 0). They are listed
// on the device in ascending order; the first kInt8OutlierCapacity are gathered into dense
// buffers, the rest are read in place by the epilogue. The result never depends on how many there
// are (no column is dropped), only the time does.
constexpr int kInt8OutlierCapacity = 256;
// Device scratch of one forward (contents on entry do not matter).
struct Int8Outliers {
  uint32_t* mask = nullptr;    // [ceil(K / 32)]; needed unless int8_quant_one_block(rows, K)
  int32_t* count = nullptr;    // [1]: the number of outlier columns
  int32_t* cols = nullptr;     // [K]: the outlier columns, ascending (first *count entries)
  float* a_gather = nullptr;   // [rows, kInt8OutlierCapacity]: a[r, cols[j]] in fp32
  int8_t* w_gather = nullptr;  // [kInt8OutlierCapacity, N]: W[n, cols[j]]; needed unless one block
};
// Whether int8_linear_quant runs as one thread block (few rows; no grid barrier, no weight gather)
// rather than a cooperative grid.
bool int8_quant_one_block(int64_t rows, int64_t K);
// a [rows, K] of type t (contiguous) -> q [rows, K] int8 and row_stats [rows], as
// int8_vectorwise_quant with the outlier columns' codes zeroed; with threshold > 0 also the
// outlier list of `ob` (W [N, K]: the weight whose outlier bytes are gathered). K <= 131071.
cudaError_t int8_linear_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                              int8_t* q, float* row_stats, const int8_t* W, int64_t N,
                              const Int8Outliers* ob, cudaStream_t stream);
// out [rows, N] of type t = C * (row * col) / 127^2 + bias (int8_mm_dequant's expression, bit for
// bit) + sum over the outlier columns c (ascending) of a[r, c] * (W[n, c] * (col[n] / 127)) in
// fp32, rounded once. ob == null: no outliers (threshold 0). a [rows, K] of type t, W [N, K].
cudaError_t int8_linear_epilogue(const int32_t* C, const float* row_stats, const float* col_stats,
                                 FloatType bias_t, const void* bias, FloatType t, void* out,
                                 int64_t rows, int64_t N, const void* a, const int8_t* W, int64_t K,
                                 const Int8Outliers* ob, cudaStream_t stream);

}  // namespace lowbit::cuda

// ---- optimizers (csrc/kernels/cuda/optim.cu) --------------------------------------------------
// The update of lowbit/optim.h (optim_update_element, bit-identical to the CPU kernels) over many
// parameters at once: each call takes an array of parameters that share the gradient and
// parameter types and the scalars, and launches one kernel per kOptimMaxTensors of them (the
// descriptors travel as a kernel argument), so a model of many small tensors costs a few launches
// per step, not one per tensor.
#include "lowbit/optim.h"

namespace lowbit::cuda {

struct OptimTensor {
  const void* g;   // gradient, n elements of the call's gradient type
  void* p;         // parameter, n elements of the call's parameter type, updated in place
  void* state1;    // uint8 codes (8-bit call) or fp32 values (32-bit call), n elements
  void* state2;    // the same for two-state optimizers, else null
  float* absmax1;  // 8-bit: fp32 [ceil(n / 256)]
  float* absmax2;  // 8-bit, two-state optimizers
  int64_t n;
  uint32_t seed;  // stochastic rounding seed of this tensor (used when s.stochastic)
  // Index of this tensor's entry in the flags array. The host groups the parameters of one op
  // call by dtype pair, so a launch's tensors are not a contiguous run of the op's list: each
  // carries its own index into the one flags array of the call (no per-group copy, no gather).
  int flag;
};
constexpr int kOptimMaxTensors = 32;

// flags[t.flag] (int32, zeroed by the caller) becomes 1 when t.g holds NaN or +-Inf.
cudaError_t optim_nonfinite_flags(FloatType gt, const OptimTensor* tensors, int count, int* flags,
                                  cudaStream_t stream);
// 8-bit blockwise states, blocks of 256: tensors whose flag is set are left untouched. code1/2:
// the 256-entry maps (fp32, device memory, sorted ascending: an unsorted map gives wrong codes,
// never an out-of-range access). Each thread block derives the quantization rule from the map
// itself (midpoints (c[i] + c[i+1]) / 2 in fp32, zero code = first index of the smallest |c|, as
// the CPU path's host_code), so a call needs no preparation kernels and no host synchronisation.
// code2 is null for one-state optimizers.
cudaError_t optimizer_update_8bit_blockwise(const OptimScalars& s, FloatType gt, FloatType pt,
                                            const OptimTensor* tensors, int count,
                                            const float* code1, const float* code2,
                                            const int* flags, cudaStream_t stream);
// fp32 states.
cudaError_t optimizer_update_32bit(const OptimScalars& s, FloatType gt, FloatType pt,
                                   const OptimTensor* tensors, int count, const int* flags,
                                   cudaStream_t stream);

// ---- affine 4/8-bit (csrc/kernels/cuda/affine.cu), issue #13 -----------------------------------
// W [N, K] of unsigned codes q (bits 4: packed two per byte over the flat index, element 2j in the
// HIGH nibble of byte j, uint8 [(n + 1) / 2]; bits 8: uint8 [n]), fp32 scales and zeros per group
// of group_size consecutive flat elements (group_size divides K): w = (float(q) - zero) * scale,
// fp32, each operation rounded (no FMA), then one rounding to the output type. Bit for bit the
// CPU kernels' and lowbit.reference's results.
//
// The min/max round-to-nearest quantizer of reference.quantize_affine over a [n] (n % group_size
// == 0): scales/zeros [n / group_size], every byte of packed written (an odd n pads with 0).
cudaError_t quantize_affine(FloatType t, const void* a, int64_t n, int64_t group_size, int bits,
                            bool symmetric, uint8_t* packed, float* scales, float* zeros,
                            cudaStream_t stream);
// out [n] of type t; any alignment and group size (the dequantize + cuBLAS tier of the product
// uses it too, into a workspace of the activation dtype).
cudaError_t dequantize_affine(const uint8_t* packed, const float* scales, const float* zeros,
                              int bits, int64_t group_size, int64_t n, FloatType t, void* out,
                              cudaStream_t stream);
// The product's tier: plan_gemm_4bit's choice (the same table, thresholds and LOWBIT_GEMM4_FORCE
// spellings) for 4-bit codes with group_size % 32 == 0 (so K % 32 == 0) and N * K / 32 < 2^32.
// Everything else (8-bit codes, other group sizes, and misaligned data where the 4-bit table says
// "generic") runs the affine GEMV (tier gemv, config flag 1 << 8: gemv_affine_kernel in affine.cu,
// any K, group size and alignment) at M <= 8 and dequant_gemm above. Forcing "dequant" or
// "generic" pins dequant_gemm; "affgemv[:W]" pins the affine GEMV (W warps per column) at M <= 8.
Gemm4Plan plan_gemm_affine(FloatType t, int64_t M, int64_t N, int64_t K, int bits,
                           int64_t group_size, bool a_aligned16, bool packed_aligned16, int cc,
                           int sm_count, const char* force);
// Runs the gemv or mma tier of `plan` (dequant_gemm is the caller's: dequantize_affine + cuBLAS):
// out [M, N] (type t) = a [M, K] @ W^T + bias, W of `bits`-bit codes, fp32 sums, bias (fp32 [N]
// in device memory, or null) added in fp32, one rounding to t. workspace: as gemm_4bit.
cudaError_t gemm_affine(const Gemm4Plan& plan, FloatType t, const void* a, int64_t M, int64_t K,
                        const uint8_t* packed, const float* scales, const float* zeros,
                        int64_t group_size, int bits, const float* bias, void* out, int64_t N,
                        float* workspace, cudaStream_t stream);

}  // namespace lowbit::cuda
