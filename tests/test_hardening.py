"""Probes a kernel's users would run before trusting it, each through the public function and
through the raw ``torch.ops.rollingq.*`` ops (the ops are public too):

* widths: ``num_modalities`` and modality ids wider than 32 bits are refused by name, never
  narrowed into an out-of-bounds write, uninitialised statistics or a wrong modality;
* NaN and infinity follow SDPA's definition (docs/numerics.md): a NaN poisons exactly the rows that
  see it, an infinite score gives NaN, a row that sees no key gives zeros; the oracle too;
* second derivatives raise instead of silently being zero;
* the raw backward refuses an ``lse`` it cannot use and a row selection without a rotation;
* a stale library built for another Python never shadows the right one;
* a complex ``key_modality`` is a TypeError naming it.
"""

from __future__ import annotations

import math
import os
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from helpers import nan_poisoned_outputs

from rollingq_kernels import fused_op, rolling_attention, rolling_attention_reference

NAN, INF = float("nan"), float("inf")

needs_op = pytest.mark.skipif(fused_op.load_error() is not None, reason=str(fused_op.load_error()))

_FWD_NAMES = (
    "q k v rotation rotated_queries key_modality num_modalities key_padding_mask attn_mask "
    "is_causal causal_offset scale dropout_p rng_state"
).split()
_BWD_NAMES = (
    "grad_out q k v out lse rotation rotated_queries key_padding_mask attn_mask is_causal "
    "causal_offset scale dropout_p rng_state"
).split()


def raw_fwd(q, k, v, **kw):
    """torch.ops.rollingq.attention_fwd with keyword defaults (no rotation, no stats, ...)."""
    args = dict(
        rotation=None, rotated_queries=None, key_modality=None, num_modalities=0,
        key_padding_mask=None, attn_mask=None, is_causal=False, causal_offset=0,
        scale=1.0 / math.sqrt(q.shape[-1]), dropout_p=0.0, rng_state=None,
    )  # fmt: skip
    args.update(q=q, k=k, v=v, **kw)
    return torch.ops.rollingq.attention_fwd(*(args[n] for n in _FWD_NAMES))


def raw_bwd(grad_out, q, k, v, out, lse, **kw):
    args = dict(
        rotation=None, rotated_queries=None, key_padding_mask=None, attn_mask=None,
        is_causal=False, causal_offset=0, scale=1.0 / math.sqrt(q.shape[-1]), dropout_p=0.0,
        rng_state=None,
    )  # fmt: skip
    args.update(grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse, **kw)
    return torch.ops.rollingq.attention_bwd(*(args[n] for n in _BWD_NAMES))


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---- widths ---------------------------------------------------------------------------------
# num_modalities used to be stored as a 32-bit int after the ids were checked against the 64-bit
# value: 2**32 + 1 became 1 and an id of 1000 wrote 4000 bytes past a 4-byte buffer; 2**32 (0) and
# 2**31 (negative) left the statistics unwritten.

HUGE_M = [2**32 + 1, 2**32, 2**31, 2**63 - 1]


@pytest.mark.parametrize("M", HUGE_M)
def test_api_refuses_num_modalities_wider_than_32_bits(M):
    q, k = _randn(1, 1, 1, 1), _randn(1, 1, 2, 1, seed=1)
    ids = torch.tensor([0, 2**31 - 1000])
    with pytest.raises(ValueError, match=r"num_modalities must be < 2\*\*31; got " + str(M)):
        rolling_attention(
            q, k, k, key_modality=ids, num_modalities=M, return_stats=True, backend="cpu"
        )


@needs_op
@pytest.mark.parametrize("M", [*HUGE_M, -1])
def test_op_refuses_num_modalities_wider_than_32_bits(M):
    q, k = _randn(1, 1, 1, 1), _randn(1, 1, 2, 1, seed=1)
    ids = torch.tensor([[0, 1000]])
    with pytest.raises(
        RuntimeError, match=rf"num_modalities must lie in \[0, 2\^31 - 1\]; got {M}"
    ):
        raw_fwd(q, k, k, key_modality=ids, num_modalities=M)


@needs_op
def test_op_statistics_at_the_largest_id_are_written():
    # the widest id the kernels index with the statistics all written (NaN-poisoned outputs)
    q, k, v = _randn(1, 2, 3, 4), _randn(1, 2, 5, 4, seed=1), _randn(1, 2, 5, 3, seed=2)
    ids = torch.tensor([[4, -1, 0, 4, 2]])
    with nan_poisoned_outputs():
        out, lse, mass, key_sum, key_count = raw_fwd(q, k, v, key_modality=ids, num_modalities=5)
    ref_out, ref = rolling_attention_reference(
        q.double(), k.double(), v.double(), key_modality=ids, num_modalities=5, return_stats=True
    )
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.double(), ref.modality_mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(key_sum.double(), ref.key_sum, rtol=1e-5, atol=1e-6)
    assert key_count.tolist() == [[1.0, 0.0, 1.0, 0.0, 2.0]]


# Ids used to be cast to int32 before their range check: 2**32 + 1 was counted as modality 1.
WIDE_IDS = [2**32 + 1, -(2**32) + 1, 2**31, -(2**40)]


@needs_op
@pytest.mark.parametrize("bad", WIDE_IDS)
def test_op_checks_ids_in_their_own_width(bad):
    q, k = _randn(1, 1, 2, 4), _randn(1, 1, 4, 4, seed=1)
    ids = torch.tensor([[0, 1, bad, 0]], dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"key_modality ids must lie in \[-1, 1\].*{bad}"):
        raw_fwd(q, k, k, key_modality=ids, num_modalities=2)


@pytest.mark.parametrize("bad", WIDE_IDS)
def test_api_checks_ids_in_their_own_width(bad):
    q, k = _randn(1, 1, 2, 4), _randn(1, 1, 4, 4, seed=1)
    ids = torch.tensor([0, 1, bad, 0], dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"key_modality ids must lie in \[-1, 1\].*{bad}"):
        rolling_attention(q, k, k, key_modality=ids, num_modalities=2, return_stats=True)


@needs_op
@pytest.mark.parametrize(
    "dtype,bad",
    [
        (torch.uint8, 200),
        (torch.int8, -100),
        (torch.int16, 300),
        (torch.int32, -7),
        (torch.uint16, 40000),
        (torch.uint32, 70000),
        (torch.uint64, 2**40),
    ],
    ids=str,
)
def test_op_checks_narrow_ids_too(dtype, bad):
    q, k = _randn(1, 1, 2, 4), _randn(1, 1, 3, 4, seed=1)
    ids = torch.tensor([[0, bad, 1]], dtype=dtype)
    with pytest.raises(ValueError, match=rf"key_modality ids must lie in \[-1, 1\].*{bad}"):
        raw_fwd(q, k, k, key_modality=ids, num_modalities=2)


# ---- NaN and infinity -----------------------------------------------------------------------
# The rule (docs/numerics.md): softmax(q k^T * scale + mask) v evaluated as SDPA's math backend
# does, where hidden positions (padding, causality, a False in a bool mask) are -inf *replacing*
# the score. A NaN in q row i poisons row i; a NaN in k or v of a visible key poisons every row
# that sees it; a +inf score gives a NaN row; a row that sees no key gives zeros and lse = -inf.
# Positions 3 and 35 of a 40-key block fall in the vectorised part and in the scalar remainder
# of the CPU kernel's row loops (31: the last 16-key chunk of the vectorised part): the answer must
# not depend on which.

LK = 40


def _nan_case(dtype=torch.float32):
    q = _randn(2, 2, 5, 8, dtype=dtype, seed=3)
    k = _randn(2, 2, LK, 8, dtype=dtype, seed=4)
    v = _randn(2, 2, LK, 6, dtype=dtype, seed=5)
    return q, k, v


def _run(entry, q, k, v, *, key_padding_mask=None, scale=None):
    """(out, lse, modality_mass) through the public function (backend cpu) or the raw op."""
    ids = torch.zeros(q.shape[0], k.shape[2], dtype=torch.int32)
    ids[:, ::3] = 1
    with nan_poisoned_outputs():
        if entry == "api":
            out, st = rolling_attention(
                q, k, v, key_modality=ids, num_modalities=2, key_padding_mask=key_padding_mask,
                scale=scale, return_stats=True, backend="cpu",
            )  # fmt: skip
            return out, st.lse, st.modality_mass
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, lse, mass, _, _ = raw_fwd(
            q, k, v, key_modality=ids, num_modalities=2, key_padding_mask=key_padding_mask,
            scale=scale,
        )  # fmt: skip
        return out, lse, mass


def _reference(q, k, v, *, key_padding_mask=None, scale=None):
    ids = torch.zeros(q.shape[0], k.shape[2], dtype=torch.int32)
    ids[:, ::3] = 1
    out, st = rolling_attention_reference(
        q.double(), k.double(), v.double(), key_modality=ids, num_modalities=2,
        key_padding_mask=key_padding_mask, scale=scale, return_stats=True,
    )  # fmt: skip
    return out, st.lse, st.modality_mass


def _assert_same_nan_and_values(got, want, rows_nan):
    """NaN exactly in ``rows_nan`` (B, H, Lq) for out / lse / mass, the rest close to the oracle."""
    for name, a, b in zip(("out", "lse", "modality_mass"), got, want):
        a = a.double()
        expect = rows_nan if name == "lse" else rows_nan[..., None].expand(b.shape)
        assert torch.equal(b.isnan(), expect), f"the oracle's {name} breaks the rule"
        assert torch.equal(a.isnan(), expect), (
            f"{name}: NaN at {torch.nonzero(a.isnan() != expect)[:6].tolist()} differs from "
            "the rule (NaN exactly in the rows that see the NaN)"
        )
        keep = ~expect
        torch.testing.assert_close(a[keep], b[keep], rtol=2e-5, atol=2e-6, msg=name)


ENTRIES = ["api", "op"]


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
def test_nan_query_poisons_its_row(entry):
    q, k, v = _nan_case()
    q[1, 0, 2, 5] = NAN
    rows = torch.zeros(2, 2, 5, dtype=torch.bool)
    rows[1, 0, 2] = True
    _assert_same_nan_and_values(_run(entry, q, k, v), _reference(q, k, v), rows)


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("j", [3, 31, 35], ids=["j3", "j31", "j35"])
def test_nan_key_poisons_every_row_that_sees_it_wherever_it_lies(entry, j):
    q, k, v = _nan_case()
    k[0, 1, j, 2] = NAN
    rows = torch.zeros(2, 2, 5, dtype=torch.bool)
    rows[0, 1] = True
    _assert_same_nan_and_values(_run(entry, q, k, v), _reference(q, k, v), rows)


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("j", [3, 35], ids=["j3", "j35"])
def test_infinite_score_gives_nan_not_the_value_of_its_key(entry, j):
    q, k, v = _nan_case()
    q = q.abs() + 0.1  # every score with an all-+inf key is +inf
    k[1, 1, j, :] = INF
    rows = torch.zeros(2, 2, 5, dtype=torch.bool)
    rows[1, 1] = True
    _assert_same_nan_and_values(_run(entry, q, k, v), _reference(q, k, v), rows)


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("j", [3, 35], ids=["j3", "j35"])
def test_minus_infinite_score_is_a_key_with_no_weight(entry, j):
    q, k, v = _nan_case()
    q = q.abs() + 0.1
    k[1, 1, j, :] = -INF
    rows = torch.zeros(2, 2, 5, dtype=torch.bool)
    got, want = _run(entry, q, k, v), _reference(q, k, v)
    _assert_same_nan_and_values(got, want, rows)
    # the same as leaving key j out
    keep = [c for c in range(LK) if c != j]
    ref = rolling_attention_reference(q.double(), k.double()[:, :, keep], v.double()[:, :, keep])
    torch.testing.assert_close(got[0].double()[1, 1], ref[1, 1], rtol=2e-5, atol=2e-6)


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
def test_nan_value_poisons_its_column_in_every_row_that_sees_its_key(entry):
    q, k, v = _nan_case()
    v[0, 0, 35, 4] = NAN
    got, want = _run(entry, q, k, v), _reference(q, k, v)
    for a in (got[0].double(), want[0]):
        expect = torch.zeros_like(a, dtype=torch.bool)
        expect[0, 0, :, 4] = True
        assert torch.equal(a.isnan(), expect)
    keep = ~want[0].isnan()
    torch.testing.assert_close(got[0].double()[keep], want[0][keep], rtol=2e-5, atol=2e-6)
    # lse and mass do not involve v
    for a, b in zip(got[1:], want[1:]):
        assert not a.isnan().any() and not b.isnan().any()


def _padded(j):
    pad = torch.ones(2, LK, dtype=torch.bool)
    pad[0, j] = False  # key j of sample 0 is padding
    pad[1, :] = False  # sample 1 sees no key at all
    return pad


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    "j",
    [3, 31, 35],
    ids=["j3", "j31", "j35"],
)
def test_nan_key_of_a_padded_position_reaches_no_row(entry, j):
    q, k, v = _nan_case()
    k[0, 0, j, 1] = NAN
    k[1, 1, 7, 0] = NAN  # sample 1 is all padding
    pad = _padded(j)
    rows = torch.zeros(2, 2, 5, dtype=torch.bool)
    got = _run(entry, q, k, v, key_padding_mask=pad)
    want = _reference(q, k, v, key_padding_mask=pad)
    _assert_same_nan_and_values(got, want, rows)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    assert torch.equal(got[1][1], torch.full_like(got[1][1], -INF))


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
def test_nan_query_of_a_row_that_sees_no_key_gives_zeros(entry):
    q, k, v = _nan_case()
    q[1, 0, 3, 2] = NAN
    pad = _padded(5)
    got = _run(entry, q, k, v, key_padding_mask=pad)
    want = _reference(q, k, v, key_padding_mask=pad)
    _assert_same_nan_and_values(got, want, torch.zeros(2, 2, 5, dtype=torch.bool))
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@needs_op
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_that_sees_no_key_gives_zeros_whatever_the_values_hold(entry, dtype):
    q, k, v = _nan_case(dtype)
    v[1, 0, 35, 2] = NAN  # sample 1 sees no key: its rows must still be zeros
    pad = _padded(5)
    got = _run(entry, q, k, v, key_padding_mask=pad)
    want = _reference(q, k, v, key_padding_mask=pad)
    assert torch.equal(want[0][1], torch.zeros_like(want[0][1]))
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [2**63 - 1, 2**62, -(2**63), -(2**62), 40, -6])
def test_op_causal_offset_of_any_int64_keeps_its_meaning(offset, dtype):
    # i + offset must not wrap in a kernel: an offset past Lk shows every key to every row, one
    # below -Lq hides every key (zeros, lse = -inf)
    q, k, v = _nan_case(dtype)
    with nan_poisoned_outputs():
        out, lse = raw_fwd(q, k, v, is_causal=True, causal_offset=offset)[:2]
    Lq, Lk = q.shape[2], k.shape[2]
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(max(min(offset, Lk), -Lq - 1))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    seen = mask.any(-1)
    want[..., ~seen, :] = 0
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert bool(torch.isfinite(lse[..., seen]).all())
    assert bool((lse[..., ~seen] == -INF).all())


def test_reference_nan_value_of_a_hidden_key_reaches_no_row():
    # the oracle: a hidden key takes no part in a row, not even as 0 * NaN
    q, k, v = _nan_case(torch.float64)
    v[0, 0, 4, 1] = NAN
    v[0, 1, 4, 2] = INF
    out = rolling_attention_reference(q, k, v, is_causal=True)
    assert torch.isfinite(out[0, :, :4]).all()  # rows 0..3 do not see key 4
    assert out[0, 0, 4, 1].isnan() and out[0, 1, 4, 2] == INF
    mask = torch.ones(5, LK, dtype=torch.bool)
    mask[:, 4] = False
    out = rolling_attention_reference(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    # a float mask does not hide: -inf is added, 0 * NaN is NaN there, as in SDPA
    fmask = torch.zeros(5, LK, dtype=torch.float64).masked_fill(~mask, -INF)
    out = rolling_attention_reference(q, k, v, attn_mask=fmask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, 0, :, 1].isnan().all()


def test_reference_key_sums_ignore_nan_of_keys_they_do_not_count():
    q, k, v = _nan_case(torch.float64)
    ids = torch.randint(0, 2, (2, LK), generator=torch.Generator().manual_seed(6))
    ids[0, 9] = -1
    pad = torch.ones(2, LK, dtype=torch.bool)
    pad[1, 11] = False
    k[0, :, 9, 0] = NAN  # counted nowhere (id -1)
    k[1, :, 11, 3] = INF  # padding
    k[0, 0, 20, 5] = NAN  # counted in its own modality only
    _, st = rolling_attention_reference(
        q, k, v, key_modality=ids, num_modalities=2, key_padding_mask=pad, return_stats=True
    )
    bad = torch.zeros_like(st.key_sum, dtype=torch.bool)
    bad[0, 0, ids[0, 20], 5] = True
    assert torch.equal(st.key_sum.isnan(), bad)
    clean = k.clone()
    clean[0, :, 9], clean[1, :, 11], clean[0, 0, 20] = 0, 0, 0
    _, want = rolling_attention_reference(
        q, clean, v, key_modality=ids, num_modalities=2, key_padding_mask=pad, return_stats=True
    )
    keep = ~bad
    keep[0, 0, ids[0, 20]] = False  # that sum lost key 20 in the clean copy
    torch.testing.assert_close(st.key_sum[keep], want.key_sum[keep])


# The oracle used to map lse = +inf to a shift of 0, returning +-inf where SDPA returns NaN.
@pytest.mark.parametrize(
    "dtype,scale", [(torch.float32, 1e38), (torch.float64, 1e308)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("via", ["reference", "api"])
def test_overflowing_scale_gives_nan_like_sdpa(dtype, scale, via):
    q = torch.tensor([2.0, 0.5], dtype=dtype).view(1, 1, 2, 1)
    k = torch.tensor([2.0, 1.0, -3.0], dtype=dtype).view(1, 1, 3, 1)
    v = _randn(1, 1, 3, 2, dtype=dtype)
    # row 0: scores 4 * scale = +inf -> NaN; row 1: 1 * scale and 0.5 * scale are finite
    if via == "reference":
        out, st = rolling_attention_reference(q, k, v, scale=scale, return_stats=True)
    else:
        out, st = rolling_attention(q, k, v, scale=scale, return_stats=True, backend="reference")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert want[0, 0, 0].isnan().all() and not want[0, 0, 1].isnan().any()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.isfinite(out[0, 0, 1]).all()
    torch.testing.assert_close(out[0, 0, 1], want[0, 0, 1])
    assert st.lse[0, 0, 0].isnan() and st.modality_mass[0, 0, 0].isnan().all()


# ---- second derivatives ---------------------------------------------------------------------
# Double backward through the fused op once returned zeros (torch only warned that the backward
# had no autograd kernel), so gradgradcheck failed silently in a user's Hessian-vector product.
# The backward op now has its own formula (tests/test_double_backward.py checks every feature).


def _grad_inputs(rotation=False):
    q, k, v = (_randn(1, 2, 3, 4, dtype=torch.float64, seed=s).requires_grad_() for s in (7, 8, 9))
    rot = None
    if rotation:
        rot = torch.linalg.qr(_randn(4, 4, dtype=torch.float64, seed=10))[0].requires_grad_()
    return q, k, v, rot


@needs_op
def test_double_backward_through_the_raw_op_is_not_zero():
    q, k, v, _ = _grad_inputs()
    out = raw_fwd(q, k, v)[0]
    (gk,) = torch.autograd.grad(out.square().sum(), k, create_graph=True)
    w = _randn(*gk.shape, dtype=gk.dtype, seed=11)  # (a key gradient's plain sum is always 0)
    got = torch.autograd.grad((gk * w).sum(), (q, k, v))
    out_r = rolling_attention(q, k, v, backend="reference")
    (gk_r,) = torch.autograd.grad(out_r.square().sum(), k, create_graph=True)
    want = torch.autograd.grad((gk_r * w).sum(), (q, k, v))
    for a, e in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@needs_op
def test_torch_func_grad_on_the_fused_op_equals_its_autograd_gradient():
    # torch.func.grad once raised here (the formula had no functorch form); it runs the same
    # formula as torch.autograd (the C++ node), so the gradients are the same bits
    q, k, v, _ = _grad_inputs()
    q, k, v = (t.detach() for t in (q, k, v))

    def loss(backend):
        return lambda a: rolling_attention(a, k, v, backend=backend).square().sum()

    got = torch.func.grad(loss("cpu"))(q)
    qg = q.clone().requires_grad_()
    loss("cpu")(qg).backward()
    assert torch.equal(got, qg.grad)
    torch.testing.assert_close(torch.func.grad(loss("reference"))(q), qg.grad)


# ---- the raw backward's arguments -----------------------------------------------------------


@needs_op
@pytest.mark.parametrize(
    "bad_lse,words",
    [
        (lambda lse: lse.long(), r"lse must have dtype Float .*got Long"),
        (lambda lse: lse.double(), r"lse must have dtype Float .*got Double"),
        (lambda lse: lse[..., :-1], r"lse must have shape \(1, 2, 3\); got \(1, 2, 2\)"),
    ],
    ids=["int64", "float64", "short"],
)
def test_raw_backward_refuses_an_lse_it_cannot_use(bad_lse, words):
    q, k, v = (_randn(1, 2, 3, 4, seed=s) for s in (1, 2, 3))
    out, lse, *_ = raw_fwd(q, k, v)
    with pytest.raises(RuntimeError, match=words):
        raw_bwd(torch.ones_like(out), q, k, v, out, bad_lse(lse))


@needs_op
def test_raw_backward_refuses_rotated_rows_without_rotation():
    q, k, v = (_randn(1, 2, 3, 4, seed=s) for s in (1, 2, 3))
    out, lse, *_ = raw_fwd(q, k, v)
    rows = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="rotated_queries was given without a rotation"):
        raw_bwd(torch.ones_like(out), q, k, v, out, lse, rotated_queries=rows)
    # the forward refuses it the same way
    with pytest.raises(RuntimeError, match="rotated_queries was given without a rotation"):
        raw_fwd(q, k, v, rotated_queries=rows)


# ---- loading --------------------------------------------------------------------------------


def test_stale_library_for_another_python_does_not_shadow_this_ones(tmp_path, monkeypatch):
    # a leftover build that sorts before this interpreter's must not be the one loaded
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for stale in ("_C.abi3.so", "_C.cpython-30-x86_64-linux-gnu.so", "_C.cpython-39.so"):
        (tmp_path / stale).write_bytes(b"rollingq-torch-version=1.0.0;")
    monkeypatch.setattr(fused_op, "_PACKAGE_DIR", str(tmp_path))
    assert fused_op.library_path("_C") is None
    (tmp_path / ("_C" + suffix)).write_bytes(b"rollingq-torch-version=1.0.0;")
    assert fused_op.library_path("_C") == os.path.join(str(tmp_path), "_C" + suffix)


# ---- dtypes of side inputs ------------------------------------------------------------------


def test_api_complex_key_modality_is_a_type_error_naming_it():
    q = _randn(1, 1, 2, 4)
    with pytest.raises(
        TypeError, match="key_modality must be an integer tensor; got torch.complex128"
    ):
        rolling_attention(q, q, q, key_modality=torch.zeros(2, dtype=torch.complex128))


@needs_op
@pytest.mark.parametrize("dtype", [torch.complex128, torch.float32, torch.bool], ids=str)
def test_op_non_integer_key_modality_is_refused_by_name(dtype):
    q = _randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="key_modality must be an integer tensor"):
        raw_fwd(q, q, q, key_modality=torch.zeros(1, 2, dtype=dtype), num_modalities=1)


# An inferred num_modalities (max id + 1) was not held to the 32-bit limit an explicit one is:
# an id of 2**32 + 1 made the op refuse M with a RuntimeError, and the reference try to allocate
# (B, Lk, 2**32) one-hot tensors.
@pytest.mark.parametrize("bad", [2**31 - 1, 2**32 + 1, 2**62])
def test_api_refuses_ids_whose_inferred_count_is_wider_than_32_bits(bad):
    from rollingq_kernels.api import make_problem

    q, k = _randn(1, 1, 2, 4), _randn(1, 1, 3, 4, seed=1)
    ids = torch.tensor([0, bad, 1])
    with pytest.raises(
        ValueError, match=rf"key_modality ids must lie in .*got values in \[0, {bad}\]"
    ):
        make_problem(q, k, k, key_modality=ids, return_stats=True)
    if fused_op.load_error() is None:
        with pytest.raises(ValueError, match=r"key_modality ids must lie in"):
            rolling_attention(q, k, k, key_modality=ids, return_stats=True, backend="cpu")


def test_api_checks_ids_of_an_empty_batch_too():
    # (Lk,) ids are the user's tensor whatever B is: B = 0 used to skip their range check
    q, k = _randn(0, 1, 2, 4), _randn(0, 1, 3, 4, seed=1)
    with pytest.raises(ValueError, match=r"key_modality ids must lie in \[-1, 2\]"):
        rolling_attention(q, k, k, key_modality=torch.tensor([0, -2, 1]), num_modalities=3)


def test_reference_infers_one_modality_from_empty_ids():
    # an empty batch's (0, Lk) ids used to make the oracle call max() on an empty tensor
    q, k = _randn(0, 1, 2, 4), _randn(0, 1, 3, 4, seed=1)
    out, st = rolling_attention_reference(
        q, k, k, key_modality=torch.zeros(0, 3, dtype=torch.int64), return_stats=True
    )
    assert out.shape == (0, 1, 2, 4) and st.modality_mass.shape == (0, 1, 2, 1)


@needs_op
def test_op_takes_a_problem_without_heads():
    # H = Hkv = 0 is an empty problem (the binding has a path for it), not "Hkv dividing H = 0"
    q, k, v = torch.randn(2, 0, 3, 4), torch.randn(2, 0, 5, 4), torch.randn(2, 0, 5, 6)
    ids = torch.tensor([[0, 1, -1, 1, 1], [1, 1, 1, 1, 1]])
    out, lse, mass, key_sum, key_count = raw_fwd(q, k, v, key_modality=ids, num_modalities=2)
    assert out.shape == (2, 0, 3, 6) and lse.shape == (2, 0, 3) and mass.shape == (2, 0, 3, 2)
    # key_count (B, M) counts keys, whatever the number of heads (as the reference does)
    assert key_sum.shape == (2, 0, 2, 4) and key_count.tolist() == [[1, 3], [0, 5]]
    pad = torch.tensor([[True, False, True, True, False], [True] * 5])
    *_, key_count = raw_fwd(q, k, v, key_modality=ids, num_modalities=2, key_padding_mask=pad)
    _, ref = rolling_attention_reference(
        q, k, v, key_modality=ids, num_modalities=2, key_padding_mask=pad, return_stats=True
    )
    assert key_count.tolist() == ref.key_count.tolist() == [[1, 1], [0, 5]]
    with pytest.raises(RuntimeError, match=r"k must have shape \(2, Hkv, Lk, 4\)"):
        raw_fwd(torch.randn(2, 3, 3, 4), k, v)


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 1, 1, 0, 3), (2, 1, 1, 4, 3)),
        ((2, 1, 1, 2, 3), (2, 1, 1, 0, 3)),
        ((0, 2, 1, 2, 3),) * 2,
    ],
    ids=["no_queries", "no_keys", "no_batch"],
)
def test_sdpa_drop_in_takes_empty_inputs_of_five_dims(shapes):
    # reshape(-1, ...) cannot infer the leading size of an empty tensor: it raised where torch
    # returns an empty or zero output
    from rollingq_kernels.api import scaled_dot_product_attention

    qs, ks = shapes
    q, k = torch.randn(qs), torch.randn(ks)
    mask = torch.ones(qs[-2], ks[-2], dtype=torch.bool)
    for m in (None, mask):
        out = scaled_dot_product_attention(q, k, k, attn_mask=m)
        want = F.scaled_dot_product_attention(q, k, k, attn_mask=m)
        assert out.shape == want.shape and torch.equal(out, want)


# ---- the sanitizer run ----------------------------------------------------------------------


@pytest.mark.skipif(
    "ROLLINGQ_SANITIZED_LIBRARY" not in os.environ, reason="only in `make sanitize`"
)
def test_sanitized_run_loads_the_sanitized_library_and_only_it():
    want = os.path.realpath(os.environ["ROLLINGQ_SANITIZED_LIBRARY"])
    assert fused_op.load_error() is None, fused_op.load_error()
    assert os.path.realpath(fused_op.library_path("_C")) == want
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "/" in line}
    ours = {p for p in mapped if os.path.basename(os.path.dirname(p)) == "rollingq_kernels"}
    assert {os.path.realpath(p) for p in ours} == {want}, ours
    assert any("libasan" in p for p in mapped), "the ASan runtime is not loaded"
