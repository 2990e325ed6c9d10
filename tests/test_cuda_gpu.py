"""The "cuda" backend on a GPU: parity with the float64 reference (docs/design.md section 6).

Marked ``gpu``: skipped on machines without a CUDA device (tests/conftest.py). On a GPU they build
the extension (prebuilt or JIT) and check every kernel path: the tensor-core forward (fp16/bf16,
D = 64 and 128, up to 8 modalities, scale > 0), the generic forward (fp32, other head dims,
D = 768, M > 8, Dv != D, unaligned rows, scale <= 0) and the backward (gradients vs the
reference's autograd).
"""

from __future__ import annotations

import pytest
import torch

from rollingq_kernels import rolling_attention
from tests.helpers import (
    assert_close,
    check_against_reference,
    dtype_id,
    make_case,
    nan_poisoned_outputs,
    reference,
)

pytestmark = pytest.mark.gpu

LOW = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]
# gradients: relative L2 vs the float64 reference
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    from rollingq_kernels import cuda_attention

    why = cuda_attention.unavailable_reason()
    if why:
        pytest.fail(f"a GPU is present but the cuda backend is unavailable: {why}")
    torch.backends.cuda.matmul.allow_tf32 = False


def _run(case, dtype, **extra):
    c = case.to(dtype=dtype, device="cuda")
    kw = dict(c.kwargs)
    kw.update(extra)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].float()
    with nan_poisoned_outputs():
        res = rolling_attention(c.q, c.k, c.v, backend="cuda", **kw)
    torch.cuda.synchronize()
    return res if isinstance(res, tuple) else (res, None)


FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding": dict(padding=True),
    "rotation": dict(rotation="per_head", rows="batch"),
    "stats": dict(modalities=2),
    "everything": dict(rotation="per_head", rows="subset", modalities=3, padding=True, causal=True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_tensor_core_forward(dtype, D, feature):
    for Lq, Lk in [(1, 1), (129, 129), (1000, 77), (70, 300)]:
        case = make_case(B=2, H=3, Lq=Lq, Lk=Lk, D=D, seed=Lq + Lk, **FEATURES[feature])
        out, stats = _run(case, dtype)
        check_against_reference(case, out, stats, dtype=dtype, what=f"L={Lq}x{Lk} ")


@pytest.mark.parametrize(
    "shape",
    [
        dict(D=8, Lq=7),
        dict(D=40, Dv=24, Lq=129, Lk=65),
        dict(D=96, Lq=200),
        dict(D=256, Lq=65),
        dict(D=768, H=1, Lq=77),  # the paper's single-head fusion
        dict(D=64, Dv=128, Lq=50),  # Dv != D: generic path
    ],
    ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()),
)
@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
def test_generic_forward(dtype, shape):
    case = make_case(B=2, **{"H": 2, **shape}, rotation="per_head", rows="batch", modalities=2,
                     padding=True, causal=True, seed=7)  # fmt: skip
    out, stats = _run(case, dtype)
    check_against_reference(case, out, stats, dtype=dtype)


@pytest.mark.parametrize("M", [6, 8, 9], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_modality_counts(dtype, M):
    # up to 8 modalities on the tensor-core path (one n8 tile of one-hot columns), 9 generic
    case = make_case(B=2, H=2, Lq=100, Lk=150, D=64, modalities=M, padding=True, seed=3)
    out, stats = _run(case, dtype)
    check_against_reference(case, out, stats, dtype=dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_tensor_core_forward_long_sequence_with_stats(D):
    # many key tiles: the cp.async pipeline in steady state, the key-sum pass over a long ring
    case = make_case(B=1, H=2, Lq=1500, Lk=2100, D=D, modalities=2, padding=True,
                     rotation="per_head", rows="subset", seed=D)  # fmt: skip
    out, stats = _run(case, torch.bfloat16)
    check_against_reference(case, out, stats, dtype=torch.bfloat16)


def test_negative_scale_takes_the_generic_path():
    for scale in (-0.3, -1.0):
        case = make_case(B=2, H=2, Lq=70, D=64, modalities=2, scale=scale, seed=9)
        out, stats = _run(case, torch.float16)
        check_against_reference(case, out, stats, dtype=torch.float16, what=f"scale={scale}: ")


@pytest.mark.parametrize("layout", ["blhd", "strided"])
@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
def test_non_contiguous_inputs(dtype, layout):
    case = make_case(B=2, H=4, Lq=130, D=64, layout=layout, modalities=2, rotation="shared",
                     seed=5)  # fmt: skip
    out, stats = _run(case, dtype)
    check_against_reference(case, out, stats, dtype=dtype)


def test_bit_identical_reruns():
    case = make_case(B=2, H=2, Lq=300, D=128, modalities=2, causal=True, seed=8)
    a, sa = _run(case, torch.bfloat16)
    b, sb = _run(case, torch.bfloat16)
    assert torch.equal(a, b) and torch.equal(sa.modality_mass, sb.modality_mass)


@pytest.mark.parametrize("feature", ["plain", "causal", "rotation", "everything"], ids=lambda f: f)
@pytest.mark.parametrize("D", [64, 96, 128])  # 64, 128: tensor-core backward (fp16/bf16)
@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
def test_gradients(dtype, D, feature):
    kw = dict(FEATURES[feature])
    kw["return_stats"] = False
    case = make_case(B=2, H=2, Lq=67, Lk=91, D=D, seed=12, **kw)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(2, 2, 67, D, generator=g, dtype=torch.float64)

    c64 = case.to(dtype=torch.float64)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (c64.q, c64.k, c64.v))
    kw64 = dict(c64.kwargs)
    if kw64.get("rotation") is not None:
        kw64["rotation"] = kw64["rotation"].double()
    from rollingq_kernels import rolling_attention_reference

    ref = torch.autograd.grad(rolling_attention_reference(q, k, v, **kw64), (q, k, v), dout)

    c = case.to(dtype=dtype, device="cuda")
    qc, kc, vc = (t.detach().clone().requires_grad_(True) for t in (c.q, c.k, c.v))
    kwc = dict(c.kwargs)
    if kwc.get("rotation") is not None:
        kwc["rotation"] = kwc["rotation"].float()
    out = rolling_attention(qc, kc, vc, backend="cuda", **kwc)
    grads = torch.autograd.grad(out, (qc, kc, vc), dout.to(device="cuda", dtype=dtype))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        assert_close(got, want, rel=GRAD_TOL[dtype], name=f"{feature} {name}")


def test_empty_rows_and_keys():
    # every key padded for sample 0: zero output, lse = -inf, zero mass, no NaN anywhere
    case = make_case(B=2, H=2, Lq=33, D=64, padding=True, modalities=2, seed=4)
    out, stats = _run(case, torch.float16)
    assert torch.equal(out[0].float().cpu(), torch.zeros_like(out[0].float().cpu()))
    assert torch.isneginf(stats.lse[0]).all()
    ref_out, _ = reference(case)
    assert not torch.isnan(out).any() and ref_out.shape == out.shape


@pytest.mark.parametrize("Lq,Lk", [(0, 77), (9, 0)])
def test_no_query_rows_or_no_keys(Lq, Lk):
    # Lq = 0: the tensor-core path still owes the key sums and counts; Lk = 0: generic path
    case = make_case(B=2, H=2, Lq=Lq, Lk=Lk, D=64, modalities=3, cls_key=False, seed=5)
    out, stats = _run(case, torch.bfloat16)
    ref_out, ref = reference(case)
    assert out.shape == ref_out.shape and not torch.isnan(out).any()
    assert_close(stats.key_sum, ref.key_sum, rel=2e-2, name="key_sum")
    assert torch.equal(stats.key_count.double().cpu(), ref.key_count)
    if Lq:
        assert torch.isneginf(stats.lse).all() and torch.equal(out, torch.zeros_like(out))


def test_opcheck_fwd():
    # schema, fake impl and CUDA impl agree (torch.library.opcheck)
    from rollingq_kernels import op_contract  # noqa: F401  (defines the ops' schema)

    case = make_case(B=1, H=2, Lq=9, D=64, modalities=2, seed=6).to(torch.float16, "cuda")
    ids = case.kwargs["key_modality"].to(torch.int32).cuda()
    args = (case.q, case.k, case.v, None, None, ids, 2, None, None, False, 0, 0.125, 0.0, None)
    torch.library.opcheck(torch.ops.rollingq.attention_fwd.default, args)


def test_direct_op_calls_with_unimplemented_features_raise():
    # a torch.ops call the CUDA kernels cannot honour is refused by name, never answered wrongly
    from rollingq_kernels import op_contract  # noqa: F401  (defines the ops' schema)

    q = torch.randn(1, 2, 9, 64, device="cuda", dtype=torch.float16)
    kv = torch.randn(1, 1, 9, 64, device="cuda", dtype=torch.float16)
    mask = torch.ones(9, 9, device="cuda", dtype=torch.bool).expand(1, 2, 9, 9)
    rng = torch.tensor([1, 0])
    op = torch.ops.rollingq.attention_fwd.default
    calls = {
        "attn_mask": (q, q, q, None, None, None, 0, None, mask, False, 0, 0.125, 0.0, None),
        "causal_offset": (q, q, q, None, None, None, 0, None, None, True, 2, 0.125, 0.0, None),
        "dropout": (q, q, q, None, None, None, 0, None, None, False, 0, 0.125, 0.1, rng),
        "grouped-query": (q, kv, kv, None, None, None, 0, None, None, False, 0, 0.125, 0.0, None),
    }
    for name, args in calls.items():
        with pytest.raises(NotImplementedError, match=name):
            op(*args)
