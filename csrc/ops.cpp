// The CPU implementation of the rollingq op family: the schema, the fake implementation and the
// autograd formula are defined once in rollingq_kernels/op_contract.py; this file registers the
// CPU kernels of csrc/cpu/ for it. Argument checks, side-input canonicalisation, output layout and
// the params struct come from the canonicalisation shared with the CUDA binding
// (binding_common.h).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <tuple>

#include "binding_common.h"
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

cpu::ElementType element_type(const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return cpu::ElementType::kFloat32;
    case at::kDouble:
      return cpu::ElementType::kFloat64;
    case at::kBFloat16:
      return cpu::ElementType::kBFloat16;
    case at::kHalf:
      return cpu::ElementType::kFloat16;
    default:
      TORCH_CHECK(false, "rollingq::attention (CPU): q has dtype ", q.scalar_type(),
                  "; supported: float32, float64, bfloat16, float16");
  }
}

// The kernels read rows through BLAS: the last dim must be contiguous and rows must not overlap.
// Anything else (and only that) is copied.
Tensor rows_readable(const Tensor& t) {
  const bool last_ok = t.size(3) <= 1 || t.stride(3) == 1;
  const bool rows_ok = t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return last_ok && rows_ok ? t : t.contiguous();
}

void check_cpu(const char* op, const Canonical& c) {
  TORCH_CHECK(c.q.device().is_cpu(), op, ": q is on ", c.q.device(), "; this is the CPU kernel");
  element_type(c.q);
  // BLAS takes 32-bit sizes and leading dimensions
  for (const Tensor* t : {&c.q, &c.k, &c.v})
    TORCH_CHECK(t->size(2) < (int64_t(1) << 31) && t->size(3) < (int64_t(1) << 31) &&
                    t->stride(2) < (int64_t(1) << 31),
                op, ": sequence length, head dim and row stride must be < 2^31; got ",
                shape_str(*t));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_modality,
    int64_t num_modalities, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& attn_mask, bool is_causal, int64_t causal_offset, double scale,
    double dropout_p, const std::optional<Tensor>& rng_state) {
  constexpr const char* op = "rollingq::attention_fwd (CPU)";
  Canonical c = canonicalize_forward(op, q, k, v, rotation, rotated_queries, key_modality,
                                     num_modalities, key_padding_mask, attn_mask, is_causal,
                                     causal_offset, scale, dropout_p, rng_state,
                                     /*check_ids_on_host=*/true);
  check_cpu(op, c);
  c.q = rows_readable(c.q);
  c.k = rows_readable(c.k);
  c.v = rows_readable(c.v);
  AttentionParams p;
  const ForwardOutputs o = prepare_forward(p, c);
  // H = 0: no kernel runs (allocate_forward has counted the keys)
  if (c.q.size(0) * c.q.size(1) > 0) cpu::attention_fwd(p, element_type(c.q));
  return {o.out, o.lse, o.modality_mass, o.key_sum, o.key_count};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const std::optional<Tensor>& rotation,
    const std::optional<Tensor>& rotated_queries, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& attn_mask, bool is_causal, int64_t causal_offset, double scale,
    double dropout_p, const std::optional<Tensor>& rng_state) {
  constexpr const char* op = "rollingq::attention_bwd (CPU)";
  Canonical c = canonicalize_backward(op, grad_out, q, k, v, out, lse, rotation, rotated_queries,
                                      key_padding_mask, attn_mask, is_causal, causal_offset,
                                      scale, dropout_p, rng_state);
  check_cpu(op, c);
  c.q = rows_readable(c.q);
  c.k = rows_readable(c.k);
  c.v = rows_readable(c.v);
  const Tensor dout = grad_out.contiguous(), out_r = rows_readable(out), lse_c = lse.contiguous();
  AttentionBwdParams p;
  const Gradients g = prepare_backward(p, c, q, k, v, dout, out_r, lse_c);
  if (c.q.size(0) * c.q.size(1) > 0) cpu::attention_bwd(p, element_type(c.q));
  return {g.dq, g.dk, g.dv};
}

}  // namespace
}  // namespace rollingq

// The schema is defined by rollingq_kernels/op_contract.py (imported before this library is
// loaded); the dispatcher checks these functions against it when they are registered.
TORCH_LIBRARY_IMPL(rollingq, CPU, m) {
  m.impl("attention_fwd", &rollingq::attention_fwd_cpu);
  m.impl("attention_bwd", &rollingq::attention_bwd_cpu);
}
