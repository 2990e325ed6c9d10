// Fused RollingQ attention backward on the CPU (FlashAttention-2 style).
//
// One task = (batch, head). Per query tile: delta = rowsum(dO * O); per key block the
// probabilities are recomputed from the saved lse (no softmax state is stored), then
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q
// with Q the rotated queries. dQ of a rotated row goes back through the rotation:
// q' = q R^T  =>  dq = dq' R. dK and dV accumulate over all query tiles in float buffers of the
// task, so no two threads ever write the same gradient element.
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


template <typename T, typename A>
void bwd_kernel(const AttentionBwdParams& p) {
  constexpr bool kDirect = std::is_same<T, A>::value;
  const int64_t B = p.batch, H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k;
  const int64_t D = p.head_dim, Dv = p.value_dim;
  const int64_t qt = query_tile(Lq), kb = key_block(Lk);
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  const int64_t grain = grain_for(5 * Lq * Lk * (D + Dv));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> qbuf(qt * D), tmp(2 * qt * D), dobuf(qt * Dv), s(qt * kb), dp(qt * kb);
    std::vector<A> dq(qt * D), delta(qt), lse(qt), bias(kb);
    std::vector<A> dk(Lk * D), dv(Lk * Dv);
    std::vector<A> kall(kDirect ? 0 : Lk * D), vall(kDirect ? 0 : Lk * Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
      const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
      const T* o = static_cast<const T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
      const T* dout =
          static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
      const A* lse_bh = static_cast<const A*>(p.lse) + bh * Lq;
      const bool* pad = p.key_padding ? p.key_padding + b * p.key_padding_batch_stride : nullptr;

      const A* kp;
      const A* vp;
      int64_t ldk, ldv;
      if constexpr (kDirect) {
        kp = reinterpret_cast<const A*>(k);
        vp = reinterpret_cast<const A*>(v);
        ldk = p.k_row_stride;
        ldv = p.v_row_stride;
      } else {
        for (int64_t j = 0; j < Lk; ++j) {
          convert_row(kall.data() + j * D, k + j * p.k_row_stride, D);
          convert_row(vall.data() + j * Dv, v + j * p.v_row_stride, Dv);
        }
        kp = kall.data();
        vp = vall.data();
        ldk = D;
        ldv = Dv;
      }
      std::fill(dk.begin(), dk.end(), A(0));
      std::fill(dv.begin(), dv.end(), A(0));

      for (int64_t i0 = 0; i0 < Lq; i0 += qt) {
        const int64_t qn = std::min(qt, Lq - i0);
        load_rotated_queries<T, A>(p, q, b, h, i0, qn, qbuf.data(), tmp.data());
        for (int64_t r = 0; r < qn; ++r) {
          const T* dor = dout + (i0 + r) * p.dout_row_stride;
          const T* orow = o + (i0 + r) * p.out_row_stride;
          A* dst = dobuf.data() + r * Dv;
          A sum = 0;
          for (int64_t d = 0; d < Dv; ++d) {
            dst[d] = static_cast<A>(dor[d]);
            sum += dst[d] * static_cast<A>(orow[d]);
          }
          delta[r] = sum;
          lse[r] = lse_bh[i0 + r];
        }
        std::fill(dq.begin(), dq.begin() + qn * D, A(0));

        const int64_t k_end = p.is_causal ? std::min(Lk, i0 + qn) : Lk;
        for (int64_t j0 = 0; j0 < k_end; j0 += kb) {
          const int64_t kn = std::min(kb, k_end - j0);
          const A* kblk = kp + j0 * ldk;
          const A* vblk = vp + j0 * ldv;
          gemm_rm<A>(false, true, qn, kn, D, scale, qbuf.data(), D, kblk, ldk, A(0), s.data(), kb);
          bool padded = false;
          if (pad) {
            for (int64_t j = 0; j < kn; ++j) {
              bias[j] = pad[j0 + j] ? A(0) : neg_inf;
              padded |= !pad[j0 + j];
            }
          }
          for (int64_t r = 0; r < qn; ++r) {
            A* sr = s.data() + r * kb;
            if (lse[r] == neg_inf) {  // the row sees no key: no probability, no gradient
              std::fill(sr, sr + kn, A(0));
              continue;
            }
            if (padded) add_row(sr, bias.data(), kn);
            if (p.is_causal) {
              const int64_t first_hidden = i0 + r + 1 - j0;
              for (int64_t c = std::max<int64_t>(first_hidden, 0); c < kn; ++c) sr[c] = neg_inf;
            }
            exp_shift_sum(sr, kn, lse[r]);
          }
          // dV += P^T dO
          gemm_rm<A>(true, false, kn, Dv, qn, A(1), s.data(), kb, dobuf.data(), Dv, A(1),
                     dv.data() + j0 * Dv, Dv);
          // dP = dO V^T, then dS = P * (dP - delta) in place
          gemm_rm<A>(false, true, qn, kn, Dv, A(1), dobuf.data(), Dv, vblk, ldv, A(0), dp.data(),
                     kb);
          for (int64_t r = 0; r < qn; ++r) {
            A* dpr = dp.data() + r * kb;
            const A* pr = s.data() + r * kb;
            const A dl = delta[r];
            for (int64_t j = 0; j < kn; ++j) dpr[j] = pr[j] * (dpr[j] - dl);
          }
          // dQ_rot += scale dS K ; dK += scale dS^T Q_rot
          gemm_rm<A>(false, false, qn, D, kn, scale, dp.data(), kb, kblk, ldk, A(1), dq.data(), D);
          gemm_rm<A>(true, false, kn, D, qn, scale, dp.data(), kb, qbuf.data(), D, A(1),
                     dk.data() + j0 * D, D);
        }

        if (p.rotation != nullptr) {  // q' = q R^T  =>  dq = dq' R on rotated rows
          const bool* rows = p.rotated_rows ? p.rotated_rows + b * p.rotated_rows_batch_stride + i0 : nullptr;
          const A* R = static_cast<const A*>(p.rotation) + h * p.rotation_head_stride;
          rotate_rows(dq.data(), rows, qn, D, R, /*transpose_r=*/false, tmp.data());
        }
        T* dq_out = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
        for (int64_t r = 0; r < qn; ++r)
          convert_row(dq_out + (i0 + r) * p.dq_row_stride, dq.data() + r * D, D);
      }

      T* dk_out = static_cast<T*>(p.dk) + b * p.dk_batch_stride + h * p.dk_head_stride;
      T* dv_out = static_cast<T*>(p.dv) + b * p.dv_batch_stride + h * p.dv_head_stride;
      for (int64_t j = 0; j < Lk; ++j) {
        convert_row(dk_out + j * p.dk_row_stride, dk.data() + j * D, D);
        convert_row(dv_out + j * p.dv_row_stride, dv.data() + j * Dv, Dv);
      }
    }
  });
}

}  // namespace

void attention_bwd(const AttentionBwdParams& params, ElementType type) {
  switch (type) {
    case ElementType::kFloat32:
      bwd_kernel<float, float>(params);
      break;
    case ElementType::kFloat64:
      bwd_kernel<double, double>(params);
      break;
    case ElementType::kBFloat16:
      bwd_kernel<c10::BFloat16, float>(params);
      break;
  }
}

}  // namespace cpu
}  // namespace rollingq
