// The optimizer element loop with AVX2 (+FMA+F16C): optim_update_element (lowbit/optim.h) on 8
// lanes, with the same fp32 operations in the same order (no FMA: this file builds with
// -ffp-contract=off and spells every multiply and add), so results are bit-identical to the
// generic loop. Tails of fewer than 8 elements run the scalar code itself.
#include <cstring>

#include "avx2_util.h"
#include "kernels.h"
#include "load_store.h"
#include "lowbit/optim.h"

namespace lowbit::cpu::avx2 {

namespace {

using simd::load8;

inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }

// lowbias32 (optim.h) on 8 lanes.
inline __m256i lowbias32_8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x7feb352du)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// Parameter stores: round to nearest even (simd::store8, bit-identical to from_float), or for bf16
// with stochastic rounding the bits of to_bfloat16_stochastic(v, sr_bits(seed, i + lane)).
template <typename P>
inline void store_p8(const OptimScalars&, P* p, int64_t i, __m256 v) {
  simd::store8(p + i, v);
}
template <>
inline void store_p8<bfloat16_t>(const OptimScalars& s, bfloat16_t* p, int64_t i, __m256 v) {
  if (!s.stochastic) return simd::store8(p + i, v);
  if ((uint64_t(i) >> 32) != (uint64_t(i + 7) >> 32)) {  // the 8 lanes straddle a 2^32 boundary
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int k = 0; k < 8; ++k) store_param(s, p, i + k, tmp[k]);
    return;
  }
  const uint32_t key = lowbias32(s.seed + uint32_t(uint64_t(i) >> 32) * 0x9e3779b9u);
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int32_t(uint32_t(uint64_t(i)))),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i rnd = lowbias32_8(_mm256_xor_si256(idx, _mm256_set1_epi32(int32_t(key))));
  const __m256i u = _mm256_castps_si256(v);
  const __m256i sr =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_and_si256(rnd, _mm256_set1_epi32(0xffff))), 16);
  // Non-finite lanes (exponent all ones) take the round-to-nearest-even bits.
  const __m256i expo = _mm256_and_si256(u, _mm256_set1_epi32(0x7f800000));
  const __m256i nonfinite = _mm256_cmpeq_epi32(expo, _mm256_set1_epi32(0x7f800000));
  const __m256i w = _mm256_blendv_epi8(sr, simd::to_bf16_bits(v), nonfinite);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_castsi256_si128(packed));
}

template <OptimKind K, typename G, typename P>
void elems_impl(const OptimScalars& s, const G* g, P* p, float* m, float* v, int64_t begin,
                int64_t len) {
  const __m256 b1 = _mm256_set1_ps(s.beta1), nb1 = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 b2 = _mm256_set1_ps(s.beta2), nb2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 eps = _mm256_set1_ps(s.eps), c2 = _mm256_set1_ps(s.correction2);
  const __m256 ss = _mm256_set1_ps(s.step_size), decay = _mm256_set1_ps(s.decay);
  const __m256 wd = _mm256_set1_ps(s.weight_decay), gs = _mm256_set1_ps(s.gnorm_scale);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  const bool has_wd = s.weight_decay > 0.0f;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const int64_t i = begin + j;
    const __m256 g_in = load8(g + i);
    const __m256 p_old = load8(p + i);
    const __m256 m_old = _mm256_loadu_ps(m + j);
    __m256 gv = mul(g_in, gs), pv = p_old, mv = m_old;
    if constexpr (K == OptimKind::adam) {
      const __m256 v_old = _mm256_loadu_ps(v + j);
      mv = add(mul(mv, b1), mul(gv, nb1));
      __m256 vv = add(mul(v_old, b2), mul(mul(nb2, gv), gv));
      const __m256 denom = add(_mm256_div_ps(_mm256_sqrt_ps(vv), c2), eps);
      if (has_wd) pv = mul(pv, decay);
      pv = add(pv, mul(ss, _mm256_div_ps(mv, denom)));
      if (s.skip_zeros) vv = _mm256_blendv_ps(vv, v_old, _mm256_cmp_ps(g_in, zero, _CMP_EQ_OQ));
      _mm256_storeu_ps(v + j, vv);
    } else if constexpr (K == OptimKind::momentum) {
      if (has_wd) gv = add(gv, mul(pv, wd));
      mv = s.first_step ? gv : add(mul(mv, b1), gv);
      pv = add(pv, mul(ss, mv));
    } else if constexpr (K == OptimKind::rmsprop) {
      if (has_wd) gv = add(gv, mul(pv, wd));
      mv = add(mul(mv, b1), mul(mul(nb1, gv), gv));
      pv = add(pv, mul(ss, _mm256_div_ps(gv, add(_mm256_sqrt_ps(mv), eps))));
    } else {  // lion
      if (has_wd) pv = mul(pv, decay);
      const __m256 u = add(mul(mv, b1), mul(gv, nb1));
      const __m256 sgn = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_GT_OQ), one),
                                      _mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_LT_OQ), minus_one));
      pv = add(pv, mul(ss, sgn));
      mv = add(mul(mv, b2), mul(gv, nb2));
    }
    if (s.skip_zeros) {
      const __m256 z = _mm256_cmp_ps(g_in, zero, _CMP_EQ_OQ);
      mv = _mm256_blendv_ps(mv, m_old, z);
      pv = _mm256_blendv_ps(pv, p_old, z);
    }
    _mm256_storeu_ps(m + j, mv);
    store_p8(s, p, i, pv);
  }
  float dummy = 0.0f;
  for (; j < len; ++j) {
    const int64_t i = begin + j;
    float pv = to_float(p[i]);
    optim_update_element(s, to_float(g[i]), pv, m[j], v ? v[j] : dummy);
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
      const G* gp = static_cast<const G*>(g);
      P* pp = static_cast<P*>(p);
      switch (s.kind) {
        case OptimKind::adam:
          return elems_impl<OptimKind::adam>(s, gp, pp, m, v, begin, len);
        case OptimKind::momentum:
          return elems_impl<OptimKind::momentum>(s, gp, pp, m, v, begin, len);
        case OptimKind::rmsprop:
          return elems_impl<OptimKind::rmsprop>(s, gp, pp, m, v, begin, len);
        case OptimKind::lion:
          return elems_impl<OptimKind::lion>(s, gp, pp, m, v, begin, len);
      }
    });
  });
}

bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end) {
  bool bad = false;
  float m;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    simd::absmax_scan_bits(static_cast<const T*>(a) + begin, end - begin, m, bad);
  });
  return !bad;
}

}  // namespace lowbit::cpu::avx2
