// The fused optimizer updates of lowbit.optim (schemas in registration.cpp): one op call updates a
// list of parameters with their 8-bit blockwise (or fp32) states in place.
//
// Self-contained on purpose (no Backend hook in ops/backend.h): it checks the arguments, then runs
// the torch-free kernels of the tensors' device, the CPU ones spread over torch's thread pool, the
// CUDA ones (with LOWBIT_WITH_CUDA) as one multi-tensor launch per dtype pair on the current
// stream.
//
// Non-finite gradients: a parameter whose gradient holds NaN or +-Inf is not updated at all
// (parameter, states and absmax untouched); the op returns a bool per parameter, false for those,
// and the Python optimizer warns, naming the parameter, and does not count the step for it.
#include "lowbit/optim.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "lowbit/cpu_kernels.h"
#include "ops/common.h"
#include "ops/ops.h"

#ifdef LOWBIT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lowbit/cuda_kernels.h"
#endif

namespace lowbit::ops {

namespace {

constexpr int64_t kBlock = cpu::kOptimBlock;  // 256, bitsandbytes' optimizer blocksize

OptimKind parse_kind(const char* op, c10::string_view name) {
  if (name == "adam") return OptimKind::adam;
  if (name == "momentum") return OptimKind::momentum;
  if (name == "rmsprop") return OptimKind::rmsprop;
  if (name == "lion") return OptimKind::lion;
  TORCH_CHECK_VALUE(false, "lowbit.", op,
                    ": optimizer_name must be 'adam', 'momentum', 'rmsprop' or 'lion', got '",
                    std::string(name), "'");
  return OptimKind::adam;
}

bool two_states(OptimKind k) { return k == OptimKind::adam; }

std::string item(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

void check_list_len(const char* op, const char* arg, at::TensorList l, size_t n) {
  TORCH_CHECK_VALUE(l.size() == n, "lowbit.", op, ": ", arg, " must hold ", n,
                    " tensors (one per parameter), got ", l.size());
}

// A state tensor of parameter i: dtype, device, element count, contiguity.
void check_state(const char* op, const std::string& arg, const at::Tensor& t, at::ScalarType dt,
                 int64_t numel, const at::Tensor& p, size_t i) {
  check_dtype(op, arg.c_str(), t, dt);
  check_device(op, arg.c_str(), t, p, item("p", i).c_str());
  TORCH_CHECK_VALUE(t.numel() == numel, "lowbit.", op, ": ", arg, " must hold ", numel,
                    " elements, got ", t.numel());
  TORCH_CHECK_VALUE(t.is_contiguous(), "lowbit.", op, ": ", arg,
                    " must be contiguous (it is updated in place)");
}

// g[i] and p[i]: float types, one device, one size; p updated in place so contiguous.
void check_param(const char* op, const at::Tensor& g, const at::Tensor& p, size_t i,
                 const at::Tensor& first) {
  check_float(op, item("g", i).c_str(), g.scalar_type());
  check_float(op, item("p", i).c_str(), p.scalar_type());
  check_device(op, item("g", i).c_str(), g, p, item("p", i).c_str());
  check_device(op, item("p", i).c_str(), p, first, "p[0]");
  TORCH_CHECK_VALUE(g.numel() == p.numel(), "lowbit.", op, ": g[", i, "] has ", g.numel(),
                    " elements but p[", i, "] has ", p.numel());
  TORCH_CHECK_VALUE(p.is_contiguous(), "lowbit.", op, ": p[", i,
                    "] must be contiguous (it is updated in place)");
}

void check_scalars(const char* op, int64_t step, double lr, double eps, double beta1,
                   double beta2) {
  TORCH_CHECK_VALUE(step >= 1, "lowbit.", op, ": step must be >= 1, got ", step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, "lowbit.", op,
                    ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "lowbit.", op,
                    ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "lowbit.", op, ": beta1 must be in [0, 1), got ",
                    beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "lowbit.", op, ": beta2 must be in [0, 1), got ",
                    beta2);
}

// Tensor i of a list uses seed + i * golden ratio (mod 2^32), so parameters of one call do not
// share their random bits. -1: stochastic rounding off.
int64_t seed_for(int64_t sr_seed, size_t i) {
  if (sr_seed < 0) return -1;
  return int64_t((uint64_t(sr_seed) + uint64_t(i) * 0x9e3779b9u) & 0xffffffffu);
}

// The quantization rule of a 256-entry code on the host (as the CPU quantize_blockwise does).
struct HostCode {
  float bound[255];
  uint8_t zero_code = 0;
};
HostCode host_code(const char* op, const char* arg, const at::Tensor& code) {
  HostCode h;
  const float* cv = code.data_ptr<float>();
  for (int i = 0; i < 255; ++i) {
    TORCH_CHECK_VALUE(cv[i] <= cv[i + 1], "lowbit.", op, ": ", arg,
                      " must be sorted ascending (entry ", i + 1, " is below entry ", i, ")");
    h.bound[i] = (cv[i] + cv[i + 1]) / 2.0f;
  }
  for (int i = 1; i < 256; ++i)
    if (std::fabs(cv[i]) < std::fabs(cv[h.zero_code])) h.zero_code = uint8_t(i);
  return h;
}

void check_qmap(const char* op, const char* arg, const at::Tensor& q, const at::Tensor& p0) {
  check_dtype(op, arg, q, at::kFloat);
  check_device(op, arg, q, p0, "p[0]");
  TORCH_CHECK_VALUE(q.numel() == 256, "lowbit.", op, ": ", arg,
                    " must hold 256 values (an 8-bit code), got ", q.numel());
}

bool cpu_all_finite(const at::Tensor& g) {
  std::atomic<bool> ok{true};
  const FloatType t = float_type(g.scalar_type());
  const void* gp = g.data_ptr();
  at::parallel_for(0, g.numel(), 65536, [&](int64_t b, int64_t e) {
    if (ok.load(std::memory_order_relaxed) && !cpu::all_finite(t, gp, b, e)) ok = false;
  });
  return ok.load();
}

// The CPU loop over the parameters of one call: skip those whose gradient holds NaN/Inf (applied
// = false), give each its stochastic-rounding seed, and run update(i, scalars, contiguous g).
template <typename Update>
void cpu_for_each_param(const OptimScalars& base, int64_t sr_seed, at::TensorList g,
                        at::Tensor& applied, Update update) {
  bool* ap = applied.data_ptr<bool>();
  for (size_t i = 0; i < g.size(); ++i) {
    const at::Tensor gi = g[i].contiguous();
    if (!cpu_all_finite(gi)) {
      ap[i] = false;
      continue;
    }
    OptimScalars s = base;
    const int64_t seed = seed_for(sr_seed, i);
    s.stochastic = seed >= 0;
    s.seed = uint32_t(seed);
    update(i, s, gi);
  }
}

}  // namespace

#ifdef LOWBIT_WITH_CUDA
namespace {

// The CUDA half: one multi-tensor launch sequence per (gradient type, parameter type) pair on the
// current stream, with no host synchronisation and no host-to-device copy (the descriptors travel
// as kernel arguments, optim.cu), so a step can be captured in a CUDA graph: a first kernel flags
// parameters whose gradient holds NaN/Inf in one int32 flags array of the call (each descriptor
// carries its own index into it, whatever its dtype group), the update kernels skip them, and the
// returned `applied` is computed on the device from the flags. The maps' quantization rule
// (midpoints, zero code) is derived inside the 8-bit kernel from the maps themselves, exactly as
// host_code does on the CPU; the order of the maps is not checked here (that would synchronise
// every step): the optimizers pass the dynamic maps, and an unsorted map gives wrong codes, never
// out-of-range accesses.
at::Tensor cuda_update(const OptimScalars& s, int64_t sr_seed, at::TensorList g, at::TensorList p,
                       at::TensorList s1, at::TensorList s2, at::TensorList a1, at::TensorList a2,
                       const at::Tensor& qmap1, const at::Tensor& qmap2, bool eight_bit) {
  const size_t np = p.size();
  // The stream of the device the caller's guard has made current (p[0]'s).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor flags = at::zeros({int64_t(np)}, p[0].options().dtype(at::kInt));
  int* fp = flags.data_ptr<int>();
  std::vector<at::Tensor> grads(np);  // keeps contiguous copies alive until the launches
  std::vector<cuda::OptimTensor> desc(np);
  for (size_t i = 0; i < np; ++i) {
    grads[i] = g[i].contiguous();
    cuda::OptimTensor& d = desc[i];
    d.g = grads[i].data_ptr();
    d.p = p[i].data_ptr();
    d.state1 = s1[i].data_ptr();
    d.state2 = s2.empty() ? nullptr : s2[i].data_ptr();
    d.absmax1 = a1.empty() ? nullptr : a1[i].data_ptr<float>();
    d.absmax2 = a2.empty() ? nullptr : a2[i].data_ptr<float>();
    d.n = p[i].numel();
    // The same per-tensor seed as the CPU path (seed_for of the tensor's index in the op's list),
    // so stochastic rounding draws the same bits on both devices.
    d.seed = uint32_t(seed_for(sr_seed, i));
    d.flag = int(i);
  }
  OptimScalars sc = s;
  sc.stochastic = sr_seed >= 0;
  // Tensors of one dtype pair go to one call (kernels are compiled per pair).
  std::vector<std::vector<cuda::OptimTensor>> groups;
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys;
  for (size_t i = 0; i < np; ++i) {
    const auto key = std::make_pair(grads[i].scalar_type(), p[i].scalar_type());
    size_t k = 0;
    while (k < keys.size() && keys[k] != key) ++k;
    if (k == keys.size()) keys.push_back(key), groups.emplace_back();
    groups[k].push_back(desc[i]);
  }
  for (size_t k = 0; k < keys.size(); ++k) {
    const std::vector<cuda::OptimTensor>& part = groups[k];
    const FloatType gt = float_type(keys[k].first), pt = float_type(keys[k].second);
    C10_CUDA_CHECK(cuda::optim_nonfinite_flags(gt, part.data(), int(part.size()), fp, stream));
    if (eight_bit) {
      C10_CUDA_CHECK(cuda::optimizer_update_8bit_blockwise(
          sc, gt, pt, part.data(), int(part.size()), qmap1.data_ptr<float>(),
          qmap2.defined() ? qmap2.data_ptr<float>() : nullptr, fp, stream));
    } else {
      C10_CUDA_CHECK(
          cuda::optimizer_update_32bit(sc, gt, pt, part.data(), int(part.size()), fp, stream));
    }
  }
  return flags.eq(0);
}

}  // namespace
#endif

at::Tensor optimizer_update_8bit_blockwise(
    c10::string_view optimizer_name, at::TensorList g, at::TensorList p, at::TensorList state1,
    at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, double beta1, double beta2, double eps, int64_t step,
    double lr, double weight_decay, double gnorm_scale, bool skip_zeros, int64_t sr_seed) {
  const char* op = "optimizer_update_8bit_blockwise";
  const OptimKind kind = parse_kind(op, optimizer_name);
  const bool two = two_states(kind);
  const size_t np = p.size();
  check_list_len(op, "g", g, np);
  check_list_len(op, "state1", state1, np);
  check_list_len(op, "absmax1", absmax1, np);
  check_list_len(op, "state2", state2, two ? np : 0);
  check_list_len(op, "absmax2", absmax2, two ? np : 0);
  check_scalars(op, step, lr, eps, beta1, beta2);
  if (np == 0) return at::empty({0}, qmap1.options().dtype(at::kBool));
  check_qmap(op, "qmap1", qmap1, p[0]);
  TORCH_CHECK_VALUE(!two || qmap2.has_value(), "lowbit.", op, ": optimizer '",
                    std::string(optimizer_name), "' keeps two states: qmap2 is required");
  if (two) check_qmap(op, "qmap2", *qmap2, p[0]);
  for (size_t i = 0; i < np; ++i) {
    check_param(op, g[i], p[i], i, p[0]);
    const int64_t n = p[i].numel(), blocks = ceil_div(n, kBlock);
    check_state(op, item("state1", i), state1[i], at::kByte, n, p[i], i);
    check_state(op, item("absmax1", i), absmax1[i], at::kFloat, blocks, p[i], i);
    if (two) {
      check_state(op, item("state2", i), state2[i], at::kByte, n, p[i], i);
      check_state(op, item("absmax2", i), absmax2[i], at::kFloat, blocks, p[i], i);
    }
  }
  const OptimScalars base = make_optim_scalars(kind, beta1, beta2, eps, step, lr, weight_decay,
                                               gnorm_scale, skip_zeros, -1);
#ifdef LOWBIT_WITH_CUDA
  if (p[0].is_cuda()) {
    const c10::cuda::CUDAGuard guard(p[0].device());
    return cuda_update(base, sr_seed, g, p, state1, state2, absmax1, absmax2, qmap1.contiguous(),
                       two ? qmap2->contiguous() : at::Tensor(), true);
  }
#endif
  TORCH_CHECK(p[0].is_cpu(), "lowbit.", op, ": no kernels for device ", p[0].device());
  at::Tensor applied = at::ones({int64_t(np)}, p[0].options().dtype(at::kBool));
  const at::Tensor q1 = qmap1.contiguous();
  const HostCode h1 = host_code(op, "qmap1", q1);
  at::Tensor q2;
  HostCode h2;
  if (two) {
    q2 = qmap2->contiguous();
    h2 = host_code(op, "qmap2", q2);
  }
  cpu_for_each_param(
      base, sr_seed, g, applied, [&](size_t i, const OptimScalars& s, const at::Tensor& gi) {
        const int64_t n = p[i].numel(), blocks = ceil_div(n, kBlock);
        const cpu::OptimState8 st1{state1[i].data_ptr<uint8_t>(), absmax1[i].data_ptr<float>(),
                                   q1.data_ptr<float>(), h1.bound, h1.zero_code};
        cpu::OptimState8 st2{};
        if (two)
          st2 = cpu::OptimState8{state2[i].data_ptr<uint8_t>(), absmax2[i].data_ptr<float>(),
                                 q2.data_ptr<float>(), h2.bound, h2.zero_code};
        const FloatType gt = float_type(gi.scalar_type()), pt = float_type(p[i].scalar_type());
        const void* gp = gi.data_ptr();
        void* pp = p[i].data_ptr();
        at::parallel_for(0, blocks, grain_for(kBlock * 4), [&](int64_t b0, int64_t b1) {
          cpu::optimizer_update_8bit_blockwise(s, gt, gp, pt, pp, n, st1, two ? &st2 : nullptr, b0,
                                               b1);
        });
      });
  return applied;
}

at::Tensor optimizer_update_32bit(c10::string_view optimizer_name, at::TensorList g,
                                  at::TensorList p, at::TensorList state1, at::TensorList state2,
                                  double beta1, double beta2, double eps, int64_t step, double lr,
                                  double weight_decay, double gnorm_scale, bool skip_zeros,
                                  int64_t sr_seed) {
  const char* op = "optimizer_update_32bit";
  const OptimKind kind = parse_kind(op, optimizer_name);
  const bool two = two_states(kind);
  const size_t np = p.size();
  check_list_len(op, "g", g, np);
  check_list_len(op, "state1", state1, np);
  check_list_len(op, "state2", state2, two ? np : 0);
  check_scalars(op, step, lr, eps, beta1, beta2);
  if (np == 0) return at::empty({0}, at::TensorOptions().dtype(at::kBool));
  for (size_t i = 0; i < np; ++i) {
    check_param(op, g[i], p[i], i, p[0]);
    check_state(op, item("state1", i), state1[i], at::kFloat, p[i].numel(), p[i], i);
    if (two) check_state(op, item("state2", i), state2[i], at::kFloat, p[i].numel(), p[i], i);
  }
  const OptimScalars base = make_optim_scalars(kind, beta1, beta2, eps, step, lr, weight_decay,
                                               gnorm_scale, skip_zeros, -1);
#ifdef LOWBIT_WITH_CUDA
  if (p[0].is_cuda()) {
    const c10::cuda::CUDAGuard guard(p[0].device());
    return cuda_update(base, sr_seed, g, p, state1, state2, {}, {}, at::Tensor(), at::Tensor(),
                       false);
  }
#endif
  TORCH_CHECK(p[0].is_cpu(), "lowbit.", op, ": no kernels for device ", p[0].device());
  at::Tensor applied = at::ones({int64_t(np)}, p[0].options().dtype(at::kBool));
  cpu_for_each_param(
      base, sr_seed, g, applied, [&](size_t i, const OptimScalars& s, const at::Tensor& gi) {
        const FloatType gt = float_type(gi.scalar_type()), pt = float_type(p[i].scalar_type());
        const void* gp = gi.data_ptr();
        void* pp = p[i].data_ptr();
        float* s1 = state1[i].data_ptr<float>();
        float* s2 = two ? state2[i].data_ptr<float>() : nullptr;
        at::parallel_for(0, p[i].numel(), 16384, [&](int64_t b, int64_t e) {
          cpu::optimizer_update_32bit(s, gt, gp, pt, pp, s1, s2, b, e);
        });
      });
  return applied;
}

}  // namespace lowbit::ops
