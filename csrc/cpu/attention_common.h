// Pieces shared by the forward and backward CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/attention_cpu.h"
#include "cpu/cpu_math.h"

namespace rollingq {
namespace cpu {

// Tile sizes: query tiles large enough for an efficient GEMM (torch's flash kernel uses the same
// split), key blocks of 512 rows.
inline int64_t query_tile(int64_t lq) {
  const int64_t t = lq >= 768 ? 256 : (lq >= 192 ? 64 : 32);
  return std::max<int64_t>(1, std::min(t, lq));
}
// At D = 768, 256 and 1024 were not faster than 512 (within the noise of a shared machine).
inline int64_t key_block(int64_t lk) {
  return std::max<int64_t>(1, std::min<int64_t>(512, lk));
}

// Tasks per parallel chunk: enough that a chunk does a few MFLOP, so that small problems run on
// the calling thread instead of paying for waking the pool (at::parallel_for runs a range shorter
// than the grain inline).
inline int64_t grain_for(int64_t flops_per_task) {
  constexpr int64_t kMinChunkFlops = int64_t(1) << 22;
  return std::max<int64_t>(1, kMinChunkFlops / std::max<int64_t>(1, flops_per_task));
}

// x[r] <- x[r] @ R^T (transpose_r) or x[r] @ R for the rows r < n with sel[r] (every row when
// sel is null). Only the selected rows are multiplied: RollingQ rotates the [CLS] row alone, and
// at D = 768 rotating a whole tile would cost a third of the attention itself.
// tmp holds 2 * n * D elements.
template <typename A>
inline void rotate_rows(A* x, const bool* sel, int64_t n, int64_t D, const A* R, bool transpose_r,
                        A* tmp) {
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) count += sel == nullptr || sel[r];
  if (count == 0) return;
  if (count == n) {
    gemm_rm<A>(false, transpose_r, n, D, D, A(1), x, D, R, D, A(0), tmp, D);
    std::copy(tmp, tmp + n * D, x);
    return;
  }
  A* gathered = tmp + n * D;
  int64_t i = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (!sel[r]) continue;
    std::copy(x + r * D, x + (r + 1) * D, gathered + i * D);
    ++i;
  }
  gemm_rm<A>(false, transpose_r, count, D, D, A(1), gathered, D, R, D, A(0), tmp, D);
  i = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (!sel[r]) continue;
    std::copy(tmp + i * D, tmp + (i + 1) * D, x + r * D);
    ++i;
  }
}

// Loads rows [r0, r0 + n) of one (batch, head) slice of q into buf (n x D, accumulation type)
// and applies the rotation to the selected rows: q_i <- R q_i, row form q_i @ R^T.
// tmp holds 2 * n * D elements.
template <typename T, typename A>
inline void load_rotated_queries(const AttentionParams& p, const T* q, int64_t b, int64_t h,
                                 int64_t r0, int64_t n, A* buf, A* tmp) {
  const int64_t D = p.head_dim;
  for (int64_t r = 0; r < n; ++r) convert_row(buf + r * D, q + (r0 + r) * p.q_row_stride, D);
  if (p.rotation == nullptr) return;
  const bool* rows = p.rotated_rows ? p.rotated_rows + b * p.rotated_rows_batch_stride + r0 : nullptr;
  const A* R = static_cast<const A*>(p.rotation) + h * p.rotation_head_stride;
  rotate_rows(buf, rows, n, D, R, /*transpose_r=*/true, tmp);
}

}  // namespace cpu
}  // namespace rollingq
