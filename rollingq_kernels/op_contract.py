"""The op contract every compiled backend implements: one schema, one fake, one autograd formula.

Two op families share the schema below:

* ``rollingq::attention_fwd`` / ``attention_bwd``: the C++ extension implements them for CPU
  tensors (``csrc/ops.cpp``), the CUDA extension for CUDA tensors (``csrc/cuda/binding.cpp``);
* ``rollingq::triton_attention_fwd`` / ``triton_attention_bwd``: the Triton kernels
  (``triton_attention.py``), for CUDA tensors (and CPU tensors under Triton's interpreter).

This module defines the schemas (the C++ libraries only register implementations), registers
one fake implementation for torch.compile / torch.export and one autograd formula per family,
and turns an :class:`~rollingq_kernels.backends.AttentionProblem` into the op's arguments. Adding
an argument to the op means changing: the schema strings here, ``AttentionProblem`` and its
``op_args``, the C++ canonicalisation (``csrc/binding_common.h``) and params struct
(``csrc/rollingq_params.h``), and the kernels that implement it (docs/design.md lists them).

Output layout: ``out`` and ``grad_q`` follow q's memory layout, ``grad_k`` / ``grad_v`` follow
k's / v's (see :func:`layout_like`); the statistics are contiguous.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from ._stats import AttentionStats, accumulation_dtype
from .dropout import dropout_keep_mask
from .reference import visibility_mask

__all__ = [
    "FWD_SCHEMA",
    "BWD_SCHEMA",
    "OpFamily",
    "family",
    "layout_like",
    "run_forward",
]

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? rotation, Tensor? rotated_queries, "
    "Tensor? key_modality, int num_modalities, Tensor? key_padding_mask, Tensor? attn_mask, "
    "bool is_causal, int causal_offset, float scale, float dropout_p, Tensor? rng_state) "
    "-> (Tensor out, Tensor lse, Tensor modality_mass, Tensor key_sum, Tensor key_count)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? rotation, "
    "Tensor? rotated_queries, Tensor? key_padding_mask, Tensor? attn_mask, bool is_causal, "
    "int causal_offset, float scale, float dropout_p, Tensor? rng_state) "
    "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)"
)
# positions of the forward's arguments (the autograd formula reads them by name through these)
_FWD_ARGS = (
    "q k v rotation rotated_queries key_modality num_modalities key_padding_mask attn_mask "
    "is_causal causal_offset scale dropout_p rng_state"
).split()
_ARG = {name: i for i, name in enumerate(_FWD_ARGS)}


def layout_like(t: torch.Tensor, shape: Sequence[int], dtype: Optional[torch.dtype] = None):
    """An empty tensor of ``shape`` (4-D, same leading dims as t) laid out like ``t``: its first
    three dims ordered by t's strides (largest first, ties in natural order), the last dim
    contiguous. A t with a broadcast (stride-0) dim gives a contiguous result. The C++ bindings
    apply the same rule (``csrc/binding_common.h``)."""
    dtype = t.dtype if dtype is None else dtype
    strides = t.stride()
    if any(s == 0 and n > 1 for s, n in zip(strides, t.shape)):
        order = [0, 1, 2]
    else:
        order = sorted(range(3), key=lambda d: (-strides[d], d))
    order.append(3)
    permuted = t.new_empty([shape[d] for d in order], dtype=dtype)
    inverse = [order.index(d) for d in range(4)]
    return permuted.permute(inverse)


def _fake_forward(q, k, v, rotation, rotated_queries, key_modality, num_modalities,
                  key_padding_mask, attn_mask, is_causal, causal_offset, scale, dropout_p,
                  rng_state):  # fmt: skip
    B, H, Lq, D = q.shape
    acc = accumulation_dtype(q.dtype)
    M = num_modalities
    return (
        layout_like(q, (B, H, Lq, v.shape[3])),
        q.new_empty((B, H, Lq), dtype=acc),
        q.new_empty((B, H, Lq, M), dtype=acc),
        q.new_empty((B, H, M, D), dtype=acc),
        q.new_empty((B, M), dtype=acc),
    )


def _fake_backward(grad_out, q, k, v, out, lse, rotation, rotated_queries, key_padding_mask,
                   attn_mask, is_causal, causal_offset, scale, dropout_p, rng_state):  # fmt: skip
    return (
        layout_like(q, q.shape),
        layout_like(k, k.shape),
        layout_like(v, v.shape),
    )


class OpFamily(NamedTuple):
    """The forward and backward ops of one family, as ``torch.ops`` overload packets."""

    name: str
    forward: Callable
    backward: Callable


_LIB = torch.library.Library("rollingq", "FRAGMENT")
_FAMILIES: Dict[str, OpFamily] = {}


def _row_mask(rows):
    # rows bool (L,) or (B, L) -> broadcastable to (B, H, L, 1)
    return rows[:, None, :, None] if rows.dim() == 2 else rows[None, None, :, None]


def _rotate_rows(q, rotation, rows):
    # q (B, H, L, D), rotation (D, D) or (H, D, D), rows None or bool (L,) / (B, L):
    # q_i <- R q_i on the rows
    rotated = torch.matmul(q.to(rotation.dtype), rotation.transpose(-1, -2).unsqueeze(0))
    if rows is not None:
        rotated = torch.where(_row_mask(rows), rotated, q.to(rotation.dtype))
    return rotated.to(q.dtype)


def _save_for_backward(ctx, inputs, output) -> None:
    """The forward's part of the autograd formula: what the backward needs, from the op's
    arguments (in schema order) and outputs."""
    out, lse = output[0], output[1]
    a = _ARG  # positions in schema order, read directly (this runs on every call with gradients)
    ctx.save_for_backward(
        inputs[a["q"]], inputs[a["k"]], inputs[a["v"]], out, lse, inputs[a["rotation"]],
        inputs[a["rotated_queries"]], inputs[a["key_padding_mask"]], inputs[a["attn_mask"]],
        inputs[a["rng_state"]],
    )  # fmt: skip
    ctx.flags = (
        inputs[a["is_causal"]], inputs[a["causal_offset"]], inputs[a["scale"]],
        inputs[a["dropout_p"]],
    )  # fmt: skip
    # lse and the statistics carry no gradient
    ctx.mark_non_differentiable(*output[1:])


def _input_grads(fam: OpFamily, ctx, grad_out, needs, backward_op: Callable) -> list:
    """The backward's part: the gradients of the forward's arguments (schema order; None where
    there is none). ``needs``: needs_input_grad in schema order; ``backward_op``: the family's
    backward op as the caller wants it run (through autograd, or below it)."""
    if torch._C._is_any_autocast_enabled():
        # a backward run inside torch.autocast: the rotation's products stay in float32
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _input_grads(fam, ctx, grad_out, needs, backward_op)
    q, k, v, out, lse, rotation, rows, pad, mask, rng = ctx.saved_tensors
    if torch.is_grad_enabled():
        # a graph of the gradients: out and lse are functions of q, k and v, through which the
        # backward op's own gradient (a double backward) is taken whole, so no edge of that graph
        # leads back to this op through them (it would run this backward again, on zeros)
        out, lse = out.detach(), lse.detach()
    is_causal, offset, scale, dropout_p = ctx.flags
    if needs[_ARG["attn_mask"]]:
        raise RuntimeError(
            f"rollingq::{fam.name}attention_fwd: the gradient with respect to attn_mask is not "
            "implemented by this op; use backend='reference' for a float mask that requires grad"
        )
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    rotation_grad = rotation is not None and needs[_ARG["rotation"]]
    if not rotation_grad:
        dq, dk, dv = backward_op(
            grad_out, q, k, v, out, lse, rotation, rows, pad, mask, is_causal, offset,
            scale, dropout_p, rng,
        )  # fmt: skip
        drot = None
    else:
        # dR needs the gradient of the rotated query: run the op on q_rot with no rotation,
        # then dq = dq_rot R on rotated rows (q_rot = q R^T) and dR = sum_i dq_rot_i^T q_i.
        # (through the rotation itself when a graph of the gradients is built: a double backward
        # reaches R through q_rot as well as through the products below)
        q_rot = _rotate_rows(q, rotation if torch.is_grad_enabled() else rotation.detach(), rows)
        dq_rot, dk, dv = backward_op(
            grad_out, q_rot, k, v, out, lse, None, None, pad, mask, is_causal, offset,
            scale, dropout_p, rng,
        )  # fmt: skip
        acc = rotation.dtype
        g = dq_rot.to(acc)
        if rows is not None:
            g = torch.where(_row_mask(rows), g, torch.zeros_like(g))
        # one (D, D) matrix shared by every head gathers the gradient of all heads
        drot = torch.einsum(
            "bhla,bhlc->hac" if rotation.dim() == 3 else "bhla,bhlc->ac", g, q.to(acc)
        )
        back = torch.matmul(g, rotation)
        dq = torch.where(_row_mask(rows), back, dq_rot.to(acc)) if rows is not None else back
        dq = dq.to(q.dtype)
    grads = [None] * len(_FWD_ARGS)
    grads[_ARG["q"]], grads[_ARG["k"]], grads[_ARG["v"]] = dq, dk, dv
    grads[_ARG["rotation"]] = drot
    return grads


# positions of the backward op's arguments
_BWD_ARGS = (
    "grad_out q k v out lse rotation rotated_queries key_padding_mask attn_mask is_causal "
    "causal_offset scale dropout_p rng_state"
).split()


def _save_backward_inputs(ctx, args) -> None:
    """What the backward op's own gradient (a double backward) needs: its arguments but the
    forward's out and lse, which it recomputes."""
    (grad_out, q, k, v, _out, _lse, rotation, rows, pad, mask, is_causal, offset, scale,
     dropout_p, rng) = args  # fmt: skip
    ctx.save_for_backward(grad_out, q, k, v, rotation, rows, pad, mask, rng)
    ctx.flags = (is_causal, offset, scale, dropout_p)
    # an output the caller did not use (dk of torch.autograd.grad(out, q)) gets None, not zeros:
    # the second order then leaves out its products
    ctx.set_materialize_grads(False)


def _materialised_attention(q, k, v, rotation, rows, pad, mask, is_causal, offset, scale,
                            dropout_p, rng):  # fmt: skip
    """softmax(q k^T * scale + mask) v with the scores materialised, in the accumulation dtype:
    the op's forward as plain differentiable torch operations, for its second order. Rows that
    see no key give zeros (and zero gradients), as the op's; the reference (the oracle, which
    the tests compare this with) spells out more of the non-finite cases and costs more."""
    acc = accumulation_dtype(q.dtype)  # the caller passes the rotation in this dtype
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qf = q.to(acc)
    if rotation is not None:
        qf = _rotate_rows(qf, rotation, rows)
    kf, vf = k.to(acc), v.to(acc)
    if Hkv != H:  # grouped-query attention: query head h reads kv head h // (H / Hkv)
        kf, vf = kf.repeat_interleave(H // Hkv, 1), vf.repeat_interleave(H // Hkv, 1)
    s = torch.matmul(qf * scale, kf.transpose(-1, -2))  # scaled on the (Lq, D) side
    hidden = None
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = ~mask
        else:
            s = s + mask.to(acc)
    if pad is not None or is_causal:
        visible = visibility_mask(B, Lq, Lk, key_padding_mask=pad, is_causal=is_causal,
                                  causal_offset=offset, device=q.device)  # fmt: skip
        hidden = ~visible if hidden is None else hidden | ~visible
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    if hidden is not None or mask is not None:
        # a row that sees no key (hidden keys, -inf mask entries) gives zeros, not softmax's NaN
        empty = s.amax(-1, keepdim=True) == float("-inf")
        p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(s, -1)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng, dropout_p, (B, H, Lq, Lk), device=q.device)
        p = p * keep.to(acc) / (1.0 - dropout_p)
    return torch.matmul(p, vf).to(q.dtype)


def _second_order(ctx, grad_dq, grad_dk, grad_dv) -> list:
    """The gradient of the backward op (schema order): a double backward, e.g. a gradient
    penalty or a Hessian-vector product.

    The backward op maps (grad_out, q, k, v) to (dq, dk, dv); its out and lse arguments are
    functions of q, k, v, so the whole derivative is taken through q, k, v and none through them.
    The first-order gradients that received a cotangent are recomputed from the saved inputs by
    the materialised attention (the same masks, the same dropout keep-mask) with a graph, and
    differentiated again for the inputs that need it: exact, itself differentiable (third and
    higher orders), and through torch.func inside its transforms. That step materialises the
    (B, H, Lq, Lk) scores, as torch's math SDPA does: a second order costs O(Lq * Lk) memory, the
    first order stays O(L)."""
    if torch._C._is_any_autocast_enabled():
        # a backward run inside torch.autocast: the arithmetic stays in the accumulation dtype,
        # as the kernels' and the reference's
        with torch.autocast(ctx.saved_tensors[1].device.type, enabled=False):
            return _second_order(ctx, grad_dq, grad_dk, grad_dv)
    grad_out, q, k, v, rotation, rows, pad, mask, rng = ctx.saved_tensors
    is_causal, offset, scale, dropout_p = ctx.flags
    if rotation is not None:  # the op's own rotation never requires grad (_input_grads)
        rotation = rotation.detach().to(accumulation_dtype(q.dtype))
    if mask is not None:
        mask = mask.detach()
    none = [None] * (len(_BWD_ARGS) - 4)
    cotangents = (grad_dq, grad_dk, grad_dv)

    def attention(q, k, v):
        return _materialised_attention(q, k, v, rotation, rows, pad, mask, is_causal, offset,
                                       scale, dropout_p, rng)  # fmt: skip

    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        # a graph of these gradients (a third order), or torch.func's transforms: the functional
        # form, whose inputs stay the caller's tensors without their history being walked here

        def first_order(g, q, k, v):
            return torch.func.vjp(attention, q, k, v)[1](g)

        filled = tuple(
            torch.zeros_like(t) if c is None else c for c, t in zip(cotangents, (q, k, v))
        )
        return [*torch.func.vjp(first_order, grad_out, q, k, v)[1](filled)] + none
    # the common case: fresh leaves, and only the products these cotangents and inputs need
    needs = ctx.needs_input_grad[:4]
    with torch.enable_grad():
        go, qq, kk, vv = (t.detach().requires_grad_() for t in (grad_out, q, k, v))
        given = [(t, c) for t, c in zip((qq, kk, vv), cotangents) if c is not None]
        wanted = [t for t, need in zip((go, qq, kk, vv), needs) if need]
        if not given or not wanted:
            return [None] * 4 + none
        out = attention(qq, kk, vv)
        first = torch.autograd.grad(out, [t for t, _ in given], go, create_graph=True)
        grads = iter(torch.autograd.grad(first, wanted, [c for _, c in given], allow_unused=True))
    return [next(grads) if need else None for need in needs] + none


def _register_autograd(fam: OpFamily) -> None:
    fwd_name = f"rollingq::{fam.name}attention_fwd"
    bwd_name = f"rollingq::{fam.name}attention_bwd"

    def backward(ctx, grad_out, *_grad_stats):
        return tuple(_input_grads(fam, ctx, grad_out, ctx.needs_input_grad, fam.backward))

    torch.library.register_autograd(fwd_name, backward, setup_context=_save_for_backward, lib=_LIB)

    def double_backward(ctx, grad_dq, grad_dk, grad_dv):
        return tuple(_second_order(ctx, grad_dq, grad_dk, grad_dv))

    def bwd_setup(ctx, inputs, output):
        _save_backward_inputs(ctx, inputs)

    torch.library.register_autograd(bwd_name, double_backward, setup_context=bwd_setup, lib=_LIB)


# torch.func.vmap. The op's batch dim B takes the vmapped dim too: each tensor argument is moved
# to (N, B, ...) (N = the vmap's size; a tensor the vmap does not batch is broadcast, a short form
# shared by every batch entry stays as it is) and folded into (N * B, ...), the op runs once, and
# every output is unfolded to (N, B, ...). Broadcast (stride 0) dims of the mask stay broadcast, so
# a (1, 1, L, L) mask is not materialised per head. What cannot fold runs once per vmapped entry:
# a rotation that differs per entry (it has no batch dim), a dropout state that differs per entry,
# and dropout under randomness="same" (a folded call would give each entry its own mask).

# per op argument (schema order): None = not a tensor; True = the tensor's dim 0 is the op's B;
# False = a tensor without B (rotation), which must not be batched to fold; "short" = the
# (L,) / (B, L) forms of rotated_queries and key_modality, whose 1-D form is shared by all
_FWD_FOLD = (True, True, True, False, "short", "short", None, True, True, None, None, None, None,
             False)  # fmt: skip
_BWD_FOLD = (True, True, True, True, True, True, False, "short", True, True, None, None, None,
             None, False)  # fmt: skip


def _fold(x, bdim, kind, n: int, b: int):
    """x (a vmap rule's physical argument, batched at bdim or not) with the vmapped dim folded
    into the op's batch dim: (N * B, ...)."""
    if x is None or kind is None:
        return x
    if bdim is None and (kind is False or (kind == "short" and x.dim() == 1)):
        return x  # not batched, and read the same way by every batch entry
    if bdim is None:
        x = x.unsqueeze(0).expand(n, *x.shape)
    else:
        x = x.movedim(bdim, 0)
        if kind == "short" and x.dim() == 2:  # (N, L): one set of rows per vmapped entry
            x = x.unsqueeze(1).expand(n, b, x.shape[1])
    full = x.shape[2:]
    broadcast = [d for d in range(2, x.dim()) if x.stride(d) == 0 and x.shape[d] > 1]
    for d in broadcast:
        x = x.narrow(d, 0, 1)
    # a view where the strides allow it, else one copy (of the non-broadcast part only)
    x = x.reshape(n * b, *x.shape[2:])
    return x.expand(n * b, *full) if broadcast else x


def _vmap_rule(op, kinds, batch_arg: int, dropout_arg: int):
    def rule(info, in_dims, *args):
        n = info.batch_size
        if any(d is not None and kind is False for d, kind in zip(in_dims, kinds)) or (
            args[dropout_arg] > 0 and info.randomness == "same"
        ):
            # once per vmapped entry, the entry's slice of every batched argument
            per_entry = [
                op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(n)
            ]
            outputs = tuple(torch.stack(o) for o in zip(*per_entry))
            return outputs, (0,) * len(outputs)
        ref, bdim = args[batch_arg], in_dims[batch_arg]
        b = ref.shape[0] if bdim is None else ref.movedim(bdim, 0).shape[1]
        folded = [_fold(a, d, kind, n, b) for a, d, kind in zip(args, in_dims, kinds)]
        outputs = op(*folded)
        return tuple(o.unflatten(0, (n, b)) for o in outputs), (0,) * len(outputs)

    return rule


def family(name: str = "") -> OpFamily:
    """Define (once) and return the op family ``rollingq::{name}attention_fwd / _bwd``."""
    fam = _FAMILIES.get(name)
    if fam is not None:
        return fam
    fwd, bwd = f"{name}attention_fwd", f"{name}attention_bwd"
    _LIB.define(fwd + FWD_SCHEMA)
    _LIB.define(bwd + BWD_SCHEMA)
    torch.library.register_fake(f"rollingq::{fwd}", _fake_forward, lib=_LIB)
    torch.library.register_fake(f"rollingq::{bwd}", _fake_backward, lib=_LIB)
    fam = OpFamily(name, getattr(torch.ops.rollingq, fwd), getattr(torch.ops.rollingq, bwd))
    _register_autograd(fam)
    dropout = _FWD_ARGS.index("dropout_p")
    torch.library.register_vmap(
        f"rollingq::{fwd}", _vmap_rule(fam.forward, _FWD_FOLD, 0, dropout), lib=_LIB
    )
    torch.library.register_vmap(
        f"rollingq::{bwd}", _vmap_rule(fam.backward, _BWD_FOLD, 1, dropout + 1), lib=_LIB
    )
    _FAMILIES[name] = fam
    return fam


def _below_autograd(op, direct: Optional[Callable], args) -> Tuple[torch.Tensor, ...]:
    """``op`` (an overload packet) on args below autograd: through the library's direct entry
    where there is one and it takes the arguments, else through torch.ops."""
    outputs = NotImplemented if direct is None else direct(*args)
    if outputs is NotImplemented:
        with torch._C._AutoDispatchBelowAutograd():
            outputs = op.default(*args)
    return outputs


class _EagerAttention(torch.autograd.Function):
    """The op's autograd formula for the eager calls that need a gradient and that the library's
    C++ node (``_C.attention_fwd_autograd``) declines: a rotation or float mask that requires
    grad, torch.func transforms, tensor subclasses, torch function modes, a library without it.

    The same formula as the one registered on the op (``_save_for_backward``, ``_input_grads``),
    without the generic Python layer torch.library puts in front of it: that layer refills the
    schema's defaults argument by argument on every call, about 50 us for this 14-argument schema,
    several times the cost of the rest of a small call. The forward runs the op below autograd
    (through the library's direct entry where there is one), the backward runs the backward op
    below autograd (likewise) unless the caller asked for a graph of the gradients (create_graph),
    where it runs through the backward op's own formula (``_second_order``).

    Forward and context are separate (``setup_context``) and the vmap rule is generated, so that
    torch.func's transforms take it: ``grad`` / ``vjp`` run this formula, ``vmap`` of it runs the
    op's and the backward op's vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fam, direct, direct_backward, *args):
        return _below_autograd(fam.forward, direct, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fam, _direct, direct_backward, *args = inputs
        _save_for_backward(ctx, args, output)
        ctx.fam, ctx.direct_backward = fam, direct_backward

    @staticmethod
    def jvp(ctx, *tangents):
        # the registry declines a call with tangents for these backends; a direct call gets this
        raise RuntimeError(
            f"rollingq::{ctx.fam.name}attention_fwd: forward-mode AD (torch.func.jvp, jacfwd, "
            "hessian, torch.autograd.forward_ad) is not supported by the fused kernels; use "
            "backend='reference'"
        )

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        fam, direct = ctx.fam, ctx.direct_backward
        if torch._C._are_functorch_transforms_active():
            # torch.func computes gradients with a graph; the formula torch.library registered on
            # the backward op is not one its transforms accept, so this one carries the same
            # second order

            def op(*a):
                return _BackwardOnce.apply(fam, direct, *a)

        elif torch.is_grad_enabled():
            op = fam.backward
        else:

            def op(*a):
                return _below_autograd(fam.backward, direct, a)

        grads = _input_grads(fam, ctx, grad_out, ctx.needs_input_grad[3:], op)
        return (None, None, None, *grads)


class _BackwardOnce(torch.autograd.Function):
    """The backward op inside a torch.func transform: runs it below autograd, with the op's own
    second-order formula (``_second_order``) as its gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fam, direct, *args):
        return _below_autograd(fam.backward, direct, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_backward_inputs(ctx, inputs[2:])

    @staticmethod
    def backward(ctx, grad_dq, grad_dk, grad_dv):
        return (None, None, *_second_order(ctx, grad_dq, grad_dk, grad_dv))


def run_forward(
    fam: OpFamily,
    problem,
    direct: Optional[Callable] = None,
    direct_backward: Optional[Callable] = None,
    direct_autograd: Optional[Callable] = None,
) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """One forward call of ``fam`` for a validated problem: (out, stats or None).

    ``direct`` / ``direct_backward``: the compiled library's entries that call ``fam.forward`` /
    ``fam.backward`` below autograd without the boxed torch.ops path (fused_op.direct_entry,
    fused_op.direct_backward_entry); ``direct_autograd``: its entry that runs the same formula as
    _EagerAttention in a C++ autograd node (fused_op.direct_autograd_entry). Each returns
    NotImplemented for arguments it leaves to the Python path."""
    args = problem.op_args()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # traced: the op itself goes into the graph, with or without gradients (torch.jit.trace
        # checks that a second trace, run without them, records the same graph)
        outputs = fam.forward(*args)
    elif problem.needs_grad():
        outputs = NotImplemented if direct_autograd is None else direct_autograd(*args)
        if outputs is NotImplemented:
            outputs = _EagerAttention.apply(fam, direct, direct_backward, *args)
    else:
        # nothing to differentiate: skip the (Python) autograd layer of the op, the largest part
        # of the per-call cost of a small problem
        outputs = _below_autograd(fam.forward, direct, args)
    out, lse, mass, key_sum, key_count = outputs
    if not problem.return_stats:
        return out, None
    return out, AttentionStats(mass, key_sum, key_count, lse)


# The two families of this package, defined at import so that the compiled libraries can register
# their implementations against them.
COMPILED = family("")
TRITON = family("triton_")
