// Where each lane's mma.sync m16n8k16 operands live in the shared-memory tiles.
//
// The tensor-core kernel addresses its tiles only through these functions, and the CPU tests
// check them against the fragment layout of the PTX ISA (and run a whole 16-row tile through an
// emulated warp), so the index arithmetic is verified without a GPU. Notation: g = lane / 4,
// t = lane % 4; a 32-bit register holds two 16-bit elements, `half` 0 is the low one.
#pragma once

#include "tile_math.h"

namespace rollingq {
namespace mma {

RQ_HD int group(int lane) { return lane >> 2; }
RQ_HD int thread_in_group(int lane) { return lane & 3; }

// A (16 x 16, row-major in smem with row pitch ld): register reg in 0..3 holds the elements
// (row, col) and (row, col + 1); this is the offset of the first.
RQ_HD int a_offset(int lane, int reg, int ld) {
  const int row = group(lane) + ((reg & 1) ? 8 : 0);
  const int col = 2 * thread_in_group(lane) + ((reg & 2) ? 8 : 0);
  return row * ld + col;
}

// B (16 x 8) stored transposed, as [n][k] rows (the K tile: B[k][n] = K[n][k]): register reg in
// 0..1 holds (k, n) and (k + 1, n), adjacent in memory; offset of the first.
RQ_HD int b_offset_nk(int lane, int reg, int ld) {
  return group(lane) * ld + 2 * thread_in_group(lane) + (reg ? 8 : 0);
}

// B (16 x 8) stored as [k][n] rows (the V tile: B[k][n] = V[k][n]): the two halves of register
// reg come from two rows; offset of element `half`.
RQ_HD int b_offset_kn(int lane, int reg, int half, int ld) {
  return (2 * thread_in_group(lane) + (reg ? 8 : 0) + half) * ld + group(lane);
}

// C / D (16 x 8, f32): element e in 0..3 of a lane.
RQ_HD int c_row(int lane, int e) { return group(lane) + (e >= 2 ? 8 : 0); }
RQ_HD int c_col(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1); }

// P as the A operand of k-step kk (keys 16 kk .. 16 kk + 15) straight from the S accumulators:
// half `half` of A register reg is element c_elem(reg, half) of S n8-tile 2 kk + c_tile(reg).
RQ_HD int c_tile(int reg) { return reg >> 1; }
RQ_HD int c_elem(int reg, int half) { return (reg & 1) * 2 + half; }

}  // namespace mma
}  // namespace rollingq
