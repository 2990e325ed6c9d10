// Portable SIMD for the kernel variants: GCC/Clang vector extensions, whose width is the widest
// the variant's compile flags allow (64 bytes with AVX-512, 32 with AVX2, 16 otherwise: SSE2 on
// x86-64, NEON on aarch64). The compiler maps +, -, *, comparisons and selects to native
// instructions, and contracts a * b + c to an FMA where the target has one (-ffp-contract=fast).
//
// Included only by csrc/cpu/isa/*.cpp, inside that variant's namespace and an anonymous
// namespace: every function here has internal linkage in each variant.
//
// NaN rules (the kernels must propagate NaN exactly where torch's SDPA does):
//  * vmax(a, b) = a > b ? a : b, which is the x86 max instruction: it returns b when either is
//    NaN. Row maxima may therefore skip a NaN score; the kernels never rely on the maximum to
//    carry NaN, they let exp2v() carry it into the row sum instead.
//  * exp2v(NaN) = NaN, exp2v(-inf) = 0 (exp2v is only used on arguments <= 0).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/namespace.h"

ROLLINGQ_KERNELS_BEGIN

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename X, typename Y>
struct same_type {
  static constexpr bool value = false;
};
template <typename X>
struct same_type<X, X> {
  static constexpr bool value = true;
};

template <typename A>
struct VT;

template <>
struct VT<float> {
  typedef float v __attribute__((vector_size(kVecBytes)));
  typedef float vu __attribute__((vector_size(kVecBytes), aligned(4)));
  typedef int32_t vi __attribute__((vector_size(kVecBytes)));
  typedef uint32_t vui __attribute__((vector_size(kVecBytes)));
  typedef uint16_t vh __attribute__((vector_size(kVecBytes / 2)));
  typedef uint16_t vhu __attribute__((vector_size(kVecBytes / 2), aligned(2)));
  static constexpr int W = kVecBytes / 4;
};

template <>
struct VT<double> {
  typedef double v __attribute__((vector_size(kVecBytes)));
  typedef double vu __attribute__((vector_size(kVecBytes), aligned(8)));
  typedef int64_t vi __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};

template <typename A>
using vec_t = typename VT<A>::v;

template <typename A>
inline vec_t<A> vload(const A* p) {
  return *reinterpret_cast<const typename VT<A>::vu*>(p);
}
template <typename A>
inline void vstore(A* p, vec_t<A> x) {
  *reinterpret_cast<typename VT<A>::vu*>(p) = x;
}
// x - 0 == x for every x (signed zeros and NaN included), so this folds to a broadcast.
template <typename A>
inline vec_t<A> vbcast(A x) {
  return x - vec_t<A>{};
}
template <typename A>
inline vec_t<A> vmax(vec_t<A> a, vec_t<A> b) {
  return a > b ? a : b;
}
// Whether any lane of a comparison's result (a lane is all ones where true) is true: one test
// instruction instead of a loop over the lanes.
template <typename I>
inline bool any_lane(I c) {
#if defined(__AVX512F__)
  if constexpr (sizeof(I) == 64) return _mm512_test_epi32_mask((__m512i)c, (__m512i)c) != 0;
#elif defined(__AVX2__)
  if constexpr (sizeof(I) == 32) return !_mm256_testz_si256((__m256i)c, (__m256i)c);
#endif
  bool r = false;
  for (int l = 0; l < int(sizeof(I) / sizeof(c[0])); ++l) r |= c[l] != 0;
  return r;
}
// Lanes that are not finite (inf - inf and NaN - NaN are NaN)
template <typename A>
inline auto not_finite(vec_t<A> x) {
  const vec_t<A> d = x - x;
  return d != d;
}

template <typename A>
inline vec_t<A> viota() {
  vec_t<A> r;
  for (int l = 0; l < VT<A>::W; ++l) r[l] = A(l);
  return r;
}
// The lanes' sum by halves (lane l + w added to lane l, w = W/2, W/4, ..., 1): a few shuffles
// instead of a chain of W dependent adds.
template <typename A>
inline A hsum_tree(vec_t<A> x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(x) == 64 && same_type<A, float>::value) return _mm512_reduce_add_ps(x);
  if constexpr (sizeof(x) == 64 && same_type<A, double>::value) return _mm512_reduce_add_pd(x);
#elif defined(__AVX2__)
  if constexpr (sizeof(x) == 32 && same_type<A, float>::value) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  if constexpr (sizeof(x) == 32 && same_type<A, double>::value) {
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
#endif
  for (int w = VT<A>::W / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) x[l] += x[l + w];
  return x[0];
}

// sum_i x[i] y[i], i < n: two vector chains, then the tail
template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  constexpr int W = VT<A>::W;
  vec_t<A> s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 += vload(x + i) * vload(y + i);
    s1 += vload(x + i + W) * vload(y + i + W);
  }
  for (; i + W <= n; i += W) s0 += vload(x + i) * vload(y + i);
  A s = hsum_tree<A>(s0 + s1);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^t for t <= 0, -inf and NaN, relative error 3e-7: range reduction t = n + r, |r| <= 1/2, a
// degree-5 polynomial for 2^r (fitted on [-1/2, 1/2]), 2^n put into the exponent. t below -126
// gives 0 (no subnormal ever reaches an FMA), NaN stays NaN.
#if defined(__AVX512F__)
inline VT<float>::v exp2v(VT<float>::v tv) {
  const __m512 t = (__m512)tv;
  // No clamp needed: -inf and t < -126 are zeroed by the mask (-inf - -inf is NaN in r, but the
  // mask discards it), NaN is kept (unordered compare), and scalef saturates large n to inf.
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3056319439783692e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.67874564230442e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.551639199256897e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022091925144196e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931460499763489e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return (VT<float>::v)_mm512_maskz_scalef_ps(keep, p, n);
}
// The same to relative error 8e-5, for probabilities that are rounded to bfloat16 (relative step
// 4e-3) before they are used: r = t - floor(t) in [0, 1) in one instruction (VREDUCEPS), a
// degree-3 polynomial for 2^r fitted on [0, 1), and scalef multiplies by 2^floor(t) itself.
// Not exact at t = 0 (0.99993): never use it where exactly 1 matters.
inline __m512 exp2_fraction_coarse(__m512 t) {
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(7.8024087464149142e-2f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.2606699247434053e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9583401837859904e-1f));
  return _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.9992512472860573e-1f));
}
inline VT<float>::v exp2v_coarse(VT<float>::v tv) {
  const __m512 t = (__m512)tv;
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return (VT<float>::v)_mm512_maskz_scalef_ps(keep, exp2_fraction_coarse(t), t);
}
// exp2v_coarse without the mask: t below -126 gives the subnormal 2^t (the bf16 conversion that
// follows flushes it to zero), -inf gives 0 (VREDUCEPS returns 0 for infinities), NaN stays NaN.
// One instruction less on the multiply pipes, for the avx512_dot forward: on the AMD CPUs that
// run it by default, subnormal results and sums cost no more than normal ones (Intel CPUs may
// take microcode assists on them, and run the masked exp2v_coarse).
inline VT<float>::v exp2v_coarse_subnormal(VT<float>::v tv) {
  const __m512 t = (__m512)tv;
  return (VT<float>::v)_mm512_scalef_ps(exp2_fraction_coarse(t), t);
}
#else
inline VT<float>::v exp2v(VT<float>::v t) {
  using V = VT<float>::v;
  const V lo = vbcast(-127.0f), hi = vbcast(128.0f);
  const V tc = t < lo ? lo : (t > hi ? hi : t);
  const V n = (tc + 12582912.0f) - 12582912.0f;  // round to nearest (|tc| < 2^22)
  const V r = tc - n;
  V p = vbcast(1.3056319439783692e-3f);
  p = p * r + 9.67874564230442e-3f;
  p = p * r + 5.551639199256897e-2f;
  p = p * r + 2.4022091925144196e-1f;
  p = p * r + 6.931460499763489e-1f;
  p = p * r + 1.0f;
  const VT<float>::vi e = (__builtin_convertvector(n, VT<float>::vi) + 127) << 23;
  const V res = p * (V)e;  // 2^128 encodes +inf
  return t < vbcast(-126.0f) ? V{} : res;
}
#endif

// double: lane by lane through the C library (float64 is the precision reference, not a fast
// path).
inline VT<double>::v exp2v(VT<double>::v t) {
  VT<double>::v r{};
  for (int l = 0; l < VT<double>::W; ++l) r[l] = __builtin_exp2(t[l]);
  return r;
}

template <typename A>
constexpr A log2e() {
  return A(1.4426950408889634073599246810019);
}

// ---- dropout: Philox4x32-10, N lanes at a time (rollingq_kernels/dropout.py is the spec) ------

template <int N>
struct PhiloxLanes {
  typedef uint32_t u32 __attribute__((vector_size(4 * N)));
  typedef uint64_t u64 __attribute__((vector_size(8 * N)));
};

// The four output words for the counters (c0, c1, c2, c3) of N lanes under key (k0, k1).
template <int N>
inline void philox4x32_10(typename PhiloxLanes<N>::u32 (&c)[4], uint32_t k0, uint32_t k1) {
  using U32 = typename PhiloxLanes<N>::u32;
  using U64 = typename PhiloxLanes<N>::u64;
  U32 c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int r = 0; r < 10; ++r) {
    const U64 p0 = __builtin_convertvector(c0, U64) * uint64_t(0xD2511F53u);
    const U64 p1 = __builtin_convertvector(c2, U64) * uint64_t(0xCD9E8D57u);
    const U32 hi0 = __builtin_convertvector(p0 >> 32, U32), lo0 = __builtin_convertvector(p0, U32);
    const U32 hi1 = __builtin_convertvector(p1 >> 32, U32), lo1 = __builtin_convertvector(p1, U32);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

// ---- bfloat16 storage (the upper 16 bits of a float) ----------------------------------------

struct bf16 {
  uint16_t x;
};

inline float bf16_to_float(bf16 h) {
  const uint32_t u = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <typename A, typename T>
inline A to_acc(T x) {
  return static_cast<A>(x);
}
template <>
inline float to_acc<float, bf16>(bf16 x) {
  return bf16_to_float(x);
}
template <typename T, typename A>
inline T from_acc(A x) {
  return static_cast<T>(x);
}
template <>
inline bf16 from_acc<bf16, float>(float x) {
  return float_to_bf16(x);
}

// dst[0..n) = src[0..n) converted
template <typename A, typename T>
inline void load_row(A* dst, const T* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_acc<A>(src[j]);
}
template <typename T, typename A>
inline void store_row(T* dst, const A* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = from_acc<T>(src[j]);
}
// bf16 rows a vector at a time, with the scalar conversions' bits (the compiler does not
// vectorise the scalar loops over the bf16 struct: a 64-value row cost 100+ cycles).
template <>
inline void load_row<float, bf16>(float* dst, const bf16* src, int64_t n) {
  using T = VT<float>;
  int64_t j = 0;
  for (; j + T::W <= n; j += T::W) {
    typename T::vh h;
    std::memcpy(&h, src + j, sizeof(h));
    const typename T::vui u = __builtin_convertvector(h, typename T::vui) << 16;
    std::memcpy(dst + j, &u, sizeof(u));
  }
  for (; j < n; ++j) dst[j] = bf16_to_float(src[j]);
}
template <>
inline void store_row<bf16, float>(bf16* dst, const float* src, int64_t n) {
  using T = VT<float>;
  int64_t j = 0;
  for (; j + T::W <= n; j += T::W) {
    typename T::vui u;
    std::memcpy(&u, src + j, sizeof(u));
    const typename T::vui rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const typename T::vui quiet = (u >> 16) | 0x40u;
    const typename T::vui r = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
    const typename T::vh h = __builtin_convertvector(r, typename T::vh);
    std::memcpy(dst + j, &h, sizeof(h));
  }
  for (; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

// ---- float16 storage (IEEE binary16), computed in float32 --------------------------------------
//
// Conversions are the compiler's _Float16 ones (round to nearest even, NaN and inf kept):
// F16C instructions where the variant has them (x86-64-v3 and up), a library routine otherwise.

struct f16 {
  uint16_t x;
};

inline float f16_to_float(f16 h) {
  _Float16 v;
  std::memcpy(&v, &h.x, sizeof(v));
  return float(v);
}
inline f16 float_to_f16(float f) {
  const _Float16 v = _Float16(f);
  f16 h;
  std::memcpy(&h.x, &v, sizeof(v));
  return h;
}
template <>
inline float to_acc<float, f16>(f16 x) {
  return f16_to_float(x);
}
template <>
inline f16 from_acc<f16, float>(float x) {
  return float_to_f16(x);
}
// Whole vectors at a time, as the bf16 rows above (vcvtph2ps / vcvtps2ph with F16C): the
// elements before the scalar tail, converted from vectors VS to vectors VD of as many lanes.
template <typename VD, typename VS, typename D, typename S>
inline int64_t convert_vectors(D* dst, const S* src, int64_t n) {
  constexpr int64_t W = sizeof(VS) / sizeof(S);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    VS x;
    std::memcpy(&x, src + j, sizeof(x));
    const VD y = __builtin_convertvector(x, VD);
    std::memcpy(dst + j, &y, sizeof(y));
  }
  return j;
}
typedef _Float16 vf16_t __attribute__((vector_size(kVecBytes / 2)));
template <>
inline void load_row<float, f16>(float* dst, const f16* src, int64_t n) {
  for (int64_t j = convert_vectors<VT<float>::v, vf16_t>(dst, src, n); j < n; ++j)
    dst[j] = f16_to_float(src[j]);
}
template <>
inline void store_row<f16, float>(f16* dst, const float* src, int64_t n) {
  for (int64_t j = convert_vectors<vf16_t, VT<float>::v>(dst, src, n); j < n; ++j)
    dst[j] = float_to_f16(src[j]);
}

// Streaming stores: whole 64-byte lines written straight to memory, without reading them into
// the cache first. stream_row writes n values converted as store_row converts them (the same
// bits) to dst, 64-byte aligned, n * sizeof(T) a multiple of 64; stream_fence orders them
// before the stores that follow (the end of a task batch). Without AVX2 they are store_row and
// nothing.
inline void stream_line(void* dst, const void* line) {
#if defined(__AVX512F__)
  _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_load_si512(line));
#elif defined(__AVX2__)
  _mm256_stream_si256(static_cast<__m256i*>(dst), _mm256_load_si256(static_cast<const __m256i*>(line)));
  _mm256_stream_si256(static_cast<__m256i*>(dst) + 1,
                      _mm256_load_si256(static_cast<const __m256i*>(line) + 1));
#else
  std::memcpy(dst, line, 64);
#endif
}
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}
template <typename T, typename A>
inline void stream_row(T* dst, const A* src, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (int64_t j = 0; j < n; j += kLine) {
    alignas(64) T line[kLine];
    store_row(line, src + j, kLine);
    stream_line(dst + j, line);
  }
}

template <typename X>
inline X imin(X a, X b) {
  return a < b ? a : b;
}
template <typename X>
inline X imax(X a, X b) {
  return a < b ? b : a;
}
inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// Rows read one after another from a tensor (packing K and V) come in from memory faster when,
// as each row is read, the row kPrefetchAheadBytes further on is requested: the hardware
// prefetchers alone kept too few lines in flight (bf16 decoding from a KV cache: 0.61-0.71x the
// time with it on Zen 5; five forward and backward cases of make bench 0.97-0.99x).
// rows_ahead: that distance in rows of row_bytes.
constexpr int64_t kPrefetchAheadBytes = 4096;
inline int64_t rows_ahead(int64_t row_bytes) {
  return imax<int64_t>(1, ceil_div(kPrefetchAheadBytes, imax<int64_t>(row_bytes, 1)));
}
// Every cache line of [p, p + bytes) requested into L1 (a prefetch never faults).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
}
// The rows of a tensor read one after another (`rows` of them exist, `stride` elements apart,
// the first `width` elements of each read): at(j), as row j is read, requests the row
// rows_ahead() further on when there is one. rows = 0: nothing is requested.
template <typename T>
struct RowsAhead {
  const T* base;
  int64_t stride, rows, width, ahead;
  RowsAhead(const T* base_, int64_t stride_, int64_t rows_, int64_t width_)
      : base(base_), stride(stride_), rows(rows_), width(width_),
        ahead(rows_ahead(width_ * int64_t(sizeof(T)))) {}
  void at(int64_t j) const {
    if (j + ahead < rows) prefetch_lines(base + (j + ahead) * stride, width * int64_t(sizeof(T)));
  }
};

ROLLINGQ_KERNELS_END
