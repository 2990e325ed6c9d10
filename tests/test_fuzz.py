"""Property-based fuzzing of the public functions and of the raw ops (hypothesis).

Every generated call either matches the float64 oracle (``rolling_attention_reference``) — NaN
exactly where the oracle has NaN — or raises a TypeError / ValueError (public functions) or
RuntimeError / NotImplementedError (raw ops) whose message names the argument at fault. Never a
crash, never a silent wrong answer. The inputs cover: sizes 0 and 1 and sizes that cross the
kernels' vector widths, query tiles and key blocks; every memory layout a view can have
(transposed, sliced, rows with gaps, stride-0 broadcasts, overlapping rows), with NaN in the gaps
of strided buffers so that a read outside the view shows; float64 / float32 / bfloat16 / float16; masks of
every broadcast shape and layout; ids of every integer dtype, in and out of range, up to +-2**62;
causal offsets up to +-2**63 (raw op); tiny, huge, zero and negative scales; NaN and +-inf
anywhere; dropout; grouped-query attention; the backward of the raw op.

Bounded for CI: a fixed number of examples per property, derandomised (the same cases on every
run). ``ROLLINGQ_FUZZ_EXAMPLES=N`` runs N fresh random examples per property instead, e.g.
``ROLLINGQ_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py``; a failure prints the
``@reproduce_failure`` line that replays it.

How close is close: the kernels' error against the float64 oracle is bounded per row by the
rounding of the scores (their size times the unit roundoff of the arithmetic, which moves the
softmax by a factor exp(2 delta)) and of the sums over keys, plus the rounding of the output;
see :func:`_tolerances`. Ill-conditioned rows (huge scores) get a wide bound and are then checked
for their NaN / inf pattern only. Cases whose scores could come within a factor 64 of the input
dtype's overflow threshold are skipped: whether 3.4e38 * (1 + 2**-24) overflows depends on the
order of the sums, which no two implementations share. Overflowing scores are covered with +-inf
inputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import nan_poisoned_outputs
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from rollingq_kernels import fused_op, rolling_attention, rolling_attention_reference
from rollingq_kernels.api import make_problem
from rollingq_kernels.api import scaled_dot_product_attention as rk_sdpa
from rollingq_kernels.backends import _REGISTRY, NoBackendError, select_backend
from rollingq_kernels.dropout import new_rng_state
from rollingq_kernels.op_contract import layout_like

_EXAMPLES = os.environ.get("ROLLINGQ_FUZZ_EXAMPLES")


def fuzz_settings(default_examples: int):
    return settings(
        max_examples=int(_EXAMPLES) if _EXAMPLES else default_examples,
        derandomize=_EXAMPLES is None,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


HAS_OP = fused_op.load_error() is None
NAN, INF = float("nan"), float("inf")
# float16 and bfloat16 rows are computed in float32: float32's arithmetic, their own storage
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24}  # arithmetic
U[torch.float16] = U[torch.float32]
U_OUT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # storage
U_OUT[torch.float16] = 2.0**-11
FMAX = {torch.float64: torch.finfo(torch.float64).max, torch.float32: 3.4e38}
FMAX[torch.bfloat16] = FMAX[torch.float16] = FMAX[torch.float32]  # their scores are float32

# ---- generation ---------------------------------------------------------------------------

LAYOUTS = [
    "contiguous",
    "transposed",  # a (B, L, H, D) buffer viewed as (B, H, L, D)
    "sliced",  # last dim of stride 2
    "rowgap",  # rows of a wider buffer (row stride > D)
    "permuted",  # last dim not contiguous at all (a (B, H, D, L) buffer transposed)
    "bcast_batch",  # stride 0 over the batch
    "bcast_head",  # stride 0 over the heads
    "bcast_rows",  # stride 0 over the rows: every row the same memory (overlapping rows)
]
_BCAST_DIM = {"bcast_batch": 0, "bcast_head": 1, "bcast_rows": 2}


def _base_shape(shape, layout):
    shape = list(shape)
    if layout in _BCAST_DIM:
        shape[_BCAST_DIM[layout]] = 1
    return shape


def realize(base: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """A tensor of ``shape`` holding ``base`` (broadcast where the layout broadcasts) in the given
    memory layout. The gaps of strided buffers hold NaN."""
    if layout in _BCAST_DIM:
        return base.expand(shape)
    if layout == "contiguous":
        return base.clone()
    if layout == "transposed":
        return base.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "permuted":
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    *lead, n = shape
    if layout == "sliced":
        buf = torch.full((*lead, 2 * n), NAN, dtype=base.dtype)
        buf[..., ::2] = base
        return buf[..., ::2]
    if layout == "rowgap":
        buf = torch.full((*lead, n + 3), NAN, dtype=base.dtype)
        buf[..., :n] = base
        return buf[..., :n]
    raise ValueError(layout)


class Gen:
    """Draws through hypothesis; tensor values come from a drawn seed."""

    def __init__(self, data):
        self.data = data
        self.g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    def __call__(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def one(self, *options, label=None):
        return self(st.sampled_from(options), label=label)

    def flag(self, p_true_label=None):
        return self(st.booleans(), label=p_true_label)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g, dtype=torch.float64)

    def tensor(self, name, shape, dtype, *, poison=True, magnitude=None):
        layout = self(st.sampled_from(LAYOUTS), label=f"{name} layout")
        mag = (
            magnitude if magnitude is not None else self.one(1.0, 0.05, 8.0, label=f"{name} scale")
        )
        base = self.randn(*_base_shape(shape, layout)) * mag
        if poison and base.numel() and self(st.integers(0, 5), label=f"{name} poisoned?") == 0:
            for _ in range(self(st.integers(1, 3), label=f"{name} poison count")):
                at = self(st.integers(0, base.numel() - 1), label=f"{name} poison index")
                base.view(-1)[at] = self.one(NAN, INF, -INF, label=f"{name} poison value")
        return realize(base.to(dtype), shape, layout)

    def bool_rows(self, name, shape, density=None):
        """A bool tensor (e.g. (B, L)) with the given density of True, in a drawn layout."""
        dens = density if density is not None else self.one(0.8, 0.5, 1.0, 0.0, label=f"{name} p")
        mask = self.rand(*shape) < dens
        how = self.one("contiguous", "sliced", "bcast", label=f"{name} layout")
        if how == "sliced" and mask.dim() and mask.shape[-1]:
            buf = torch.zeros(*mask.shape[:-1], 2 * mask.shape[-1], dtype=torch.bool)
            buf[..., ::2] = mask
            return buf[..., ::2]
        if how == "bcast" and mask.dim() == 2:
            return mask[:1].expand(mask.shape)
        return mask


def _sizes(gen: Gen):
    B = gen.one(1, 2, 3, 0, label="B")
    H = gen.one(1, 2, 3, 4, 0, label="H")
    Lq = gen(st.one_of(st.integers(1, 12), st.sampled_from([0, 17, 31, 33, 65, 129])), "Lq")
    Lk = gen(st.one_of(st.integers(1, 40), st.sampled_from([0, 63, 65, 129, 513, 530])), "Lk")
    D = gen(st.one_of(st.integers(1, 20), st.sampled_from([32, 40, 64, 96])), "D")
    Dv = D if gen.flag("Dv == D") else gen(st.integers(1, 24), "Dv")
    # keep each example cheap: the oracle materialises B*H*Lq*Lk scores in float64
    while B * H * Lq * Lk * (D + Dv) > 400_000 and Lq > 1:
        Lq = max(1, Lq // 2)
    while B * H * Lq * Lk * (D + Dv) > 400_000 and Lk > 1:
        Lk = max(1, Lk // 2)
    return B, H, Lq, Lk, D, Dv


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0] or [0]


# ---- the expected answer --------------------------------------------------------------------


def _finite(t):
    return torch.nan_to_num(t.double(), nan=0.0, posinf=0.0, neginf=0.0)


def _expand_heads(t, H):
    return t if t.shape[1] == H or t.shape[1] == 0 else t.repeat_interleave(H // t.shape[1], dim=1)


def _amax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """amax over ``dim`` (kept), 0 where that dim is empty."""
    if t.shape[dim] == 0:
        shape = list(t.shape)
        shape[dim] = 1
        return torch.zeros(shape, dtype=t.dtype)
    return t.amax(dim, keepdim=True)


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _tolerances(q_rot, q, rotation, k, v, scale, mask, dtype, dropout_p):
    """Absolute bounds for a kernel computing in ``dtype``'s arithmetic: (B, H, Lq, 1) for out,
    (B, H, Lq) for lse, the bound delta (B, H, Lq) on the error of a row's scores, and the size
    (B, H, Lq) its scores can reach."""
    u = U[dtype]
    D = q.shape[-1]
    qn = _finite(q_rot).norm(dim=-1)  # (B, H, Lq)
    if rotation is not None:  # the rotation's own rounding, for any (even non-orthogonal) R
        rn = _finite(rotation).flatten(-2).norm(dim=-1)
        rn = rn.view(1, -1, 1) if rn.dim() == 1 else rn
        qn = qn + rn * _finite(q).norm(dim=-1)
    kn = _amax(_expand_heads(_finite(k), q.shape[1]).norm(dim=-1), -1)  # (B, H, 1)
    size = abs(scale) * qn * kn
    delta = 4 * (D + 2) * u * size + 16 * u
    if rotation is not None and dtype == torch.bfloat16:
        delta = delta + 2.0**-7 * size  # a backend may round the rotated query to bfloat16
    if mask is not None and mask.dtype != torch.bool:
        m = _amax(_finite(mask).abs(), -1)[..., 0]  # (B, H, Lq)
        size = size + m
        delta = delta + 2 * u * m
    p_round = 0.0
    if dtype == torch.bfloat16:
        # a bfloat16 kernel may take exp to 2^-12 relative (a score error of 2^-12) and round
        # the probabilities to bfloat16 before P.V, as torch's and flash kernels do
        delta = delta + 2.0**-12
        p_round = 2.0**-8
    vmax = _amax(_expand_heads(_finite(v), q.shape[1]).abs().flatten(2), -1)  # (B, H, 1)
    Lk = k.shape[2]
    weight = 1.0 / (1.0 - dropout_p)
    out_tol = vmax * weight * (torch.expm1(2 * delta) + (Lk + 8) * u + p_round)
    lse_tol = delta + (Lk + 8) * u
    return out_tol[..., None], lse_tol, delta, size


def _visible(B, H, Lq, Lk, pad, mask, is_causal, offset):
    vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if pad is not None:
        vis &= pad[:, None, None, :]
    if is_causal:
        vis &= torch.ones(Lq, Lk, dtype=torch.bool).tril(offset)
    if mask is not None and mask.dtype == torch.bool:
        vis &= mask
    return vis


@dataclass
class Expected:
    """The oracle's answer and what may differ from it."""

    out: torch.Tensor
    stats: Optional[tuple]
    out_tol: torch.Tensor
    lse_tol: torch.Tensor
    delta: torch.Tensor
    # out elements where a NaN or inf of a value hidden from the row may show (0 * NaN in a
    # block's P.V product): implementation-defined, NaN or the oracle's value
    hidden_nonfinite: torch.Tensor
    # (B, H, Lq): the row sees no key (zeros whatever v holds, lse = -inf, zero mass). A row whose
    # visible scores are all -inf has lse = -inf too, but its keys take part: 0 * NaN is NaN there
    empty_rows: torch.Tensor
    v_has_inf: bool
    key_abs_sum: torch.Tensor  # (B, H, 1, D): sum over keys of |k|, the scale of a key sum
    Lk: int
    max_score: float  # the largest |score| the inputs can produce (finite parts)


def expected(q, k, v, *, rotation, rotated_queries, key_modality, num_modalities, pad, mask,
             is_causal, offset, scale, dropout_p, rng_state, return_stats, dtype) -> Expected:  # fmt: skip
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    rot64 = None if rotation is None else rotation.double()
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = rolling_attention_reference(
        q.double(), k.double(), v.double(), rotation=rot64, rotated_queries=rotated_queries,
        key_modality=key_modality, num_modalities=num_modalities if return_stats else None,
        key_padding_mask=pad, attn_mask=mask64, is_causal=is_causal,
        causal_offset=offset if is_causal else None, scale=scale, dropout_p=dropout_p,
        rng_state=rng_state, enable_gqa=k.shape[1] != H, return_stats=True,
    )  # fmt: skip
    out, stats = ref
    from rollingq_kernels.reference import apply_rotation

    q_rot = apply_rotation(_finite(q), rot64, rotated_queries)
    mask_full = None if mask is None else mask.expand(B, H, Lq, Lk)
    out_tol, lse_tol, delta, size = _tolerances(
        q_rot, q, rot64, k, v, scale, mask_full, dtype, dropout_p
    )
    vis = _visible(B, H, Lq, Lk, pad, mask_full, is_causal, offset)
    bad_v = ~torch.isfinite(_expand_heads(v.double(), H))  # (B, H, Lk, Dv)
    hidden = (~vis).double()
    hidden_nonfinite = (hidden @ bad_v.double()) > 0  # (B, H, Lq, Dv)
    return Expected(
        out=out,
        stats=stats if return_stats else None,
        out_tol=out_tol,
        lse_tol=lse_tol,
        delta=delta,
        hidden_nonfinite=hidden_nonfinite,
        empty_rows=~vis.any(-1),
        v_has_inf=bool(torch.isinf(v.double()).any()),
        key_abs_sum=_expand_heads(_finite(k), H).abs().sum(2, keepdim=True),
        Lk=Lk,
        max_score=float(size.max()) if size.numel() else 0.0,
    )


def _has_nonfinite(*ts):
    return any(
        t is not None and t.is_floating_point() and not torch.isfinite(t.double()).all() for t in ts
    )


def check(got_out, got_stats, exp: Expected, *, dtype, layout_of):
    """``got`` against the oracle under the rules of docs/numerics.md."""
    assert got_out.dtype == dtype, f"out dtype {got_out.dtype}, wanted {dtype}"
    assert got_out.shape == exp.out.shape, (
        f"out shape {tuple(got_out.shape)} != {tuple(exp.out.shape)}"
    )
    want_strides = layout_like(layout_of, exp.out.shape).stride()
    for d, n in enumerate(got_out.shape):
        if n > 1:
            assert got_out.stride(d) == want_strides[d], (
                f"out strides {got_out.stride()} are not q's layout {want_strides}"
            )
    a = got_out.detach().double()
    e = exp.out
    # rows that see no key: exactly zero
    empty = exp.empty_rows[..., None].expand(e.shape)
    bad = empty & (a != 0)
    assert not bad.any(), f"a row that sees no key is not zero at {torch.nonzero(bad)[:4].tolist()}"
    allowed_nan = exp.hidden_nonfinite & ~empty
    want_nan = e.isnan()
    miss = want_nan & ~a.isnan()
    assert not miss.any(), f"NaN expected at {torch.nonzero(miss)[:4].tolist()}, got finite"
    extra = a.isnan() & ~want_nan & ~allowed_nan
    if exp.v_has_inf:  # p * inf: a weight that underflows to 0 in one precision gives NaN
        extra &= ~torch.isinf(e)
    assert not extra.any(), f"NaN where the oracle has none at {torch.nonzero(extra)[:4].tolist()}"
    inf_e = torch.isinf(e) & ~a.isnan()
    assert torch.equal(a[inf_e], e[inf_e]), "infinite outputs differ"
    assert not (torch.isinf(a) & ~torch.isinf(e) & ~allowed_nan).any(), (
        "inf where the oracle is finite"
    )
    fin = torch.isfinite(e) & torch.isfinite(a)
    tol = (exp.out_tol.expand(e.shape) + U_OUT[dtype] * e.abs() + 1e-300)[fin]
    err = (a[fin] - e[fin]).abs()
    if err.numel():
        worst = torch.argmax(err / tol)
        assert bool((err <= tol).all()), (
            f"out: error {err[worst].item():.3e} > bound {tol[worst].item():.3e} "
            f"(got {a[fin][worst].item():.8g}, oracle {e[fin][worst].item():.8g})"
        )
    if exp.stats is None:
        return
    assert got_stats is not None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t in zip(got_stats._fields, got_stats):
        assert t.dtype == acc, f"{name} dtype {t.dtype}, wanted {acc}"
        assert not t.requires_grad, f"{name} requires grad"
    lse, mass, key_sum, key_count = (
        got_stats.lse.double(), got_stats.modality_mass.double(),
        got_stats.key_sum.double(), got_stats.key_count.double(),
    )  # fmt: skip
    r = exp.stats
    assert lse.shape == r.lse.shape and mass.shape == r.modality_mass.shape
    assert key_sum.shape == r.key_sum.shape and key_count.shape == r.key_count.shape
    assert torch.equal(key_count, r.key_count), "key_count differs"
    assert torch.equal(lse.isnan(), r.lse.isnan()), (
        f"lse NaN pattern differs at {torch.nonzero(lse.isnan() != r.lse.isnan())[:4].tolist()}"
    )
    assert torch.equal(mass.isnan(), r.modality_mass.isnan()), "modality_mass NaN pattern differs"
    minus = r.lse == -INF
    assert torch.equal(lse == -INF, minus), "lse = -inf must mark exactly the rows that see no key"
    assert bool((mass[minus[..., None].expand_as(mass)] == 0).all()), "empty rows need zero mass"
    fin = torch.isfinite(r.lse) & torch.isfinite(lse)
    lerr = (lse - r.lse).abs()[fin]
    ltol = (exp.lse_tol + 4 * U[dtype] * r.lse.abs())[fin]
    assert bool((lerr <= ltol).all()), f"lse error {lerr.max().item():.3e} beyond its bound"
    mtol = (torch.expm1(2 * exp.delta) + 8 * (exp.Lk + 8) * U[dtype] + 1e-12)[..., None]
    fin = torch.isfinite(r.modality_mass) & torch.isfinite(mass)
    merr = (mass - r.modality_mass).abs()
    assert bool((merr[fin] <= mtol.expand(mass.shape)[fin]).all()), (
        f"modality_mass error {merr[fin].max().item():.3e} beyond its bound"
    )
    # key sums: the same non-finite pattern, finite sums to the rounding of a sum of |k|
    ks = r.key_sum
    assert torch.equal(key_sum.isnan(), ks.isnan()), "key_sum NaN pattern differs"
    both_inf = torch.isinf(ks)
    assert torch.equal(key_sum[both_inf], ks[both_inf]), "key_sum inf pattern differs"
    fin = torch.isfinite(ks) & torch.isfinite(key_sum)
    kbound = (4 * (exp.Lk + 2) * U[dtype] * exp.key_abs_sum + 1e-300).expand(ks.shape)
    kerr = (key_sum - ks).abs()
    assert bool((kerr[fin] <= kbound[fin]).all()), "key_sum beyond its bound"


# ---- the public function ----------------------------------------------------------------------


@dataclass
class ApiCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict
    backend: str
    error: Optional[tuple] = None  # (exception types, a word the message must contain)
    offset: int = 0  # causal offset implied by is_causal / a CausalBias


def _draw_mask(gen: Gen, B, H, Lq, Lk, dtype):
    """An attn_mask of a random broadcast shape and layout, bool or float, or a CausalBias."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    kind = gen.one(
        "bool", "float", "float32", "causal_lower_right", "causal_upper_left", label="mask kind"
    )
    if kind == "causal_lower_right":
        return causal_lower_right(Lq, Lk), Lk - Lq
    if kind == "causal_upper_left":
        return causal_upper_left(Lq, Lk), 0
    full = (B, H, Lq, Lk)
    rank = gen(st.integers(1, 4), "mask rank")
    keep = [gen.flag(f"mask dim {d} full") for d in range(4)]
    shape = [n if keep[d] else 1 for d, n in enumerate(full)][4 - rank :]
    if kind == "bool":
        m = gen.rand(*shape) < gen.one(0.7, 0.3, 1.0, 0.0, label="mask density")
    else:
        m = gen.randn(*shape) * gen.one(1.0, 30.0, label="mask scale")
        hidden = gen.rand(*shape) < gen.one(0.0, 0.3, 1.0, label="mask -inf density")
        m = m.masked_fill(hidden, -INF)
        if m.numel() and gen(st.integers(0, 4), "mask poisoned?") == 0:
            m.view(-1)[gen(st.integers(0, m.numel() - 1), "mask poison index")] = gen.one(
                NAN, INF, -INF
            )
        m = m.to(torch.float32 if kind == "float32" else dtype)
    how = gen.one("as is", "transposed", "expanded", label="mask layout")
    if how == "transposed" and m.dim() >= 2:
        m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif how == "expanded" and m.dim() >= 1:
        # a stride-0 view of a smaller tensor: shape kept, memory shared along every size-1 dim
        small = m[tuple(slice(0, 1) for _ in range(m.dim() - 1))]
        m = small.expand(m.shape) if small.shape[-1] == m.shape[-1] else m
    return m, 0


BAD_ARGUMENTS = [
    "key_modality_range",
    "key_modality_huge",
    "key_modality_dtype",
    "key_modality_shape",
    "num_modalities_value",
    "num_modalities_type",
    "rotation_shape",
    "rotation_dtype",
    "rotated_queries_dtype",
    "rotated_queries_shape",
    "key_padding_mask_dtype",
    "key_padding_mask_shape",
    "attn_mask_dtype",
    "attn_mask_shape",
    "attn_mask_and_causal",
    "scale_value",
    "scale_type",
    "dropout_value",
    "rng_state",
    "gqa_heads",
    "k_dtype",
    "v_shape",
]


def draw_api_case(gen: Gen) -> ApiCase:
    dtype = gen.one(torch.float32, torch.float64, torch.bfloat16, torch.float16, label="dtype")
    B, H, Lq, Lk, D, Dv = _sizes(gen)
    gqa = H > 1 and gen.flag("gqa")
    Hkv = gen.one(*[d for d in _divisors(H) if d != H], label="Hkv") if gqa else H
    q = gen.tensor("q", (B, H, Lq, D), dtype)
    k = gen.tensor("k", (B, Hkv, Lk, D), dtype)
    v = gen.tensor("v", (B, Hkv, Lk, Dv), dtype)
    kw: dict = {}
    if gqa or gen(st.integers(0, 5), "enable_gqa anyway") == 0:
        kw["enable_gqa"] = True
    if gen.flag("rotation"):
        R = torch.linalg.qr(gen.randn(*((D, D) if gen.flag("shared") else (H, D, D))))[0]
        R = R * gen.one(1.0, 1.0, 1.5, label="rotation gain")  # not re-normalised: applied as is
        R = R.to(gen.one(torch.float32, torch.float64, torch.bfloat16, label="rotation dtype"))
        if gen.flag("rotation transposed view"):
            R = R.transpose(-1, -2)
        if R.dim() == 3 and gen.flag("rotation broadcast"):
            R = R[:1].expand(R.shape)
        kw["rotation"] = R
        sel = gen.one(None, "rows", "batch", label="rotated_queries")
        if sel == "rows":
            kw["rotated_queries"] = gen.bool_rows("rotated_queries", (Lq,), 0.5)
        elif sel == "batch":
            kw["rotated_queries"] = gen.bool_rows("rotated_queries", (B, Lq), 0.5)
    stats = gen.flag("return_stats")
    kw["return_stats"] = stats
    if gen.flag("key_modality"):
        M = gen(st.one_of(st.integers(1, 4), st.sampled_from([40])), "M")
        idt = gen.one(
            torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, label="ids dtype"
        )
        low = 0 if idt == torch.uint8 else -1
        shape = (Lk,) if gen.flag("ids (Lk,)") else (B, Lk)
        ids = torch.randint(low, M, shape, generator=gen.g).to(idt)
        if gen.flag("ids sliced") and Lk:
            buf = torch.zeros(*shape[:-1], 2 * Lk, dtype=idt)
            buf[..., ::2] = ids
            ids = buf[..., ::2]
        kw["key_modality"] = ids
        kw["num_modalities"] = gen.one(M, None, label="num_modalities")
    if gen.flag("key_padding_mask"):
        kw["key_padding_mask"] = gen.bool_rows("key_padding_mask", (B, Lk))
    offset = 0
    mask_choice = gen.one(None, None, "mask", "causal", label="masking")
    if mask_choice == "mask":
        kw["attn_mask"], offset = _draw_mask(gen, B, H, Lq, Lk, dtype)
    elif mask_choice == "causal":
        kw["is_causal"] = True
    scale = gen.one(
        None, None, 0.0, 1e-30, 1e-3, 0.125, 1.0, -0.7, 3.0, 40.0, 1e3, 1e30, label="scale"
    )
    if scale is not None:
        kw["scale"] = scale
    if gen(st.integers(0, 3), "dropout?") == 0:
        kw["dropout_p"] = gen.one(0.1, 0.5, 0.9, 1e-12, label="dropout_p")
        if gen.flag("explicit rng_state"):
            kw["rng_state"] = torch.tensor(
                [gen(st.integers(-(2**63), 2**63 - 1)), gen(st.integers(0, 2**40))],
                dtype=torch.int64,
            )
    backend = gen.one("auto", "cpu", "reference", label="backend")
    case = ApiCase(q, k, v, kw, backend, offset=offset)
    if gen(st.integers(0, 3), "bad argument?") == 0:
        _break(gen, case, B, H, Lq, Lk, D, dtype)
    return case


def _break(gen: Gen, case: ApiCase, B, H, Lq, Lk, D, dtype):
    """Make one argument invalid; record the error it must raise and the name it must give."""
    kw = case.kwargs
    what = gen.one(*BAD_ARGUMENTS, label="bad argument")
    if what == "key_modality_range" and Lk:
        ids = torch.zeros(Lk, dtype=torch.int64)
        ids[gen(st.integers(0, Lk - 1))] = gen.one(-2, 3, 2**31 - 1, label="bad id")
        kw.update(key_modality=ids, num_modalities=3)
        case.error = ((ValueError,), "key_modality")
    elif what == "key_modality_huge" and Lk:
        ids = torch.zeros(Lk, dtype=torch.int64)
        ids[-1] = gen.one(2**32 + 1, -(2**40), 2**62, label="huge id")
        kw.update(key_modality=ids, num_modalities=gen.one(2, None))
        case.error = ((ValueError,), "key_modality")
    elif what == "key_modality_dtype":
        kw["key_modality"] = torch.zeros(
            Lk, dtype=gen.one(torch.float32, torch.bool, torch.complex64)
        )
        case.error = ((TypeError,), "key_modality")
    elif what == "key_modality_shape":
        kw["key_modality"] = torch.zeros(Lk + 1, dtype=torch.int64)
        case.error = ((ValueError,), "key_modality")
    elif what == "num_modalities_value":
        kw["num_modalities"] = gen.one(0, -3, 2**31, 2**32 + 1, label="bad M")
        case.error = ((ValueError,), "num_modalities")
    elif what == "num_modalities_type":
        kw["num_modalities"] = gen.one(True, 2.0, "2", label="bad M type")
        case.error = ((TypeError,), "num_modalities")
    elif what == "rotation_shape":
        kw["rotation"] = torch.eye(D + 1)
        case.error = ((ValueError,), "rotation")
    elif what == "rotation_dtype":
        kw["rotation"] = torch.eye(D, dtype=torch.int64)
        case.error = ((TypeError,), "rotation")
    elif what == "rotated_queries_dtype":
        kw.update(rotation=torch.eye(D), rotated_queries=torch.ones(Lq, dtype=torch.int32))
        case.error = ((TypeError,), "rotated_queries")
    elif what == "rotated_queries_shape":
        kw.update(rotation=torch.eye(D), rotated_queries=torch.ones(Lq + 2, dtype=torch.bool))
        case.error = ((ValueError,), "rotated_queries")
    elif what == "key_padding_mask_dtype":
        kw["key_padding_mask"] = torch.ones(B, Lk, dtype=gen.one(torch.float32, torch.uint8))
        case.error = ((TypeError,), "key_padding_mask")
    elif what == "key_padding_mask_shape":
        kw["key_padding_mask"] = torch.ones(B + 1, Lk, dtype=torch.bool)
        case.error = ((ValueError,), "key_padding_mask")
    elif what == "attn_mask_dtype":
        kw.pop("is_causal", None)
        other = torch.float16 if dtype != torch.float16 else torch.float64  # not bool, fp32, q's
        kw["attn_mask"] = torch.ones(Lq, Lk, dtype=gen.one(torch.int32, other, torch.uint8))
        case.error = ((TypeError,), "attn_mask")
    elif what == "attn_mask_shape":
        kw.pop("is_causal", None)
        shape = gen.one((Lq + 2, Lk), (2, 1, 1, 1, 1), (B + 2, 1, Lq, Lk), label="bad mask shape")
        kw["attn_mask"] = torch.ones(shape, dtype=torch.bool)
        case.error = ((ValueError,), "attn_mask")
    elif what == "attn_mask_and_causal":
        kw.update(attn_mask=torch.ones(Lq, Lk, dtype=torch.bool), is_causal=True)
        case.error = ((ValueError,), "is_causal")
    elif what == "scale_value":
        kw["scale"] = gen.one(INF, NAN, -INF)
        case.error = ((ValueError,), "scale")
    elif what == "scale_type":
        kw["scale"] = gen.one("0.5", torch.tensor(0.5), True)
        case.error = ((TypeError,), "scale")
    elif what == "dropout_value":
        kw["dropout_p"] = gen.one(1.0, -0.1, 1.5)
        case.error = ((ValueError,), "dropout_p")
    elif what == "rng_state":
        kw.update(
            dropout_p=0.3,
            rng_state=gen.one(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)),
        )
        case.error = ((ValueError,), "rng_state")
    elif what == "gqa_heads" and H > 1:
        case.k = case.k[:, :1].expand(B, H + 1, *case.k.shape[2:])
        case.v = case.v[:, :1].expand(B, H + 1, *case.v.shape[2:])
        case.error = ((ValueError,), "heads")
    elif what == "k_dtype":
        case.k = case.k.to(torch.float64 if dtype != torch.float64 else torch.float32)
        case.error = ((TypeError,), "k has dtype")
    elif what == "v_shape":
        case.v = torch.zeros(B, case.k.shape[1], Lk + 1, 3, dtype=dtype)
        case.error = ((ValueError,), "v must have shape")


def _oracle_rng(case: ApiCase, seed: int):
    """The rng_state the call will use (drawn from torch's generator when not given)."""
    p = case.kwargs.get("dropout_p", 0.0)
    if p == 0.0 or p < 2.0**-32:
        return None
    if case.kwargs.get("rng_state") is not None:
        return case.kwargs["rng_state"]
    torch.manual_seed(seed)
    return new_rng_state()


@pytest.mark.skipif(not HAS_OP, reason=str(fused_op.load_error()))
@fuzz_settings(160)
@given(st.data())
def test_fuzz_rolling_attention(data):
    gen = Gen(data)
    case = draw_api_case(gen)
    kw = dict(case.kwargs)
    note(f"q {tuple(case.q.shape)} {case.q.dtype} strides {case.q.stride()}, k {tuple(case.k.shape)} "
         f"strides {case.k.stride()}, v {tuple(case.v.shape)}, backend {case.backend}, "
         f"kwargs { {n: (tuple(t.shape), t.dtype, t.stride()) if isinstance(t, torch.Tensor) else t for n, t in kw.items()} }")  # fmt: skip
    seed = gen(st.integers(0, 2**31 - 1), "torch seed")
    torch.manual_seed(seed)
    if case.error is not None:
        types, word = case.error
        with pytest.raises(types) as info:
            rolling_attention(case.q, case.k, case.v, backend=case.backend, **kw)
        assert word in str(info.value), f"{info.value!r} does not name {word!r}"
        return
    problem = make_problem(case.q, case.k, case.v, **kw)
    empty = min(case.q.numel(), case.k.numel(), case.v.numel()) == 0
    if case.backend == "cpu" and not empty:
        reasons = _REGISTRY["cpu"].reasons(problem)
        if reasons:  # declined by its declared features: a named error, never a wrong answer
            with pytest.raises(NoBackendError, match="backend 'cpu' cannot run"):
                rolling_attention(case.q, case.k, case.v, backend="cpu", **kw)
            return
    ran = "reference" if empty else select_backend(problem, case.backend, warn=False).name
    torch.manual_seed(seed)
    with nan_poisoned_outputs():
        result = rolling_attention(case.q, case.k, case.v, backend=case.backend, **kw)
    out, stats = result if kw["return_stats"] else (result, None)
    from torch.nn.attention.bias import CausalBias

    mask = kw.get("attn_mask")
    is_causal = kw.get("is_causal", False) or isinstance(mask, CausalBias)
    if isinstance(mask, CausalBias):
        mask = None
    rng = _oracle_rng(case, seed)
    p = kw.get("dropout_p", 0.0) if rng is not None else 0.0
    B, H, Lq, D = case.q.shape
    exp = expected(
        case.q, case.k, case.v, rotation=kw.get("rotation"),
        rotated_queries=problem.rotated_queries, key_modality=kw.get("key_modality"),
        num_modalities=problem.num_modalities if kw["return_stats"] else None,
        pad=kw.get("key_padding_mask"),
        mask=None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)),
        is_causal=is_causal, offset=case.offset, scale=problem.scale, dropout_p=p,
        rng_state=rng, return_stats=kw["return_stats"], dtype=case.q.dtype,
    )  # fmt: skip
    note(f"ran on {ran}")
    assume(exp.max_score < FMAX[case.q.dtype] / 64)  # no score near the overflow threshold
    check(out, stats, exp, dtype=case.q.dtype, layout_of=case.q)


# ---- gradients ----------------------------------------------------------------------------------


def _grad_case(gen):
    """float64 q, k, v (and a rotation that may require grad) with the features gradients see;
    (leaves, kwargs, backend)."""
    B, H, Lq, Lk, D, Dv = _sizes(gen)
    q, k, v = (
        gen.tensor(n, s, torch.float64, poison=False, magnitude=1.0).detach().requires_grad_()
        for n, s in (("q", (B, H, Lq, D)), ("k", (B, H, Lk, D)), ("v", (B, H, Lk, Dv)))
    )
    kw = dict(is_causal=gen.flag("causal"), scale=gen.one(None, 0.3, -1.1, label="scale"))
    if gen.flag("rotation"):
        kw["rotation"] = torch.linalg.qr(gen.randn(D, D))[0].requires_grad_(gen.flag("dR"))
        if gen.flag("rows"):
            kw["rotated_queries"] = gen.bool_rows("rotated_queries", (B, Lq), 0.5)
    if gen.flag("padding"):
        kw["key_padding_mask"] = gen.bool_rows("key_padding_mask", (B, Lk))
    backend = gen.one("cpu", "auto", label="backend")
    leaves = [q, k, v] + (
        [kw["rotation"]] if kw.get("rotation") is not None and kw["rotation"].requires_grad else []
    )
    return leaves, kw, backend


def _reference_leaves(leaves, kw):
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    rkw = dict(kw)
    if len(leaves) == 4:
        rkw["rotation"] = ref_leaves[3]
    return ref_leaves, rkw


def _check_grads(got, want, Lk, what):
    for name, a, b in zip(("dq", "dk", "dv", "drotation"), got, want):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        size = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        assert err <= 1e-9 * (1.0 + size) * max(1, Lk), (
            f"{what} {name}: error {err:.3e} (scale {size:.3e})"
        )


def _check_order(gen, order: int) -> None:
    """Gradients of a fused call against the reference's: the first order (a vjp with a random
    cotangent g), or the second (<first-order gradients, u> for random u, differentiated again)."""
    leaves, kw, backend = _grad_case(gen)
    q, k, v = leaves[:3]
    out = rolling_attention(q, k, v, backend=backend, **kw)
    g = gen.randn(*out.shape)
    us = [gen.randn(*t.shape) for t in leaves] if order == 2 else []

    def grads(out, leaves):
        first = torch.autograd.grad(out, leaves, g, create_graph=order == 2, allow_unused=True)
        if order == 1:
            return first
        terms = [(f * u).sum() for f, u in zip(first, us) if f is not None and f.requires_grad]
        if not terms:
            return [None] * len(leaves)
        return torch.autograd.grad(sum(terms), leaves, allow_unused=True)

    got = grads(out, leaves)
    ref_leaves, rkw = _reference_leaves(leaves, kw)
    want = grads(rolling_attention_reference(*ref_leaves[:3], **rkw), ref_leaves)
    _check_grads(got, want, k.shape[2], "first order" if order == 1 else "second order")


@pytest.mark.skipif(not HAS_OP, reason=str(fused_op.load_error()))
@fuzz_settings(40)
@given(st.data())
def test_fuzz_gradients_float64(data):
    _check_order(Gen(data), 1)


@pytest.mark.skipif(not HAS_OP, reason=str(fused_op.load_error()))
@fuzz_settings(25)
@given(st.data())
def test_fuzz_second_order_float64(data):
    # a double backward
    _check_order(Gen(data), 2)


# ---- the SDPA drop-in ------------------------------------------------------------------------


@fuzz_settings(80)
@given(st.data())
def test_fuzz_sdpa_drop_in_matches_torch(data):
    gen = Gen(data)
    dtype = gen.one(torch.float32, torch.float64, torch.bfloat16, torch.float16, label="dtype")
    B, H, Lq, Lk, D, Dv = _sizes(gen)
    Hkv = gen.one(*_divisors(H), label="Hkv") if H else H
    q = gen.tensor("q", (B, H, Lq, D), dtype, poison=False)
    k = gen.tensor("k", (B, Hkv, Lk, D), dtype, poison=False)
    v = gen.tensor("v", (B, Hkv, Lk, Dv), dtype, poison=False)
    nd = gen.one(4, 3, 5, label="rank")
    if nd == 3:
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    elif nd == 5:
        q, k, v = (t.unsqueeze(0).expand(2, *t.shape) for t in (q, k, v))
    mask = None
    if gen.flag("mask"):
        full = q.shape[:-1] + (k.shape[-2],)
        rank = gen(st.integers(1, len(full)), "mask rank")
        shape = [n if gen.flag("full") else 1 for n in full][len(full) - rank :]
        if gen.flag("bool mask"):
            mask = gen.rand(*shape) < 0.7
        else:
            mask = (gen.randn(*shape)).masked_fill(gen.rand(*shape) < 0.2, -INF)
            mask = mask.to(gen.one(dtype, torch.float32, label="mask dtype"))
    is_causal = mask is None and gen.flag("causal")
    scale = gen.one(None, 0.2, -1.0, label="scale")
    enable_gqa = gen.flag("enable_gqa")
    args = dict(
        attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    note(f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} {dtype}, mask "
         f"{None if mask is None else (tuple(mask.shape), mask.dtype)}, {args}")  # fmt: skip
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(
                q.double(), k.double(), v.double(),
                attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
                dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the drop-in must raise too
        note(f"torch refuses: {exc!r}")
        with pytest.raises(type(exc)):
            rk_sdpa(q, k, v, **args)
        return
    torch_low = None
    try:
        torch_low = F.scaled_dot_product_attention(q, k, v, **args)
    except Exception as exc:  # noqa: BLE001
        # torch's kernel for this dtype refuses what its math backend computes: the drop-in may
        # refuse it the same way or compute it (checked below), never answer wrongly
        note(f"torch refuses in {dtype}: {exc!r}")
        try:
            rk_sdpa(q, k, v, **args)
        except type(exc):
            return
    with nan_poisoned_outputs():
        got = rk_sdpa(q, k, v, **args)
    assert got.dtype == dtype and got.shape == want.shape
    if want.numel() == 0:
        return
    # one bound for the whole call (largest query and key norms, largest value)
    u = U[dtype]
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    size = abs(sc) * _max_abs(q.double().norm(dim=-1)) * _max_abs(k.double().norm(dim=-1))
    if mask is not None and mask.dtype != torch.bool:
        size += _max_abs(_finite(mask))
    delta = 4 * (D + 2) * u * size + 16 * u
    p_round = 0.0
    if dtype == torch.bfloat16:  # exp to 2^-12, probabilities rounded to bf16 (as _tolerances)
        delta, p_round = delta + 2.0**-12, 2.0**-8
    vmax = _max_abs(v.double())
    bound = vmax * (math.expm1(2 * delta) + (Lk + 8) * u + p_round)
    e = want.double()
    a = got.double()
    if torch_low is not None and torch.equal(got.isnan(), torch_low.isnan()):
        if torch.equal(got.nan_to_num(), torch_low.nan_to_num()):
            # a call handed to torch gets torch's own answer, its defects included (torch 2.13's
            # CPU flash kernel returns NaN for a negative scale with is_causal)
            return
    fin = torch.isfinite(e)
    assert torch.isfinite(a).all(), "the drop-in returned NaN / inf on finite inputs"
    tol = bound + U_OUT[dtype] * e.abs() + 1e-300
    if torch_low is not None and dtype in (torch.bfloat16, torch.float16):
        # a call the drop-in hands to torch is as precise as torch in that dtype (which rounds
        # the probabilities to it): the FlashAttention rule, twice torch's own error (where
        # torch's answer is a number: its NaN at a negative scale with is_causal is no yardstick)
        torch_err = (torch_low.double() - e).abs().nan_to_num(0.0, 0.0, 0.0).max()
        tol = torch.maximum(tol, 2 * torch_err + U_OUT[dtype] * e.abs())
    assert bool(((a - e).abs()[fin] <= tol[fin]).all()), (
        f"max error {(a - e).abs()[fin].max().item():.3e} beyond the bound"
    )


# ---- the raw ops -----------------------------------------------------------------------------


OP_BAD = [
    "key_modality_length",
    "key_modality_range",
    "key_modality_wide",
    "key_modality_float",
    "key_modality_missing",
    "num_modalities_value",
    "rotation_shape",
    "rotation_int",
    "rotated_queries_length",
    "rotated_queries_no_rotation",
    "key_padding_mask_dtype",
    "attn_mask_dtype",
    "attn_mask_shape",
    "causal_offset_without_causal",
    "scale_inf",
    "dropout_p_value",
    "rng_state_missing",
    "rng_state_shape",
    "q_dtype",
    "k_heads",
    "v_rows",
]


@pytest.mark.skipif(not HAS_OP, reason=str(fused_op.load_error()))
@fuzz_settings(160)
@given(st.data())
def test_fuzz_raw_ops(data):
    gen = Gen(data)
    op = torch.ops.rollingq
    dtype = gen.one(torch.float32, torch.float64, torch.bfloat16, torch.float16, label="dtype")
    B, H, Lq, Lk, D, Dv = _sizes(gen)
    Hkv = gen.one(*_divisors(H), label="Hkv") if H else 0
    if Hkv == 0:
        Hkv = H
    q = gen.tensor("q", (B, H, Lq, D), dtype)
    k = gen.tensor("k", (B, Hkv, Lk, D), dtype)
    v = gen.tensor("v", (B, Hkv, Lk, Dv), dtype)
    a = dict(
        rotation=None, rotated_queries=None, key_modality=None, num_modalities=0,
        key_padding_mask=None, attn_mask=None, is_causal=False, causal_offset=0,
        scale=gen.one(0.3, 1.0 / math.sqrt(D), -2.0, 0.0, 1e-20, label="scale"), dropout_p=0.0,
        rng_state=None,
    )  # fmt: skip
    if gen.flag("rotation"):
        R = torch.linalg.qr(gen.randn(*((D, D) if gen.flag("shared") else (H, D, D))))[0]
        a["rotation"] = R.to(gen.one(torch.float32, torch.float64, label="rotation dtype"))
        if gen.flag("rows"):
            rows_shape = gen.one((B, Lq), (Lq,), label="rows form")
            a["rotated_queries"] = gen.bool_rows("rotated_queries", rows_shape, 0.5)
    if gen.flag("stats"):
        M = gen(st.integers(1, 4), "M")
        idt = gen.one(torch.int32, torch.int64, torch.int8, torch.int16, label="ids dtype")
        a["key_modality"] = torch.randint(-1, M, (B, Lk), generator=gen.g).to(idt)
        form = gen.one("full", "broadcast", "shared", label="ids form")
        if form == "broadcast" and B > 1:
            a["key_modality"] = a["key_modality"][:1].expand(B, Lk)
        elif form == "shared" and B > 0:
            a["key_modality"] = a["key_modality"][0]  # (Lk,), possibly strided
        a["num_modalities"] = M
    if gen.flag("padding"):
        a["key_padding_mask"] = gen.bool_rows("key_padding_mask", (B, Lk))
    masking = gen.one(None, "mask", "causal", label="masking")
    if masking == "mask":
        from torch.nn.attention.bias import CausalBias

        a["attn_mask"], _ = _draw_mask(gen, B, H, Lq, Lk, dtype)
        if isinstance(a["attn_mask"], CausalBias):  # not a mask the op takes
            a["attn_mask"] = None
    elif masking == "causal":
        a["is_causal"] = True
        a["causal_offset"] = gen.one(
            0,
            0,
            1,
            -1,
            Lk - Lq,
            Lk + 3,
            -Lq - 3,
            2**40,
            -(2**40),
            2**62,
            2**63 - 1,
            -(2**63),
            label="offset",
        )
    if gen(st.integers(0, 4), "dropout?") == 0:
        a["dropout_p"] = gen.one(0.2, 0.75, label="dropout_p")
        a["rng_state"] = torch.tensor([gen(st.integers(-(2**63), 2**63 - 1)), 7], dtype=torch.int64)
    error = None
    if gen(st.integers(0, 3), "bad argument?") == 0:
        error = _break_op(gen, a, B, H, Lq, Lk, D, dtype)
        if error == "q has dtype":
            bad = gen.one(torch.int16, torch.complex64, label="bad dtype")
            q, k, v = q.to(bad), k.to(bad), v.to(bad)
        elif error == "k must have shape":
            k = k[:, :1].expand(B, H + 1, Lk, D) if H > 1 else k
            error = error if H > 1 else None
        elif error == "v must have shape":
            v = torch.zeros(B, Hkv, Lk + 1, Dv, dtype=dtype)
    note(f"q {tuple(q.shape)} {dtype} {q.stride()}, k {tuple(k.shape)} {k.stride()}, v {tuple(v.shape)} "
         f"{v.stride()}, args { {n: (tuple(t.shape), t.dtype, t.stride()) if isinstance(t, torch.Tensor) else t for n, t in a.items()} }")  # fmt: skip
    names = ("rotation rotated_queries key_modality num_modalities key_padding_mask attn_mask "
             "is_causal causal_offset scale dropout_p rng_state").split()  # fmt: skip
    call = lambda: op.attention_fwd(q, k, v, *(a[n] for n in names))  # noqa: E731
    if error is not None:
        # an id out of range is a ValueError (as from rolling_attention); the rest RuntimeError
        with pytest.raises(ValueError if error == "key_modality ids" else RuntimeError) as info:
            call()
        assert error in str(info.value), f"{info.value!r} does not name {error!r}"
        return
    try:
        with nan_poisoned_outputs():
            out, lse, mass, key_sum, key_count = call()
    except NotImplementedError as exc:  # an argument the CPU kernel does not implement yet
        msg = str(exc)
        declined = {
            "attn_mask": a["attn_mask"] is not None,
            "causal_offset": a["causal_offset"] != 0,
            "dropout": a["dropout_p"] > 0,
            "grouped-query": Hkv != H,
        }
        assert any(word in msg and on for word, on in declined.items()), (
            f"NotImplementedError that names no argument this call uses: {msg}"
        )
        return
    M = a["num_modalities"]
    exp = expected(
        q, k, v, rotation=a["rotation"], rotated_queries=a["rotated_queries"],
        key_modality=a["key_modality"], num_modalities=M if M else None,
        pad=a["key_padding_mask"],
        mask=None if a["attn_mask"] is None else a["attn_mask"].reshape((1,) * (4 - a["attn_mask"].dim()) + tuple(a["attn_mask"].shape)),
        is_causal=a["is_causal"], offset=a["causal_offset"], scale=a["scale"],
        dropout_p=a["dropout_p"], rng_state=a["rng_state"], return_stats=True, dtype=dtype,
    )  # fmt: skip
    from rollingq_kernels import AttentionStats

    assume(exp.max_score < FMAX[dtype] / 64)  # no score near the overflow threshold
    if M == 0:  # no statistics asked for: lse only, the others empty
        assert (
            mass.shape == (B, H, Lq, 0)
            and key_sum.shape == (B, H, 0, D)
            and key_count.shape == (B, 0)
        )
        r = exp.stats
        exp.stats = AttentionStats(
            r.modality_mass[..., :0], r.key_sum[:, :, :0], r.key_count[:, :0], r.lse
        )
    check(out, AttentionStats(mass, key_sum, key_count, lse), exp, dtype=dtype,
          layout_of=q)  # fmt: skip
    nonfinite = _has_nonfinite(q, k, v, a["attn_mask"]) or bool(exp.delta.isinf().any())

    # the backward of the same call, on finite float64 / float32 inputs
    low = dtype in (torch.bfloat16, torch.float16)  # their gradients: tests/test_cpu_kernel.py
    if nonfinite or low or a["dropout_p"] > 0 or not gen.flag("backward"):
        return
    grad = gen.randn(*out.shape).to(dtype)
    bwd_names = ("rotation rotated_queries key_padding_mask attn_mask is_causal causal_offset "
                 "scale dropout_p rng_state").split()  # fmt: skip
    bad_bwd = gen.one(None, None, "lse", "grad_out", "out", label="bad backward argument")
    lse_in, grad_in, out_in = lse, grad, out
    if bad_bwd == "lse":
        lse_in = gen.one(lse.long(), lse[..., :0] if Lq else lse.double(), lse.to(torch.float16))
    elif bad_bwd == "grad_out":
        grad_in = grad[..., :0] if Dv else grad.double()
    elif bad_bwd == "out":
        out_in = out.to(torch.float16)
    bwd = lambda: op.attention_bwd(grad_in, q, k, v, out_in, lse_in, *(a[n] for n in bwd_names))  # noqa: E731
    if bad_bwd is not None and not (
        bad_bwd == "lse" and lse_in.dtype == lse.dtype and lse_in.shape == lse.shape
    ):
        with pytest.raises(RuntimeError) as info:
            bwd()
        assert bad_bwd in str(info.value), f"{info.value!r} does not name {bad_bwd}"
        return
    with nan_poisoned_outputs():
        dq, dk, dv = bwd()
    for t, like in ((dq, q), (dk, k), (dv, v)):
        assert t.shape == like.shape and t.dtype == like.dtype
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = a["attn_mask"]
    ref = rolling_attention_reference(
        *leaves, rotation=None if a["rotation"] is None else a["rotation"].double(),
        rotated_queries=a["rotated_queries"], key_padding_mask=a["key_padding_mask"],
        attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
        is_causal=a["is_causal"], causal_offset=a["causal_offset"] if a["is_causal"] else None,
        scale=a["scale"], enable_gqa=Hkv != H,
    )  # fmt: skip
    want = torch.autograd.grad(ref, leaves, grad.double())
    # the scores' rounding (their size times the roundoff) moves every gradient by that factor
    cond = 1.0 + exp.max_score
    bound = 16 * U[dtype] * (D + Dv + Lk + Lq) * cond
    for name, got_g, want_g in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        size = _max_abs(want_g)
        err = _max_abs(got_g.double() - want_g)
        inputs = 1.0 + _max_abs(_finite(q)) + _max_abs(_finite(k)) + _max_abs(_finite(v))
        scale_g = (1.0 + size) * (1.0 + abs(a["scale"])) * (1.0 + _max_abs(_finite(grad)))
        assert err <= bound * scale_g * inputs, f"{name}: error {err:.3e} (gradient {size:.3e})"


def _break_op(gen: Gen, a: dict, B, H, Lq, Lk, D, dtype) -> Optional[str]:
    """Make one argument of the raw forward invalid; return the word its error must contain."""
    what = gen.one(*OP_BAD, label="bad op argument")
    if what == "key_modality_length":  # (Lk,) is the shared form; another length is not
        a.update(key_modality=torch.zeros(Lk + 1, dtype=torch.int32), num_modalities=2)
        return "key_modality"
    if what == "key_modality_range" and Lk and B:
        ids = torch.zeros(*gen.one((B, Lk), (Lk,), label="ids form"), dtype=torch.int32)
        ids.view(-1)[-1] = gen.one(-2, 2, 2**31 - 1)
        a.update(key_modality=ids, num_modalities=2)
        return "key_modality ids"
    if what == "key_modality_wide" and Lk and B:
        ids = torch.zeros(B, Lk, dtype=torch.int64)
        ids[0, 0] = gen.one(2**32 + 1, -(2**32) + 1, 2**40)
        a.update(key_modality=ids, num_modalities=2)
        return "key_modality ids"
    if what == "key_modality_float":
        a.update(
            key_modality=torch.zeros(
                B, Lk, dtype=gen.one(torch.float32, torch.complex128, torch.bool)
            ),
            num_modalities=1,
        )
        return "key_modality"
    if what == "key_modality_missing":
        a.update(key_modality=None, num_modalities=2)
        return "key_modality"
    if what == "num_modalities_value":
        a.update(
            key_modality=torch.zeros(B, Lk, dtype=torch.int64),
            num_modalities=gen.one(-1, 2**31, 2**32 + 1),
        )
        return "num_modalities"
    if what == "rotation_shape":
        a["rotation"] = torch.eye(D)[:, : max(D - 1, 0)] if D > 1 else torch.eye(D + 1)
        return "rotation"
    if what == "rotation_int":
        a["rotation"] = torch.eye(D, dtype=torch.int32)
        return "rotation"
    if what == "rotated_queries_length":  # (Lq,) is the shared form; another length is not
        a.update(rotation=torch.eye(D), rotated_queries=torch.ones(Lq + 1, dtype=torch.bool))
        return "rotated_queries"
    if what == "rotated_queries_no_rotation":
        a.update(rotation=None, rotated_queries=torch.ones(B, Lq, dtype=torch.bool))
        return "rotated_queries"
    if what == "key_padding_mask_dtype":
        a["key_padding_mask"] = torch.ones(B, Lk, dtype=torch.uint8)
        return "key_padding_mask"
    if what == "attn_mask_dtype":
        a["attn_mask"] = torch.zeros(
            Lq,
            Lk,
            dtype=gen.one(torch.int64, torch.float16 if dtype != torch.float16 else torch.int8),
        )
        return "attn_mask"
    if what == "attn_mask_shape":
        a["attn_mask"] = torch.zeros(gen.one((Lq + 2, Lk), (1, 1, 1, 1, 1), ()), dtype=torch.bool)
        return "attn_mask"
    if what == "causal_offset_without_causal":
        a.update(is_causal=False, causal_offset=gen.one(1, -5, 2**40))
        return "causal_offset"
    if what == "scale_inf":
        a["scale"] = gen.one(INF, NAN, -INF)
        return "scale"
    if what == "dropout_p_value":
        a["dropout_p"] = gen.one(1.0, -0.5, NAN)
        return "dropout_p"
    if what == "rng_state_missing":
        a.update(dropout_p=0.5, rng_state=None)
        return "rng_state"
    if what == "rng_state_shape":
        a.update(
            dropout_p=0.5,
            rng_state=gen.one(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)),
        )
        return "rng_state"
    if what == "q_dtype":
        a["attn_mask"] = None
        return "q has dtype"
    if what == "k_heads":
        return "k must have shape"
    if what == "v_rows":
        return "v must have shape"
    return None
