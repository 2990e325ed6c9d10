"""torch.func on the fused backends: vmap (the op's batching rule), grad / vjp / jacrev (the
autograd formula), and the refusal (forward-mode AD) that must be an error, never a silent
zero. Second order: tests/test_double_backward.py.

Every check compares the transformed fused call with the float64 reference run once per vmapped
entry (or with torch.autograd through the reference), on random inputs with odd sizes,
non-contiguous layouts and NaN-poisoned outputs.
"""

import contextlib
import math
import warnings

import pytest
import torch
from helpers import (
    REL_TOL,
    CountKernelCalls,
    assert_close,
    check_against_reference,
    make_case,
    nan_poisoned_outputs,
    random_orthogonal,
)

from rollingq_kernels import NoBackendError, rolling_attention, rolling_attention_reference
from rollingq_kernels import backends as _backends
from rollingq_kernels.backends import backend_status

pytestmark = pytest.mark.skipif(
    backend_status().get("cpu") != [], reason="the cpu backend is not built"
)

N = 3  # vmapped entries


def _entries(dtype, *, seed=0, **kw):
    """N cases of the same sizes (B, H, Lq, Lk, D) = (2, 3, 7, 9, 12) with their own data."""
    return [
        make_case(2, 3, 7, 9, 12, dtype=dtype, seed=seed + i, layout="blhd", **kw) for i in range(N)
    ]


def _stacked(cases, name, dim=0):
    return torch.stack([getattr(c, name) if name in "qkv" else c.kwargs[name] for c in cases], dim)


@contextlib.contextmanager
def _no_fallback_warning():
    """torch warns when vmap runs an op without a batching rule (once per entry); none may
    appear."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_vmap_over_every_input_matches_the_reference_per_entry(dtype):
    cases = _entries(dtype, rotation="shared", rows="batch", modalities=2, padding=True)
    rotation = cases[0].kwargs["rotation"]
    for c in cases:
        c.kwargs["rotation"] = rotation
        c.kwargs["attn_mask"] = torch.randn(1, 1, 7, 9, dtype=dtype)  # broadcast over B, H
    # q, k, v stacked on dim 1 (non-contiguous for the rule), the side inputs on dim 0
    q, k, v = (_stacked(cases, n, dim=1) for n in "qkv")
    rows, ids, pad, mask = (
        _stacked(cases, n) for n in ("rotated_queries", "key_modality", "key_padding_mask",
                                     "attn_mask")
    )  # fmt: skip

    def f(q, k, v, rows, ids, pad, mask):
        return rolling_attention(
            q, k, v, rotation=rotation, rotated_queries=rows, key_modality=ids, num_modalities=2,
            key_padding_mask=pad, attn_mask=mask, return_stats=True, backend="cpu",
        )  # fmt: skip

    with _no_fallback_warning(), nan_poisoned_outputs(), CountKernelCalls() as count:
        out, stats = torch.func.vmap(f, in_dims=(1, 1, 1, 0, 0, 0, 0))(q, k, v, rows, ids, pad,
                                                                       mask)  # fmt: skip
    assert out.shape == (N, 2, 3, 7, 12)
    assert count.calls == 1  # the vmapped dim folded into the batch: one kernel call
    for i, c in enumerate(cases):
        entry = type(stats)(*(t[i] for t in stats))
        check_against_reference(c, out[i], entry, dtype=dtype, what=f"entry {i} ")


@pytest.mark.parametrize("batched", ["q", "kv"])
def test_vmap_with_inputs_shared_by_every_entry(batched):
    cases = _entries(torch.float64, causal=True)
    shared = cases[0]
    if batched == "q":
        k, v = shared.k, shared.v
        for c in cases:
            c.k, c.v = k, v
        fn = torch.func.vmap(lambda q: rolling_attention(q, k, v, is_causal=True, backend="cpu"))
        args = (_stacked(cases, "q"),)
    else:
        q = shared.q
        for c in cases:
            c.q = q
        fn = torch.func.vmap(lambda k, v: rolling_attention(q, k, v, is_causal=True, backend="cpu"))
        args = (_stacked(cases, "k"), _stacked(cases, "v", dim=-1).movedim(-1, 0))
    with _no_fallback_warning(), nan_poisoned_outputs(), CountKernelCalls() as count:
        out = fn(*args)
    assert count.calls == 1
    for i, c in enumerate(cases):
        check_against_reference(c, out[i], dtype=torch.float64, what=f"entry {i} ")


def test_vmap_over_the_rotation_runs_each_entry_with_its_own():
    case = make_case(2, 3, 5, 8, 10, dtype=torch.float64, seed=4, rows="subset", rotation="shared")
    rows = case.kwargs["rotated_queries"]
    rotations = random_orthogonal(10, N, dtype=torch.float32)  # (N, D, D): one per entry
    with _no_fallback_warning(), nan_poisoned_outputs(), CountKernelCalls() as count:
        out = torch.func.vmap(
            lambda r: rolling_attention(
                case.q, case.k, case.v, rotation=r, rotated_queries=rows, backend="cpu"
            )
        )(rotations)
    assert count.calls == N  # a rotation per entry cannot fold into the batch
    for i in range(N):
        case.kwargs["rotation"] = rotations[i]
        check_against_reference(case, out[i], dtype=torch.float64, what=f"entry {i} ")


def test_vmap_infers_one_modality_count_for_all_entries_and_checks_every_entry():
    case = make_case(2, 3, 5, 8, 10, dtype=torch.float64, seed=5)
    ids = torch.tensor([[0, 1, 0, 1, 0, 1, -1, 0], [0, 0, 0, 0, 3, 0, 0, 2], [1] * 8])  # (N, Lk)

    def f(ids):
        return rolling_attention(case.q, case.k, case.v, key_modality=ids, return_stats=True,
                                 backend="cpu")  # fmt: skip

    out, stats = torch.func.vmap(f)(ids)
    assert stats.modality_mass.shape == (N, 2, 3, 5, 4)  # M = 4 from the largest id anywhere
    for i in range(N):
        case.kwargs.update(key_modality=ids[i], num_modalities=4)
        entry = type(stats)(*(t[i] for t in stats))
        check_against_reference(case, out[i], entry, dtype=torch.float64, what=f"entry {i} ")
    bad = ids.clone()
    bad[2, 3] = -2
    with pytest.raises(ValueError, match=r"key_modality ids must lie in"):
        torch.func.vmap(f)(bad)


def test_grad_matches_autograd_through_the_reference():
    case = make_case(2, 3, 7, 9, 12, dtype=torch.float64, seed=6, layout="strided",
                     rotation="per_head", rows="subset", padding=True, causal=True)  # fmt: skip
    kw = dict(case.kwargs, return_stats=False)
    rotation = kw.pop("rotation").to(torch.float64)
    w = torch.randn(2, 3, 7, 12, dtype=torch.float64)

    def loss(fn, q, k, v, r, **extra):
        return (fn(q, k, v, rotation=r, **kw, **extra) * w).sum()

    with nan_poisoned_outputs():
        got = torch.func.grad(lambda *a: loss(rolling_attention, *a, backend="cpu"),
                              argnums=(0, 1, 2, 3))(case.q, case.k, case.v, rotation)  # fmt: skip
    leaves = [t.detach().clone().requires_grad_(True) for t in (case.q, case.k, case.v, rotation)]
    want = torch.autograd.grad(loss(rolling_attention_reference, *leaves), leaves)
    for name, g, e in zip(("dq", "dk", "dv", "drotation"), got, want):
        assert_close(g, e, rel=1e-10, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_per_sample_gradients_by_vmap_of_grad(dtype):
    # the training use of torch.func: one gradient per sample, vmap(grad(loss))
    cases = _entries(dtype, seed=10, modalities=2, padding=True)
    q, k, v = (_stacked(cases, n) for n in "qkv")
    pad = _stacked(cases, "key_padding_mask")
    target = torch.randn(N, 2, 3, 7, 12, dtype=dtype)

    def loss(q, k, v, pad, target, backend):
        out = rolling_attention(q, k, v, key_padding_mask=pad, backend=backend)
        return ((out - target) ** 2).sum()

    with _no_fallback_warning(), nan_poisoned_outputs():
        got = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(0,) * 5 + (None,))(
            q, k, v, pad, target, "cpu"
        )
    for i in range(N):
        leaves = [t[i].double().detach().requires_grad_(True) for t in (q, k, v)]
        want = torch.autograd.grad(loss(*leaves, pad[i], target[i].double(), "reference"), leaves)
        for name, g, e in zip(("dq", "dk", "dv"), got, want):
            assert_close(g[i], e, rel=REL_TOL[dtype] * 10, name=f"entry {i} {name}")


def test_jacrev_matches_the_reference():
    case = make_case(1, 2, 3, 5, 4, dtype=torch.float64, seed=7, rotation="shared")
    r = case.kwargs["rotation"]
    got = torch.func.jacrev(
        lambda q: rolling_attention(q, case.k, case.v, rotation=r, backend="cpu")
    )(case.q)
    want = torch.func.jacrev(lambda q: rolling_attention_reference(q, case.k, case.v, rotation=r))(
        case.q
    )
    assert got.shape == (1, 2, 3, 4, 1, 2, 3, 4)
    assert_close(got, want, rel=1e-10, name="jacobian")


def test_forward_mode_ad_is_declined_by_the_fused_backend_and_auto_runs_the_reference():
    case = make_case(2, 3, 5, 8, 10, dtype=torch.float64, seed=8, causal=True)
    tangent = torch.randn_like(case.q)
    with pytest.raises(NoBackendError, match="forward-mode AD"):
        torch.func.jvp(lambda q: rolling_attention(q, case.k, case.v, backend="cpu"), (case.q,),
                       (tangent,))  # fmt: skip
    _backends._WARNED.clear()  # "auto" warns once per reason
    with pytest.warns(RuntimeWarning, match="forward-mode AD"):
        out, jvp = torch.func.jvp(
            lambda q: rolling_attention(q, case.k, case.v, is_causal=True), (case.q,), (tangent,)
        )
    # the tangent is J t: check it against the fused backward's J^T u through <u, J t> = <J^T u, t>
    u = torch.randn_like(out)
    q = case.q.detach().requires_grad_(True)
    (jt_u,) = torch.autograd.grad(
        (rolling_attention(q, case.k, case.v, is_causal=True, backend="cpu") * u).sum(), q
    )
    assert math.isclose((u * jvp).sum().item(), (jt_u * tangent).sum().item(), rel_tol=1e-10)
    with pytest.raises(NoBackendError, match="forward-mode AD"):
        torch.func.hessian(lambda q: rolling_attention(q, case.k, case.v, backend="cpu").sum())(
            case.q
        )
    small = make_case(1, 1, 2, 3, 2, dtype=torch.float64, seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto" runs the reference, and says so
        hessian = torch.func.hessian(lambda q: rolling_attention(q, small.k, small.v).sum())(
            small.q
        )
    want = torch.func.hessian(lambda q: rolling_attention_reference(q, small.k, small.v).sum())(
        small.q
    )
    assert hessian.abs().sum() > 0
    assert_close(hessian, want, rel=1e-12, name="hessian")


def test_dropout_under_vmap_follows_the_randomness_flag():
    case = make_case(2, 3, 6, 8, 10, dtype=torch.float64, seed=11)
    q = case.q.expand(N, *case.q.shape)  # the same inputs in every entry

    def f(q):
        return rolling_attention(q, case.k, case.v, dropout_p=0.3, backend="cpu")

    torch.manual_seed(123)
    same = torch.func.vmap(f, randomness="same")(q)
    torch.manual_seed(123)
    single = f(case.q)  # draws the same dropout state as the "same" vmap did
    for i in range(N):
        assert torch.equal(same[i], single), f"entry {i} differs under randomness='same'"
    different = torch.func.vmap(f, randomness="different")(q)
    assert not torch.equal(different[0], different[1])
    assert not torch.equal(different[1], different[2])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(f)(q)


def test_reference_under_vmap_keeps_the_non_finite_rules():
    # the reference takes a branch-free path under torch.func: hidden non-finite values stay out,
    # visible ones follow IEEE arithmetic, exactly as outside vmap
    cases = _entries(torch.float64, seed=20, padding=True, modalities=2)
    v = _stacked(cases, "v")
    k = _stacked(cases, "k")
    v[0, 1, 0, 3, 2] = math.nan
    v[1, 1, 2, 4, 0] = math.inf
    v[1, 1, 2, 5, 0] = -math.inf
    v[2, 1, 1, 6, 5] = math.inf
    k[2, 1, 0, 2, 1] = math.inf
    q, pad, ids = (
        _stacked(cases, "q"),
        _stacked(cases, "key_padding_mask"),
        _stacked(cases, "key_modality"),
    )
    pad[:, 1, 6] = False  # key 6 hidden: its inf value must not reach any row
    pad[:, 1, 2:6] = True
    v[1, 1, 2, 4, 3] = math.inf  # alone in its column: +inf in the rows that see key 4

    def f(q, k, v, pad, ids):
        return rolling_attention_reference(q, k, v, key_padding_mask=pad, key_modality=ids,
                                           num_modalities=2, return_stats=True)  # fmt: skip

    out, stats = torch.func.vmap(f)(q, k, v, pad, ids)
    assert out.isnan().any() and out.isinf().any()
    for i in range(N):
        want_out, want_stats = f(q[i], k[i], v[i], pad[i], ids[i])
        assert_close(out[i], want_out, rel=1e-14, name=f"entry {i} out")
        assert_close(stats.key_sum[i], want_stats.key_sum, rel=1e-14, name=f"entry {i} key_sum")


def test_torch_compile_of_vmap_runs_the_rule_and_of_grad_raises():
    # torch.compile traces vmap through the op's rule (the same bits as eager); grad inside
    # torch.compile meets torch.library's autograd registration, which has no functorch form:
    # an error (docs/api.md), never a wrong gradient
    case = make_case(2, 3, 9, 9, 8, dtype=torch.float32, seed=13)
    q = torch.stack([case.q, case.q.flip(2)])

    def f(q):
        return rolling_attention(q, case.k, case.v, is_causal=True, backend="cpu")

    eager = torch.func.vmap(f)(q)
    assert torch.equal(torch.compile(torch.func.vmap(f), fullgraph=True)(q), eager)

    def g(q):
        return torch.func.grad(lambda q: f(q).sum())(q)

    with pytest.raises(Exception, match="setup_context"):
        torch.compile(g, fullgraph=True)(case.q)
