// Chooses the kernel variant once, from what the CPU reports (the way ATen's CPU capability
// dispatch works), and runs the chosen variant's tasks on torch's thread pool.
//
// Compiled with the baseline flags: nothing here may execute an instruction the oldest
// supported CPU lacks.
//
// ROLLINGQ_CPU_ISA=amx|avx512|avx512_dot|avx2|generic overrides the choice (read at the first kernel call);
// a name this library does not know or this CPU cannot run is an error, never a silent
// downgrade. The C functions at the end let tests and benchmarks read and switch the variant of
// the loaded library (through ctypes).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "cpu/attention_cpu.h"
#include "cpu/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define ROLLINGQ_X86 1
#endif

namespace rollingq {
namespace cpu {
namespace {

// In order of preference: the best runnable one is chosen. avx512_dot (bf16 products by
// VDPBF16PS) and avx512 (bf16 converted to float32) swap places by vendor: on AMD's Zen 4
// VDPBF16PS does twice the multiply-adds of a float32 FMA per cycle and the bf16 calls run
// 1.7-1.9x faster through it; on Intel Xeons it multiplies at half the FMA rate, and those with
// AMX-BF16 take amx anyway (docs/build.md, docs/performance.md).
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512Dot = 2, kAvx512 = 3, kAmx = 4 };
constexpr int kIsaCount = 5;
constexpr const char* kIsaNames[kIsaCount] = {"generic", "avx2", "avx512_dot", "avx512", "amx"};

const KernelTable* compiled_table(Isa isa) {
  switch (isa) {
    case Isa::kGeneric:
      return &isa_generic::table;
#ifdef ROLLINGQ_ISA_AVX2
    case Isa::kAvx2:
      return &isa_avx2::table;
#endif
#ifdef ROLLINGQ_ISA_AVX512
    case Isa::kAvx512:
      return &isa_avx512::table;
    case Isa::kAvx512Dot:
      return &isa_avx512::table_dot;
    case Isa::kAmx:
      return &isa_avx512::table_amx;
#endif
    default:
      return nullptr;
  }
}

#ifdef ROLLINGQ_X86
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux keeps the AMX tile data state off until the process asks for it (kernel >= 5.16).
bool request_amx_state() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

struct CpuSupport {
  bool isa[kIsaCount] = {true, false, false, false, false};
  // Best first; every variant appears once.
  Isa order[kIsaCount] = {Isa::kAmx, Isa::kAvx512, Isa::kAvx512Dot, Isa::kAvx2, Isa::kGeneric};
};

CpuSupport detect() {
  CpuSupport s;
#ifdef ROLLINGQ_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return s;
  const bool fma = c & (1u << 12), movbe = c & (1u << 22), osxsave = c & (1u << 27);
  const bool avx = c & (1u << 28), f16c = c & (1u << 29);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return s;
  __cpuid_count(7, 0, a, b, c, d);
  const bool bmi1 = b & (1u << 3), avx2 = b & (1u << 5), bmi2 = b & (1u << 8);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512cd = b & (1u << 28);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  __cpuid_count(7, 1, a, b, c, d);
  const bool avx512bf16 = a & (1u << 5);
  unsigned ea = 0, eb = 0, ec = 0, ed = 0;
  __get_cpuid(0x80000001, &ea, &eb, &ec, &ed);
  const bool lzcnt = ec & (1u << 5);
  // x86-64-v3 and v4 as the compilers define them (the variants are built with -march=x86-64-vN)
  const bool v3 = os_avx && avx && avx2 && fma && f16c && bmi1 && bmi2 && lzcnt && movbe;
  const bool v4 = v3 && os_avx512 && avx512f && avx512dq && avx512cd && avx512bw && avx512vl;
  s.isa[int(Isa::kAvx2)] = v3;
  s.isa[int(Isa::kAvx512)] = v4 && avx512bf16;
  s.isa[int(Isa::kAvx512Dot)] = s.isa[int(Isa::kAvx512)];
  s.isa[int(Isa::kAmx)] = s.isa[int(Isa::kAvx512)] && amx_tile && amx_bf16 && request_amx_state();
  unsigned vendor[4] = {0, 0, 0, 0};
  __get_cpuid(0, &vendor[3], &vendor[0], &vendor[2], &vendor[1]);  // EBX, EDX, ECX spell it
  if (std::memcmp(vendor, "AuthenticAMD", 12) == 0) std::swap(s.order[1], s.order[2]);
#endif
  return s;
}

const CpuSupport& support() {
  static const CpuSupport s = detect();
  return s;
}

bool runnable(Isa isa) { return support().isa[int(isa)] && compiled_table(isa) != nullptr; }

int parse_isa(const char* name) {
  for (int i = 0; i < kIsaCount; ++i)
    if (std::strcmp(name, kIsaNames[i]) == 0) return i;
  return -1;
}

std::string runnable_list() {
  std::string s;
  for (Isa isa : support().order)
    if (runnable(isa)) s += (s.empty() ? "" : ",") + std::string(kIsaNames[int(isa)]);
  return s;
}

std::atomic<const KernelTable*> g_table{nullptr};
std::once_flag g_init;
std::string g_init_error;

void init() {
  const char* env = std::getenv("ROLLINGQ_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const int i = parse_isa(env);
    if (i < 0) {
      g_init_error = std::string("ROLLINGQ_CPU_ISA=") + env +
                     " is not a kernel variant; known: amx, avx512, avx512_dot, avx2, generic";
      return;
    }
    if (!runnable(Isa(i))) {
      g_init_error = std::string("ROLLINGQ_CPU_ISA=") + env +
                     ": this CPU or this build cannot run that variant; it can run: " +
                     runnable_list();
      return;
    }
    g_table.store(compiled_table(Isa(i)));
    return;
  }
  for (Isa isa : support().order)
    if (runnable(isa)) {
      g_table.store(compiled_table(isa));
      return;
    }
}

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) return *t;
  std::call_once(g_init, init);
  t = g_table.load(std::memory_order_acquire);
  TORCH_CHECK(t != nullptr, "rollingq (CPU): ", g_init_error);
  return *t;
}

// ---- workspaces and tasks ----------------------------------------------------------------------

// Each thread keeps its workspace between calls (no allocation per call once warm), up to this
// size; larger ones are freed after the call.
constexpr size_t kKeepBytes = size_t(64) << 20;

struct ThreadBuffer {
  char* data = nullptr;
  size_t size = 0;
  ~ThreadBuffer() { release(); }
  void release() {
    if (data) ::operator delete(data, std::align_val_t(64));
    data = nullptr;
    size = 0;
  }
};

class Workspace {
 public:
  explicit Workspace(size_t bytes) {
    thread_local ThreadBuffer buffer;
    buf_ = &buffer;
    if (bytes > buffer.size) {
      buffer.release();
      buffer.data = static_cast<char*>(::operator new(bytes, std::align_val_t(64)));
      buffer.size = bytes;
    }
  }
  ~Workspace() {
    if (buf_->size > kKeepBytes) buf_->release();
  }
  void* get() const { return buf_->data; }

 private:
  ThreadBuffer* buf_;
};

// A problem of a few MFLOP runs on the calling thread: waking the pool costs more.
constexpr int64_t kMinParallelFlops = int64_t(1) << 22;
// What a task costs besides its products (setting up its tile, packing its keys, writing its
// rows and statistics: 0.3-0.5 us), counted as products. Without it 1024 heads of one query over
// 16 keys (4 KFLOP each) ran on one thread, 2.0x the time of torch's SDPA on two.
constexpr int64_t kTaskOverheadFlops = int64_t(1) << 14;

// The threads take chunks of tasks from a shared counter instead of a fixed share each: on a
// core shared with another process a fixed share leaves the other thread waiting at the end
// (with a busy loop beside the call on one of the two cores, the chunks took 0.86-0.97x the
// time of fixed halves; on quiet cores the two were level within 2 %). A chunk is about
// 1 / kChunksPerThread of a thread's share. Which thread runs a task changes no result: every
// output element is reduced inside one task.
constexpr int64_t kChunksPerThread = 8;

}  // namespace

// Tasks per chunk: `share` (about 1 / kChunksPerThread of a thread's tasks, at least the grain)
// rounded up to whole task groups (a head's query tiles, which share the head's packed K and V),
// unless whole groups would load the threads unevenly: fewer groups than chunks wanted and a
// count the threads do not divide (one head of 1000 queries was one chunk, so one thread ran it
// all while the others idled). Then a chunk is a near-equal part of a group, and a thread that
// takes part of a head packs that head's rows itself (once: its workspace keeps them).
int64_t chunk_tasks(int64_t n, int64_t share, int64_t group, int64_t threads) {
  group = std::max<int64_t>(1, group);
  share = std::max<int64_t>(1, share);
  const int64_t groups = (n + group - 1) / group;
  if (share >= group || groups % threads == 0 || groups >= threads * kChunksPerThread)
    return (share + group - 1) / group * group;
  const int64_t parts = (group + share - 1) / share;
  return (group + parts - 1) / parts;
}

namespace {

template <typename F>
void run_tasks(int64_t n, int64_t flops_per_task, int64_t group, size_t workspace_bytes,
               const F& body) {
  if (n <= 0) return;
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelFlops / std::max(kTaskOverheadFlops, flops_per_task));
  if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    Workspace ws(workspace_bytes);
    body(0, n, ws.get());
    return;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  const int64_t chunk =
      chunk_tasks(n, std::max<int64_t>(grain, n / (threads * kChunksPerThread)), group, threads);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Workspace ws(workspace_bytes);
    for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
      body(begin, std::min(n, begin + chunk), ws.get());
  });
}

struct SharedBuffer {
  explicit SharedBuffer(size_t bytes)
      : data(bytes ? static_cast<char*>(::operator new(bytes, std::align_val_t(64))) : nullptr) {}
  ~SharedBuffer() {
    if (data) ::operator delete(data, std::align_val_t(64));
  }
  char* data;
};

}  // namespace

// The threads run_tasks spreads tasks over.
int64_t task_threads() {
  return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// Outputs of at least this many bytes are written with streaming stores (straight to memory,
// without first reading each line into the cache): ROLLINGQ_CPU_STREAM_BYTES, default 1 MiB,
// -1 never. Ordinary stores into an output that is not in the cache read every line first: that
// doubled the bf16 forward's epilogue. Attention followed by its output projection took 0.97x
// the time (median) with 1.7-8 MiB outputs streamed, the projection no slower
// (`python -m bench.cpu_bench --only stream`, docs/performance.md).
constexpr int64_t kDefaultStreamBytes = int64_t(1) << 20;
std::atomic<int64_t> g_stream_bytes{std::numeric_limits<int64_t>::min()};

int64_t stream_bytes() {
  int64_t v = g_stream_bytes.load(std::memory_order_relaxed);
  if (v != std::numeric_limits<int64_t>::min()) return v;
  v = kDefaultStreamBytes;
  if (const char* env = std::getenv("ROLLINGQ_CPU_STREAM_BYTES")) {
    char* end = nullptr;
    const long long parsed = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && parsed >= -1,
                "rollingq (CPU): ROLLINGQ_CPU_STREAM_BYTES=", env,
                " is not a byte count (an integer >= 0, or -1 for never)");
    v = parsed;
  }
  g_stream_bytes.store(v, std::memory_order_relaxed);
  return v;
}

void attention_fwd(const AttentionParams& p, ElementType type) {
  const KernelTable& t = table();
  Plan plan;
  plan.threads = task_threads();
  plan.stream_bytes = stream_bytes();
  t.fwd_plan(p, type, plan);
  run_tasks(plan.tasks, plan.flops_per_task, plan.task_group, plan.workspace_bytes,
            [&](int64_t b, int64_t e, void* ws) { t.fwd_run(p, type, plan, b, e, ws); });
}

void attention_bwd(const AttentionBwdParams& p, ElementType type) {
  const KernelTable& t = table();
  Plan plan;
  plan.threads = task_threads();
  t.bwd_plan(p, type, plan);
  SharedBuffer shared(plan.shared_bytes);
  run_tasks(plan.tasks, plan.flops_per_task, plan.task_group, plan.workspace_bytes, [&](int64_t b, int64_t e, void* ws) {
    t.bwd_run(p, type, plan, b, e, ws, shared.data);
  });
  run_tasks(plan.reduce_tasks, plan.flops_per_task, 1, plan.workspace_bytes,
            [&](int64_t b, int64_t e, void* ws) { t.bwd_reduce(p, type, plan, b, e, ws, shared.data); });
}

const char* isa_name() { return table().name; }

}  // namespace cpu
}  // namespace rollingq

// ---- C interface for tests and benchmarks (ctypes) -----------------------------------------------

// Name of the variant in use; "" (and the error printed by the next kernel call) when
// ROLLINGQ_CPU_ISA names one that cannot run.
extern "C" __attribute__((visibility("default"))) const char* rollingq_cpu_isa() {
  try {
    return rollingq::cpu::isa_name();
  } catch (...) {
    return "";
  }
}

// Variants this CPU and this build can run, best first, comma-separated.
extern "C" __attribute__((visibility("default"))) const char* rollingq_cpu_isas() {
  static const std::string list = rollingq::cpu::runnable_list();
  return list.c_str();
}

// Switch the variant for the following calls (not while a kernel runs). 0 on success, -1 for
// an unknown name, -2 for a variant this CPU or build cannot run.
extern "C" __attribute__((visibility("default"))) int rollingq_cpu_set_isa(const char* name) {
  using namespace rollingq::cpu;
  const int i = parse_isa(name);
  if (i < 0) return -1;
  if (!runnable(Isa(i))) return -2;
  g_table.store(compiled_table(Isa(i)), std::memory_order_release);
  return 0;
}

// The variant in use's bf16 conversions (KernelTable::bf16_from_float / bf16_to_float):
// to_bf16 != 0 converts n float32 at src to bf16 at dst, else n bf16 to float32. 0 on success,
// -1 when no variant can run.
extern "C" __attribute__((visibility("default"))) int rollingq_cpu_bf16_convert(const void* src,
                                                                                void* dst,
                                                                                int64_t n,
                                                                                int to_bf16) {
  try {
    const rollingq::cpu::KernelTable& t = rollingq::cpu::table();
    if (to_bf16)
      t.bf16_from_float(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
    else
      t.bf16_to_float(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Set the streaming-store threshold of the following calls (bytes; -1 never), as
// ROLLINGQ_CPU_STREAM_BYTES does; returns the previous one.
extern "C" __attribute__((visibility("default"))) int64_t rollingq_cpu_set_stream_bytes(int64_t bytes) {
  try {
    const int64_t previous = rollingq::cpu::stream_bytes();
    rollingq::cpu::g_stream_bytes.store(bytes < -1 ? -1 : bytes, std::memory_order_relaxed);
    return previous;
  } catch (...) {
    return -2;
  }
}

// Tasks per chunk that run_tasks hands the threads (chunk_tasks), for tests.
extern "C" __attribute__((visibility("default"))) int64_t rollingq_cpu_chunk_tasks(int64_t n,
                                                                                  int64_t share,
                                                                                  int64_t group,
                                                                                  int64_t threads) {
  return rollingq::cpu::chunk_tasks(n, share, group, std::max<int64_t>(1, threads));
}
