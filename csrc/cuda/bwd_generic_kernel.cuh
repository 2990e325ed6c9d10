// Backward: correctness first, CUDA cores only, every dtype and head dim.
//
// FlashAttention-2 recomputation: P = exp(scale * q_rot k^T - lse) from the forward's lse, no
// stored probabilities. Three kernels on one stream:
//   1. bwd_prep_kernel  (one warp per query row): q_rot = R q rounded to T, as the forward
//                       used it (float32 workspace),
//                       delta = rowsum(dout * out).
//   2. bwd_dq_kernel    (one warp per query row): dq_rot = scale * sum_j dS_ij k_j with
//                       dS = P * (dout v^T - delta); dq = dq_rot @ R on rotated rows.
//   3. bwd_dkdv_kernel  (one warp per key): dv_j = sum_i P_ij dout_i, dk_j = scale * sum_i dS_ij
//                       q_rot_i.
// Splitting dq from dk/dv recomputes P twice but needs no atomics, so results are deterministic.
#pragma once

#include "device_utils.cuh"
#include "dispatch.h"

namespace rollingq {

template <typename T>
__global__ void bwd_prep_kernel(const AttentionBwdParams p) {
  extern __shared__ float smem_f[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.value_dim);
  float* qs = smem_f + (size_t)warp * D;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = (int64_t)blockIdx.x * warps + warp;
  if (i >= p.seqlen_q) return;  // no block-wide barrier below
  const int64_t row = (b * p.heads + h) * p.seqlen_q + i;

  const T* qrow = static_cast<const T*>(p.q) +
                  tile::row_offset(p.q_batch_stride, p.q_head_stride, p.q_row_stride, b, h, i);
  float* qrot = static_cast<float*>(p.q_rot) + row * D;
  for (int d = lane; d < D; d += 32) qs[d] = dev::to_float(qrow[d]);
  __syncwarp();
  if (tile::row_is_rotated(p, b, i)) {
    const float* R = static_cast<const float*>(p.rotation) + h * (int64_t)D * D;
    auto qv = [qs](int c) { return qs[c]; };
    // rounded to the input type: the forward kernels computed lse from the rounded row
    for (int a = lane; a < D; a += 32)
      qrot[a] = dev::round_to<T>(tile::rotate_component(R, qv, D, a));
  } else {
    for (int d = lane; d < D; d += 32) qrot[d] = qs[d];
  }

  const T* orow = static_cast<const T*>(p.out) + tile::row_offset(p.out_batch_stride,
                                                                  p.out_head_stride,
                                                                  p.out_row_stride, b, h, i);
  const T* dorow = static_cast<const T*>(p.dout) + tile::row_offset(p.dout_batch_stride,
                                                                    p.dout_head_stride,
                                                                    p.dout_row_stride, b, h, i);
  float dsum = 0.f;
  for (int e = lane; e < Dv; e += 32) dsum += dev::to_float(orow[e]) * dev::to_float(dorow[e]);
  dsum = dev::warp_sum(dsum);
  if (lane == 0) static_cast<float*>(p.delta)[row] = dsum;
}

template <typename T, bool kCausal>
__global__ void bwd_dq_kernel(const AttentionBwdParams p) {
  extern __shared__ float smem_f[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.value_dim);
  float* qs = smem_f + (size_t)warp * (2 * D + Dv);
  float* dos = qs + D;
  float* dqs = dos + Dv;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = (int64_t)blockIdx.x * warps + warp;
  const int64_t Lq = p.seqlen_q, Lk = p.seqlen_k;
  if (i >= Lq) return;
  const float scale = static_cast<float>(p.scale);
  const int64_t row = (b * p.heads + h) * Lq + i;
  const float lse_i = static_cast<const float*>(p.lse)[row];
  const float delta_i = static_cast<const float*>(p.delta)[row];

  const float* qrot = static_cast<const float*>(p.q_rot) + row * D;
  const T* dorow = static_cast<const T*>(p.dout) + tile::row_offset(p.dout_batch_stride,
                                                                    p.dout_head_stride,
                                                                    p.dout_row_stride, b, h, i);
  for (int d = lane; d < D; d += 32) {
    qs[d] = qrot[d];
    dqs[d] = 0.f;
  }
  for (int e = lane; e < Dv; e += 32) dos[e] = dev::to_float(dorow[e]);
  __syncwarp();

  const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const bool* pad_row = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  // A row that saw no key (lse = -inf) has P = 0 everywhere: its gradient is zero.
  const int64_t n_end = lse_i == tile::neg_inf_f() ? 0 : (kCausal ? (i + 1 < Lk ? i + 1 : Lk) : Lk);
  for (int64_t j0 = 0; j0 < n_end; j0 += 32) {
    const int64_t j = j0 + lane;
    const int code = j < n_end ? tile::key_code(j, Lk, pad_row, nullptr) : tile::kInvisible;
    float ds = 0.f;
    if (tile::visible(i, j, code, kCausal)) {
      const T* krow = kg + j * p.k_row_stride;
      const T* vrow = vg + j * p.v_row_stride;
      float dot = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) dot += qs[d] * dev::to_float(krow[d]);
      for (int e = 0; e < Dv; ++e) dp += dos[e] * dev::to_float(vrow[e]);
      const float pr = tile::prob(dot * scale, lse_i);
      ds = pr * (dp - delta_i);
    }
    const int count = n_end - j0 < 32 ? static_cast<int>(n_end - j0) : 32;
    for (int jj = 0; jj < count; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
      if (dsj == 0.f) continue;
      const T* krow = kg + (j0 + jj) * p.k_row_stride;
      for (int d = lane; d < D; d += 32) dqs[d] += dsj * dev::to_float(krow[d]);
    }
  }
  __syncwarp();

  T* dqrow = static_cast<T*>(p.dq) +
             tile::row_offset(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, b, h, i);
  if (tile::row_is_rotated(p, b, i)) {
    const float* R = static_cast<const float*>(p.rotation) + h * (int64_t)D * D;
    for (int c = lane; c < D; c += 32)
      dqrow[c] = dev::from_float<T>(scale * tile::unrotate_component(R, dqs, D, c));
  } else {
    for (int d = lane; d < D; d += 32) dqrow[d] = dev::from_float<T>(scale * dqs[d]);
  }
}

template <typename T, bool kCausal>
__global__ void bwd_dkdv_kernel(const AttentionBwdParams p) {
  extern __shared__ float smem_f[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.value_dim);
  float* ks = smem_f + (size_t)warp * (2 * D + 2 * Dv);
  float* vs = ks + D;
  float* dks = vs + Dv;
  float* dvs = dks + D;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t j = (int64_t)blockIdx.x * warps + warp;
  const int64_t Lq = p.seqlen_q, Lk = p.seqlen_k;
  if (j >= Lk) return;
  const float scale = static_cast<float>(p.scale);

  const T* krow = static_cast<const T*>(p.k) +
                  tile::row_offset(p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, j);
  const T* vrow = static_cast<const T*>(p.v) +
                  tile::row_offset(p.v_batch_stride, p.v_head_stride, p.v_row_stride, b, h, j);
  for (int d = lane; d < D; d += 32) {
    ks[d] = dev::to_float(krow[d]);
    dks[d] = 0.f;
  }
  for (int e = lane; e < Dv; e += 32) {
    vs[e] = dev::to_float(vrow[e]);
    dvs[e] = 0.f;
  }
  __syncwarp();

  const bool* pad_row = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  const int code = tile::key_code(j, Lk, pad_row, nullptr);
  const float* lse = static_cast<const float*>(p.lse) + (b * p.heads + h) * Lq;
  const float* delta = static_cast<const float*>(p.delta) + (b * p.heads + h) * Lq;
  const float* qrot = static_cast<const float*>(p.q_rot) + (b * p.heads + h) * Lq * D;
  const T* dog = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const int64_t i_begin = code == tile::kInvisible ? Lq : tile::first_row_seeing_key(j, kCausal);
  for (int64_t i0 = i_begin; i0 < Lq; i0 += 32) {
    const int64_t i = i0 + lane;
    float pr = 0.f, ds = 0.f;
    if (i < Lq && tile::visible(i, j, code, kCausal) && lse[i] != tile::neg_inf_f()) {
      const float* qi = qrot + i * D;
      const T* doi = dog + i * p.dout_row_stride;
      float dot = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) dot += qi[d] * ks[d];
      for (int e = 0; e < Dv; ++e) dp += dev::to_float(doi[e]) * vs[e];
      pr = tile::prob(dot * scale, lse[i]);
      ds = pr * (dp - delta[i]);
    }
    const int count = Lq - i0 < 32 ? static_cast<int>(Lq - i0) : 32;
    for (int ii = 0; ii < count; ++ii) {
      const float pi = __shfl_sync(0xffffffffu, pr, ii);
      const float dsi = __shfl_sync(0xffffffffu, ds, ii);
      if (pi != 0.f) {
        const T* doi = dog + (i0 + ii) * p.dout_row_stride;
        for (int e = lane; e < Dv; e += 32) dvs[e] += pi * dev::to_float(doi[e]);
      }
      if (dsi != 0.f) {
        const float* qi = qrot + (i0 + ii) * D;
        for (int d = lane; d < D; d += 32) dks[d] += dsi * qi[d];
      }
    }
  }
  __syncwarp();

  T* dkrow = static_cast<T*>(p.dk) +
             tile::row_offset(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, b, h, j);
  T* dvrow = static_cast<T*>(p.dv) +
             tile::row_offset(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, b, h, j);
  for (int d = lane; d < D; d += 32) dkrow[d] = dev::from_float<T>(scale * dks[d]);
  for (int e = lane; e < Dv; e += 32) dvrow[e] = dev::from_float<T>(dvs[e]);
}

namespace dev {
template <typename Kernel>
inline const char* launch_rows(Kernel kernel, const AttentionBwdParams& p, int64_t rows,
                               int64_t smem_per_warp, cudaStream_t stream) {
  if (rows <= 0) return nullptr;
  const int warps = generic_warps_per_block(smem_per_warp);
  const size_t smem = (size_t)(warps * smem_per_warp);
  if (smem > 48 * 1024) {
    cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  dim3 grid((unsigned)tile::ceil_div(rows, warps), (unsigned)p.heads, (unsigned)p.batch);
  kernel<<<grid, warps * 32, smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace dev

template <typename T>
const char* launch_bwd_generic(const AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t D = p.head_dim, Dv = p.value_dim;
  const char* err = dev::launch_rows(bwd_prep_kernel<T>, p, p.seqlen_q, D * 4, stream);
  if (err) return err;
  return RQ_BOOL_SWITCH(p.is_causal, kCausal, [&]() -> const char* {
    const char* e = dev::launch_rows(bwd_dq_kernel<T, kCausal>, p, p.seqlen_q,
                                     (2 * D + Dv) * 4, stream);
    if (e) return e;
    return dev::launch_rows(bwd_dkdv_kernel<T, kCausal>, p, p.seqlen_k,
                            generic_bwd_smem_per_warp(p), stream);
  });
}

}  // namespace rollingq
