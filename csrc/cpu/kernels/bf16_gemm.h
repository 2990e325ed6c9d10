// bfloat16 products with float32 accumulation on the bf16 hardware of AVX-512 CPUs, in one form:
//
//   C[m][n] (op)= sum_k A[m][k] B[k][n]      m < M, n < N (N a multiple of 16), K even
//
// A is bf16 by rows (A[m][k] at a[m * lda + k]: the pair k, k+1 adjacent), B is bf16 in pairs of
// rows ("VNNI": B[k][n] at b[(k / 2) * ldb + 2 n + k % 2]), C float32. Two implementations:
//   Bf16Dot  VDPBF16PS (AVX512_BF16): 6 x 64 register blocks, one broadcast pair of A per row;
//   Amx      TDPBF16PS on the AMX tile unit for whole 16-row blocks and 32-wide slices of K,
//            Bf16Dot for the rest.
// Both accumulate every C element in a fixed order set by the shape only.
#pragma once

#include <immintrin.h>

#include "cpu/kernels/namespace.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/gemm.h"
#include "cpu/kernels/transpose.h"

#if !defined(__AVX512BF16__)
#error "bf16_gemm.h needs AVX512_BF16"
#endif

ROLLINGQ_KERNELS_BEGIN

inline int32_t load_pair(const bf16* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// The register block: acc[r][v] += sum_k A[r][k] B[k][16 v ..], one broadcast pair of A per row
// and NV vectors of B per pair of k (k ascending).
template <int MR, int NV>
__attribute__((always_inline)) inline void bf16_dot_block(int64_t K, const bf16* a, int64_t lda,
                                                          const bf16* b, int64_t ldb,
                                                          __m512 (&acc)[MR][NV]) {
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + (k / 2) * ldb + v * 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(load_pair(a + r * lda + k));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
}

// The same from zero accumulators: acc[r][v] = sum_k A[r][k] B[k][16 v ..].
template <int MR, int NV>
__attribute__((always_inline)) inline void bf16_dot_block_from_zero(int64_t K, const bf16* a,
                                                                    int64_t lda, const bf16* b,
                                                                    int64_t ldb,
                                                                    __m512 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  bf16_dot_block<MR, NV>(K, a, lda, b, ldb, acc);
}

template <int MR, int NV>
__attribute__((noinline)) void bf16_micro_kernel(int64_t K, const bf16* a, int64_t lda,
                                                 const bf16* b, int64_t ldb, float* c,
                                                 int64_t ldc, Acc mode, float alpha) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = mode == Acc::kSet ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc + v * 16);
  bf16_dot_block<MR, NV>(K, a, lda, b, ldb, acc);
  const __m512 va = _mm512_set1_ps(mode == Acc::kSet ? alpha : 1.0f);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * 16, _mm512_mul_ps(acc[r][v], va));
}

template <int R, int NV>
inline void bf16_rows_tail(int64_t rem, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                           int64_t ldb, float* c, int64_t ldc, Acc mode, float alpha) {
  if constexpr (R > 0) {
    if (rem == R)
      bf16_micro_kernel<R, NV>(K, a, lda, b, ldb, c, ldc, mode, alpha);
    else
      bf16_rows_tail<R - 1, NV>(rem, K, a, lda, b, ldb, c, ldc, mode, alpha);
  }
}

template <int NV>
inline void bf16_cols(int64_t M, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                      int64_t ldb, float* c, int64_t ldc, Acc mode, float alpha) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6)
    bf16_micro_kernel<6, NV>(K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, mode, alpha);
  bf16_rows_tail<5, NV>(M - m, K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, mode, alpha);
}

template <int NV>
inline void bf16_cols_tail(int64_t rem, int64_t M, int64_t K, const bf16* a, int64_t lda,
                           const bf16* b, int64_t ldb, float* c, int64_t ldc, Acc mode,
                           float alpha) {
  if constexpr (NV > 0) {
    if (rem == NV)
      bf16_cols<NV>(M, K, a, lda, b, ldb, c, ldc, mode, alpha);
    else
      bf16_cols_tail<NV - 1>(rem, M, K, a, lda, b, ldb, c, ldc, mode, alpha);
  }
}

// Modes: Acc::kSet (C = alpha AB) and Acc::kAdd (C += AB).
struct Bf16Dot {
  static constexpr const char* name = "avx512_bf16";
  // The forward takes its scores from registers (bf16_engine.h, scores_softmax_kernel)
  static constexpr bool kFusedSoftmax = true;
  static void begin() {}
  static void end() {}
  static void gemm(int64_t M, int64_t N, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                   int64_t ldb, float* c, int64_t ldc, Acc mode, float alpha = 1.0f) {
    if (M <= 0 || N <= 0) return;
    const int64_t NVt = N / 16;
    int64_t v = 0;
    for (; v + 4 <= NVt; v += 4)
      bf16_cols<4>(M, K, a, lda, b + v * 32, ldb, c + v * 16, ldc, mode, alpha);
    bf16_cols_tail<3>(NVt - v, M, K, a, lda, b + v * 32, ldb, c + v * 16, ldc, mode, alpha);
  }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Tile registers: 0-3 C (16 rows x 16 floats), 4-5 A (16 rows x 32 bf16), 6-7 B (16 pair-rows x
// 16 columns x 2). One configuration for every product.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

template <int RM, int RN>  // 16-row blocks of C (1 or 2) x 16-column blocks (1 or 2)
inline void amx_block(int64_t K32, const bf16* a, int64_t lda, const bf16* b, int64_t ldb,
                      float* c, int64_t ldc, bool load_c) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (load_c) {
    _tile_loadd(0, c, sc);
    if (RN > 1) _tile_loadd(1, c + 16, sc);
    if (RM > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if (RM > 1 && RN > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (RN > 1) _tile_zero(1);
    if (RM > 1) _tile_zero(2);
    if (RM > 1 && RN > 1) _tile_zero(3);
  }
  for (int64_t k = 0; k < K32; k += 32) {
    _tile_loadd(4, a + k, sa);
    if (RM > 1) _tile_loadd(5, a + 16 * lda + k, sa);
    _tile_loadd(6, b + (k / 2) * ldb, sb);
    if (RN > 1) _tile_loadd(7, b + (k / 2) * ldb + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (RN > 1) _tile_dpbf16ps(1, 4, 7);
    if (RM > 1) _tile_dpbf16ps(2, 5, 6);
    if (RM > 1 && RN > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  if (RN > 1) _tile_stored(1, c + 16, sc);
  if (RM > 1) _tile_stored(2, c + 16 * ldc, sc);
  if (RM > 1 && RN > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

struct Amx {
  static constexpr const char* name = "amx";
  static constexpr bool kFusedSoftmax = false;
  // Load the tile configuration on this thread (once per batch of tasks).
  static void begin() {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  static void end() { _tile_release(); }

  static void gemm(int64_t M, int64_t N, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                   int64_t ldb, float* c, int64_t ldc, Acc mode, float alpha = 1.0f) {
    if (M <= 0 || N <= 0) return;
    const int64_t K32 = K / 32 * 32, M16 = M / 16 * 16;
    const bool load_c = mode != Acc::kSet;
    for (int64_t m = 0; m < M16; m += 32) {
      const bool two_rows = m + 32 <= M16;
      for (int64_t n = 0; n < N; n += 32) {
        const bool two_cols = n + 32 <= N;
        const bf16* am = a + m * lda;
        const bf16* bn = b + n * 2;
        float* cm = c + m * ldc + n;
        if (two_rows && two_cols)
          amx_block<2, 2>(K32, am, lda, bn, ldb, cm, ldc, load_c);
        else if (two_rows)
          amx_block<2, 1>(K32, am, lda, bn, ldb, cm, ldc, load_c);
        else if (two_cols)
          amx_block<1, 2>(K32, am, lda, bn, ldb, cm, ldc, load_c);
        else
          amx_block<1, 1>(K32, am, lda, bn, ldb, cm, ldc, load_c);
      }
    }
    // the K tail of the AMX rows, then the rows below the last 16-row block
    if (K32 < K)
      Bf16Dot::gemm(M16, N, K - K32, a + K32, lda, b + (K32 / 2) * ldb, ldb, c, ldc,
                    K32 == 0 ? mode : Acc::kAdd, 1.0f);
    if (mode == Acc::kSet && alpha != 1.0f) {
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t m = 0; m < M16; ++m)
        for (int64_t n = 0; n < N; n += 16)
          _mm512_storeu_ps(c + m * ldc + n, _mm512_mul_ps(_mm512_loadu_ps(c + m * ldc + n), va));
    }
    Bf16Dot::gemm(M - M16, N, K, a + M16 * lda, lda, b, ldb, c + M16 * ldc, ldc, mode, alpha);
  }
};
#endif

// ---- packing into bf16 -------------------------------------------------------------------------

// dst[2 l + t] = bf16(rt[l]) for t = 0, 1 and l < n (n a multiple of 16): two float rows into one
// row of pairs.
inline void pack_pair_rows(const float* r0, const float* r1, bf16* dst, int64_t n) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                              24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                              1, 16, 0);
  for (int64_t l = 0; l < n; l += 16) {
    const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r1 + l), _mm512_loadu_ps(r0 + l));
    _mm512_storeu_si512(dst + 2 * l, _mm512_permutexvar_epi16(interleave, (__m512i)both));
  }
}

inline void pack_pair_zero(const float* r0, bf16* dst, int64_t n) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                              24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                              1, 16, 0);
  for (int64_t l = 0; l < n; l += 16) {
    const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_loadu_ps(r0 + l));
    _mm512_storeu_si512(dst + 2 * l, _mm512_permutexvar_epi16(interleave, (__m512i)both));
  }
}

// rows [0, R) of src (R x n floats, row stride ss) as pairs of rows: dst[(r / 2) * 2 n + 2 l +
// r % 2]; rows R .. R_pad (even) are zero pairs. n a multiple of 16.
inline void pack_vnni(const float* src, int64_t ss, int64_t R, int64_t R_pad, int64_t n,
                      bf16* dst) {
  int64_t r = 0;
  for (; r + 1 < R; r += 2) pack_pair_rows(src + r * ss, src + (r + 1) * ss, dst + r * n, n);
  if (r < R) {
    pack_pair_zero(src + r * ss, dst + r * n, n);
    r += 2;
  }
  for (; r < R_pad; r += 2) std::memset(dst + r * n, 0, size_t(2 * n) * sizeof(bf16));
}

// dst[l] = bf16(src[l]), l < n (a multiple of 16)
inline void pack_row_bf16(const float* src, bf16* dst, int64_t n) {
  for (int64_t l = 0; l < n; l += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + l),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + l)));
}

// dst[d] = the 32-bit word (a[d], b[d]) for d < n, two rows of bf16 interleaved (b null: zeros).
// Writes whole vectors: dst holds round_up(n, 32) words.
inline void interleave_rows(const bf16* a, const bf16* b, word32* dst, int64_t n) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38,
                                                   7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44,
                                                   13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(kLo);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t d = 0; d < n; d += 32) {
    const __mmask32 m = n - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - d)) - 1;
    const __m512i va = _mm512_maskz_loadu_epi16(m, a + d);
    const __m512i vb = b != nullptr ? _mm512_maskz_loadu_epi16(m, b + d) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(va, hi, vb));
  }
}

// The transpose of bf16 rows in pairs of rows, the A operand layout of a product over them:
// dst[c * ds + r / 2] = the word (src[r][c], src[r + 1][c]) for even r < R and c < C, with
// src[R][c] = 0 when R is odd (ds in words). Two rows of a pair are one row of words
// (interleave_rows), and 16 such rows at a time are transposed as words through `scratch`
// (16 x round_up(C, 32) words). Rows of src up to `avail` (>= R) are prefetched ahead of their
// reading (rows_ahead): the next call's rows too.
inline void transpose_pairs(const bf16* src, int64_t ss, int64_t R, int64_t C, word32* dst,
                            int64_t ds, word32* scratch, int64_t avail) {
  const int64_t Cw = round_up(C, 32);
  const RowsAhead<bf16> ahead(src, ss, avail, C);
  for (int64_t r0 = 0; r0 < R; r0 += 32) {
    const int64_t np = imin<int64_t>(16, (R - r0 + 1) / 2);
    for (int64_t i = 0; i < np; ++i) {
      const int64_t ra = r0 + 2 * i;
      ahead.at(ra);
      ahead.at(ra + 1);
      interleave_rows(src + ra * ss, ra + 1 < R ? src + (ra + 1) * ss : nullptr, scratch + i * Cw,
                      C);
    }
    transpose(scratch, Cw, dst + r0 / 2, ds, np, C);
  }
}

ROLLINGQ_KERNELS_END
