"""Shared test machinery: random inputs with every feature, the tolerance table, assert helpers.

Every backend test builds its inputs with :func:`make_case`, runs the backend, and compares it
with the float64 reference through :func:`check_against_reference`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.attention.bias import CausalBias as _CausalBias
from torch.utils._python_dispatch import TorchDispatchMode

from rollingq_kernels import rolling_attention_reference

# Relative L2 error (||out - ref|| / ||ref||) allowed per dtype (docs/design.md section 6). For float16 /
# bfloat16 the rule is relative to PyTorch's own error in that dtype, see low_precision_bound.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# stats are accumulated in float32 (float64 for float64 inputs)
STATS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def random_orthogonal(d: int, heads: Optional[int] = None, *, dtype=torch.float32, generator=None):
    """A random orthogonal (d, d) matrix, or (heads, d, d) of them (QR of a Gaussian matrix)."""
    shape = (d, d) if heads is None else (heads, d, d)
    a = torch.randn(*shape, dtype=torch.float64, generator=generator)
    qmat, r = torch.linalg.qr(a)
    # fix the signs so the distribution is uniform, and the result is a genuine rotation family
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return qmat.to(dtype)


@dataclass
class Case:
    """Inputs of one call; ``kwargs`` are the keyword arguments of rolling_attention."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def to(self, dtype=None, device=None) -> Case:
        def conv(t):
            if t is None or not isinstance(t, torch.Tensor):
                return t
            if isinstance(t, _CausalBias):
                return t  # a description of a mask (sizes, alignment), no data to convert
            if t.is_floating_point() and dtype is not None:
                return t.to(device=device, dtype=dtype)
            return t.to(device=device) if device is not None else t

        kw = {
            k: conv(v) if k != "rotation" else (None if v is None else v.to(device=device))
            for k, v in self.kwargs.items()
        }
        return Case(conv(self.q), conv(self.k), conv(self.v), kw)

    def requires_grad_(self) -> Case:
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        return self


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Return a tensor equal to x (B, H, L, D) but with the given memory layout."""
    if layout == "bhld":
        return x.contiguous()
    if layout == "blhd":  # the (B, L, H, D) projection output viewed through transpose(1, 2)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other element of a wider buffer: no unit stride anywhere
        B, H, L, D = x.shape
        big = torch.empty(B, H, L, 2 * D, dtype=x.dtype, device=x.device).normal_()
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


def make_case(
    B: int = 2,
    H: int = 3,
    Lq: int = 7,
    Lk: Optional[int] = None,
    D: int = 16,
    Dv: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    layout: str = "bhld",
    rotation: Optional[str] = None,  # None | "shared" | "per_head"
    rows: Optional[str] = None,  # None | "all" | "subset" (Lq,) | "batch" (B, Lq)
    modalities: int = 0,  # 0 = no key_modality; else M with some -1 ids
    cls_key: bool = True,  # with modalities: key 0 gets id -1
    padding: bool = False,
    causal: bool = False,
    scale: Optional[float] = None,
    return_stats: bool = True,
) -> Case:
    Lk = Lq if Lk is None else Lk
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dv, generator=g, dtype=torch.float64)
    q, k, v = (_layout(t.to(dtype), layout) for t in (q, k, v))
    kw: dict = {"is_causal": causal, "return_stats": return_stats}
    if scale is not None:
        kw["scale"] = scale
    if rotation is not None:
        heads = None if rotation == "shared" else H
        kw["rotation"] = random_orthogonal(D, heads, dtype=torch.float32, generator=g)
        if rows == "subset":
            sel = torch.rand(Lq, generator=g) < 0.5
            sel[0] = True
            kw["rotated_queries"] = sel
        elif rows == "batch":
            kw["rotated_queries"] = torch.rand(B, Lq, generator=g) < 0.5
    if modalities:
        ids = torch.randint(0, modalities, (B, Lk), generator=g)
        ids[torch.rand(B, Lk, generator=g) < 0.1] = -1
        if cls_key:
            ids[:, 0] = -1
        kw["key_modality"] = ids
        kw["num_modalities"] = modalities
    if padding:
        pad = torch.rand(B, Lk, generator=g) < 0.8
        pad[0, :] = False  # sample 0 sees no key at all: zero rows, lse = -inf
        if B > 1:
            pad[1, -1] = True
        kw["key_padding_mask"] = pad
    return Case(q, k, v, kw)


def reference(case: Case):
    """The oracle: the reference in float64 on the CPU."""
    c64 = case.to(dtype=torch.float64, device="cpu")
    kw = dict(c64.kwargs)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(torch.float64)
    return rolling_attention_reference(c64.q, c64.k, c64.v, **kw)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rel: float, name: str, atol: float = 0.0
) -> None:
    """Relative-L2 comparison that reports NaN/inf mismatches and the worst element."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = torch.nonzero(nan_a != nan_e)[:5].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {idx} ({int(nan_a.sum())} NaN in actual)")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        idx = torch.nonzero(inf_a != inf_e)[:5].tolist()
        raise AssertionError(f"{name}: inf mismatch at {idx}")
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    err = (a - e).norm().item()
    bound = rel * e.norm().item() + atol * math.sqrt(e.numel())
    if err > bound:
        worst = torch.argmax((a - e).abs()).item()
        raise AssertionError(
            f"{name}: ||err|| = {err:.3e} > {bound:.3e} (rel {err / max(e.norm().item(), 1e-300):.3e},"
            f" allowed {rel:.1e}); worst element {worst}: {a[worst].item():.6g} vs {e[worst].item():.6g}"
        )


def low_precision_bound(case: Case, dtype: torch.dtype) -> float:
    """Max abs error of the same attention computed by plain PyTorch in ``dtype``: the FlashAttention
    test rule allows a kernel twice that (plus a small floor)."""
    low = case.to(dtype=dtype)
    kw = dict(low.kwargs)
    kw["return_stats"] = False
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(dtype)
    out_low = _plain_low_precision(low.q, low.k, low.v, kw)
    ref = reference(case)
    ref_out = ref[0] if isinstance(ref, tuple) else ref
    return (out_low.double().cpu() - ref_out).abs().max().item()


def _plain_low_precision(q, k, v, kw):
    # Everything in the low dtype, as a user writing attention by hand in that dtype would.
    from rollingq_kernels.reference import apply_rotation, visibility_mask

    B, H, Lq, D = q.shape
    scale = kw.get("scale") or 1.0 / math.sqrt(D)
    qr = apply_rotation(q, kw.get("rotation"), kw.get("rotated_queries"))
    s = (qr @ k.transpose(-1, -2)) * scale
    vis = visibility_mask(
        B,
        Lq,
        k.shape[2],
        key_padding_mask=kw.get("key_padding_mask"),
        is_causal=kw.get("is_causal", False),
        device=q.device,
    )
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def check_against_reference(case: Case, out, stats=None, *, dtype: torch.dtype, what: str = ""):
    """Compare a backend's (out, stats) with the float64 reference under docs/design.md section 6."""
    ref = reference(case)
    ref_out, ref_stats = ref if isinstance(ref, tuple) else (ref, None)
    if dtype in REL_TOL:
        assert_close(out, ref_out, rel=REL_TOL[dtype], name=f"{what}out")
    else:
        bound = 2.0 * low_precision_bound(case, dtype) + 1e-3
        err = (out.detach().double().cpu() - ref_out).abs().max().item()
        assert err <= bound, (
            f"{what}out: max error {err:.3e} > 2x PyTorch's {dtype} error ({bound:.3e})"
        )
    if stats is None:
        return
    assert ref_stats is not None
    stol = STATS_TOL[dtype]
    # lse: -inf rows must match exactly, finite rows to tolerance
    assert_close(stats.lse, ref_stats.lse, rel=stol, name=f"{what}lse")
    assert_close(
        stats.modality_mass,
        ref_stats.modality_mass,
        rel=stol,
        name=f"{what}modality_mass",
        atol=1e-7,
    )
    assert_close(
        stats.key_sum,
        ref_stats.key_sum,
        rel=stol if dtype != torch.float64 else 1e-12,
        name=f"{what}key_sum",
    )
    assert torch.equal(stats.key_count.double().cpu(), ref_stats.key_count), f"{what}key_count"
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t in zip(stats._fields, stats):
        assert t.dtype == want_dtype, f"{what}{name} dtype {t.dtype}, wanted {want_dtype}"
        assert not t.requires_grad, f"{what}{name} must not require grad"


@contextlib.contextmanager
def nan_poisoned_outputs():
    """Every torch.empty inside the block returns NaN-filled memory, so an output element a
    kernel forgets to write shows up as NaN instead of passing with stale zeros."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


class CountKernelCalls(TorchDispatchMode):
    """Counts the calls of one of the compiled library's ops that reach the kernels (by default
    the forward; under vmap, after its batching rule: one per folded call)."""

    def __init__(self, op=None):
        super().__init__()
        self.op = torch.ops.rollingq.attention_fwd.default if op is None else op
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.calls += 1
        return func(*args, **(kwargs or {}))
