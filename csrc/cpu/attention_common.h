// Pieces shared by the forward and backward CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/attention_cpu.h"
#include "cpu/cpu_math.h"

namespace rollingq {
namespace cpu {

// Tile sizes: query tiles large enough for an efficient GEMM, key blocks small enough that a
// block of K and V stays in the per-core L2 for large head dims.
inline int64_t query_tile(int64_t lq) {
  const int64_t t = lq >= 768 ? 256 : (lq >= 192 ? 64 : 32);
  return std::max<int64_t>(1, std::min(t, lq));
}
inline int64_t key_block(int64_t lk, int64_t d) {
  const int64_t t = d > 256 ? 256 : 512;
  return std::max<int64_t>(1, std::min(t, lk));
}

// Loads rows [r0, r0 + n) of one (batch, head) slice of q into buf (n x D, accumulation type)
// and applies the rotation to the selected rows: q_i <- R q_i, row form q_i @ R^T.
template <typename T, typename A>
inline void load_rotated_queries(const AttentionParams& p, const T* q, int64_t b, int64_t h, int64_t r0,
                          int64_t n, A* buf, A* tmp) {
  const int64_t D = p.head_dim;
  for (int64_t r = 0; r < n; ++r) convert_row(buf + r * D, q + (r0 + r) * p.q_row_stride, D);
  if (p.rotation == nullptr) return;
  const bool* rows = p.rotated_rows ? p.rotated_rows + b * p.seqlen_q + r0 : nullptr;
  bool any = rows == nullptr;
  for (int64_t r = 0; r < n && !any; ++r) any = rows[r];
  if (!any) return;
  const A* R = static_cast<const A*>(p.rotation) + h * D * D;
  gemm_rm<A>(false, true, n, D, D, A(1), buf, D, R, D, A(0), tmp, D);
  for (int64_t r = 0; r < n; ++r)
    if (rows == nullptr || rows[r]) std::copy(tmp + r * D, tmp + (r + 1) * D, buf + r * D);
}

}  // namespace cpu
}  // namespace rollingq
