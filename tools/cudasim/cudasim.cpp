// cudasim runtime: fibers, schedules, barriers, warp collectives, shared memory, launch checks,
// the CUDA runtime calls, and the emulation of the inline PTX the kernels use. See README.md.
#include "cudasim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace cudasim {

// ---- configuration (set from the C API at the end of this file) --------------------------------
namespace {
int g_schedule = 0;  // 0 forward, 1 reverse, 2 seeded shuffle at every release
uint64_t g_seed = 1;
int g_cc = 90;  // 90: H200 (sm_90), 80: A100 (sm_80)
std::mt19937_64 g_rng(1);

int sm_count() { return g_cc >= 90 ? 132 : 108; }
size_t smem_optin() { return g_cc >= 90 ? 232448 : 166912; }  // 227 KB / 163 KB per block
size_t smem_per_sm() { return g_cc >= 90 ? 233472 : 167936; }
constexpr size_t kStaticSmemMax = 48 * 1024;  // ptxas rejects more static shared memory
constexpr size_t kDefaultDynMax = 48 * 1024;  // dynamic above this needs the attribute

size_t stack_bytes() {
  static size_t s = [] {
    const char* e = std::getenv("CUDASIM_STACK_KB");
    size_t kb = e ? size_t(std::atol(e)) : 0;
#if defined(CUDASIM_ASAN)
    if (kb == 0) kb = 1024;
#else
    if (kb == 0) kb = 256;
#endif
    return kb * 1024;
  }();
  return s;
}
}  // namespace

// ---- context switch -----------------------------------------------------------------------------
#if defined(__x86_64__)
// cudasim_switch(save, to): pushes the callee-saved registers (System V: rbp, rbx, r12-r15, and
// the MXCSR / x87 control words) on the current stack, stores the stack pointer in *save, loads
// `to` and pops the same frame from there. A new fiber's stack is prepared to look like such a
// frame whose return address is the fiber's entry function.
extern "C" void cudasim_switch(void** save, void* to);
asm(R"(
  .pushsection .text
  .globl cudasim_switch
  .type cudasim_switch,@function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch,.-cudasim_switch
  .popsection
)");
#endif

// ---- the simulated machine ----------------------------------------------------------------------
enum class St { runnable, blocked, done };

struct CpCopy {
  void* dst;
  uint8_t data[16];
  int group;  // -1 until committed
};

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack = nullptr;  // usable region [stack, stack + stack_size)
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  uint3 tid{};
  int linear = 0;   // thread index in the block
  int64_t gid = 0;  // index in the launch (schedule order)
  Block* block = nullptr;
  St st = St::runnable;
  const char* waiting = nullptr;  // what a blocked fiber waits at
  uint64_t cin[12] = {};          // collective inputs
  uint64_t cout[4] = {};          // collective outputs
  int carg = 0;
  std::vector<CpCopy> cp;
  int cp_committed = 0;
};

struct Coll {
  int kind;
  unsigned mask;
  unsigned arrived;
  int width;
  const char* what;
};

struct Warp {
  Fiber* lane[32] = {};
  unsigned present = 0;  // lanes that exist (a partial last warp has fewer)
  std::vector<Coll> pend;
};

struct SharedAlloc {
  const void* key;
  void* ptr;
  size_t size;
  const char* name;
};

struct Block {
  uint3 idx{};
  std::vector<Fiber*> threads;
  std::vector<Warp> warps;
  std::vector<SharedAlloc> shared;
  void* dyn = nullptr;
  size_t static_bytes = 0;
  int live = 0;
  int bar_arrived = 0;
  int bar_op = -1;
  int bar_acc = 0;
};

struct KernelInfo {
  std::string name = "?";
  bool probed = false;
  int max_threads = 1024;
  int min_blocks = 0;
  size_t max_dyn = kDefaultDynMax;
  size_t static_smem = 0;  // known after the first block ran
  bool static_known = false;
};

struct Launch {
  LaunchSpec spec;
  KernelInfo* info;
  dim3 grid, block;
  int nthreads;
  std::vector<Block*> resident;
  std::deque<Fiber*> queue;
  int64_t grid_live = 0, grid_arrived = 0;
  bool faulted = false;
  cudaError_t err = cudaSuccess;
  std::string msg;
};

Fiber* g_cur = nullptr;
namespace {
Launch* g_launch = nullptr;
KernelInfo* g_probe = nullptr;
void* g_sched_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif
#if defined(CUDASIM_ASAN)
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
void* g_sched_fake = nullptr;
#endif
std::map<const void*, KernelInfo> g_kernels;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
int64_t g_launches = 0, g_launch_errors = 0, g_faults = 0;

// Stacks are reused across blocks and launches (mmap'ed once, a guard page below each).
std::vector<char*> g_stack_pool;
char* get_stack() {
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
#if defined(CUDASIM_ASAN)
    // An abandoned or finished fiber may have left poisoned frames.
    __asan_unpoison_memory_region(s, stack_bytes());
#endif
    return s;
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* m = mmap(nullptr, stack_bytes() + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) unsupported("cannot map a fiber stack (%zu bytes)", stack_bytes());
  mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
  return static_cast<char*>(m) + page;
}

std::string kernel_label(const Launch* L) {
  return L && L->info ? L->info->name : std::string("<host>");
}

std::string where(const Fiber* f) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) (warp %d lane %d)",
                f->block->idx.x, f->block->idx.y, f->block->idx.z, f->tid.x, f->tid.y, f->tid.z,
                f->linear / 32, f->linear % 32);
  return buf;
}

void order(std::vector<Fiber*>& v) {
  if (g_schedule == 0)
    std::sort(v.begin(), v.end(), [](Fiber* a, Fiber* b) { return a->gid < b->gid; });
  else if (g_schedule == 1)
    std::sort(v.begin(), v.end(), [](Fiber* a, Fiber* b) { return a->gid > b->gid; });
  else
    std::shuffle(v.begin(), v.end(), g_rng);
}

// Makes the fibers of a completed barrier runnable. forward: breadth first (FIFO, ascending: every
// thread reaches the next barrier before any goes past it). reverse: depth first (LIFO, the
// highest thread first: the released threads run on before anyone else, so a warp runs from one
// __syncthreads to the next before the warps below it start, which exposes a read that lacks a
// barrier after another warp's write). shuffle: a random order, at the front or the back.
void release(std::vector<Fiber*>& v) {
  for (Fiber* f : v) {
    f->st = St::runnable;
    f->waiting = nullptr;
  }
  bool front = g_schedule == 1;
  if (g_schedule == 2) front = (g_rng() & 1) != 0;
  if (g_schedule == 2)
    std::shuffle(v.begin(), v.end(), g_rng);
  else
    std::sort(v.begin(), v.end(), [](Fiber* a, Fiber* b) { return a->gid < b->gid; });
  if (front)
    for (Fiber* f : v) g_launch->queue.push_front(f);  // the last pushed runs first
  else
    for (Fiber* f : v) g_launch->queue.push_back(f);
}

// Fiber -> scheduler. `finished`: the fiber will never run again (ASan drops its fake stack).
void to_scheduler(bool finished) {
  Fiber* f = g_cur;
#if defined(CUDASIM_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake, g_sched_bottom, g_sched_size);
#else
  (void)finished;
#endif
#if defined(__x86_64__)
  cudasim_switch(&f->sp, g_sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
#if defined(CUDASIM_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake, &g_sched_bottom, &g_sched_size);
#endif
}

void block_here(const char* what) {
  g_cur->st = St::blocked;
  g_cur->waiting = what;
  to_scheduler(false);
}

void on_exit_checks(Fiber* f);

void fiber_main() {
#if defined(CUDASIM_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  Launch* L = g_launch;
  L->spec.invoke(L->spec.kernel, L->spec.params);
  Fiber* f = g_cur;
  f->st = St::done;
  on_exit_checks(f);
  to_scheduler(true);
  std::abort();  // never resumed
}

void init_fiber(Fiber* f) {
  f->stack = get_stack();
  f->stack_size = stack_bytes();
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->stack_size) & ~uintptr_t(15);
  uintptr_t* s = reinterpret_cast<uintptr_t*>(top - 16);  // s % 16 == 0: the return address
  s[0] = reinterpret_cast<uintptr_t>(&fiber_main);
  s[1] = 0;
  for (int i = 1; i <= 6; ++i) s[-i] = 0;  // rbp rbx r12-r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(&s[-7], csr, 8);
  f->sp = &s[-7];
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, &fiber_main, 0);
#endif
}

void run_fiber(Fiber* f) {
  g_cur = f;
  threadIdx = f->tid;
  blockIdx = f->block->idx;
#if defined(CUDASIM_ASAN)
  __sanitizer_start_switch_fiber(&g_sched_fake, f->stack, f->stack_size);
#endif
#if defined(__x86_64__)
  cudasim_switch(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched_uc, &f->uc);
#endif
#if defined(CUDASIM_ASAN)
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

const char* kind_name(int kind) {
  switch (kind) {
    case 0:
      return "__shfl_sync";
    case 1:
      return "__shfl_xor_sync";
    case 2:
      return "__shfl_up_sync";
    case 3:
      return "__shfl_down_sync";
    case 10:
      return "__any_sync";
    case 11:
      return "__all_sync";
    case 12:
      return "__ballot_sync";
    case 20:
      return "__syncwarp";
    case 30:
      return "mma.sync.m16n8k16.f16";
    case 31:
      return "mma.sync.m16n8k16.bf16";
  }
  return "?";
}

std::string lanes_str(unsigned m) {
  std::string s;
  for (int i = 0; i < 32; ++i)
    if (m >> i & 1u) s += (s.empty() ? "" : ",") + std::to_string(i);
  return "{" + s + "}";
}

void compute_collective(Warp& w, const Coll& c);

// A warp collective: the calling lane deposits its inputs in g_cur->cin and waits until every
// lane of `mask` arrived at a collective of the same kind and mask; the last one to arrive
// computes every lane's result (cout).
void collective(int kind, unsigned mask, int width, const char* what) {
  Fiber* f = g_cur;
  Block* b = f->block;
  Warp& w = b->warps[f->linear / 32];
  const int lane = f->linear % 32;
  if (!(mask >> lane & 1u))
    fault(cudaErrorIllegalInstruction, "%s: the calling lane %d is not in the mask 0x%08x", what,
          lane, mask);
  if (mask & ~w.present)
    fault(cudaErrorIllegalInstruction,
          "%s: mask 0x%08x names lanes %s that do not exist (blockDim %d)", what, mask,
          lanes_str(mask & ~w.present).c_str(), g_launch->nthreads);
  for (int i = 0; i < 32; ++i)
    if ((mask >> i & 1u) && w.lane[i]->st == St::done)
      fault(cudaErrorLaunchTimeout,
            "%s(mask 0x%08x): lane %d named in the mask has exited; on a GPU the warp hangs", what,
            mask, i);
  Coll* c = nullptr;
  for (Coll& p : w.pend) {
    if (p.mask == mask) {
      c = &p;
      break;
    }
    if (p.mask & (1u << lane))
      fault(cudaErrorIllegalInstruction,
            "%s(mask 0x%08x) by lane %d, which lanes %s wait for at %s", what, mask, lane,
            lanes_str(p.mask & ~p.arrived).c_str(), p.what);
  }
  if (c == nullptr) {
    w.pend.push_back(Coll{kind, mask, 0u, width, what});
    c = &w.pend.back();
  } else if (c->kind != kind || c->width != width) {
    fault(cudaErrorIllegalInstruction,
          "lanes of mask 0x%08x at different warp collectives: %s (width %d) and %s (width %d)",
          mask, c->what, c->width, what, width);
  }
  c->arrived |= 1u << lane;
  if (c->arrived != mask) {
    block_here(what);
    return;
  }
  const Coll done = *c;
  w.pend.erase(w.pend.begin() + (c - w.pend.data()));
  compute_collective(w, done);
  std::vector<Fiber*> rel;
  for (int i = 0; i < 32; ++i)
    if ((mask >> i & 1u) && i != lane) rel.push_back(w.lane[i]);
  release(rel);
}

void on_exit_checks(Fiber* f) {
  Block* b = f->block;
  --b->live;
  --g_launch->grid_live;
  const int lane = f->linear % 32;
  for (const Coll& c : b->warps[f->linear / 32].pend)
    if (c.mask >> lane & 1u)
      fault(cudaErrorLaunchTimeout,
            "lane %d exited while lanes %s wait for it at %s(mask 0x%08x); on a GPU the warp hangs",
            lane, lanes_str(c.arrived).c_str(), c.what, c.mask);
  // __syncthreads counts the threads that have not exited (sm_70 and later).
  if (b->bar_arrived > 0 && b->bar_arrived == b->live) {
    std::vector<Fiber*> rel;
    for (Fiber* t : b->threads)
      if (t->st == St::blocked && t->waiting && std::strcmp(t->waiting, "__syncthreads") == 0) {
        t->cout[0] = uint64_t(b->bar_acc);
        rel.push_back(t);
      }
    b->bar_arrived = 0;
    b->bar_op = -1;
    release(rel);
  }
  // grid.sync() is __syncthreads + one arrival per block in cooperative_groups: threads that
  // exited do not hold it up either.
  if (g_launch->grid_arrived > 0 && g_launch->grid_arrived == g_launch->grid_live) {
    std::vector<Fiber*> rel;
    for (Block* rb : g_launch->resident)
      for (Fiber* t : rb->threads)
        if (t->st == St::blocked && t->waiting && std::strcmp(t->waiting, "grid.sync") == 0)
          rel.push_back(t);
    g_launch->grid_arrived = 0;
    release(rel);
  }
}

}  // namespace

// ---- faults ------------------------------------------------------------------------------------
void fault(cudaError_t err, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::string msg = "cudasim: kernel " + kernel_label(g_launch);
  if (g_cur) msg += ", " + where(g_cur);
  msg += ": ";
  msg += buf;
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
  ++g_faults;
  if (std::getenv("CUDASIM_ABORT") || !g_cur || !g_launch) std::abort();
  g_launch->faulted = true;
  if (g_launch->err == cudaSuccess) {
    g_launch->err = err;
    g_launch->msg = msg;
  }
  to_scheduler(false);
  std::abort();  // never resumed
}

void unsupported(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "cudasim: not modelled: %s (kernel %s)\n", buf,
               kernel_label(g_launch).c_str());
  std::fflush(stderr);
  std::abort();
}

bool kernel_entry(const char* pretty, int max_threads, int min_blocks) {
  if (g_probe == nullptr) return false;
  // "void ns::name(params) [with T = ...]" -> "ns::name [with T = ...]"
  std::string s = pretty;
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  const size_t open = s.find('(');
  const size_t with = s.find(" [with");
  std::string name = s.substr(0, open);
  if (with != std::string::npos) name += s.substr(with);
  g_probe->name = name;
  g_probe->max_threads = max_threads;
  g_probe->min_blocks = min_blocks;
  g_probe->probed = true;
  return true;
}

// ---- shared memory ---------------------------------------------------------------------------
namespace {
void fill_garbage(void* p, size_t n) {
  // CUDA leaves shared memory uninitialised; each schedule leaves a different pattern, so a read
  // before the first write shows up as a schedule-dependent result.
  uint8_t* b = static_cast<uint8_t*>(p);
  if (g_schedule == 0)
    std::memset(b, 0xFF, n);  // fp32 / fp16 / bf16 NaN
  else if (g_schedule == 1)
    std::memset(b, 0x7F, n);
  else
    for (size_t i = 0; i < n; ++i) b[i] = uint8_t(g_rng());
}
}  // namespace

void* shared_alloc(const void* key, size_t size, size_t align, const char* name) {
  if (!g_cur) unsupported("__shared__ %s declared outside a kernel", name);
  Block* b = g_cur->block;
  for (const SharedAlloc& a : b->shared)
    if (a.key == key) return a.ptr;
  void* p = std::aligned_alloc(align, (size + align - 1) / align * align);
  if (!p) unsupported("out of host memory for __shared__ %s", name);
  fill_garbage(p, size);
  b->shared.push_back(SharedAlloc{key, p, size, name});
  b->static_bytes += size;
  if (b->static_bytes > kStaticSmemMax)
    fault(cudaErrorLaunchOutOfResources,
          "static shared memory of the block reaches %zu bytes at __shared__ %s (ptxas rejects > "
          "48 KB)",
          b->static_bytes, name);
  KernelInfo* k = g_launch->info;
  if (b->static_bytes + g_launch->spec.smem > smem_optin())
    fault(cudaErrorInvalidValue, "static (%zu) + dynamic (%zu) shared memory exceed %zu bytes",
          b->static_bytes, g_launch->spec.smem, smem_optin());
  if (b->static_bytes > k->static_smem) k->static_smem = b->static_bytes;
  return p;
}

void* dynamic_shared() {
  if (!g_cur) unsupported("extern __shared__ outside a kernel");
  if (g_cur->block->dyn == nullptr) {
    // A zero-byte launch still gets a valid, empty, pointer; any access through it is an
    // overrun (ASan).
    g_cur->block->dyn = std::aligned_alloc(128, 128);
    fill_garbage(g_cur->block->dyn, 0);
  }
  return g_cur->block->dyn;
}
size_t dynamic_shared_size() { return g_launch ? g_launch->spec.smem : 0; }

uint32_t cvta_to_shared(const void* p) {
  if (!g_cur) unsupported("__cvta_generic_to_shared outside a kernel");
  Block* b = g_cur->block;
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (b->dyn && q >= static_cast<uint8_t*>(b->dyn) &&
      q < static_cast<uint8_t*>(b->dyn) + std::max<size_t>(g_launch->spec.smem, 1))
    return uint32_t(q - static_cast<uint8_t*>(b->dyn));
  for (size_t i = 0; i < b->shared.size(); ++i) {
    const uint8_t* s = static_cast<uint8_t*>(b->shared[i].ptr);
    if (q >= s && q < s + b->shared[i].size) return uint32_t(((i + 1) << 20) | size_t(q - s));
  }
  fault(cudaErrorIllegalAddress, "__cvta_generic_to_shared(%p): not shared memory of this block",
        p);
}
const void* shared_from_cvta(uint32_t a) {
  Block* b = g_cur->block;
  const size_t i = a >> 20, off = a & 0xFFFFFu;
  if (i == 0) return static_cast<uint8_t*>(b->dyn) + off;
  return static_cast<uint8_t*>(b->shared[i - 1].ptr) + off;
}

namespace {
// [p, p + n) inside one shared allocation of the current block?
bool in_shared(const void* p, size_t n) {
  Block* b = g_cur->block;
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (b->dyn && q >= static_cast<uint8_t*>(b->dyn) &&
      q + n <= static_cast<uint8_t*>(b->dyn) + g_launch->spec.smem)
    return true;
  for (const SharedAlloc& a : b->shared) {
    const uint8_t* s = static_cast<uint8_t*>(a.ptr);
    if (q >= s && q + n <= s + a.size) return true;
  }
  return false;
}
}  // namespace

// ---- barriers
// ------------------------------------------------------------------------------------
void syncthreads() { (void)syncthreads_reduce(-1, 0); }

int syncthreads_reduce(int op, int pred) {
  if (!g_cur) unsupported("__syncthreads outside a kernel");
  Fiber* f = g_cur;
  Block* b = f->block;
  if (b->bar_arrived == 0) {
    b->bar_op = op;
    b->bar_acc = op == 1 ? 1 : 0;
  } else if (b->bar_op != op) {
    fault(cudaErrorIllegalInstruction,
          "__syncthreads variants mixed at one barrier (plain / _or / _and / _count)");
  }
  if (op == 0) b->bar_acc |= pred != 0;
  if (op == 1) b->bar_acc &= pred != 0;
  if (op == 2) b->bar_acc += pred != 0;
  ++b->bar_arrived;
  if (b->bar_arrived < b->live) {
    block_here("__syncthreads");
    return int(f->cout[0]);
  }
  const int r = b->bar_acc;
  std::vector<Fiber*> rel;
  for (Fiber* t : b->threads)
    if (t != f && t->st == St::blocked && t->waiting &&
        std::strcmp(t->waiting, "__syncthreads") == 0) {
      t->cout[0] = uint64_t(r);
      rel.push_back(t);
    }
  b->bar_arrived = 0;
  b->bar_op = -1;
  release(rel);
  return r;
}

void grid_sync() {
  if (!g_cur) unsupported("grid.sync() outside a kernel");
  if (!g_launch->spec.cooperative)
    fault(cudaErrorIllegalInstruction,
          "grid.sync() in a launch that is not cooperative (cudaLaunchAttributeCooperative)");
  ++g_launch->grid_arrived;
  if (g_launch->grid_arrived < g_launch->grid_live) {
    block_here("grid.sync");
    return;
  }
  std::vector<Fiber*> rel;
  for (Block* b : g_launch->resident)
    for (Fiber* t : b->threads)
      if (t != g_cur && t->st == St::blocked && t->waiting &&
          std::strcmp(t->waiting, "grid.sync") == 0)
        rel.push_back(t);
  g_launch->grid_arrived = 0;
  release(rel);
}

void syncwarp(unsigned mask) {
  if (!g_cur) unsupported("__syncwarp outside a kernel");
  collective(20, mask, 32, "__syncwarp");
}

uint64_t shfl(unsigned mask, uint64_t v, int kind, int arg, int width, const char* what) {
  if (!g_cur) unsupported("%s outside a kernel", what);
  if (width < 1 || width > 32 || (width & (width - 1)))
    fault(cudaErrorIllegalInstruction, "%s: width %d is not a power of two <= 32", what, width);
  g_cur->cin[0] = v;
  g_cur->carg = arg;
  collective(kind, mask, width, what);
  return g_cur->cout[0];
}

unsigned vote(unsigned mask, int pred, int kind) {
  if (!g_cur) unsupported("vote outside a kernel");
  g_cur->cin[0] = uint64_t(pred != 0);
  collective(10 + kind, mask, 32, kind_name(10 + kind));
  return unsigned(g_cur->cout[0]);
}

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
  if (!g_cur) unsupported("mma outside a kernel");
  Fiber* f = g_cur;
  for (int i = 0; i < 4; ++i) f->cin[i] = a[i];
  f->cin[4] = b[0];
  f->cin[5] = b[1];
  for (int i = 0; i < 4; ++i) f->cin[6 + i] = bits_from_f32(c[i]);
  // .aligned: every lane of the warp executes the same mma.
  collective(bf16 ? 31 : 30, 0xffffffffu, 32, bf16 ? kind_name(31) : kind_name(30));
  for (int i = 0; i < 4; ++i) d[i] = f32_from_bits(uint32_t(f->cout[i]));
}

namespace {
float half_value(uint32_t h, bool bf16) {
  return bf16 ? f32_from_bits(h << 16) : f16_to_f32(uint16_t(h));
}

void compute_collective(Warp& w, const Coll& c) {
  const unsigned mask = c.mask;
  if (c.kind <= 3) {
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber* f = w.lane[l];
      const int seg = l & ~(c.width - 1), arg = f->carg;
      int src = l;
      if (c.kind == 0) {
        src = seg + (arg & (c.width - 1));
      } else if (c.kind == 1) {
        src = l ^ arg;
        if (src >= seg + c.width) src = l;  // a later group: the caller's own value
      } else if (c.kind == 2) {
        src = l - arg;
        if (src < seg) src = l;
      } else {
        src = l + arg;
        if (src >= seg + c.width) src = l;
      }
      if (src < 0 || src > 31 || !(mask >> src & 1u))
        fault(cudaErrorIllegalInstruction,
              "%s(mask 0x%08x): lane %d reads lane %d, which is not in the mask (undefined value)",
              c.what, mask, l, src);
      f->cout[0] = w.lane[src]->cin[0];
    }
    return;
  }
  if (c.kind >= 10 && c.kind <= 12) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && w.lane[l]->cin[0]) ballot |= 1u << l;
    const uint64_t r = c.kind == 10 ? (ballot != 0) : c.kind == 11 ? (ballot == mask) : ballot;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) w.lane[l]->cout[0] = r;
    return;
  }
  if (c.kind == 20) return;
  if (c.kind == 30 || c.kind == 31) {
    // mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, per the PTX ISA, section
    // "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8 in PTX ISA 8.x),
    // with groupID = laneid >> 2 and threadID_in_group = laneid % 4:
    //   A (16x16): four .f16x2 registers holding a0..a7, a(2r) in the LOW half of register r;
    //     row = groupID for ai with 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise;
    //     col = threadID_in_group * 2 + (i & 1) for i < 4, the same + 8 for i >= 4.
    //   B (16x8): two .f16x2 registers holding b0..b3;
    //     row (k) = threadID_in_group * 2 + (i & 1) for i < 2, the same + 8 for i >= 2;
    //     col (n) = groupID.
    //   C, D (16x8, f32): c0..c3; row = groupID for c0, c1, groupID + 8 for c2, c3;
    //     col = threadID_in_group * 2 + (i & 1).
    const bool bf16 = c.kind == 31;
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const Fiber* f = w.lane[l];
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 8; ++i) {
        const uint32_t reg = uint32_t(f->cin[i / 2]);
        const uint32_t h = (i & 1) ? reg >> 16 : reg & 0xFFFFu;
        const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = half_value(h, bf16);
      }
      for (int i = 0; i < 4; ++i) {
        const uint32_t reg = uint32_t(f->cin[4 + i / 2]);
        const uint32_t h = (i & 1) ? reg >> 16 : reg & 0xFFFFu;
        const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][g] = half_value(h, bf16);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
        C[row][col] = f32_from_bits(uint32_t(f->cin[6 + i]));
      }
    }
    // Products of two fp16/bf16 values are exact in double; the sum of 16 of them and C is
    // rounded once to fp32 (the tensor cores' own internal rounding is not modelled).
    for (int l = 0; l < 32; ++l) {
      Fiber* f = w.lane[l];
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
        double s = C[row][col];
        for (int k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[k][col]);
        f->cout[i] = bits_from_f32(gpu_nan(float(s)));
      }
    }
    return;
  }
  unsupported("collective kind %d", c.kind);
}
}  // namespace

// ---- memory ------------------------------------------------------------------------------------
void check_align(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fault(cudaErrorMisalignedAddress, "%s: address %p is not %zu-byte aligned (the GPU faults)",
          what, p, align);
}

void cp_async16(void* dst, const void* src, int src_bytes) {
  if (!g_cur) unsupported("cp.async outside a kernel");
  check_align(dst, 16, "cp.async.cg (shared destination)");
  // The source address must be 16-byte aligned even when src-size is 0 (nothing is read).
  check_align(src, 16, "cp.async.cg (global source)");
  if (!in_shared(dst, 16))
    fault(cudaErrorIllegalAddress,
          "cp.async destination %p is not 16 bytes of this block's shared "
          "memory",
          dst);
  if (src_bytes != 0 && src_bytes != 16)
    unsupported("cp.async with src-size %d (only 0 and 16 are modelled)", src_bytes);
  CpCopy c;
  c.dst = dst;
  c.group = -1;
  std::memset(c.data, 0, 16);
  if (src_bytes == 16) {
    check_align(src, 16, "cp.async.cg (global source)");
    std::memcpy(c.data, src, 16);  // read now (the source may not change until the wait anyway)
  }
  g_cur->cp.push_back(c);
}

void cp_async_commit() {
  if (!g_cur) unsupported("cp.async.commit_group outside a kernel");
  Fiber* f = g_cur;
  for (CpCopy& c : f->cp)
    if (c.group < 0) c.group = f->cp_committed;
  ++f->cp_committed;
}

void cp_async_wait(int n) {
  if (!g_cur) unsupported("cp.async.wait_group outside a kernel");
  // The copies of every committed group but the newest n land now, not before: shared memory
  // read before the wait still holds what was there.
  Fiber* f = g_cur;
  const int limit = f->cp_committed - n;
  std::vector<CpCopy> keep;
  for (const CpCopy& c : f->cp) {
    if (c.group >= 0 && c.group < limit)
      std::memcpy(c.dst, c.data, 16);
    else
      keep.push_back(c);
  }
  f->cp.swap(keep);
}

// ---- numerics
// ------------------------------------------------------------------------------------
float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
uint16_t f32_to_bf16_rn(float f) {
  const uint32_t u = bits_from_f32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // cvt gives the canonical NaN
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);   // nearest, ties to even
  return uint16_t(r >> 16);
}
uint16_t f32_to_f16_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE conversion, nearest even
  uint16_t r;
  std::memcpy(&r, &h, 2);
  if ((r & 0x7fffu) > 0x7c00u) r = 0x7fff;  // canonical NaN
  return r;
}
float f16_to_f32(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

// ---- launches
// ------------------------------------------------------------------------------------
namespace {
cudaError_t launch_error(const LaunchSpec& s, const KernelInfo& k, cudaError_t e, const char* fmt,
                         ...) __attribute__((format(printf, 4, 5)));
cudaError_t launch_error(const LaunchSpec& s, const KernelInfo& k, cudaError_t e, const char* fmt,
                         ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  char msg[1024];
  std::snprintf(msg, sizeof msg, "cudasim: LAUNCH ERROR %d (%s) of %s at %s:%d: %s", int(e),
                cudaGetErrorName(e), k.name.c_str(), s.file, s.line, buf);
  std::fprintf(stderr, "%s\n", msg);
  std::fflush(stderr);
  ++g_launch_errors;
  g_last_message = msg;
  g_last_error = e;
  return e;
}

KernelInfo& kernel_info(const LaunchSpec* s, const void* kernel) {
  KernelInfo& k = g_kernels[kernel];
  if (!k.probed && s != nullptr) {
    g_probe = &k;
    s->invoke(s->kernel, s->params);  // returns at CUDASIM_KERNEL_ENTRY
    g_probe = nullptr;
    if (!k.probed)
      unsupported(
          "kernel launched at %s:%d has no CUDASIM_KERNEL_ENTRY (not preprocessed by "
          "build.py)",
          s->file, s->line);
  }
  return k;
}

int occupancy_of(const KernelInfo& k, int block_size, size_t dyn) {
  if (block_size <= 0 || block_size > k.max_threads) return 0;
  const int warps = (block_size + 31) / 32;
  int n = std::min(2048 / (warps * 32), 32);
  const size_t smem = k.static_smem + dyn;
  if (smem > 0) n = std::min<int>(n, int(smem_per_sm() / (smem + 1024)));
  return n;
}

void free_block(Block* b) {
  for (Fiber* f : b->threads) {
    if (f->stack) g_stack_pool.push_back(f->stack);
    delete f;
  }
  for (SharedAlloc& a : b->shared) std::free(a.ptr);
  std::free(b->dyn);
  delete b;
}

Block* make_block(Launch& L, uint3 idx, int64_t first_gid) {
  Block* b = new Block;
  b->idx = idx;
  const int n = L.nthreads;
  b->warps.resize((n + 31) / 32);
  b->live = n;
  if (L.spec.smem > 0) {
    b->dyn = std::aligned_alloc(128, (L.spec.smem + 127) / 128 * 128);
    fill_garbage(b->dyn, L.spec.smem);
  }
  for (int i = 0; i < n; ++i) {
    Fiber* f = new Fiber;
    f->linear = i;
    f->tid = uint3{unsigned(i) % L.block.x, (unsigned(i) / L.block.x) % L.block.y,
                   unsigned(i) / (L.block.x * L.block.y)};
    f->gid = first_gid + i;
    f->block = b;
    init_fiber(f);
    b->threads.push_back(f);
    Warp& w = b->warps[i / 32];
    w.lane[i % 32] = f;
    w.present |= 1u << (i % 32);
  }
  return b;
}

// Runs the queue until every fiber has finished, a fault, or a deadlock.
void run_queue(Launch& L) {
  while (!L.queue.empty() && !L.faulted) {
    Fiber* f = L.queue.front();
    L.queue.pop_front();
    if (f->st != St::runnable) continue;
    run_fiber(f);
  }
  if (L.faulted) return;
  std::string stuck;
  for (Block* b : L.resident)
    for (Fiber* f : b->threads)
      if (f->st != St::done) {
        if (stuck.size() < 1500)
          stuck += "\n  " + where(f) + " waits at " + (f->waiting ? f->waiting : "?");
      }
  if (!stuck.empty()) {
    char head[256];
    std::snprintf(head, sizeof head,
                  "cudasim: kernel %s: DEADLOCK (on a GPU: a hang):", L.info->name.c_str());
    L.faulted = true;
    L.err = cudaErrorLaunchTimeout;
    L.msg = head + stuck;
    std::fprintf(stderr, "%s\n", L.msg.c_str());
    ++g_faults;
    if (std::getenv("CUDASIM_ABORT")) std::abort();
  }
}
}  // namespace

cudaError_t launch_impl(const LaunchSpec& s) {
  if (g_launch != nullptr) unsupported("a kernel launch from inside a kernel");
  ++g_launches;
  KernelInfo& k = kernel_info(&s, s.kernel);
  const uint64_t threads = uint64_t(s.block.x) * s.block.y * s.block.z;
  if (threads == 0 || s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0)
    return launch_error(s, k, cudaErrorInvalidConfiguration,
                        "empty grid (%u,%u,%u) or block "
                        "(%u,%u,%u)",
                        s.grid.x, s.grid.y, s.grid.z, s.block.x, s.block.y, s.block.z);
  if (s.block.x > 1024 || s.block.y > 1024 || s.block.z > 64 || threads > 1024)
    return launch_error(s, k, cudaErrorInvalidConfiguration, "block (%u,%u,%u) over 1024 threads",
                        s.block.x, s.block.y, s.block.z);
  if (threads > uint64_t(k.max_threads))
    return launch_error(s, k, cudaErrorLaunchOutOfResources,
                        "%llu threads per block, __launch_bounds__ allows %d",
                        (unsigned long long)threads, k.max_threads);
  if (s.grid.x > 0x7fffffffu || s.grid.y > 65535 || s.grid.z > 65535)
    return launch_error(s, k, cudaErrorInvalidConfiguration, "grid (%u,%u,%u) over the limits",
                        s.grid.x, s.grid.y, s.grid.z);
  if (s.smem > k.max_dyn)
    return launch_error(s, k, cudaErrorInvalidValue,
                        "%zu bytes of dynamic shared memory, the kernel allows %zu (> 48 KB needs "
                        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize))",
                        s.smem, k.max_dyn);
  if (k.static_known && k.static_smem + s.smem > smem_optin())
    return launch_error(s, k, cudaErrorInvalidValue,
                        "static %zu + dynamic %zu bytes of shared memory exceed %zu (sm_%d)",
                        k.static_smem, s.smem, smem_optin(), g_cc);
  const uint64_t nblocks = uint64_t(s.grid.x) * s.grid.y * s.grid.z;
  if (s.cooperative) {
    const uint64_t cap = uint64_t(occupancy_of(k, int(threads), s.smem)) * sm_count();
    if (nblocks > cap)
      return launch_error(s, k, cudaErrorCooperativeLaunchTooLarge,
                          "cooperative grid of %llu blocks, at most %llu resident",
                          (unsigned long long)nblocks, (unsigned long long)cap);
  }

  Launch L;
  L.spec = s;
  L.info = &k;
  L.grid = s.grid;
  L.block = s.block;
  L.nthreads = int(threads);
  g_launch = &L;
  blockDim = s.block;
  gridDim = s.grid;
  std::vector<uint3> blocks;
  blocks.reserve(nblocks);
  for (unsigned z = 0; z < s.grid.z; ++z)
    for (unsigned y = 0; y < s.grid.y; ++y)
      for (unsigned x = 0; x < s.grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (g_schedule == 1)
    std::reverse(blocks.begin(), blocks.end());
  else if (g_schedule == 2)
    std::shuffle(blocks.begin(), blocks.end(), g_rng);

  auto start = [&](Block* b) {
    std::vector<Fiber*> all(b->threads.begin(), b->threads.end());
    order(all);
    for (Fiber* f : all) L.queue.push_back(f);
  };
  if (s.cooperative) {
    // Every block resident at once: grid.sync() is a barrier over all of them.
    int64_t gid = 0;
    for (const uint3& bi : blocks) {
      Block* b = make_block(L, bi, gid);
      gid += L.nthreads;
      L.resident.push_back(b);
    }
    L.grid_live = int64_t(nblocks) * L.nthreads;
    for (Block* b : L.resident) start(b);
    run_queue(L);
    for (Block* b : L.resident) {
      k.static_smem = std::max(k.static_smem, b->static_bytes);
      free_block(b);
    }
    L.resident.clear();
  } else {
    // One block after another (the order is the schedule's).
    for (const uint3& bi : blocks) {
      const int64_t lin = (int64_t(bi.z) * s.grid.y + bi.y) * s.grid.x + bi.x;
      Block* b = make_block(L, bi, lin * L.nthreads);
      L.resident.push_back(b);
      L.grid_live = L.nthreads;
      start(b);
      run_queue(L);
      k.static_smem = std::max(k.static_smem, b->static_bytes);
      free_block(b);
      L.resident.clear();
      if (L.faulted) break;
    }
  }
  k.static_known = !L.faulted;
  g_launch = nullptr;
  g_cur = nullptr;
  if (L.faulted) {
    g_last_error = L.err;
    g_last_message = L.msg;
    return L.err;
  }
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  KernelInfo& k = g_kernels[kernel];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) + k.static_smem > smem_optin()) {
      g_last_error = cudaErrorInvalidValue;
      std::fprintf(stderr,
                   "cudasim: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) over the "
                   "sm_%d limit %zu\n",
                   value, g_cc, smem_optin());
      return cudaErrorInvalidValue;
    }
    k.max_dyn = size_t(value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  unsupported("cudaFuncSetAttribute attribute %d", int(attr));
}

int occupancy(const void* kernel, int block_size, size_t dyn_smem) {
  KernelInfo& k = kernel_info(nullptr, kernel);
  if (!k.probed)
    unsupported(
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor before the kernel's first launch "
        "(its __launch_bounds__ are not known yet)");
  return occupancy_of(k, block_size, dyn_smem);
}

}  // namespace cudasim

using namespace cudasim;

void __trap() { fault(cudaErrorLaunchFailure, "__trap()"); }

// ---- runtime API
// ---------------------------------------------------------------------------------
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction:
      return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout:
      return "cudaErrorLaunchTimeout";
    case cudaErrorAssert:
      return "cudaErrorAssert";
    case cudaErrorIllegalInstruction:
      return "cudaErrorIllegalInstruction";
    case cudaErrorMisalignedAddress:
      return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorCooperativeLaunchTooLarge:
      return "cudaErrorCooperativeLaunchTooLarge";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorUnknown:
      return "cudaErrorUnknown";
  }
  return "cudaError?";
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
    case cudaDevAttrMaxBlockDimX:
      *value = 1024;
      break;
    case cudaDevAttrMaxGridDimX:
      *value = 0x7fffffff;
      break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
      *value = 65535;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = int(kDefaultDynMax);
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = sm_count();
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = g_cc / 10;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = g_cc % 10;
      break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = int(smem_per_sm());
      break;
    case cudaDevAttrCooperativeLaunch:
      *value = 1;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(smem_optin());
      break;
    default:
      unsupported("cudaDeviceGetAttribute(%d)", int(attr));
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // every launch ran synchronously
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  return cudaMemsetAsync(p, value, bytes, nullptr);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind k) {
  return cudaMemcpyAsync(dst, src, bytes, k, nullptr);
}
struct CUevent_st {
  int recorded = 0;
};
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  e->recorded = 1;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }

// ---- C API for the tests (ctypes) -------------------------------------------------------------
extern "C" {
// schedule: 0 forward, 1 reverse, 2 seeded shuffle; cc: 80 or 90.
void cudasim_configure(int schedule, unsigned long long seed, int cc) {
  g_schedule = schedule;
  g_seed = seed;
  g_rng.seed(seed);
  g_cc = cc;
}
const char* cudasim_last_message() { return g_last_message.c_str(); }
void cudasim_clear_message() { g_last_message.clear(); }
long long cudasim_launches() { return g_launches; }
long long cudasim_launch_errors() { return g_launch_errors; }
long long cudasim_faults() { return g_faults; }
}
