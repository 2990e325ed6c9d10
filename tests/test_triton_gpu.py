"""The Triton backend on a CUDA device: parity with the float64 reference in float16 / bfloat16
(2x PyTorch's own error), float32 (1e-5, IEEE dots), gradients, dispatch and torch.compile.

Every test is marked ``gpu`` (skipped without a CUDA device). ``bench/gpu_check.sh`` runs them
with ROLLINGQ_TRITON_AUTOTUNE=0 so the time goes to checking, not to tuning.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import (  # noqa: E402
    _plain_low_precision,
    assert_close,
    check_against_reference,
    dtype_id,
    make_case,
    nan_poisoned_outputs,
)

from rollingq_kernels import rolling_attention, rolling_attention_reference  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402
from rollingq_kernels.backends import select_backend  # noqa: E402

pytestmark = pytest.mark.gpu

GRAD_REL_TOL = {torch.float32: 1e-5}


def _cuda(case, dtype):
    return case.to(dtype=dtype, device="cuda")


def _run(case, **extra):
    kw = dict(case.kwargs, **extra)
    with nan_poisoned_outputs():
        res = rolling_attention(case.q, case.k, case.v, backend="triton", **kw)
    torch.cuda.synchronize()
    return res if isinstance(res, tuple) else (res, None)


# Ordered most informative first: bench/gpu_check.sh runs this file in a fixed time slice and
# stops it with SIGINT, so whatever is cut is the least important. Every (dtype, flags, tile)
# combination is a kernel compile, so the lists stay short. fp32 and D > 256 are marked slow
# (gpu_check leaves them out; bench/gpu_smoke.py covers D = 768 in a subprocess).
FEATURES = {
    "plain": dict(),
    "rot_perhead_subset_pad_m3": dict(rotation="per_head", rows="subset", modalities=3,
                                      padding=True),
    "batchrows_pad_causal_m8": dict(rotation="per_head", rows="batch", modalities=8,
                                    padding=True, causal=True),
}  # fmt: skip
LOW = [torch.bfloat16, torch.float16]
MAIN_SHAPES = [(1000, 1000), (300, 77), (77, 300)]


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("feature", ["rot_perhead_subset_pad_m3", "batchrows_pad_causal_m8"])
@pytest.mark.parametrize("Lq,Lk", MAIN_SHAPES, ids=[f"{a}x{b}" for a, b in MAIN_SHAPES])
def test_tensor_core_tiles(dtype, feature, Lq, Lk):
    """Head dim 128: the 128 x 64 tensor-core tiles the benchmark runs, with every feature."""
    case = make_case(2, 2, Lq, Lk, 128, seed=Lq + Lk, layout="blhd", **FEATURES[feature])
    c = _cuda(case, dtype)
    out, stats = _run(c)
    check_against_reference(c, out, stats, dtype=dtype, what=f"{feature} {Lq}x{Lk}: ")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_gradients_tensor_core_tiles(dtype):
    case = make_case(2, 2, 1000, 1000, 128, seed=21, return_stats=False, layout="blhd",
                     rotation="per_head", rows="subset", padding=True, causal=True)  # fmt: skip
    _grad_check(case, dtype, f"{dtype_id(dtype)} d128 L1000: ")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("Lk", [4099, 1000])
def test_cls_only_query_split_keys(dtype, Lk):
    """Lq = 1 (the [CLS] row): the key splitting path with merged lse and statistics."""
    case = make_case(2, 2, 1, Lk, 64, seed=3, rotation="shared", modalities=2, padding=True)
    c = _cuda(case, dtype)
    out, stats = _run(c)
    check_against_reference(c, out, stats, dtype=dtype, what=f"Lq=1 Lk={Lk}: ")


# ---- attn_mask and dropout -----------------------------------------------------------------


def _plain_masked(q, k, v, kw):
    """The attention of kw (rotation, padding, attn_mask, dropout, GQA) written by hand in q's
    dtype on q's device: the 2x rule's yardstick for calls with masks and dropout."""
    from rollingq_kernels.dropout import dropout_keep_mask
    from rollingq_kernels.reference import apply_rotation

    dt = q.dtype
    H, Hkv = q.shape[1], k.shape[1]
    rot = kw.get("rotation")
    qr = apply_rotation(q, None if rot is None else rot.to(dt), kw.get("rotated_queries"))
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = (qr @ kk.transpose(-1, -2)) * (kw.get("scale") or q.shape[-1] ** -0.5)
    m = kw.get("attn_mask")
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(dt)
    pad = kw.get("key_padding_mask")
    if pad is not None:
        s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
    pr = torch.softmax(s.float(), -1).nan_to_num(0.0)
    if kw.get("dropout_p", 0.0) > 0:
        keep = dropout_keep_mask(kw["rng_state"], kw["dropout_p"], tuple(pr.shape), q.device)
        pr = pr * keep / (1 - kw["dropout_p"])
    return pr.to(dt) @ vv


RNG = torch.tensor([-1234567890123, 987654321], dtype=torch.int64)


def _masked_case(dtype, B, H, Lq, Lk, D, mask, *, Hkv=None, dropout=0.0, seed=0):
    """make_case (rotated row subset, statistics, padding) on the GPU with an attn_mask of the
    given kind (a CPU-built float32 or bool tensor moved to the GPU), dropout and grouped heads."""
    from helpers import Case

    c = make_case(B, H, Lq, Lk, D, seed=seed, layout="blhd", rotation="per_head",
                  rows="subset", modalities=2, padding=True).to(dtype=dtype, device="cuda")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    if mask == "bool_keys":  # (B, 1, 1, Lk)
        m = torch.rand(B, 1, 1, Lk, generator=g) < 0.8
    elif mask == "bool_full":  # (B, H, Lq, Lk)
        m = torch.rand(B, H, Lq, Lk, generator=g) < 0.7
    elif mask == "float_1_1":  # (1, 1, Lq, Lk) with -inf entries
        m = torch.randn(1, 1, Lq, Lk, generator=g)
        m[torch.rand(1, 1, Lq, Lk, generator=g) < 0.2] = float("-inf")
    elif mask == "float_finfo_min":  # transformers' additive padding mask
        hidden = torch.rand(B, 1, 1, Lk, generator=g) < 0.3
        m = torch.zeros(B, 1, 1, Lk).masked_fill(hidden, torch.finfo(torch.float32).min)
    else:
        raise ValueError(mask)
    kw = dict(c.kwargs, attn_mask=m.to("cuda"))
    if dropout:
        kw.update(dropout_p=dropout, rng_state=RNG)  # a CPU tensor, as the contract wants
    k, v = c.k, c.v
    if Hkv is not None:
        k, v = k[:, :Hkv], v[:, :Hkv]  # read in place: a head slice
        kw["enable_gqa"] = True
    return Case(c.q, k, v, kw)


def _check_masked(c, out, stats, what):
    """out by the 2x rule (max error), statistics to the low-precision tolerance."""
    from helpers import STATS_TOL, reference

    ref_out, ref = reference(c)
    kw = dict(c.kwargs)
    plain = _plain_masked(c.q, c.k, c.v, kw)
    bound = 2.0 * (plain.double().cpu() - ref_out).abs().max().item() + 1e-3
    err = (out.double().cpu() - ref_out).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > 2x PyTorch's ({bound:.3e})"
    tol = STATS_TOL[c.q.dtype]
    assert_close(stats.lse, ref.lse, rel=tol, name=f"{what} lse")
    assert_close(stats.modality_mass, ref.modality_mass, rel=tol, atol=1e-7, name=f"{what} mass")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_dropout_keep_mask_bit_for_bit(dtype):
    """With v = I the output is keep * P / (1 - p): the GPU's Philox words (umulhi, uint32
    wrap-around) must give dropout_keep_mask exactly, at the tensor-core tiles and split keys."""
    from rollingq_kernels.dropout import dropout_keep_mask

    for B, H, Hkv, Lq, Lk in ((2, 4, 2, 300, 77), (2, 2, 2, 1, 1000)):
        g = torch.Generator().manual_seed(Lq)
        q = torch.randn(B, Lq, H, 64, generator=g).transpose(1, 2).to("cuda", dtype)
        k = torch.randn(B, Hkv, Lk, 64, generator=g).to("cuda", dtype)
        v = torch.eye(Lk).expand(B, Hkv, Lk, Lk).to("cuda", dtype)
        out, _ = _run_raw(q, k, v, dropout_p=0.37, rng_state=RNG, enable_gqa=Hkv != H)
        want = dropout_keep_mask(RNG, 0.37, (B, H, Lq, Lk))
        got = (out != 0).cpu()
        assert torch.equal(got, want), f"{int((got != want).sum())} elements differ ({Lq}x{Lk})"


def _run_raw(q, k, v, **kw):
    with nan_poisoned_outputs():
        out = rolling_attention(q, k, v, backend="triton", **kw)
    torch.cuda.synchronize()
    return out, None


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("mask,dropout", [("bool_keys", 0.0), ("float_1_1", 0.0),
                                          ("bool_full", 0.1), ("float_1_1", 0.1),
                                          ("float_finfo_min", 0.0)])  # fmt: skip
@pytest.mark.parametrize("Lq,Lk", [(1000, 1000), (300, 77)], ids=["1000x1000", "300x77"])
def test_masks_and_dropout_tensor_core_tiles(dtype, mask, dropout, Lq, Lk):
    c = _masked_case(dtype, 2, 2, Lq, Lk, 128, mask, dropout=dropout, seed=Lq + Lk)
    out, stats = _run(c)
    _check_masked(c, out, stats, f"{mask} p={dropout} {Lq}x{Lk}")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("D", [64, 128, pytest.param(768, marks=pytest.mark.slow)])
def test_masks_and_dropout_gradients(dtype, D):
    """Gradients with a float mask, dropout and grouped heads; the 2x rule on the L2 norm of the
    error (the kernels' bf16 gradient error is 1.1-1.8x the hand-written one's in L2)."""
    c = _masked_case(dtype, 2, 4, 129, 257, D, "float_1_1", Hkv=2, dropout=0.1, seed=D)
    c.kwargs["return_stats"] = False
    q, k, v = (t.detach().requires_grad_() for t in (c.q, c.k, c.v))
    out = rolling_attention(q, k, v, backend="triton", **c.kwargs)
    g = torch.randn_like(out)
    with nan_poisoned_outputs():
        got = torch.autograd.grad(out, (q, k, v), g)
    c64 = c.to(dtype=torch.float64, device="cpu")
    kw64 = dict(c64.kwargs, rotation=c64.kwargs["rotation"].double())
    q6, k6, v6 = (t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v))
    want = torch.autograd.grad(rolling_attention_reference(q6, k6, v6, **kw64), (q6, k6, v6),
                               g.double().cpu())  # fmt: skip
    ql, kl, vl = (t.detach().requires_grad_() for t in (c.q, c.k, c.v))
    plain = torch.autograd.grad(_plain_masked(ql, kl, vl, c.kwargs), (ql, kl, vl), g)
    for n, a, e, p in zip(("dq", "dk", "dv"), got, want, plain):
        err = (a.double().cpu() - e).norm().item()
        bound = 2.0 * (p.double().cpu() - e).norm().item() + 1e-3 * e.numel() ** 0.5
        assert err <= bound, f"D={D} {n}: {err:.3e} > 2x PyTorch's {dtype} error ({bound:.3e})"


def test_auto_picks_triton_for_masks_and_dropout():
    c = _masked_case(torch.bfloat16, 1, 2, 5, 7, 16, "float_1_1", dropout=0.1)
    p = make_problem(c.q, c.k, c.v, **c.kwargs)
    assert select_backend(p, "auto").name == "triton"
    c = _masked_case(torch.float16, 1, 2, 5, 7, 16, "bool_keys", Hkv=1)
    p = make_problem(c.q, c.k, c.v, **c.kwargs)
    assert select_backend(p, "auto").name == "triton"


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["bool_full", "float_1_1"])
def test_masks_and_dropout_float32(mask):
    from helpers import reference

    c = _masked_case(torch.float32, 2, 2, 129, 257, 64, mask, dropout=0.2, seed=3)
    out, stats = _run(c)
    ref_out, ref = reference(c)
    assert_close(out, ref_out, rel=1e-5, name=f"{mask} out")
    assert_close(stats.lse, ref.lse, rel=2e-5, name=f"{mask} lse")


def _grad_check(case, dtype, what):
    c = _cuda(case, dtype).requires_grad_()
    kw = dict(c.kwargs, return_stats=False)
    out = rolling_attention(c.q, c.k, c.v, backend="triton", **kw)
    g = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)
    with nan_poisoned_outputs():
        got = torch.autograd.grad(out, (c.q, c.k, c.v), g)
    c64 = case.to(dtype=torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v))
    kw64 = dict(c64.kwargs, return_stats=False)
    if kw64.get("rotation") is not None:
        kw64["rotation"] = kw64["rotation"].double()
    want = torch.autograd.grad(rolling_attention_reference(q, k, v, **kw64), (q, k, v),
                               g.double().cpu())  # fmt: skip
    if dtype in GRAD_REL_TOL:
        for n, a, e in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, e, rel=GRAD_REL_TOL[dtype], name=f"{what}{n}")
        return
    low = case.to(dtype=dtype, device="cuda")
    ql, kl, vl = (t.detach().requires_grad_() for t in (low.q, low.k, low.v))
    kwl = dict(low.kwargs, return_stats=False)
    if kwl.get("rotation") is not None:
        kwl["rotation"] = kwl["rotation"].to(dtype)
    plain = torch.autograd.grad(_plain_low_precision(ql, kl, vl, kwl), (ql, kl, vl), g)
    for n, a, e, p in zip(("dq", "dk", "dv"), got, want, plain):
        err = (a.double().cpu() - e).abs().max().item()
        bound = 2.0 * (p.double().cpu() - e).abs().max().item() + 1e-3
        assert err <= bound, f"{what}{n}: {err:.3e} > 2x PyTorch's {dtype} error ({bound:.3e})"


GRAD_DTYPES = [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, H=2, Lq=129, Lk=129, D=64, rotation="per_head", rows="subset", padding=True),
        dict(B=2, H=2, Lq=300, Lk=77, D=128, rotation="shared", causal=True),
        dict(B=1, H=2, Lq=77, Lk=300, D=40, padding=True, causal=True),
        dict(B=2, H=1, Lq=1, Lk=1000, D=64, rotation="shared"),
        pytest.param(dict(B=2, H=1, Lq=65, Lk=65, D=768, rotation="shared", rows="subset",
                          padding=True), marks=pytest.mark.slow),
    ],
    ids=["rot_pad_d64", "causal_lq_gt_lk_d128", "pad_causal_d40", "lq1", "d768"],
)  # fmt: skip
def test_gradients(dtype, kw):
    case = make_case(seed=11, return_stats=False, layout="blhd", **kw)
    _grad_check(case, dtype, f"{dtype_id(dtype)} {kw}: ")


def test_gradients_float16():
    case = make_case(2, 2, 129, 129, 64, seed=12, return_stats=False, layout="blhd",
                     rotation="per_head", rows="subset", padding=True, causal=True)  # fmt: skip
    _grad_check(case, torch.float16, "float16: ")


def test_auto_picks_triton_for_cuda_tensors():
    c = _cuda(make_case(1, 2, 5, 7, 16), torch.float16)
    p = make_problem(c.q, c.k, c.v, **c.kwargs)
    assert select_backend(p, "auto").name == "triton"


def test_torch_compile_fullgraph_forward_backward():
    case = _cuda(
        make_case(2, 2, 67, 67, 64, seed=5, rotation="per_head", rows="subset", modalities=2,
                  padding=True, causal=True),
        torch.bfloat16,
    ).requires_grad_()  # fmt: skip
    kw = dict(case.kwargs)

    def step(q, k, v):
        out, stats = rolling_attention(q, k, v, backend="triton", **kw)
        return out, stats

    compiled = torch.compile(step, fullgraph=True)
    out, stats = compiled(case.q, case.k, case.v)
    check_against_reference(case, out, stats, dtype=torch.bfloat16, what="compiled: ")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (case.q, case.k, case.v), g)
    eager = rolling_attention(case.q, case.k, case.v, backend="triton", **kw)[0]
    want = torch.autograd.grad(eager, (case.q, case.k, case.v), g)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_torch_func_and_autocast_on_cuda():
    # vmap(grad) folds the vmapped dim into the batch of the Triton ops (one launch per op), and
    # under torch.autocast float32 inputs run as the same call on bfloat16 inputs
    cases = [
        make_case(2, 2, 67, 67, 64, seed=s, rotation="shared", modalities=2, padding=True)
        for s in (21, 22)
    ]
    rotation = cases[0].kwargs["rotation"].cuda()
    q, k, v = (torch.stack([getattr(c, n) for c in cases]).cuda().bfloat16() for n in "qkv")
    pad = torch.stack([c.kwargs["key_padding_mask"] for c in cases]).cuda()
    w = torch.randn(2, 2, 2, 67, 64, device="cuda")

    def loss(q, k, v, pad, w):
        out = rolling_attention(q, k, v, rotation=rotation, key_padding_mask=pad, backend="triton")
        return (out.float() * w).sum()

    with nan_poisoned_outputs():
        grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v, pad, w)
    for i in range(2):
        leaves = [t[i].detach().clone().requires_grad_(True) for t in (q, k, v)]
        want = torch.autograd.grad(loss(*leaves, pad[i], w[i]), leaves)
        for n, a, e in zip(("dq", "dk", "dv"), grads, want):
            assert_close(a[i].float(), e.float(), rel=2e-2, name=f"vmap entry {i} {n}")

    x = _cuda(make_case(2, 2, 67, 67, 64, seed=23, causal=True), torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = rolling_attention(x.q, x.k, x.v, is_causal=True, backend="triton")
    assert out.dtype == torch.bfloat16
    cast = rolling_attention(x.q.bfloat16(), x.k.bfloat16(), x.v.bfloat16(), is_causal=True,
                             backend="triton")  # fmt: skip
    assert torch.equal(out, cast)


def test_double_backward_on_cuda():
    # a gradient penalty through the Triton ops: the fused forward and backward, the second order
    # by the backward op's formula on the GPU, against torch.autograd through the reference
    c = _cuda(make_case(2, 2, 67, 80, 64, seed=24, causal=True, padding=True, rotation="shared",
                        rows="subset", return_stats=False), torch.float32)  # fmt: skip
    w = torch.randn(2, 2, 67, 64, device="cuda")

    def penalty(q, k, v, backend):
        out = rolling_attention(q, k, v, backend=backend, **c.kwargs)
        (dq,) = torch.autograd.grad(out, q, w.to(out.dtype), create_graph=True)
        return torch.autograd.grad(dq.float().square().sum(), (q, k, v))

    leaves = [t.bfloat16().requires_grad_(True) for t in (c.q, c.k, c.v)]
    with nan_poisoned_outputs():
        got = penalty(*leaves, "triton")
    ref = [t.detach().double().requires_grad_(True) for t in leaves]  # the same bf16 values
    kw = dict(c.kwargs, rotation=c.kwargs["rotation"].double())
    out = rolling_attention_reference(*ref, **kw)
    (dq,) = torch.autograd.grad(out, ref[0], w.double(), create_graph=True)
    want = torch.autograd.grad(dq.square().sum(), ref)
    for n, a, e in zip("qkv", got, want):
        assert a.abs().sum() > 0
        assert_close(a.double(), e, rel=3e-2, name=f"second order d{n}")


def test_opcheck_cuda():
    c = _cuda(make_case(1, 2, 33, 40, 64, rotation="shared", modalities=2, padding=True),
              torch.float16)  # fmt: skip
    p = make_problem(c.q, c.k, c.v, **c.kwargs)
    for t in (c.q, c.k, c.v):
        t.requires_grad_(True)
    args = (c.q, c.k, c.v, *p.op_args()[3:])
    torch.library.opcheck(torch.ops.rollingq.triton_attention_fwd.default, args)


SHAPES = [(1, 1), (7, 7), (129, 129), (1000, 1000), (77, 300), (300, 77)]


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Lq,Lk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_forward_parity(dtype, feature, Lq, Lk):
    case = make_case(2, 3, Lq, Lk, 64, seed=Lq + Lk, layout="blhd", **FEATURES[feature])
    c = _cuda(case, dtype)
    out, stats = _run(c)
    check_against_reference(c, out, stats, dtype=dtype, what=f"{feature} {Lq}x{Lk}: ")


# last: the widest kernels take longest to compile (128 is covered above)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("D", [8, 40, 96, 256, pytest.param(768, marks=pytest.mark.slow)])
def test_head_dims(dtype, D):
    B, H = (2, 1) if D == 768 else (2, 2)
    case = make_case(B, H, 129, 257, D, seed=D, layout="strided", rotation="per_head",
                     rows="subset", modalities=2, padding=True)  # fmt: skip
    c = _cuda(case, dtype)
    out, stats = _run(c)
    check_against_reference(c, out, stats, dtype=dtype, what=f"D={D}: ")


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Lq,Lk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_forward_parity_float32(feature, Lq, Lk):
    case = make_case(2, 3, Lq, Lk, 64, seed=Lq + Lk, layout="blhd", **FEATURES[feature])
    c = _cuda(case, torch.float32)
    out, stats = _run(c)
    check_against_reference(c, out, stats, dtype=torch.float32, what=f"{feature} {Lq}x{Lk}: ")


@pytest.mark.slow
@pytest.mark.parametrize("D", [8, 40, 96, 256, 768])
def test_head_dims_float32(D):
    test_head_dims(torch.float32, D)
