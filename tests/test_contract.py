"""The op contract: the dropout keep-mask specification, SDPA's semantics in the oracle, the
output layout rule shared by the fake and the C++ bindings, gradients through the shared
autograd formula, and the registry's feature data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import rollingq_kernels as rk
from rollingq_kernels import fused_op, op_contract
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import select_backend
from rollingq_kernels.dropout import dropout_keep_mask, new_rng_state, philox4x32

CPU_OP = fused_op.load_error() is None


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _sdpa_math(*args, **kw):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kw)


# ---- the keep-mask specification ------------------------------------------------------------


@pytest.mark.parametrize(
    "counter,key,want",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, want):
    # Random123's published known-answer vectors for Philox4x32-10
    got = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in got) == want


def _keep_by_definition(rng, p, shape):
    # element by element, straight from the words of the specification
    seed, offset = (int(x) & (2**64 - 1) for x in rng.tolist())
    B, H, Lq, Lk = shape
    groups = -(-Lk // 4)
    keep = torch.zeros(shape, dtype=torch.bool)
    thr = int(p * 2**32)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    g = ((b * H + h) * Lq + i) * groups + j // 4
                    ctr = [g & 0xFFFFFFFF, g >> 32, offset & 0xFFFFFFFF, offset >> 32]
                    words = philox4x32(
                        *(torch.tensor([c]) for c in ctr), seed & 0xFFFFFFFF, seed >> 32
                    )
                    keep[b, h, i, j] = int(words[j % 4]) >= thr
    return keep


@pytest.mark.parametrize("Lk", [1, 6, 9])
def test_keep_mask_follows_the_element_definition(Lk):
    rng = torch.tensor([-(2**62) - 12345, 2**33 + 7], dtype=torch.int64)  # both halves used
    shape = (2, 2, 3, Lk)
    assert torch.equal(dropout_keep_mask(rng, 0.3, shape), _keep_by_definition(rng, 0.3, shape))


def test_keep_mask_rate_seed_and_offset():
    torch.manual_seed(5)
    a = new_rng_state()
    torch.manual_seed(5)
    assert torch.equal(new_rng_state(), a)  # reproducible from torch.manual_seed
    b = new_rng_state()
    assert not torch.equal(a, b)
    shape = (2, 4, 64, 67)
    m = dropout_keep_mask(a, 0.2, shape)
    assert abs(m.float().mean().item() - 0.8) < 0.01
    assert not torch.equal(m, dropout_keep_mask(b, 0.2, shape))
    shifted = a.clone()
    shifted[1] += 1
    assert not torch.equal(m, dropout_keep_mask(shifted, 0.2, shape))
    assert dropout_keep_mask(a, 0.0, shape).all()


# ---- SDPA's semantics in the oracle -----------------------------------------------------------

B, H, LQ, LK, D = 2, 4, 7, 11, 8


@pytest.mark.parametrize(
    "mask_shape", [(LQ, LK), (1, 1, LQ, LK), (B, 1, 1, LK), (B, H, LQ, LK), (H, 1, LK), (LK,)]
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_reference_attn_mask_matches_sdpa(mask_shape, kind):
    q, k, v = _rand(B, H, LQ, D, seed=1), _rand(B, H, LK, D, seed=2), _rand(B, H, LK, 5, seed=3)
    if kind == "bool":
        mask = _rand(*mask_shape, seed=4) > -0.5
    else:
        mask = _rand(*mask_shape, seed=4)
        mask[..., 0] = float("-inf")
    want = _sdpa_math(q, k, v, attn_mask=mask)
    got = rk.rolling_attention(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lq,lk", [(LQ, LK), (LK, LQ), (5, 5)])
@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
def test_reference_causal_bias_matches_sdpa(lq, lk, bias):
    q, k, v = _rand(B, H, lq, D, seed=5), _rand(B, H, lk, D, seed=6), _rand(B, H, lk, D, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that lower-right with Lq > Lk gives NaN
        b = bias(lq, lk)
        want = _sdpa_math(q, k, v, attn_mask=b)
    got, st = rk.rolling_attention(q, k, v, attn_mask=b, backend="reference", return_stats=True)
    # rows that see no key: SDPA (2.13) and the contract give zeros
    torch.testing.assert_close(got, want.nan_to_num(0.0), rtol=1e-12, atol=1e-12)
    empty = torch.isneginf(st.lse)
    if bias is causal_lower_right and lq > lk:
        assert empty[..., : lq - lk].all() and not empty[..., lq - lk :].any()
    else:
        assert not empty.any()


def test_reference_gqa_matches_sdpa():
    q = _rand(B, 6, LQ, D, seed=8)
    k, v = _rand(B, 2, LK, D, seed=9), _rand(B, 2, LK, D, seed=10)
    want = _sdpa_math(q, k, v, enable_gqa=True)
    got, st = rk.rolling_attention(
        q, k, v, enable_gqa=True, backend="reference", return_stats=True,
        key_modality=torch.tensor([0, 1] * 5 + [-1]),
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # key_sum of query head h holds the keys of kv head h // 3
    assert torch.allclose(st.key_sum[:, 0], st.key_sum[:, 2]) and torch.allclose(
        st.key_sum[:, 3], st.key_sum[:, 5]
    )
    assert not torch.allclose(st.key_sum[:, 0], st.key_sum[:, 3])


def test_reference_dropout_is_the_keep_mask_and_stats_come_before_it():
    q, k, v = _rand(B, H, LQ, D, seed=11), _rand(B, H, LK, D, seed=12), _rand(B, H, LK, 3, seed=13)
    rng = torch.tensor([1234, 0], dtype=torch.int64)
    p = 0.25
    out, st = rk.rolling_attention(
        q, k, v, dropout_p=p, rng_state=rng, backend="reference", return_stats=True
    )
    probs = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
    keep = dropout_keep_mask(rng, p, (B, H, LQ, LK))
    torch.testing.assert_close(out, (probs * keep / (1 - p)) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.modality_mass[..., 0], probs.sum(-1), rtol=1e-12, atol=1e-12)
    # the same seed from torch.manual_seed gives the same output
    torch.manual_seed(3)
    a = rk.rolling_attention(q, k, v, dropout_p=p, backend="reference")
    torch.manual_seed(3)
    assert torch.equal(a, rk.rolling_attention(q, k, v, dropout_p=p, backend="reference"))


def test_reference_nan_and_inf_as_sdpa_math():
    q, k, v = _rand(1, 1, 4, D, seed=14), _rand(1, 1, 6, D, seed=15), _rand(1, 1, 6, D, seed=16)
    qn = q.clone()
    qn[0, 0, 1, 3] = float("nan")
    kn = k.clone()
    kn[0, 0, 2, 0] = float("nan")
    for args in ((qn, k, v), (q, kn, v)):
        want = _sdpa_math(*args)
        got = rk.rolling_attention(*args, backend="reference")
        assert torch.equal(torch.isnan(got), torch.isnan(want))
    # an infinite score (huge scale, float64 overflow) gives NaN, as softmax does, never +-inf
    got = rk.rolling_attention(q, k, v, scale=1e308, backend="reference")
    assert not torch.isinf(got).any()
    want = _sdpa_math(q, k, v, scale=1e308)
    assert torch.equal(torch.isnan(got), torch.isnan(want))


# ---- layout -----------------------------------------------------------------------------------


def _layouts():
    x = _rand(2, 9, 3, 8, seed=17, dtype=torch.float32)
    return {
        "bhld": _rand(2, 3, 9, 8, seed=18, dtype=torch.float32),
        "blhd": x.transpose(1, 2),
        "lbhd": _rand(9, 2, 3, 8, seed=19, dtype=torch.float32).permute(1, 2, 0, 3),
        "expanded": _rand(1, 3, 9, 8, seed=20, dtype=torch.float32).expand(2, 3, 9, 8),
        "one_head": _rand(2, 9, 1, 8, seed=21, dtype=torch.float32).transpose(1, 2),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_layout_rule_python_matches_the_cpu_binding(name):
    if not CPU_OP:
        pytest.skip(fused_op.load_error())
    q = _layouts()[name]
    k = v = _rand(*q.shape, seed=22, dtype=torch.float32)
    out = torch.ops.rollingq.attention_fwd(
        q, k, v, None, None, None, 0, None, None, False, 0, 0.3, 0.0, None
    )[0]
    fake = op_contract.layout_like(q, out.shape)
    assert out.stride() == fake.stride(), (out.stride(), fake.stride())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    if name == "blhd":  # a (B, L, H, D) projection in gives a (B, L, H, D)-contiguous out
        assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_output_follows_q_layout_through_the_api(backend):
    if backend == "cpu" and not CPU_OP:
        pytest.skip(fused_op.load_error())
    q = _layouts()["blhd"]
    out = rk.rolling_attention(q, q, q, backend=backend)
    assert out.transpose(1, 2).is_contiguous()


# ---- gradients through the shared autograd formula --------------------------------------------


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
@pytest.mark.parametrize("rows", [None, "subset"])
@pytest.mark.parametrize("shared", [True, False])
def test_rotation_gradient_matches_reference(rows, shared):
    q, k, v = _rand(2, 3, 5, 6, seed=23), _rand(2, 3, 7, 6, seed=24), _rand(2, 3, 7, 4, seed=25)
    R = torch.linalg.qr(_rand(6, 6, seed=26)).Q
    R = R if shared else torch.stack([R, R.T, R @ R])
    sel = torch.tensor([True, False, True, False, False]) if rows else None
    grads = []
    for backend in ("cpu", "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v, R)]
        out = rk.rolling_attention(
            *ins[:3], rotation=ins[3], rotated_queries=sel, backend=backend, is_causal=True
        )
        grads.append(torch.autograd.grad(out, ins, _rand(*out.shape, seed=27)))
    for name, a, b in zip(("dq", "dk", "dv", "dR"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
def test_gradcheck_with_rotation_through_the_op():
    q, k, v = _rand(1, 2, 4, 5, seed=28), _rand(1, 2, 6, 5, seed=29), _rand(1, 2, 6, 3, seed=30)
    R = torch.linalg.qr(_rand(2, 5, 5, seed=31)).Q
    ins = tuple(t.clone().requires_grad_() for t in (q, k, v, R))

    def f(q, k, v, R):
        return rk.rolling_attention(q, k, v, rotation=R, backend="cpu")

    assert torch.autograd.gradcheck(f, ins)


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
def test_jit_trace_records_the_op_with_or_without_gradients():
    # torch.jit.trace runs the module twice (the second time without gradients) and compares the
    # graphs: a traced call must record rollingq::attention_fwd both times, not the eager
    # autograd.Function of calls that need a gradient
    import io

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(_rand(6, 6, seed=60, dtype=torch.float32))

        def forward(self, x):
            return rk.rolling_attention(x @ self.w, x, x, backend="cpu", is_causal=True)

    block = Block()
    x = _rand(2, 3, 7, 6, seed=61, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(block, x)  # raises TracingCheckError if the graphs differ
    kinds = [n.kind() for n in traced.graph.nodes()]
    assert "rollingq::attention_fwd" in kinds and "prim::PythonOp" not in kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = _rand(2, 3, 7, 6, seed=62, dtype=torch.float32)
    want = block(x2)
    torch.testing.assert_close(loaded(x2), want, rtol=0, atol=0)
    (g_traced,) = torch.autograd.grad(loaded(x2).square().sum(), loaded.w)  # its own copy
    (g_eager,) = torch.autograd.grad(want.square().sum(), block.w)
    torch.testing.assert_close(g_traced, g_eager)


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_torch_export_records_the_op_and_runs_it(strict):
    # torch.export (strict: traced by dynamo; non-strict: the Python run on fake tensors) goes
    # through validation and dispatch into one graph with the op, whose program gives the eager
    # result bit for bit, at another sequence length too (a dynamic dim)
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 72)
            self.rotation = torch.nn.Parameter(torch.linalg.qr(_rand(8, 8, seed=70)).Q.float())

        def forward(self, x, ids):
            B, L, _ = x.shape
            q, k, v = self.proj(x).view(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4)
            out, stats = rk.rolling_attention(q, k, v, rotation=self.rotation, key_modality=ids,
                                              num_modalities=2, return_stats=True)  # fmt: skip
            return out, stats.modality_mass

    torch.manual_seed(71)
    block = Block()
    x = _rand(2, 9, 24, seed=72, dtype=torch.float32)
    ids = torch.tensor([-1, 0, 0, 1, 0, 1, 1, 0, 1])
    length = torch.export.Dim("length", min=2, max=512)
    program = torch.export.export(block, (x, ids), dynamic_shapes=({1: length}, {0: length}),
                                  strict=strict)  # fmt: skip
    assert "rollingq.attention_fwd" in str(program.graph)
    for n in (9, 31):
        x = _rand(2, n, 24, seed=n, dtype=torch.float32)
        ids = torch.arange(n) % 2
        for got, want in zip(program.module()(x, ids), block(x, ids)):
            assert torch.equal(got, want)


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
def test_mask_gradient_is_refused_by_the_raw_op():
    q, k, v = (_rand(1, 1, 3, 4, seed=s).requires_grad_() for s in (35, 36, 37))
    p = make_problem(q, k, v)
    mask = _rand(1, 1, 3, 3, seed=38).requires_grad_()
    args = list(p.op_args())
    args[8] = mask
    try:
        out = torch.ops.rollingq.attention_fwd(*args)[0]
    except NotImplementedError:
        pytest.skip("the CPU kernel does not implement attn_mask yet")
    with pytest.raises(RuntimeError, match="attn_mask"):
        out.sum().backward()


# ---- the registry as the source of truth ------------------------------------------------------


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
def test_auto_warns_once_when_it_falls_back_to_the_reference():
    rk.backends._WARNED.clear()
    q, k, v = (_rand(1, 2, 5, 4, seed=s, dtype=torch.float32) for s in (39, 40, 41))
    bias = _rand(5, 5, seed=42, dtype=torch.float32).requires_grad_()  # no fused backend does this
    p = make_problem(q, k, v, attn_mask=bias)
    with pytest.warns(
        RuntimeWarning, match="'cpu' cannot run this call: no (float attn_mask|gradient)"
    ):
        assert select_backend(p).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(p).name == "reference"  # once
        out = rk.rolling_attention(q, k, v, attn_mask=bias)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.shape == (5, 5)


@pytest.mark.skipif(not CPU_OP, reason="the CPU extension is not built")
def test_auto_warns_when_the_dtype_sends_a_call_to_the_reference():
    # A fused backend that does not take the call's dtype (float64 on CUDA for `triton`; here
    # the `cpu` backend declared without float16): the reference's O(L^2) scores must not come
    # silently. The SDPA drop-in hands such calls to torch instead, without a warning.
    cpu = rk.backends._REGISTRY["cpu"]
    place = rk.backends._AUTO_ORDER.index("cpu")
    narrow = dataclasses.replace(cpu, dtypes={"cpu": frozenset({torch.float32})})
    q, k, v = (_rand(1, 2, 5, 4, seed=s, dtype=torch.float16) for s in (46, 47, 48))
    rk.backends._WARNED.clear()
    try:
        rk.backends.register_backend(narrow, priority=place)
        with pytest.warns(RuntimeWarning, match="'cpu' cannot run this call: .*not torch.float16"):
            out = rk.rolling_attention(q, k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rk.scaled_dot_product_attention(q, k, v).dtype == torch.float16
    finally:
        rk.backends.register_backend(cpu, priority=place)
    torch.testing.assert_close(out, rk.rolling_attention_reference(q, k, v))


def test_sdpa_drop_in_hands_unsupported_calls_to_torch():
    # a float mask that requires grad: no fused backend takes it, torch's SDPA answers (the
    # same bits, the mask's gradient too), without the reference's fallback warning
    q, k, v = (_rand(2, 3, 5, 4, seed=s, dtype=torch.float32) for s in (43, 44, 45))
    bias = _rand(5, 5, seed=49, dtype=torch.float32).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: torch's SDPA runs it
        got = rk.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.equal(got, want)
    (g1,) = torch.autograd.grad(got.sum(), bias)
    (g2,) = torch.autograd.grad(want.sum(), bias)
    assert torch.equal(g1, g2)
    before = F.scaled_dot_product_attention
    with rk.patch_sdpa():
        assert F.scaled_dot_product_attention is rk.scaled_dot_product_attention
        q32 = q.float()
        torch.testing.assert_close(
            F.scaled_dot_product_attention(q32, q32, q32), rk.rolling_attention(q32, q32, q32)
        )
    assert F.scaled_dot_product_attention is before


def test_import_does_not_load_dynamo():
    code = "import sys, rollingq_kernels; print('torch._dynamo' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
