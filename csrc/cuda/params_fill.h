// Filling the params structs from plain tensor descriptions, and choosing a kernel path.
//
// Host-only and free of torch and CUDA headers: the torch binding describes its tensors with
// TensorDesc and calls these functions; the CPU tests call the same functions through a small
// host library, so the stride logic the kernels rely on is tested without a GPU.
#pragma once

#include <cstdint>

#include "../rollingq_params.h"
#include "fwd_mma_config.h"

namespace rollingq {

// A strided tensor of up to four dims: data pointer, sizes and strides in elements.
struct TensorDesc {
  const void* ptr = nullptr;
  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
};

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward kernel paths. The tensor-core path needs fp16/bf16, D == Dv in {64, 128}, at most
// kMmaMaxModalities (8) modalities, a positive scale (its softmax folds the scale into the
// exponent of a running maximum), sequences shorter than 2^31 and 16-byte aligned rows of q, k,
// v and out; everything else takes the generic path.
enum class FwdPath : int { kGeneric = 0, kMma64 = 1, kMma128 = 2 };

inline void set_bhl_strides(const TensorDesc& t, int64_t* batch, int64_t* head, int64_t* row) {
  *batch = t.strides[0];
  *head = t.strides[1];
  *row = t.strides[2];
}

// q, k, v, out: (B, H, L, D) with unit last stride (the binding guarantees it).
inline void fill_forward_params(AttentionParams* p, const TensorDesc& q, const TensorDesc& k,
                                const TensorDesc& v, const TensorDesc& out, double scale,
                                bool is_causal) {
  p->batch = q.sizes[0];
  p->heads = q.sizes[1];
  p->seqlen_q = q.sizes[2];
  p->seqlen_k = k.sizes[2];
  p->head_dim = q.sizes[3];
  p->value_dim = v.sizes[3];
  p->scale = scale;
  p->is_causal = is_causal;
  p->q = q.ptr;
  set_bhl_strides(q, &p->q_batch_stride, &p->q_head_stride, &p->q_row_stride);
  p->k = k.ptr;
  set_bhl_strides(k, &p->k_batch_stride, &p->k_head_stride, &p->k_row_stride);
  p->v = v.ptr;
  set_bhl_strides(v, &p->v_batch_stride, &p->v_head_stride, &p->v_row_stride);
  p->out = const_cast<void*>(out.ptr);
  set_bhl_strides(out, &p->out_batch_stride, &p->out_head_stride, &p->out_row_stride);
}

inline void fill_backward_params(AttentionBwdParams* p, const TensorDesc& dout,
                                 const TensorDesc& dq, const TensorDesc& dk,
                                 const TensorDesc& dv) {
  p->dout = dout.ptr;
  set_bhl_strides(dout, &p->dout_batch_stride, &p->dout_head_stride, &p->dout_row_stride);
  p->dq = const_cast<void*>(dq.ptr);
  set_bhl_strides(dq, &p->dq_batch_stride, &p->dq_head_stride, &p->dq_row_stride);
  p->dk = const_cast<void*>(dk.ptr);
  set_bhl_strides(dk, &p->dk_batch_stride, &p->dk_head_stride, &p->dk_row_stride);
  p->dv = const_cast<void*>(dv.ptr);
  set_bhl_strides(dv, &p->dv_batch_stride, &p->dv_head_stride, &p->dv_row_stride);
}

// Vector (16-byte) loads of rows need an aligned base and row/head/batch strides that keep
// every row aligned.
inline bool rows_16b_aligned(const void* ptr, int64_t elem_bytes, int64_t batch_stride,
                             int64_t head_stride, int64_t row_stride) {
  const int64_t per = 16 / elem_bytes;
  return (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && batch_stride % per == 0 &&
         head_stride % per == 0 && row_stride % per == 0;
}

inline FwdPath choose_forward_path(const AttentionParams& p, ScalarKind kind) {
  if (kind == ScalarKind::kFloat32) return FwdPath::kGeneric;
  if (p.head_dim != p.value_dim) return FwdPath::kGeneric;
  if (p.num_modalities > kMmaMaxModalities) return FwdPath::kGeneric;
  if (!(p.scale > 0.0)) return FwdPath::kGeneric;
  // (no key at all: nothing for its key-code pass to describe; the generic path writes the zeros)
  if (p.seqlen_k == 0) return FwdPath::kGeneric;
  // its row and key positions are 32-bit
  if (p.seqlen_q >= ((int64_t)1 << 31) - kMmaBlockM || p.seqlen_k >= ((int64_t)1 << 31) - 64)
    return FwdPath::kGeneric;
  const bool aligned =
      rows_16b_aligned(p.q, 2, p.q_batch_stride, p.q_head_stride, p.q_row_stride) &&
      rows_16b_aligned(p.k, 2, p.k_batch_stride, p.k_head_stride, p.k_row_stride) &&
      rows_16b_aligned(p.v, 2, p.v_batch_stride, p.v_head_stride, p.v_row_stride) &&
      rows_16b_aligned(p.out, 2, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  if (!aligned) return FwdPath::kGeneric;
  if (p.head_dim == 64) return FwdPath::kMma64;
  if (p.head_dim == 128) return FwdPath::kMma128;
  return FwdPath::kGeneric;
}

// The backward's tensor-core path: the forward's conditions that concern it (fp16/bf16, D = Dv in
// {64, 128}, scale > 0, keys present, 32-bit positions) and 16-byte aligned rows of every tensor
// it reads or writes; the generic kernels otherwise.
enum class BwdPath : int { kGeneric = 0, kMma64 = 1, kMma128 = 2 };

inline BwdPath choose_backward_path(const AttentionBwdParams& p, ScalarKind kind) {
  if (kind == ScalarKind::kFloat32 || p.head_dim != p.value_dim) return BwdPath::kGeneric;
  if (p.head_dim != 64 && p.head_dim != 128) return BwdPath::kGeneric;
  if (!(p.scale > 0.0) || p.seqlen_k == 0) return BwdPath::kGeneric;
  if (p.seqlen_q >= ((int64_t)1 << 31) - 256 || p.seqlen_k >= ((int64_t)1 << 31) - 256)
    return BwdPath::kGeneric;
  const bool aligned =
      rows_16b_aligned(p.q, 2, p.q_batch_stride, p.q_head_stride, p.q_row_stride) &&
      rows_16b_aligned(p.k, 2, p.k_batch_stride, p.k_head_stride, p.k_row_stride) &&
      rows_16b_aligned(p.v, 2, p.v_batch_stride, p.v_head_stride, p.v_row_stride) &&
      rows_16b_aligned(p.dout, 2, p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride) &&
      rows_16b_aligned(p.dk, 2, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride) &&
      rows_16b_aligned(p.dv, 2, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  if (!aligned) return BwdPath::kGeneric;
  return p.head_dim == 64 ? BwdPath::kMma64 : BwdPath::kMma128;
}

// Device workspace the forward needs (bytes): the key-code records of the tensor-core path.
inline size_t forward_workspace_bytes(const AttentionParams& p, ScalarKind kind) {
  return choose_forward_path(p, kind) == FwdPath::kGeneric ? 0 : mma_workspace_bytes(p);
}

// Shared memory (bytes) one warp of the generic kernels needs, and how many warps a block gets.
inline int64_t generic_fwd_smem_per_warp(const AttentionParams& p) {
  return (2 * p.head_dim + p.value_dim + p.num_modalities) * 4;
}
inline int64_t generic_bwd_smem_per_warp(const AttentionParams& p) {
  return (2 * p.head_dim + 2 * p.value_dim) * 4;
}
// Up to 4 warps while the block stays within the default 48 KB; at least 1 (the launcher raises
// the dynamic shared-memory limit when even one warp needs more).
inline int generic_warps_per_block(int64_t smem_per_warp) {
  int w = 4;
  while (w > 1 && w * smem_per_warp > 48 * 1024) --w;
  return w;
}

}  // namespace rollingq
