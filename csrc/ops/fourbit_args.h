// Checks for the 4-bit ops, shared by the CPU and CUDA wrappers.
#pragma once

#include <optional>

#include "lowbit/codebook.h"
#include "ops/backend.h"
#include "ops/common.h"

namespace lowbit::ops {

constexpr int64_t kMin4bitBlock = 32, kMax4bitBlock = 4096;
// Double quantization re-quantizes the absmax with the 8-bit blockwise kernels' block sizes.
constexpr int64_t kMinNestedBlock = 64, kMaxNestedBlock = 4096;

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

// A packed 4-bit tensor of logical shape `shape` with its absmax: fp32, or the uint8 codes of a
// double quantized absmax (nested = true); returns the element count.
inline int64_t check_4bit_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, at::IntArrayRef shape, bool nested = false) {
  check_blocksize(op, blocksize, kMin4bitBlock, kMax4bitBlock);
  const int64_t n = check_shape(op, shape);
  packed_storage_elems(op, packed.numel() * packed.element_size(), packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() * packed.element_size() == (n + 1) / 2, "lowbit.", op,
                    ": the packed data must hold ceil(", n, " / 2) = ", (n + 1) / 2,
                    " bytes for shape ", shape, ", got ", packed.numel() * packed.element_size());
  if (nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, "lowbit.", op,
                     ": absmax must be torch.uint8 (one code per block) when nested_absmax is "
                     "given, got ",
                     dtype_name(absmax.scalar_type()));
  } else {
    check_dtype(op, "absmax", absmax, at::kFloat);
  }
  check_device(op, "absmax", absmax, packed, "the packed data");
  TORCH_CHECK_VALUE(absmax.numel() == ceil_div(n, blocksize), "lowbit.", op,
                    ": absmax must hold ceil(", n, " / ", blocksize, ") = ", ceil_div(n, blocksize),
                    " values, got ", absmax.numel());
  return n;
}

// The double quantization arguments of a 4-bit op (QLoRA's compress_statistics): without
// nested_absmax the others must keep their defaults; with it, absmax holds `blocks` uint8 codes
// (checked by check_4bit_weight), nested_absmax one fp32 per nested_blocksize codes and
// nested_code the 256-entry fp32 code, all on the packed data's device. Returns the checked
// state, contiguous (undefined when not nested).
inline NestedAbsmax check_nested_absmax(const char* op, const at::Tensor& packed, int64_t blocks,
                                        const std::optional<at::Tensor>& nested_absmax,
                                        const std::optional<at::Tensor>& nested_code,
                                        double nested_offset, int64_t nested_blocksize) {
  NestedAbsmax nested;
  if (!nested_absmax.has_value()) {
    TORCH_CHECK_VALUE(!nested_code.has_value() && nested_offset == 0.0 && nested_blocksize == 256,
                      "lowbit.", op,
                      ": nested_code, nested_offset and nested_blocksize are only used with "
                      "nested_absmax (double quantization); pass nested_absmax too");
    return nested;
  }
  const at::Tensor& a2 = *nested_absmax;
  TORCH_CHECK_VALUE(nested_code.has_value(), "lowbit.", op,
                    ": nested_code (the 256-entry code of the nested absmax) is required with "
                    "nested_absmax");
  const at::Tensor& c2 = *nested_code;
  TORCH_CHECK_VALUE(nested_blocksize >= kMinNestedBlock && nested_blocksize <= kMaxNestedBlock &&
                        (nested_blocksize & (nested_blocksize - 1)) == 0,
                    "lowbit.", op, ": nested_blocksize must be a power of two in [",
                    kMinNestedBlock, ", ", kMaxNestedBlock, "], got ", nested_blocksize);
  check_dtype(op, "nested_absmax", a2, at::kFloat);
  check_device(op, "nested_absmax", a2, packed, "the packed data");
  TORCH_CHECK_VALUE(a2.numel() == ceil_div(blocks, nested_blocksize), "lowbit.", op,
                    ": nested_absmax must hold ceil(", blocks, " / ", nested_blocksize,
                    ") = ", ceil_div(blocks, nested_blocksize), " values (one per ",
                    nested_blocksize, " absmax codes), got ", a2.numel());
  check_dtype(op, "nested_code", c2, at::kFloat);
  check_device(op, "nested_code", c2, packed, "the packed data");
  TORCH_CHECK_VALUE(c2.numel() == 256, "lowbit.", op, ": nested_code must hold 256 values, got ",
                    c2.numel());
  nested.absmax = a2.contiguous();
  nested.code = c2.contiguous();
  nested.offset = static_cast<float>(nested_offset);
  nested.blocksize = nested_blocksize;
  return nested;
}

}  // namespace lowbit::ops
