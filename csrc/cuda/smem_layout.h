// Where the tensor-core forward keeps its tiles in shared memory, and which address each lane
// hands to ldmatrix / cp.async. Host and device; the kernels address their tiles only through
// these functions and the CPU tests check them (bijective swizzle, conflict-free accesses, the
// fragments ldmatrix delivers against the mma.sync operand tables of the PTX ISA).
//
// A tile is `rows` rows of kD 16-bit elements (kD = 64 or 128: 8 or 16 chunks of 16 bytes per
// row). Element (row, col) lives in chunk (col / 8) XOR (row % 8) of its row: the 8 rows an
// ldmatrix reads at one logical chunk land in 8 different 16-byte bank groups, and the 8
// consecutive chunks a quarter-warp of cp.async writes are a permutation of one 128-byte line.
#pragma once

#include <cstdint>

#include "tile_math.h"

namespace rollingq {
namespace layout {

// Element offset of (row, col) in a swizzled tile of kD-element rows.
template <int kD>
RQ_HD int swz(int row, int col) {
  static_assert(kD % 64 == 0, "the XOR swizzle needs at least 8 chunks of 16 bytes per row");
  return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// ---- ldmatrix.x4 row addresses (element coordinates relative to the operand's corner) ---------
// Lane l addresses row l % 8 of matrix l / 8; register j of every lane holds from matrix j.
//
// A operand, 16 x 16 (rows x k): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15), i.e. registers a0..a3 of mma.m16n8k16.
RQ_HD int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
RQ_HD int ldsm_a_col(int lane) { return (lane >> 4) * 8; }

// B operand of two adjacent n8 tiles from an [n][k] tile (the K tile: B[k][n] = K[n][k]),
// without .trans: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15),
// i.e. registers b0, b1 of n-tile 0 then b0, b1 of n-tile 1.
RQ_HD int ldsm_bnk_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
RQ_HD int ldsm_bnk_col(int lane) { return ((lane >> 3) & 1) * 8; }

// B operand of two adjacent n8 tiles from a [k][n] tile (the V tile: B[k][n] = V[k][n]), with
// .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), i.e.
// registers b0, b1 of n-tile 0 then b0, b1 of n-tile 1.
RQ_HD int ldsm_bkn_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
RQ_HD int ldsm_bkn_col(int lane) { return (lane >> 4) * 8; }

// ---- accumulators --------------------------------------------------------------------------------
// C / D of mma.m16n8k16 (f32): element e of a lane is (row c_row, col c_col) of the 16 x 8 tile.
RQ_HD int c_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
RQ_HD int c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// ---- cp.async tile copy ------------------------------------------------------------------------
// Copy step `it` of thread `tid` moves 16-byte chunk `chunk` of row `row`: consecutive threads
// take consecutive chunks of a row (coalesced in global memory).
template <int kD, int kThreads>
RQ_HD int copy_row(int tid, int it) {
  return (tid + it * kThreads) / (kD / 8);
}
template <int kD, int kThreads>
RQ_HD int copy_chunk(int tid, int it) {
  return (tid + it * kThreads) % (kD / 8);
}

// ---- one-hot operands -----------------------------------------------------------------------------
// Two key codes (int8, the first in the low byte) as one 32-bit mma operand register of 16-bit
// values: `one` (the bits of 1.0) where the code equals `column`, else 0.
RQ_HD uint32_t one_hot_pair(uint32_t code_pair, int column, uint32_t one) {
  const int c0 = static_cast<int8_t>(code_pair & 0xffu);
  const int c1 = static_cast<int8_t>((code_pair >> 8) & 0xffu);
  return (c0 == column ? one : 0u) | (c1 == column ? one << 16 : 0u);
}

}  // namespace layout
}  // namespace rollingq
