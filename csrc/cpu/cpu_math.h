// Building blocks of the CPU kernels: row-major GEMM on top of the BLAS that libtorch_cpu
// exports, a branch-free exp that the compiler vectorises, and row helpers.
//
// Why BLAS: torch's own CPU flash attention multiplies its blocks with the same sgemm_, and a
// hand-written micro-kernel measured slower at every head dim we care about (64 .. 768).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROLLINGQ_AVX2 1
#endif

extern "C" {
// Fortran BLAS symbols exported by libtorch_cpu (MKL on x86 wheels, OpenBLAS elsewhere).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace rollingq {
namespace cpu {

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                      int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[M x N] = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T.
// A row-major matrix is the transpose of the same memory read column-major, so this is the
// column-major product C^T = op(B)^T op(A)^T with the operands swapped and the flags kept.
template <typename A>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, A alpha,
                    const A* a, int64_t lda, const A* b, int64_t ldb, A beta, A* c,
                    int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == A(0) ? A(0) : beta * c[i * ldc + j];
    return;
  }
  // BLAS rejects a leading dimension below the row length even for a single row, where it is
  // never used: give single-row operands a valid one.
  const int64_t a_rows = trans_a ? K : M, a_cols = trans_a ? M : K;
  const int64_t b_rows = trans_b ? N : K, b_cols = trans_b ? K : N;
  if (a_rows == 1) lda = std::max(lda, a_cols);
  if (b_rows == 1) ldb = std::max(ldb, b_cols);
  if (M == 1) ldc = std::max(ldc, N);
  blas_gemm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
            static_cast<int>(K), alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda), beta,
            c, static_cast<int>(ldc));
}

// exp(x) for float with a relative error of a few ulp, exactly 0 below -87.3 (so -inf gives 0),
// written without branches or calls so that loops over it are vectorised (checked with
// -fopt-info-vec). Cody-Waite range reduction and a degree-6 minimax polynomial.
inline float exp_fast(float x) {
  const float xc = std::min(std::max(x, -87.33654f), 88.3762626647949f);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  const float r = (xc - n * 0.693359375f) - n * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.33654f ? 0.0f : p * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

constexpr int kLanes = 16;  // partial accumulators: lets the compiler vectorise reductions

// max over s[0..n)
template <typename A>
inline A row_max(const A* s, int64_t n) {
  A acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = std::max(acc[l], s[j + l]);
  A m = -std::numeric_limits<A>::infinity();
  for (; j < n; ++j) m = std::max(m, s[j]);
  for (int l = 0; l < kLanes; ++l) m = std::max(m, acc[l]);
  return m;
}

// s[j] <- exp(s[j] - shift); returns the sum of the new values
template <typename A>
inline A exp_shift_sum(A* s, int64_t n, A shift) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A e = exp_fast(s[j + l] - shift);
      s[j + l] = e;
      acc[l] += e;
    }
  A sum = 0;
  for (; j < n; ++j) {
    s[j] = exp_fast(s[j] - shift);
    sum += s[j];
  }
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l] * y[j + l];
  A sum = 0;
  for (; j < n; ++j) sum += x[j] * y[j];
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

#ifdef ROLLINGQ_AVX2
// AVX2 versions of the float row loops (the compiler does not vectorise the exp loop or the
// max reduction on its own). Same maths as exp_fast above, eight lanes at a time.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), res);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <>
inline float row_max<float>(const float* s, int64_t n) {
  __m256 a0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_max_ps(a0, _mm256_loadu_ps(s + j));
    a1 = _mm256_max_ps(a1, _mm256_loadu_ps(s + j + 8));
  }
  float m = hmax256(_mm256_max_ps(a0, a1));
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

template <>
inline float exp_shift_sum<float>(float* s, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
    const __m256 e1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), sh));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    a0 = _mm256_add_ps(a0, e0);
    a1 = _mm256_add_ps(a1, e1);
  }
  float sum = hsum256(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) {
    s[j] = exp_fast(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

template <>
inline float dot<float>(const float* x, const float* y, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), a1);
  }
  float sum = hsum256(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}
#endif  // ROLLINGQ_AVX2

template <typename A>
inline void add_row(A* dst, const A* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

template <typename A>
inline void scale_row(A* x, A a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename Dst, typename Src>
inline void convert_row(Dst* dst, const Src* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Dst>(src[j]);
}

// dst[j] = static_cast<Dst>(src[j] * a)
template <typename Dst, typename A>
inline void store_scaled_row(Dst* dst, const A* src, A a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Dst>(src[j] * a);
}

}  // namespace cpu
}  // namespace rollingq
