// The SIMT executor declared in simt_emulator.h: fibers (ucontext) for the threads of a block, a
// scheduler that resolves barriers and warp collectives, and the shadow state of shared memory
// that finds races and bank conflicts. Single-threaded; one launch at a time.
#include "simt_emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <array>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <tuple>

namespace rollingq {
namespace emu {

// ---- 16-bit conversions ------------------------------------------------------------------------
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400) == 0);
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t exp = (x >> 23) & 0xff;
  uint32_t mant = x & 0x7fffff;
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (mant ? 0x200 : 0));
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e > 30) return static_cast<uint16_t>(sign | 0x7c00);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000;
    const int shift = 14 - e;
    uint32_t m = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (m & 1))) ++m;
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;  // a carry may reach the exponent (inf)
  return static_cast<uint16_t>(h);
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // NaN
  x += 0x7fffu + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

namespace {

// ---- state -------------------------------------------------------------------------------------
enum class St { kReady, kBarrier, kWarpOp, kDone, kFailed };
enum class Op { kNone, kShfl, kBallot, kLdsm, kLdsmT, kMmaBf16, kMmaF16 };

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  St st = St::kReady;
  Op op = Op::kNone;
  const char* file = nullptr;
  int line = 0;
  float f = 0.f;
  int i = 0;
  uint32_t u = 0;
  const void* addr = nullptr;
  uint32_t a[4] = {0, 0, 0, 0}, b0 = 0, b1 = 0;
  float c[4] = {0, 0, 0, 0};
  uint32_t r[4] = {0, 0, 0, 0};
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
  std::map<std::tuple<const char*, int, int>, int> occurrence;
};

struct Shadow {
  int32_t w_epoch = -1;
  int32_t r_epoch = -1;
  int16_t writer = -1;
  int16_t reader = -1;  // -2: several threads
  uint8_t pending = 0;
};

struct Buffer {
  const unsigned char* ptr;
  size_t bytes;
  bool writable;
  std::string name;
  std::vector<uint8_t> written;  // per byte, this launch
};

struct Access {
  uintptr_t addr = 0;
  int bytes = 0;  // 0: lane inactive
};

// Per-thread shared-memory accesses of one site, grouped into warp instructions: the k-th
// execution of the site by each lane of a warp forms one instruction (lanes run in lockstep
// through converged code, so this is the instruction the hardware would issue).
struct SiteLog {
  std::string name;
  std::map<int, std::vector<std::array<Access, 32>>> per_warp;
};

constexpr size_t kStackBytes = 512 * 1024;
constexpr int kMaxOccurrencesLogged = 4096;

std::vector<Buffer> g_buffers;

struct Launch {
  Dim3 grid, block_idx;
  int nthreads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  std::vector<Thread> threads;
  Thread* running = nullptr;
  int running_index = 0;
  ucontext_t sched;
  int32_t epoch = 0;
  std::string error;
  const std::function<void(unsigned char*)>* body = nullptr;
  std::map<std::pair<const char*, int>, SiteStats> stats;  // collectives (ldmatrix)
  std::map<std::tuple<const char*, int, int>, SiteLog> logs;
};

Launch* g = nullptr;

std::string site_name(const char* file, int line, const char* kind) {
  std::string f = file ? file : "?";
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  std::ostringstream os;
  os << f << ":" << line << " " << kind;
  return os.str();
}

Thread& self() { return *g->running; }
int self_id() { return g->running_index; }

[[noreturn]] void fail_in_fiber(const std::string& msg) {
  if (g->error.empty()) {
    std::ostringstream os;
    os << "block (" << g->block_idx.x << "," << g->block_idx.y << "," << g->block_idx.z
       << ") thread " << self_id() << ": " << msg;
    g->error = os.str();
  }
  Thread& th = self();
  th.st = St::kFailed;
  swapcontext(&th.ctx, &g->sched);
  std::abort();  // a failed fiber is never resumed
}

void fail_in_scheduler(const std::string& msg) {
  if (g->error.empty()) {
    std::ostringstream os;
    os << "block (" << g->block_idx.x << "," << g->block_idx.y << "," << g->block_idx.z
       << "): " << msg;
    g->error = os.str();
  }
}

// Block the running fiber until the scheduler resolves what it waits for.
void block_on(St st) {
  Thread& th = self();
  th.st = st;
  swapcontext(&th.ctx, &g->sched);
}

void fiber_entry() {
  (*g->body)(g->smem);
  Thread& th = self();
  bool in_flight = !th.open.empty();
  for (const auto& grp : th.groups) in_flight = in_flight || !grp.empty();
  if (in_flight) fail_in_fiber("finished with cp.async copies that no cp.async.wait_group covered");
  th.st = St::kDone;
  swapcontext(&th.ctx, &g->sched);
  std::abort();
}

// ---- shared memory shadow -----------------------------------------------------------------------
size_t smem_offset(const void* p, int bytes, const char* what, const char* file, int line) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < g->smem || c + bytes > g->smem + g->smem_bytes) {
    std::ostringstream os;
    os << site_name(file, line, what) << ": shared-memory access of " << bytes
       << " bytes outside the block's " << g->smem_bytes << " bytes (offset "
       << static_cast<long long>(c - g->smem) << ")";
    fail_in_fiber(os.str());
  }
  if (reinterpret_cast<uintptr_t>(c) % bytes != 0) {
    std::ostringstream os;
    os << site_name(file, line, what) << ": misaligned " << bytes << "-byte shared access";
    fail_in_fiber(os.str());
  }
  return static_cast<size_t>(c - g->smem);
}

std::string race(const char* what, const char* file, int line, size_t off, const char* detail) {
  std::ostringstream os;
  os << site_name(file, line, what) << ": shared byte " << off << ": " << detail;
  return os.str();
}

// strict: also a write by the reading thread itself in this epoch is a race (the data of an
// ldmatrix row goes to other lanes).
void shadow_read(size_t off, int bytes, int reader, bool strict, const char* what,
                 const char* file, int line) {
  for (int k = 0; k < bytes; ++k) {
    Shadow& s = g->shadow[off + k];
    if (s.pending)
      fail_in_fiber(race(what, file, line, off + k,
                         "read while a cp.async into it is in flight (no wait_group + barrier)"));
    if (s.w_epoch == g->epoch && (strict || s.writer != reader))
      fail_in_fiber(race(what, file, line, off + k,
                         "read after another thread wrote it with no barrier in between"));
    if (s.r_epoch == g->epoch && s.reader != reader)
      s.reader = -2;
    else
      s.reader = static_cast<int16_t>(reader);
    s.r_epoch = g->epoch;
  }
}

void shadow_write_check(size_t off, int bytes, int writer, const char* what, const char* file,
                        int line) {
  for (int k = 0; k < bytes; ++k) {
    const Shadow& s = g->shadow[off + k];
    if (s.pending)
      fail_in_fiber(race(what, file, line, off + k, "written while a cp.async into it is in flight"));
    if (s.r_epoch == g->epoch && s.reader != writer)
      fail_in_fiber(race(what, file, line, off + k,
                         "written after another thread read it with no barrier in between"));
    if (s.w_epoch == g->epoch && s.writer != writer)
      fail_in_fiber(race(what, file, line, off + k,
                         "written by two threads with no barrier in between"));
  }
}

void shadow_write_done(size_t off, int bytes, int writer) {
  for (int k = 0; k < bytes; ++k) {
    Shadow& s = g->shadow[off + k];
    s.pending = 0;
    s.w_epoch = g->epoch;
    s.writer = static_cast<int16_t>(writer);
  }
}

void log_access(const char* file, int line, int kind, const char* kind_name, const void* p,
                int bytes) {
  const int tid = self_id();
  auto key = std::make_tuple(file, line, kind);
  const int k = self().occurrence[key]++;
  if (k >= kMaxOccurrencesLogged) return;
  SiteLog& log = g->logs[key];
  if (log.name.empty()) log.name = site_name(file, line, kind_name);
  auto& v = log.per_warp[tid / 32];
  if (static_cast<int>(v.size()) <= k) v.resize(k + 1);
  v[k][tid % 32] = Access{reinterpret_cast<uintptr_t>(p), bytes};
}

// Wavefronts of one warp instruction and its worst bank-conflict degree.
std::pair<int, int> wavefronts(const std::array<Access, 32>& acc) {
  int size = 0;
  for (const auto& a : acc) size = std::max(size, a.bytes);
  if (size == 0) return {0, 0};
  const int lanes_per_phase = size <= 4 ? 32 : (size == 8 ? 16 : 8);
  int total = 0, worst = 0;
  for (int ph = 0; ph < 32; ph += lanes_per_phase) {
    std::map<int, std::set<uintptr_t>> banks;
    for (int l = ph; l < ph + lanes_per_phase; ++l) {
      if (acc[l].bytes == 0) continue;
      const uintptr_t first = acc[l].addr / 4, last = (acc[l].addr + acc[l].bytes - 1) / 4;
      for (uintptr_t w = first; w <= last; ++w) banks[static_cast<int>(w % 32)].insert(w);
    }
    int ways = 0;
    for (const auto& kv : banks) ways = std::max(ways, static_cast<int>(kv.second.size()));
    total += ways;
    worst = std::max(worst, ways);
  }
  return {total, worst};
}

// ---- global memory ------------------------------------------------------------------------------
Buffer* find_buffer(const void* p, int bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (auto& b : g_buffers)
    if (c >= b.ptr && c + bytes <= b.ptr + b.bytes) return &b;
  return nullptr;
}

void check_global(const void* p, int bytes, bool write, const char* what, const char* file,
                  int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream os;
    os << site_name(file, line, what) << ": misaligned " << bytes << "-byte global access";
    fail_in_fiber(os.str());
  }
  Buffer* b = find_buffer(p, bytes);
  if (b == nullptr) {
    std::ostringstream os;
    os << site_name(file, line, what) << ": global access of " << bytes << " bytes at " << p
       << " outside every buffer of the launch";
    fail_in_fiber(os.str());
  }
  if (!write) return;
  if (!b->writable) {
    std::ostringstream os;
    os << site_name(file, line, what) << ": write into the read-only buffer " << b->name;
    fail_in_fiber(os.str());
  }
  const size_t off = static_cast<const unsigned char*>(p) - b->ptr;
  for (int k = 0; k < bytes; ++k) {
    if (b->written[off + k]) {
      std::ostringstream os;
      os << site_name(file, line, what) << ": byte " << off + k << " of " << b->name
         << " written twice in one launch";
      fail_in_fiber(os.str());
    }
    b->written[off + k] = 1;
  }
}

// ---- warp collectives ---------------------------------------------------------------------------
// mma.m16n8k16 fragments (PTX ISA): element index i of a lane's A (0..7), B (0..3), C (0..3).
int a_row(int lane, int i) { return (lane >> 2) + (((i >> 1) & 1) ? 8 : 0); }
int a_col(int lane, int i) { return 2 * (lane & 3) + (i & 1) + (i >= 4 ? 8 : 0); }
int b_row(int lane, int i) { return 2 * (lane & 3) + (i & 1) + (i >= 2 ? 8 : 0); }
int b_col(int lane) { return lane >> 2; }
int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

float to_f(uint16_t bits, bool bf16) { return bf16 ? bf16_to_float(bits) : half_to_float(bits); }

void run_mma(Thread* lanes, bool bf16) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = lanes[l].a[i / 2];
      A[a_row(l, i)][a_col(l, i)] = to_f(static_cast<uint16_t>(i & 1 ? reg >> 16 : reg), bf16);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = i < 2 ? lanes[l].b0 : lanes[l].b1;
      B[b_row(l, i)][b_col(l)] = to_f(static_cast<uint16_t>(i & 1 ? reg >> 16 : reg), bf16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) {
      double acc = lanes[l].c[i];
      for (int k = 0; k < 16; ++k) acc += A[c_row(l, i)][k] * B[k][c_col(l, i)];
      lanes[l].c[i] = static_cast<float>(acc);
    }
  }
}

bool run_ldmatrix(Thread* lanes, int warp, bool trans) {
  uint16_t rows[4][8][8];
  std::array<Access, 32> acc;
  const char* file = lanes[0].file;
  const int line = lanes[0].line;
  for (int m = 0; m < 4; ++m) {
    for (int r = 0; r < 8; ++r) {
      const int l = 8 * m + r;
      const auto* p = static_cast<const unsigned char*>(lanes[l].addr);
      if (p < g->smem || p + 16 > g->smem + g->smem_bytes ||
          reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        fail_in_scheduler(site_name(file, line, "ldmatrix") + ": lane " + std::to_string(l) +
                          " gives a row address outside shared memory or not 16-byte aligned");
        return false;
      }
      const size_t off = static_cast<size_t>(p - g->smem);
      for (int k = 0; k < 16; ++k) {
        Shadow& s = g->shadow[off + k];
        if (s.pending || s.w_epoch == g->epoch) {
          fail_in_scheduler(race("ldmatrix", file, line, off + k,
                                 s.pending ? "read while a cp.async into it is in flight"
                                           : "read in the epoch it was written (no barrier)"));
          return false;
        }
        const int reader = 32 * warp + l;
        s.reader = (s.r_epoch == g->epoch && s.reader != reader) ? -2 : static_cast<int16_t>(reader);
        s.r_epoch = g->epoch;
      }
      std::memcpy(rows[m][r], p, 16);
      acc[l] = Access{reinterpret_cast<uintptr_t>(p), 16};
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int q = l >> 2, c2 = 2 * (l & 3);
    for (int m = 0; m < 4; ++m) {
      const uint32_t lo = trans ? rows[m][c2][q] : rows[m][q][c2];
      const uint32_t hi = trans ? rows[m][c2 + 1][q] : rows[m][q][c2 + 1];
      lanes[l].r[m] = lo | (hi << 16);
    }
  }
  auto& st = g->stats[{file, line}];
  if (st.site.empty()) st.site = site_name(file, line, trans ? "ldmatrix.trans" : "ldmatrix");
  const auto wf = wavefronts(acc);
  st.instructions += 1;
  st.wavefronts += wf.first;
  st.max_ways = std::max(st.max_ways, wf.second);
  return true;
}

bool resolve_warp(int w) {
  Thread* lanes = &g->threads[32 * w];
  const Op op = lanes[0].op;
  for (int l = 0; l < 32; ++l) {
    if (lanes[l].op != op || lanes[l].file != lanes[0].file || lanes[l].line != lanes[0].line) {
      fail_in_scheduler("divergent warp collective: lane 0 at " +
                        site_name(lanes[0].file, lanes[0].line, "") + ", lane " +
                        std::to_string(l) + " at " + site_name(lanes[l].file, lanes[l].line, ""));
      return false;
    }
  }
  switch (op) {
    case Op::kShfl: {
      float v[32];
      for (int l = 0; l < 32; ++l) v[l] = lanes[l].f;
      for (int l = 0; l < 32; ++l) lanes[l].f = v[(l ^ lanes[l].i) & 31];
      break;
    }
    case Op::kBallot: {
      uint32_t bits = 0;
      for (int l = 0; l < 32; ++l) bits |= (lanes[l].i ? 1u : 0u) << l;
      for (int l = 0; l < 32; ++l) lanes[l].u = bits;
      break;
    }
    case Op::kLdsm:
    case Op::kLdsmT:
      if (!run_ldmatrix(lanes, w, op == Op::kLdsmT)) return false;
      break;
    case Op::kMmaBf16:
    case Op::kMmaF16:
      run_mma(lanes, op == Op::kMmaBf16);
      break;
    case Op::kNone:
      fail_in_scheduler("internal: warp op without a kind");
      return false;
  }
  for (int l = 0; l < 32; ++l) lanes[l].st = St::kReady;
  return true;
}

void warp_op(Op op, const char* file, int line) {
  Thread& th = self();
  th.op = op;
  th.file = file;
  th.line = line;
  block_on(St::kWarpOp);
}

std::string describe_states() {
  std::ostringstream os;
  std::map<std::string, int> count;
  for (const auto& th : g->threads) {
    std::string k;
    switch (th.st) {
      case St::kDone: k = "finished"; break;
      case St::kBarrier: k = "at " + site_name(th.file, th.line, "__syncthreads"); break;
      case St::kWarpOp: k = "at " + site_name(th.file, th.line, "warp collective"); break;
      default: k = "other"; break;
    }
    count[k]++;
  }
  for (const auto& kv : count) os << kv.second << " threads " << kv.first << "; ";
  return os.str();
}

bool run_block() {
  const int n = g->nthreads;
  for (int t = 0; t < n; ++t) {
    Thread& th = g->threads[t];
    th.st = St::kReady;
    th.open.clear();
    th.groups.clear();
    th.occurrence.clear();
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = th.stack.get();
    th.ctx.uc_stack.ss_size = kStackBytes;
    th.ctx.uc_link = nullptr;
    makecontext(&th.ctx, fiber_entry, 0);
  }
  for (;;) {
    for (int t = 0; t < n; ++t) {
      Thread& th = g->threads[t];
      while (th.st == St::kReady) {
        g->running = &th;
        g->running_index = t;
        swapcontext(&g->sched, &th.ctx);
        if (th.st == St::kFailed || !g->error.empty()) return false;
      }
    }
    bool all_done = true, progress = false;
    for (const auto& th : g->threads) all_done = all_done && th.st == St::kDone;
    if (all_done) return true;
    for (int w = 0; w < n / 32; ++w) {
      bool all = true;
      for (int l = 0; l < 32; ++l) all = all && g->threads[32 * w + l].st == St::kWarpOp;
      if (!all) continue;
      if (!resolve_warp(w)) return false;
      progress = true;
    }
    if (!progress) {
      bool all_barrier = true;
      for (const auto& th : g->threads) all_barrier = all_barrier && th.st == St::kBarrier;
      if (all_barrier) {
        for (const auto& th : g->threads) {
          if (th.file != g->threads[0].file || th.line != g->threads[0].line) {
            fail_in_scheduler("threads wait at different __syncthreads: " + describe_states());
            return false;
          }
        }
        ++g->epoch;
        for (auto& th : g->threads) th.st = St::kReady;
        progress = true;
      }
    }
    if (!progress) {
      fail_in_scheduler("deadlock (a barrier or warp collective that not every thread reaches): " +
                        describe_states());
      return false;
    }
  }
}

void collect_logs(std::map<std::string, SiteStats>* out) {
  for (auto& kv : g->logs) {
    SiteLog& log = kv.second;
    SiteStats& st = (*out)[log.name];
    st.site = log.name;
    for (auto& wv : log.per_warp) {
      for (const auto& instr : wv.second) {
        const auto wf = wavefronts(instr);
        if (wf.first == 0) continue;
        st.instructions += 1;
        st.wavefronts += wf.first;
        st.max_ways = std::max(st.max_ways, wf.second);
      }
    }
  }
  g->logs.clear();
}

}  // namespace

// ---- public API ---------------------------------------------------------------------------------
void clear_buffers() { g_buffers.clear(); }

void register_buffer(const void* ptr, size_t bytes, bool writable, const char* name) {
  if (ptr == nullptr || bytes == 0) return;
  g_buffers.push_back(Buffer{static_cast<const unsigned char*>(ptr), bytes, writable, name, {}});
}

std::string launch(Dim3 grid, int threads_per_block, size_t smem_bytes,
                   const std::function<void(unsigned char*)>& body, std::vector<SiteStats>* stats) {
  if (threads_per_block <= 0 || threads_per_block % 32 != 0 || threads_per_block > 1024)
    return "threads per block must be a positive multiple of 32, at most 1024";
  Launch L;
  L.grid = grid;
  L.nthreads = threads_per_block;
  L.smem_bytes = smem_bytes;
  L.body = &body;
  // 128-byte aligned like the GPU's shared window, so that bank numbers are the hardware's
  const size_t alloc = (smem_bytes + 127) / 128 * 128 + 128;
  std::unique_ptr<unsigned char, void (*)(void*)> smem_buf(
      static_cast<unsigned char*>(std::aligned_alloc(128, alloc)), std::free);
  L.threads.resize(threads_per_block);
  for (auto& th : L.threads) th.stack.reset(new char[kStackBytes]);
  for (auto& b : g_buffers) b.written.assign(b.writable ? b.bytes : 0, 0);
  g = &L;
  std::map<std::string, SiteStats> collected;
  bool ok = true;
  for (int z = 0; z < grid.z && ok; ++z) {
    for (int y = 0; y < grid.y && ok; ++y) {
      for (int x = 0; x < grid.x && ok; ++x) {
        L.block_idx = Dim3{x, y, z};
        // fresh shared memory per block, filled with a NaN pattern: an unwritten read shows up
        L.smem = smem_buf.get();
        std::memset(L.smem, 0xff, alloc);
        L.shadow.assign(smem_bytes, Shadow{});
        L.epoch = 0;
        ok = run_block();
        collect_logs(&collected);
      }
    }
  }
  if (stats != nullptr) {
    for (auto& kv : L.stats) collected[kv.second.site] = kv.second;
    for (auto& kv : collected) stats->push_back(kv.second);
  }
  std::string err = L.error;
  g = nullptr;
  return err;
}

int thread_index() { return self_id(); }

int block_index(int axis) {
  return axis == 0 ? g->block_idx.x : (axis == 1 ? g->block_idx.y : g->block_idx.z);
}

int grid_size(int axis) { return axis == 0 ? g->grid.x : (axis == 1 ? g->grid.y : g->grid.z); }

void sync_threads(const char* file, int line) {
  Thread& th = self();
  th.file = file;
  th.line = line;
  block_on(St::kBarrier);
}

float shfl_xor(float v, int lane_mask, const char* file, int line) {
  Thread& th = self();
  th.f = v;
  th.i = lane_mask;
  warp_op(Op::kShfl, file, line);
  return th.f;
}

uint32_t ballot(bool pred, const char* file, int line) {
  Thread& th = self();
  th.i = pred ? 1 : 0;
  warp_op(Op::kBallot, file, line);
  return th.u;
}

void ldmatrix_x4(uint32_t* r, const void* row_addr, bool trans, const char* file, int line) {
  Thread& th = self();
  th.addr = row_addr;
  warp_op(trans ? Op::kLdsmT : Op::kLdsm, file, line);
  for (int k = 0; k < 4; ++k) r[k] = th.r[k];
}

void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16, const char* file,
               int line) {
  Thread& th = self();
  for (int k = 0; k < 4; ++k) {
    th.a[k] = a[k];
    th.c[k] = c[k];
  }
  th.b0 = b0;
  th.b1 = b1;
  warp_op(bf16 ? Op::kMmaBf16 : Op::kMmaF16, file, line);
  for (int k = 0; k < 4; ++k) c[k] = th.c[k];
}

void cp_async_16(void* smem_dst, const void* gmem_src, const char* file, int line) {
  const size_t off = smem_offset(smem_dst, 16, "cp.async", file, line);
  check_global(gmem_src, 16, false, "cp.async", file, line);
  shadow_write_check(off, 16, self_id(), "cp.async", file, line);
  for (int k = 0; k < 16; ++k) g->shadow[off + k].pending = 1;
  Copy c;
  c.dst = static_cast<unsigned char*>(smem_dst);
  std::memcpy(c.data, gmem_src, 16);
  self().open.push_back(c);
  log_access(file, line, 0, "cp.async", smem_dst, 16);
}

void cp_async_commit() {
  Thread& th = self();
  th.groups.push_back(std::move(th.open));
  th.open.clear();
}

void cp_async_wait(int newest_pending_groups_allowed, const char* file, int line) {
  (void)file;
  (void)line;
  Thread& th = self();
  while (static_cast<int>(th.groups.size()) > newest_pending_groups_allowed) {
    for (const Copy& c : th.groups.front()) {
      std::memcpy(c.dst, c.data, 16);
      shadow_write_done(static_cast<size_t>(c.dst - g->smem), 16, self_id());
    }
    th.groups.pop_front();
  }
}

void shared_load(void* reg, const void* smem, int bytes, const char* file, int line) {
  const size_t off = smem_offset(smem, bytes, "ld.shared", file, line);
  shadow_read(off, bytes, self_id(), false, "ld.shared", file, line);
  std::memcpy(reg, smem, bytes);
  log_access(file, line, 1, "ld.shared", smem, bytes);
}

void shared_store(void* smem, const void* reg, int bytes, const char* file, int line) {
  const size_t off = smem_offset(smem, bytes, "st.shared", file, line);
  shadow_write_check(off, bytes, self_id(), "st.shared", file, line);
  std::memcpy(smem, reg, bytes);
  shadow_write_done(off, bytes, self_id());
  log_access(file, line, 2, "st.shared", smem, bytes);
}

void global_load(void* reg, const void* gmem, int bytes, const char* file, int line) {
  check_global(gmem, bytes, false, "ld.global", file, line);
  std::memcpy(reg, gmem, bytes);
}

void global_store(void* gmem, const void* reg, int bytes, const char* file, int line) {
  check_global(gmem, bytes, true, "st.global", file, line);
  std::memcpy(gmem, reg, bytes);
}

}  // namespace emu
}  // namespace rollingq
