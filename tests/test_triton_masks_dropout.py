"""attn_mask (bool and additive float) and attention dropout in the Triton kernels, run in
Triton's CPU interpreter (TRITON_INTERPRET=1), against the float64 reference.

The interpreter runs the kernels on float32 (and bfloat16) CPU tensors; the float64 reference is
the oracle (fp32: relative L2 1e-5 for the output, 2e-5 for gradients; bf16: at most twice the
error of the same attention computed by hand in bf16). Every case combines the new argument with
the fused ones (rotation of a row subset, two-modality statistics, key padding, grouped-query
attention, causal offsets), uses odd sizes that span several 16 x 16 interpreter tiles, reads q /
k / v through non-contiguous views and masks through broadcast strides, and poisons the kernels'
outputs with NaN before they run.

Dropout is checked bit for bit: with v = I the output row i is keep[i, :] * P[i, :] / (1 - p), so
the kernel's keep-mask can be read off its output and compared with ``dropout_keep_mask``; with
dO = I the same holds for dV in the backward.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (the CPU interpreter)", allow_module_level=True)

from helpers import (  # noqa: E402
    Case,
    assert_close,
    make_case,
    nan_poisoned_outputs,
    reference,
)

from rollingq_kernels import AttentionStats, rolling_attention_reference  # noqa: E402
from rollingq_kernels import backends as rb  # noqa: E402
from rollingq_kernels import triton_attention as ta  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402
from rollingq_kernels.dropout import dropout_keep_mask  # noqa: E402
from rollingq_kernels.reference import apply_rotation  # noqa: E402

pytestmark = pytest.mark.interpreter

F32, BF16 = torch.float32, torch.bfloat16
STATS_REL = {F32: 2e-5, BF16: 2e-2}
RNG = torch.tensor([-1234567890123, 987654321], dtype=torch.int64)


def _case(dtype, B=2, H=3, Lq=19, Lk=37, D=24, Dv=None, *, Hkv=None, seed=0, **kw):
    """make_case (rotation of a row subset, statistics, (B, L, H, D) layouts by default) with
    k / v sliced to Hkv heads for grouped-query attention (a non-contiguous head slice)."""
    kw.setdefault("rotation", "per_head")
    kw.setdefault("rows", "subset")
    kw.setdefault("modalities", 2)
    kw.setdefault("layout", "blhd")
    c = make_case(B, H, Lq, Lk, D, Dv, dtype=dtype, seed=seed, **kw)
    if Hkv is None or Hkv == H:
        return c
    return Case(c.q, c.k[:, :Hkv], c.v[:, :Hkv], dict(c.kwargs, enable_gqa=True))


def _mask(name, B, H, Lq, Lk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "bool_full":  # (B, H, Lq, Lk) with a row that sees no key
        m = torch.rand(B, H, Lq, Lk, generator=g) < 0.7
        m[1, H - 1, 4] = False
        return m
    if name == "bool_keys":  # (B, 1, 1, Lk): one flag per key
        m = torch.rand(B, 1, 1, Lk, generator=g) < 0.8
        m[:, :, :, 0] = True
        return m
    if name == "bool_2d":  # (Lq, Lk)
        return torch.rand(Lq, Lk, generator=g) < 0.6
    if name == "float_1_1":  # (1, 1, Lq, Lk) float32 with -inf entries and an all -inf row
        m = torch.randn(1, 1, Lq, Lk, generator=g)
        m[torch.rand(1, 1, Lq, Lk, generator=g) < 0.2] = float("-inf")
        if Lq > 3:
            m[0, 0, 3] = float("-inf")
        return m
    if name == "float_keys":  # (B, 1, 1, Lk) in q's dtype
        return torch.randn(B, 1, 1, Lk, generator=g).to(dtype)
    if name == "float_strided":  # (B, H, Lq, Lk) read through a transposed view
        return torch.randn(B, H, Lk, Lq, generator=g).transpose(-1, -2)
    if name == "float_finfo_min":  # transformers' additive padding mask (finfo.min = hidden)
        keep = torch.rand(B, 1, 1, Lk, generator=g) < 0.7
        keep[0] = False  # sample 0: every key carries finfo.min
        return torch.zeros(B, 1, 1, Lk).masked_fill(~keep, torch.finfo(torch.float32).min)
    raise ValueError(name)


def _problem(case):
    return make_problem(case.q, case.k, case.v, **case.kwargs)


def _forward(case):
    with nan_poisoned_outputs():
        return ta.forward(_problem(case))


def _grads(case, g):
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    out, _ = ta.forward(make_problem(q, k, v, **dict(case.kwargs, return_stats=False)))
    with nan_poisoned_outputs():
        return torch.autograd.grad(out, (q, k, v), g)


def _reference_grads(case, g):
    c64 = case.to(dtype=torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v))
    kw = dict(c64.kwargs, return_stats=False)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(torch.float64)
    out = rolling_attention_reference(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), g.to(torch.float64))


def _cotangent(case, seed=7):
    B, H, Lq, _ = case.q.shape
    g = torch.randn(B, Lq, H, case.v.shape[-1], generator=torch.Generator().manual_seed(seed))
    return g.to(case.q.dtype).transpose(1, 2)  # a (B, L, H, D) gradient viewed as (B, H, L, D)


def _check_forward(case, out, stats, what, rel=1e-5):
    ref_out, ref = reference(case)
    assert out.dtype == case.q.dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, rel=rel, name=f"{what}: out")
    srel = STATS_REL[case.q.dtype]
    assert_close(stats.lse, ref.lse, rel=srel, name=f"{what}: lse")
    assert_close(stats.modality_mass, ref.modality_mass, rel=srel, atol=1e-7, name=f"{what}: mass")
    assert_close(stats.key_sum, ref.key_sum, rel=srel, name=f"{what}: key_sum")
    assert torch.equal(stats.key_count.double(), ref.key_count), f"{what}: key_count"


def _check_grads(case, what, rel=2e-5):
    g = _cotangent(case)
    got = _grads(case, g)
    want = _reference_grads(case, g)
    for n, a, e in zip("qkv", got, want):
        assert a.shape == e.shape and a.dtype == case.q.dtype, (n, a.shape, e.shape)
        assert_close(a, e, rel=rel, name=f"{what}: d{n}")
    return got


# ---- attn_mask ----------------------------------------------------------------------------------

MASKS = ["bool_full", "bool_keys", "bool_2d", "float_1_1", "float_keys", "float_strided"]


@pytest.mark.parametrize("mask", MASKS)
def test_attn_mask_float32(mask):
    case = _case(F32, B=2, H=2, Lq=17, Lk=35, D=16, seed=MASKS.index(mask), padding=True)
    B, H, Lq, _ = case.q.shape
    case.kwargs["attn_mask"] = _mask(mask, B, H, Lq, case.k.shape[2], F32, seed=3)
    out, stats = _forward(case)
    _check_forward(case, out, stats, mask)
    if mask == "float_1_1":
        # row 3 sees no key (all -inf): zeros and lse = -inf, as the reference; the reference's
        # autograd gives NaN there (logsumexp of -inf), so gradients are compared with it opened
        assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(stats.lse[:, :, 3]))
        case.kwargs["attn_mask"] = case.kwargs["attn_mask"].clone()
        case.kwargs["attn_mask"][0, 0, 3] = 0.0
    got = _check_grads(case, mask)
    if mask == "bool_full":  # the row that sees no key: zero output, zero gradient, no NaN
        assert torch.all(out[1, H - 1, 4] == 0) and torch.isneginf(stats.lse[1, H - 1, 4])
        assert torch.all(got[0][1, H - 1, 4] == 0)


# the broadcast shapes SDPA accepts (those of tests/test_sdpa_dropin.py)
SDPA_MASK_SHAPES = {
    "Lq,Lk": lambda B, H, Lq, Lk: (Lq, Lk),
    "1,Lk": lambda B, H, Lq, Lk: (1, Lk),
    "1,1,Lq,Lk": lambda B, H, Lq, Lk: (1, 1, Lq, Lk),
    "B,1,1,Lk": lambda B, H, Lq, Lk: (B, 1, 1, Lk),
    "1,H,1,Lk": lambda B, H, Lq, Lk: (1, H, 1, Lk),
    "B,1,Lq,1": lambda B, H, Lq, Lk: (B, 1, Lq, 1),
    "H,Lq,Lk": lambda B, H, Lq, Lk: (H, Lq, Lk),
    "B,H,Lq,Lk": lambda B, H, Lq, Lk: (B, H, Lq, Lk),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(SDPA_MASK_SHAPES))
def test_every_sdpa_broadcast_shape(shape, kind):
    B, H, Lq, Lk = 2, 2, 9, 21
    case = _case(F32, B, H, Lq, Lk, D=16, seed=len(shape))
    g = torch.Generator().manual_seed(len(shape))
    dims = SDPA_MASK_SHAPES[shape](B, H, Lq, Lk)
    mask = torch.rand(dims, generator=g) < 0.7 if kind == "bool" else torch.randn(dims, generator=g)
    if kind == "bool" and shape == "B,1,Lq,1":
        mask[0, 0, 2] = False  # a row that sees no key
    case.kwargs["attn_mask"] = mask
    out, stats = _forward(case)
    _check_forward(case, out, stats, f"{kind} {shape}")


def test_attn_mask_is_read_in_place():
    """A broadcast mask reaches the kernels as a stride-0 view of the caller's storage."""
    case = _case(F32, B=3, H=2, Lq=9, Lk=21)
    mask = torch.rand(3, 1, 1, 21) < 0.7
    case.kwargs["attn_mask"] = mask
    p = _problem(case)
    ptr, strides, meta = ta._mask_args(p.attn_mask, (3, 2, 9, 21), p.q)
    assert ptr.data_ptr() == mask.data_ptr() and ptr.dtype == torch.uint8
    assert strides[1] == 0 and strides[2] == 0 and meta == dict(HAS_MASK=True, MASK_BOOL=True)


def test_transformers_padding_mask_with_finfo_min():
    """finfo.min marks hidden keys in transformers' additive masks: the log2 scaling of the
    kernels must not turn it into -inf. Sample 1 (some keys visible) matches the reference; in
    sample 0 every key carries finfo.min, the scores vanish next to it and the row attends
    uniformly, as SDPA's float32 softmax does; its lse is held near the clamp."""
    case = _case(F32, B=2, H=2, Lq=17, Lk=29)
    case.kwargs["attn_mask"] = _mask("float_finfo_min", 2, 2, 17, 29, F32)
    out, stats = _forward(case)
    ref_out, ref = reference(case)
    assert_close(out, ref_out, rel=1e-5, name="out")
    v_mean = case.v.double().mean(dim=2, keepdim=True).expand(-1, -1, 17, -1)
    assert_close(out[0], v_mean[0], rel=1e-5, name="uniform sample 0")
    assert_close(stats.lse[1], ref.lse[1], rel=2e-5, name="lse")
    assert torch.all(stats.lse[0] < -1e36)  # near the clamped -1e37
    assert_close(stats.modality_mass[1], ref.modality_mass[1], rel=2e-5, atol=1e-7, name="mass")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        case.q[:1].double(), case.k[:1].double(), case.v[:1].double(),
        attn_mask=case.kwargs["attn_mask"][:1].double(),
    )  # fmt: skip
    assert_close(out[0], sdpa[0], rel=1e-5, name="sample 0 vs SDPA")


def test_nan_in_a_float_mask_poisons_exactly_its_row():
    case = _case(F32, B=2, H=2, Lq=11, Lk=23, padding=False)
    mask = torch.randn(1, 1, 11, 23)
    mask[0, 0, 5, 7] = float("nan")
    case.kwargs["attn_mask"] = mask
    out, stats = _forward(case)
    ref_out, ref = reference(case)
    assert torch.isnan(out[:, :, 5]).all() and torch.isnan(stats.lse[:, :, 5]).all()
    assert_close(out, ref_out, rel=1e-5, name="out")  # NaN where the reference has NaN
    assert_close(stats.lse, ref.lse, rel=2e-5, name="lse")
    # the split-K merge keeps the NaN (one query row, keys in two splits, the NaN in the first)
    kw = dict(case.kwargs, attn_mask=mask[..., 5:6, :])
    kw["rotated_queries"] = kw["rotated_queries"][5:6]
    one = Case(case.q[:, :, 5:6], case.k, case.v, kw)
    out1, lse1 = _split_forward(_problem(one), splits=2)[:2]
    assert torch.isnan(out1).all() and torch.isnan(lse1).all()


def _split_forward(p, splits):
    rot, rows, ids, pad = ta._side_inputs(
        p.q, p.rotation, p.rotated_queries, p.key_modality, p.key_padding_mask
    )
    with nan_poisoned_outputs():
        return ta.rolling_attention_triton_forward(
            p.q, p.k, p.v, rot, rows if rot is not None else None, ids, pad, p.num_modalities,
            p.is_causal, p.scale, num_splits=splits, causal_offset=p.causal_offset,
            attn_mask=p.attn_mask, dropout_p=p.dropout_p, rng_state=p.rng_state,
        )  # fmt: skip


@pytest.mark.parametrize("mask", ["bool_keys", "float_1_1"])
def test_attn_mask_split_keys(mask):
    """Short query blocks split the keys across programs (flash decoding): the mask is read at
    each split's keys and the partial results merged."""
    case = _case(F32, B=2, H=2, Lq=3, Lk=75, padding=True)
    case.kwargs["attn_mask"] = _mask(mask, 2, 2, 3, 75, F32, seed=5)
    p = _problem(case)
    out, lse, mass, key_sum = _split_forward(p, splits=3)
    count = ta._key_count(p.key_modality, p.key_padding_mask, 2, 2, p.q.device)
    _check_forward(case, out, AttentionStats(mass, key_sum, count, lse), f"split {mask}")


def test_attn_mask_grouped_heads_and_head_dim_768():
    """A per-head float mask with grouped-query attention (the mask indexes query heads), and a
    bool mask on the chunked path of head dims above 256 (the paper's D = 768)."""
    case = _case(F32, B=2, H=4, Hkv=2, Lq=13, Lk=27, D=16, seed=8, padding=True)
    case.kwargs["attn_mask"] = torch.randn(2, 4, 27, 13).transpose(-1, -2)
    out, stats = _forward(case)
    _check_forward(case, out, stats, "gqa float mask")
    _check_grads(case, "gqa float mask")

    wide = _case(F32, B=2, H=1, Lq=7, Lk=19, D=768, seed=9)
    wide.kwargs["attn_mask"] = _mask("bool_keys", 2, 1, 7, 19, F32, seed=9)
    out, stats = _forward(wide)
    _check_forward(wide, out, stats, "D=768 bool mask")


# ---- dropout ---------------------------------------------------------------------------------


def _probe_keep_forward(B, H, Hkv, Lq, Lk, p, rng, splits=None):
    """The kernel's keep-mask, read off its output with v = I (Dv = Lk)."""
    g = torch.Generator().manual_seed(Lq * Lk)
    q = torch.randn(B, Lq, H, 16, generator=g).transpose(1, 2)
    k = torch.randn(B, Hkv, Lk, 16, generator=g)
    v = torch.eye(Lk).expand(B, Hkv, Lk, Lk)
    prob = make_problem(q, k, v, dropout_p=p, rng_state=rng, enable_gqa=Hkv != H)
    if splits is None:
        with nan_poisoned_outputs():
            out, _ = ta.forward(prob)
    else:
        out = _split_forward(prob, splits)[0]
    return out != 0


@pytest.mark.parametrize(
    "B,H,Hkv,Lq,Lk,p,splits",
    [(2, 4, 2, 13, 37, 0.37, None), (1, 3, 3, 21, 18, 0.5, None), (2, 2, 1, 2, 67, 0.2, 3)],
    ids=["gqa_lk37", "lk18", "split_keys"],
)
def test_dropout_keep_mask_is_the_specification_bit_for_bit(B, H, Hkv, Lq, Lk, p, splits):
    rng = torch.tensor([-(2**62) + 12345, 2**40 + 7], dtype=torch.int64)
    got = _probe_keep_forward(B, H, Hkv, Lq, Lk, p, rng, splits)
    want = dropout_keep_mask(rng, p, (B, H, Lq, Lk))
    assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"
    assert 0.0 < want.float().mean().item() < 1.0


def test_dropout_keep_mask_in_the_backward_bit_for_bit():
    """dV = (P * keep / (1 - p))^T dO: with dO = I (Dv = Lq) dV^T is the regenerated keep-mask
    times positive probabilities, so it must vanish exactly where the specification drops."""
    B, H, Lq, Lk, p = 2, 2, 11, 29, 0.4
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, Lq, H, 16, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(B, H, Lk, 16, generator=gen).requires_grad_()
    v = torch.randn(B, H, Lk, Lq, generator=gen).requires_grad_()
    out, _ = ta.forward(make_problem(q, k, v, dropout_p=p, rng_state=RNG))
    with nan_poisoned_outputs():
        (dv,) = torch.autograd.grad(out, (v,), torch.eye(Lq).expand(B, H, Lq, Lq))
    want = dropout_keep_mask(RNG, p, (B, H, Lq, Lk))
    assert torch.equal(dv.transpose(-1, -2) != 0, want)


def test_dropout_with_every_feature_float32():
    """Dropout + float mask + rotation + statistics + padding + grouped heads, forward and
    backward; the reference applies dropout_keep_mask, so any element kept or dropped differently
    moves the result far beyond the tolerance. Statistics are taken before dropout."""
    case = _case(F32, B=2, H=2, Hkv=1, Lq=17, Lk=33, D=16, Dv=24, seed=11, padding=True)
    case.kwargs.update(attn_mask=torch.randn(1, 2, 17, 33), dropout_p=0.3, rng_state=RNG)
    out, stats = _forward(case)
    _check_forward(case, out, stats, "dropout")
    plain = Case(case.q, case.k, case.v, dict(case.kwargs, dropout_p=0.0, rng_state=None))
    out0, stats0 = _forward(plain)
    assert not torch.equal(out, out0)
    for name, a, b in zip(stats._fields, stats, stats0):
        assert torch.equal(a, b), f"{name} changed with dropout"
    _check_grads(case, "dropout")


def test_dropout_causal_lower_right_and_head_dim_768():
    from torch.nn.attention.bias import causal_lower_right

    case = _case(F32, B=1, H=2, Lq=9, Lk=30, D=16, seed=12, layout="strided")
    case.kwargs.update(attn_mask=causal_lower_right(9, 30), dropout_p=0.25, rng_state=RNG)
    out, stats = _forward(case)
    _check_forward(case, out, stats, "dropout lower-right")
    _check_grads(case, "dropout lower-right")

    wide = _case(F32, B=1, H=1, Lq=7, Lk=19, D=768, seed=13)
    wide.kwargs.update(attn_mask=torch.randn(7, 19), dropout_p=0.2, rng_state=RNG)
    out, stats = _forward(wide)
    _check_forward(wide, out, stats, "dropout D=768")
    _check_grads(wide, "dropout D=768")


def test_dropout_is_reproducible_and_depends_on_seed_and_offset():
    case = _case(F32, B=1, H=2, Lq=9, Lk=17, seed=14, return_stats=False)
    runs = []
    for state in ([5, 0], [5, 0], [6, 0], [5, 1]):
        kw = dict(case.kwargs, dropout_p=0.5, rng_state=torch.tensor(state))
        runs.append(_forward(Case(case.q, case.k, case.v, kw))[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[3])


# ---- bfloat16 by the 2x rule -------------------------------------------------------------------


def _plain_low(case, q, k, v):
    """The same attention written by hand in the low dtype (the 2x rule's yardstick)."""
    kw = case.kwargs
    dt = q.dtype
    H, Hkv = q.shape[1], k.shape[1]
    qr = apply_rotation(q, kw["rotation"].to(dt), kw.get("rotated_queries"))
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
        keep = dropout_keep_mask(kw["rng_state"], kw["dropout_p"], tuple(pr.shape))
        pr = pr * keep / (1 - kw["dropout_p"])
    return pr.to(dt) @ vv


@pytest.mark.parametrize("mask", ["bool_full", "float_keys"])
def test_bfloat16_mask_and_dropout_2x_rule(mask):
    """Output: max error at most twice that of the same attention written by hand in bf16 (plus
    1e-3). Gradients: the same rule on the L2 norm of the error (the max of one element is too
    noisy a yardstick for sums over a row: over random seeds the kernels' gradient error is
    1.1-1.8x the hand-written one's in L2, with and without dropout, and up to 2.4x in max)."""
    case = _case(BF16, B=2, H=2, Hkv=1, Lq=17, Lk=21, D=32, seed=15, padding=True)
    case.kwargs["attn_mask"] = _mask(mask, 2, 2, 17, 21, BF16, seed=15)
    case.kwargs.update(dropout_p=0.2, rng_state=RNG)
    out, stats = _forward(case)
    ref_out, ref = reference(case)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    plain = _plain_low(case, q, k, v)
    bound = 2.0 * (plain.double() - ref_out).abs().max().item() + 1e-3
    err = (out.double() - ref_out).abs().max().item()
    assert out.dtype == BF16 and err <= bound, f"out: {err:.3e} > {bound:.3e}"
    assert_close(stats.lse, ref.lse, rel=STATS_REL[BF16], name="lse")
    assert_close(stats.modality_mass, ref.modality_mass, rel=STATS_REL[BF16], atol=1e-7,
                 name="mass")  # fmt: skip
    g = _cotangent(case)
    got = _grads(case, g)
    want = _reference_grads(case, g)
    plain_g = torch.autograd.grad(plain, (q, k, v), g)
    for n, a, e, pl in zip("qkv", got, want, plain_g):
        err = (a.double() - e).norm().item()
        bound = 2.0 * (pl.double() - e).norm().item() + 1e-3 * math.sqrt(e.numel())
        assert a.dtype == BF16 and err <= bound, f"d{n}: {err:.3e} > 2x bf16 ({bound:.3e})"


# ---- the op, the registry -----------------------------------------------------------------------


def test_opcheck_with_mask_and_dropout():
    case = _case(F32, B=1, H=2, Lq=5, Lk=9, D=16, seed=16, padding=True)
    case.kwargs.update(attn_mask=torch.randn(1, 1, 5, 9), dropout_p=0.3, rng_state=RNG)
    p = _problem(case)
    for t in (case.q, case.k, case.v):
        t.requires_grad_(True)
    args = (case.q, case.k, case.v, *p.op_args()[3:])
    results = torch.library.opcheck(torch.ops.rollingq.triton_attention_fwd.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_compiled_forward_backward_with_mask_and_dropout():
    case = _case(F32, B=2, H=2, Lq=11, Lk=19, D=16, seed=17)
    mask = torch.rand(2, 1, 1, 19) < 0.8
    kw = dict(case.kwargs, attn_mask=mask, dropout_p=0.2, rng_state=RNG)

    def step(q, k, v):
        return ta.forward(make_problem(q, k, v, **kw))

    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    out, stats = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    eager, _ = step(q, k, v)
    assert torch.equal(out, eager)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = _reference_grads(Case(case.q, case.k, case.v, kw), g)
    for n, a, e in zip("qkv", got, want):
        assert_close(a, e, rel=2e-5, name=f"compiled d{n}")


def _feature_problem(**kw):
    case = _case(F32, B=1, H=2, Lq=5, Lk=9, D=16, seed=18)
    return make_problem(case.q, case.k, case.v, **dict(case.kwargs, **kw))


@pytest.mark.parametrize(
    "kw",
    [
        dict(attn_mask=torch.rand(5, 9) < 0.5),
        dict(attn_mask=torch.randn(1, 2, 5, 9)),
        dict(dropout_p=0.1, rng_state=RNG),
        dict(attn_mask=torch.randn(9), dropout_p=0.5, rng_state=RNG),
    ],
    ids=["bool", "float", "dropout", "float+dropout"],
)
def test_triton_declares_what_it_runs(kw):
    """The registry's declaration matches the kernels: "auto" may send these calls to Triton on
    a GPU (here only the declaration is checked: CPU tensors never go to Triton through "auto")."""
    p = _feature_problem(**kw)
    assert rb._REGISTRY["triton"].features.reasons(p) == []
    assert ta.unsupported_reasons(p) == []
    with nan_poisoned_outputs():
        out, _ = ta.forward(p)
    assert torch.isfinite(out).all()


def test_float_mask_gradient_is_declined_like_cpu():
    """Neither fused backend differentiates with respect to a float mask: the registry says so
    (so "auto" falls back) and the op raises rather than returning a wrong or missing gradient."""
    mask = torch.randn(5, 9, requires_grad=True)
    p = _feature_problem(attn_mask=mask)
    for name in ("triton", "cpu"):
        spec = rb._REGISTRY[name]
        assert not spec.features.attn_mask_grad
        assert "no gradient with respect to attn_mask" in spec.features.reasons(p)
    q = p.q.detach().requires_grad_()
    out, _ = ta.forward(p._replace(q=q))
    with pytest.raises(RuntimeError, match="attn_mask"):
        torch.autograd.grad(out.sum(), (q, mask))


def test_unsupported_reasons_name_32_bit_offsets_and_grid_limits():
    """The kernels add 64-bit batch / head offsets to 32-bit offsets within one (batch, head)
    slice, and put B * H on a grid axis limited to 65535: larger calls are declined by name
    (meta tensors: only shapes and strides matter)."""
    p = _feature_problem()
    assert ta.unsupported_reasons(p) == []
    meta = torch.empty(2**32 + 2**16, device="meta")
    wide = meta.as_strided((1, 1, 2**16, 2**16), (0, 0, 2**16, 1))  # a 2^32-element slice
    assert ta._slice_extent(wide) == 2**32
    assert ta._slice_extent(wide[:, :, : 2**14]) < 2**31
    reasons = ta.unsupported_reasons(p._replace(q=wide[..., :16].expand(1, 2, -1, -1)))
    assert any(r.startswith("q:") and "32 bits" in r for r in reasons), reasons
    reasons = ta.unsupported_reasons(p._replace(attn_mask=wide.expand(1, 2, -1, -1)))
    assert any(r.startswith("attn_mask:") for r in reasons), reasons
    many = meta[: (2**16 + 1) * 5 * 16].view(2**16 + 1, 1, 5, 16)
    reasons = ta.unsupported_reasons(p._replace(q=many))
    assert any("grid limit" in r for r in reasons), reasons


def test_mask_and_dropout_match_math_on_small_random_problems():
    """A quick sweep over sizes around the interpreter's 16 x 16 tiles (1, 4, 15, 16, 17, 33
    keys; 1 and 17 rows) with a bool mask and dropout together."""
    for i, (Lq, Lk) in enumerate([(1, 1), (1, 4), (17, 15), (17, 16), (5, 33)]):
        case = _case(F32, B=1, H=2, Lq=Lq, Lk=Lk, D=8, seed=20 + i, rows=None)
        mask = torch.rand(1, 2, Lq, Lk, generator=torch.Generator().manual_seed(i)) < 0.8
        case.kwargs.update(attn_mask=mask, dropout_p=0.3, rng_state=RNG)
        out, stats = _forward(case)
        _check_forward(case, out, stats, f"{Lq}x{Lk}")
        assert math.isfinite(out.sum().item())


@pytest.mark.parametrize("offset", [2**63 - 1, -(2**63), 40, -19])
def test_causal_offset_of_any_int64_keeps_its_meaning(offset):
    # the raw entry point is public: an offset past Lk shows every key, one below -Lq none; the
    # kernels take it as int32, so it must be clamped, not wrapped
    case = _case(F32, B=1, H=2, Lq=19, Lk=37, padding=False, modalities=0, rotation=None)
    q, k, v = case.q, case.k, case.v
    with nan_poisoned_outputs():
        out, lse = ta.rolling_attention_triton_forward(
            q, k, v, is_causal=True, causal_offset=offset
        )[:2]
    Lq, Lk = q.shape[2], k.shape[2]
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(max(min(offset, Lk), -Lq - 1))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask
    )
    want[..., ~mask.any(-1), :] = 0
    assert_close(out, want, rel=1e-5, name="out")
    assert bool((lse[..., ~mask.any(-1)] == float("-inf")).all())
