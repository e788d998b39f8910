// The CPU 4-bit product (gemv_4bit for any M): picks one of three strategies by shape.
//   * M <= kQ8MaxRows on an AVX2 machine: activations to int8, integer dot products
//     (gemm_4bit_q8, the llama.cpp-style fast path; LOWBIT_CPU_GEMV=fp32 turns it off);
//   * M >= kBlasMinRows: dequantize a tile of weight rows (kept in cache, never the whole weight)
//     and multiply it with torch's BLAS, tile after tile: in fp32, or in bf16 for bf16 activations
//     on a CPU that multiplies bf16 natively (cpu::native_bf16_matmul);
//   * otherwise, and whenever the int8 path refuses (NaN/Inf/tiny/huge activations, a code it
//     cannot put on its grid, odd shapes, a NaN/Inf result): the fused fp32 kernel (gemm_4bit),
//     exact up to the order of fp32 sums.
#include "ops/cpu_gemm4.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "lowbit/blockscale.h"
#include "lowbit/cpu_isa.h"
#include "lowbit/cpu_kernels.h"
#include "ops/common.h"

namespace lowbit::ops {

namespace {

// Up to this many activation rows, decoding each weight chunk once and reusing it from registers
// beats dequantize + BLAS on AVX2 machines: one Zen 3 core, 4096 x 4096, M = 16 / 32 / 64: 9.2 /
// ~18 / 37 ms against 15 / 22 / 37-41 ms (the crossover is near 64; past 32 the int8 rounding of
// prefill-sized batches buys little).
constexpr int64_t kQ8MaxRows = 32;
// From this many rows on, BLAS on a dequantized fp32 tile wins over the fused fp32 kernel.
constexpr int64_t kBlasMinRows = 8;
// Weight rows per dequantized tile: about 4 MiB of fp32, so the tile stays in the last-level cache
// between being written and being read by the GEMM.
constexpr int64_t kTileBytes = int64_t(4) << 20;

// The int8 activations of the small-M products (quantize_activations_q8's outputs), shared by
// the codebook and the affine product.
struct Q8Activations {
  std::vector<int8_t> q;
  std::vector<float> scales, offsets;
  // False if some row cannot go on the int8 grid (NaN/Inf, tiny or huge chunks): exact kernels.
  bool quantize(const float* a, int64_t M, int64_t K) {
    q.resize(static_cast<size_t>(M * K));
    scales.resize(static_cast<size_t>(M * (K / cpu::kQ8Chunk)));
    offsets.resize(3 * scales.size());
    std::atomic<bool> ok{true};
    at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
      if (!cpu::quantize_activations_q8(a, K, q.data(), scales.data(), offsets.data(), r0, r1))
        ok = false;
    });
    return ok;
  }
};

// A NaN/Inf output of an int8-activation product (a NaN weight block, or scales so large that an
// fp32 product overflowed) is recomputed by the fp32 kernels, which give NaN and Inf their exact
// meaning: the int8 path never turns an overflow into a different answer. One pass over M * N.
bool all_finite(const float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(out[i])) return false;
  return true;
}

bool q8_product(const float* a, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
                const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out) {
  if (M > kQ8MaxRows || !cpu::gemv_int8_activations() || !cpu::gemm_4bit_q8_supported(K, blocksize))
    return false;
  const cpu::Q8Codebook cb = cpu::make_q8_codebook(code16);
  if (!cb.ok) return false;
  Q8Activations x;
  if (!x.quantize(a, M, K)) return false;
  at::parallel_for(0, N, grain_for(K * M, 1 << 18), [&](int64_t n0, int64_t n1) {
    cpu::gemm_4bit_q8(x.q.data(), x.scales.data(), x.offsets.data(), M, K, packed, scales, cb,
                      blocksize, out, N, n0, n1);
  });
  return all_finite(out, M * N);
}

// The activations the BLAS tier multiplies: bf16 as given where the CPU multiplies bf16 natively
// (one rounding of each product to bf16 after fp32 accumulation, as F.linear with a bf16 weight;
// on a Zen 4, 128 x 4096 @ 4096 x 11008 takes 222 ms in bf16 against 788 ms in fp32), else fp32.
at::Tensor blas_activations(const at::Tensor& a_in) {
  if (a_in.scalar_type() == at::kBFloat16 && cpu::native_bf16_matmul()) return a_in.contiguous();
  return a_in.to(at::kFloat).contiguous();
}

// out [M, N] (fp32) = a [M, K] @ W^T with W dequantized a tile of whole rows at a time into a
// buffer of a's dtype (fp32 or bf16) and multiplied by torch's BLAS, tile after tile.
// decode(n0, rows, type, dst) writes weight rows [n0, n0 + rows) to dst as `type`.
template <class DecodeRows>
void tiled_blas_product(const at::Tensor& a, int64_t N, const DecodeRows& decode, at::Tensor& out) {
  const int64_t K = a.size(1);
  const FloatType type = float_type(a.scalar_type());
  const int64_t tile = std::max<int64_t>(1, kTileBytes / (a.element_size() * K));
  // The transposed product outT [N, M] makes each tile's result a contiguous row range.
  at::Tensor outT = at::empty({N, a.size(0)}, a.options());
  at::Tensor w = at::empty({std::min(tile, N), K}, a.options());
  const at::Tensor aT = a.t();
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t rows = std::min(tile, N - n0);
    decode(n0, rows, type, w.data_ptr());
    at::Tensor dst = outT.narrow(0, n0, rows);
    at::mm_out(dst, w.narrow(0, 0, rows), aT);
  }
  out.copy_(outT.t());
}

// out [M, N] = a [M, K] @ W^T for a codebook weight. Needs K % blocksize == 0 so that a tile of
// whole rows is a whole number of blocks.
void blas_product(const at::Tensor& a, int64_t N, const uint8_t* packed, const BlockAbsmax& scales,
                  const float* code16, int64_t blocksize, at::Tensor& out) {
  const int64_t K = a.size(1);
  auto decode = [&](int64_t n0, int64_t rows, FloatType type, void* dst) {
    const int64_t blocks = rows * K / blocksize, b_first = n0 * K / blocksize;
    const uint8_t* pp = packed + n0 * K / 2;  // K % blocksize == 0 and blocksize is even
    const int64_t esize = type == FloatType::f32 ? 4 : 2;
    at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      const float* m = nullptr;
      std::vector<float> decoded;
      if (scales.nested()) {  // decode this sub-range's double-quantized scales once
        decoded.resize(static_cast<size_t>(b1 - b0));
        for (int64_t b = b0; b < b1; ++b) decoded[b - b0] = scales[b_first + b];
        m = decoded.data();
      } else {
        m = scales.absmax + b_first + b0;
      }
      // Blocks [b0, b1) of the tile: element offset b0 * blocksize, in bytes for the dtype.
      void* d = static_cast<char*>(dst) + b0 * blocksize * esize;
      cpu::dequantize_4bit(pp + b0 * blocksize / 2, m, code16, (b1 - b0) * blocksize, blocksize,
                           type, d, 0, b1 - b0);
    });
  };
  tiled_blas_product(a, N, decode, out);
}

}  // namespace

void cpu_gemm_4bit(const at::Tensor& a_in, const uint8_t* packed, const BlockAbsmax& scales,
                   const float* code16, int64_t blocksize, at::Tensor& out) {
  const int64_t M = a_in.size(0), K = a_in.size(1), N = out.size(1);
  if (M >= kBlasMinRows && K > 0 && K % blocksize == 0 && M > kQ8MaxRows) {
    blas_product(blas_activations(a_in), N, packed, scales, code16, blocksize, out);
    return;
  }
  const at::Tensor a = a_in.to(at::kFloat).contiguous();
  const float* ap = a.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (q8_product(ap, M, K, N, packed, scales, code16, blocksize, op)) return;
  if (M >= kBlasMinRows && K > 0 && K % blocksize == 0) {
    blas_product(a, N, packed, scales, code16, blocksize, out);
    return;
  }
  at::parallel_for(0, N, grain_for(K * M, 65536), [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(static_cast<size_t>(K));
    cpu::gemm_4bit(ap, M, K, packed, scales, code16, blocksize, op, N, n0, n1, scratch.data());
  });
}

}  // namespace lowbit::ops

// ---- affine 4/8-bit weights (issue #13): the same three tiers as the codebook product above ----

namespace lowbit::ops {

namespace {

// The int8-activation tier for 4-bit and 8-bit codes alike (gemm_affine_q8_supported: K % 64 == 0,
// group_size % 32 == 0); false sends the call to the BLAS or exact fp32 tier, as for NF4.
bool q8_affine_product(const float* a, int64_t M, int64_t K, int64_t N, const cpu::AffineWeight& w,
                       float* out) {
  if (M > kQ8MaxRows || !cpu::gemv_int8_activations() ||
      !cpu::gemm_affine_q8_supported(K, w.bits, w.group_size))
    return false;
  Q8Activations x;
  if (!x.quantize(a, M, K)) return false;
  at::parallel_for(0, N, grain_for(K * M, 1 << 18), [&](int64_t n0, int64_t n1) {
    cpu::gemm_affine_q8(x.q.data(), x.scales.data(), x.offsets.data(), M, K, w, out, N, n0, n1);
  });
  return all_finite(out, M * N);
}

// out [M, N] = a [M, K] @ W^T for an affine weight, a tile of whole rows (whole groups, since
// group_size divides K) at a time.
void blas_affine_product(const at::Tensor& a, int64_t N, const cpu::AffineWeight& w,
                         at::Tensor& out) {
  const int64_t K = a.size(1), groups_per_row = K / w.group_size;
  auto decode = [&](int64_t n0, int64_t rows, FloatType type, void* dst) {
    // The tile's view of the weight: groups renumbered from 0, codes from the tile's first row.
    // (4-bit with K odd never gets here: a tile would start inside a byte.)
    cpu::AffineWeight tw = w;
    tw.packed = w.packed + (w.bits == 4 ? n0 * K / 2 : n0 * K);
    tw.scales = w.scales + n0 * groups_per_row;
    tw.zeros = w.zeros + n0 * groups_per_row;
    at::parallel_for(
        0, rows * groups_per_row, grain_for(w.group_size),
        [&](int64_t g0, int64_t g1) { cpu::dequantize_affine(tw, type, dst, g0, g1); });
  };
  tiled_blas_product(a, N, decode, out);
}

}  // namespace

void cpu_gemm_affine(const at::Tensor& a_in, const cpu::AffineWeight& w, at::Tensor& out) {
  const int64_t M = a_in.size(0), K = a_in.size(1), N = out.size(1);
  if (K == 0) {
    out.zero_();
    return;
  }
  if (M >= kBlasMinRows && M > kQ8MaxRows && (w.bits == 8 || K % 2 == 0)) {
    blas_affine_product(blas_activations(a_in), N, w, out);
    return;
  }
  const at::Tensor a = a_in.to(at::kFloat).contiguous();
  const float* ap = a.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (q8_affine_product(ap, M, K, N, w, op)) return;
  if (M >= kBlasMinRows && (w.bits == 8 || K % 2 == 0)) {
    blas_affine_product(a, N, w, out);
    return;
  }
  at::parallel_for(0, N, grain_for(K * M, 65536), [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(static_cast<size_t>(K));
    cpu::gemm_affine(ap, M, K, w, op, N, n0, n1, scratch.data());
  });
}

}  // namespace lowbit::ops
