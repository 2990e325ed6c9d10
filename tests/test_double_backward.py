"""Gradients of gradients through the fused backends: a double backward (gradient penalties,
Hessian-vector products, MAML's inner step), torch.func's reverse-over-reverse transforms, and
third order.

The fused forward and first backward run the kernels; the second order is the backward op's own
formula (the reference's first-order gradients differentiated again). Every check compares with
torch.autograd through the float64 reference on fresh random inputs with odd sizes,
non-contiguous layouts and NaN-poisoned outputs.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import CountKernelCalls, assert_close, make_case, nan_poisoned_outputs

import rollingq_kernels as rk
from rollingq_kernels import rolling_attention, rolling_attention_reference
from rollingq_kernels.backends import backend_status

pytestmark = pytest.mark.skipif(
    backend_status().get("cpu") != [], reason="the cpu backend is not built"
)

# float32: the first order comes from the kernels in float32, the second from the reference's
# float32 arithmetic; both are compared with float64
REL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


CASES = {
    "plain_lq1": dict(B=2, H=3, Lq=1, Lk=9, D=8),
    "rotation_subset_strided": dict(
        B=2, H=2, Lq=7, Lk=13, D=12, rotation="shared", rows="subset", layout="strided"
    ),
    "rotation_per_head_batch_rows_blhd": dict(
        B=2, H=3, Lq=9, Lk=11, D=8, rotation="per_head", rows="batch", layout="blhd"
    ),
    "padding_modalities_causal_lq_gt_lk": dict(
        B=3, H=2, Lq=13, Lk=7, D=8, modalities=2, padding=True, causal=True
    ),
    "dv_ne_d_scale": dict(B=1, H=2, Lq=5, Lk=29, D=8, Dv=12, scale=0.3, layout="blhd"),
}  # fmt: skip

EXTRAS = [
    "none", "float_mask_gqa", "float_mask_with_a_hidden_row", "bool_mask", "dropout_gqa",
    "causal_lower_right",
]  # fmt: skip
PARAMS = [
    (name, extra)
    for name in CASES
    for extra in EXTRAS
    if not (extra == "causal_lower_right" and CASES[name].get("causal"))  # causal already
]


def _extra(kind, case, seed):
    """Keyword arguments on top of the case: masks, GQA, dropout."""
    B, H, Lq, _ = case.q.shape
    Lk = case.k.shape[2]
    if kind == "none":
        return {}
    if kind == "float_mask_gqa":
        return {
            "attn_mask": _randn(1, H, Lq, Lk, seed=seed, dtype=case.q.dtype),
            "enable_gqa": True,
        }
    if kind == "float_mask_with_a_hidden_row":  # -inf on every key of row 0: a zero row
        m = _randn(B, 1, Lq, Lk, seed=seed, dtype=case.q.dtype)
        m[0, 0, 0] = float("-inf")
        return {"attn_mask": m}
    if kind == "bool_mask":
        m = _randn(B, 1, Lq, Lk, seed=seed) > -0.8
        m[..., 0] = True
        return {"attn_mask": m}
    if kind == "dropout_gqa":
        return {"dropout_p": 0.3, "rng_state": torch.tensor([seed, 17]), "enable_gqa": True}
    if kind == "causal_lower_right":
        from torch.nn.attention.bias import causal_lower_right

        return {"attn_mask": causal_lower_right(Lq, Lk), "is_causal": False}
    raise ValueError(kind)


def _inputs(name, extra, dtype, seed):
    case = make_case(dtype=dtype, seed=seed, return_stats=False, **CASES[name])
    kw = dict(case.kwargs)
    kw.update(_extra(extra, case, seed + 1))
    if kw.get("is_causal") and kw.get("attn_mask") is not None:
        kw["is_causal"] = False
    k, v = case.k, case.v
    if kw.get("enable_gqa"):  # two query heads per kv head
        k, v = (t[:, :1] if t.shape[1] % 2 else t[:, ::2] for t in (k, v))
        if case.q.shape[1] % k.shape[1]:
            kw.pop("enable_gqa")
            k, v = case.k, case.v
    return case.q, k, v, kw


def _hvp(backend, q, k, v, kw, rotation_grad, seed):
    """Gradients (w.r.t. q, k, v and the rotation when it requires grad) of a function of the
    first-order gradients: <grad, u> for fixed random u, the first order of a loss <out^2, w>."""
    leaves = [q, k, v]
    kw = dict(kw)
    if rotation_grad:
        kw["rotation"] = kw["rotation"].to(q.dtype).detach().requires_grad_()
        leaves.append(kw["rotation"])
    out = rolling_attention(q, k, v, backend=backend, **kw)
    w = _randn(*out.shape, seed=seed, dtype=out.dtype)
    first = torch.autograd.grad((out.square() * w).sum(), leaves, create_graph=True)
    s = sum(
        (g * _randn(*g.shape, seed=seed + 1 + i, dtype=g.dtype)).sum() for i, g in enumerate(first)
    )
    return first, torch.autograd.grad(s, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,extra", PARAMS, ids=[f"{n}-{e}" for n, e in PARAMS])
def test_second_order_matches_the_reference(name, extra, dtype):
    q, k, v, kw = _inputs(name, extra, dtype, seed=10 * PARAMS.index((name, extra)))
    rotation_grad = kw.get("rotation") is not None and name.startswith("rotation_subset")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with nan_poisoned_outputs():
        first, second = _hvp("cpu", q, k, v, kw, rotation_grad, seed=3)
    kw64 = {
        n: t.double()
        if type(t) is torch.Tensor and t.is_floating_point()
        else t  # not a CausalBias
        for n, t in kw.items()
    }
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    first_ref, second_ref = _hvp("reference", q64, k64, v64, kw64, rotation_grad, seed=3)
    names = ["dq", "dk", "dv", "dR"]
    for n, a, e in zip(names, first, first_ref):
        assert_close(a, e, rel=REL[dtype], name=f"{name}/{extra} first order {n}")
    for n, a, e in zip(names, second, second_ref):
        assert a.abs().sum() > 0, f"{n}: a zero second order"
        assert_close(a, e, rel=REL[dtype], name=f"{name}/{extra} second order {n}")


def test_gradgradcheck_on_the_fused_backend():
    q, k, v = (_randn(1, 2, 4, 5, seed=s).requires_grad_() for s in (32, 33, 34))
    rot = torch.linalg.qr(_randn(5, 5, seed=35))[0].requires_grad_()
    rows = torch.tensor([True, False, True, False])

    def f(q, k, v, rot):
        return rolling_attention(q, k, v, rotation=rot, rotated_queries=rows, backend="cpu")

    assert torch.autograd.gradgradcheck(f, (q, k, v, rot))


def test_third_order_matches_the_reference():
    def third(backend):
        q, k, v = (_randn(2, 4, 7, 6, seed=s).requires_grad_() for s in (40, 41, 42))
        k2, v2 = k[:, ::2], v[:, ::2]  # GQA, through a non-contiguous view
        out = rolling_attention(q, k2, v2, is_causal=True, enable_gqa=True, backend=backend)
        (g1,) = torch.autograd.grad(out.pow(3).sum(), q, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sin().sum(), k, create_graph=True)
        return torch.autograd.grad(g2.square().sum(), (q, v))

    with nan_poisoned_outputs():
        got = third("cpu")
    for n, a, e in zip(("q", "v"), got, third("reference")):
        assert a.abs().sum() > 0
        assert_close(a, e, rel=1e-10, name=f"third order, {n}")


def test_the_cpp_node_runs_the_second_order():
    # the C++ autograd node (no rotation gradient, plain tensors): its create_graph backward
    # goes through the backward op, whose formula is the second order
    q, k, v = (_randn(2, 3, 6, 8, seed=s).requires_grad_() for s in (90, 91, 92))
    out = rolling_attention(q, k, v, backend="cpu")
    assert out.grad_fn.name() == "torch::autograd::CppNode<rollingq::EagerAttention>"
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    got = torch.autograd.grad(dq.cos().sum(), (q, k, v))
    out_r = rolling_attention_reference(q, k, v)
    (dq_r,) = torch.autograd.grad(out_r.square().sum(), q, create_graph=True)
    want = torch.autograd.grad(dq_r.cos().sum(), (q, k, v))
    for n, a, e in zip("qkv", got, want):
        assert_close(a, e, rel=1e-10, name=f"d{n}")


def test_torch_func_grad_of_grad_and_hessian_by_jacrev():
    # sample 0 sees no key (zero rows, zero gradients), sample 1 some
    case = make_case(2, 2, 5, 7, 4, dtype=torch.float64, seed=9, layout="blhd", padding=True)
    pad = case.kwargs["key_padding_mask"]

    def loss(backend):
        def f(q):
            return rolling_attention(q, case.k, case.v, key_padding_mask=pad, backend=backend)

        return lambda q: f(q).pow(2).sum()

    for transform in (
        lambda f: torch.func.grad(lambda q: torch.func.grad(f)(q).sin().sum()),
        lambda f: torch.func.jacrev(torch.func.grad(f)),
    ):
        with nan_poisoned_outputs():
            got = transform(loss("cpu"))(case.q)
        want = transform(loss("reference"))(case.q)
        assert got.abs().sum() > 0
        assert_close(got, want, rel=1e-10, name="second order under torch.func")


def test_gradient_penalty_through_the_sdpa_drop_in_matches_torch_math():
    # what torch's flash kernel refuses and its math kernel runs: a gradient penalty (WGAN-GP,
    # R1) on a model that calls F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = _randn(3, 11, 24, seed=50, dtype=torch.float32)
    proj = torch.nn.Linear(24, 72)
    with torch.no_grad():
        proj.weight.copy_(_randn(72, 24, seed=51, dtype=torch.float32) * 0.2)

    def penalty(x):
        x = x.detach().requires_grad_()
        q, k, v = proj(x).view(3, 11, 3, 3, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        (g,) = torch.autograd.grad(out.tanh().sum(), x, create_graph=True)
        loss = (g.norm(dim=-1) - 1).square().mean()
        return torch.autograd.grad(loss, [x, *proj.parameters()])

    with sdpa_kernel(SDPBackend.MATH):
        want = penalty(x)
    with rk.patch_sdpa(), nan_poisoned_outputs():
        got = penalty(x)
    for a, e in zip(got, want):
        assert a.abs().sum() > 0
        assert_close(a, e, rel=2e-5, name="gradient penalty")


def test_bfloat16_second_order_within_twice_torch_math_error():
    # the low-precision rule: the error from the float64 reference at most twice that of torch's
    # math SDPA run in bfloat16 on the same inputs (plus a small floor)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, w = (_randn(2, 3, 17, 40, seed=s) for s in (60, 61, 62, 63))
    mask = _randn(2, 1, 17, 17, seed=64) > -1.0
    mask[..., 0] = True

    def hvp(attention, dtype):
        leaves = [t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        leaves = [t.requires_grad_() for t in leaves]
        out = attention(*leaves, attn_mask=mask)
        (dq,) = torch.autograd.grad((out.float().square() * w.float()).sum(), leaves[0],
                                    create_graph=True)  # fmt: skip
        return torch.autograd.grad((dq.float() * w.float()).sum(), leaves)

    want = hvp(lambda *a, **kw: rolling_attention(*a, **kw, backend="reference"), torch.float64)
    with nan_poisoned_outputs():
        got = hvp(lambda *a, **kw: rolling_attention(*a, **kw, backend="cpu"), torch.bfloat16)
    with sdpa_kernel(SDPBackend.MATH):
        torch_bf16 = hvp(F.scaled_dot_product_attention, torch.bfloat16)
    for n, a, t, e in zip("qkv", got, torch_bf16, want):
        err = (a.double() - e).abs().max().item()
        bound = 2 * (t.double() - e).abs().max().item() + 1e-3 * e.abs().max().item()
        assert a.dtype == torch.bfloat16 and err <= bound, f"d{n}: {err} > {bound}"


def test_per_sample_second_order_under_vmap():
    # vmap(grad(grad)): per-sample Hessian-vector products, padding and causality per entry
    g = torch.Generator().manual_seed(70)
    q, k, v = (torch.randn(3, 2, 2, n, 4, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    pad = torch.rand(3, 2, 7, generator=g) < 0.8
    pad[..., 0] = True

    def hvp(backend):
        def loss(q, k, v, p):
            out = rolling_attention(q, k, v, key_padding_mask=p, is_causal=True, backend=backend)
            return out.pow(2).sum()

        def one(q, k, v, p):
            return torch.func.grad(lambda q: (torch.func.grad(loss)(q, k, v, p) * q.cos()).sum())(q)

        return torch.func.vmap(one)(q, k, v, pad)

    with nan_poisoned_outputs():
        got = hvp("cpu")
    want = hvp("reference")
    assert got.abs().sum() > 0
    assert_close(got, want, rel=1e-10, name="vmap(grad(grad))")


def test_second_order_inside_autocast_multiplies_in_float32():
    # a backward run inside torch.autocast: the second order's products stay in float32, as the
    # kernels' and the reference's arithmetic does (they once ran in bfloat16 there)
    from torch.utils._python_dispatch import TorchDispatchMode

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
                self.dtypes.update(a.dtype for a in args[:2])
            return func(*args, **(kwargs or {}))

    q, k, v = (
        _randn(2, 3, 9, 16, seed=s, dtype=torch.float32).requires_grad_() for s in (80, 81, 82)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rolling_attention(q, k, v, is_causal=True, backend="cpu")
        assert out.dtype == torch.bfloat16
        (dq,) = torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
        with ProductDtypes() as seen:
            got = torch.autograd.grad(dq.square().sum(), (q, k, v))
    assert seen.dtypes == {torch.float32}, seen.dtypes
    # and the result is as close to float64 as the reference's under autocast (2x rule)
    leaves = [t.detach().bfloat16().double().requires_grad_() for t in (q, k, v)]
    out64 = rolling_attention_reference(*leaves, is_causal=True)
    (dq64,) = torch.autograd.grad(out64.square().sum(), leaves[0], create_graph=True)
    want = torch.autograd.grad(dq64.square().sum(), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r = rolling_attention(q, k, v, is_causal=True, backend="reference")
        (dq_r,) = torch.autograd.grad(out_r.float().square().sum(), q, create_graph=True)
        ref = torch.autograd.grad(dq_r.square().sum(), (q, k, v))
    for n, a, r, e in zip("qkv", got, ref, want):
        err = (a.double() - e).abs().max().item()
        bound = 2 * (r.double() - e).abs().max().item() + 1e-3 * e.abs().max().item()
        assert err <= bound, f"d{n}: {err} > {bound}"


@pytest.mark.parametrize("path", ["cpp_node", "python_formula"])
def test_second_backward_does_not_run_the_first_order_kernel_again(path):
    # the backward op takes the forward's output; an edge from it back to the forward's node once
    # ran the fused backward a second time, on zeros, in every double backward
    q, k, v = (_randn(2, 3, 9, 16, seed=s).requires_grad_() for s in (90, 91, 92))
    kw = {}
    if path == "python_formula":  # a rotation that requires grad takes the Python formula
        kw["rotation"] = torch.linalg.qr(_randn(16, 16, seed=93))[0].requires_grad_()
    out = rolling_attention(q, k, v, backend="cpu", **kw)
    cpp = out.grad_fn.name() == "torch::autograd::CppNode<rollingq::EagerAttention>"
    assert cpp == (path == "cpp_node")
    # a cotangent that does not depend on the output (with one that does, as of out.square(),
    # the chain rule through it runs the fused backward once, rightly)
    w = _randn(*out.shape, seed=94)
    (dq,) = torch.autograd.grad(out, q, w, create_graph=True)
    with CountKernelCalls(torch.ops.rollingq.attention_bwd.default) as seen:
        got = torch.autograd.grad(dq.square().sum(), (q, k, v))
    assert seen.calls == 0
    out_r = rolling_attention_reference(q, k, v, **kw)
    (dq_r,) = torch.autograd.grad(out_r, q, w, create_graph=True)
    want = torch.autograd.grad(dq_r.square().sum(), (q, k, v))
    for n, a, e in zip("qkv", got, want):
        assert_close(a, e, rel=1e-10, name=f"d{n}")
