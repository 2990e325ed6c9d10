// What the AMX tile unit of this CPU does for attention-shaped work, one thread, no torch:
//
//   dp        TDPBF16PS on tiles already in registers (4 independent accumulators): the unit's
//             peak, 16 x 16 x 32 multiply-adds per instruction
//   softmax   the bf16 forward's per-score vector work (scale, exp2 as VREDUCEPS + degree-3
//             polynomial + VSCALEFPS, row sum, pack pairs to bf16) on 16 scores, from L1
//   both      the two in one loop, one dp per `ratio` softmax vectors (the forward's mix: 4 dps
//             per 16 score vectors): "overlap" = (dp + softmax) / both; 1 means they take turns,
//             2 means the vector work hides completely behind the tile unit
//   qk        the forward's S^T = K Q^T block as the kernel computes it (256 keys x 128 queries,
//             head dim 64, 2 x 2 tiles of 16 x 16, scores stored to memory), per 256 scores
//   pv        the forward's O^T += V^T P^T block (64 value dims x 128 queries, 256 keys)
//   qk_nostore  qk without storing the scores: the products alone (the difference is what the
//             kernel pays to store 128 KiB of scores, which go to L2)
//   pv_blocked  pv with both operands in a tile-blocked layout (each 16-row tile contiguous, 1
//             KiB) instead of rows 512 bytes apart
// and, on any CPU with AVX512_BF16 (`tile_probe vector` runs these alone):
//   vdpbf16ps / vfmadd231ps   the vector unit's bf16 dot product (32 multiply-adds) and float32
//             FMA (16) at full throughput (12 independent chains): which of the two multiplies
//             faster decides the avx512 variants' bf16 path (csrc/cpu/dispatch.cpp)
//   vec_dp32 / vec_softmax / vec_dp32_softmax   the avx512_dot forward's mix on the vector unit
//             alone: the 32 VDPBF16PS of 16 scores at head dim 64, one softmax vector, and the
//             two in one loop (do they run side by side or take turns?)
//
// Built and run by bench/tile_probe.py (times are the best of several rounds, in ns).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using bf16 = uint16_t;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

template <typename F>
double best_ns(F&& f, int iters) {
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) f(i);
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ns / iters);
  }
  return best;
}

// std::vector whose data is 64-byte aligned
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, Aligned64<T>>;
template <typename T>
aligned_vector<T> aligned_buffer(size_t n, T value) {
  return aligned_vector<T>(n, value);
}

alignas(64) float g_scores[32 * 16];
alignas(64) bf16 g_pairs[32 * 16];
__m512 g_sum;

// The forward's work on one 16-score vector (csrc/cpu/kernels/fp_engine.h softmax_cols with
// bf16_engine.h StorePairs): t = (s * scale - m) * log2(e), p = 2^t, sum += p, pack.
inline __m512 softmax_vector(int i, __m512 sum) {
  const __m512 s = _mm512_load_ps(g_scores + (i & 31) * 16);
  const __m512 t = _mm512_mul_ps(_mm512_fmsub_ps(s, _mm512_set1_ps(0.125f), _mm512_set1_ps(2.0f)),
                                 _mm512_set1_ps(1.4426950408889634f));
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.8024e-2f), r, _mm512_set1_ps(2.2607e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9583e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.9993e-1f));
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  p = _mm512_maskz_scalef_ps(keep, p, t);
  const __m512bh both = _mm512_cvtne2ps_pbh(p, p);
  _mm512_store_si512(g_pairs + (i & 15) * 32, (__m512i)both);
  return _mm512_add_ps(sum, p);
}

#define ROLLINGQ_X12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define ROLLINGQ_INIT(i) __m512 c##i = _mm512_set1_ps(float(i));
#define ROLLINGQ_SUM(i) s += _mm512_reduce_add_ps(c##i);

// 12 independent accumulator chains, `step` applied to each n times: the instruction's
// throughput, not its latency. The operands pass through an empty asm once per round so the
// compiler cannot fold the steps.
template <typename Step>
__attribute__((always_inline)) inline float chains(int n, Step step) {
  ROLLINGQ_X12(ROLLINGQ_INIT)
  for (int k = 0; k < n; ++k) {
#define ROLLINGQ_STEP(i) c##i = step(c##i);
    ROLLINGQ_X12(ROLLINGQ_STEP)
    step.opaque();
  }
  float s = 0;
  ROLLINGQ_X12(ROLLINGQ_SUM)
  return s;
}

struct DotStep {
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // bf16 pairs (1, 1)
  __m512 operator()(__m512 c) const { return _mm512_dpbf16_ps(c, a, a); }
  void opaque() { __asm__ volatile("" : "+v"(a)); }
};

struct FmaStep {
  __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  __m512 operator()(__m512 c) const { return _mm512_fmadd_ps(c, x, y); }
  void opaque() { __asm__ volatile("" : "+v"(x)); }
};

__attribute__((noinline)) float dot_chains(int n) { return chains(n, DotStep{}); }
__attribute__((noinline)) float fma_chains(int n) { return chains(n, FmaStep{}); }

// Per round: the 32 VDPBF16PS that compute 16 scores at head dim 64 (16 independent chains, two
// each), one softmax vector, or both in one loop body: whether the vector unit's softmax runs
// beside its own dot products or takes turns with them (the avx512_dot forward's mix).
template <bool kDots, bool kSoftmax>
__attribute__((noinline)) float dots_and_softmax(int n) {
  __m512 c[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) c[i] = _mm512_set1_ps(float(i));
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  __m512 sum = _mm512_setzero_ps();
  for (int k = 0; k < n; ++k) {
    if (kDots) {
#pragma GCC unroll 32
      for (int j = 0; j < 32; ++j) c[j % 16] = _mm512_dpbf16_ps(c[j % 16], a, a);
    }
    if (kSoftmax) sum = softmax_vector(k, sum);
    __asm__ volatile("" : "+v"(a));
  }
  float s = _mm512_reduce_add_ps(sum);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) s += _mm512_reduce_add_ps(c[i]);
  return s;
}

volatile float g_sink;

void vector_rates() {
  const int n = 200000;
  const double dot = best_ns([](int) { g_sink = dot_chains(n); }, 1) / (12.0 * n);
  const double fma = best_ns([](int) { g_sink = fma_chains(n); }, 1) / (12.0 * n);
  std::printf("vdpbf16ps_ns %.4f\n", dot);
  std::printf("vfmadd231ps_ns %.4f\n", fma);
  for (int i = 0; i < 32 * 16; ++i) g_scores[i] = float(i % 7) - 3.0f;
  const double d32 = best_ns([](int) { g_sink = dots_and_softmax<true, false>(n); }, 1) / n;
  const double sm = best_ns([](int) { g_sink = dots_and_softmax<false, true>(n); }, 1) / n;
  const double both = best_ns([](int) { g_sink = dots_and_softmax<true, true>(n); }, 1) / n;
  std::printf("vec_dp32_ns %.3f\n", d32);
  std::printf("vec_softmax_ns %.3f\n", sm);
  std::printf("vec_dp32_softmax_ns %.3f\n", both);
}

}  // namespace

int main(int argc, char** argv) {
  vector_rates();
  if (argc > 1 && std::string(argv[1]) == "vector") return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    std::printf("error: the OS does not grant the AMX tile state\n");
    return 1;
  }
#endif
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  for (int i = 0; i < 32 * 16; ++i) g_scores[i] = float(i % 7) - 3.0f;
  // 64-byte aligned, as the kernel's workspace and torch's tensors are (a tile row that straddles
  // two cache lines made every product here 1.5-2.5x slower)
  aligned_vector<bf16> ones = aligned_buffer<bf16>(256 * 256, 0x3f80);  // bf16 1.0
  _tile_loadd(4, ones.data(), 64);
  _tile_loadd(5, ones.data(), 64);
  _tile_loadd(6, ones.data(), 64);
  _tile_loadd(7, ones.data(), 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);

  // wake the tile unit (its first instructions after idling run slower): 50 ms of products
  for (auto t0 = std::chrono::steady_clock::now();
       std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(50);)
    for (int i = 0; i < 1000; ++i) _tile_dpbf16ps(0, 4, 6);
  auto m_dp = [&] { return best_ns(
      [](int) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      },
      20000) / 4; };
  __m512 sum = _mm512_setzero_ps();
  constexpr int kRatio = 4;  // softmax vectors per dp in the forward (4 dps per 16 vectors)
  auto m_vec = [&] { return best_ns(
      [&](int i) {
        for (int j = 0; j < kRatio * 4; ++j) sum = softmax_vector(i * 16 + j, sum);
      },
      20000) / (kRatio * 4); };
  auto m_both = [&] { return best_ns(
      [&](int i) {
        _tile_dpbf16ps(0, 4, 6);
        for (int j = 0; j < kRatio; ++j) sum = softmax_vector(i * 16 + j, sum);
        _tile_dpbf16ps(1, 4, 7);
        for (int j = kRatio; j < 2 * kRatio; ++j) sum = softmax_vector(i * 16 + j, sum);
        _tile_dpbf16ps(2, 5, 6);
        for (int j = 2 * kRatio; j < 3 * kRatio; ++j) sum = softmax_vector(i * 16 + j, sum);
        _tile_dpbf16ps(3, 5, 7);
        for (int j = 3 * kRatio; j < 4 * kRatio; ++j) sum = softmax_vector(i * 16 + j, sum);
      },
      20000) / 4; };

  // S^T (256 x 128 floats) = K (256 x 64) Q^T (64 x 128 in pairs), 2 x 2 tiles
  constexpr int M = 256, N = 128, D = 64;
  aligned_vector<float> S = aligned_buffer<float>(M * N, 0.0f), O = aligned_buffer<float>(64 * N, 0.0f);
  // C (rows x N floats) op= A (rows x kd, bf16 by rows) B (kd in pairs x N), 2 x 2 tiles of
  // 16 x 16 per step, as csrc/cpu/kernels/bf16_gemm.h's amx_block
  auto product = [&](const bf16* a, int rows, int kd, const bf16* b, float* c, bool load_c,
                     bool store = true, bool blocked = false) {
    // blocked: tile (m16, k32) of A at ((m / 16) * kt + k / 32) * 512, tile (k32, n16) of B at
    // ((n / 16) * kt + k / 32) * 512, rows 64 bytes apart
    const int kt = kd / 32;
    for (int m = 0; m < rows; m += 32)
      for (int n = 0; n < N; n += 32) {
        float* cm = c + m * N + n;
        if (load_c) {
          _tile_loadd(0, cm, N * 4);
          _tile_loadd(1, cm + 16, N * 4);
          _tile_loadd(2, cm + 16 * N, N * 4);
          _tile_loadd(3, cm + 16 * N + 16, N * 4);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int k = 0; k < kd; k += 32) {
          if (blocked) {
            _tile_loadd(4, a + ((m / 16) * kt + k / 32) * 512, 64);
            _tile_loadd(5, a + ((m / 16 + 1) * kt + k / 32) * 512, 64);
            _tile_loadd(6, b + ((n / 16) * kt + k / 32) * 512, 64);
            _tile_loadd(7, b + ((n / 16 + 1) * kt + k / 32) * 512, 64);
          } else {
            _tile_loadd(4, a + m * kd + k, kd * 2);
            _tile_loadd(5, a + (m + 16) * kd + k, kd * 2);
            _tile_loadd(6, b + (k / 2) * 2 * N + 2 * n, 2 * N * 2);
            _tile_loadd(7, b + (k / 2) * 2 * N + 2 * n + 32, 2 * N * 2);
          }
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        if (!store) continue;
        _tile_stored(0, cm, N * 4);
        _tile_stored(1, cm + 16, N * 4);
        _tile_stored(2, cm + 16 * N, N * 4);
        _tile_stored(3, cm + 16 * N + 16, N * 4);
      }
  };
  // S^T = K Q^T (scores stored) and O^T += V^T P^T (64 value dims x 256 keys): per 256 scores
  auto m_qk = [&] {
    return best_ns([&](int) { product(ones.data(), M, D, ones.data(), S.data(), false); }, 200) /
           (M * N / 256);
  };
  auto m_pv = [&] {
    return best_ns([&](int) { product(ones.data(), 64, M, ones.data(), O.data(), true); }, 200) /
           (M * N / 256);
  };
  auto m_qk_nostore = [&] {
    return best_ns([&](int) { product(ones.data(), M, D, ones.data(), S.data(), false, false); },
                   200) /
           (M * N / 256);
  };
  auto m_pv_blocked = [&] {
    return best_ns(
               [&](int) { product(ones.data(), 64, M, ones.data(), O.data(), true, true, true); },
               200) /
           (M * N / 256);
  };
  // every measure once per repeat, the best of each: a phase of the machine (this tile unit was
  // seen to run 3x slower for seconds on a shared host) hits all of them alike
  double dp = 1e30, vec = 1e30, both = 1e30, qk = 1e30, pv = 1e30, qk_ns = 1e30, pv_bl = 1e30;
  for (int repeat = 0; repeat < 5; ++repeat) {
    dp = std::min(dp, m_dp());
    vec = std::min(vec, m_vec());
    both = std::min(both, m_both());
    qk = std::min(qk, m_qk());
    pv = std::min(pv, m_pv());
    qk_ns = std::min(qk_ns, m_qk_nostore());
    pv_bl = std::min(pv_bl, m_pv_blocked());
  }
  g_sum = sum;
  _tile_release();

  std::printf("dp_ns %.3f\n", dp);
  std::printf("softmax_vector_ns %.3f\n", vec);
  std::printf("dp_with_softmax_ns %.3f\n", both);  // one dp + kRatio vectors
  std::printf("softmax_vectors_per_dp %d\n", kRatio);
  std::printf("qk_ns_per_256_scores %.3f\n", qk);
  std::printf("pv_ns_per_256_scores %.3f\n", pv);
  std::printf("qk_nostore_ns_per_256_scores %.3f\n", qk_ns);
  std::printf("pv_blocked_ns_per_256_scores %.3f\n", pv_bl);
  return 0;
}
