// The rollingq op schema (one for every device) and its CPU implementation: checks the
// arguments, allocates the outputs, fills the plain params struct and calls the kernels in
// csrc/cpu/. The CUDA implementation registers against the same schema in its own library.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <tuple>

#include "cpu/attention_cpu.h"
#include "rollingq_params.h"

#define ROLLINGQ_STR2(x) #x
#define ROLLINGQ_STR(x) ROLLINGQ_STR2(x)

// The torch version this library was compiled against, found by rollingq_kernels/fused_op.py in
// the file itself before the library is loaded (a library built for another torch may not even
// load, and must not register its ops into this one).
extern "C" __attribute__((used, visibility("default"))) const char rollingq_build_info[] =
    "rollingq-torch-version=" ROLLINGQ_STR(TORCH_VERSION_MAJOR) "." ROLLINGQ_STR(
        TORCH_VERSION_MINOR) "." ROLLINGQ_STR(TORCH_VERSION_PATCH) ";";

namespace rollingq {
namespace {

using at::Tensor;

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

cpu::ElementType element_type(const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return cpu::ElementType::kFloat32;
    case at::kDouble:
      return cpu::ElementType::kFloat64;
    case at::kBFloat16:
      return cpu::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "rollingq::attention (CPU): q has dtype ", q.scalar_type(),
                  "; supported: float32, float64, bfloat16");
  }
}

// The kernels read rows through BLAS: the last dim must be contiguous and rows must not overlap.
// Anything else (and only that) is copied.
Tensor rows_readable(const Tensor& t) {
  const bool last_ok = t.size(3) <= 1 || t.stride(3) == 1;
  const bool rows_ok = t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return last_ok && rows_ok ? t : t.contiguous();
}

void check_4d(const char* name, const Tensor& t, const at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 4, "rollingq::attention: ", name, " must be 4-D (B, H, L, D); got ",
              shape_str(t));
  TORCH_CHECK(t.device().is_cpu(), "rollingq::attention (CPU): ", name, " is on ", t.device(),
              "; wanted cpu");
  TORCH_CHECK(t.scalar_type() == dtype, "rollingq::attention: ", name, " has dtype ",
              t.scalar_type(), " but q has ", dtype, "; they must match");
}

Tensor canonical_rotation(const std::optional<Tensor>& rotation, int64_t H, int64_t D,
                          at::ScalarType acc) {
  if (!rotation.has_value()) return Tensor();
  const Tensor& r = *rotation;
  TORCH_CHECK(r.device().is_cpu(), "rollingq::attention (CPU): rotation is on ", r.device(),
              "; wanted cpu");
  if (r.dim() == 2 && r.size(0) == D && r.size(1) == D)
    return r.to(acc).unsqueeze(0).expand({H, D, D}).contiguous();
  TORCH_CHECK(r.dim() == 3 && r.size(0) == H && r.size(1) == D && r.size(2) == D,
              "rollingq::attention: rotation must have shape (", D, ", ", D, ") or (", H, ", ", D,
              ", ", D, "); got ", shape_str(r));
  return r.to(acc).contiguous();
}

Tensor canonical_mask(const char* name, const std::optional<Tensor>& mask, int64_t B, int64_t L) {
  if (!mask.has_value()) return Tensor();
  const Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), "rollingq::attention (CPU): ", name, " is on ", m.device(),
              "; wanted cpu");
  TORCH_CHECK(m.scalar_type() == at::kBool, "rollingq::attention: ", name,
              " must be a bool tensor; got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "rollingq::attention: ", name,
              " must have shape (", B, ", ", L, "); got ", shape_str(m));
  return m.contiguous();
}

void set_common(AttentionParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                const Tensor& rot, const Tensor& rows, const Tensor& pad, bool is_causal,
                double scale) {
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.value_dim = v.size(3);
  p.is_causal = is_causal;
  p.scale = scale;
  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.q_row_stride = q.stride(2);
  p.k = k.data_ptr();
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.v = v.data_ptr();
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.v_row_stride = v.stride(2);
  p.rotation = rot.defined() ? rot.data_ptr() : nullptr;
  p.rotated_rows = rows.defined() ? rows.data_ptr<bool>() : nullptr;
  p.key_padding = pad.defined() ? pad.data_ptr<bool>() : nullptr;
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_4d("q", q, q.scalar_type());
  check_4d("k", k, q.scalar_type());
  check_4d("v", v, q.scalar_type());
  element_type(q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "rollingq::attention: k must have shape (", q.size(0), ", ", q.size(1), ", Lk, ",
              q.size(3), ") to match q ", shape_str(q), "; got ", shape_str(k));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "rollingq::attention: v must have shape (", k.size(0), ", ", k.size(1), ", ",
              k.size(2), ", Dv) to match k ", shape_str(k), "; got ", shape_str(v));
  // BLAS takes 32-bit sizes and leading dimensions
  for (const Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(2) < (int64_t(1) << 31) && t->size(3) < (int64_t(1) << 31) &&
                    t->stride(2) < (int64_t(1) << 31),
                "rollingq::attention (CPU): sequence length, head dim and row stride must be < "
                "2^31; got ", shape_str(*t));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const std::optional<Tensor>& rotation, const std::optional<Tensor>& rotated_queries,
    const std::optional<Tensor>& key_modality, int64_t num_modalities,
    const std::optional<Tensor>& key_padding_mask, bool is_causal, double scale) {
  check_qkv(q_in, k_in, v_in);
  const Tensor q = rows_readable(q_in), k = rows_readable(k_in), v = rows_readable(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  const int64_t D = q.size(3), Dv = v.size(3);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(num_modalities >= 0, "rollingq::attention: num_modalities must be >= 0; got ",
              num_modalities);
  const Tensor rot = canonical_rotation(rotation, H, D, acc);
  const Tensor rows = canonical_mask("rotated_queries", rotated_queries, B, Lq);
  TORCH_CHECK(!rows.defined() || rot.defined(),
              "rollingq::attention: rotated_queries was given without a rotation");
  const Tensor pad = canonical_mask("key_padding_mask", key_padding_mask, B, Lk);
  const int64_t M = num_modalities;
  Tensor ids;
  if (M > 0) {
    TORCH_CHECK(key_modality.has_value(), "rollingq::attention: key_modality (B, Lk) is ",
                "required when num_modalities > 0; got None");
    const Tensor& km = *key_modality;
    TORCH_CHECK(km.device().is_cpu() && !km.is_floating_point() && km.scalar_type() != at::kBool,
                "rollingq::attention (CPU): key_modality must be an integer cpu tensor; got ",
                km.scalar_type(), " on ", km.device());
    TORCH_CHECK(km.dim() == 2 && km.size(0) == B && km.size(1) == Lk,
                "rollingq::attention: key_modality must have shape (", B, ", ", Lk, "); got ",
                shape_str(km));
    ids = km.to(at::kInt).contiguous();
    if (ids.numel() > 0) {
      const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
      TORCH_CHECK(lo >= -1 && hi < M, "rollingq::attention: key_modality ids must lie in [-1, ",
                  M - 1, "] (num_modalities=", M, "); got values in [", lo, ", ", hi, "]");
    }
  }

  const auto opts = q.options();
  Tensor out = at::empty({B, H, Lq, Dv}, opts);
  Tensor lse = at::empty({B, H, Lq}, opts.dtype(acc));
  Tensor mass = at::empty({B, H, Lq, M}, opts.dtype(acc));
  Tensor key_sum = at::empty({B, H, M, D}, opts.dtype(acc));
  Tensor key_count = at::empty({B, M}, opts.dtype(acc));

  AttentionParams p;
  set_common(p, q, k, v, rot, rows, pad, is_causal, scale);
  p.num_modalities = static_cast<int>(M);
  p.key_modality = ids.defined() ? ids.data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.out_row_stride = out.stride(2);
  p.lse = lse.data_ptr();
  p.modality_mass = mass.data_ptr();
  p.key_sum = key_sum.data_ptr();
  p.key_count = key_count.data_ptr();
  if (B * H > 0)
    cpu::attention_fwd(p, element_type(q));
  else
    key_count.zero_();  // H = 0 with B > 0: no key is counted anywhere
  return {out, lse, mass, key_sum, key_count};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_padding_mask,
    bool is_causal, double scale) {
  check_qkv(q_in, k_in, v_in);
  const Tensor q = rows_readable(q_in), k = rows_readable(k_in), v = rows_readable(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  const int64_t D = q.size(3), Dv = v.size(3);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out_in},
                                {"out", &out_in}}) {
    check_4d(name, *t, q.scalar_type());
    TORCH_CHECK(t->size(0) == B && t->size(1) == H && t->size(2) == Lq && t->size(3) == Dv,
                "rollingq::attention_bwd: ", name, " must have shape (", B, ", ", H, ", ", Lq,
                ", ", Dv, "); got ", shape_str(*t));
  }
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Lq,
              "rollingq::attention_bwd: lse must have shape (", B, ", ", H, ", ", Lq, "); got ",
              shape_str(lse_in));
  const Tensor grad_out = grad_out_in.contiguous(), out = rows_readable(out_in);
  const Tensor lse = lse_in.to(acc).contiguous();
  const Tensor rot = canonical_rotation(rotation, H, D, acc);
  const Tensor rows = canonical_mask("rotated_queries", rotated_queries, B, Lq);
  const Tensor pad = canonical_mask("key_padding_mask", key_padding_mask, B, Lk);

  Tensor dq = at::empty({B, H, Lq, D}, q.options());
  Tensor dk = at::empty({B, H, Lk, D}, q.options());
  Tensor dv = at::empty({B, H, Lk, Dv}, q.options());
  AttentionBwdParams p;
  set_common(p, q, k, v, rot, rows, pad, is_causal, scale);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.out_row_stride = out.stride(2);
  p.lse = const_cast<void*>(lse.data_ptr());
  p.dout = grad_out.data_ptr();
  p.dout_batch_stride = grad_out.stride(0);
  p.dout_head_stride = grad_out.stride(1);
  p.dout_row_stride = grad_out.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = dq.stride(0);
  p.dq_head_stride = dq.stride(1);
  p.dq_row_stride = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = dk.stride(0);
  p.dk_head_stride = dk.stride(1);
  p.dk_row_stride = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = dv.stride(0);
  p.dv_head_stride = dv.stride(1);
  p.dv_row_stride = dv.stride(2);
  if (B * H > 0) cpu::attention_bwd(p, element_type(q));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace rollingq

TORCH_LIBRARY(rollingq, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rotation, Tensor? rotated_queries, "
      "Tensor? key_modality, int num_modalities, Tensor? key_padding_mask, bool is_causal, "
      "float scale) -> (Tensor out, Tensor lse, Tensor modality_mass, Tensor key_sum, "
      "Tensor key_count)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? rotation, Tensor? rotated_queries, Tensor? key_padding_mask, bool is_causal, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(rollingq, CPU, m) {
  m.impl("attention_fwd", &rollingq::attention_fwd_cpu);
  m.impl("attention_bwd", &rollingq::attention_bwd_cpu);
}
