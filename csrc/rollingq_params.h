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
  // Heads of k and v: heads_kv == heads, or a divisor of it (grouped-query attention): query head
  // h reads kv head h / (heads / heads_kv). The k/v strides below are per kv head.
  int64_t heads_kv = 0;
  int num_modalities = 0;  // M; 0 = no statistics are computed (the binding checks M < 2^31)
  // Causal masking: key j is visible to row i when j <= i + causal_offset (0 = SDPA's
  // top-left alignment; Lk - Lq = lower-right).
  bool is_causal = false;
  int64_t causal_offset = 0;
  double scale = 1.0;  // softmax scale applied to q.k

  // ---- inputs (element type T: float, double, bf16, fp16) -----------------------------------
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  const void* k = nullptr;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  const void* v = nullptr;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;

  // Rotation: nullptr, or (H, D, D) in the accumulation type (float; double for double inputs):
  // R_h[a][b] at rotation + h * rotation_head_stride + a * rotation_row_stride + b *
  // rotation_col_stride (the CPU kernels read any strides; the CUDA binding makes each matrix
  // contiguous); rotation_head_stride is 0 when one matrix serves every head. A rotated row
  // becomes q_i <- R_h q_i, i.e. q'_i[a] = sum_b R_h[a][b] q_i[b].
  const void* rotation = nullptr;
  int64_t rotation_head_stride = 0, rotation_row_stride = 0, rotation_col_stride = 1;
  // Rows the rotation applies to: nullptr = every row (when rotation is set), else (B, Lq) bool
  // (one byte per row), rows contiguous, batch stride 0 when shared by the batch.
  const bool* rotated_rows = nullptr;
  int64_t rotated_rows_batch_stride = 0;
  // Modality id per key, (B, Lk) int32 in [-1, M), keys contiguous. Required when M > 0.
  const int32_t* key_modality = nullptr;
  int64_t key_modality_batch_stride = 0;
  // Key padding, (B, Lk) bool, true = the key takes part, keys contiguous. nullptr = all keys.
  const bool* key_padding = nullptr;
  int64_t key_padding_batch_stride = 0;

  // Attention mask, SDPA's semantics, read in place: element (b, h, i, j) (h = query head) at
  // attn_mask + b*mask_batch_stride + h*mask_head_stride + i*mask_row_stride + j*mask_col_stride
  // (any stride may be 0: a broadcast dim). kBool: true = the key takes part; kFloat32 / kInput:
  // a float32 / input-dtype value added to the scaled score.
  enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat32 = 2, kMaskInput = 3 };
  int attn_mask_kind = kMaskNone;
  const void* attn_mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_row_stride = 0, mask_col_stride = 0;

  // Attention dropout on the probabilities (after the statistics are taken). Element (b, h, i, j)
  // is kept when word (j % 4) of Philox4x32-10 with key (seed lo, seed hi) and counter
  // (g lo, g hi, offset lo, offset hi), g = ((b * heads + h) * seqlen_q + i) * ceil(seqlen_k / 4)
  // + j / 4, is >= dropout_threshold = floor(p * 2^32); kept values are scaled by 1 / (1 - p).
  // rollingq_kernels/dropout.py is the specification.
  double dropout_p = 0.0;  // 0 = no dropout
  uint32_t dropout_threshold = 0;
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;

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
