// Forward, tensor-core path: fp16 / bf16, D == Dv in {64, 128}, at most 4 modalities.
//
// FlashAttention-2 structure: one block of 4 warps owns 64 query rows (16 per warp) and walks
// the key tiles of its (batch, head) left to right. Per key tile: S = Q K^T with mma.sync
// m16n8k16 (fp32 accumulators), scale and masks, the online-softmax update of tile_math.h, then
// O += P V with P re-packed from the S accumulators into A fragments (no shared-memory round
// trip). The per-modality masses ride along with the row sums l: same rescale, same final 1/l.
// Rotated rows are rotated in float32 in the prologue, before the Q fragments are loaded.
#pragma once

#include "device_utils.cuh"
#include "dispatch.h"
#include "mma_layout.h"

namespace rollingq {

template <int kD>
struct MmaFwdTraits {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kD + 8;  // row pitch in elements; +16 bytes against bank conflicts
  static constexpr int kMaxM = kMmaMaxModalities;
  static constexpr size_t smem_bytes(size_t elem) {
    return (size_t)(kBlockM + 2 * kBlockN) * kLd * elem + kBlockN * sizeof(int);
  }
};

namespace dev {

// Copies rows [0, rows_valid) of a (rows, kD) tile with 16-byte vectors and zero-fills the rest,
// so that rows past the end contribute exact zeros to the MMAs.
template <typename T, int kD, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t row_stride,
                                          int64_t rows_valid, int tid) {
  constexpr int kChunks = kD / 8;
#pragma unroll 4
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows_valid) val = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

}  // namespace dev

template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(MmaFwdTraits<kD>::kThreads)
    fwd_mma_kernel(const AttentionParams p) {
  using Tr = MmaFwdTraits<kD>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd;
  constexpr int kThreads = Tr::kThreads, kMaxM = Tr::kMaxM;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBlockM * kLd;
  T* Vs = Ks + kBlockN * kLd;
  int* codes = reinterpret_cast<int*>(Vs + kBlockN * kLd);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m0 = (int64_t)blockIdx.x * kBlockM;
  const int64_t Lq = p.seqlen_q, Lk = p.seqlen_k;
  const float scale = static_cast<float>(p.scale);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const bool* pad_row = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  const int32_t* ids_row = p.key_modality == nullptr ? nullptr : p.key_modality + b * Lk;

  // ---- prologue: Q tile, rotated rows in float32 (Ks is free scratch until the first K tile)
  const int64_t q_rows = Lq - m0 < kBlockM ? (Lq - m0 > 0 ? Lq - m0 : 0) : kBlockM;
  dev::load_tile<T, kD, kBlockM, kThreads>(Qs, kLd, qg + m0 * p.q_row_stride, p.q_row_stride,
                                           q_rows, tid);
  __syncthreads();
  if (p.rotation != nullptr) {
    const float* R = static_cast<const float*>(p.rotation) + h * kD * kD;
    for (int idx = tid; idx < kBlockM * kD; idx += kThreads) {
      const int r = idx / kD, a = idx % kD;
      if (r < q_rows && tile::row_is_rotated(p, b, m0 + r)) {
        const T* row = Qs + r * kLd;
        auto qv = [row](int c) { return dev::to_float(row[c]); };
        Ks[r * kLd + a] = dev::from_float<T>(tile::rotate_component(R, qv, kD, a));
      }
    }
    __syncthreads();
    for (int idx = tid; idx < kBlockM * kD; idx += kThreads) {
      const int r = idx / kD, a = idx % kD;
      if (r < q_rows && tile::row_is_rotated(p, b, m0 + r)) Qs[r * kLd + a] = Ks[r * kLd + a];
    }
    __syncthreads();
  }

  // A fragments of this warp's 16 rows for the whole head dim stay in registers.
  uint32_t qa[kD / 16][4];
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const T* qtile = Qs + warp * 16 * kLd + ks * 16;
#pragma unroll
    for (int reg = 0; reg < 4; ++reg)
      qa[ks][reg] = *reinterpret_cast<const uint32_t*>(qtile + mma::a_offset(lane, reg, kLd));
  }

  // Each lane owns two rows of the warp's tile: r0 (C elements 0, 1) and r0 + 8 (elements 2, 3).
  const int r0 = warp * 16 + g;
  const int64_t row_i[2] = {m0 + r0, m0 + r0 + 8};
  float acc_o[kD / 8][4];
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) acc_o[nt][0] = acc_o[nt][1] = acc_o[nt][2] = acc_o[nt][3] = 0.f;
  float m_run[2] = {tile::neg_inf_f(), tile::neg_inf_f()};
  float l_run[2] = {0.f, 0.f};  // this lane's columns only; quad-reduced in the epilogue
  float mass[2][kMaxM];
#pragma unroll
  for (int c = 0; c < kMaxM; ++c) mass[0][c] = mass[1][c] = 0.f;

  const int64_t n_tiles = tile::num_key_tiles(m0, kBlockM, Lq, Lk, kBlockN, kCausal);
  for (int64_t nb = 0; nb < n_tiles; ++nb) {
    const int64_t n0 = nb * kBlockN;
    __syncthreads();  // the previous tile (or the rotation scratch) is no longer read
    const int64_t k_rows = Lk - n0 < kBlockN ? Lk - n0 : kBlockN;
    dev::load_tile<T, kD, kBlockN, kThreads>(Ks, kLd, kg + n0 * p.k_row_stride, p.k_row_stride,
                                             k_rows, tid);
    dev::load_tile<T, kD, kBlockN, kThreads>(Vs, kLd, vg + n0 * p.v_row_stride, p.v_row_stride,
                                             k_rows, tid);
    for (int c = tid; c < kBlockN; c += kThreads) codes[c] = tile::key_code(n0 + c, Lk, pad_row, ids_row);
    __syncthreads();

    // S = Q K^T: B[k][n] = K[n][k], so b0/b1 are two adjacent elements of a K row.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const T* kp = Ks + nt * 8 * kLd + ks * 16;
        dev::mma_16816<T>(s[nt], qa[ks],
                          *reinterpret_cast<const uint32_t*>(kp + mma::b_offset_nk(lane, 0, kLd)),
                          *reinterpret_cast<const uint32_t*>(kp + mma::b_offset_nk(lane, 1, kLd)));
      }
    }

    // Scale, mask, tile row maxima.
    float tmax[2] = {tile::neg_inf_f(), tile::neg_inf_f()};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;  // row r0 + 8 r == warp * 16 + mma::c_row(lane, e)
        const int col = nt * 8 + mma::c_col(lane, e);
        const bool vis = tile::visible(row_i[r], n0 + col, codes[col], kCausal);
        const float x = vis ? s[nt][e] * scale : tile::neg_inf_f();
        s[nt][e] = x;
        tmax[r] = fmaxf(tmax[r], x);
      }
    }
    float factor[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_run[r] = tile::update_max(m_run[r], dev::quad_max(tmax[r]), &factor[r]);
      l_run[r] *= factor[r];
#pragma unroll
      for (int c = 0; c < kMaxM; ++c) mass[r][c] *= factor[r];
    }
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      acc_o[nt][0] *= factor[0];
      acc_o[nt][1] *= factor[0];
      acc_o[nt][2] *= factor[1];
      acc_o[nt][3] *= factor[1];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int col = nt * 8 + mma::c_col(lane, e);
        const float pr = tile::prob(s[nt][e], m_run[r]);
        s[nt][e] = pr;
        l_run[r] += pr;
        const int code = codes[col];
#pragma unroll
        for (int c = 0; c < kMaxM; ++c) mass[r][c] += code == c ? pr : 0.f;
      }
    }

    // O += P V. The C layout of two adjacent n8 tiles of S is the A layout of one k16 step.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const float* st = s[2 * kk + mma::c_tile(reg)];
        pa[reg] = dev::pack2<T>(st[mma::c_elem(reg, 0)], st[mma::c_elem(reg, 1)]);
      }
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        // B[k][n] = V[key k][n]: the two halves of a register come from two key rows.
        const T* vp = Vs + kk * 16 * kLd + nt * 8;
        const uint32_t b0 = dev::pack2_raw(vp + mma::b_offset_kn(lane, 0, 0, kLd),
                                           vp + mma::b_offset_kn(lane, 0, 1, kLd));
        const uint32_t b1 = dev::pack2_raw(vp + mma::b_offset_kn(lane, 1, 0, kLd),
                                           vp + mma::b_offset_kn(lane, 1, 1, kLd));
        dev::mma_16816<T>(acc_o[nt], pa, b0, b1);
      }
    }
  }

  // ---- epilogue: finish the row sums across the quad, normalise, write.
  const int M = p.num_modalities;
  T* og = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  float* lse = static_cast<float*>(p.lse) + (b * p.heads + h) * Lq;
  float* mass_out = static_cast<float*>(p.modality_mass);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = dev::quad_sum(l_run[r]);
    float mr[kMaxM];
#pragma unroll
    for (int c = 0; c < kMaxM; ++c) mr[c] = dev::quad_sum(mass[r][c]);
    const float inv = tile::inv_sum(l);
    const int64_t i = row_i[r];
    if (i >= Lq) continue;
    T* orow = og + i * p.out_row_stride;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      const int col = nt * 8 + mma::c_col(lane, 2 * r);
      orow[col] = dev::from_float<T>(acc_o[nt][2 * r] * inv);
      orow[col + 1] = dev::from_float<T>(acc_o[nt][2 * r + 1] * inv);
    }
    if (t == 0) {
      lse[i] = tile::row_lse(m_run[r], l);
      if (M > 0) {
        float* mrow = mass_out + ((b * p.heads + h) * Lq + i) * M;
#pragma unroll
        for (int c = 0; c < kMaxM; ++c)
          if (c < M) mrow[c] = mr[c] * inv;
      }
    }
  }

  if (blockIdx.x == 0) dev::key_stats<T>(p, b, h, tid, kThreads);
}

template <typename T, int kD>
const char* launch_fwd_mma(const AttentionParams& p, cudaStream_t stream) {
  using Tr = MmaFwdTraits<kD>;
  return RQ_BOOL_SWITCH(p.is_causal, kCausal, [&]() -> const char* {
    auto kernel = fwd_mma_kernel<T, kD, kCausal>;
    const size_t smem = Tr::smem_bytes(sizeof(T));
    if (smem > 48 * 1024) {
      cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    int64_t blocks_m = tile::ceil_div(p.seqlen_q, Tr::kBlockM);
    if (blocks_m < 1) blocks_m = 1;  // key statistics are still owed when Lq == 0
    dim3 grid((unsigned)blocks_m, (unsigned)p.heads, (unsigned)p.batch);
    kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  });
}

}  // namespace rollingq
