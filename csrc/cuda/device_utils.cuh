// Device helpers shared by the kernels: element conversion, warp reductions, the tensor-core
// MMA wrapper and the per-(batch, head) key statistics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../rollingq_params.h"
#include "tile_math.h"

namespace rollingq {
namespace dev {

// ---- conversions -------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x as the nearest value of type T (identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Two floats packed into one 32-bit register of two 16-bit values (the low half is `lo`), the
// operand format of mma.sync for f16 / bf16.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Two 16-bit elements from two (not necessarily adjacent) shared-memory addresses.
template <typename T>
__device__ __forceinline__ uint32_t pack2_raw(const T* lo, const T* hi) {
  const uint32_t a = *reinterpret_cast<const uint16_t*>(lo);
  const uint32_t b = *reinterpret_cast<const uint16_t*>(hi);
  return a | (b << 16);
}

// ---- warp reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
// Over the 4 lanes of a quad (the lanes that share an accumulator row of mma.sync m16n8).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

// ---- tensor cores ------------------------------------------------------------------------------
// D(16x8, f32) += A(16x16, row) * B(16x8, col) on sm_80+. Fragment layout per lane (g = lane/4,
// t = lane%4): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..].
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- key statistics ----------------------------------------------------------------------------
// key_sum[b, h, m, :] = sum of k over the non-padded keys of modality m; key_count[b, m] (by the
// head-0 block). Run by the first query block of every (b, h), after its attention work; every
// thread of the block takes part. Pairs (m, d) are spread over the threads so that consecutive
// threads read consecutive elements of a key row.
template <typename T>
__device__ void key_stats(const AttentionParams& p, int64_t b, int64_t h, int tid, int nthreads) {
  const int M = p.num_modalities;
  if (M <= 0) return;
  const int64_t D = p.head_dim;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const int32_t* ids = p.key_modality + b * p.seqlen_k;
  const bool* pad = p.key_padding == nullptr ? nullptr : p.key_padding + b * p.seqlen_k;
  float* key_sum = static_cast<float*>(p.key_sum) + (b * p.heads + h) * M * D;
  for (int64_t pair = tid; pair < (int64_t)M * D; pair += nthreads) {
    const int m = static_cast<int>(pair / D);
    const int64_t d = pair % D;
    float s = 0.f;
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      if (tile::key_code(j, p.seqlen_k, pad, ids) == m) s += to_float(k[j * p.k_row_stride + d]);
    }
    key_sum[pair] = s;
  }
  if (h == 0) {
    float* count = static_cast<float*>(p.key_count) + b * M;
    for (int m = tid; m < M; m += nthreads) {
      float c = 0.f;
      for (int64_t j = 0; j < p.seqlen_k; ++j) c += tile::key_code(j, p.seqlen_k, pad, ids) == m;
      count[m] = c;
    }
  }
}

}  // namespace dev
}  // namespace rollingq
