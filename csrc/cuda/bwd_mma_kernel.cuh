// Backward, tensor-core path: fp16 / bf16, D == Dv in {64, 128} (tiling in bwd_mma_config.h).
//
// FlashAttention-2's recomputation from the forward's lse, without atomics:
//   prep  (warp per query row): delta = rowsum(dout * out); q_rot = R q rounded to T on rotated
//         rows (the q the forward multiplied), copied on the others, when there is a rotation.
//   dq    (128 query rows per block, 32 per warp, or 64 and 16 for D = 128; key tiles of 32):
//           S = Q K^T, dP = dO V^T                     (ldmatrix Q, dO, K, V; mma.sync)
//           P = 2^(S scale log2 e - lse log2 e), dS = P (dP - delta)
//           dQ += dS K                                  (dS packed from the accumulators; K
//                                                        through ldmatrix.trans)
//         then dq = scale dQ, and dq = dq_rot R on rotated rows, through shared memory.
//   dkdv  (64 keys per block, 16 per warp; query tiles of 64 or 32, double-buffered):
//           S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; dk = scale dK.
// Masks: padding and the sequence end (from key_padding directly), the top-left causal rule,
// rows past Lq or with no visible key (lse = -inf: their P is exactly 0).
//
// Written against simt.cuh only, so the CPU executor runs this very code.
#pragma once

#include "../rollingq_params.h"
#include "bwd_mma_config.h"
#include "mma_common.cuh"
#include "simt.cuh"
#include "smem_layout.h"
#include "tile_math.h"

namespace rollingq {
namespace bwd_mma {

using namespace tc;
using simt::f32x2;
using simt::u32x4;

RQ_DEV float warp_sum(float x) {
  RQ_UNROLL
  for (int o = 16; o > 0; o >>= 1) x += simt::shfl_xor(x, o);
  return x;
}

// lse of row i in the log2 domain, as the subtrahend of the exponent: +inf where P must be 0
// (a row past the end, or one that saw no key in the forward).
RQ_DEV float lse_log2(const AttentionBwdParams& p, int64_t row0, int i, int Lq) {
  if (i >= Lq) return tile::neg_inf_f() * -1.f;
  const float l = simt::ldg(static_cast<const float*>(p.lse) + row0 + i);
  return l == tile::neg_inf_f() ? -l : l * kLog2e;
}

RQ_DEV bool key_taken(const AttentionBwdParams& p, int64_t b, int j, int Lk) {
  return j < Lk && (p.key_padding == nullptr || simt::ldg(p.key_padding + b * Lk + j));
}

// ---- prep ----------------------------------------------------------------------------------------
template <typename T, int kD>
RQ_DEV void prep_block(const AttentionBwdParams& p, uint16_t* q_rot) {
  using E = simt::Elem<T>;
  const int tid = simt::thread_index(), warp = tid / 32, lane = tid % 32;
  const int64_t h = simt::block_y(), b = simt::block_z();
  const int Lq = static_cast<int>(p.seqlen_q);
  const int i = simt::block_x() * kBwdPrepRows + warp;
  if (i >= Lq) return;  // the whole warp; this kernel has no barrier
  const int64_t row = (b * p.heads + h) * Lq + i;
  const uint16_t* o = static_cast<const uint16_t*>(p.out) + b * p.out_batch_stride +
                      h * p.out_head_stride + i * p.out_row_stride;
  const uint16_t* g = static_cast<const uint16_t*>(p.dout) + b * p.dout_batch_stride +
                      h * p.dout_head_stride + i * p.dout_row_stride;
  float s = 0.f;
  for (int e = lane; e < kD; e += 32)
    s += E::to_float(simt::ldg(o + e)) * E::to_float(simt::ldg(g + e));
  s = warp_sum(s);
  if (lane == 0) simt::stg(static_cast<float*>(p.delta) + row, s);
  if (q_rot == nullptr) return;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride +
                      h * p.q_head_stride + i * p.q_row_stride;
  const bool rotated = row_rotated(p, b, i);
  const float* R = static_cast<const float*>(p.rotation) + h * kD * kD;
  for (int a = lane; a < kD; a += 32) {
    uint16_t v;
    if (rotated) {
      // the forward's rotation, in the same order: the same rounded value
      float acc = 0.f;
      for (int c = 0; c < kD; ++c) acc += simt::ldg(R + a * kD + c) * E::to_float(simt::ldg(q + c));
      v = E::from_float(acc);
    } else {
      v = simt::ldg(q + a);
    }
    simt::stg(q_rot + row * kD + a, v);
  }
}

// The rows the dq and dkdv kernels multiply: q_rot (contiguous, row stride D) with a rotation,
// else q itself.
template <int kD>
RQ_DEV const uint16_t* q_slice(const AttentionBwdParams& p, const uint16_t* q_rot, int64_t b,
                               int64_t h, int64_t* row_stride) {
  if (q_rot != nullptr) {
    *row_stride = kD;
    return q_rot + (b * p.heads + h) * p.seqlen_q * kD;
  }
  *row_stride = p.q_row_stride;
  return static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
}

// ---- dq --------------------------------------------------------------------------------------------
template <typename T, int kD, bool kCausal>
RQ_DEV void dq_block(const AttentionBwdParams& p, const uint16_t* q_rot, unsigned char* smem) {
  using Cfg = MmaBwdConfig<kD>;
  using E = simt::Elem<T>;
  constexpr int BM = Cfg::kDqBlockM, BN = Cfg::kDqBlockN, kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kDqMTiles, kNT = BN / 8, kKS = kD / 16, kOT = kD / 8, kKK = BN / 16;
  constexpr int kPitch = Cfg::kDqStagePitch;

  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + Cfg::kDqQ);
  uint16_t* dOs = reinterpret_cast<uint16_t*>(smem + Cfg::kDqDO);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + Cfg::kDqK);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + Cfg::kDqV);

  const int tid = simt::thread_index();
  const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int n_mblocks = simt::grid_x();
  const int m_block = kCausal ? n_mblocks - 1 - simt::block_x() : simt::block_x();
  const int64_t h = simt::block_y(), b = simt::block_z();
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int m0 = m_block * BM, row_w = 16 * kMT * warp;
  const int64_t row0 = (b * p.heads + h) * Lq;  // of lse / delta
  const float sl2 = static_cast<float>(p.scale) * kLog2e;

  int64_t q_stride;
  const uint16_t* qsl = q_slice<kD>(p, q_rot, b, h, &q_stride);
  const RowCopier<kD, BN, kThreads> kcopy(
      static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
      p.k_row_stride, tid);
  const RowCopier<kD, BN, kThreads> vcopy(
      static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride,
      p.v_row_stride, tid);
  const int q_rows = Lq - m0 < BM ? (Lq - m0 > 0 ? Lq - m0 : 0) : BM;
  const int n_tiles = static_cast<int>(tile::num_key_tiles(m0, BM, Lq, Lk, BN, kCausal));

  {
    const RowCopier<kD, BM, kThreads> qcopy(qsl, q_stride, tid);
    qcopy.copy(Qs, m0, q_rows, q_stride, tid);
    const RowCopier<kD, BM, kThreads> ocopy(
        static_cast<const uint16_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride,
        p.dout_row_stride, tid);
    ocopy.copy(dOs, m0, q_rows, p.dout_row_stride, tid);
  }
  if (n_tiles > 0) kcopy.copy(Ks, 0, Lk, p.k_row_stride, tid);
  simt::cp_async_commit();

  // this lane's rows: lse (log2 domain) and delta
  float lse2[kMT][2], dl[kMT][2];
  RQ_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RQ_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int i = m0 + row_w + 16 * mt + g + 8 * hr;
      lse2[mt][hr] = lse_log2(p, row0, i, Lq);
      dl[mt][hr] = i < Lq ? simt::ldg(static_cast<const float*>(p.delta) + row0 + i) : 0.f;
    }
  }
  float acc[kMT][kOT][4];
  RQ_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RQ_UNROLL
    for (int ot = 0; ot < kOT; ++ot) acc[mt][ot][0] = acc[mt][ot][1] = acc[mt][ot][2] = acc[mt][ot][3] = 0.f;
  }
  simt::cp_async_wait<0>();
  simt::sync_threads();

  for (int nb = 0; nb < n_tiles; ++nb) {
    const int n0 = nb * BN;
    const uint16_t* kb_tile = Ks + (nb & 1) * BN * kD;
    if (nb > 0) {
      simt::cp_async_wait<0>();  // K(nb)
      simt::sync_threads();      // ... for all; every warp is done with V(nb - 1) and K(nb - 1)
    }
    vcopy.copy(Vs, n0, Lk - n0, p.v_row_stride, tid);
    simt::cp_async_commit();

    // S = Q K^T
    float s[kMT][kNT][4], dp[kMT][kNT][4];
    RQ_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      RQ_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        RQ_UNROLL
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
      }
    }
    RQ_UNROLL
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t qa[kMT][4];
      RQ_UNROLL
      for (int mt = 0; mt < kMT; ++mt)
        simt::ldmatrix_x4(qa[mt], ldsm_addr<kD>(Qs, row_w + 16 * mt + layout::ldsm_a_row(lane),
                                                16 * ks + layout::ldsm_a_col(lane), lane & 7));
      RQ_UNROLL
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kf[4];
        simt::ldmatrix_x4(kf, ldsm_addr<kD>(kb_tile, 16 * np + layout::ldsm_bnk_row(lane),
                                            16 * ks + layout::ldsm_bnk_col(lane), lane & 7));
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          simt::mma_16816<T>(s[mt][2 * np], qa[mt], kf[0], kf[1]);
          simt::mma_16816<T>(s[mt][2 * np + 1], qa[mt], kf[2], kf[3]);
        }
      }
    }

    simt::cp_async_wait<0>();  // V(nb)
    simt::sync_threads();
    if (nb + 1 < n_tiles)  // into the other K buffer (its tile, nb - 1, is done with)
      kcopy.copy(Ks + ((nb + 1) & 1) * BN * kD, n0 + BN, Lk - n0 - BN, p.k_row_stride, tid);
    simt::cp_async_commit();

    // dP = dO V^T (B[k][n] = V[n][k], like K)
    RQ_UNROLL
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t oa[kMT][4];
      RQ_UNROLL
      for (int mt = 0; mt < kMT; ++mt)
        simt::ldmatrix_x4(oa[mt], ldsm_addr<kD>(dOs, row_w + 16 * mt + layout::ldsm_a_row(lane),
                                                16 * ks + layout::ldsm_a_col(lane), lane & 7));
      RQ_UNROLL
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t vf[4];
        simt::ldmatrix_x4(vf, ldsm_addr<kD>(Vs, 16 * np + layout::ldsm_bnk_row(lane),
                                            16 * ks + layout::ldsm_bnk_col(lane), lane & 7));
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          simt::mma_16816<T>(dp[mt][2 * np], oa[mt], vf[0], vf[1]);
          simt::mma_16816<T>(dp[mt][2 * np + 1], oa[mt], vf[2], vf[3]);
        }
      }
    }

    // P and dS (in s); masked scores give P = 0 exactly
    const bool padded = p.key_padding != nullptr;
    const bool need_mask = padded || n0 + BN > Lk || (kCausal && n0 + BN - 1 > m0 + row_w);
    RQ_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      RQ_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + 8 * nt + layout::c_col(lane, e);
        const bool key_ok = !need_mask || key_taken(p, b, j, Lk);
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          const int hr = e >> 1;
          const int i = m0 + row_w + 16 * mt + layout::c_row(lane, e);
          const bool vis = key_ok && (!kCausal || j <= i);
          const float pr = vis ? simt::exp2_approx(fmaf(s[mt][nt][e], sl2, -lse2[mt][hr])) : 0.f;
          s[mt][nt][e] = pr * (dp[mt][nt][e] - dl[mt][hr]);
        }
      }
    }

    // dQ += dS K: A = dS (the C layout of two n8 tiles is the A layout of one k16 step),
    // B[k][n] = K[k][n] through ldmatrix.trans
    RQ_UNROLL
    for (int kk = 0; kk < kKK; ++kk) {
      uint32_t da[kMT][4];
      RQ_UNROLL
      for (int mt = 0; mt < kMT; ++mt) {
        da[mt][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        da[mt][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        da[mt][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        da[mt][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      RQ_UNROLL
      for (int dp2 = 0; dp2 < kOT / 2; ++dp2) {
        uint32_t kf[4];
        simt::ldmatrix_x4_trans(kf, ldsm_addr<kD>(kb_tile, 16 * kk + layout::ldsm_bkn_row(lane),
                                                  16 * dp2 + layout::ldsm_bkn_col(lane), lane & 7));
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          simt::mma_16816<T>(acc[mt][2 * dp2], da[mt], kf[0], kf[1]);
          simt::mma_16816<T>(acc[mt][2 * dp2 + 1], da[mt], kf[2], kf[3]);
        }
      }
    }
  }

  // ---- epilogue: dq = scale dQ; dq_rot R on rotated rows; staged 16 rows per warp at a time
  float* stage = reinterpret_cast<float*>(smem + Cfg::kDqQ) + warp * 16 * kPitch;
  const float scale = static_cast<float>(p.scale);
  const float* R = static_cast<const float*>(p.rotation) + h * kD * kD;
  uint16_t* dq = static_cast<uint16_t*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
  RQ_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    simt::sync_threads();  // the tiles (then the previous stage) are no longer read
    RQ_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      RQ_UNROLL
      for (int ot = 0; ot < kOT; ++ot)
        simt::sts(reinterpret_cast<f32x2*>(stage + (g + 8 * hr) * kPitch + 8 * ot + 2 * t),
                  f32x2{acc[mt][ot][2 * hr] * scale, acc[mt][ot][2 * hr + 1] * scale});
    }
    simt::sync_threads();
    for (int idx = lane; idx < 16 * kD; idx += 32) {
      const int r = idx / kD, c = idx % kD;
      const int i = m0 + row_w + 16 * mt + r;
      if (i >= Lq) continue;
      float v;
      if (p.rotation != nullptr && row_rotated(p, b, i)) {  // dq = dq_rot R
        v = 0.f;
        for (int a = 0; a < kD; ++a) v += simt::lds(stage + r * kPitch + a) * simt::ldg(R + a * kD + c);
      } else {
        v = simt::lds(stage + r * kPitch + c);
      }
      simt::stg(dq + (int64_t)i * p.dq_row_stride + c, E::from_float(v));
    }
  }
}

// ---- dk, dv --------------------------------------------------------------------------------------
template <typename T, int kD, bool kCausal>
RQ_DEV void dkdv_block(const AttentionBwdParams& p, const uint16_t* q_rot, unsigned char* smem) {
  using Cfg = MmaBwdConfig<kD>;
  using E = simt::Elem<T>;
  constexpr int BN = Cfg::kKvBlockN, BM = Cfg::kKvBlockM, kThreads = Cfg::kThreads;
  constexpr int kNT = BM / 8, kKS = kD / 16, kOT = kD / 8, kKK = BM / 16;

  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + Cfg::kKvK);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + Cfg::kKvV);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + Cfg::kKvQ);    // [2][BM][kD]
  uint16_t* dOs = reinterpret_cast<uint16_t*>(smem + Cfg::kKvDO);  // [2][BM][kD]
  float* lse_s = reinterpret_cast<float*>(smem + Cfg::kKvLse);     // [2][BM], log2 domain
  float* dl_s = reinterpret_cast<float*>(smem + Cfg::kKvDelta);    // [2][BM]

  const int tid = simt::thread_index();
  const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t h = simt::block_y(), b = simt::block_z();
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int n0 = simt::block_x() * BN, key_w = 16 * warp;
  const int64_t row0 = (b * p.heads + h) * Lq;
  const float sl2 = static_cast<float>(p.scale) * kLog2e;

  int64_t q_stride;
  const uint16_t* qsl = q_slice<kD>(p, q_rot, b, h, &q_stride);
  const RowCopier<kD, BM, kThreads> qcopy(qsl, q_stride, tid);
  const RowCopier<kD, BM, kThreads> ocopy(
      static_cast<const uint16_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride,
      p.dout_row_stride, tid);
  // rows a causal mask leaves with no key of this block are skipped
  const int m_first = kCausal ? n0 / BM : 0;
  const int m_tiles = static_cast<int>(tile::ceil_div(Lq, BM));

  auto load_stage = [&](int mb, int st) {
    qcopy.copy(Qs + st * BM * kD, mb * BM, Lq - mb * BM, q_stride, tid);
    ocopy.copy(dOs + st * BM * kD, mb * BM, Lq - mb * BM, p.dout_row_stride, tid);
    for (int r = tid; r < BM; r += kThreads) {
      const int i = mb * BM + r;
      simt::sts(lse_s + st * BM + r, lse_log2(p, row0, i, Lq));
      simt::sts(dl_s + st * BM + r,
                i < Lq ? simt::ldg(static_cast<const float*>(p.delta) + row0 + i) : 0.f);
    }
  };

  {
    const RowCopier<kD, BN, kThreads> kcopy(
        static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
        p.k_row_stride, tid);
    const RowCopier<kD, BN, kThreads> vcopy(
        static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride,
        p.v_row_stride, tid);
    kcopy.copy(Ks, n0, Lk - n0, p.k_row_stride, tid);
    vcopy.copy(Vs, n0, Lk - n0, p.v_row_stride, tid);
  }
  if (m_first < m_tiles) load_stage(m_first, 0);
  simt::cp_async_commit();

  // this lane's keys (rows of S^T): key_w + g and key_w + g + 8
  bool key_ok[2];
  RQ_UNROLL
  for (int hr = 0; hr < 2; ++hr) key_ok[hr] = key_taken(p, b, n0 + key_w + g + 8 * hr, Lk);
  float acc_dk[kOT][4], acc_dv[kOT][4];
  RQ_UNROLL
  for (int ot = 0; ot < kOT; ++ot) {
    RQ_UNROLL
    for (int e = 0; e < 4; ++e) acc_dk[ot][e] = acc_dv[ot][e] = 0.f;
  }

  for (int mb = m_first; mb < m_tiles; ++mb) {
    const int st = (mb - m_first) & 1;
    const uint16_t* Qt = Qs + st * BM * kD;
    const uint16_t* dOt = dOs + st * BM * kD;
    simt::cp_async_wait<0>();  // this stage (and K, V at the first tile)
    simt::sync_threads();      // ... for all; every warp is done with the other stage
    if (mb + 1 < m_tiles) load_stage(mb + 1, st ^ 1);
    simt::cp_async_commit();

    // S^T = K Q^T and dP^T = V dO^T: rows = this warp's 16 keys, columns = the tile's query rows
    float s[kNT][4], dp[kNT][4];
    RQ_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      RQ_UNROLL
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    }
    RQ_UNROLL
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t ka[4], va[4];
      simt::ldmatrix_x4(ka, ldsm_addr<kD>(Ks, key_w + layout::ldsm_a_row(lane),
                                          16 * ks + layout::ldsm_a_col(lane), lane & 7));
      simt::ldmatrix_x4(va, ldsm_addr<kD>(Vs, key_w + layout::ldsm_a_row(lane),
                                          16 * ks + layout::ldsm_a_col(lane), lane & 7));
      RQ_UNROLL
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t qf[4], of[4];
        simt::ldmatrix_x4(qf, ldsm_addr<kD>(Qt, 16 * np + layout::ldsm_bnk_row(lane),
                                            16 * ks + layout::ldsm_bnk_col(lane), lane & 7));
        simt::mma_16816<T>(s[2 * np], ka, qf[0], qf[1]);
        simt::mma_16816<T>(s[2 * np + 1], ka, qf[2], qf[3]);
        simt::ldmatrix_x4(of, ldsm_addr<kD>(dOt, 16 * np + layout::ldsm_bnk_row(lane),
                                            16 * ks + layout::ldsm_bnk_col(lane), lane & 7));
        simt::mma_16816<T>(dp[2 * np], va, of[0], of[1]);
        simt::mma_16816<T>(dp[2 * np + 1], va, of[2], of[3]);
      }
    }

    // P^T and dS^T (in s and dp): column c is query row mb * BM + c
    RQ_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      const f32x2 l2 = simt::lds(reinterpret_cast<const f32x2*>(lse_s + st * BM + 8 * nt + 2 * t));
      const f32x2 d2 = simt::lds(reinterpret_cast<const f32x2*>(dl_s + st * BM + 8 * nt + 2 * t));
      RQ_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int hr = e >> 1;
        const int j = n0 + key_w + layout::c_row(lane, e);
        const int i = mb * BM + 8 * nt + layout::c_col(lane, e);
        const bool vis = key_ok[hr] && (!kCausal || j <= i);
        const float lse_c = (e & 1) ? l2.y : l2.x, dl_c = (e & 1) ? d2.y : d2.x;
        const float pr = vis ? simt::exp2_approx(fmaf(s[nt][e], sl2, -lse_c)) : 0.f;
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - dl_c);
      }
    }

    // dV += P^T dO and dK += dS^T Q: B[k][n] = dO[k][n], Q[k][n] through ldmatrix.trans
    RQ_UNROLL
    for (int kk = 0; kk < kKK; ++kk) {
      uint32_t pa[4], da[4];
      pa[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = E::pack(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = E::pack(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = E::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = E::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      RQ_UNROLL
      for (int dp2 = 0; dp2 < kOT / 2; ++dp2) {
        uint32_t of[4], qf[4];
        simt::ldmatrix_x4_trans(of, ldsm_addr<kD>(dOt, 16 * kk + layout::ldsm_bkn_row(lane),
                                                  16 * dp2 + layout::ldsm_bkn_col(lane), lane & 7));
        simt::mma_16816<T>(acc_dv[2 * dp2], pa, of[0], of[1]);
        simt::mma_16816<T>(acc_dv[2 * dp2 + 1], pa, of[2], of[3]);
        simt::ldmatrix_x4_trans(qf, ldsm_addr<kD>(Qt, 16 * kk + layout::ldsm_bkn_row(lane),
                                                  16 * dp2 + layout::ldsm_bkn_col(lane), lane & 7));
        simt::mma_16816<T>(acc_dk[2 * dp2], da, qf[0], qf[1]);
        simt::mma_16816<T>(acc_dk[2 * dp2 + 1], da, qf[2], qf[3]);
      }
    }
  }

  // ---- epilogue: dk = scale dK, dv = dV, staged in the K and V tiles, coalesced stores
  simt::cp_async_wait<0>();  // K and V, when no query tile was visited
  simt::sync_threads();
  const float scale = static_cast<float>(p.scale);
  RQ_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int r = key_w + g + 8 * hr;
    RQ_UNROLL
    for (int ot = 0; ot < kOT; ++ot) {
      simt::sts(reinterpret_cast<uint32_t*>(Ks + layout::swz<kD>(r, 8 * ot + 2 * t)),
                E::pack(acc_dk[ot][2 * hr] * scale, acc_dk[ot][2 * hr + 1] * scale));
      simt::sts(reinterpret_cast<uint32_t*>(Vs + layout::swz<kD>(r, 8 * ot + 2 * t)),
                E::pack(acc_dv[ot][2 * hr], acc_dv[ot][2 * hr + 1]));
    }
  }
  simt::sync_threads();
  uint16_t* dk = static_cast<uint16_t*>(p.dk) + b * p.dk_batch_stride + h * p.dk_head_stride;
  uint16_t* dv = static_cast<uint16_t*>(p.dv) + b * p.dv_batch_stride + h * p.dv_head_stride;
  RQ_UNROLL
  for (int it = 0; it < BN * (kD / 8) / kThreads; ++it) {
    const int r = layout::copy_row<kD, kThreads>(tid, it);
    const int c = layout::copy_chunk<kD, kThreads>(tid, it);
    if (n0 + r < Lk) {
      simt::stg(reinterpret_cast<u32x4*>(dk + (int64_t)(n0 + r) * p.dk_row_stride + 8 * c),
                simt::lds(reinterpret_cast<const u32x4*>(Ks + layout::swz<kD>(r, 8 * c))));
      simt::stg(reinterpret_cast<u32x4*>(dv + (int64_t)(n0 + r) * p.dv_row_stride + 8 * c),
                simt::lds(reinterpret_cast<const u32x4*>(Vs + layout::swz<kD>(r, 8 * c))));
    }
  }
}

}  // namespace bwd_mma

#if defined(__CUDACC__)
#if !defined(RQ_CUDA_ARCH)
#if defined(__CUDA_ARCH__)
#define RQ_CUDA_ARCH __CUDA_ARCH__
#else
#define RQ_CUDA_ARCH 0
#endif
#endif

template <typename T, int kD>
__global__ void __launch_bounds__(128) bwd_mma_prep_kernel(const AttentionBwdParams p,
                                                           uint16_t* q_rot) {
  bwd_mma::prep_block<T, kD>(p, q_rot);
}

template <typename T, int kD, bool kCausal>
__global__ void __maxnreg__((MmaBwdConfig<kD>::max_registers(RQ_CUDA_ARCH)))
    bwd_mma_dq_kernel(const AttentionBwdParams p, const uint16_t* q_rot) {
  extern __shared__ __align__(128) unsigned char smem_dq[];
  bwd_mma::dq_block<T, kD, kCausal>(p, q_rot, smem_dq);
}

template <typename T, int kD, bool kCausal>
__global__ void __maxnreg__((MmaBwdConfig<kD>::max_registers(RQ_CUDA_ARCH)))
    bwd_mma_dkdv_kernel(const AttentionBwdParams p, const uint16_t* q_rot) {
  extern __shared__ __align__(128) unsigned char smem_kv[];
  bwd_mma::dkdv_block<T, kD, kCausal>(p, q_rot, smem_kv);
}

// p.q_rot: (B, H, Lq, D) contiguous in T, written by the prep kernel, when there is a rotation.
template <typename T, int kD>
const char* launch_bwd_mma(const AttentionBwdParams& p, cudaStream_t stream) {
  using Cfg = MmaBwdConfig<kD>;
  uint16_t* q_rot = p.rotation != nullptr ? static_cast<uint16_t*>(p.q_rot) : nullptr;
  const unsigned H = (unsigned)p.heads, B = (unsigned)p.batch;
  if (p.seqlen_q > 0) {
    dim3 grid((unsigned)tile::ceil_div(p.seqlen_q, kBwdPrepRows), H, B);
    bwd_mma_prep_kernel<T, kD><<<grid, 128, 0, stream>>>(p, q_rot);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  auto go = [&](auto kernel, size_t smem, int64_t blocks) -> const char* {
    if (blocks <= 0) return nullptr;
    if (smem > 48 * 1024) {
      cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    kernel<<<dim3((unsigned)blocks, H, B), Cfg::kThreads, smem, stream>>>(p, q_rot);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  };
  const int64_t dq_blocks = tile::ceil_div(p.seqlen_q, Cfg::kDqBlockM);
  const int64_t kv_blocks = tile::ceil_div(p.seqlen_k, Cfg::kKvBlockN);
  const char* err;
  if (p.is_causal) {
    err = go(bwd_mma_dq_kernel<T, kD, true>, Cfg::kDqSmem, dq_blocks);
    if (!err) err = go(bwd_mma_dkdv_kernel<T, kD, true>, Cfg::kKvSmem, kv_blocks);
  } else {
    err = go(bwd_mma_dq_kernel<T, kD, false>, Cfg::kDqSmem, dq_blocks);
    if (!err) err = go(bwd_mma_dkdv_kernel<T, kD, false>, Cfg::kKvSmem, kv_blocks);
  }
  return err;
}
#endif

}  // namespace rollingq
