// The one canonicalisation step of the rollingq ops, shared by the CPU (csrc/ops.cpp) and CUDA
// (csrc/cuda/binding.cpp) bindings: check every argument of the op schema (op_contract.py), make
// side inputs readable by the kernels without copying what need not be copied, allocate outputs
// in the contract's layout, and fill the plain params struct the kernels take.
//
// The ops are public (torch.ops.rollingq.attention_fwd can be called directly), so every width is
// checked where it is narrowed, every pointer the kernels index comes with its extent checked,
// and an argument the kernels cannot honour raises an error that names it.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "rollingq_params.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rollingq {

using at::Tensor;

inline std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

// A fresh output of a CPU call costs a page fault per 4 KiB page at its first touch. Where each of
// its elements sums few products (at most kHugePageDepth: dK and dV of a few queries, the output
// of a few keys) the kernel writes faster than the pages fault in: the gradients of RollingQ's
// [CLS] row (108 MiB of dK and dV at (16, 1, 1, 1101, 768)) spent half the backward's time there.
// Such an output's whole 2 MiB-aligned pages are advised as huge pages (what torch's allocator
// does for every allocation under THP_MEM_ALLOC_ENABLE=1), where the system lets a process ask
// (transparent huge pages "madvise" or "always"). Float32 backward at Lk = 1101, D = 768, 2 cores:
// Lq = 1, 8, 64, 256 took 0.44-0.54, 0.48, 0.67, 0.88x the time; deeper outputs gain nothing
// (Lq = 512: 0.99x) or lose (all 1101 queries: 1.02x with dK and dV advised, 1.09-1.11x with dQ
// too), the zeroing of a 2 MiB page at once competing with the products for the cache.
constexpr int64_t kHugePageDepth = 256;
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.is_cpu()) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + t.storage().nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// An empty tensor of `sizes` (4-D) laid out like t: t's first three dims ordered by stride (largest
// first, ties in natural order), the last dim contiguous; contiguous when t has a broadcast dim.
// The same rule as op_contract.layout_like (the fake implementation), which the tests compare.
// On the CPU, with huge_pages, its whole 2 MiB pages are advised as huge pages.
inline Tensor layout_like(const Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype,
                          bool huge_pages = false) {
  int64_t order[4] = {0, 1, 2, 3};
  bool broadcast = false;
  for (int d = 0; d < 4; ++d) broadcast |= (t.stride(d) == 0 && t.size(d) > 1);
  if (!broadcast) {
    // stable insertion sort of dims 0..2 by descending stride
    for (int i = 1; i < 3; ++i)
      for (int j = i; j > 0 && t.stride(order[j]) > t.stride(order[j - 1]); --j)
        std::swap(order[j], order[j - 1]);
  }
  std::vector<int64_t> permuted(4), inverse(4);
  for (int d = 0; d < 4; ++d) permuted[d] = sizes[order[d]];
  for (int d = 0; d < 4; ++d) inverse[order[d]] = d;
  Tensor out = at::empty(permuted, t.options().dtype(dtype));
  if (huge_pages) advise_huge_pages(out);
  return out.permute(inverse);
}

// The accumulation (and statistics) dtype: double for double inputs, float otherwise.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Tensor last_dim_contiguous(const Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// q, k, v in canonical form, plus every side input, checked and ready for the kernels.
struct Canonical {
  Tensor q, k, v;
  Tensor rotation, rotated_rows, key_modality, key_padding, attn_mask;
  int64_t num_modalities = 0;
  bool is_causal = false;
  int64_t causal_offset = 0;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
};

inline void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

// q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with H % Hkv == 0, one dtype and device.
inline void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, H, Lq, D); got ", shape_str(q));
  // Hkv divides H; H = Hkv = 0 (no heads at all) is an empty problem, not an error
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  (k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0),
              op, ": k must have shape (", q.size(0), ", Hkv, Lk, ", q.size(3),
              ") with Hkv dividing H = ", q.size(1), "; got ", shape_str(k));
  TORCH_CHECK(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) &&
                  v.size(2) == k.size(2),
              op, ": v must have shape (", k.size(0), ", ", k.size(1), ", ", k.size(2),
              ", Dv) to match k ", shape_str(k), "; got ", shape_str(v));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype; got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, op, ": head dims must be positive; got D=",
              q.size(3), ", Dv=", v.size(3));
}

// Side inputs shared by the forward and the backward.
inline void canonical_side_inputs(const char* op, Canonical& c,
                                  const std::optional<Tensor>& rotation,
                                  const std::optional<Tensor>& rotated_queries,
                                  const std::optional<Tensor>& key_padding_mask,
                                  const std::optional<Tensor>& attn_mask, bool is_causal,
                                  int64_t causal_offset, double scale, double dropout_p,
                                  const std::optional<Tensor>& rng_state) {
  const Tensor& q = c.q;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Lk = c.k.size(2);
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  if (rotation.has_value() && rotation->defined()) {
    const Tensor& r = *rotation;
    check_same_device(op, "rotation", r, q);
    TORCH_CHECK(r.is_floating_point(), op, ": rotation must be a floating tensor; got ",
                r.scalar_type());
    // (D, D): one matrix for every head (head stride 0). Any strides: the CPU kernels read the
    // matrix through them (a transposed or column-major R, as a QR factor comes, costs no copy
    // per call); the CUDA binding makes it contiguous.
    TORCH_CHECK((r.dim() == 2 && r.size(0) == D && r.size(1) == D) ||
                    (r.dim() == 3 && r.size(0) == H && r.size(1) == D && r.size(2) == D),
                op, ": rotation must have shape (", D, ", ", D, ") or (", H, ", ", D, ", ", D,
                "); got ", shape_str(r));
    c.rotation = r.to(acc);
  }
  // (B, L) or, when one_for_all_batches, also (L,): the same rows for every batch entry
  auto bool_rows = [&](const char* name, const Tensor& m, int64_t L, bool one_for_all_batches) {
    check_same_device(op, name, m, q);
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor; got ",
                m.scalar_type());
    const bool batched = m.dim() == 2 && m.size(0) == B && m.size(1) == L;
    const bool shared = one_for_all_batches && m.dim() == 1 && m.size(0) == L;
    TORCH_CHECK(batched || shared, op, ": ", name, " must have shape ",
                one_for_all_batches ? "(" + std::to_string(L) + ",) or " : std::string(), "(",
                B, ", ", L, "); got ", shape_str(m));
    return last_dim_contiguous(m);
  };
  if (rotated_queries.has_value() && rotated_queries->defined()) {
    TORCH_CHECK(c.rotation.defined(), op, ": rotated_queries was given without a rotation");
    c.rotated_rows = bool_rows("rotated_queries", *rotated_queries, Lq, true);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined())
    c.key_padding = bool_rows("key_padding_mask", *key_padding_mask, Lk, false);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& m = *attn_mask;
    check_same_device(op, "attn_mask", m, q);
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat ||
                    m.scalar_type() == q.scalar_type(),
                op, ": attn_mask must be bool, float32 or q's dtype ", q.scalar_type(), "; got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() >= 1 && m.dim() <= 4, op,
                ": attn_mask must be broadcastable to (B, H, Lq, Lk) = (", B, ", ", H, ", ", Lq,
                ", ", Lk, "); got ", shape_str(m));
    std::vector<int64_t> shape(4 - m.dim(), 1);
    for (int64_t d = 0; d < m.dim(); ++d) shape.push_back(m.size(d));
    const int64_t want[4] = {B, H, Lq, Lk};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(shape[d] == 1 || shape[d] == want[d], op,
                  ": attn_mask must be broadcastable to (B, H, Lq, Lk) = (", B, ", ", H, ", ", Lq,
                  ", ", Lk, "); got ", shape_str(m));
    c.attn_mask = m.reshape(shape).expand({B, H, Lq, Lk});
  }
  c.is_causal = is_causal;
  TORCH_CHECK(is_causal || causal_offset == 0, op,
              ": causal_offset must be 0 when is_causal is false; got ", causal_offset);
  // Any offset >= Lk shows every key to every row and any offset <= -Lq hides every key: clamped
  // to [-Lq, Lk] the meaning is unchanged and i + offset cannot overflow in a kernel.
  c.causal_offset = std::clamp<int64_t>(causal_offset, -Lq, Lk);
  c.scale = scale;
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must lie in [0, 1); got ",
              dropout_p);
  c.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_state.has_value() && rng_state->defined(), op,
                ": dropout_p > 0 needs rng_state, an int64 CPU tensor (seed, offset)");
    const Tensor& r = *rng_state;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kLong && r.dim() == 1 &&
                    r.size(0) == 2,
                op, ": rng_state must be an int64 CPU tensor (seed, offset) of shape (2,); got ",
                r.scalar_type(), " ", shape_str(r), " on ", r.device());
    const Tensor rc = r.contiguous();
    c.seed = static_cast<uint64_t>(rc.data_ptr<int64_t>()[0]);
    c.offset = static_cast<uint64_t>(rc.data_ptr<int64_t>()[1]);
  }
}

// The smallest and largest id of a non-empty integer CPU tensor of 1 or 2 dims (any strides),
// read in place: a few nanoseconds per id, no tensor ops.
inline std::pair<int64_t, int64_t> host_id_range(const Tensor& t) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.size(t.dim() - 1);
  const int64_t row_stride = t.dim() == 2 ? t.stride(0) : 0, col_stride = t.stride(t.dim() - 1);
  auto scan = [&](auto* base) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t x = static_cast<int64_t>(base[r * row_stride + j * col_stride]);
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
  };
  switch (t.scalar_type()) {
    case at::kByte: scan(t.const_data_ptr<uint8_t>()); break;
    case at::kChar: scan(t.const_data_ptr<int8_t>()); break;
    case at::kShort: scan(t.const_data_ptr<int16_t>()); break;
    case at::kInt: scan(t.const_data_ptr<int32_t>()); break;
    case at::kLong: scan(t.const_data_ptr<int64_t>()); break;
    default: {  // the unsigned 16/32/64-bit types: read widened (a uint64 above 2^63 wraps
                // negative, which is out of range all the same)
      const Tensor wide = t.to(at::kLong);
      return host_id_range(wide);
    }
  }
  return {lo, hi};
}

// key_modality (B, Lk) or (Lk,) (the same ids for every batch entry) of any integer dtype ->
// int32, checked against M *before* narrowing: on the host when check_on_host (CPU tensors: no
// sync), else clamped on the device to [-2, M] first, so an out-of-range id can only become
// another out-of-range id, which the kernels ignore (counted nowhere), never a valid one.
inline Tensor canonical_ids(const char* op, const Tensor& q, int64_t Lk, const Tensor& km,
                            int64_t M, bool check_on_host) {
  const int64_t B = q.size(0);
  check_same_device(op, "key_modality", km, q);
  TORCH_CHECK(at::isIntegralType(km.scalar_type(), /*includeBool=*/false), op,
              ": key_modality must be an integer tensor; got ", km.scalar_type());
  TORCH_CHECK((km.dim() == 2 && km.size(0) == B && km.size(1) == Lk) ||
                  (km.dim() == 1 && km.size(0) == Lk),
              op, ": key_modality must have shape (", Lk, ",) or (", B, ", ", Lk, "); got ",
              shape_str(km));
  if (km.numel() > 0 && check_on_host) {
    const auto [lo, hi] = host_id_range(km);
    TORCH_CHECK_VALUE(lo >= -1 && hi < M, op, ": key_modality ids must lie in [-1, ", M - 1,
                      "] (num_modalities=", M, "); got values in [", lo, ", ", hi, "]");
  }
  Tensor ids = km;
  if (!check_on_host && km.scalar_type() != at::kInt) ids = km.clamp(-2, M);
  return last_dim_contiguous(ids.to(at::kInt));
}

inline void set_bhl(const Tensor& t, int64_t* b, int64_t* h, int64_t* l) {
  *b = t.stride(0);
  *h = t.stride(1);
  *l = t.stride(2);
}

// The short forms of the side inputs as full views: rotation (H, D, D), rows (B, Lq), ids (B, Lk);
// for kernels that index them by shape (the CUDA kernels).
inline void expand_side_inputs(Canonical& c) {
  const int64_t B = c.q.size(0), H = c.q.size(1);
  if (c.rotation.defined() && c.rotation.dim() == 2)
    c.rotation = c.rotation.unsqueeze(0).expand({H, c.rotation.size(0), c.rotation.size(1)});
  if (c.rotated_rows.defined() && c.rotated_rows.dim() == 1)
    c.rotated_rows = c.rotated_rows.unsqueeze(0).expand({B, c.rotated_rows.size(0)});
  if (c.key_modality.defined() && c.key_modality.dim() == 1)
    c.key_modality = c.key_modality.unsqueeze(0).expand({B, c.key_modality.size(0)});
}

// Everything of the params struct that the forward and the backward share.
inline void fill_common(AttentionParams& p, const Canonical& c) {
  const Tensor &q = c.q, &k = c.k, &v = c.v;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.value_dim = v.size(3);
  p.is_causal = c.is_causal;
  p.causal_offset = c.causal_offset;
  p.scale = c.scale;
  p.q = q.data_ptr();
  set_bhl(q, &p.q_batch_stride, &p.q_head_stride, &p.q_row_stride);
  p.k = k.data_ptr();
  set_bhl(k, &p.k_batch_stride, &p.k_head_stride, &p.k_row_stride);
  p.v = v.data_ptr();
  set_bhl(v, &p.v_batch_stride, &p.v_head_stride, &p.v_row_stride);
  // the short forms ((D, D) rotation, (Lq,) rows, (Lk,) ids) serve every head / batch entry
  if (c.rotation.defined()) {
    p.rotation = c.rotation.data_ptr();
    p.rotation_head_stride = c.rotation.dim() == 2 ? 0 : c.rotation.stride(0);
    p.rotation_row_stride = c.rotation.stride(-2);
    p.rotation_col_stride = c.rotation.stride(-1);
  }
  if (c.rotated_rows.defined()) {
    p.rotated_rows = c.rotated_rows.data_ptr<bool>();
    p.rotated_rows_batch_stride = c.rotated_rows.dim() == 1 ? 0 : c.rotated_rows.stride(0);
  }
  if (c.key_padding.defined()) {
    p.key_padding = c.key_padding.data_ptr<bool>();
    p.key_padding_batch_stride = c.key_padding.stride(0);
  }
  if (c.key_modality.defined()) {
    p.key_modality = c.key_modality.data_ptr<int32_t>();
    p.key_modality_batch_stride = c.key_modality.dim() == 1 ? 0 : c.key_modality.stride(0);
  }
  if (c.attn_mask.defined()) {
    const Tensor& m = c.attn_mask;
    p.attn_mask = m.data_ptr();
    p.attn_mask_kind = m.scalar_type() == at::kBool    ? AttentionParams::kMaskBool
                       : m.scalar_type() == at::kFloat ? AttentionParams::kMaskFloat32
                                                       : AttentionParams::kMaskInput;
    p.mask_batch_stride = m.stride(0);
    p.mask_head_stride = m.stride(1);
    p.mask_row_stride = m.stride(2);
    p.mask_col_stride = m.stride(3);
  }
  if (c.dropout_p > 0.0) {
    p.dropout_p = c.dropout_p;
    const double t = std::floor(c.dropout_p * 4294967296.0);
    p.dropout_threshold = static_cast<uint32_t>(std::min(t, 4294967295.0));
    p.dropout_seed = c.seed;
    p.dropout_offset = c.offset;
  }
  p.num_modalities = static_cast<int>(c.num_modalities);
}

// Forward outputs in the contract's layout.
struct ForwardOutputs {
  Tensor out, lse, modality_mass, key_sum, key_count;
};

inline ForwardOutputs allocate_forward(const Canonical& c) {
  const Tensor& q = c.q;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Dv = c.v.size(3), M = c.num_modalities;
  const auto acc = q.options().dtype(accumulation_type(q.scalar_type()));
  ForwardOutputs o;
  o.out = layout_like(q, {B, H, Lq, Dv}, q.scalar_type(), c.k.size(2) <= kHugePageDepth);
  o.lse = at::empty({B, H, Lq}, acc);
  o.modality_mass = at::empty({B, H, Lq, M}, acc);
  o.key_sum = at::empty({B, H, M, D}, acc);
  o.key_count = at::empty({B, M}, acc);
  if (H == 0 && M > 0 && B > 0) {
    // No head attends, so no kernel runs, but key_count (B, M) counts the keys all the same.
    // (Ids outside [0, M), left by the device-side clamp, count nowhere.)
    const Tensor ids = c.key_modality.to(at::kLong).expand({B, c.k.size(2)});
    Tensor counted = ids.ge(0).logical_and(ids.lt(M));
    if (c.key_padding.defined()) counted = counted.logical_and(c.key_padding);
    o.key_count.zero_().scatter_add_(1, ids.clamp(0, M - 1), counted.to(o.key_count.scalar_type()));
  }
  return o;
}

inline void set_outputs(AttentionParams& p, const ForwardOutputs& o) {
  p.out = o.out.data_ptr();
  set_bhl(o.out, &p.out_batch_stride, &p.out_head_stride, &p.out_row_stride);
  p.lse = o.lse.data_ptr();
  if (p.num_modalities > 0) {
    p.modality_mass = o.modality_mass.data_ptr();
    p.key_sum = o.key_sum.data_ptr();
    p.key_count = o.key_count.data_ptr();
  }
}

// The forward's arguments, checked. `check_ids_on_host`: range-check ids with a host read (CPU).
inline Canonical canonicalize_forward(
    const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
    const std::optional<Tensor>& rotation, const std::optional<Tensor>& rotated_queries,
    const std::optional<Tensor>& key_modality, int64_t num_modalities,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& attn_mask,
    bool is_causal, int64_t causal_offset, double scale, double dropout_p,
    const std::optional<Tensor>& rng_state, bool check_ids_on_host) {
  check_qkv(op, q, k, v);
  Canonical c;
  c.q = q;
  c.k = k;
  c.v = v;
  TORCH_CHECK(num_modalities >= 0 && num_modalities <= std::numeric_limits<int32_t>::max(), op,
              ": num_modalities must lie in [0, 2^31 - 1]; got ", num_modalities);
  c.num_modalities = num_modalities;
  canonical_side_inputs(op, c, rotation, rotated_queries, key_padding_mask, attn_mask, is_causal,
                        causal_offset, scale, dropout_p, rng_state);
  if (num_modalities > 0) {
    TORCH_CHECK(key_modality.has_value() && key_modality->defined(), op,
                ": key_modality (B, Lk) or (Lk,) is required when num_modalities > 0; got None");
    c.key_modality =
        canonical_ids(op, q, k.size(2), *key_modality, num_modalities, check_ids_on_host);
  }
  return c;
}

// The backward's arguments, checked (grad_out and out like the forward's output, lse like its lse).
inline Canonical canonicalize_backward(
    const char* op, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& attn_mask, bool is_causal, int64_t causal_offset, double scale,
    double dropout_p, const std::optional<Tensor>& rng_state) {
  check_qkv(op, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Dv = v.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out},
                                {"out", &out}}) {
    check_same_device(op, name, *t, q);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                q.scalar_type(), "; got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == Lq &&
                    t->size(3) == Dv,
                op, ": ", name, " must have shape (", B, ", ", H, ", ", Lq, ", ", Dv, "); got ",
                shape_str(*t));
  }
  check_same_device(op, "lse", lse, q);
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc, op, ": lse must have dtype ", acc,
              " (the forward's lse); got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq, op,
              ": lse must have shape (", B, ", ", H, ", ", Lq, "); got ", shape_str(lse));
  Canonical c;
  c.q = q;
  c.k = k;
  c.v = v;
  canonical_side_inputs(op, c, rotation, rotated_queries, key_padding_mask, attn_mask, is_causal,
                        causal_offset, scale, dropout_p, rng_state);
  return c;
}

// A gradient buffer laid out like its input (the contract's rule for grad_q / grad_k / grad_v).
inline Tensor grad_like(const Tensor& t, bool huge_pages) {
  return layout_like(t, t.sizes(), t.scalar_type(), huge_pages);
}

// The backward's gradients, laid out like their inputs (q, k, v as the op received them).
struct Gradients {
  Tensor dq, dk, dv;
};

// Fill every field of the backward's params from checked arguments (fill_common, grad_out and out
// as the caller made them readable for its kernels, lse) and allocate the gradients.
inline Gradients prepare_backward(AttentionBwdParams& p, const Canonical& c, const Tensor& q,
                                  const Tensor& k, const Tensor& v, const Tensor& dout,
                                  const Tensor& out, const Tensor& lse) {
  const bool few_keys = k.size(2) <= kHugePageDepth, few_queries = q.size(2) <= kHugePageDepth;
  Gradients g{grad_like(q, few_keys), grad_like(k, few_queries), grad_like(v, few_queries)};
  fill_common(p, c);
  p.out = const_cast<void*>(out.data_ptr());
  set_bhl(out, &p.out_batch_stride, &p.out_head_stride, &p.out_row_stride);
  p.lse = const_cast<void*>(lse.data_ptr());
  p.dout = dout.data_ptr();
  set_bhl(dout, &p.dout_batch_stride, &p.dout_head_stride, &p.dout_row_stride);
  p.dq = g.dq.data_ptr();
  set_bhl(g.dq, &p.dq_batch_stride, &p.dq_head_stride, &p.dq_row_stride);
  p.dk = g.dk.data_ptr();
  set_bhl(g.dk, &p.dk_batch_stride, &p.dk_head_stride, &p.dk_row_stride);
  p.dv = g.dv.data_ptr();
  set_bhl(g.dv, &p.dv_batch_stride, &p.dv_head_stride, &p.dv_row_stride);
  return g;
}

// Fill every field of the forward's params from checked arguments, with the outputs allocated in
// the contract's layout.
inline ForwardOutputs prepare_forward(AttentionParams& p, const Canonical& c) {
  ForwardOutputs o = allocate_forward(c);
  fill_common(p, c);
  set_outputs(p, o);
  return o;
}

}  // namespace rollingq
