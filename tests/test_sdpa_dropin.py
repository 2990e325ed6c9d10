"""``rollingq_kernels.scaled_dot_product_attention`` / ``patch_sdpa`` / ``rolling_attention`` with
SDPA's arguments, against torch's SDPA and the float64 reference.

Every check runs through five entries: the drop-in (``dropin``), the drop-in with every call it
would hand to torch taken by this package's path instead (``dropin_fused``, see
fused_everywhere.py), ``rolling_attention`` with ``backend="auto"``, with ``backend="cpu"``
(skipped, with the reason, for a call the fused CPU kernel declines) and with
``backend="reference"``. The tests compare results, never which backend ran, so they hold whether
a call is fused or handed to torch / the reference.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from fused_everywhere import fused_everywhere
from helpers import _layout, assert_close, nan_poisoned_outputs
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import rollingq_kernels as rk
from rollingq_kernels import api
from rollingq_kernels.api import make_problem
from rollingq_kernels.dropout import dropout_keep_mask, new_rng_state
from rollingq_kernels.reference import rolling_attention_reference

TORCH_SDPA = api._TORCH_SDPA  # torch's own, whatever is patched
ENTRIES = ["dropin", "dropin_fused", "auto", "cpu", "reference"]
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _sdpa_kwargs(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return dict(
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )  # fmt: skip


def _state(entry):
    return fused_everywhere() if entry.endswith("_fused") else contextlib.nullcontext()


def _skip_unless_runs(name, q, k, v, kw):
    """Skip (naming the reasons) when backend ``name`` cannot run this call."""
    problem = make_problem(q, k, v, **{**kw, "rng_state": torch.zeros(2, dtype=torch.int64)})
    reasons = rk.backends._REGISTRY[name].reasons(problem)
    if reasons:
        pytest.skip(f"backend {name!r} declines this call: {'; '.join(reasons)}")


def run(entry, q, k, v, *, rng_state=None, **kw):
    """One call through ``entry``; kw are SDPA's keyword arguments."""
    kw = _sdpa_kwargs(**kw)
    if entry.startswith("dropin"):
        assert rng_state is None
        with _state(entry):
            return rk.scaled_dot_product_attention(q, k, v, **kw)
    if entry == "cpu":
        _skip_unless_runs("cpu", q, k, v, kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback notice
        return rk.rolling_attention(q, k, v, **kw, rng_state=rng_state, backend=entry)


def oracle(q, k, v, *, rng_state=None, **kw):
    """The float64 reference on the same inputs (a float mask in float64 too)."""
    kw = _sdpa_kwargs(**kw)
    mask = kw["attn_mask"]
    if isinstance(mask, CausalBias):  # a tensor subclass: keep it as it is
        mask = None
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        kw["attn_mask"] = mask.detach().double()
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    if isinstance(mask, torch.Tensor):
        # the reference takes a mask broadcastable to (B, H, Lq, Lk), as rolling_attention does
        m = kw["attn_mask"]
        kw["attn_mask"] = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    return rolling_attention_reference(q64, k64, v64, **kw, rng_state=rng_state)


def check(out, q, k, v, *, what="", **kw):
    """fp32: relative L2 <= 1e-5 vs the float64 reference; bf16: max error <= 2x torch's own
    bf16 SDPA error + 1e-3; float64 vs torch's float64 SDPA as a second oracle."""
    ref = oracle(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape, what
    if q.dtype == F32:
        assert_close(out, ref, rel=1e-5, name=f"{what} out")
    else:
        torch_low = TORCH_SDPA(q, k, v, **_sdpa_kwargs(**kw))
        bound = 2.0 * (torch_low.double() - ref).abs().max().item() + 1e-3
        err = (out.double() - ref).abs().max().item()
        assert err <= bound, f"{what}: max error {err:.3e} > 2x torch's {q.dtype} error {bound:.3e}"


def qkv(B=2, H=3, Lq=7, Lk=9, D=16, Dv=None, *, Hkv=None, dtype=F32, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, generator=g, dtype=F64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=F64)
    return tuple(_layout(t.to(dtype), layout) for t in (q, k, v))


# ---- masks of every broadcast shape ---------------------------------------------------------

MASK_SHAPES = {
    "Lq,Lk": lambda B, H, Lq, Lk: (Lq, Lk),
    "1,Lk": lambda B, H, Lq, Lk: (1, Lk),
    "1,1,Lq,Lk": lambda B, H, Lq, Lk: (1, 1, Lq, Lk),
    "B,1,1,Lk": lambda B, H, Lq, Lk: (B, 1, 1, Lk),
    "1,H,1,Lk": lambda B, H, Lq, Lk: (1, H, 1, Lk),
    "B,1,Lq,1": lambda B, H, Lq, Lk: (B, 1, Lq, 1),
    "H,Lq,Lk": lambda B, H, Lq, Lk: (H, Lq, Lk),
    "B,H,Lq,Lk": lambda B, H, Lq, Lk: (B, H, Lq, Lk),
}


def make_mask(shape, kind, dtype, *, seed=1, strided=True):
    """A random bool (True = takes part) or float mask (with some -inf), read through a strided
    view when ``strided`` (every other element of a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=g) < 0.7
    else:
        m = torch.randn(shape, generator=g, dtype=F64)
        m = m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf")).to(dtype)
    if strided and m.dim() > 0 and m.shape[-1] > 1:
        wide = torch.zeros(*m.shape[:-1], 2 * m.shape[-1], dtype=m.dtype)
        wide[..., ::2] = m
        m = wide[..., ::2]
        assert not m.is_contiguous()
    return m


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_attn_mask_every_broadcast_shape(entry, shape, kind, dtype):
    B, H, Lq, Lk = 2, 3, 7, 9
    q, k, v = qkv(B, H, Lq, Lk, dtype=dtype, seed=hash((shape, kind)) % 1000, layout="blhd")
    mask = make_mask(MASK_SHAPES[shape](B, H, Lq, Lk), kind, dtype)
    with nan_poisoned_outputs():
        out = run(entry, q, k, v, attn_mask=mask)
    check(out, q, k, v, attn_mask=mask, what=f"{entry} {kind} mask {shape}")
    if entry.startswith("dropin"):
        assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask), rel=1e-5 if dtype == F32 else 2e-2,
                     name="vs torch SDPA")  # fmt: skip


def test_reference_oracle_agrees_with_torch_sdpa_in_float64():
    # the oracle of this file is the reference: it must be torch's SDPA semantics exactly
    B, H, Lq, Lk = 2, 3, 7, 9
    q, k, v = qkv(B, H, Lq, Lk, dtype=F64, seed=5)
    for shape, fn in MASK_SHAPES.items():
        for kind in ("bool", "float"):
            mask = make_mask(fn(B, H, Lq, Lk), kind, F64)
            want = TORCH_SDPA(q, k, v, attn_mask=mask)
            got = oracle(q, k, v, attn_mask=mask)
            assert_close(got, want, rel=1e-12, name=f"{kind} {shape}")
    for bias in (causal_upper_left(Lq, Lk), causal_lower_right(Lq, Lk)):
        assert_close(oracle(q, k, v, attn_mask=bias), TORCH_SDPA(q, k, v, attn_mask=bias),
                     rel=1e-12, name=str(bias.variant))  # fmt: skip


# ---- causal alignments ----------------------------------------------------------------------

CAUSAL_LENGTHS = [(7, 7), (9, 5), (5, 9), (1, 6), (6, 1)]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("Lq,Lk", CAUSAL_LENGTHS)
@pytest.mark.parametrize("how", ["is_causal", "upper_left", "lower_right"])
def test_causal_alignments(entry, Lq, Lk, how):
    q, k, v = qkv(2, 3, Lq, Lk, seed=Lq * 10 + Lk, layout="strided")
    if how == "is_causal":
        kw = {"is_causal": True}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: lower right with Lq > Lk
            bias = (causal_upper_left if how == "upper_left" else causal_lower_right)(Lq, Lk)
        kw = {"attn_mask": bias}
    with nan_poisoned_outputs():
        out = run(entry, q, k, v, **kw)
    check(out, q, k, v, what=f"{entry} {how}", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = TORCH_SDPA(q, k, v, **kw)
    # rows with no visible key: zeros, as torch gives them
    assert_close(out, want, rel=1e-5, name=f"{entry} {how} vs torch SDPA")


# ---- grouped-query attention, scale, layouts ------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("Hkv", [1, 2, 3, 6])
@pytest.mark.parametrize("extra", ["none", "causal", "bool_mask", "float_mask"])
def test_grouped_query_attention(entry, Hkv, extra):
    B, H, Lq, Lk = 2, 6, 5, 8
    q, k, v = qkv(B, H, Lq, Lk, Hkv=Hkv, seed=Hkv, layout="blhd")
    kw = {"enable_gqa": True}
    if extra == "causal":
        kw["is_causal"] = True
    elif extra != "none":
        kind = extra.split("_")[0]
        kw["attn_mask"] = make_mask((B, 1, Lq, Lk), kind, F32)
    with nan_poisoned_outputs():
        out = run(entry, q, k, v, **kw)
    check(out, q, k, v, what=f"{entry} GQA Hkv={Hkv}", **kw)
    assert_close(out, TORCH_SDPA(q, k, v, **kw), rel=1e-5, name="vs torch SDPA")


def test_gqa_needs_enable_gqa_and_a_divisor_like_torch():
    q, k, v = qkv(2, 6, 5, 8, Hkv=4)
    for kw in ({"enable_gqa": True}, {}):
        with pytest.raises(RuntimeError):
            TORCH_SDPA(q, k, v, **kw)
        with pytest.raises(RuntimeError):  # the drop-in lets torch raise its own error
            rk.scaled_dot_product_attention(q, k, v, **kw)
        with pytest.raises(ValueError, match="head"):
            rk.rolling_attention(q, k, v, **kw)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("scale", [0.3, 1.7])
@pytest.mark.parametrize("Dv", [16, 24])
def test_scale_and_value_dim(entry, scale, Dv):
    q, k, v = qkv(2, 3, 7, 9, Dv=Dv, seed=int(scale * 10) + Dv)
    mask = make_mask((7, 9), "float", F32)
    out = run(entry, q, k, v, attn_mask=mask, scale=scale)
    check(out, q, k, v, attn_mask=mask, scale=scale, what=f"{entry} scale={scale}")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("layout", ["bhld", "blhd", "strided"])
@pytest.mark.parametrize("mask", [None, "bool"])
def test_output_in_q_layout(entry, layout, mask):
    q, k, v = qkv(2, 3, 7, 9, layout=layout, seed=3)
    m = None if mask is None else make_mask((2, 1, 1, 9), "bool", F32)
    if entry == "dropin" and m is not None:
        problem = make_problem(q, k, v, attn_mask=m)
        if not rk.backends.select_backend(problem, warn=False).fused:
            pytest.skip("no fused backend runs a masked call here: it is torch's SDPA's layout")
    out = run(entry, q, k, v, attn_mask=m)
    check(out, q, k, v, attn_mask=m, what=f"{entry} {layout}")
    if layout == "blhd":
        assert out.transpose(1, 2).is_contiguous(), out.stride()
    else:
        assert out.is_contiguous(), out.stride()


# ---- other ranks (drop-in only: rolling_attention is 4-D) -----------------------------------


@pytest.mark.parametrize("mask_shape", [None, (7, 9), (4, 7, 9), (4, 1, 9), (1, 7, 9)], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("entry", ["dropin", "dropin_fused"])
def test_three_dim_inputs(mask_shape, kind, entry):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, n, 16, generator=g) for n in (7, 9, 9))
    mask = None if mask_shape is None else make_mask(mask_shape, kind, F32)
    out = run(entry, q, k, v, attn_mask=mask)
    want = TORCH_SDPA(q.double(), k.double(), v.double(),
                      attn_mask=None if mask is None else (mask if kind == "bool" else mask.double()))  # fmt: skip
    assert out.shape == (4, 7, 16)
    assert_close(out, want, rel=1e-5, name="3-D")
    causal = run(entry, q, k, v, is_causal=True)
    assert_close(causal, TORCH_SDPA(q.double(), k.double(), v.double(), is_causal=True), rel=1e-5,
                 name="3-D causal")  # fmt: skip


@pytest.mark.parametrize("mask_shape", [None, (7, 9), (2, 1, 1, 1, 9), (2, 3, 4, 7, 9)], ids=str)
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("entry", ["dropin", "dropin_fused"])
def test_five_dim_inputs(mask_shape, gqa, entry):
    g = torch.Generator().manual_seed(5)
    Hkv = 2 if gqa else 4
    q = torch.randn(2, 3, 4, 7, 16, generator=g)
    k, v = (torch.randn(2, 3, Hkv, 9, 16, generator=g) for _ in range(2))
    mask = None if mask_shape is None else make_mask(mask_shape, "float", F32)
    out = run(entry, q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert out.shape == (2, 3, 4, 7, 16)
    dm = None if mask is None else mask.double()
    want = TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=dm, enable_gqa=gqa)
    assert_close(out, want, rel=1e-5, name="5-D")


def test_empty_and_odd_calls_go_where_torch_goes():
    q, k, v = qkv(2, 3, 0, 9)
    assert rk.scaled_dot_product_attention(q, k, v).shape == (2, 3, 0, 16)
    q, k, v = qkv(2, 3, 4, 0)
    assert_close(rk.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v), rel=0, name="Lk=0")
    # float16 on the CPU: the cpu kernel runs it (in float32), as close as float16 output allows
    q, k, v = qkv(1, 2, 5, 5, dtype=torch.float16)
    got = rk.scaled_dot_product_attention(q, k, v)
    assert got.dtype == torch.float16
    assert_close(got, TORCH_SDPA(q.double(), k.double(), v.double()), rel=2e-3, name="float16")


@pytest.mark.parametrize("layout", ["jagged", "strided"])
def test_nested_tensors_go_to_torch_and_rolling_attention_names_them(layout):
    # variable-length sequences as nested tensors: torch's SDPA runs them, so the drop-in hands
    # them over (they once reached the op, which no nested tensor implements, and raised)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randn(n, 3, 16, generator=g) for n in (5, 9)]
    if layout == "jagged":
        q = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    else:
        q = torch.nested.nested_tensor([s.transpose(0, 1) for s in seqs])
    got = rk.scaled_dot_product_attention(q, q, q)
    assert got.is_nested
    for i, s in enumerate(seqs):
        x = s.transpose(0, 1)[None]
        want = TORCH_SDPA(x, x, x)[0]
        assert_close(got.unbind()[i], want, rel=1e-6, name=f"sequence {i}")
    with pytest.raises(TypeError, match="q is a nested tensor; .* key_padding_mask"):
        rk.rolling_attention(q, q, q)


def test_a_nested_key_beside_a_dense_query_gets_torchs_error():
    # a strided nested key cannot give its shape: the drop-in once raised torch's internal
    # "NestedTensorImpl doesn't support sizes" from its own shape read
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k = torch.nested.nested_tensor([torch.randn(3, n, 8, generator=g) for n in (4, 6)])
    with pytest.raises(RuntimeError) as want:
        TORCH_SDPA(q, k, k)
    with pytest.raises(RuntimeError) as got:
        rk.scaled_dot_product_attention(q, k, k)
    assert str(got.value) == str(want.value)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["shard_heads", "shard_batch", "replicate"])
def test_dtensors_go_to_torch_and_rolling_attention_names_them(one_rank_group, placement):
    # tensor-parallel attention on DTensors: the drop-in does what torch's SDPA does with them
    # (this package's op has no sharding rules: the drop-in once raised "no sharding strategy
    # registered" where torch runs the call)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    place = {"shard_heads": Shard(1), "shard_batch": Shard(0), "replicate": Replicate()}[placement]
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    dq, dk, dv = (distribute_tensor(t, one_rank_group, [place]) for t in (q, k, v))
    got = rk.scaled_dot_product_attention(dq, dk, dv)
    want = TORCH_SDPA(dq, dk, dv)
    assert type(got).__name__ == "DTensor" and got.placements == want.placements
    assert_close(got.full_tensor(), TORCH_SDPA(q, k, v), rel=1e-6, name="out")
    # where torch's CPU kernel has no sharding rule (here: a causal call), the same error
    with pytest.raises(NotImplementedError) as want:
        TORCH_SDPA(dq, dk, dv, is_causal=True)
    with pytest.raises(NotImplementedError) as same:
        rk.scaled_dot_product_attention(dq, dk, dv, is_causal=True)
    assert str(same.value) == str(want.value)
    with pytest.raises(TypeError, match=r"q is a DTensor .*q\.to_local\(\)"):
        rk.rolling_attention(dq, dk, dv)
    # on the local shards, as the message says
    local = rk.rolling_attention(dq.to_local(), dk.to_local(), dv.to_local(), is_causal=True)
    assert_close(local, TORCH_SDPA(q, k, v, is_causal=True), rel=1e-5, name="local shards")


# ---- dropout --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("extra", ["none", "causal", "float_mask", "gqa"])
def test_dropout_is_the_keep_mask_of_rng_state(entry, extra):
    B, H, Lq, Lk, p = 2, 4, 7, 13, 0.3
    q, k, v = qkv(B, H, Lq, Lk, Hkv=2 if extra == "gqa" else None, seed=11, layout="blhd")
    kw = {"dropout_p": p, "enable_gqa": extra == "gqa", "is_causal": extra == "causal"}
    if extra == "float_mask":
        kw["attn_mask"] = make_mask((B, 1, Lq, Lk), "float", F32)
    rng = torch.tensor([123456789, 5], dtype=torch.int64)
    if entry == "cpu":
        _skip_unless_runs("cpu", q, k, v, _sdpa_kwargs(**kw))
    with nan_poisoned_outputs():
        out = run(entry, q, k, v, rng_state=rng, **kw)
    check(out, q, k, v, rng_state=rng, what=f"{entry} dropout", **kw)
    # the same thing written out: probabilities * keep / (1 - p)
    keep = dropout_keep_mask(rng, p, (B, H, Lq, Lk))
    no_drop = {**kw, "dropout_p": 0.0}
    s = q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2) / 4.0
    if extra == "causal":
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), float("-inf"))
    if extra == "float_mask":
        s = s + kw["attn_mask"].double()
    probs = torch.softmax(s, -1).nan_to_num(0.0)
    want = (probs * keep / (1 - p)) @ v.double().repeat_interleave(H // v.shape[1], 1)
    assert_close(out, want, rel=1e-5, name="written out")
    assert not torch.allclose(out.double(), oracle(q, k, v, **no_drop), atol=1e-3)


def test_keep_mask_statistics():
    rng = torch.tensor([7, 0], dtype=torch.int64)
    keep = dropout_keep_mask(rng, 0.25, (2, 3, 64, 67))
    n = keep.numel()
    frac = keep.double().mean().item()
    assert abs(frac - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, frac
    other = dropout_keep_mask(torch.tensor([7, 1], dtype=torch.int64), 0.25, (2, 3, 64, 67))
    agree = (keep == other).double().mean().item()  # independent masks agree on 0.75^2 + 0.25^2
    assert abs(agree - 0.625) < 0.02, agree


def _fused_for(q, k, v, **kw):
    problem = make_problem(
        q, k, v, **{**_sdpa_kwargs(**kw), "rng_state": torch.zeros(2, dtype=torch.int64)}
    )
    try:
        return rk.backends.select_backend(problem, warn=False).fused
    except rk.NoBackendError:
        return False


@pytest.mark.parametrize("extra", ["none", "bool_mask", "causal"])
@pytest.mark.parametrize("entry", ["dropin", "dropin_fused"])
def test_dropin_dropout_reproducible_from_manual_seed(extra, entry):
    with _state(entry):
        _dropout_reproducible(extra)


def _dropout_reproducible(extra):
    B, H, Lq, Lk, p = 2, 3, 9, 11, 0.2
    q, k, v = qkv(B, H, Lq, Lk, seed=21)
    kw = {"dropout_p": p, "is_causal": extra == "causal"}
    if extra == "bool_mask":
        kw["attn_mask"] = make_mask((Lq, Lk), "bool", F32)
    torch.manual_seed(1234)
    first = rk.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(1234)
    second = rk.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(first, second)
    third = rk.scaled_dot_product_attention(q, k, v, **kw)
    assert not torch.equal(first, third)
    torch.manual_seed(1234)
    if _fused_for(q, k, v, **kw):
        # a fused call: the keep-mask of a seed drawn from torch's generator
        want = oracle(q, k, v, rng_state=new_rng_state(), **kw)
        assert_close(first, want, rel=1e-5, name="fused dropout")
    else:
        # handed to torch: exactly torch's call, random stream included
        assert torch.equal(first, TORCH_SDPA(q, k, v, **kw))


def test_dropin_dropout_is_unbiased():
    # E[dropout(P)] = P: the mean over many seeds approaches the no-dropout output
    q, k, v = qkv(1, 2, 6, 8, seed=31)
    base = oracle(q, k, v)
    runs = torch.stack([rk.scaled_dot_product_attention(q, k, v, dropout_p=0.3).double()
                        for _ in range(400)])  # fmt: skip
    err = (runs.mean(0) - base).abs().max().item()
    spread = runs.std(0).max().item() / 400**0.5
    assert err < 5 * spread, (err, spread)


# ---- gradients ------------------------------------------------------------------------------

GRAD_CASES = {
    "plain": {},
    "bool_mask": {"attn_mask": ("bool", (2, 1, 7, 9))},
    "float_mask": {"attn_mask": ("float", (7, 9))},
    "lower_right": {"attn_mask": "lower_right"},
    "causal": {"is_causal": True},
    "gqa": {"enable_gqa": True},
    "dropout": {"dropout_p": 0.25},
    "dropout_gqa_mask": {
        "dropout_p": 0.25,
        "enable_gqa": True,
        "attn_mask": ("float", (2, 1, 1, 9)),
    },
}


def _grad_kwargs(case):
    kw = dict(GRAD_CASES[case])
    m = kw.get("attn_mask")
    if m == "lower_right":
        kw["attn_mask"] = causal_lower_right(7, 9)
    elif m is not None:
        kw["attn_mask"] = make_mask(m[1], m[0], F32, strided=False)
    return kw


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients(entry, case):
    kw = _grad_kwargs(case)
    Hkv = 1 if kw.get("enable_gqa") else None
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, 7, 9, Hkv=Hkv, seed=41, layout="blhd"))
    dropout = kw.get("dropout_p", 0.0) > 0
    if entry.startswith("dropin") and dropout:
        with _state(entry):
            fused = _fused_for(q, k, v, **kw)
            torch.manual_seed(99)
            rng = new_rng_state() if fused else None
            torch.manual_seed(99)
            out = rk.scaled_dot_product_attention(q, k, v, **_sdpa_kwargs(**kw))
        if rng is None:  # torch ran it: its own keep-mask, so compare with torch's gradients
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), g)
            q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
            torch.manual_seed(99)
            want_out = TORCH_SDPA(q2, k2, v2, **_sdpa_kwargs(**kw))
            want = torch.autograd.grad(want_out, (q2, k2, v2), g)
            assert torch.equal(out, want_out)
            for name, a, b in zip("qkv", got, want):
                assert_close(a, b, rel=1e-6, name=f"d{name}")
            return
    else:
        rng = torch.tensor([2024, 3], dtype=torch.int64) if dropout else None
        out = run(entry, q, k, v, rng_state=rng, **kw)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, rng_state=rng, **kw)
    ref_in = (q64, k64, v64)
    # oracle() detaches: recompute with grad through the reference itself
    kw64 = _sdpa_kwargs(**kw)
    m = kw64["attn_mask"]
    if isinstance(m, torch.Tensor) and not isinstance(m, CausalBias) and m.is_floating_point():
        kw64["attn_mask"] = kw64["attn_mask"].double()
    ref = rolling_attention_reference(*ref_in, **kw64, rng_state=rng)
    want = torch.autograd.grad(ref, ref_in, g.double())
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape
        assert_close(a, b, rel=2e-5, name=f"{entry} {case} d{name}")


@pytest.mark.parametrize("entry", ["dropin", "dropin_fused", "auto", "reference"])
def test_gradient_of_a_float_mask(entry):
    q, k, v = qkv(2, 3, 7, 9, dtype=F64, seed=51)
    mask = make_mask((1, 3, 7, 9), "float", F64, strided=False)
    mask = mask.clamp_min(-5.0).requires_grad_()  # finite, so that every entry has a gradient
    out = run(entry, q, k, v, attn_mask=mask)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, (mask,), g)
    m2 = mask.detach().requires_grad_()
    (want,) = torch.autograd.grad(TORCH_SDPA(q, k, v, attn_mask=m2), (m2,), g)
    assert_close(got, want, rel=1e-10, name="d attn_mask")


# ---- patch_sdpa -----------------------------------------------------------------------------


def test_patch_sdpa_installs_and_restores():
    original = F.scaled_dot_product_attention
    with rk.patch_sdpa():
        assert F.scaled_dot_product_attention is rk.scaled_dot_product_attention
        with rk.patch_sdpa():
            assert F.scaled_dot_product_attention is rk.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is rk.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original
    with pytest.raises(KeyError), rk.patch_sdpa():
        raise KeyError("inside")
    assert F.scaled_dot_product_attention is original


def test_patched_sdpa_calls_match_torch():
    q, k, v = qkv(2, 3, 7, 9, seed=61, layout="blhd")
    mask = make_mask((2, 1, 1, 9), "bool", F32)
    want = TORCH_SDPA(q, k, v, attn_mask=mask)
    with rk.patch_sdpa():
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # a positional call, as some libraries make it
        got_pos = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
    assert_close(got, want, rel=1e-5, name="patched")
    assert_close(got_pos, want, rel=1e-5, name="patched positional")


def test_causal_bias_is_accepted_by_type():
    bias = causal_lower_right(3, 5)
    assert isinstance(bias, CausalBias)
    q, k, v = qkv(1, 2, 3, 5)
    out = rk.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert_close(out, TORCH_SDPA(q, k, v, attn_mask=bias), rel=1e-5, name="CausalBias")


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["plain", "bool_mask", "causal_lower_right", "dropout", "gqa"])
def test_compiles_without_graph_breaks(extra):
    import torch._dynamo

    torch._dynamo.reset()
    Hkv = 1 if extra == "gqa" else 3
    q, k, v = qkv(2, 3, 7, 9, Hkv=Hkv, seed=71, layout="blhd")
    kw = {"enable_gqa": extra == "gqa"}
    if extra == "bool_mask":
        kw["attn_mask"] = make_mask((2, 1, 1, 9), "bool", F32)
    if extra == "causal_lower_right":
        kw["attn_mask"] = causal_lower_right(7, 9)
    if extra == "dropout":
        kw["dropout_p"] = 0.2

    def fn(q, k, v):
        return rk.scaled_dot_product_attention(q, k, v, **kw) * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    got = compiled(q, k, v)
    torch.manual_seed(5)
    want = fn(q, k, v)
    if extra == "dropout":
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.manual_seed(5)
        assert torch.equal(compiled(q, k, v), got)  # reproducible from the seed when compiled too
    else:
        assert_close(got, want, rel=1e-6, name=f"compiled {extra}")


# The first call of a process, compiled: the backend modules are imported during the trace.
_FIRST_CALL_COMPILED = """
import sys
import torch
import torch.nn.functional as F
import rollingq_kernels as rk
assert "rollingq_kernels._reference_backend" not in sys.modules
g = torch.Generator().manual_seed(4)
q = torch.randn(2, 8, 1, 24, generator=g)  # a decoding step of grouped-query attention
k, v = (torch.randn(2, 2, 37, 24, generator=g) for _ in range(2))
f = torch.compile(
    lambda q, k, v: rk.scaled_dot_product_attention(q, k, v, enable_gqa=True), fullgraph=True,
    backend="aot_eager",
)
err = (f(q, k, v) - F.scaled_dot_product_attention(q, k, v, enable_gqa=True)).abs().max()
print(err.item())
"""


def test_the_first_call_of_a_process_compiles_without_graph_breaks():
    # Backend modules are imported on a call's first look at them. torch.compile reads
    # sys.modules as it was when the trace began, so the module of a backend imported during the
    # trace was missing from it (KeyError, a graph break that fullgraph refuses); the suite's
    # other tests import every module first, hence a fresh process.
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL_COMPILED], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split()[-1]) < 1e-5
