// The CPU backend: each function splits its work items (blocks, rows or output features) over
// torch's thread pool with at::parallel_for and runs the torch-free kernel on each sub-range.
#include <ATen/Parallel.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cpu_kernels.h"
#include "ops/backend.h"
#include "ops/common.h"
#include "ops/cpu_gemm4.h"

namespace lowbit::ops {

namespace {

// A fresh output of tens of MiB costs one page fault per 4 KiB page on its first write: measured
// ~1.5 us each on the reference VM, 12 ms for a 32 MiB bf16 output, longer than dequantizing
// into it. Backed by 2 MiB pages (transparent huge pages, when the system allows them on
// request) the same first touch costs about a third of that. torch does the same for every large
// allocation when THP_MEM_ALLOC_ENABLE=1; here only the op's own output is asked for. Memory that
// is already resident (an out= tensor, reused heap) is left alone: mincore() on its first 2 MiB
// page says so. Only whole 2 MiB pages inside the tensor are marked; when the allocator served
// the tensor from its heap rather than a fresh mapping, the advice stays on those pages after the
// tensor is freed (they may be reused as huge pages), which changes memory use, never results.
void prefer_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(8 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end <= begin) return;
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(begin), 4096, &resident) != 0 || (resident & 1)) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

// The indices of the set entries of a uint8 mask (undefined: none). Outlier columns are few
// (usually none), so per-column work is cheaper from this list than from a scan of the mask.
std::vector<int64_t> set_columns(const at::Tensor& mask) {
  std::vector<int64_t> cols;
  if (mask.defined()) {
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    for (int64_t c = 0, K = mask.numel(); c < K; ++c)
      if (mp[c]) cols.push_back(c);
  }
  return cols;
}

// Row quantization of a2 [rows, K] with the columns `cols` zeroed.
void quant_rows(const at::Tensor& a2, float threshold, const std::vector<int64_t>& cols,
                at::Tensor& q, at::Tensor& stats) {
  const int64_t rows = a2.size(0), K = a2.size(1);
  if (K == 0) {  // empty rows: scale 0, no codes (and no kernel call on null data pointers)
    stats.zero_();
    return;
  }
  const FloatType t = float_type(a2.scalar_type());
  const void* ap = a2.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = stats.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(K), [&](int64_t r0, int64_t r1) {
    cpu::int8_vectorwise_quant(t, ap, rows, K, threshold, cols.data(), int64_t(cols.size()), qp, sp,
                               r0, r1);
  });
}

// t[n] += sum_j a[j] * w[j * N + n] for n < N, in ascending j (the outlier columns' product for
// one output row, whose N floats stay in L1 across the nc passes). Blocks of 8 columns that the
// compiler vectorizes (its -O2 cost model vectorizes only loops of a known trip count, and needs
// the restrict), then the tail. Separate multiply and add (no FMA) in the same order for every
// element: any vector width and thread split rounds alike. (Keeping a block of 8 sums in a local
// array across the j loop instead went through the stack: 2x slower. An AVX2 clone gained ~15%.)
void add_outlier_product(const float* __restrict a, const float* __restrict w, int64_t nc,
                         float* __restrict t, int64_t N) {
  for (int64_t j = 0; j < nc; ++j) {
    const float aj = a[j];
    const float* __restrict wj = w + j * N;
    int64_t n = 0;
    for (; n + 8 <= N; n += 8)
      for (int u = 0; u < 8; ++u) t[n + u] = t[n + u] + aj * wj[n + u];
    for (; n < N; ++n) t[n] = t[n] + aj * wj[n];
  }
}

class CpuBackend final : public Backend {
 public:
  void quantize_blockwise(const char* op, const at::Tensor& a, const at::Tensor& code,
                          int64_t blocksize, at::Tensor& q, at::Tensor& absmax) const override {
    const float* cv = code.data_ptr<float>();
    // Midpoints of the sorted code: the quantization rule of codebook.h.
    float bound[255];
    for (int i = 0; i < 255; ++i) {
      TORCH_CHECK_VALUE(cv[i] <= cv[i + 1], "lowbit.", op,
                        ": code must be sorted ascending (entry ", i + 1, " is below entry ", i,
                        ")");
      bound[i] = (cv[i] + cv[i + 1]) / 2.0f;
    }
    uint8_t zero_code = 0;
    for (int i = 1; i < 256; ++i)
      if (std::fabs(cv[i]) < std::fabs(cv[zero_code])) zero_code = uint8_t(i);
    const int64_t n = a.numel(), blocks = absmax.numel();
    const FloatType t = float_type(a.scalar_type());
    const void* ap = a.data_ptr();
    uint8_t* qp = q.data_ptr<uint8_t>();
    float* mp = absmax.data_ptr<float>();
    prefer_huge_pages(qp, q.nbytes());
    at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      cpu::quantize_blockwise(t, ap, n, blocksize, bound, zero_code, qp, mp, b0, b1);
    });
  }

  void dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                            int64_t blocksize, at::Tensor& out) const override {
    const int64_t n = q.numel(), blocks = ceil_div(n, blocksize);
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const float* mp = absmax.data_ptr<float>();
    const float* cp = code.data_ptr<float>();
    void* op_ = out.data_ptr();
    const FloatType t = float_type(out.scalar_type());
    prefer_huge_pages(op_, out.nbytes());
    at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      cpu::dequantize_blockwise(qp, mp, cp, n, blocksize, t, op_, b0, b1);
    });
  }

  void quantize_4bit(const at::Tensor& a, int64_t blocksize, QuantType4 qt, at::Tensor& packed,
                     at::Tensor& absmax) const override {
    const int64_t n = a.numel(), blocks = absmax.numel();
    const Codebook16 cb = make_codebook16(code4_table(qt));
    const FloatType t = float_type(a.scalar_type());
    const void* ap = a.data_ptr();
    uint8_t* pp = static_cast<uint8_t*>(packed.data_ptr());
    float* mp = absmax.data_ptr<float>();
    prefer_huge_pages(pp, packed.nbytes());
    at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      cpu::quantize_4bit(t, ap, n, blocksize, cb, pp, mp, b0, b1);
    });
  }

  void dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       QuantType4 qt, at::Tensor& out) const override {
    const int64_t n = out.numel(), blocks = ceil_div(n, blocksize);
    const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
    const float* mp = absmax.data_ptr<float>();
    const float* code = code4_table(qt);
    void* dp = out.data_ptr();
    const FloatType t = float_type(out.scalar_type());
    prefer_huge_pages(dp, out.nbytes());
    at::parallel_for(0, blocks, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      cpu::dequantize_4bit(pp, mp, code, n, blocksize, t, dp, b0, b1);
    });
  }

  void gemv_4bit(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& absmax,
                 const at::Tensor& code, int64_t blocksize, const NestedAbsmax& nested,
                 at::Tensor& out) const override {
    const int64_t M = a2.size(0), N = out.size(1);
    // fp32 accumulation (fp32 activations, or bf16 ones in the bf16 BLAS tier); the result is
    // rounded once to out's dtype.
    at::Tensor acc =
        out.scalar_type() == at::kFloat ? out : at::empty({M, N}, out.options().dtype(at::kFloat));
    if (M > 0 && N > 0) {
      const uint8_t* bp = static_cast<const uint8_t*>(packed.data_ptr());
      // A double quantized absmax is decoded per block inside the kernel (no fp32 copy).
      cpu_gemm_4bit(a2, bp, block_scales(absmax, nested), code.data_ptr<float>(), blocksize, acc);
    }
    if (!acc.is_same(out)) out.copy_(acc);
  }

  void int8_outlier_columns(const at::Tensor& a2, float threshold,
                            at::Tensor& mask) const override {
    const int64_t rows = a2.size(0), K = a2.size(1);
    const FloatType t = float_type(a2.scalar_type());
    const void* ap = a2.data_ptr();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    at::parallel_for(0, K, std::max<int64_t>(256, grain_for(rows)), [&](int64_t c0, int64_t c1) {
      cpu::int8_outlier_columns(t, ap, rows, K, threshold, mp, c0, c1);
    });
  }

  void int8_vectorwise_quant(const at::Tensor& a2, float threshold, const at::Tensor& col_mask,
                             at::Tensor& q, at::Tensor& stats) const override {
    quant_rows(a2, threshold, set_columns(col_mask), q, stats);
  }

  void int8_vectorwise_dequant(const at::Tensor& q2, const at::Tensor& stats,
                               at::Tensor& out) const override {
    const int64_t rows = q2.size(0), K = q2.size(1);
    const int8_t* ap = q2.data_ptr<int8_t>();
    const float* sp = stats.data_ptr<float>();
    float* op_ = out.data_ptr<float>();
    at::parallel_for(0, rows, grain_for(K), [&](int64_t r0, int64_t r1) {
      cpu::int8_vectorwise_dequant(ap, sp, K, op_, r0, r1);
    });
  }

  void int8_gemm(const at::Tensor& a2, const at::Tensor& b, at::Tensor& c2) const override {
    const int64_t M = a2.size(0), N = b.size(0), K = b.size(1);
    const int8_t* ap = a2.data_ptr<int8_t>();
    const int8_t* bp = b.data_ptr<int8_t>();
    int32_t* cp = c2.data_ptr<int32_t>();
    // Work items of kCols columns: the AVX-512 kernel packs B in panels of 32 columns (16-column
    // vectors), so ranges that start at multiples of 64 leave no partial panel inside the range
    // except at N's end; at N = 384 the two threads get 3 items each.
    constexpr int64_t kCols = 64;
    const int64_t items = ceil_div(N, kCols);
    at::parallel_for(0, items, grain_for(kCols * K * std::max<int64_t>(M, 1), 65536),
                     [&](int64_t i0, int64_t i1) {
                       cpu::int8_gemm(ap, bp, cp, M, N, K, i0 * kCols, std::min(N, i1 * kCols));
                     });
  }

  void int8_mm_dequant(const at::Tensor& c2, const at::Tensor& row_stats,
                       const at::Tensor& col_stats, const at::Tensor& bias,
                       at::Tensor& out) const override {
    const int64_t rows = c2.size(0), N = c2.size(1);
    const int32_t* cp = c2.data_ptr<int32_t>();
    const float* rp = row_stats.data_ptr<float>();
    const float* colp = col_stats.data_ptr<float>();
    const void* bp = bias.defined() ? bias.data_ptr() : nullptr;
    const FloatType bt = bias.defined() ? float_type(bias.scalar_type()) : FloatType::f32;
    const FloatType ot = float_type(out.scalar_type());
    void* op_ = out.data_ptr();
    at::parallel_for(0, rows, grain_for(N), [&](int64_t r0, int64_t r1) {
      cpu::int8_mm_dequant(cp, rp, colp, bt, bp, N, ot, op_, r0, r1);
    });
  }

  // The whole LLM.int8() forward (the int8_linear op on the CPU): outlier columns, row
  // quantization, the int8 GEMM and one epilogue pass. Without outliers the epilogue is
  // int8_mm_dequant straight into a2's dtype. With them, per block of rows: dequantize into fp32
  // (the output itself when it is fp32, else a block buffer that stays in cache), add the outlier
  // columns' fp32 product column by column (a rank-few update: BLAS addmm at k = 2..8 ran at a
  // third of memory speed and cost a separate pass over the output, plus one more to round it),
  // then round the block to a2's dtype.
  at::Tensor int8_linear(const at::Tensor& a2, const at::Tensor& w, const at::Tensor& w_scale,
                         const at::Tensor& bias, float threshold) const override {
    const int64_t M = a2.size(0), K = a2.size(1), N = w.size(0);
    std::vector<int64_t> cols;
    if (threshold > 0.0f) {
      at::Tensor mask = at::empty({K}, a2.options().dtype(at::kByte));
      int8_outlier_columns(a2, threshold, mask);
      cols = set_columns(mask);
    }
    at::Tensor q = at::empty({M, K}, a2.options().dtype(at::kChar));
    at::Tensor row_stats = at::empty({M}, a2.options().dtype(at::kFloat));
    quant_rows(a2, threshold, cols, q, row_stats);
    at::Tensor c = at::empty({M, N}, a2.options().dtype(at::kInt));
    int8_gemm(q, w, c);
    at::Tensor out = at::empty({M, N}, a2.options());
    if (cols.empty()) {
      int8_mm_dequant(c, row_stats, w_scale, bias, out);
      return out;
    }
    const int64_t nc = int64_t(cols.size());
    const at::Tensor idx = at::tensor(cols, a2.options().dtype(at::kLong));
    // a_out [M, nc]: the outlier activations; w_out [nc, N]: their weight columns dequantized,
    // w * (scale / 127) in fp32 as reference.int8_weight_dequant.
    const at::Tensor a_out = a2.index_select(1, idx).to(at::kFloat).contiguous();
    const at::Tensor w_out = (w.index_select(1, idx).to(at::kFloat) *
                              (w_scale.to(at::kFloat).reshape({N, 1}) * (1.0f / 127.0f)))
                                 .t()
                                 .contiguous();
    const int32_t* cp = c.data_ptr<int32_t>();
    const float* rp = row_stats.data_ptr<float>();
    const float* colp = w_scale.data_ptr<float>();
    const void* bp = bias.defined() ? bias.data_ptr() : nullptr;
    const FloatType bt = bias.defined() ? float_type(bias.scalar_type()) : FloatType::f32;
    const float* ao = a_out.data_ptr<float>();
    const float* wo = w_out.data_ptr<float>();
    const bool f32_out = out.scalar_type() == at::kFloat;
    // Rows per block: ~256 KiB of fp32, L2-resident between the passes, and few enough blocks
    // that the per-call cost of the ATen copy (~5 us) stays small.
    const int64_t block = std::max<int64_t>(1, 65536 / N);
    at::parallel_for(0, M, std::max(block, grain_for(N)), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(f32_out ? 0 : size_t(std::min(block, r1 - r0) * N));
      for (int64_t b0 = r0; b0 < r1; b0 += block) {
        const int64_t rows = std::min(block, r1 - b0);
        float* t = f32_out ? out.data_ptr<float>() + b0 * N : buf.data();
        cpu::int8_mm_dequant(cp + b0 * N, rp + b0, colp, bt, bp, N, FloatType::f32, t, 0, rows);
        for (int64_t r = 0; r < rows; ++r)
          add_outlier_product(ao + (b0 + r) * nc, wo, nc, t + r * N, N);
        if (!f32_out)
          out.narrow(0, b0, rows)
              .copy_(at::from_blob(t, {rows, N}, a2.options().dtype(at::kFloat)));
      }
    });
    return out;
  }

  // ---- affine 4/8-bit (issue #13) ----
  void quantize_affine(const at::Tensor& a, int64_t bits, int64_t group_size, bool symmetric,
                       at::Tensor& packed, at::Tensor& scales, at::Tensor& zeros) const override {
    const FloatType t = float_type(a.scalar_type());
    const void* ap = a.data_ptr();
    uint8_t* pp = packed.data_ptr<uint8_t>();
    float* sp = scales.data_ptr<float>();
    float* zp = zeros.data_ptr<float>();
    // 4-bit codes of an odd group size share bytes across groups: one task then.
    const int64_t groups = scales.numel();
    const int64_t grain = bits == 4 && group_size % 2 ? groups : grain_for(group_size);
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      cpu::quantize_affine(t, ap, group_size, int(bits), symmetric, pp, sp, zp, g0, g1);
    });
  }

  void dequantize_affine(const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group_size,
                         at::Tensor& out) const override {
    const cpu::AffineWeight w{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                              zeros.data_ptr<float>(), int(bits), group_size};
    const FloatType t = float_type(out.scalar_type());
    void* dp = out.data_ptr();
    prefer_huge_pages(dp, out.nbytes());
    at::parallel_for(0, scales.numel(), grain_for(group_size),
                     [&](int64_t g0, int64_t g1) { cpu::dequantize_affine(w, t, dp, g0, g1); });
  }

  void gemm_affine(const at::Tensor& a2, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& zeros, int64_t bits, int64_t group_size,
                   const at::Tensor& bias, at::Tensor& out) const override {
    const int64_t M = a2.size(0), N = out.size(1);
    // fp32 accumulation (as gemv_4bit) + bias in fp32; one rounding to out's dtype.
    at::Tensor acc =
        out.scalar_type() == at::kFloat ? out : at::empty({M, N}, out.options().dtype(at::kFloat));
    const cpu::AffineWeight w{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                              zeros.data_ptr<float>(), int(bits), group_size};
    cpu_gemm_affine(a2, w, acc);
    if (bias.defined()) acc.add_(bias.to(at::kFloat));
    if (!acc.is_same(out)) out.copy_(acc);
  }
};

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace lowbit::ops
