// Tiling and shared-memory layout of the tensor-core backward (bwd_mma_kernel.cuh).
//
// Host and device, free of torch and CUDA headers. Three kernels:
//   prep:  one warp per query row: delta = rowsum(dout * out); with a rotation, q_rot = R q
//          rounded to T (the value the forward multiplied), into the q_rot workspace.
//   dq:    a block of 4 warps owns 128 query rows (32 per warp, two m16 tiles; D = 128: 64 rows,
//          16 per warp) and walks key tiles of 32: S = Q K^T and dP = dO V^T on tensor cores, P = exp(S - lse),
//          dS = P (dP - delta), dQ += dS K; rotated rows get dq = dq_rot R in the epilogue.
//   dkdv:  a block of 4 warps owns 64 keys (16 per warp) and walks query tiles of 64 (D = 128: 32):
//          S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// No atomics: dQ and dK/dV are accumulated by different blocks (P is recomputed in both), so
// the result is deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rollingq {

template <int kD>
struct MmaBwdConfig {
  static_assert(kD == 64 || kD == 128, "the tensor-core backward handles head dims 64 and 128");
  static constexpr int kThreads = 128;  // 4 warps
  static constexpr int kWarps = 4;

  // ---- dq kernel ----
  // 32 rows per warp for D = 64; 16 for D = 128, where dQ alone is 128 float registers per thread
  // at 32 rows and the S and dP tiles would not fit beside it.
  static constexpr int kDqMTiles = kD <= 64 ? 2 : 1;
  static constexpr int kDqBlockM = kWarps * 16 * kDqMTiles;
  static constexpr int kDqBlockN = 32;
  static constexpr size_t kDqQ = 0;                                      // Q (rotated) tile
  static constexpr size_t kDqDO = kDqQ + (size_t)kDqBlockM * kD * 2;     // dO tile
  static constexpr size_t kDqK = kDqDO + (size_t)kDqBlockM * kD * 2;     // two K tiles
  static constexpr size_t kDqV = kDqK + 2 * (size_t)kDqBlockN * kD * 2;  // one V tile
  static constexpr size_t kDqSmem = kDqV + (size_t)kDqBlockN * kD * 2;
  // the epilogue stages 16 float32 rows per warp (pitch kD + 8) over the Q, dO and K tiles
  static constexpr int kDqStagePitch = kD + 8;
  static_assert((size_t)kWarps * 16 * kDqStagePitch * 4 <= kDqV, "dq staging overflows");

  // ---- dkdv kernel ----
  static constexpr int kKvBlockN = 64;  // 16 keys per warp
  // query rows per tile: with D = 128, dK and dV take 128 float registers per thread, so the
  // S^T and dP^T tiles are 16 keys x 32 rows
  static constexpr int kKvBlockM = kD <= 64 ? 64 : 32;
  static constexpr size_t kKvK = 0;
  static constexpr size_t kKvV = kKvK + (size_t)kKvBlockN * kD * 2;
  static constexpr size_t kKvQ = kKvV + (size_t)kKvBlockN * kD * 2;      // two stages
  static constexpr size_t kKvDO = kKvQ + 2 * (size_t)kKvBlockM * kD * 2;  // two stages
  static constexpr size_t kKvLse = kKvDO + 2 * (size_t)kKvBlockM * kD * 2;  // 2 x 64 floats
  static constexpr size_t kKvDelta = kKvLse + 2 * (size_t)kKvBlockM * 4;    // 2 x 64 floats
  static constexpr size_t kKvSmem = kKvDelta + 2 * (size_t)kKvBlockM * 4;

  // register cap per architecture (see MmaFwdConfig::max_registers): 255 throughout; none of
  // these kernels spills with nvcc 13.0
  static constexpr int max_registers(int /*arch*/) { return 255; }
};

// Query rows per block of the prep kernel (one warp each).
constexpr int kBwdPrepRows = 4;

}  // namespace rollingq
