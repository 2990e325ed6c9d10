// The one matrix product of the float kernels (float32, float64, and bfloat16 on CPUs without
// bf16 dot products), register-blocked on vec.h:
//
//   C[r][n] (op)= sum_k A(r, k) * B[k][n]      r < M, n < NV * W (whole vectors)
//
// A is read one scalar at a time through two strides (A(r, k) = a[r * ars + k * aks]) and
// broadcast, so the same kernel takes A or its transpose; B is read by rows of whole vectors,
// straight from the caller's tensors where their rows are a multiple of the vector width. Every
// C element is a chain of FMAs in k order, whatever the blocking: the result of an element does
// not depend on M, on its position in a block, or on the memory alignment of any operand.
#pragma once

#include "cpu/kernels/vec.h"

ROLLINGQ_KERNELS_BEGIN

// C = alpha AB, C += AB, C = C * rs[r] + AB (rs non-null exactly for kRowScaleAdd)
enum class Acc { kSet, kAdd, kRowScaleAdd };

// Register blocking: MR rows of A times NV vectors of B in MR * NV accumulators.
#if defined(__AVX512F__)
constexpr int kMR = 6, kNV = 4;  // 24 of 32 registers
#elif defined(__AVX2__)
constexpr int kMR = 6, kNV = 2;  // 12 of 16 registers
#else
constexpr int kMR = 4, kNV = 2;  // 8 of 16 registers (SSE2 / NEON)
#endif

// Not inlined: alone, the compiler keeps every pointer and stride of the loop in registers.
template <typename A, int MR, int NV>
__attribute__((noinline)) void micro_kernel(int64_t K, const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb,
                         A* c, int64_t ldc, Acc mode, const A* cs, A alpha) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  V acc[MR][NV];
  if (mode == Acc::kSet) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V scale = vbcast(cs != nullptr ? cs[r] : A(1));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vload(c + r * ldc + v * W) * scale;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av = vbcast(a[r * ars + k * aks]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  const V va = vbcast(mode == Acc::kSet ? alpha : A(1));  // x * 1 == x exactly
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * W, acc[r][v] * va);
}

// rows m0 .. M with a fixed NV: full MR blocks, then one block of the remaining R < MR rows
template <typename A, int R, int NV>
inline void rows_tail(int64_t rem, int64_t K, const A* a, int64_t ars, int64_t aks, const A* b,
                      int64_t ldb, A* c, int64_t ldc, Acc mode, const A* cs, A alpha) {
  if constexpr (R > 0) {
    if (rem == R)
      micro_kernel<A, R, NV>(K, a, ars, aks, b, ldb, c, ldc, mode, cs, alpha);
    else
      rows_tail<A, R - 1, NV>(rem, K, a, ars, aks, b, ldb, c, ldc, mode, cs, alpha);
  }
}

template <typename A, int NV>
inline void gemm_cols(int64_t M, int64_t K, const A* a, int64_t ars, int64_t aks, const A* b,
                      int64_t ldb, A* c, int64_t ldc, Acc mode, const A* cs, A alpha) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    micro_kernel<A, kMR, NV>(K, a + m * ars, ars, aks, b, ldb, c + m * ldc, ldc, mode,
                             cs ? cs + m : nullptr, alpha);
  rows_tail<A, kMR - 1, NV>(M - m, K, a + m * ars, ars, aks, b, ldb, c + m * ldc, ldc, mode,
                            cs ? cs + m : nullptr, alpha);
}

template <typename A, int NV>
inline void cols_tail(int64_t rem, int64_t M, int64_t K, const A* a, int64_t ars, int64_t aks,
                      const A* b, int64_t ldb, A* c, int64_t ldc, Acc mode, const A* cs, A alpha) {
  if constexpr (NV > 0) {
    if (rem == NV)
      gemm_cols<A, NV>(M, K, a, ars, aks, b, ldb, c, ldc, mode, cs, alpha);
    else
      cols_tail<A, NV - 1>(rem, M, K, a, ars, aks, b, ldb, c, ldc, mode, cs, alpha);
  }
}

// B's columns for one register block of vectors: a panel.
template <typename A>
constexpr int64_t kPanel = kNV * VT<A>::W;

// B as the products read it: rows ldb apart; with bps > 0, in panels of kPanel<A> columns, panel
// g at b + g * bps (its rows ldb = kPanel<A> apart, the last one possibly narrower).
template <typename A>
struct BOperand {
  const A* b;
  int64_t ldb, bps = 0;
};

// C (M x NVt vectors, row stride ldc) op= A (M x K, strides ars / aks) * B (K x NVt vectors).
// cs: M row scales for Acc::kRowScaleAdd; alpha: the factor of Acc::kSet, applied to the
// finished sums (as torch's SDPA applies the softmax scale). Callers cut long products over
// keys into slices that stay in L1 (kSliceKeys); cutting K = D into slices measured no faster up
// to D = 768. Each register block streams K rows of one panel of B: where B's rows are longer
// than a panel and K is long, a copy in panels (pack_panels) is read as one contiguous stream
// instead of K rows far apart, whose lines the prefetchers lose at every page (docs/performance.md).
template <typename A>
inline void gemm(int64_t M, int64_t NVt, int64_t K, const A* a, int64_t ars, int64_t aks,
                 BOperand<A> B, A* c, int64_t ldc, Acc mode, const A* cs = nullptr,
                 A alpha = A(1)) {
  constexpr int W = VT<A>::W;
  if (M <= 0 || NVt <= 0) return;
  auto at = [&](int64_t v) { return B.bps > 0 ? B.b + (v / kNV) * B.bps : B.b + v * W; };
  int64_t v = 0;
  for (; v + kNV <= NVt; v += kNV)
    gemm_cols<A, kNV>(M, K, a, ars, aks, at(v), B.ldb, c + v * W, ldc, mode, cs, alpha);
  cols_tail<A, kNV - 1>(NVt - v, M, K, a, ars, aks, at(v), B.ldb, c + v * W, ldc, mode, cs,
                        alpha);
}
template <typename A>
inline void gemm(int64_t M, int64_t NVt, int64_t K, const A* a, int64_t ars, int64_t aks,
                 const A* b, int64_t ldb, A* c, int64_t ldc, Acc mode, const A* cs = nullptr,
                 A alpha = A(1)) {
  gemm<A>(M, NVt, K, a, ars, aks, BOperand<A>{b, ldb}, c, ldc, mode, cs, alpha);
}

// Scores of a few queries, by rows (the products above put queries along lanes, so a tile of
// one query would fill one lane of W and do W times the work):
//
//   C[j][l] = alpha * sum_k a[j][k] * q[l][k]     j < M, l < N;  C[j][l] = 0 for N <= l < W
//
// Each (key, query) pair is a dot product along the rows, summed by halves at the end
// (hsum_tree): the same work as the products for N = 1, and what reads K or V a row at a time
// from memory costs anyway. The rows of a and q hold K elements, K a multiple of W (the caller
// pads them with zeros); C's rows are one vector (N <= W / 2 < W lanes), ldc apart. Two keys per
// pass, so that each query vector loaded serves both. pf, where not null: rows ldpf apart of the
// operand the caller reads next (V after the scores), prefetched into L2 alongside a's rows, their
// first K elements, so that both stream in together: a few queries read K and V once and
// multiply little, and one stream at a time left memory idle (decoding 0.83-0.90x the time with
// AVX-512 on Zen 4, 0.61-0.85x with the AVX2 variant; see docs/performance.md). a_rows > 0: a's
// rows from its first that exist (a read in place from the tensor): the row rows_ahead() further
// on is prefetched as each is read, into the next block's rows (float32 decoding with 1, 4 and 8
// queries: 0.68-0.95x the time on Zen 5).
template <typename A, int N>
__attribute__((noinline)) void row_dots_n(int64_t M, int64_t K, const A* a, int64_t lda,
                                          const A* q, int64_t ldq, A* c, int64_t ldc, A alpha,
                                          const A* pf, int64_t ldpf, int64_t a_rows) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  static_assert(N >= 1 && N < W, "one vector of lanes per key");
  auto finish = [&](const V (&acc)[N], A* row) {
    V s{};
#pragma GCC unroll 8
    for (int l = 0; l < N; ++l) s[l] = hsum_tree<A>(acc[l]);
    vstore(row, s * vbcast(alpha));  // x * 1 == x exactly
  };
  int64_t j = 0;
  const RowsAhead<A> ahead(a, lda, a_rows, K);
  for (; j + 2 <= M; j += 2) {
    V acc0[N], acc1[N];
#pragma GCC unroll 8
    for (int l = 0; l < N; ++l) acc0[l] = acc1[l] = V{};
    const A* a0 = a + j * lda;
    const A* a1 = a0 + lda;
    const A* p0 = pf != nullptr ? pf + j * ldpf : nullptr;
    ahead.at(j);
    ahead.at(j + 1);
    for (int64_t k = 0; k < K; k += W) {
      if (pf != nullptr) {  // loop-invariant: the compiler takes it out of the loop
        __builtin_prefetch(p0 + k, 0, 2);
        __builtin_prefetch(p0 + ldpf + k, 0, 2);
      }
      const V k0 = vload(a0 + k), k1 = vload(a1 + k);
#pragma GCC unroll 8
      for (int l = 0; l < N; ++l) {
        const V qv = vload(q + l * ldq + k);
        acc0[l] += k0 * qv;
        acc1[l] += k1 * qv;
      }
    }
    finish(acc0, c + j * ldc);
    finish(acc1, c + (j + 1) * ldc);
  }
  if (j < M) {
    V acc[N];
#pragma GCC unroll 8
    for (int l = 0; l < N; ++l) acc[l] = V{};
    for (int64_t k = 0; k < K; k += W) {
      const V kv = vload(a + j * lda + k);
#pragma GCC unroll 8
      for (int l = 0; l < N; ++l) acc[l] += kv * vload(q + l * ldq + k);
    }
    finish(acc, c + j * ldc);
  }
}

// The queries a forward or backward takes by rows (row_dots): up to half a vector of them.
template <typename A>
constexpr int64_t kRowQueries = VT<A>::W / 2;

template <typename A, int N = kRowQueries<A>>
inline void row_dots(int64_t M, int64_t n, int64_t K, const A* a, int64_t lda, const A* q,
                     int64_t ldq, A* c, int64_t ldc, A alpha, const A* pf = nullptr,
                     int64_t ldpf = 0, int64_t a_rows = 0) {
  if constexpr (N > 0) {
    if (n == N) return row_dots_n<A, N>(M, K, a, lda, q, ldq, c, ldc, alpha, pf, ldpf, a_rows);
    row_dots<A, N - 1>(M, n, K, a, lda, q, ldq, c, ldc, alpha, pf, ldpf, a_rows);
  }
}

// Elements of B (K rows x NVt vectors) in panels: K rows of kPanel<A> per panel.
template <typename A>
inline int64_t panel_elems(int64_t K, int64_t NVt) {
  return ((NVt + kNV - 1) / kNV) * K * kPanel<A>;
}

// Rows k0 .. k1 of B (rows ldb apart, NVt vectors) into the panels at dst, panel stride bps.
template <typename A>
inline void pack_panels(const A* b, int64_t ldb, int64_t k0, int64_t k1, int64_t NVt, A* dst,
                        int64_t bps) {
  constexpr int W = VT<A>::W;
  constexpr int64_t P = kPanel<A>;
  for (int64_t v = 0; v < NVt; v += kNV) {
    const int64_t n = (NVt - v < kNV ? NVt - v : kNV) * W;
    A* d = dst + (v / kNV) * bps;
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t x = 0; x < n; x += W) vstore(d + k * P + x, vload(b + k * ldb + v * W + x));
  }
}

// B as the products should read it: in place where its rows fit one panel (or wide is false),
// else copied into panels at buf (panel_elems(K, NVt) elements).
template <typename A>
inline BOperand<A> panels_of(const A* b, int64_t ldb, int64_t K, int64_t NVt, bool wide, A* buf) {
  if (!wide || NVt <= kNV) return BOperand<A>{b, ldb};
  pack_panels<A>(b, ldb, 0, K, NVt, buf, K * kPanel<A>);
  return BOperand<A>{buf, kPanel<A>, K * kPanel<A>};
}

ROLLINGQ_KERNELS_END
