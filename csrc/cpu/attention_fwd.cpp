// Fused RollingQ attention forward on the CPU.
//
// One task = (batch, head, tile of query rows). It rotates the tile's selected rows in the
// prologue, then streams K/V in blocks with an online softmax (FlashAttention style): scores of
// a block come from one GEMM, masking / exp / row sums / per-modality mass are one pass over
// them, and P @ V is a second GEMM into a float accumulator. Memory is O(tile), never O(L^2).
// Statistics come out of the same pass: the modality mass is rescaled like the output, the key
// sums are taken by the task that owns query tile 0 of its (batch, head).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_common.h"
#include "cpu/cpu_math.h"

namespace rollingq {
namespace cpu {
namespace {

// Per-modality key sums of one (batch, head) over non-padded keys, and (count) the key counts of
// the batch entry. Keys with id -1 count nowhere.
template <typename T, typename A>
void key_stats(const AttentionParams& p, int64_t b, int64_t h, bool count) {
  const int64_t Lk = p.seqlen_k, D = p.head_dim;
  const int M = p.num_modalities;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const int32_t* ids = p.key_modality + b * p.key_modality_batch_stride;
  const bool* pad = p.key_padding ? p.key_padding + b * p.key_padding_batch_stride : nullptr;
  A* ks = static_cast<A*>(p.key_sum) + (b * p.heads + h) * M * D;
  std::fill(ks, ks + M * D, A(0));
  A* kc = static_cast<A*>(p.key_count) + b * M;
  if (count) std::fill(kc, kc + M, A(0));
  for (int64_t j = 0; j < Lk; ++j) {
    const int32_t id = ids[j];
    if (id < 0 || (pad && !pad[j])) continue;
    A* dst = ks + id * D;
    const T* kr = k + j * p.k_row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<A>(kr[d]);
    if (count) kc[id] += A(1);
  }
}

// Most runs of equal modality ids in a key block for which the mass is taken run by run.
constexpr size_t kMaxRuns = 8;

template <typename T, typename A>
void fwd_kernel(const AttentionParams& p) {
  constexpr bool kDirect = std::is_same<T, A>::value;  // K/V usable by BLAS in place
  const int64_t B = p.batch, H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k;
  const int64_t D = p.head_dim, Dv = p.value_dim;
  const int M = p.num_modalities;
  const int64_t qt = query_tile(Lq), kb = key_block(Lk);
  const int64_t tiles = (Lq + qt - 1) / qt;
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  T* out_base = static_cast<T*>(p.out);
  A* lse_base = static_cast<A*>(p.lse);
  A* mass_base = static_cast<A*>(p.modality_mass);

  const int64_t grain = grain_for(2 * qt * Lk * (D + Dv));
  at::parallel_for(0, B * H * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> qbuf(qt * D), tmp(2 * qt * D), s(qt * kb), acc(qt * Dv);
    std::vector<A> kbuf(kDirect ? 0 : kb * D), vbuf(kDirect ? 0 : kb * Dv);
    std::vector<A> row_m(qt), row_l(qt), mass(qt * std::max(M, 1)), weight(kb * std::max(M, 1));
    std::vector<A> bias(kb), run_mass(std::max(M, 1));
    std::vector<int64_t> run_start, run_id;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, bh = task / tiles, h = bh % H, b = bh / H;
      const int64_t i0 = tile * qt, qn = std::min(qt, Lq - i0);
      const T* q = q_base + b * p.q_batch_stride + h * p.q_head_stride;
      const T* k = k_base + b * p.k_batch_stride + h * p.k_head_stride;
      const T* v = v_base + b * p.v_batch_stride + h * p.v_head_stride;
      const bool* pad = p.key_padding ? p.key_padding + b * p.key_padding_batch_stride : nullptr;
      const int32_t* ids = M > 0 ? p.key_modality + b * p.key_modality_batch_stride : nullptr;

      load_rotated_queries<T, A>(p, q, b, h, i0, qn, qbuf.data(), tmp.data());
      std::fill(acc.begin(), acc.begin() + qn * Dv, A(0));
      std::fill(row_m.begin(), row_m.begin() + qn, neg_inf);
      std::fill(row_l.begin(), row_l.begin() + qn, A(0));
      if (M > 0) std::fill(mass.begin(), mass.begin() + qn * M, A(0));

      // top-left causal: row i sees keys j <= i
      const int64_t k_end = p.is_causal ? std::min(Lk, i0 + qn) : Lk;
      for (int64_t j0 = 0; j0 < k_end; j0 += kb) {
        const int64_t kn = std::min(kb, k_end - j0);
        const A* kp;
        const A* vp;
        int64_t ldk, ldv;
        if constexpr (kDirect) {
          kp = reinterpret_cast<const A*>(k + j0 * p.k_row_stride);
          vp = reinterpret_cast<const A*>(v + j0 * p.v_row_stride);
          ldk = p.k_row_stride;
          ldv = p.v_row_stride;
        } else {
          for (int64_t j = 0; j < kn; ++j) {
            convert_row(kbuf.data() + j * D, k + (j0 + j) * p.k_row_stride, D);
            convert_row(vbuf.data() + j * Dv, v + (j0 + j) * p.v_row_stride, Dv);
          }
          kp = kbuf.data();
          vp = vbuf.data();
          ldk = D;
          ldv = Dv;
        }
        // scores of the block, already scaled
        gemm_rm<A>(false, true, qn, kn, D, scale, qbuf.data(), D, kp, ldk, A(0), s.data(), kb);

        bool padded = false;
        if (pad) {
          for (int64_t j = 0; j < kn; ++j) {
            bias[j] = pad[j0 + j] ? A(0) : neg_inf;
            padded |= !pad[j0 + j];
          }
        }
        // Modality mass. Modalities usually come as segments ([CLS | tokens of 0 | tokens of 1]),
        // so a block holds a few runs of equal ids: the exp pass then runs per run and each
        // run's sum is its modality's mass, for free. Blocks with many runs fall back to one
        // dot product per modality with a 0/1 weight row (padded keys have p = 0 anyway).
        bool by_runs = false;
        if (M > 0) {
          run_start.clear();
          run_id.clear();
          for (int64_t j = 0; j < kn && run_start.size() <= kMaxRuns; ++j) {
            if (j == 0 || ids[j0 + j] != ids[j0 + j - 1]) {
              run_start.push_back(j);
              run_id.push_back(ids[j0 + j]);
            }
          }
          by_runs = run_start.size() <= kMaxRuns;
          run_start.push_back(kn);
          if (!by_runs)
            for (int m = 0; m < M; ++m)
              for (int64_t j = 0; j < kn; ++j)
                weight[m * kb + j] = ids[j0 + j] == m ? A(1) : A(0);
        }

        for (int64_t r = 0; r < qn; ++r) {
          A* sr = s.data() + r * kb;
          if (padded) add_row(sr, bias.data(), kn);
          if (p.is_causal) {
            const int64_t first_hidden = i0 + r + 1 - j0;  // keys j0 + c, c >= this, are hidden
            for (int64_t c = std::max<int64_t>(first_hidden, 0); c < kn; ++c) sr[c] = neg_inf;
          }
          const A m_new = std::max(row_m[r], row_max(sr, kn));
          if (m_new == neg_inf) {  // nothing visible to this row so far
            std::fill(sr, sr + kn, A(0));
            continue;
          }
          const A alpha = exp_fast(row_m[r] - m_new);  // 0 when row_m was -inf
          A sum = 0;
          if (by_runs) {
            std::fill(run_mass.begin(), run_mass.end(), A(0));
            for (size_t u = 0; u + 1 < run_start.size(); ++u) {
              const A part =
                  exp_shift_sum(sr + run_start[u], run_start[u + 1] - run_start[u], m_new);
              sum += part;
              if (run_id[u] >= 0) run_mass[run_id[u]] += part;
            }
          } else {
            sum = exp_shift_sum(sr, kn, m_new);
          }
          row_l[r] = row_l[r] * alpha + sum;
          row_m[r] = m_new;
          if (alpha != A(1)) {
            scale_row(acc.data() + r * Dv, alpha, Dv);
            if (M > 0) scale_row(mass.data() + r * M, alpha, M);
          }
          if (by_runs)
            for (int m = 0; m < M; ++m) mass[r * M + m] += run_mass[m];
          else
            for (int m = 0; m < M; ++m) mass[r * M + m] += dot(sr, weight.data() + m * kb, kn);
        }
        gemm_rm<A>(false, false, qn, Dv, kn, A(1), s.data(), kb, vp, ldv, A(1), acc.data(), Dv);
      }

      // epilogue: normalise, write out, lse, mass
      const int64_t row0 = (b * H + h) * Lq + i0;
      T* out = out_base + b * p.out_batch_stride + h * p.out_head_stride + i0 * p.out_row_stride;
      for (int64_t r = 0; r < qn; ++r) {
        const A l = row_l[r];
        const A inv = l > A(0) ? A(1) / l : A(0);
        store_scaled_row(out + r * p.out_row_stride, acc.data() + r * Dv, inv, Dv);
        lse_base[row0 + r] = l > A(0) ? row_m[r] + std::log(l) : neg_inf;
        for (int m = 0; m < M; ++m) mass_base[(row0 + r) * M + m] = mass[r * M + m] * inv;
      }

      if (M > 0 && tile == 0) key_stats<T, A>(p, b, h, /*count=*/h == 0);
    }
  });
  // Lq == 0: no task ran, but the key sums and counts are still defined.
  if (M > 0 && tiles == 0)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) key_stats<T, A>(p, b, h, h == 0);
}

}  // namespace

void attention_fwd(const AttentionParams& params, ElementType type) {
  switch (type) {
    case ElementType::kFloat32:
      fwd_kernel<float, float>(params);
      break;
    case ElementType::kFloat64:
      fwd_kernel<double, double>(params);
      break;
    case ElementType::kBFloat16:
      fwd_kernel<c10::BFloat16, float>(params);
      break;
  }
}

}  // namespace cpu
}  // namespace rollingq
