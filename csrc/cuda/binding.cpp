// Torch binding of the CUDA kernels: checks the tensors, fills the params struct, launches on
// the current stream, and registers the CUDA implementation of the rollingq ops (the schema is
// defined once, with TORCH_LIBRARY, by the CPU extension's csrc/ops.cpp).
//
// Inputs arrive canonicalised by rollingq_kernels/api.py (make_problem); the checks here guard
// the C++ entry point itself (torch.ops.rollingq.* can be called directly) and name the argument.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "launch.h"
#include "params_fill.h"

namespace rollingq {
namespace {

using at::Tensor;
using c10::optional;

TensorDesc describe(const Tensor& t) {
  TensorDesc d;
  d.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) {
    d.sizes[i] = t.size(i);
    d.strides[i] = t.stride(i);
  }
  return d;
}

// The kernels read rows with unit stride; any other layout of the leading dims is read in place.
Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

ScalarKind scalar_kind(const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "rollingq CUDA: q must be float32, float16 or bfloat16; got ",
                  q.scalar_type());
  }
  return ScalarKind::kFloat32;
}

void check_on_device(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "rollingq CUDA: ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "rollingq CUDA: q must be a CUDA tensor; got one on ", q.device());
  TORCH_CHECK(q.dim() == 4, "rollingq CUDA: q must have shape (B, H, Lq, D); got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              "rollingq CUDA: k must have shape (", q.size(0), ", ", q.size(1), ", Lk, ",
              q.size(3), "); got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) &&
                  v.size(2) == k.size(2),
              "rollingq CUDA: v must have shape (", q.size(0), ", ", q.size(1), ", ", k.size(2),
              ", Dv); got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "rollingq CUDA: q, k and v must share a dtype; got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  check_on_device("k", k, q);
  check_on_device("v", v, q);
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, "rollingq CUDA: head dims must be positive");
}

// Optional per-row / per-key side inputs and the rotation, checked and made contiguous.
struct SideInputs {
  Tensor rotation, rotated_rows, key_modality, key_padding;
};

SideInputs check_side_inputs(const Tensor& q, int64_t Lk, const optional<Tensor>& rotation,
                             const optional<Tensor>& rotated_queries,
                             const optional<Tensor>& key_modality,
                             const optional<Tensor>& key_padding_mask) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  SideInputs s;
  if (rotation.has_value() && rotation->defined()) {
    const Tensor& r = *rotation;
    check_on_device("rotation", r, q);
    TORCH_CHECK(r.dim() == 3 && r.size(0) == H && r.size(1) == D && r.size(2) == D,
                "rollingq CUDA: rotation must have shape (", H, ", ", D, ", ", D, "); got ",
                r.sizes());
    s.rotation = r.to(at::kFloat).contiguous();
  }
  if (rotated_queries.has_value() && rotated_queries->defined()) {
    const Tensor& r = *rotated_queries;
    TORCH_CHECK(s.rotation.defined(), "rollingq CUDA: rotated_queries given without rotation");
    check_on_device("rotated_queries", r, q);
    TORCH_CHECK(r.scalar_type() == at::kBool && r.dim() == 2 && r.size(0) == B && r.size(1) == Lq,
                "rollingq CUDA: rotated_queries must be bool (", B, ", ", Lq, "); got ",
                r.scalar_type(), " ", r.sizes());
    s.rotated_rows = r.contiguous();
  }
  if (key_modality.has_value() && key_modality->defined()) {
    const Tensor& m = *key_modality;
    check_on_device("key_modality", m, q);
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                "rollingq CUDA: key_modality must have shape (", B, ", ", Lk, "); got ",
                m.sizes());
    TORCH_CHECK(!m.is_floating_point() && m.scalar_type() != at::kBool,
                "rollingq CUDA: key_modality must be an integer tensor; got ", m.scalar_type());
    s.key_modality = m.to(at::kInt).contiguous();
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const Tensor& m = *key_padding_mask;
    check_on_device("key_padding_mask", m, q);
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                "rollingq CUDA: key_padding_mask must be bool (", B, ", ", Lk, "); got ",
                m.scalar_type(), " ", m.sizes());
    s.key_padding = m.contiguous();
  }
  return s;
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void set_side_inputs(AttentionParams* p, const SideInputs& s) {
  p->rotation = s.rotation.defined() ? s.rotation.data_ptr() : nullptr;
  p->rotated_rows = ptr_or_null<bool>(s.rotated_rows);
  p->key_modality = ptr_or_null<int32_t>(s.key_modality);
  p->key_padding = ptr_or_null<bool>(s.key_padding);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const optional<Tensor>& rotation,
    const optional<Tensor>& rotated_queries, const optional<Tensor>& key_modality,
    int64_t num_modalities, const optional<Tensor>& key_padding_mask, bool is_causal,
    double scale) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ScalarKind kind = scalar_kind(q_in);
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(num_modalities >= 0, "rollingq CUDA: num_modalities must be >= 0; got ",
              num_modalities);
  const SideInputs side =
      check_side_inputs(q, Lk, rotation, rotated_queries, key_modality, key_padding_mask);
  TORCH_CHECK(num_modalities == 0 || side.key_modality.defined(),
              "rollingq CUDA: key_modality is required when num_modalities > 0");
  const int64_t M = num_modalities;

  const auto f32 = q.options().dtype(at::kFloat);
  Tensor out = at::empty({B, H, Lq, Dv}, q.options());
  Tensor lse = at::empty({B, H, Lq}, f32);
  Tensor mass = at::empty({B, H, Lq, M}, f32);
  Tensor key_sum = at::empty({B, H, M, D}, f32);
  Tensor key_count = at::empty({B, M}, f32);

  AttentionParams p;
  fill_forward_params(&p, describe(q), describe(k), describe(v), describe(out), scale, is_causal);
  set_side_inputs(&p, side);
  p.num_modalities = static_cast<int>(M);
  p.lse = lse.data_ptr();
  p.modality_mass = M > 0 ? mass.data_ptr() : nullptr;
  p.key_sum = M > 0 ? key_sum.data_ptr() : nullptr;
  p.key_count = M > 0 ? key_count.data_ptr() : nullptr;
  // key codes of the tensor-core path (a few bytes per key; the caching allocator makes it cheap)
  const size_t ws_bytes = forward_workspace_bytes(p, kind);
  Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const char* err = run_attention_fwd(p, kind, c10::cuda::getCurrentCUDAStream().stream(),
                                      ws_bytes > 0 ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(err == nullptr, "rollingq attention_fwd (CUDA): ", err);
  return {out, lse, mass, key_sum, key_count};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const optional<Tensor>& rotation,
    const optional<Tensor>& rotated_queries, const optional<Tensor>& key_padding_mask,
    bool is_causal, double scale) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ScalarKind kind = scalar_kind(q_in);
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(2), Dv = v.size(3);
  for (const auto& named : {std::make_pair("grad_out", &grad_out_in), std::make_pair("out", &out_in)}) {
    const Tensor& t = *named.second;
    check_on_device(named.first, t, q);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == Lq &&
                    t.size(3) == Dv,
                "rollingq CUDA: ", named.first, " must have shape (", B, ", ", H, ", ", Lq, ", ",
                Dv, "); got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "rollingq CUDA: ", named.first,
                " must have q's dtype ", q.scalar_type(), "; got ", t.scalar_type());
  }
  check_on_device("lse", lse_in, q);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B &&
                  lse_in.size(1) == H && lse_in.size(2) == Lq,
              "rollingq CUDA: lse must be float32 (", B, ", ", H, ", ", Lq, "); got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const Tensor grad_out = unit_last_stride(grad_out_in), out = unit_last_stride(out_in);
  const Tensor lse = lse_in.contiguous();
  const SideInputs side =
      check_side_inputs(q, Lk, rotation, rotated_queries, c10::nullopt, key_padding_mask);

  Tensor dq = at::empty({B, H, Lq, D}, q.options());
  Tensor dk = at::empty({B, H, Lk, D}, q.options());
  Tensor dv = at::empty({B, H, Lk, Dv}, q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor delta = at::empty({B, H, Lq}, f32);
  Tensor q_rot = at::empty({B, H, Lq, D}, f32);

  AttentionBwdParams p;
  fill_forward_params(&p, describe(q), describe(k), describe(v), describe(out), scale, is_causal);
  fill_backward_params(&p, describe(grad_out), describe(dq), describe(dk), describe(dv));
  set_side_inputs(&p, side);
  p.num_modalities = 0;
  p.lse = const_cast<void*>(static_cast<const void*>(lse.data_ptr()));
  p.delta = delta.data_ptr();
  p.q_rot = q_rot.data_ptr();
  const char* err = run_attention_bwd(p, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "rollingq attention_bwd (CUDA): ", err);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace rollingq

TORCH_LIBRARY_IMPL(rollingq, CUDA, m) {
  m.impl("attention_fwd", &rollingq::attention_fwd_cuda);
  m.impl("attention_bwd", &rollingq::attention_bwd_cuda);
}

// A Python module, so that `import rollingq_kernels._C_cuda` loads the library (and with it the
// registrations above). It defines no Python functions: the ops are reached via torch.ops. Plain
// Python C API rather than pybind11 keeps this file quick to compile.
#define RQ_CONCAT_IMPL(a, b) a##b
#define RQ_CONCAT(a, b) RQ_CONCAT_IMPL(a, b)
#define RQ_STRING_IMPL(x) #x
#define RQ_STRING(x) RQ_STRING_IMPL(x)

PyMODINIT_FUNC RQ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, RQ_STRING(TORCH_EXTENSION_NAME),
      "rollingq CUDA kernels (registered as torch.ops.rollingq.* for CUDA tensors)", -1,
      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
