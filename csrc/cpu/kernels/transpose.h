// Matrix transposes for packing: dst[c][r] = src[r][c]. In-register blocks of 16 x 16 (AVX-512)
// or 8 x 8 (AVX2) floats, scalar elsewhere and at the edges.
#pragma once

#include "cpu/kernels/vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

ROLLINGQ_KERNELS_BEGIN

#if defined(__AVX512F__)
inline void transpose_block16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  // 2 x 2 blocks of single elements, then of pairs, within each 128-bit lane
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] =
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4g + c] holds, in 128-bit lane L, element c of rows 4g .. 4g+3 for columns 4L + c;
  // now 4 x 4 blocks of 128-bit lanes
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);       // lanes 0, 2 of rows 0-3, 4-7
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);   // lanes 1, 3
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);          // lane 0: columns 0-3
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);  // lane 1: columns 4-7
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);      // lane 2: columns 8-11
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);  // lane 3: columns 12-15
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}
constexpr int kTransposeBlock = 16;
#elif defined(__AVX2__)
inline void transpose_block8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ds, t[i]);
}
constexpr int kTransposeBlock = 8;
#else
constexpr int kTransposeBlock = 0;
#endif

// 32-bit words (a pair of bf16, say), moved as they are: the float blocks only shuffle bits.
typedef uint32_t word32 __attribute__((may_alias));

// dst[c * ds + r] = src[r * ss + c] for r < R, c < C. Elements of 4 bytes (float, word32) go
// through the float blocks.
template <typename A>
void transpose(const A* src, int64_t ss, A* dst, int64_t ds, int64_t R, int64_t C) {
  int64_t r0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (sizeof(A) == 4) {
    constexpr int Bk = kTransposeBlock;
    for (; r0 + Bk <= R; r0 += Bk) {
      int64_t c = 0;
      for (; c + Bk <= C; c += Bk) {
        const float* s = reinterpret_cast<const float*>(src + r0 * ss + c);
        float* d = reinterpret_cast<float*>(dst + c * ds + r0);
#if defined(__AVX512F__)
        transpose_block16(s, ss, d, ds);
#else
        transpose_block8(s, ss, d, ds);
#endif
      }
      for (int64_t cc = c; cc < C; ++cc)
        for (int64_t r = r0; r < r0 + Bk; ++r) dst[cc * ds + r] = src[r * ss + cc];
    }
  }
#endif
  // remaining rows (all of them without a SIMD block), 8 x 8 blocks for locality
  for (int64_t rb = r0; rb < R; rb += 8)
    for (int64_t cb = 0; cb < C; cb += 8)
      for (int64_t c = cb; c < imin<int64_t>(cb + 8, C); ++c)
        for (int64_t r = rb; r < imin<int64_t>(rb + 8, R); ++r) dst[c * ds + r] = src[r * ss + c];
}

ROLLINGQ_KERNELS_END
