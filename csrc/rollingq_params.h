// Plain parameter structs shared by every kernel (CPU and CUDA) and filled by the torch bindings.
//
// No torch, no CUDA headers: a .cu file that includes only this compiles with nvcc alone.
// Element types are fixed by the kernel's template parameters; the pointers here are untyped.
// Strides are in elements. The last dimension of q, k, v, out (and their gradients) is
// contiguous (stride 1); the bindings copy an input whose last stride is not 1, and only then.
#pragma once

#include <cstdint>

namespace rollingq {

struct AttentionParams {
  // ---- sizes --------------------------------------------------------------------------------
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int64_t head_dim = 0;   // D (q and k)
  int64_t value_dim = 0;  // Dv (v and out)
  int num_modalities = 0;  // M; 0 = no statistics are computed
  bool is_causal = false;  // top-left aligned: key j visible to row i when j <= i
  double scale = 1.0;      // softmax scale applied to q.k

  // ---- inputs (element type T: float, double, bf16, fp16) -----------------------------------
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  const void* k = nullptr;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  const void* v = nullptr;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;

  // Rotation: nullptr, or (H, D, D) contiguous in the accumulation type (float; double for
  // double inputs). A rotated row becomes q_i <- R_h q_i, i.e. q'_i[a] = sum_b R_h[a][b] q_i[b].
  const void* rotation = nullptr;
  // Rows the rotation applies to: nullptr = every row (when rotation is set), else (B, Lq)
  // contiguous bool (one byte per row).
  const bool* rotated_rows = nullptr;
  // Modality id per key, (B, Lk) contiguous int32 in [-1, M). Required when M > 0.
  const int32_t* key_modality = nullptr;
  // Key padding, (B, Lk) contiguous bool, true = the key takes part. nullptr = all keys.
  const bool* key_padding = nullptr;

  // ---- outputs ------------------------------------------------------------------------------
  void* out = nullptr;  // (B, H, Lq, Dv), type T
  int64_t out_batch_stride = 0, out_head_stride = 0, out_row_stride = 0;
  void* lse = nullptr;            // (B, H, Lq) contiguous, accumulation type; -inf for empty rows
  void* modality_mass = nullptr;  // (B, H, Lq, M) contiguous, accumulation type (M > 0 only)
  void* key_sum = nullptr;        // (B, H, M, D) contiguous, accumulation type (M > 0 only)
  void* key_count = nullptr;      // (B, M) contiguous, accumulation type (M > 0 only)
};

// Backward: recompute probabilities from lse (FlashAttention-2 style).
struct AttentionBwdParams : AttentionParams {
  const void* dout = nullptr;  // (B, H, Lq, Dv), type T
  int64_t dout_batch_stride = 0, dout_head_stride = 0, dout_row_stride = 0;
  // out (inherited, read-only here) and lse (inherited) are inputs of the backward.
  void* dq = nullptr;  // (B, H, Lq, D), type T
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  void* dk = nullptr;  // (B, H, Lk, D), type T
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;
  void* dv = nullptr;  // (B, H, Lk, Dv), type T
  int64_t dv_batch_stride = 0, dv_head_stride = 0, dv_row_stride = 0;
  // Workspaces owned by the caller, accumulation type, contiguous:
  void* delta = nullptr;     // (B, H, Lq): rowsum(dout * out)
  void* dq_accum = nullptr;  // (B, H, Lq, D) or nullptr when the backend does not need it
  // The rotated queries R q_i (unrotated rows copied), (B, H, Lq, D), accumulation type,
  // contiguous; written and read by backends that recompute scores from it (CUDA), else nullptr.
  void* q_rot = nullptr;
};

}  // namespace rollingq
