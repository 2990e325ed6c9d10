// Forward, generic path: any element type (fp32, fp16, bf16), any D and Dv (D = 768 for the
// paper's single-head fusion), any number of modalities. CUDA cores only.
//
// One warp per query row. The rotated row is kept in shared memory (float32); keys are taken 32
// at a time, one per lane (each lane computes its own full dot product), then the same online
// softmax update as the tensor-core path (tile_math.h) with a tile of 32 keys, the masses in
// shared memory, and O += P V with the lanes spread over Dv.
#pragma once

#include "device_utils.cuh"
#include "dispatch.h"

namespace rollingq {

template <typename T, bool kCausal>
__global__ void fwd_generic_kernel(const AttentionParams p) {
  extern __shared__ float smem_f[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.value_dim);
  const int M = p.num_modalities;
  float* qs = smem_f + (size_t)warp * (2 * D + Dv + M);
  float* qtmp = qs + D;
  float* acc = qtmp + D;
  float* mass = acc + Dv;

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = (int64_t)blockIdx.x * warps + warp;
  const int64_t Lq = p.seqlen_q, Lk = p.seqlen_k;
  const float scale = static_cast<float>(p.scale);

  if (i < Lq) {  // warp-uniform
    const T* qrow = static_cast<const T*>(p.q) + tile::row_offset(p.q_batch_stride,
                                                                  p.q_head_stride, p.q_row_stride,
                                                                  b, h, i);
    const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
    const bool* pad_row = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
    const int32_t* ids_row = p.key_modality == nullptr ? nullptr : p.key_modality + b * Lk;

    for (int d = lane; d < D; d += 32) qs[d] = dev::to_float(qrow[d]);
    for (int e = lane; e < Dv; e += 32) acc[e] = 0.f;
    for (int c = lane; c < M; c += 32) mass[c] = 0.f;
    __syncwarp();
    if (tile::row_is_rotated(p, b, i)) {
      const float* R = static_cast<const float*>(p.rotation) + h * (int64_t)D * D;
      auto qv = [qs](int c) { return qs[c]; };
      for (int a = lane; a < D; a += 32) qtmp[a] = tile::rotate_component(R, qv, D, a);
      __syncwarp();
      // rounded to the input type, as the tensor-core path holds it (and the backward reads it)
      for (int a = lane; a < D; a += 32) qs[a] = dev::round_to<T>(qtmp[a]);
      __syncwarp();
    }

    float m_run = tile::neg_inf_f(), l_run = 0.f;
    const int64_t n_end = kCausal ? (i + 1 < Lk ? i + 1 : Lk) : Lk;
    for (int64_t j0 = 0; j0 < n_end; j0 += 32) {
      const int64_t j = j0 + lane;
      const int code = j < n_end ? tile::key_code(j, Lk, pad_row, ids_row) : tile::kInvisible;
      float s = tile::neg_inf_f();
      if (tile::visible(i, j, code, kCausal)) {
        const T* krow = kg + j * p.k_row_stride;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qs[d] * dev::to_float(krow[d]);
        s = dot * scale;
      }
      float factor;
      m_run = tile::update_max(m_run, dev::warp_max(s), &factor);
      const float pr = tile::prob(s, m_run);
      l_run = l_run * factor + dev::warp_sum(pr);
      for (int c = 0; c < M; ++c) {  // warp-uniform loop: every lane takes part in the sums
        const float mc = dev::warp_sum(code == c ? pr : 0.f);
        if (lane == 0) mass[c] = mass[c] * factor + mc;
      }
      for (int e = lane; e < Dv; e += 32) acc[e] *= factor;
      const int count = n_end - j0 < 32 ? static_cast<int>(n_end - j0) : 32;
      for (int jj = 0; jj < count; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, pr, jj);
        if (pj == 0.f) continue;  // uniform: pj is the same in every lane
        const T* vrow = vg + (j0 + jj) * p.v_row_stride;
        for (int e = lane; e < Dv; e += 32) acc[e] += pj * dev::to_float(vrow[e]);
      }
    }
    __syncwarp();

    const float inv = tile::inv_sum(l_run);
    T* orow = static_cast<T*>(p.out) + tile::row_offset(p.out_batch_stride, p.out_head_stride,
                                                        p.out_row_stride, b, h, i);
    for (int e = lane; e < Dv; e += 32) orow[e] = dev::from_float<T>(acc[e] * inv);
    const int64_t row = (b * p.heads + h) * Lq + i;
    if (lane == 0) static_cast<float*>(p.lse)[row] = tile::row_lse(m_run, l_run);
    for (int c = lane; c < M; c += 32) static_cast<float*>(p.modality_mass)[row * M + c] = mass[c] * inv;
  }

  if (blockIdx.x == 0) dev::key_stats<T>(p, b, h, threadIdx.x, blockDim.x);
}

template <typename T>
const char* launch_fwd_generic(const AttentionParams& p, cudaStream_t stream) {
  return RQ_BOOL_SWITCH(p.is_causal, kCausal, [&]() -> const char* {
    auto kernel = fwd_generic_kernel<T, kCausal>;
    const int64_t per_warp = generic_fwd_smem_per_warp(p);
    const int warps = generic_warps_per_block(per_warp);
    const size_t smem = (size_t)(warps * per_warp);
    if (smem > 48 * 1024) {
      cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    int64_t blocks = tile::ceil_div(p.seqlen_q, warps);
    if (blocks < 1) blocks = 1;  // key statistics are still owed when Lq == 0
    dim3 grid((unsigned)blocks, (unsigned)p.heads, (unsigned)p.batch);
    kernel<<<grid, warps * 32, smem, stream>>>(p);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  });
}

}  // namespace rollingq
