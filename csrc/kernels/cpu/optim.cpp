// 8-bit and 32-bit optimizer updates (lowbit/cpu_kernels.h): the generic per-element loop, the
// blockwise driver, and the choice of ISA for the element loop.
//
// The 8-bit driver works on chunks of up to kChunkBlocks blocks: it decodes the chunk's states
// with dequantize_blockwise into two fp32 arrays on the stack (16 KiB each, in L1/L2), runs the
// element loop over the chunk, and quantizes the states back with quantize_blockwise (new absmax
// per block). The states never exist as fp32 tensors; the codes are exactly those of
// quantize_blockwise on the updated fp32 values, which is what the reference computes.
#include "lowbit/optim.h"

#include <algorithm>

#include "kernels.h"
#include "load_store.h"
#include "lowbit/cpu_isa.h"

namespace lowbit::cpu {

// The element loops: elements [begin, begin + len) of g and p (base pointers of the whole
// tensors, so that the stochastic-rounding hash sees the flat index); m[j], v[j] hold the states
// of element begin + j (v null for one-state optimizers).
namespace generic {
void optim_elems(const OptimScalars& s, FloatType gt, const void* g, FloatType pt, void* p,
                 float* m, float* v, int64_t begin, int64_t len);
bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end);
}  // namespace generic
#if defined(LOWBIT_CPU_X86)
namespace avx2 {
void optim_elems(const OptimScalars& s, FloatType gt, const void* g, FloatType pt, void* p,
                 float* m, float* v, int64_t begin, int64_t len);
bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end);
}  // namespace avx2
#endif

namespace generic {

namespace {

template <typename G, typename P>
void elems_impl(const OptimScalars& s, const G* g, P* p, float* m, float* v, int64_t begin,
                int64_t len) {
  float dummy = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = begin + j;
    float pv = to_float(p[i]);
    float& vj = v ? v[j] : dummy;
    optim_update_element(s, to_float(g[i]), pv, m[j], vj);
    // skip_zeros leaves p untouched, and a parameter that was not updated is not rewritten (a
    // stochastic rounding of an unchanged bf16 value would be exact anyway).
    store_param(s, p, i, pv);
  }
}

}  // namespace

void optim_elems(const OptimScalars& s, FloatType gt, const void* g, FloatType pt, void* p,
                 float* m, float* v, int64_t begin, int64_t len) {
  dispatch_float(gt, [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_float(pt, [&](auto ptag) {
      using P = decltype(ptag);
      elems_impl(s, static_cast<const G*>(g), static_cast<P*>(p), m, v, begin, len);
    });
  });
}

bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end) {
  bool ok = true;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a);
    for (int64_t i = begin; i < end; ++i)
      ok = ok && (abs_f(to_float(x[i])) <= 3.4028234663852886e38f);
  });
  return ok;
}

}  // namespace generic

namespace {

void elems(const OptimScalars& s, FloatType gt, const void* g, FloatType pt, void* p, float* m,
           float* v, int64_t begin, int64_t len) {
#if defined(LOWBIT_CPU_X86)
  if (active_isa() != Isa::generic) return avx2::optim_elems(s, gt, g, pt, p, m, v, begin, len);
#endif
  generic::optim_elems(s, gt, g, pt, p, m, v, begin, len);
}

constexpr int64_t kChunkBlocks = 16;

}  // namespace

void optimizer_update_8bit_blockwise(const OptimScalars& s, FloatType gt, const void* g,
                                     FloatType pt, void* p, int64_t n, const OptimState8& s1,
                                     const OptimState8* s2, int64_t block_begin,
                                     int64_t block_end) {
  constexpr int64_t bs = kOptimBlock;
  alignas(64) float m[kChunkBlocks * bs];
  alignas(64) float v[kChunkBlocks * bs];
  for (int64_t b = block_begin; b < block_end; b += kChunkBlocks) {
    const int64_t nb = std::min(kChunkBlocks, block_end - b);
    const int64_t start = b * bs, len = std::min(n, (b + nb) * bs) - start;
    // The chunk as a tensor of its own: codes from start, absmax from block b, blocks [0, nb).
    dequantize_blockwise(s1.q + start, s1.absmax + b, s1.code256, len, bs, FloatType::f32, m, 0,
                         nb);
    if (s2)
      dequantize_blockwise(s2->q + start, s2->absmax + b, s2->code256, len, bs, FloatType::f32, v,
                           0, nb);
    elems(s, gt, g, pt, p, m, s2 ? v : nullptr, start, len);
    quantize_blockwise(FloatType::f32, m, len, bs, s1.bound255, s1.zero_code, s1.q + start,
                       s1.absmax + b, 0, nb);
    if (s2)
      quantize_blockwise(FloatType::f32, v, len, bs, s2->bound255, s2->zero_code, s2->q + start,
                         s2->absmax + b, 0, nb);
  }
}

void optimizer_update_32bit(const OptimScalars& s, FloatType gt, const void* g, FloatType pt,
                            void* p, float* s1, float* s2, int64_t begin, int64_t end) {
  elems(s, gt, g, pt, p, s1 + begin, s2 ? s2 + begin : nullptr, begin, end - begin);
}

bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end) {
#if defined(LOWBIT_CPU_X86)
  if (active_isa() != Isa::generic) return avx2::all_finite(t, a, begin, end);
#endif
  return generic::all_finite(t, a, begin, end);
}

}  // namespace lowbit::cpu
