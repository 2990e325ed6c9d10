// The primitive layer of the tensor-core kernels: every thread index, barrier, warp collective,
// shared / global access and special-function call they make goes through this header.
//
// Under nvcc each function is one PTX instruction (or a plain access). Compiled with a host
// compiler, the same functions call the SIMT executor of emulation/simt_emulator.h, which runs
// the kernel's threads as fibers and checks races, divergence, bounds and bank conflicts; the
// call site (file:line) is passed along so that its reports name the instruction. The kernels
// themselves never use a CUDA builtin directly, so one source serves both.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RQ_DEV __device__ __forceinline__
#define RQ_UNROLL _Pragma("unroll")
#else
#include <cmath>
#include <type_traits>

#include "emulation/simt_emulator.h"
#define RQ_DEV inline
#define RQ_UNROLL
#endif

namespace rollingq {
namespace simt {

#if defined(__CUDACC__)

using bf16 = __nv_bfloat16;
using fp16 = __half;
using u32x4 = uint4;
using f32x2 = float2;

RQ_DEV int thread_index() { return static_cast<int>(threadIdx.x); }
RQ_DEV int block_x() { return static_cast<int>(blockIdx.x); }
RQ_DEV int block_y() { return static_cast<int>(blockIdx.y); }
RQ_DEV int block_z() { return static_cast<int>(blockIdx.z); }
RQ_DEV int grid_x() { return static_cast<int>(gridDim.x); }
RQ_DEV void sync_threads() { __syncthreads(); }
RQ_DEV float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
RQ_DEV uint32_t ballot(bool pred) { return __ballot_sync(0xffffffffu, pred); }

RQ_DEV uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8; register j of lane l
// receives elements (l / 4, 2 (l % 4) .. +1) of matrix j (with .trans: of its transpose).
RQ_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}
RQ_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}

template <typename T>
RQ_DEV void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
RQ_DEV void mma_16816<bf16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
RQ_DEV void mma_16816<fp16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, bypassing L1; lands when a wait_group covers its commit group.
RQ_DEV void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src)
               : "memory");
}
RQ_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
RQ_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <typename V>
RQ_DEV V lds(const V* p) {
  return *p;
}
template <typename V>
RQ_DEV void sts(V* p, V v) {
  *p = v;
}
template <typename V>
RQ_DEV V ldg(const V* p) {
  return *p;
}
template <typename V>
RQ_DEV void stg(V* p, V v) {
  *p = v;
}

// v, as a value the compiler may not hoist out of a loop or share between uses: an address
// computed from it is recomputed next to each use instead of occupying a register all along.
RQ_DEV int opaque(int v) {
  int r;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(r) : "r"(v));
  return r;
}

RQ_DEV float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
RQ_DEV float log_approx(float x) { return __logf(x); }

#else  // ---------------------------------------------------------------- host emulation

using bf16 = emu::bf16_t;
using fp16 = emu::half_t;
struct alignas(16) u32x4 {
  uint32_t x, y, z, w;
};
struct alignas(8) f32x2 {
  float x, y;
};

#define RQ_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline int thread_index() { return emu::thread_index(); }
inline int block_x() { return emu::block_index(0); }
inline int block_y() { return emu::block_index(1); }
inline int block_z() { return emu::block_index(2); }
inline int grid_x() { return emu::grid_size(0); }
inline void sync_threads(RQ_SITE) { emu::sync_threads(file, line); }
inline float shfl_xor(float v, int lane_mask, RQ_SITE) {
  return emu::shfl_xor(v, lane_mask, file, line);
}
inline uint32_t ballot(bool pred, RQ_SITE) { return emu::ballot(pred, file, line); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, RQ_SITE) {
  emu::ldmatrix_x4(r, row_addr, false, file, line);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr, RQ_SITE) {
  emu::ldmatrix_x4(r, row_addr, true, file, line);
}
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, RQ_SITE) {
  emu::mma_16816(c, a, b0, b1, std::is_same<T, bf16>::value, file, line);
}
inline void cp_async_16(void* smem_dst, const void* gmem_src, RQ_SITE) {
  emu::cp_async_16(smem_dst, gmem_src, file, line);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait(RQ_SITE) {
  emu::cp_async_wait(N, file, line);
}
template <typename V>
inline V lds(const V* p, RQ_SITE) {
  V v;
  emu::shared_load(&v, p, sizeof(V), file, line);
  return v;
}
template <typename V>
inline void sts(V* p, V v, RQ_SITE) {
  emu::shared_store(p, &v, sizeof(V), file, line);
}
template <typename V>
inline V ldg(const V* p, RQ_SITE) {
  V v;
  emu::global_load(&v, p, sizeof(V), file, line);
  return v;
}
template <typename V>
inline void stg(V* p, V v, RQ_SITE) {
  emu::global_store(p, &v, sizeof(V), file, line);
}
inline int opaque(int v) { return v; }
inline float exp2_approx(float x) { return std::exp2(x); }
inline float log_approx(float x) { return std::log(x); }

#undef RQ_SITE

#endif

// ---- 16-bit element types ----------------------------------------------------------------------
// kOne: the bits of 1.0; pack(lo, hi): two floats rounded to nearest-even into one register (lo
// in the low half), the operand format of mma.sync.
template <typename T>
struct Elem;

template <>
struct Elem<bf16> {
  static constexpr uint32_t kOne = 0x3F80u;
  RQ_DEV static float to_float(uint16_t bits) {
#if defined(__CUDACC__)
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
#else
    return emu::bf16_to_float(bits);
#endif
  }
  RQ_DEV static uint16_t from_float(float x) {
#if defined(__CUDACC__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
    return emu::float_to_bf16(x);
#endif
  }
  RQ_DEV static uint32_t pack(float lo, float hi) {
#if defined(__CUDACC__)
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
#else
    return static_cast<uint32_t>(emu::float_to_bf16(lo)) |
           (static_cast<uint32_t>(emu::float_to_bf16(hi)) << 16);
#endif
  }
};

template <>
struct Elem<fp16> {
  static constexpr uint32_t kOne = 0x3C00u;
  RQ_DEV static float to_float(uint16_t bits) {
#if defined(__CUDACC__)
    return __half2float(__ushort_as_half(bits));
#else
    return emu::half_to_float(bits);
#endif
  }
  RQ_DEV static uint16_t from_float(float x) {
#if defined(__CUDACC__)
    return __half_as_ushort(__float2half_rn(x));
#else
    return emu::float_to_half(x);
#endif
  }
  RQ_DEV static uint32_t pack(float lo, float hi) {
#if defined(__CUDACC__)
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
#else
    return static_cast<uint32_t>(emu::float_to_half(lo)) |
           (static_cast<uint32_t>(emu::float_to_half(hi)) << 16);
#endif
  }
};

}  // namespace simt
}  // namespace rollingq
