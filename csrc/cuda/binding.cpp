// Torch binding of the CUDA kernels: registers the CUDA implementation of the rollingq op family
// (schema, fake implementation and autograd: rollingq_kernels/op_contract.py). Argument checks,
// side-input canonicalisation, output layout and the params struct come from the canonicalisation
// shared with the CPU binding (csrc/binding_common.h); this file adds what the CUDA kernels need
// on top (unit last strides, contiguous side inputs, workspaces) and launches on the current
// stream.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding_common.h"
#include "launch.h"
#include "params_fill.h"

namespace rollingq {
namespace {

ScalarKind scalar_kind(const char* op, const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": q must be float32, float16 or bfloat16; got ", q.scalar_type());
  }
  return ScalarKind::kFloat32;
}

// What the CUDA kernels read: rows with unit stride, side inputs contiguous.
void prepare_for_kernels(const char* op, Canonical& c) {
  TORCH_CHECK(c.q.is_cuda(), op, ": q must be a CUDA tensor; got one on ", c.q.device());
  // contract arguments these kernels do not implement: an error, never a wrong answer
  TORCH_CHECK_NOT_IMPLEMENTED(!c.attn_mask.defined(), op,
                              ": attn_mask is not implemented by the CUDA kernels");
  TORCH_CHECK_NOT_IMPLEMENTED(c.causal_offset == 0, op, ": causal_offset ", c.causal_offset,
                              " is not implemented by the CUDA kernels");
  TORCH_CHECK_NOT_IMPLEMENTED(c.dropout_p == 0.0, op,
                              ": dropout is not implemented by the CUDA kernels");
  TORCH_CHECK_NOT_IMPLEMENTED(c.k.size(1) == c.q.size(1), op,
                              ": grouped-query attention is not implemented by the CUDA kernels");
  c.q = last_dim_contiguous(c.q);
  c.k = last_dim_contiguous(c.k);
  c.v = last_dim_contiguous(c.v);
  expand_side_inputs(c);  // the kernels index rotation, rows and ids by shape
  for (Tensor* t : {&c.rotation, &c.rotated_rows, &c.key_modality, &c.key_padding})
    if (t->defined()) *t = t->contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_modality,
    int64_t num_modalities, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& attn_mask, bool is_causal, int64_t causal_offset, double scale,
    double dropout_p, const std::optional<Tensor>& rng_state) {
  constexpr const char* op = "rollingq::attention_fwd (CUDA)";
  Canonical c = canonicalize_forward(op, q, k, v, rotation, rotated_queries, key_modality,
                                     num_modalities, key_padding_mask, attn_mask, is_causal,
                                     causal_offset, scale, dropout_p, rng_state,
                                     /*check_ids_on_host=*/false);
  const ScalarKind kind = scalar_kind(op, c.q);
  const c10::cuda::CUDAGuard guard(c.q.device());
  prepare_for_kernels(op, c);
  AttentionParams p;
  const ForwardOutputs o = prepare_forward(p, c);
  // the key codes of the tensor-core path (B x key tiles x 80 or 48 bytes; none without padding
  // and statistics): from the caching allocator, on the op's stream
  const size_t ws_bytes = forward_workspace_bytes(p, kind);
  Tensor workspace;
  if (ws_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, c.q.options().dtype(at::kByte));
  const char* err = run_attention_fwd(p, kind, c10::cuda::getCurrentCUDAStream().stream(),
                                      ws_bytes > 0 ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(err == nullptr, op, ": ", err);
  return {o.out, o.lse, o.modality_mass, o.key_sum, o.key_count};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& attn_mask, bool is_causal, int64_t causal_offset, double scale,
    double dropout_p, const std::optional<Tensor>& rng_state) {
  constexpr const char* op = "rollingq::attention_bwd (CUDA)";
  Canonical c = canonicalize_backward(op, grad_out, q, k, v, out, lse, rotation, rotated_queries,
                                      key_padding_mask, attn_mask, is_causal, causal_offset,
                                      scale, dropout_p, rng_state);
  const ScalarKind kind = scalar_kind(op, c.q);
  const c10::cuda::CUDAGuard guard(c.q.device());
  prepare_for_kernels(op, c);
  const Tensor dout = last_dim_contiguous(grad_out), out_r = last_dim_contiguous(out);
  const Tensor lse_c = lse.contiguous();
  const int64_t B = c.q.size(0), H = c.q.size(1), Lq = c.q.size(2), D = c.q.size(3);
  const auto f32 = c.q.options().dtype(at::kFloat);
  Tensor delta = at::empty({B, H, Lq}, f32);

  AttentionBwdParams p;
  const Gradients g = prepare_backward(p, c, q, k, v, dout, out_r, lse_c);
  p.num_modalities = 0;
  p.delta = delta.data_ptr();
  // q_rot workspace: the generic kernels keep every row of R q in float32; the tensor-core path
  // keeps the rotated q in the input dtype, and needs none without a rotation
  Tensor q_rot;
  if (choose_backward_path(p, kind) == BwdPath::kGeneric)
    q_rot = at::empty({B, H, Lq, D}, f32);
  else if (c.rotation.defined())
    q_rot = at::empty({B, H, Lq, D}, c.q.options());
  p.q_rot = q_rot.defined() ? q_rot.data_ptr() : nullptr;
  const char* err = run_attention_bwd(p, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err);
  return {g.dq, g.dk, g.dv};
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
