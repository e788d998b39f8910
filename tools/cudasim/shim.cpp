// C-ABI wrappers around the entry points of lowbit/cuda_kernels.h, with flat arguments, so that
// the tests can call the simulated kernels through ctypes on CPU tensors' data pointers. Each
// returns the entry point's cudaError_t as an int (0: success).
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"

using namespace lowbit;
using namespace lowbit::cuda;

namespace {
FloatType ft(int t) { return static_cast<FloatType>(t); }

// The scales of a 4-bit weight: plain fp32 absmax, or nested (absmax == null).
BlockAbsmax scales_of(const float* absmax, const uint8_t* code_index, const float* nested_absmax,
                      const float* nested_code, float nested_offset, int nested_log2) {
  if (absmax != nullptr) return BlockAbsmax::plain(absmax);
  BlockAbsmax s;
  s.code_index = code_index;
  s.nested_absmax = nested_absmax;
  s.nested_code = nested_code;
  s.nested_offset = nested_offset;
  s.nested_log2 = nested_log2;
  return s;
}
}  // namespace

extern "C" {

// ---- 8-bit blockwise ----------------------------------------------------------------------------
int lb_quantize_blockwise(int t, const void* a, int64_t n, int64_t blocksize, const float* code256,
                          uint8_t* q, float* absmax) {
  return quantize_blockwise(ft(t), a, n, blocksize, code256, q, absmax, nullptr);
}
int lb_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                            int64_t blocksize, int t, void* out) {
  return dequantize_blockwise(q, absmax, code256, n, blocksize, ft(t), out, nullptr);
}

// ---- 4-bit
// ---------------------------------------------------------------------------------------- code16:
// the 16 code values by nibble (the Codebook16 is built as the CPU wrapper builds it).
int lb_quantize_4bit(int t, const void* a, int64_t n, int64_t blocksize, const float* code16,
                     uint8_t* packed, float* absmax) {
  const Codebook16 cb = make_codebook16(code16);
  return quantize_4bit(ft(t), a, n, blocksize, cb, packed, absmax, nullptr);
}
int lb_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t n,
                       int64_t blocksize, int t, void* out) {
  Code16 c;
  for (int i = 0; i < 16; ++i) c.v[i] = code16[i];
  return dequantize_4bit(packed, absmax, c, n, blocksize, ft(t), out, nullptr);
}
int lb_dequantize_4bit_weight(const uint8_t* packed, const float* absmax, const uint8_t* code_index,
                              const float* nested_absmax, const float* nested_code,
                              float nested_offset, int nested_log2, const float* code16, int64_t n,
                              int64_t blocksize, int t, void* out) {
  return dequantize_4bit_weight(
      packed, scales_of(absmax, code_index, nested_absmax, nested_code, nested_offset, nested_log2),
      code16, n, blocksize, ft(t), out, nullptr);
}
// plan: out[0] tier, out[1] config, out[2] split; *workspace_floats.
void lb_plan_gemm_4bit(int t, int64_t M, int64_t N, int64_t K, int a_aligned16,
                       int packed_aligned16, int cc, int sm_count, const char* force, int* out,
                       int64_t* workspace_floats) {
  const Gemm4Plan p =
      plan_gemm_4bit(ft(t), M, N, K, a_aligned16 != 0, packed_aligned16 != 0, cc, sm_count, force);
  out[0] = int(p.tier);
  out[1] = p.config;
  out[2] = p.split;
  *workspace_floats = p.workspace_floats;
}
int lb_gemm_4bit(int tier, int config, int split, int64_t workspace_floats, int t, const void* a,
                 int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                 const uint8_t* code_index, const float* nested_absmax, const float* nested_code,
                 float nested_offset, int nested_log2, const float* code16, int64_t blocksize,
                 void* out, int64_t N, float* workspace) {
  Gemm4Plan p;
  p.tier = static_cast<Gemm4Tier>(tier);
  p.config = config;
  p.split = split;
  p.workspace_floats = workspace_floats;
  return gemm_4bit(
      p, ft(t), a, M, K, packed,
      scales_of(absmax, code_index, nested_absmax, nested_code, nested_offset, nested_log2), code16,
      blocksize, out, N, workspace, nullptr);
}

}  // extern "C"
