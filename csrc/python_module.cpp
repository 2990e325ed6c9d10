// The Python module of rollingq_kernels._C: direct entries to rollingq::attention_fwd and
// rollingq::attention_bwd below autograd, for calls that autograd will not differentiate and for
// the package's Python autograd formula (op_contract._EagerAttention), which runs both ops itself;
// and `attention_fwd_autograd`, the same formula as a C++ autograd node (EagerAttention) for the
// eager calls that need the gradients of q, k and v only.
//
// Calling an op through torch.ops converts every argument to an IValue against the schema and
// back again through the generic (boxed) path; for a small problem that costs more than the
// kernel. `attention_fwd_below_autograd` takes the op's arguments in schema order
// (op_contract.FWD_SCHEMA), calls the op through the dispatcher's typed handle below the autograd
// keys (the same as `torch._C._AutoDispatchBelowAutograd` around the op in Python: dispatch
// modes, fake tensors and the CPU / CUDA registrations all apply as before), with the GIL
// released, and returns the op's five outputs. `attention_bwd_below_autograd` does the same for
// the backward op (op_contract.BWD_SCHEMA) and returns its three gradients.
//
// It declines, returning NotImplemented, whatever the boxed path would treat differently: a
// tensor subclass (other than nn.Parameter), an active torch function mode, or an argument of an
// unexpected Python type. The caller then calls the op through torch.ops.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <tuple>
#include <utility>

#include "binding_common.h"

namespace rollingq {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, const OptTensor&, const OptTensor&, bool, int64_t, double, double,
    const OptTensor&);
constexpr Py_ssize_t kForwardArgs = 14;
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, int64_t, double,
    double, const OptTensor&);
constexpr Py_ssize_t kBackwardArgs = 15;

// Each reader returns false for an argument the boxed path should handle.
bool read_tensor(PyObject* o, Tensor* t) {
  if (!THPVariable_CheckExact(o)) return false;
  *t = THPVariable_Unpack(o);
  return true;
}

bool read_optional(PyObject* o, OptTensor* t) {
  if (o == Py_None) return true;
  if (!THPVariable_CheckExact(o)) return false;
  *t = THPVariable_Unpack(o);
  return true;
}

bool read_int(PyObject* o, int64_t* x) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  *x = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(*x == -1 && PyErr_Occurred());
}

bool read_bool(PyObject* o, bool* x) {
  if (!PyBool_Check(o)) return false;
  *x = o == Py_True;
  return true;
}

bool read_float(PyObject* o, double* x) {
  if (!PyFloat_CheckExact(o)) return false;
  *x = PyFloat_AS_DOUBLE(o);
  return true;
}

// The GIL is released for the op and taken back on every way out (exceptions included).
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// False, with a TypeError set, unless the entry of rollingq::<op> got the op's `want` arguments.
bool arity_ok(const char* op, Py_ssize_t want, Py_ssize_t got) {
  if (got == want) return true;
  PyErr_Format(PyExc_TypeError, "%s_below_autograd takes the %zd arguments of rollingq::%s; got %zd",
               op, want, op, got);
  return false;
}

// The op's outputs as a Python tuple of tensors.
template <typename... Ts>
PyObject* wrap_tuple(std::tuple<Ts...> outputs) {
  PyObject* result = PyTuple_New(sizeof...(Ts));
  if (result == nullptr) return nullptr;
  std::apply(
      [&](auto&... t) {
        Py_ssize_t i = 0;
        (PyTuple_SET_ITEM(result, i++, THPVariable_Wrap(std::move(t))), ...);
      },
      outputs);
  return result;
}

// The forward op's arguments in schema order, as the typed call takes them.
struct ForwardArgs {
  Tensor q, k, v;
  OptTensor rotation, rows, ids, pad, mask, rng;
  int64_t num_modalities = 0, causal_offset = 0;
  bool is_causal = false;
  double scale = 0.0, dropout_p = 0.0;
  // False (no Python error left set) for an argument the boxed path should handle.
  bool read(PyObject* const* args) {
    const bool ok = read_tensor(args[0], &q) && read_tensor(args[1], &k) &&
                    read_tensor(args[2], &v) && read_optional(args[3], &rotation) &&
                    read_optional(args[4], &rows) && read_optional(args[5], &ids) &&
                    read_int(args[6], &num_modalities) && read_optional(args[7], &pad) &&
                    read_optional(args[8], &mask) && read_bool(args[9], &is_causal) &&
                    read_int(args[10], &causal_offset) && read_float(args[11], &scale) &&
                    read_float(args[12], &dropout_p) && read_optional(args[13], &rng);
    if (!ok) PyErr_Clear();
    return ok;
  }
};

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rollingq::attention_fwd", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rollingq::attention_bwd", "")
                             .typed<BackwardSignature>();
  return op;
}

PyObject* attention_fwd_below_autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!arity_ok("attention_fwd", kForwardArgs, nargs)) return nullptr;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  ForwardArgs a;
  if (!a.read(args)) Py_RETURN_NOTIMPLEMENTED;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  {
    ReleaseGil unlocked;
    at::AutoDispatchBelowAutograd below_autograd;
    out = forward_op().call(a.q, a.k, a.v, a.rotation, a.rows, a.ids, a.num_modalities, a.pad,
                            a.mask, a.is_causal, a.causal_offset, a.scale, a.dropout_p, a.rng);
  }
  return wrap_tuple(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* attention_bwd_below_autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!arity_ok("attention_bwd", kBackwardArgs, nargs)) return nullptr;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  Tensor grad_out, q, k, v, out, lse;
  OptTensor rotation, rows, pad, mask, rng;
  int64_t causal_offset = 0;
  bool is_causal = false;
  double scale = 0.0, dropout_p = 0.0;
  const bool read = read_tensor(args[0], &grad_out) && read_tensor(args[1], &q) &&
                    read_tensor(args[2], &k) && read_tensor(args[3], &v) &&
                    read_tensor(args[4], &out) && read_tensor(args[5], &lse) &&
                    read_optional(args[6], &rotation) && read_optional(args[7], &rows) &&
                    read_optional(args[8], &pad) && read_optional(args[9], &mask) &&
                    read_bool(args[10], &is_causal) && read_int(args[11], &causal_offset) &&
                    read_float(args[12], &scale) && read_float(args[13], &dropout_p) &&
                    read_optional(args[14], &rng);
  if (!read) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  std::tuple<Tensor, Tensor, Tensor> grads;
  {
    ReleaseGil unlocked;
    at::AutoDispatchBelowAutograd below_autograd;
    grads = backward_op().call(grad_out, q, k, v, out, lse, rotation, rows, pad, mask, is_causal,
                               causal_offset, scale, dropout_p, rng);
  }
  return wrap_tuple(std::move(grads));
  END_HANDLE_TH_ERRORS
}

OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

}  // namespace

// The op's autograd formula (op_contract._save_for_backward / _input_grads) as a C++ node, for
// eager calls that need gradients of q, k and v only: the forward op below autograd, q, k, v, the
// output, lse and the side inputs saved, the statistics marked non-differentiable; the backward op
// below autograd, or through autograd where the caller asked for a graph of the gradients
// (create_graph; the backward op's own formula is then the second order). The Python
// autograd.Function it replaces cost about 13 us a call more (bench/overhead_bench.py).
struct EagerAttention : torch::autograd::Function<EagerAttention> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
      const OptTensor& rotation, const OptTensor& rows, const OptTensor& ids,
      int64_t num_modalities, const OptTensor& pad, const OptTensor& mask, bool is_causal,
      int64_t causal_offset, double scale, double dropout_p, const OptTensor& rng) {
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
    {
      at::AutoDispatchBelowAutograd below_autograd;
      out = forward_op().call(q, k, v, rotation, rows, ids, num_modalities, pad, mask, is_causal,
                              causal_offset, scale, dropout_p, rng);
    }
    auto& [o, lse, mass, key_sum, key_count] = out;
    const Tensor none;
    ctx->save_for_backward({q, k, v, o, lse, rotation.value_or(none), rows.value_or(none),
                            pad.value_or(none), mask.value_or(none), rng.value_or(none)});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["causal_offset"] = causal_offset;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({lse, mass, key_sum, key_count});
    return {o, lse, mass, key_sum, key_count};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    // under GradMode the output and lse go in detached: the backward op's own gradient (a double
    // backward) is taken through q, k and v whole, and an edge back to this node would run it
    // again on zeros; below autograd no edge is recorded, so they go in as saved
    const bool graph = at::GradMode::is_enabled();
    const auto call = [&] {
      return backward_op().call(grad_outputs[0], s[0], s[1], s[2], graph ? s[3].detach() : s[3],
                                graph ? s[4].detach() : s[4], present(s[5]),
                                present(s[6]), present(s[7]), present(s[8]),
                                d.at("is_causal").toBool(), d.at("causal_offset").toInt(),
                                d.at("scale").toDouble(), d.at("dropout_p").toDouble(),
                                present(s[9]));
    };
    std::tuple<Tensor, Tensor, Tensor> grads;
    if (graph) {
      grads = call();
    } else {
      at::AutoDispatchBelowAutograd below_autograd;
      grads = call();
    }
    torch::autograd::variable_list result(kForwardArgs);
    std::tie(result[0], result[1], result[2]) = std::move(grads);
    return result;
  }
};

namespace {

// attention_fwd_autograd(*args): the forward op's five outputs, differentiable in q, k, v through
// EagerAttention; NotImplemented where the Python formula must run instead: the cases of
// attention_fwd_below_autograd, a rotation or attn_mask that requires grad (their gradients and
// errors are the Python formula's), and inside a functorch transform (torch.func), whose levels
// only the Python formula's functorch form (setup_context, a vmap rule) takes part in.
PyObject* attention_fwd_autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!arity_ok("attention_fwd", kForwardArgs, nargs)) return nullptr;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  // a functorch transform is active while its front key is included in this thread's key set
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    Py_RETURN_NOTIMPLEMENTED;
  ForwardArgs a;
  if (!a.read(args)) Py_RETURN_NOTIMPLEMENTED;
  if ((a.rotation && a.rotation->requires_grad()) || (a.mask && a.mask->requires_grad()))
    Py_RETURN_NOTIMPLEMENTED;
  torch::autograd::variable_list out;
  {
    ReleaseGil unlocked;
    out = EagerAttention::apply(a.q, a.k, a.v, a.rotation, a.rows, a.ids, a.num_modalities, a.pad,
                                a.mask, a.is_causal, a.causal_offset, a.scale, a.dropout_p, a.rng);
  }
  return wrap_tuple(std::make_tuple(std::move(out[0]), std::move(out[1]), std::move(out[2]),
                                    std::move(out[3]), std::move(out[4])));
  END_HANDLE_TH_ERRORS
}

// key_modality_range(ids) -> (min, max): the ids of a non-empty integer CPU tensor of 1 or 2 dims,
// read in place by the same scan as the op's own check (rolling_attention's id check on CPU tensors,
// where torch.aminmax and two host reads cost several microseconds).
PyObject* key_modality_range(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 1 || !THPVariable_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "key_modality_range takes one tensor");
    return nullptr;
  }
  const Tensor& ids = THPVariable_Unpack(args[0]);
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.numel() > 0 && (ids.dim() == 1 || ids.dim() == 2) &&
                        at::isIntegralType(ids.scalar_type(), /*includeBool=*/false),
                    "key_modality_range: expected a non-empty integer CPU tensor of 1 or 2 dims; "
                    "got ",
                    ids.scalar_type(), " ", shape_str(ids), " on ", ids.device());
  const auto [lo, hi] = host_id_range(ids);
  return Py_BuildValue("(LL)", static_cast<long long>(lo), static_cast<long long>(hi));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attention_fwd_below_autograd",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_fwd_below_autograd)),
     METH_FASTCALL,
     "rollingq::attention_fwd(*args) below autograd, or NotImplemented for arguments the "
     "torch.ops path must handle (tensor subclasses, torch function modes)."},
    {"attention_fwd_autograd",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_fwd_autograd)),
     METH_FASTCALL,
     "rollingq::attention_fwd(*args) with a C++ autograd node for the gradients of q, k and v, or "
     "NotImplemented where the Python formula must run (see the source)."},
    {"attention_bwd_below_autograd",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_bwd_below_autograd)),
     METH_FASTCALL,
     "rollingq::attention_bwd(*args) below autograd, or NotImplemented for arguments the "
     "torch.ops path must handle (tensor subclasses, torch function modes)."},
    {"key_modality_range",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&key_modality_range)),
     METH_FASTCALL,
     "(min, max) of a non-empty integer CPU tensor of 1 or 2 dims, read in place."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                          "rollingq_kernels._C",
                          "rollingq CPU kernels (registered as torch.ops.rollingq.* for CPU "
                          "tensors) and direct entries to the forward and backward ops",
                          -1,
                          methods,
                          nullptr,
                          nullptr,
                          nullptr,
                          nullptr};

}  // namespace
}  // namespace rollingq

#define ROLLINGQ_CONCAT_IMPL(a, b) a##b
#define ROLLINGQ_CONCAT(a, b) ROLLINGQ_CONCAT_IMPL(a, b)

PyMODINIT_FUNC ROLLINGQ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&rollingq::module_def);
}
