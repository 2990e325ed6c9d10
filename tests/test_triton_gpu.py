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
