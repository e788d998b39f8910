// The int8 x int8 -> int32 product through cuBLASLt (int8 tensor cores: IMMA on sm_80, the
// library's own kernels on sm_90), on the caller's handle, workspace and stream.
//
// Layout. lowbit's C [M, N] = A [M, K] . B [N, K]^T, all row-major, is cuBLASLt's column-major
// C^T (N x M, ld N) = op(B) . A^T with op = transpose: B row-major [N, K] is column-major K x N (ld
// K) and its transpose is N x K; A row-major [M, K] is column-major K x M (ld K). That is the "TN"
// form, the only one cuBLASLt's int8 kernels take with the ordinary (non-IMMA-ordered) layouts,
// and it asks for: leading dimensions and m, k multiples of 4 (so K % 4 == 0 and N % 4 == 0),
// pointers 4-byte aligned. Other shapes return kInt8LtUnsupported and the caller uses the dp4a
// kernel (int8.cu). So does a problem that cuBLASLt itself refuses with the heuristic's algorithm
// and with its implicit heuristic (LtMode below), with one line on stderr.
//
// Launches: the heuristic may pick split-K algorithms whose partial sums are reduced by a second
// kernel, or in place through counters in the workspace. The default asks for no reduction
// (one kernel per product, so an LLM.int8() forward stays at three launches);
// LOWBIT_INT8_LT_REDUCTION=inplace|any widens that (read once, for measurements).
//
// Plans (descriptors, layouts and the chosen algorithm) are cached per device, shape, alignment
// and workspace size: the heuristic query costs host time that a decode step cannot afford.
// LOWBIT_INT8_LT_ALGO=i (read on every call, part of the cache key) takes the heuristic's i-th
// candidate instead of its first (clamped to the last one returned): a knob for measuring the
// candidates (benchmarks/bench_gpu_int8.py --lt-algos), not for production.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "lowbit/cuda_kernels.h"

#ifdef LOWBIT_NO_CUBLASLT
// Built without cuBLASLt (its header or library was not found, see CMakeLists.txt).
namespace lowbit::cuda {
int int8_gemm_lt(void*, void*, size_t, const int8_t*, const int8_t*, int32_t*, int64_t, int64_t,
                 int64_t, cudaStream_t) {
  return kInt8LtUnsupported;
}
const char* int8_lt_status_name(int) { return "lowbit was built without cuBLASLt"; }
}  // namespace lowbit::cuda
#else
#include <cublasLt.h>

namespace lowbit::cuda {

namespace {

// How a plan runs the product. kAlgo: the heuristic's algorithm and the caller's workspace.
// kImplicit: no algorithm and no workspace, i.e. cuBLASLt's own implicit heuristic, the way
// torch's at::cuda::blas::int8_gemm (torch._int_mm) calls it, whose source notes that explicit
// heuristics and a non-zero workspace "don't seem to work" for int8. Taken when the heuristic
// returns nothing or cublasLtMatmul refuses its choice, so a cuBLASLt that behaves that way still
// runs the product on tensor cores. kNone: cuBLASLt refused both: the dp4a kernel runs it.
enum LtMode : int { kAlgo = 0, kImplicit = 1, kNone = 2 };

struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  // Read and lowered (never raised) by concurrent callers of a shared plan: atomic.
  std::atomic<int> mode{kImplicit};
  ~LtPlan() {
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// device, M, N, K, alignment of A, B, C (bytes, capped at 16), workspace bytes, candidate index
using LtKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, size_t, int>;
constexpr int kMaxCandidates = 16;

int candidate_index() {
  const char* e = std::getenv("LOWBIT_INT8_LT_ALGO");
  if (e == nullptr || *e == 0) return 0;
  const int i = std::atoi(e);
  return i < 0 ? 0 : (i >= kMaxCandidates ? kMaxCandidates - 1 : i);
}

int alignment(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  int a = 16;
  while (a > 1 && u % uintptr_t(a) != 0) a >>= 1;
  return a;
}

uint32_t reduction_mask() {
  static const uint32_t mask = [] {
    const char* e = std::getenv("LOWBIT_INT8_LT_REDUCTION");
    if (e != nullptr && std::strcmp(e, "inplace") == 0)
      return uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_INPLACE);
    if (e != nullptr && std::strcmp(e, "any") == 0) return uint32_t(CUBLASLT_REDUCTION_SCHEME_MASK);
    return uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE);
  }();
  return mask;
}

// Builds the plan; status != success only for library errors (no algorithm: mode stays kImplicit).
cublasStatus_t make_plan(cublasLtHandle_t handle, const LtKey& key, LtPlan& p) {
  const auto [dev, M, N, K, align_a, align_b, align_c, ws, pick] = key;
  (void)dev;
  cublasStatus_t st = cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32I, CUDA_R_32I);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  st = cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t));
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  st = cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n));
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  // cuBLASLt's A = lowbit's B (the weight, K x N column-major), its B = lowbit's A (K x M), its
  // C = lowbit's C (N x M, ld N).
  st = cublasLtMatrixLayoutCreate(&p.la, CUDA_R_8I, uint64_t(K), uint64_t(N), K);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  st = cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_8I, uint64_t(K), uint64_t(M), K);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  st = cublasLtMatrixLayoutCreate(&p.lc, CUDA_R_32I, uint64_t(N), uint64_t(M), N);
  if (st != CUBLAS_STATUS_SUCCESS) return st;

  cublasLtMatmulPreference_t pref = nullptr;
  st = cublasLtMatmulPreferenceCreate(&pref);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const uint64_t wsb = ws;
  const uint32_t aa = uint32_t(align_b), ab = uint32_t(align_a), ac = uint32_t(align_c);
  const uint32_t red = reduction_mask();
  int found = 0;
  cublasLtMatmulHeuristicResult_t res[kMaxCandidates] = {};
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                            sizeof(wsb));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa,
                                              sizeof(aa));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab,
                                              sizeof(ab));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac,
                                              sizeof(ac));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac,
                                              sizeof(ac));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                              &red, sizeof(red));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.la, p.lb, p.lc, p.lc, pref, pick + 1, res,
                                        &found);
  // NOT_SUPPORTED / INVALID_VALUE from a preference or the query: no algorithm chosen here (a
  // cuBLASLt that lacks a preference attribute, or whose heuristic refuses int8, as torch's source
  // reports); the plan stays kImplicit and cublasLtMatmul decides. Only other errors raise.
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE)
    st = CUBLAS_STATUS_SUCCESS, found = 0;
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const int i = pick < found ? pick : found - 1;
  if (found > 0 && res[i].state == CUBLAS_STATUS_SUCCESS) {
    p.algo = res[i].algo;
    p.mode.store(kAlgo);
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Moves a plan to a more conservative mode after cuBLASLt refused the current one, saying so once
// per process on stderr (kernels have no torch logging): a silent fall to the dp4a kernel would
// only show up as a 10x slower int8 GEMM.
void lower_mode(LtPlan& p, int to, cublasStatus_t st, int64_t M, int64_t N, int64_t K) {
  int cur = p.mode.load();
  while (cur < to && !p.mode.compare_exchange_weak(cur, to)) {
  }
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    std::fprintf(stderr,
                 "lowbit: cuBLASLt refused the int8 GEMM M=%lld N=%lld K=%lld (%s); using %s\n",
                 static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                 cublasLtGetStatusName(st),
                 to == kImplicit ? "its implicit heuristic" : "lowbit's dp4a kernel");
}

std::mutex g_mutex;
std::map<LtKey, std::shared_ptr<LtPlan> > g_plans;
constexpr size_t kMaxPlans = 1024;  // distinct (M, N, K, ...) seen; cleared when full

}  // namespace

int int8_gemm_lt(void* lt_handle, void* workspace, size_t workspace_bytes, const int8_t* A,
                 const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                 cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0) return kInt8LtUnsupported;
  if (K % 4 != 0 || N % 4 != 0 || lt_handle == nullptr) return kInt8LtUnsupported;
  const int align_a = alignment(A), align_b = alignment(B), align_c = alignment(C);
  if (align_a < 4 || align_b < 4 || align_c < 4) return kInt8LtUnsupported;
  if (workspace == nullptr) workspace_bytes = 0;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return int(CUBLAS_STATUS_EXECUTION_FAILED);
  const LtKey key{dev, M, N, K, align_a, align_b, align_c, workspace_bytes, candidate_index()};
  auto handle = static_cast<cublasLtHandle_t>(lt_handle);

  std::shared_ptr<LtPlan> plan;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) plan = it->second;
  }
  if (!plan) {
    auto fresh = std::make_shared<LtPlan>();
    const cublasStatus_t st = make_plan(handle, key, *fresh);
    if (st != CUBLAS_STATUS_SUCCESS) return int(st);
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_plans.size() >= kMaxPlans) g_plans.clear();  // in-flight users hold their shared_ptr
    plan = g_plans.emplace(key, std::move(fresh)).first->second;
  }
  const int32_t one = 1, zero = 0;
  // NOT_SUPPORTED / INVALID_VALUE: cuBLASLt checks the problem and the algorithm on the host and
  // enqueues nothing when it returns them, so the next, more conservative mode may run instead.
  auto refused = [](cublasStatus_t s) {
    return s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE;
  };
  cublasStatus_t st = CUBLAS_STATUS_NOT_SUPPORTED;
  if (plan->mode.load() == kAlgo) {
    st = cublasLtMatmul(handle, plan->desc, &one, B, plan->la, A, plan->lb, &zero, C, plan->lc, C,
                        plan->lc, &plan->algo, workspace, workspace_bytes, stream);
    if (!refused(st)) return st == CUBLAS_STATUS_SUCCESS ? 0 : int(st);
    lower_mode(*plan, kImplicit, st, M, N, K);
  }
  if (plan->mode.load() == kImplicit) {
    st = cublasLtMatmul(handle, plan->desc, &one, B, plan->la, A, plan->lb, &zero, C, plan->lc, C,
                        plan->lc, nullptr, nullptr, 0, stream);
    if (!refused(st)) return st == CUBLAS_STATUS_SUCCESS ? 0 : int(st);
    lower_mode(*plan, kNone, st, M, N, K);
  }
  return kInt8LtUnsupported;
}

const char* int8_lt_status_name(int status) {
  return cublasLtGetStatusName(static_cast<cublasStatus_t>(status));
}

}  // namespace lowbit::cuda
#endif  // LOWBIT_NO_CUBLASLT
