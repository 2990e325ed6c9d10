"""The per-call path of rolling_attention: what it caches, and what it must never cache.

Validation and dispatch are written for the cost of a tiny call (bench/overhead_bench.py); these
tests pin the rules that make that safe: value checks are redone on every CPU call, caches are
keyed so that a changed input or environment is seen, and the GPU-side memo of checked ids works
for tensors of any size.
"""

import gc

import pytest
import torch

import rollingq_kernels as rk
from rollingq_kernels import api, backends, fused_op
from rollingq_kernels.reference import rolling_attention_reference

CPU_OP = fused_op.load_error() is None


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_checked_ids_memo_takes_tensors_with_many_elements():
    # The memo is keyed by identity: a tensor's __eq__ is elementwise, so a dictionary keyed by
    # tensor value (weakref.WeakKeyDictionary) raises "Boolean value of Tensor with more than one
    # value is ambiguous" on the second lookup of a multi-element tensor.
    memo = api._VersionedCache()
    ids = torch.tensor([0, 1, 1, 0, -1, 1])
    assert memo.get(ids, 2) is None
    memo.put(ids, 2, True)
    assert memo.get(ids, 2) is True
    assert memo.get(ids, 3) is None  # another num_modalities: checked again
    ids.add_(0)  # an in-place write bumps the version counter
    assert memo.get(ids, 2) is None
    other = ids.clone()
    assert memo.get(other, 2) is None  # equal values, another tensor
    memo.put(ids, 2, True)
    assert len(memo._entries) == 1
    del ids
    gc.collect()
    assert memo._entries == {}  # the entry goes with its tensor


def test_cpu_ids_are_range_checked_on_every_call():
    q, k, v = (_rand(2, 3, 5, 8, seed=s) for s in (1, 2, 3))
    ids = torch.tensor([0, 1, 0, 1, 1])
    out, stats = rk.rolling_attention(
        q, k, v, key_modality=ids, num_modalities=2, return_stats=True
    )
    ref, ref_stats = rolling_attention_reference(
        q.double(), k.double(), v.double(), key_modality=ids, num_modalities=2, return_stats=True
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.modality_mass.double(), ref_stats.modality_mass)
    ids[2] = 7  # same tensor, now out of range
    with pytest.raises(ValueError, match=r"key_modality ids must lie in \[-1, 1\].*\[0, 7\]"):
        rk.rolling_attention(q, k, v, key_modality=ids, num_modalities=2, return_stats=True)
    ids.numpy()[2] = -3  # a write torch does not see (no version bump) is seen all the same
    with pytest.raises(ValueError, match=r"\[-3, 1\]"):
        rk.rolling_attention(q, k, v, key_modality=ids, num_modalities=2, return_stats=True)


INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
              torch.uint32, torch.uint64]  # fmt: skip


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_id_range_check_reads_every_integer_dtype(dtype):
    signed = dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    ids = torch.tensor([[0, 2, 1], [1, 1, -1 if signed else 0]], dtype=dtype)
    assert api._check_id_range(ids, None) == 3
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        api._check_id_range(ids, 2)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("how", ["1d", "2d", "strided", "broadcast"])
def test_id_range_scan_matches_aminmax(dtype, how):
    # the compiled scan (used for CPU ids) and the aminmax fallback agree on fresh random ids of
    # every layout; the scan reads in place, the fallback widens the unsigned types
    if fused_op.id_range_entry() is None:
        pytest.skip(str(fused_op.load_error()))
    g = torch.Generator().manual_seed(hash((str(dtype), how)) % 1000)
    lo = 0 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -50
    base = torch.randint(lo, 100, (3, 14), generator=g).to(dtype)
    ids = {
        "1d": base[1],
        "2d": base,
        "strided": base[:, ::3],
        "broadcast": base[:1].expand(3, 14),
    }[how]
    assert fused_op.id_range_entry()(ids) == api._aminmax_range(ids)
    assert api._cpu_id_range(ids) == api._aminmax_range(ids)
    with pytest.raises(ValueError, match="non-empty integer CPU tensor"):
        fused_op.id_range_entry()(ids[..., :0])
    with pytest.raises(ValueError, match="non-empty integer CPU tensor"):
        fused_op.id_range_entry()(ids.float())


def test_stats_without_key_modality_use_zero_ids_of_any_batch():
    # one cached (Lk,) zero-id tensor serves every batch size: the counts and masses must be those
    # of B batch entries with every key in modality 0
    for B, Lk in ((2, 5), (3, 5), (1, 7)):
        q, k, v = (_rand(B, 2, 4, 8, seed=s) for s in (4, 5, 6))
        k, v = k[:, :, :1].expand(B, 2, Lk, 8).contiguous(), v[:, :, :1].expand(B, 2, Lk, 8)
        p = api.make_problem(q, k, v, return_stats=True)
        assert p.key_modality.shape == (Lk,) and p.key_modality.dtype == torch.int32
        assert int(p.key_modality.abs().max()) == 0
        assert p.num_modalities == 1
        _, stats = rk.rolling_attention(q, k, v, return_stats=True)
        torch.testing.assert_close(stats.key_count, torch.full((B, 1), float(Lk)))
        torch.testing.assert_close(stats.modality_mass, torch.ones(B, 2, 4, 1))


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_named_backend_cache_still_checks_sizes_and_features():
    q, k, v = (_rand(1, 2, 6, 8, seed=s) for s in (7, 8, 9))
    assert rk.rolling_attention(q, k, v, backend="cpu").shape == (1, 2, 6, 8)
    # same sizes, a feature the cpu backend declines: the cached decision must not hide it
    bias = _rand(6, 6, seed=10).requires_grad_()
    with pytest.raises(rk.NoBackendError, match="'cpu' cannot run"):
        rk.rolling_attention(q, k, v, attn_mask=bias, backend="cpu")


def test_environment_override_is_read_on_every_call(monkeypatch):
    q, k, v = (_rand(1, 1, 4, 8, seed=s) for s in (11, 12, 13))
    p = api.make_problem(q, k, v)
    monkeypatch.delenv("ROLLINGQ_BACKEND", raising=False)
    first = backends.select_backend(p).name
    monkeypatch.setenv("ROLLINGQ_BACKEND", "reference")
    assert backends.select_backend(p).name == "reference"
    monkeypatch.setenv("ROLLINGQ_BACKEND", "")
    assert backends.select_backend(p).name == first
    monkeypatch.setenv("ROLLINGQ_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        backends.select_backend(p)


def test_side_inputs_are_canonicalised_without_copies():
    H, D = 3, 8
    q, k, v = (_rand(2, H, 5, D, seed=s) for s in (14, 15, 16))
    R = torch.linalg.qr(_rand(D, D, seed=17)).Q  # column-major: the kernels take its strides
    assert not R.is_contiguous()
    p = api.make_problem(q, k, v, rotation=R)
    assert p.rotation is R
    p = api.make_problem(q, k, v, rotation=R.double())  # converted to the accumulation dtype
    assert p.rotation.dtype == torch.float32
    torch.testing.assert_close(p.rotation, R)
    Rc = R.contiguous()
    p = api.make_problem(q, k, v, rotation=Rc)
    assert p.rotation.data_ptr() == Rc.data_ptr()  # float32 and contiguous: read in place
    rows = torch.tensor([True, False, False, True, False])
    ids = torch.tensor([0, 1, -1, 1, 0])  # int64: the op narrows it after the range check
    p = api.make_problem(
        q, k, v, rotation=Rc, rotated_queries=rows, key_modality=ids, return_stats=True
    )
    assert p.rotated_queries is rows and p.key_modality is ids and p.num_modalities == 2


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_short_and_full_side_inputs_agree(backend):
    # (D, D) / (Lq,) / (Lk,) forms give what their expansion to (H, D, D) / (B, Lq) / (B, Lk)
    # gives, values and gradients (the shared matrix gathers the gradient of every head)
    if backend == "cpu" and not CPU_OP:
        pytest.skip(str(fused_op.load_error()))
    B, H, Lq, Lk, D = 2, 3, 6, 7, 8
    q, k, v = (_rand(B, H, L, D, seed=s) for s, L in ((80, Lq), (81, Lk), (82, Lk)))
    R = torch.linalg.qr(_rand(D, D, seed=83)).Q.contiguous()
    rows = torch.tensor([True, False, True, False, False, True])
    ids = torch.tensor([0, 1, 1, -1, 0, 2, 1], dtype=torch.int16)
    results = []
    for short in (True, False):
        rot = R.clone().requires_grad_()
        qq = q.clone().requires_grad_()
        args = (rot, rows, ids) if short else (
            rot.expand(H, D, D), rows.expand(B, Lq), ids.expand(B, Lk)
        )  # fmt: skip
        out, stats = rk.rolling_attention(
            qq, k, v, rotation=args[0], rotated_queries=args[1], key_modality=args[2],
            num_modalities=3, return_stats=True, backend=backend,
        )  # fmt: skip
        out.square().sum().backward()
        results.append(
            (out, stats.modality_mass, stats.key_sum, stats.key_count, qq.grad, rot.grad)
        )
    for a, b in zip(*results):
        # float32 sums in another order (the shared matrix's gradient adds the heads up itself):
        # an absolute tolerance on the tensor's scale, as elements near zero come from cancellation
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * max(1.0, b.abs().max().item()))


# ---- the library's direct entry to the forward op (csrc/python_module.cpp) ----------------------


def _feature_args(seed):
    """op arguments of a call with every side input: rotated rows, ids, padding, a float mask,
    causal with an offset, dropout."""
    B, H, Lq, Lk, D = 2, 3, 7, 9, 8
    q = _rand(B, H, Lq, D, seed=seed)
    k = _rand(B, Lk, H, D, seed=seed + 1).transpose(1, 2)  # not contiguous
    v = _rand(B, H, Lk, D, seed=seed + 2)
    rows = torch.zeros(Lq, dtype=torch.bool)
    rows[::3] = True
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(-1, 3, (B, Lk), generator=g)
    pad = torch.rand(B, Lk, generator=g) > 0.2
    p = api.make_problem(
        q, k, v, rotation=torch.linalg.qr(_rand(D, D, seed=seed + 4)).Q, rotated_queries=rows,
        key_modality=ids, num_modalities=3, key_padding_mask=pad,
        attn_mask=_rand(Lq, Lk, seed=seed + 5), dropout_p=0.25, return_stats=True,
        rng_state=torch.tensor([seed, 0]),
    )  # fmt: skip
    return p.op_args()


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_direct_entry_raises_the_ops_errors():
    direct = fused_op.direct_entry()
    args = list(_feature_args(40))
    args[3] = torch.eye(5)  # a rotation of the wrong size
    with pytest.raises(RuntimeError, match=r"rotation must have shape \(8, 8\)"):
        direct(*args)
    args = list(_feature_args(41))
    args[5] = args[5].clone()
    args[5][0, 0] = 3  # an id outside [-1, M)
    for call in (direct, torch.ops.rollingq.attention_fwd.default):  # a ValueError either way
        with pytest.raises(ValueError, match=r"key_modality ids must lie in \[-1, 2\]"):
            call(*args)
    with pytest.raises(TypeError, match="14 arguments"):
        direct(*args[:13])


def _backward_args(seed):
    # the backward op's arguments (op_contract.BWD_SCHEMA) for the forward of _feature_args
    q, k, v, rot, rows, _ids, _m, pad, mask, causal, offset, scale, p, rng = _feature_args(seed)
    with torch._C._AutoDispatchBelowAutograd():
        out, lse, *_ = torch.ops.rollingq.attention_fwd.default(*_feature_args(seed))
    grad = _rand(*out.shape, seed=seed + 6)
    return (grad, q, k, v, out, lse, rot, rows, pad, mask, causal, offset, scale, p, rng)


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
@pytest.mark.parametrize("which", ["forward", "forward with autograd", "backward"])
def test_direct_entries_give_what_the_ops_give(which):
    if which.startswith("forward"):
        direct, op, make, n = (
            fused_op.direct_entry() if which == "forward" else fused_op.direct_autograd_entry(),
            torch.ops.rollingq.attention_fwd,
            _feature_args,
            5,
        )
    else:
        direct, op, make, n = (
            fused_op.direct_backward_entry(),
            torch.ops.rollingq.attention_bwd,
            _backward_args,
            3,
        )
    assert direct is not None
    for seed in (20, 30):
        args = make(seed)
        got = direct(*args)
        with torch._C._AutoDispatchBelowAutograd():
            want = op.default(*args)
        assert len(got) == n
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            assert torch.equal(a, b)


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_direct_backward_entry_raises_the_ops_errors_and_declines_the_rest():
    direct = fused_op.direct_backward_entry()
    args = list(_backward_args(40))
    bad = list(args)
    bad[5] = args[5][..., :-1]  # lse of the wrong shape
    with pytest.raises(RuntimeError, match="lse"):
        direct(*bad)
    with pytest.raises(TypeError, match="15 arguments"):
        direct(*args[:14])
    for i in (0, 1, 6):  # grad_out, q, the rotation
        sub = list(args)
        sub[i] = args[i].as_subclass(_Tagged)
        assert direct(*sub) is NotImplemented
    bad = list(args)
    bad[12] = 1  # an int scale
    assert direct(*bad) is NotImplemented
    with torch.overrides.TorchFunctionMode():
        assert direct(*args) is NotImplemented


class _Tagged(torch.Tensor):
    pass


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_direct_entry_leaves_subclasses_and_modes_to_torch_ops():
    direct = fused_op.direct_entry()
    args = list(_feature_args(50))
    for i in (0, 3, 8):  # q, the rotation, the mask
        sub = list(args)
        sub[i] = args[i].as_subclass(_Tagged)
        assert direct(*sub) is NotImplemented
    bad = list(args)
    bad[11] = 1  # an int scale: the schema's float, left to torch.ops to convert
    assert direct(*bad) is NotImplemented

    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        assert direct(*args) is NotImplemented
        q, k, v = args[:3]
        out = rk.rolling_attention(q, k, v, backend="cpu")
    assert any("rollingq.attention_fwd" in name for name in seen), seen
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_direct_entry_keeps_dispatch_modes():
    # the entry calls the op through the dispatcher: a dispatch mode still sees it
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (_rand(1, 2, 5, 8, seed=s) for s in (60, 61, 62))
    with Record():
        out = rk.rolling_attention(q, k, v, backend="cpu")
    assert "rollingq.attention_fwd.default" in seen
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


_CPP_NODE = "torch::autograd::CppNode<rollingq::EagerAttention>"


def _counting_entries(monkeypatch):
    calls = []

    def counting(name, entry):
        def call(*args):
            calls.append((name, len(args)))
            return entry(*args)

        return call

    monkeypatch.setattr(fused_op, "_DIRECT", counting("fwd", fused_op.direct_entry()))
    monkeypatch.setattr(
        fused_op, "_DIRECT_BACKWARD", counting("bwd", fused_op.direct_backward_entry())
    )
    monkeypatch.setattr(
        fused_op, "_DIRECT_AUTOGRAD", counting("autograd", fused_op.direct_autograd_entry())
    )
    return calls


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_calls_take_the_direct_entry_with_or_without_gradients(monkeypatch):
    calls = _counting_entries(monkeypatch)
    q, k, v = (_rand(1, 2, 5, 8, seed=s) for s in (70, 71, 72))
    rk.rolling_attention(q, k, v, backend="cpu")
    with torch.no_grad():
        rk.rolling_attention(q.requires_grad_(), k, v, backend="cpu")
    assert calls == [("fwd", 14)] * 2
    # q requires grad: the C++ autograd node, not the op's generic torch.library autograd layer
    # (tens of microseconds per call) nor the Python formula; its backward calls the op itself
    out = rk.rolling_attention(q, k, v, backend="cpu")
    assert calls == [("fwd", 14)] * 2 + [("autograd", 14)] and out.requires_grad
    assert out.grad_fn.name() == _CPP_NODE
    out.sum().backward()
    assert calls == [("fwd", 14)] * 2 + [("autograd", 14)] and q.grad is not None


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_a_rotation_that_needs_its_gradient_takes_the_python_formula(monkeypatch):
    # the C++ node differentiates q, k, v only: it declines, and the Python formula (which gives
    # dR) runs the forward and backward entries
    calls = _counting_entries(monkeypatch)
    q, k, v = (_rand(1, 2, 5, 8, seed=s) for s in (73, 74, 75))
    rot = torch.linalg.qr(_rand(8, 8, seed=76)).Q.requires_grad_()
    out = rk.rolling_attention(q, k, v, rotation=rot, backend="cpu")
    assert calls == [("autograd", 14), ("fwd", 14)]
    assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    out.sum().backward()
    assert calls[2:] == [("bwd", 15)] and rot.grad is not None and rot.grad.abs().sum() > 0
    # the entry itself says NotImplemented for it, and for a mask that requires grad
    args = list(_feature_args(77))
    entry = fused_op.direct_autograd_entry()
    for i in (3, 8):
        a = list(args)
        a[i] = a[i].clone().requires_grad_()
        assert entry(*a) is NotImplemented
    assert entry(*args) is not NotImplemented
    with pytest.raises(TypeError, match="14 arguments"):
        entry(*args[:13])
    sub = list(args)
    sub[0] = args[0].as_subclass(_Tagged)
    assert entry(*sub) is NotImplemented
    with torch.overrides.TorchFunctionMode():
        assert entry(*args) is NotImplemented


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_the_cpp_node_marks_the_statistics_non_differentiable_and_differentiates_twice():
    q, k, v = (_rand(2, 3, 6, 8, seed=s).requires_grad_() for s in (90, 91, 92))
    ids = torch.arange(6) % 2
    out, stats = rk.rolling_attention(
        q, k, v, key_modality=ids, num_modalities=2, return_stats=True, backend="cpu"
    )
    assert out.grad_fn.name() == _CPP_NODE
    assert not any(t.requires_grad for t in stats)
    # create_graph: the backward runs through autograd (the backward op), which differentiates
    # again (tests/test_double_backward.py checks the values)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad
    assert "attention_bwd" in type(dq.grad_fn).__name__
    # a second backward through the freed graph is torch's usual error
    out2 = rk.rolling_attention(q, k, v, backend="cpu")
    out2.sum().backward()
    with pytest.raises(RuntimeError, match="second time|freed"):
        out2.sum().backward()
    # an input changed in place after the forward is caught, as for any saved tensor
    k2 = k.detach().clone().requires_grad_()
    kk = k2 * 1.0
    out3 = rk.rolling_attention(q, kk, v, backend="cpu")
    kk.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out3.sum().backward()


def _registered_formula_grads(p, wrt, grad):
    # the op through torch.ops: the autograd formula registered on it by torch.library
    out = torch.ops.rollingq.attention_fwd(*p.op_args())[0]
    return out, torch.autograd.grad(out, wrt, grad)


_FORMULA_CASES = {
    "plain": {},
    "rotation": {"rotation": True},
    "rotated rows + stats": {"rotation": True, "rows": True, "stats": True},
    "causal + padding": {"is_causal": True, "pad": True},
    "dropout": {"dropout_p": 0.3},
    "only v requires grad": {"grad": (2,)},
    "only the rotation requires grad": {"rotation": True, "grad": (3,)},
    "k and the rotation require grad": {"rotation": True, "grad": (1, 3)},
}


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
@pytest.mark.parametrize("path", ["C++ node", "Python formula"])
@pytest.mark.parametrize("case", list(_FORMULA_CASES))
def test_eager_formula_gives_the_registered_formulas_gradients(case, path, monkeypatch):
    # the eager autograd formulas (the C++ node; the Python autograd.Function, which shares its
    # code with the registered formula: _save_for_backward, _input_grads) give the registered
    # formula's outputs and gradients, bit for bit
    if path == "Python formula":
        monkeypatch.setattr(fused_op, "_DIRECT_AUTOGRAD", None)
    c = _FORMULA_CASES[case]
    B, H, Lq, Lk, D = 2, 3, 7, 9, 6
    q = _rand(B, Lq, H, D, seed=80).transpose(1, 2)  # non-contiguous
    k, v = (_rand(B, H, Lk, D, seed=s) for s in (81, 82))
    leaves = [q, k, v]
    kw = {"is_causal": c.get("is_causal", False), "dropout_p": c.get("dropout_p", 0.0)}
    if c.get("rotation"):
        kw["rotation"] = torch.linalg.qr(_rand(D, D, seed=83)).Q
        leaves.append(kw["rotation"])
    if c.get("rows"):
        kw["rotated_queries"] = torch.arange(Lq) % 3 == 0
    if c.get("stats"):
        kw["key_modality"], kw["num_modalities"] = torch.arange(Lk) % 2, 2
    if c.get("pad"):
        kw["key_padding_mask"] = torch.arange(Lk).expand(B, Lk) < torch.tensor([[9], [6]])
    wanted = c.get("grad", range(len(leaves)))
    leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    if c.get("rotation"):
        kw["rotation"] = leaves[3]
    p = api.make_problem(*leaves[:3], **kw)
    leaves = [t for t in leaves if t.requires_grad]
    grad = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(84))
    want_out, want = _registered_formula_grads(p, leaves, grad)
    assert type(want_out.grad_fn).__name__ != "_EagerAttentionBackward"
    assert want_out.grad_fn.name() != _CPP_NODE
    out, _ = fused_op.attention_forward(p)
    if path == "C++ node" and not (c.get("rotation") and 3 in wanted):
        assert out.grad_fn.name() == _CPP_NODE
    else:  # a rotation that needs its gradient takes the Python formula either way
        assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    got = torch.autograd.grad(out, leaves, grad)
    assert torch.equal(out, want_out)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.skipif(not CPU_OP, reason=str(fused_op.load_error()))
def test_the_cpp_node_runs_python_hooks_with_the_gil_released():
    # the node is built and run with the GIL released; Python saved-tensor hooks (activation
    # checkpointing, save_on_cpu), anomaly mode's traceback and gradient hooks take it back
    from torch.utils.checkpoint import checkpoint

    q, k, v = (_rand(2, 3, 9, 8, seed=s).requires_grad_() for s in (93, 94, 95))
    want = torch.autograd.grad(
        torch.nn.functional.scaled_dot_product_attention(q, k, v).square().sum(), (q, k, v)
    )

    def grads(fn):
        # .backward(), which reentrant checkpointing requires (it refuses autograd.grad)
        for t in (q, k, v):
            t.grad = None
        fn().square().sum().backward()
        return [t.grad for t in (q, k, v)]

    def sdpa(a=q, b=k, c=v):
        return rk.scaled_dot_product_attention(a, b, c)

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sdpa()
    assert out.grad_fn.name() == _CPP_NODE and len(packed) == 5  # q, k, v, out, lse
    results = {"saved tensor hooks": torch.autograd.grad(out.square().sum(), (q, k, v))}
    with pytest.warns(UserWarning, match="Anomaly"), torch.autograd.detect_anomaly():
        results["anomaly mode"] = grads(sdpa)
    for reentrant in (False, True):
        results[f"checkpoint reentrant={reentrant}"] = grads(
            lambda r=reentrant: checkpoint(sdpa, q, k, v, use_reentrant=r)
        )
    seen = []
    handle = q.register_hook(lambda g: seen.append(g.shape))
    results["tensor hook"] = grads(sdpa)
    handle.remove()
    assert seen == [q.shape]
    for name, got in results.items():
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=name)
