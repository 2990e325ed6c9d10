// Pieces shared by the tensor-core kernels (forward and backward): the cp.async row-tile copier,
// ldmatrix addresses into swizzled tiles, quad reductions, the rotated-row test. Written against
// simt.cuh, like the kernels, so the CPU executor runs them too.
#pragma once

#include "../rollingq_params.h"
#include "simt.cuh"
#include "smem_layout.h"

namespace rollingq {
namespace tc {

using simt::u32x4;

constexpr float kLog2e = 1.4426950408889634f;

// Copies row tiles of kRows x kD elements from global memory into swizzled shared tiles with
// cp.async; rows past the end are zero-filled (so they add exact zeros to the MMAs). Thread tid
// copies chunk tid % (kD / 8) of rows tid / (kD / 8) + k * (kThreads / (kD / 8)): its swizzled
// column is the same in every step, so the steps differ by constant offsets. One copier per
// tensor holds only this thread's source pointer (the row stride is read from the parameters).
template <int kD, int kRows, int kThreads>
struct RowCopier {
  static constexpr int kSteps = kRows * (kD / 8) / kThreads;
  static constexpr int kRowStep = kThreads / (kD / 8);
  static_assert(kSteps * kThreads == kRows * (kD / 8) && kRowStep % 8 == 0,
                "tile not divisible among the threads");
  const uint16_t* src;  // row copy_row(tid) of the slice, at this thread's chunk

  RQ_DEV RowCopier(const uint16_t* slice, int64_t row_stride, int tid)
      : src(slice + (layout::copy_row<kD, kThreads>(tid, 0) * row_stride +
                     static_cast<unsigned>(8 * layout::copy_chunk<kD, kThreads>(tid, 0)))) {}

  // Rows [first_row, first_row + kRows) of the slice into `tile`; rows >= rows_valid (relative
  // to first_row) are zero-filled.
  RQ_DEV void copy(uint16_t* tile, int first_row, int rows_valid, int64_t row_stride,
                   int tid) const {
    const int r0 = layout::copy_row<kD, kThreads>(tid, 0);
    uint16_t* dst = tile + layout::swz<kD>(r0, 8 * layout::copy_chunk<kD, kThreads>(tid, 0));
    const uint16_t* from = src + first_row * row_stride;
    RQ_UNROLL
    for (int it = 0; it < kSteps; ++it) {
      if (r0 + it * kRowStep < rows_valid)
        simt::cp_async_16(dst + it * kRowStep * kD, from);
      else
        simt::sts(reinterpret_cast<u32x4*>(dst + it * kRowStep * kD), u32x4{0u, 0u, 0u, 0u});
      from += kRowStep * row_stride;
    }
  }
};

// The key-code record of one key tile (kBytes, a multiple of 16) with cp.async.
template <int kBytes>
RQ_DEV void load_codes(int8_t* dst, const int8_t* src, int tid) {
  if (tid < kBytes / 16) simt::cp_async_16(dst + 16 * tid, src + 16 * tid);
}

// &tile[swz(row, col)] for an ldmatrix row address: `row7` must be row % 8 (the lane's, for
// every operand the kernel loads) and col a multiple of 8. The XOR is taken of an opaque copy
// of row7, so each ldmatrix recomputes its address with one LOP3 instead of the compiler
// keeping one address register per distinct swizzle pattern across the whole loop.
template <int kD>
RQ_DEV const uint16_t* ldsm_addr(const uint16_t* tile, int row, int col, int row7) {
  return tile + row * kD + (((col >> 3) ^ simt::opaque(row7)) << 3);
}

RQ_DEV float quad_max(float x) {
  x = fmaxf(x, simt::shfl_xor(x, 1));
  return fmaxf(x, simt::shfl_xor(x, 2));
}
RQ_DEV float quad_sum(float x) {
  x += simt::shfl_xor(x, 1);
  return x + simt::shfl_xor(x, 2);
}

RQ_DEV bool row_rotated(const AttentionParams& p, int64_t b, int64_t i) {
  return p.rotated_rows == nullptr || simt::ldg(p.rotated_rows + b * p.seqlen_q + i);
}

}  // namespace tc
}  // namespace rollingq
