// Argument checks and small helpers shared by the ops and their backends. Every failed check raises
// a Python exception (TypeError for dtypes, ValueError for everything else) that names the op, the
// argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "lowbit/numeric.h"

namespace lowbit::ops {

// torch's Python spelling ("torch.float32"), so messages read like the user's code.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kDouble:
      return "torch.float64";
    case at::kByte:
      return "torch.uint8";
    case at::kChar:
      return "torch.int8";
    case at::kShort:
      return "torch.int16";
    case at::kInt:
      return "torch.int32";
    case at::kLong:
      return "torch.int64";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FloatType::f32;
    case at::kHalf:
      return FloatType::f16;
    default:
      return FloatType::bf16;
  }
}

inline void check_float(const char* op, const char* arg, at::ScalarType t) {
  TORCH_CHECK_TYPE(is_float_type(t), "lowbit.", op, ": ", arg,
                   " must be float32, float16 or bfloat16, got ", dtype_name(t));
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "lowbit.", op, ": ", arg, " must be ",
                   dtype_name(expected), ", got ", dtype_name(t.scalar_type()));
}

inline void check_device(const char* op, const char* arg, const at::Tensor& t,
                         const at::Tensor& ref, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "lowbit.", op, ": ", arg, " is on ", t.device(),
                    " but ", ref_arg, " is on ", ref.device(), "; move them to one device");
}

// Power of two in [lo, hi].
inline void check_blocksize(const char* op, int64_t blocksize, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(blocksize >= lo && blocksize <= hi && (blocksize & (blocksize - 1)) == 0,
                    "lowbit.", op, ": blocksize must be a power of two in [", lo, ", ", hi,
                    "], got ", blocksize);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Rows of a tensor seen as [rows, last dim]: the product of all but the last dimension.
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return rows;
}

// Grain sizes for at::parallel_for: enough work per task that scheduling is noise.
inline int64_t grain_for(int64_t work_per_item, int64_t target = 32768) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_item));
}

}  // namespace lowbit::ops
