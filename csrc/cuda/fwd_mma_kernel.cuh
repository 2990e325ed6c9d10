// Forward, tensor-core path: fp16 / bf16, D == Dv in {64, 128}, at most 8 modalities.
//
// FlashAttention-2 structure (tiling and shared-memory layout in fwd_mma_config.h): a block of 4
// warps owns 128 query rows, 32 per warp, and walks the key tiles of its (batch, head) in order.
// Per key tile:
//   wait K(n), barrier; cp.async V(n)                   (V streams in during Q K^T)
//   S = Q K^T                                           (ldmatrix K; Q from registers or ldmatrix)
//   wait V(n), barrier; cp.async K(n + 1)               (K streams in during softmax and P V)
//   mask (only tiles with padding, the sequence end or the causal diagonal), online softmax in
//   the log2 domain (one FFMA + EX2 per score), P packed from the accumulators into A fragments
//   O += P V                                            (ldmatrix.trans V)
//   mass += P onehot(codes)                             (with statistics: one more n8 MMA column
//                                                        block; rescaled with O, divided by l)
// Statistics: the per-modality mass is that extra MMA against one-hot columns built in registers
// from the key codes; the key sums are a one-hot^T K product on tensor cores that one block per
// (batch, head) computes after its own rows, streaming the head's K tiles through its freed
// shared memory; the key counts come from the pass that writes the key codes.
//
// The kernel is written against simt.cuh only, so the CPU emulation runs this very code.
#pragma once

#include "../rollingq_params.h"
#include "fwd_mma_config.h"
#include "mma_common.cuh"
#include "simt.cuh"
#include "smem_layout.h"
#include "tile_math.h"

namespace rollingq {
namespace fwd_mma {

using namespace tc;  // RowCopier, ldsm_addr, quad reductions (mma_common.cuh)
using simt::f32x2;
using simt::u32x4;

// Rotated rows of the Q tile: q <- R_h q in float32, rounded back to T, through `scratch` (a
// tile of kScratchRows rows), kScratchRows rows at a time.
template <typename T, int kD, int kRows, int kScratchRows, int kThreads>
RQ_DEV void rotate_rows(const AttentionParams& p, uint16_t* Qs, uint16_t* scratch, int64_t b,
                        int64_t h, int64_t m0, int64_t q_rows, int tid) {
  using E = simt::Elem<T>;
  const float* R = static_cast<const float*>(p.rotation) + h * kD * kD;
  for (int part = 0; part < kRows / kScratchRows; ++part) {
    for (int idx = tid; idx < kScratchRows * kD; idx += kThreads) {
      const int rl = idx / kD, a = idx % kD, r = part * kScratchRows + rl;
      if (r < q_rows && row_rotated(p, b, m0 + r)) {
        float acc = 0.f;
        for (int c = 0; c < kD; ++c)
          acc += simt::ldg(R + a * kD + c) * E::to_float(simt::lds(Qs + layout::swz<kD>(r, c)));
        simt::sts(scratch + layout::swz<kD>(rl, a), E::from_float(acc));
      }
    }
    simt::sync_threads();
    for (int idx = tid; idx < kScratchRows * kD; idx += kThreads) {
      const int rl = idx / kD, a = idx % kD, r = part * kScratchRows + rl;
      if (r < q_rows && row_rotated(p, b, m0 + r))
        simt::sts(Qs + layout::swz<kD>(r, a), simt::lds(scratch + layout::swz<kD>(rl, a)));
    }
    simt::sync_threads();
  }
}

// Key sums of one K tile (rows of kD elements in a swizzled tile of kRows keys): this warp's
// share of the head dim (kD / 4 columns) of one-hot^T K. A = one-hot^T (rows: modality, k: key)
// built from the tile's key codes (global memory, two 16-bit loads per k16 step); B = K[key][d]
// via ldmatrix.trans; rows >= 8 of A are zero. Lane (g, t) of the result holds modality g,
// columns 2t, 2t + 1 of each n8 tile, which it adds to the block's float32 sums in shared memory
// (each (m, d) has exactly one owner lane).
template <typename T, int kD, int kRows>
RQ_DEV void key_sum_tile(const uint16_t* Ks, const int8_t* codes, float* ksum_s, int M, int warp,
                         int lane) {
  using Cfg = MmaFwdConfig<kD>;
  using E = simt::Elem<T>;
  constexpr int kDT = kD / 8 / Cfg::kWarps;  // n8 column tiles per warp
  const int g = lane >> 2, t = lane & 3;
  float acc[kDT][4];
  RQ_UNROLL
  for (int j = 0; j < kDT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  RQ_UNROLL
  for (int kk = 0; kk < kRows / 16; ++kk) {
    const uint32_t c0 = simt::ldg(reinterpret_cast<const uint16_t*>(codes + 16 * kk + 2 * t));
    const uint32_t c1 = simt::ldg(reinterpret_cast<const uint16_t*>(codes + 16 * kk + 8 + 2 * t));
    const uint32_t a[4] = {layout::one_hot_pair(c0, g, E::kOne), 0u,
                           layout::one_hot_pair(c1, g, E::kOne), 0u};
    RQ_UNROLL
    for (int dp = 0; dp < kDT / 2; ++dp) {
      uint32_t kb[4];
      simt::ldmatrix_x4_trans(
          kb, ldsm_addr<kD>(Ks, 16 * kk + layout::ldsm_bkn_row(lane),
                            8 * kDT * warp + 16 * dp + layout::ldsm_bkn_col(lane), lane & 7));
      simt::mma_16816<T>(acc[2 * dp], a, kb[0], kb[1]);
      simt::mma_16816<T>(acc[2 * dp + 1], a, kb[2], kb[3]);
    }
  }
  if (g < M) {
    RQ_UNROLL
    for (int j = 0; j < kDT; ++j) {
      f32x2* dst = reinterpret_cast<f32x2*>(ksum_s + g * Cfg::kKeySumPitch +
                                            8 * (kDT * warp + j) + 2 * t);
      f32x2 v = simt::lds(dst);
      v.x += acc[j][0];
      v.y += acc[j][1];
      simt::sts(dst, v);
    }
  }
}

// Key sums of one (batch, head): every K tile through a ring of kStages tiles in the block's
// shared memory (the Q, K and V tiles, free once the block's rows are written), cp.async
// kStages - 1 tiles ahead. Run by one block per (batch, head) after its attention work; its K
// tiles were read moments ago by the other query blocks of the head, so they come from L2.
template <typename T, int kD>
RQ_DEV void key_sum_pass(const AttentionParams& p, const MmaFwdWorkspace& ws, unsigned char* smem,
                         int64_t b, int64_t h, int tid) {
  using Cfg = MmaFwdConfig<kD>;
  constexpr int BN = Cfg::kBlockN, kThreads = Cfg::kThreads, kRec = Cfg::kCodeBytes;
  constexpr int kStages = (Cfg::kBlockM + 2 * BN) / BN;
  uint16_t* ring = reinterpret_cast<uint16_t*>(smem + Cfg::kQOffset);  // Q, K, V: contiguous
  float* ksum_s = reinterpret_cast<float*>(smem + Cfg::kKeySumOffset);
  const int M = p.num_modalities, warp = tid / 32, lane = tid % 32;
  const int64_t Lk = p.seqlen_k;
  const int n_total = static_cast<int>(tile::ceil_div(Lk, BN));
  const RowCopier<kD, BN, kThreads> kcopy(
      static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
      p.k_row_stride, tid);
  const int8_t* codes_g = ws.codes + b * ws.codes_batch_stride;
  auto load = [&](int nb) {
    kcopy.copy(ring + (nb % kStages) * BN * kD, nb * BN, static_cast<int>(Lk) - nb * BN,
               p.k_row_stride, tid);
  };
  simt::sync_threads();  // every thread is done with the tiles (the O rows are stored)
  for (int idx = tid; idx < kMmaMaxModalities * Cfg::kKeySumPitch; idx += kThreads)
    simt::sts(ksum_s + idx, 0.f);
  RQ_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_total) load(s);
    simt::cp_async_commit();
  }
  for (int nb = 0; nb < n_total; ++nb) {
    simt::cp_async_wait<kStages - 2>();  // tile nb has landed (later ones may be in flight)
    simt::sync_threads();                // ... for every thread; all are done with tile nb - 1
    key_sum_tile<T, kD, BN>(ring + (nb % kStages) * BN * kD, codes_g + (int64_t)nb * kRec, ksum_s,
                            M, warp, lane);
    if (nb + kStages - 1 < n_total) load(nb + kStages - 1);  // into the stage of tile nb - 1
    simt::cp_async_commit();
  }
  simt::cp_async_wait<0>();
  simt::sync_threads();
  float* ksum_g = static_cast<float*>(p.key_sum) + (b * p.heads + h) * M * kD;
  for (int idx = tid; idx < M * kD; idx += kThreads)
    simt::stg(ksum_g + idx, simt::lds(ksum_s + (idx / kD) * Cfg::kKeySumPitch + idx % kD));
}

template <typename T, int kD, bool kCausal, bool kStats>
RQ_DEV void fwd_block(const AttentionParams& p, const MmaFwdWorkspace& ws, unsigned char* smem) {
  using Cfg = MmaFwdConfig<kD>;
  using E = simt::Elem<T>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kMTiles;  // m16 tiles per warp
  constexpr int kNT = BN / 8;        // n8 tiles of S
  constexpr int kKS = kD / 16;       // k16 steps of Q K^T
  constexpr int kOT = kD / 8;        // n8 tiles of O
  constexpr int kKK = BN / 16;       // k16 steps of P V
  constexpr bool kQInRegs = Cfg::kQInRegs;
  constexpr int kRec = Cfg::kCodeBytes;  // bytes of one key-code record

  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + Cfg::kQOffset);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + Cfg::kKOffset);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + Cfg::kVOffset);
  int8_t* codes_s = reinterpret_cast<int8_t*>(smem + Cfg::kCodesOffset);

  const int tid = simt::thread_index();
  const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int n_mblocks = simt::grid_x();
  // Causal: the longest blocks (most key tiles) are launched first.
  const int m_block = kCausal ? n_mblocks - 1 - simt::block_x() : simt::block_x();
  const int64_t h = simt::block_y(), b = simt::block_z();
  // sequence positions fit in 32 bits on this path (choose_forward_path)
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int m0 = m_block * BM;
  const int M = p.num_modalities;
  const bool has_codes = ws.codes != nullptr;
  const float sl2 = static_cast<float>(p.scale) * kLog2e;  // the path requires scale > 0

  const RowCopier<kD, BN, kThreads> kcopy(
      static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
      p.k_row_stride, tid);
  const RowCopier<kD, BN, kThreads> vcopy(
      static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride,
      p.v_row_stride, tid);
  const int8_t* codes_g = ws.codes + b * ws.codes_batch_stride;  // (null without codes)

  const int q_rows = Lq - m0 < BM ? (Lq - m0 > 0 ? Lq - m0 : 0) : BM;
  const int n_tiles = static_cast<int>(tile::num_key_tiles(m0, BM, Lq, Lk, BN, kCausal));
  // The block that also sums the keys of its (batch, head), after its own rows: the first
  // query block (with a causal mask also the one with the fewest key tiles).
  const bool ksum_block = kStats && m_block == 0;

  auto load_k = [&](int nb) {
    kcopy.copy(Ks, nb * BN, Lk - nb * BN, p.k_row_stride, tid);
    if (has_codes) load_codes<kRec>(codes_s + (nb & 1) * kRec, codes_g + nb * kRec, tid);
  };

  // ---- prologue: Q and the first K tile; rotation; Q fragments -------------------------------
  {
    const RowCopier<kD, BM, kThreads> qcopy(
        static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride,
        p.q_row_stride, tid);
    qcopy.copy(Qs, m0, q_rows, p.q_row_stride, tid);
  }
  if (n_tiles > 0) load_k(0);
  simt::cp_async_commit();
  simt::cp_async_wait<0>();
  simt::sync_threads();
  if (p.rotation != nullptr)
    rotate_rows<T, kD, BM, BN, kThreads>(p, Qs, Vs, b, h, m0, q_rows, tid);

  const int row_w = 32 * warp;  // first row of this warp within the block
  uint32_t qf[kQInRegs ? kMT : 1][kQInRegs ? kKS : 1][4];
  if constexpr (kQInRegs) {
    RQ_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      RQ_UNROLL
      for (int ks = 0; ks < kKS; ++ks)
        simt::ldmatrix_x4(qf[mt][ks], ldsm_addr<kD>(Qs, row_w + 16 * mt + layout::ldsm_a_row(lane),
                                                    16 * ks + layout::ldsm_a_col(lane), lane & 7));
    }
  }

  float acc_o[kMT][kOT][4];
  float acc_mass[kMT][4];
  float m_run[kMT][2], l_run[kMT][2];
  RQ_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RQ_UNROLL
    for (int ot = 0; ot < kOT; ++ot) acc_o[mt][ot][0] = acc_o[mt][ot][1] = acc_o[mt][ot][2] = acc_o[mt][ot][3] = 0.f;
    acc_mass[mt][0] = acc_mass[mt][1] = acc_mass[mt][2] = acc_mass[mt][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = tile::neg_inf_f();
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  // ---- main loop over the key tiles ------------------------------------------------------------
  for (int nb = 0; nb < n_tiles; ++nb) {
    const int n0 = nb * BN;
    const int8_t* codes = codes_s + (nb & 1) * kRec;
    if (nb > 0) {
      simt::cp_async_wait<0>();  // K(nb) and its codes
      simt::sync_threads();      // ... visible to all; every warp is done with V(nb - 1)
    }
    vcopy.copy(Vs, n0, Lk - n0, p.v_row_stride, tid);
    simt::cp_async_commit();

    // Tile-relative geometry: key n0 + jr exists iff jr < keys_left, and is visible (causal)
    // to row m0 + row_w + ir iff jr <= ir + diag.
    const int keys_left = Lk - n0 < BN ? Lk - n0 : BN;
    const int diag = m0 + row_w - n0;
    // A warp whose rows all lie above this tile's first key (causal) has nothing to add.
    const bool active = !kCausal || diag + 31 >= 0;
    float s[kMT][kNT][4];
    RQ_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      RQ_UNROLL
      for (int nt = 0; nt < kNT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
    if (active) {
      RQ_UNROLL
      for (int ks = 0; ks < kKS; ++ks) {
        uint32_t qa[kMT][4];
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kQInRegs) {
            RQ_UNROLL
            for (int r = 0; r < 4; ++r) qa[mt][r] = qf[mt][ks][r];
          } else {
            simt::ldmatrix_x4(qa[mt], ldsm_addr<kD>(Qs, row_w + 16 * mt + layout::ldsm_a_row(lane),
                                                    16 * ks + layout::ldsm_a_col(lane), lane & 7));
          }
        }
        RQ_UNROLL
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t kb[4];
          simt::ldmatrix_x4(kb, ldsm_addr<kD>(Ks, 16 * np + layout::ldsm_bnk_row(lane),
                                              16 * ks + layout::ldsm_bnk_col(lane), lane & 7));
          RQ_UNROLL
          for (int mt = 0; mt < kMT; ++mt) {
            simt::mma_16816<T>(s[mt][2 * np], qa[mt], kb[0], kb[1]);
            simt::mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
          }
        }
      }
    }

    simt::cp_async_wait<0>();  // V(nb)
    simt::sync_threads();      // ... visible to all; every warp is done with K(nb)
    if (nb + 1 < n_tiles) load_k(nb + 1);
    simt::cp_async_commit();

    if (active) {
      // Key codes of this lane's columns: keys n0 + 8 nt + 2t, + 1 (one 16-bit load per n8 tile).
      // the flag bytes of the record: 1 per 32 keys that are all visible
      const bool all_visible =
          has_codes ? (simt::lds(reinterpret_cast<const uint16_t*>(codes + BN)) |
                       (BN == 64 ? 0u : 0x0100u)) == 0x0101u
                    : keys_left == BN;
      const bool need_mask = !all_visible || (kCausal && BN - 1 > diag);
      // The codes of this lane's columns of n8 tile nt: keys n0 + 8 nt + 2t, + 1, one 16-bit load.
      auto code_pair = [&](int nt) -> uint32_t {
        return simt::lds(reinterpret_cast<const uint16_t*>(codes + 8 * nt + 2 * t));
      };
      if (need_mask) {
        RQ_UNROLL
        for (int nt = 0; nt < kNT; ++nt) {
          const uint32_t pair = has_codes ? code_pair(nt) : 0u;
          RQ_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int jr = 8 * nt + layout::c_col(lane, e);
            const bool exists =
                has_codes ? static_cast<int8_t>((pair >> (8 * (e & 1))) & 0xffu) != tile::kInvisible
                          : jr < keys_left;
            RQ_UNROLL
            for (int mt = 0; mt < kMT; ++mt) {
              const int ir = 16 * mt + layout::c_row(lane, e);
              if (!exists || (kCausal && jr > ir + diag)) s[mt][nt][e] = tile::neg_inf_f();
            }
          }
        }
      }

      // Online softmax, log2 domain: p = 2^(s sl2 - m sl2) with m the running raw maximum.
      RQ_UNROLL
      for (int mt = 0; mt < kMT; ++mt) {
        RQ_UNROLL
        for (int hr = 0; hr < 2; ++hr) {
          float mx = s[mt][0][2 * hr];
          RQ_UNROLL
          for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
          const float m_new = fmaxf(m_run[mt][hr], quad_max(mx));
          // -inf: nothing visible yet; 0 keeps 2^(-inf - 0) = 0 instead of NaN
          const float m_scaled = m_new == tile::neg_inf_f() ? 0.f : m_new * sl2;
          const float factor = simt::exp2_approx(m_run[mt][hr] * sl2 - m_scaled);
          m_run[mt][hr] = m_new;
          l_run[mt][hr] *= factor;
          RQ_UNROLL
          for (int ot = 0; ot < kOT; ++ot) {
            acc_o[mt][ot][2 * hr] *= factor;
            acc_o[mt][ot][2 * hr + 1] *= factor;
          }
          if constexpr (kStats) {
            acc_mass[mt][2 * hr] *= factor;
            acc_mass[mt][2 * hr + 1] *= factor;
          }
          float rs = 0.f;
          RQ_UNROLL
          for (int nt = 0; nt < kNT; ++nt) {
            RQ_UNROLL
            for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
              const float pr = simt::exp2_approx(fmaf(s[mt][nt][e], sl2, -m_scaled));
              s[mt][nt][e] = pr;
              rs += pr;
            }
          }
          l_run[mt][hr] += rs;
        }
      }

      // O += P V, mass += P onehot. The C layout of two adjacent n8 tiles of S is the A layout
      // of one k16 step.
      RQ_UNROLL
      for (int kk = 0; kk < kKK; ++kk) {
        uint32_t pa[kMT][4];
        RQ_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          pa[mt][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
        if constexpr (kStats) {
          const uint32_t oh0 = layout::one_hot_pair(code_pair(2 * kk), g, E::kOne);
          const uint32_t oh1 = layout::one_hot_pair(code_pair(2 * kk + 1), g, E::kOne);
          RQ_UNROLL
          for (int mt = 0; mt < kMT; ++mt) simt::mma_16816<T>(acc_mass[mt], pa[mt], oh0, oh1);
        }
        RQ_UNROLL
        for (int dp = 0; dp < kOT / 2; ++dp) {
          uint32_t vb[4];
          simt::ldmatrix_x4_trans(vb, ldsm_addr<kD>(Vs, 16 * kk + layout::ldsm_bkn_row(lane),
                                                    16 * dp + layout::ldsm_bkn_col(lane), lane & 7));
          RQ_UNROLL
          for (int mt = 0; mt < kMT; ++mt) {
            simt::mma_16816<T>(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
            simt::mma_16816<T>(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
  }

  // ---- epilogue ----------------------------------------------------------------------------------
  simt::sync_threads();  // every warp is done with Q, K, V: the Q tile becomes the O staging tile
  float* lse_g = static_cast<float*>(p.lse) + (b * p.heads + h) * Lq;
  float* mass_g = static_cast<float*>(p.modality_mass);
  RQ_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RQ_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const float l = quad_sum(l_run[mt][hr]);
      const float inv = l == 0.f ? 0.f : 1.f / l;  // a row that saw no key outputs zeros
      const int r = row_w + 16 * mt + g + 8 * hr;
      RQ_UNROLL
      for (int ot = 0; ot < kOT; ++ot) {
        simt::sts(reinterpret_cast<uint32_t*>(Qs + layout::swz<kD>(r, 8 * ot + 2 * t)),
                  E::pack(acc_o[mt][ot][2 * hr] * inv, acc_o[mt][ot][2 * hr + 1] * inv));
      }
      const int i = m0 + r;
      if (i < Lq) {
        if (t == 0)
          simt::stg(lse_g + i,
                    l == 0.f ? tile::neg_inf_f() : m_run[mt][hr] * static_cast<float>(p.scale) +
                                                       simt::log_approx(l));
        if constexpr (kStats) {
          float* mrow = mass_g + ((b * p.heads + h) * Lq + i) * M;
          if (2 * t < M) simt::stg(mrow + 2 * t, acc_mass[mt][2 * hr] * inv);
          if (2 * t + 1 < M) simt::stg(mrow + 2 * t + 1, acc_mass[mt][2 * hr + 1] * inv);
        }
      }
    }
  }
  simt::sync_threads();
  uint16_t* og = static_cast<uint16_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  RQ_UNROLL
  for (int it = 0; it < BM * (kD / 8) / kThreads; ++it) {
    const int r = layout::copy_row<kD, kThreads>(tid, it);
    const int c = layout::copy_chunk<kD, kThreads>(tid, it);
    if (r < q_rows)
      simt::stg(reinterpret_cast<u32x4*>(og + (m0 + r) * p.out_row_stride + 8 * c),
                simt::lds(reinterpret_cast<const u32x4*>(Qs + layout::swz<kD>(r, 8 * c))));
  }
  if (ksum_block) key_sum_pass<T, kD>(p, ws, smem, b, h, tid);
}

// ---- key codes: one block per batch row -----------------------------------------------------------
// Writes the code record of every key tile of BN keys (codes, visibility flags) and, with
// statistics, the number of keys of each modality (key_count).
template <int BN>
RQ_DEV void key_codes_block(const AttentionParams& p, const MmaFwdWorkspace& ws,
                            unsigned char* smem) {
  constexpr int kMaxM = kMmaMaxModalities;
  constexpr int kThreads = kCodesThreads;
  static_assert(BN % 32 == 0 && kThreads % BN == 0, "a warp of keys lies in one tile");
  float* red = reinterpret_cast<float*>(smem);  // [kThreads / 32][kMaxM]
  const int tid = simt::thread_index(), warp = tid / 32, lane = tid % 32;
  const int64_t b = simt::block_x(), Lk = p.seqlen_k;
  const int M = p.num_modalities;
  const bool* pad = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  const int32_t* ids = p.key_modality == nullptr ? nullptr : p.key_modality + b * Lk;
  int8_t* rec = ws.codes + b * ws.codes_batch_stride;
  const int rec_bytes = code_record_bytes(BN);
  const int64_t n_keys = ws.key_tiles * BN;
  float cnt[kMaxM];
  RQ_UNROLL
  for (int m = 0; m < kMaxM; ++m) cnt[m] = 0.f;
  for (int64_t base = 0; base < n_keys; base += kThreads) {  // the same trip count for all
    const int64_t j = base + tid;
    const bool in_tiles = j < n_keys;  // warp-uniform: tiles are whole warps of keys
    int code = tile::kInvisible;
    if (j < Lk) {
      if (pad != nullptr && !simt::ldg(pad + j)) {
        code = tile::kInvisible;
      } else if (ids == nullptr) {
        code = tile::kNoModality;
      } else {
        // ids outside [0, M) (only a direct op call can pass them) take part, counted nowhere
        const int id = simt::ldg(ids + j);
        code = id < 0 || id >= M ? tile::kNoModality : id;
      }
    }
    const uint32_t visible = simt::ballot(code != tile::kInvisible);
    if (in_tiles) {
      const int64_t tl = j / BN;
      const int k = static_cast<int>(j % BN);
      int8_t* r = rec + tl * rec_bytes;
      simt::stg(r + k, static_cast<int8_t>(code));
      RQ_UNROLL
      for (int m = 0; m < kMaxM; ++m) cnt[m] += code == m ? 1.f : 0.f;
      if (lane == 0) simt::stg(r + BN + k / 32, static_cast<int8_t>(visible == 0xffffffffu));
      if (lane == 0 && k == 0) {
        for (int z = BN + BN / 32; z < rec_bytes; ++z) simt::stg(r + z, static_cast<int8_t>(0));
      }
    }
  }
  if (M > 0) {
    RQ_UNROLL
    for (int m = 0; m < kMaxM; ++m) {
      float c = cnt[m];
      RQ_UNROLL
      for (int o = 16; o > 0; o >>= 1) c += simt::shfl_xor(c, o);
      if (lane == 0) simt::sts(red + warp * kMaxM + m, c);
    }
    simt::sync_threads();
    if (tid < M) {
      float c = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) c += simt::lds(red + w * kMaxM + tid);
      simt::stg(static_cast<float*>(p.key_count) + b * M + tid, c);
    }
  }
}

}  // namespace fwd_mma

#if defined(__CUDACC__)
#if !defined(RQ_CUDA_ARCH)
#if defined(__CUDA_ARCH__)
#define RQ_CUDA_ARCH __CUDA_ARCH__
#else
#define RQ_CUDA_ARCH 0
#endif
#endif
// 128 threads per block (MmaFwdConfig::kThreads); the register cap is per variant and arch.
template <typename T, int kD, bool kCausal, bool kStats>
__global__ void __maxnreg__((MmaFwdConfig<kD>::template max_registers<kCausal, kStats>(RQ_CUDA_ARCH)))
    fwd_mma_kernel(const AttentionParams p, const MmaFwdWorkspace ws) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  fwd_mma::fwd_block<T, kD, kCausal, kStats>(p, ws, smem_raw);
}

template <int BN>
__global__ void __launch_bounds__(kCodesThreads)
    key_codes_kernel(const AttentionParams p, const MmaFwdWorkspace ws) {
  extern __shared__ __align__(16) unsigned char smem_codes[];
  fwd_mma::key_codes_block<BN>(p, ws, smem_codes);
}

template <typename T, int kD>
const char* launch_fwd_mma(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  using Cfg = MmaFwdConfig<kD>;
  const MmaFwdWorkspace ws = mma_workspace(p, workspace);
  if (ws.codes != nullptr) {
    if (workspace == nullptr) return "rollingq CUDA forward: the key-code workspace is missing";
    key_codes_kernel<Cfg::kBlockN><<<(unsigned)p.batch, kCodesThreads,
                                     (kCodesThreads / 32) * kMmaMaxModalities * 4, stream>>>(p, ws);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  const bool stats = p.num_modalities > 0;
  const char* err = nullptr;
  auto go = [&](auto kernel, size_t smem) -> const char* {
    if (smem > 48 * 1024) {
      cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    dim3 grid((unsigned)mma_query_blocks(p), (unsigned)p.heads, (unsigned)p.batch);
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p, ws);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  };
  if (p.is_causal)
    err = stats ? go(fwd_mma_kernel<T, kD, true, true>, Cfg::smem_bytes(true))
                : go(fwd_mma_kernel<T, kD, true, false>, Cfg::smem_bytes(false));
  else
    err = stats ? go(fwd_mma_kernel<T, kD, false, true>, Cfg::smem_bytes(true))
                : go(fwd_mma_kernel<T, kD, false, false>, Cfg::smem_bytes(false));
  return err;
}
#endif

}  // namespace rollingq
