// Checks for the 4-bit ops, shared by the CPU and CUDA wrappers.
#pragma once

#include "lowbit/codebook.h"
#include "ops/common.h"

namespace lowbit::ops {

constexpr int64_t kMin4bitBlock = 32, kMax4bitBlock = 4096;

inline QuantType4 parse_quant_type(const char* op, c10::string_view quant_type) {
  if (quant_type == "nf4") return QuantType4::nf4;
  if (quant_type == "fp4") return QuantType4::fp4;
  TORCH_CHECK_VALUE(false, "lowbit.", op, ": quant_type must be 'nf4' or 'fp4', got '",
                    std::string(quant_type), "'");
}

// Storage dtypes reinterpret the packed bytes; nbytes must fill whole storage elements.
inline int64_t packed_storage_elems(const char* op, int64_t nbytes, at::ScalarType storage) {
  const bool ok = storage == at::kByte || storage == at::kChar || storage == at::kShort ||
                  storage == at::kInt || storage == at::kHalf || storage == at::kBFloat16 ||
                  storage == at::kFloat;
  TORCH_CHECK_TYPE(ok, "lowbit.", op,
                   ": quant_storage must be one of uint8, int8, int16, int32, float16, bfloat16, "
                   "float32, got ",
                   dtype_name(storage));
  const int64_t item = c10::elementSize(storage);
  TORCH_CHECK_VALUE(nbytes % item == 0, "lowbit.", op, ": the ", nbytes,
                    " packed bytes do not fill whole ", dtype_name(storage),
                    " elements; use quant_storage=torch.uint8 for this size");
  return nbytes / item;
}

inline int64_t check_shape(const char* op, at::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "lowbit.", op, ": shape entries must be >= 0, got ", shape);
    TORCH_CHECK_VALUE(s == 0 || n <= INT64_MAX / s, "lowbit.", op, ": shape ", shape,
                      " overflows int64");
    n *= s;
  }
  return n;
}

// A packed 4-bit tensor of logical shape `shape` with its fp32 absmax; returns the element count.
inline int64_t check_4bit_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, at::IntArrayRef shape) {
  check_blocksize(op, blocksize, kMin4bitBlock, kMax4bitBlock);
  const int64_t n = check_shape(op, shape);
  packed_storage_elems(op, packed.numel() * packed.element_size(), packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() * packed.element_size() == (n + 1) / 2, "lowbit.", op,
                    ": the packed data must hold ceil(", n, " / 2) = ", (n + 1) / 2,
                    " bytes for shape ", shape, ", got ", packed.numel() * packed.element_size());
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_device(op, "absmax", absmax, packed, "the packed data");
  TORCH_CHECK_VALUE(absmax.numel() == ceil_div(n, blocksize), "lowbit.", op,
                    ": absmax must hold ceil(", n, " / ", blocksize, ") = ", ceil_div(n, blocksize),
                    " values, got ", absmax.numel());
  return n;
}

}  // namespace lowbit::ops
