"""The Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py
when there is no GPU), compared with the float64 reference.

The registry keeps backend "triton" for CUDA tensors, so these tests call the backend module
(``triton_attention.forward`` on a validated problem, or the launchers) directly on CPU tensors.
Shapes are small but span several 16 x 16 tiles (the interpreter's fixed config), with odd sizes.
bfloat16 dots are computed in float32 inside the interpreter (its bfloat16 matmul is broken); the
bfloat16 loads, stores and roundings are exercised as on a GPU.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "interpreter tests need TRITON_INTERPRET=1 (GPU machines run test_triton_gpu.py)",
        allow_module_level=True,
    )

from helpers import (  # noqa: E402
    _plain_low_precision,
    assert_close,
    check_against_reference,
    dtype_id,
    make_case,
    nan_poisoned_outputs,
    reference,
)

from rollingq_kernels import (  # noqa: E402
    AttentionStats,
    NoBackendError,
    rolling_attention,
    rolling_attention_reference,
)
from rollingq_kernels import triton_attention as ta  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402
from rollingq_kernels.backends import select_backend  # noqa: E402

pytestmark = pytest.mark.interpreter

GRAD_REL_TOL = {torch.float32: 1e-5}


def _problem(case):
    return make_problem(case.q, case.k, case.v, **case.kwargs)


def _run(case, num_splits=None):
    """(out, stats) from the Triton backend, outputs NaN-poisoned before the kernels run."""
    p = _problem(case)
    with nan_poisoned_outputs():
        if num_splits is None:
            return ta.forward(p)
        rot, rows, ids, pad = ta._side_inputs(
            p.q, p.rotation, p.rotated_queries, p.key_modality, p.key_padding_mask
        )
        rows = rows if rot is not None else None
        out, lse, mass, key_sum = ta.rolling_attention_triton_forward(
            p.q, p.k, p.v, rot, rows, ids, pad, p.num_modalities, p.is_causal, p.scale,
            num_splits=num_splits,
        )  # fmt: skip
    count = ta._key_count(ids, pad, p.q.shape[0], p.num_modalities, p.q.device)
    stats = AttentionStats(mass, key_sum, count, lse) if p.return_stats else None
    return out, stats


FORWARD_CASES = {
    "plain": dict(B=2, H=3, Lq=7, D=16),
    "shared_rot_blhd": dict(
        B=2, H=2, Lq=19, D=16, rotation="shared", modalities=2, layout="blhd"
    ),
    "perhead_subset_pad_strided": dict(
        B=3, H=2, Lq=13, Lk=29, D=40, rotation="per_head", rows="subset", modalities=3,
        padding=True, layout="strided",
    ),
    "batch_rows_causal_d64": dict(
        B=2, H=2, Lq=33, D=64, rotation="per_head", rows="batch", modalities=2, causal=True
    ),
    "causal_pad_lq_gt_lk": dict(B=2, H=2, Lq=21, Lk=13, D=16, modalities=3, padding=True,
                                causal=True),
    "causal_lq_lt_lk": dict(B=2, H=1, Lq=9, Lk=30, D=16, modalities=2, causal=True,
                            rotation="shared", rows="subset"),
    "eight_modalities": dict(B=2, H=2, Lq=11, Lk=37, D=16, modalities=8, padding=True),
    "no_cls_key_scale": dict(B=1, H=3, Lq=17, D=16, modalities=2, cls_key=False, scale=0.37),
    "dv_ne_d": dict(B=2, H=2, Lq=9, Lk=18, D=16, Dv=24, modalities=2, rotation="shared"),
    "dv_tiled_300": dict(B=1, H=1, Lq=9, Lk=11, D=16, Dv=300, modalities=2, padding=False),
    "lq1_heuristic_split": dict(B=1, H=1, Lq=1, Lk=67, D=16, modalities=2, rotation="shared"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_float32(name):
    case = make_case(dtype=torch.float32, seed=1, **FORWARD_CASES[name])
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.float32, what=f"{name}: ")


def test_forward_without_stats():
    case = make_case(2, 2, 19, 23, 16, dtype=torch.float32, rotation="per_head", padding=True,
                     causal=True, return_stats=False)  # fmt: skip
    out, stats = _run(case)
    assert stats is None
    check_against_reference(case, out, None, dtype=torch.float32)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("Lq", [1, 5])
def test_split_keys_merge(Lq, splits):
    """Flash-decoding path: keys split across programs, out/lse/mass merged, key sums added."""
    case = make_case(2, 2, Lq, 53, 16, dtype=torch.float32, seed=2, rotation="per_head",
                     modalities=3, padding=True, causal=Lq == 5)  # fmt: skip
    out, stats = _run(case, num_splits=splits)
    check_against_reference(case, out, stats, dtype=torch.float32, what=f"splits={splits}: ")


def test_lq1_heuristic_splits_keys():
    # the case above in FORWARD_CASES must actually take the split path
    splits, per = ta._num_splits(1, 1, 67, torch.device("cpu"))
    assert splits > 1 and per * splits >= 67 and per * (splits - 1) < 67


def test_head_dim_768_tiled():
    """The paper's single-head fusion width goes through the chunked path (no register tile)."""
    case = make_case(2, 1, 9, 11, 768, dtype=torch.float32, seed=3, rotation="per_head",
                     rows="subset", modalities=2, padding=True)  # fmt: skip
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.float32, what="D=768: ")


def test_fully_padded_sample_is_zero_not_nan():
    case = make_case(3, 2, 9, 14, 16, dtype=torch.float32, modalities=2, padding=True,
                     rotation="shared")  # fmt: skip
    assert not case.kwargs["key_padding_mask"][0].any()
    out, stats = _run(case)
    assert torch.all(out[0] == 0)
    assert torch.all(stats.modality_mass[0] == 0)
    assert torch.all(stats.key_sum[0] == 0) and torch.all(stats.key_count[0] == 0)
    assert torch.all(torch.isneginf(stats.lse[0]))
    for t in (out, *stats):
        assert not torch.isnan(t).any()
    # the other samples still see keys
    assert torch.isfinite(stats.lse[1:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, H=2, Lq=19, Lk=23, D=40, rotation="per_head", rows="subset", modalities=3,
             padding=True, layout="blhd"),
        dict(B=2, H=1, Lq=21, D=64, rotation="shared", modalities=2, causal=True),
    ],
    ids=["rot_pad_blhd", "causal_d64"],
)  # fmt: skip
def test_forward_low_precision(dtype, kw):
    case = make_case(dtype=dtype, seed=4, **kw)
    out, stats = _run(case)
    assert out.dtype == dtype
    check_against_reference(case, out, stats, dtype=dtype)


def test_rerun_is_bit_identical():
    case = make_case(2, 2, 19, 23, 16, dtype=torch.float32, modalities=2, padding=True,
                     rotation="shared")  # fmt: skip
    a = _run(case)
    b = _run(case)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Gradients


def _grads(case, g):
    case.requires_grad_()
    out, _ = ta.forward(_problem(case))
    with nan_poisoned_outputs():
        return torch.autograd.grad(out, (case.q, case.k, case.v), g)


def _reference_grads(case, g):
    c64 = case.to(dtype=torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v))
    kw = dict(c64.kwargs, return_stats=False)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(torch.float64)
    out = rolling_attention_reference(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), g.to(torch.float64))


def _cotangent(case, seed=7, strided=False):
    B, H, Lq, _ = case.q.shape
    Dv = case.v.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, Lq, H, Dv, generator=gen).to(case.q.dtype)
    g = g.transpose(1, 2)  # a non-contiguous dO, as a (B, L, H, D) projection's grad gives
    if not strided:
        g = g.contiguous()
    return g


GRAD_CASES = {
    "perhead_batchrows_causal_pad": dict(
        B=2, H=2, Lq=19, Lk=23, D=16, rotation="per_head", rows="batch", causal=True,
        padding=True,
    ),
    "shared_subset_strided_d40": dict(
        B=2, H=2, Lq=13, Lk=29, D=40, rotation="shared", rows="subset", layout="strided"
    ),
    "causal_lq_gt_lk_d64": dict(B=1, H=2, Lq=21, Lk=13, D=64, causal=True, layout="blhd"),
    "lq1": dict(B=2, H=2, Lq=1, Lk=37, D=16, rotation="per_head", padding=True),
    "dv_ne_d": dict(B=1, H=2, Lq=9, Lk=18, D=16, Dv=24, rotation="shared"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_float32(name):
    case = make_case(dtype=torch.float32, seed=5, return_stats=False, **GRAD_CASES[name])
    g = _cotangent(case, strided=name.startswith("shared"))
    got = _grads(case, g)
    want = _reference_grads(case, g)
    for n, a, e in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == e.shape
        assert_close(a, e, rel=GRAD_REL_TOL[torch.float32], name=f"{name}: {n}")


def test_vmap_of_grad_runs_the_triton_ops_batching_rules():
    # torch.func on the Triton family: the forward and backward ops fold the vmapped dim into B
    cases = [
        make_case(2, 2, 9, 11, 16, dtype=torch.float32, seed=s, layout="blhd", padding=True,
                  modalities=2, rotation="shared")
        for s in (31, 32)
    ]  # fmt: skip
    rotation = cases[0].kwargs["rotation"]
    q, k, v = (torch.stack([getattr(c, n) for c in cases], 1) for n in "qkv")
    pad, ids = (torch.stack([c.kwargs[n] for c in cases]) for n in ("key_padding_mask",
                                                                    "key_modality"))  # fmt: skip
    w = torch.randn(2, 2, 2, 9, 16)

    def loss(q, k, v, pad, ids, w):
        p = make_problem(q, k, v, rotation=rotation, key_padding_mask=pad, key_modality=ids,
                         num_modalities=2, return_stats=True)  # fmt: skip
        out, stats = ta.forward(p)
        return (out * w).sum(), (out, stats)

    with nan_poisoned_outputs():
        grads, (out, stats) = torch.func.vmap(
            torch.func.grad(loss, argnums=(0, 1, 2), has_aux=True), in_dims=(1, 1, 1, 0, 0, 0)
        )(q, k, v, pad, ids, w)
    for i, c in enumerate(cases):
        c.kwargs["rotation"] = rotation
        check_against_reference(c, out[i], type(stats)(*(t[i] for t in stats)),
                                dtype=torch.float32, what=f"entry {i} ")  # fmt: skip
        leaves = [t.detach().double().requires_grad_(True) for t in (c.q, c.k, c.v)]
        ref_out = rolling_attention_reference(
            *leaves, rotation=rotation.double(), key_padding_mask=c.kwargs["key_padding_mask"]
        )
        want = torch.autograd.grad((ref_out * w[i].double()).sum(), leaves)
        for n, a, e in zip(("dq", "dk", "dv"), grads, want):
            assert_close(a[i], e, rel=GRAD_REL_TOL[torch.float32], name=f"entry {i} {n}")


def test_second_order_through_the_triton_ops():
    # a double backward: the Triton forward and backward, then the backward op's own formula
    case = make_case(2, 2, 9, 13, 16, dtype=torch.float32, seed=41, layout="blhd", causal=True,
                     rotation="shared", rows="subset", return_stats=False)  # fmt: skip
    w = torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(42))

    def hvp(q, k, v, run):
        out = run(q, k, v)
        (dq,) = torch.autograd.grad((out.square() * w.to(out.dtype)).sum(), q, create_graph=True)
        return torch.autograd.grad((dq * w.to(dq.dtype)).sum(), (q, k, v))

    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    with nan_poisoned_outputs():
        got = hvp(*leaves, lambda q, k, v: ta.forward(make_problem(q, k, v, **case.kwargs))[0])
    c64 = case.to(dtype=torch.float64)
    kw = dict(c64.kwargs, rotation=c64.kwargs["rotation"].double())
    leaves = [t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v)]
    want = hvp(*leaves, lambda q, k, v: rolling_attention_reference(q, k, v, **kw))
    for n, a, e in zip(("q", "k", "v"), got, want):
        assert a.abs().sum() > 0
        assert_close(a, e, rel=2e-5, name=f"second order, d{n}")


def test_gradients_head_dim_768():
    case = make_case(2, 1, 9, 11, 768, dtype=torch.float32, seed=6, rotation="shared",
                     rows="subset", padding=True, return_stats=False)  # fmt: skip
    g = _cotangent(case)
    got = _grads(case, g)
    want = _reference_grads(case, g)
    for n, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, e, rel=GRAD_REL_TOL[torch.float32], name=f"D=768: {n}")
    # sample 0 sees no key: its gradients are exactly zero (and never NaN)
    assert torch.all(got[0][0] == 0) and torch.all(got[1][0] == 0) and torch.all(got[2][0] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_gradients_low_precision(dtype):
    """Same rule as the forward: at most 2x the error of plain PyTorch in that dtype."""
    case = make_case(2, 2, 19, 23, 40, dtype=dtype, seed=8, rotation="per_head", rows="subset",
                     padding=True, causal=True, return_stats=False)  # fmt: skip
    g = _cotangent(case)
    got = _grads(case, g)
    want = _reference_grads(case, g)
    low = case.to(dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in (low.q, low.k, low.v))
    kw = dict(low.kwargs)
    kw["rotation"] = kw["rotation"].to(dtype)
    plain = torch.autograd.grad(_plain_low_precision(q, k, v, kw), (q, k, v), g)
    for n, a, e, p in zip(("dq", "dk", "dv"), got, want, plain):
        err = (a.double() - e).abs().max().item()
        bound = 2.0 * (p.double() - e).abs().max().item() + 1e-3
        assert err <= bound, f"{n}: {err:.3e} > 2x PyTorch's {dtype} error ({bound:.3e})"


# ----------------------------------------------------------------------------------------------
# The op, the registry


def test_custom_ops_opcheck():
    case = make_case(1, 2, 5, 7, 16, dtype=torch.float32, rotation="shared", modalities=2,
                     padding=True)  # fmt: skip
    p = _problem(case)
    for t in (case.q, case.k, case.v):
        t.requires_grad_(True)
    args = (case.q, case.k, case.v, *p.op_args()[3:])
    results = torch.library.opcheck(torch.ops.rollingq.triton_attention_fwd.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_auto_never_picks_triton_for_cpu_tensors():
    case = make_case(1, 2, 5, 7, 16, dtype=torch.float32)
    p = _problem(case)
    assert select_backend(p, "auto").name != "triton"
    with pytest.raises(NoBackendError, match="triton"):
        rolling_attention(case.q, case.k, case.v, backend="triton")


def test_too_many_modalities_is_refused_with_a_reason():
    case = make_case(1, 1, 3, 5, 16, dtype=torch.float32, modalities=2)
    kw = dict(case.kwargs, num_modalities=ta.MAX_MODALITIES + 1)
    p = make_problem(case.q, case.k, case.v, **kw)
    reasons = ta.unsupported_reasons(p)
    assert any("modalities" in r for r in reasons)


def test_stats_rows_sum_to_one_minus_cls_mass():
    case = make_case(2, 2, 11, 19, 16, dtype=torch.float32, modalities=2, cls_key=True)
    out, stats = _run(case)
    # keys with id -1 (key 0 and some others) are attended but counted in no modality
    probs = torch.softmax(case.q.double() @ case.k.double().transpose(-1, -2) / math.sqrt(16), -1)
    ids = case.kwargs["key_modality"]
    uncounted = (probs * (ids == -1)[:, None, None, :].double()).sum(-1)
    assert torch.all(uncounted > 0)
    assert_close(stats.modality_mass.sum(-1), 1 - uncounted, rel=1e-5, name="mass rows")
    assert_close(out, reference(case)[0], rel=1e-5, name="out")


def test_compiled_op_full_graph_forward_backward():
    """The ops trace as single nodes (fake impls, autograd) in one graph; run under aot_eager so
    the check needs no C++ compiler. On a GPU, test_triton_gpu.py compiles with Inductor."""
    case = make_case(2, 2, 19, 23, 16, dtype=torch.float32, rotation="per_head", rows="subset",
                     modalities=2, padding=True, causal=True)  # fmt: skip
    kw = dict(case.kwargs)

    def step(q, k, v):
        return ta.forward(make_problem(q, k, v, **kw))

    case.requires_grad_()
    out, stats = torch.compile(step, fullgraph=True, backend="aot_eager")(case.q, case.k, case.v)
    check_against_reference(case, out, stats, dtype=torch.float32, what="compiled: ")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (case.q, case.k, case.v), g)
    want = _reference_grads(case, g)
    for n, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, e, rel=GRAD_REL_TOL[torch.float32], name=f"compiled {n}")


def test_registry_dispatch_traces_in_one_graph():
    # backend modules are imported while tracing without breaking the graph (backends.py)
    case = make_case(1, 2, 7, 9, 16, dtype=torch.float32, modalities=2)
    kw = dict(case.kwargs)

    def call(q, k, v):
        return rolling_attention(q, k, v, backend="reference", **kw)

    out, stats = torch.compile(call, fullgraph=True, backend="eager")(case.q, case.k, case.v)
    check_against_reference(case, out, stats, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# GPU-only host logic, checked with stand-ins (no kernel runs)


@pytest.mark.parametrize("cap", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("lq,lk,d", [(1, 4096, 128), (77, 300, 40), (4096, 4096, 128),
                                     (2048, 2048, 256), (1101, 1101, 768)])  # fmt: skip
def test_config_pruning(monkeypatch, cap, kind, lq, lk, d):
    monkeypatch.setattr(ta, "_capability", lambda: cap)
    configs = {"fwd": ta._fwd_configs, "dkdv": ta._bwd_dkdv_configs, "dq": ta._bwd_dq_configs}
    block_d, chunks = ta._head_plan(d, 64)
    kept = ta._prune(configs[kind](), {"Lq": lq, "Lk": lk}, kind, BLOCK_D=block_d,
                     D_CHUNKS=chunks, BLOCK_DV=block_d if chunks == 1 else 128,
                     DV_CHUNKS=1 if chunks == 1 else 6)  # fmt: skip
    assert 1 <= len(kept) <= 5
    for c in kept:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if chunks > 1:  # chunked head dims: one stage, small tiles (shared memory)
            assert c.num_stages == 1 and bm * bn <= 64 * 64
        assert bm <= max(16, ta._next_pow2(lq))
        if kind == "dkdv":
            assert bn <= max(16, ta._next_pow2(lk))
        if d == 256:
            assert bm * bn <= 64 * 64 and c.num_stages <= 2
        if cap[0] == 8:
            assert not (bm == 128 and bn == 128)


def test_untuned_launch_passes_the_first_kept_config(monkeypatch):
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((grid, args, kwargs))

            return launch

    monkeypatch.setattr(ta, "_interpreting", lambda: False)
    monkeypatch.setattr(ta, "_capability", lambda: (9, 0))
    monkeypatch.setenv("ROLLINGQ_TRITON_AUTOTUNE", "0")
    meta = dict(BLOCK_D=128, BLOCK_DV=128, D_CHUNKS=1, DV_CHUNKS=1, CAUSAL=False)
    ta._launch("fwd", None, FakeKernel(), "grid", 4096, 4096, "arg0", **meta)
    (grid, args, kwargs), = calls  # fmt: skip
    first = ta._prune(ta._fwd_configs(), {"Lq": 4096, "Lk": 4096}, "fwd", **meta)[0]
    assert args == ("arg0",) and grid == "grid"
    assert kwargs["BLOCK_M"] == first.kwargs["BLOCK_M"]
    assert kwargs["BLOCK_N"] == first.kwargs["BLOCK_N"]
    assert kwargs["num_warps"] == first.num_warps and kwargs["num_stages"] == first.num_stages
    assert kwargs["CAUSAL"] is False


def test_split_plan_on_a_gpu(monkeypatch):
    monkeypatch.setattr(ta, "_interpreting", lambda: False)
    monkeypatch.setattr(ta, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # [CLS]-only query over 16k keys, few heads: split into 128-aligned chunks covering all keys
    splits, per = ta._num_splits(8, 1, 16384, cuda)
    assert splits > 1 and per % 128 == 0 and (splits - 1) * per < 16384 <= splits * per
    # long queries or short key ranges are never split
    assert ta._num_splits(8, 4096, 4096, cuda)[0] == 1
    assert ta._num_splits(8, 1, 300, cuda)[0] == 1
    assert ta._num_splits(256, 1, 16384, cuda)[0] == 1


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter does not run Triton's compiler: compile what the launchers launch for a
    few representative calls, for sm_90, in a subprocess without the interpreter (ptxas ships
    with triton; no GPU needed); fails on a compile error or a shared-memory overflow."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "bench", "compile_check.py"),
            "--set",
            "ci",
            "--arch",
            "90",
            "--jobs",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failure(s)" in proc.stdout


@pytest.mark.parametrize(
    "layout,M",
    [("runs", 3), ("runs", 2), ("random", 11), ("random", 1), ("runs", 9)],
    ids=["runs_m3", "runs_m2", "random_m11_dot", "random_m1", "runs_m9_dot"],
)
def test_modality_mass_paths(layout, M):
    """Every way the forward takes the mass: tiles whose visible keys share one id (keys in runs
    per modality) add the row sums; mixed tiles reduce per modality in registers (M <= 8) or
    take a product with the one-hot ids (M > 8). Padding and causal masks cut runs short."""
    B, H, Lq, Lk = 2, 2, 37, 83
    case = make_case(B, H, Lq, Lk, 16, dtype=torch.float32, seed=M, modalities=M,
                     padding=True, causal=True, rotation="shared")  # fmt: skip
    if layout == "runs":
        ids = torch.div(torch.arange(Lk), -(-Lk // M), rounding_mode="floor")
        ids = ids.expand(B, Lk).clone()
        ids[:, 0] = -1  # a [CLS] key
        ids[1, 40:45] = -1  # a run of uncounted keys inside a tile
        case.kwargs["key_modality"] = ids
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.float32, what=f"{layout} M={M}: ")
    out2, stats2 = _run(case, num_splits=3)
    check_against_reference(case, out2, stats2, dtype=torch.float32, what=f"split {layout}: ")


# ----------------------------------------------------------------------------------------------
# The op contract's arguments: grouped-query attention and causal alignments other than top-left


def _gqa_case(dtype, hkv=2, **kw):
    from helpers import Case

    c = make_case(dtype=dtype, **kw)
    # k / v with fewer heads, read in place (a head slice of a larger tensor: non-contiguous)
    return Case(c.q, c.k[:, :hkv], c.v[:, :hkv], dict(c.kwargs, enable_gqa=True))


def _lower_right(case):
    from torch.nn.attention.bias import causal_lower_right

    Lq, Lk = case.q.shape[2], case.k.shape[2]
    case.kwargs["is_causal"] = False
    case.kwargs["attn_mask"] = causal_lower_right(Lq, Lk)
    return case


CONTRACT_CASES = {
    "gqa_g3_rot_pad_stats": lambda dt: _gqa_case(
        dt, B=2, H=6, Lq=19, Lk=23, D=16, seed=31, rotation="per_head", rows="subset",
        modalities=2, padding=True, layout="blhd"),
    "gqa_g2_causal": lambda dt: _gqa_case(
        dt, hkv=2, B=1, H=4, Lq=21, Lk=21, D=40, seed=32, modalities=3, causal=True),
    "lower_right_lq_lt_lk": lambda dt: _lower_right(make_case(
        2, 2, 9, 30, 16, dtype=dt, seed=33, rotation="shared", modalities=2, padding=True,
        layout="strided")),
    "lower_right_lq_gt_lk": lambda dt: _lower_right(make_case(
        2, 2, 21, 13, 16, dtype=dt, seed=34, modalities=2)),
    "gqa_lower_right_decode": lambda dt: _lower_right(_gqa_case(
        dt, B=2, H=4, Lq=1, Lk=53, D=16, seed=35, rotation="per_head", modalities=2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONTRACT_CASES))
def test_contract_forward_float32(name):
    case = CONTRACT_CASES[name](torch.float32)
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.float32, what=f"{name}: ")


@pytest.mark.parametrize("name", list(CONTRACT_CASES))
def test_contract_gradients_float32(name):
    case = CONTRACT_CASES[name](torch.float32)
    case.kwargs["return_stats"] = False
    g = _cotangent(case)
    got = _grads(case, g)
    want = _reference_grads(case, g)
    for n, a, e in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == e.shape, (n, a.shape, e.shape)
        assert_close(a, e, rel=GRAD_REL_TOL[torch.float32], name=f"{name}: {n}")


def test_contract_gqa_bfloat16():
    """bf16 by the 2x rule; the yardstick (plain PyTorch in bf16) runs on K/V repeated per query
    head, which is the same attention."""
    from helpers import Case

    case = CONTRACT_CASES["gqa_g3_rot_pad_stats"](torch.bfloat16)
    out, stats = _run(case)
    group = case.q.shape[1] // case.k.shape[1]
    kw = {k: v for k, v in case.kwargs.items() if k != "enable_gqa"}
    expanded = Case(case.q, case.k.repeat_interleave(group, 1), case.v.repeat_interleave(group, 1),
                    kw)  # fmt: skip
    check_against_reference(expanded, out, stats, dtype=torch.bfloat16, what="gqa bf16: ")


def test_contract_cases_use_the_new_paths():
    # the cases above really are grouped / offset (not silently canonicalised away)
    p = _problem(CONTRACT_CASES["gqa_g3_rot_pad_stats"](torch.float32))
    assert p.k.shape[1] * 3 == p.q.shape[1]
    p = _problem(CONTRACT_CASES["lower_right_lq_lt_lk"](torch.float32))
    assert p.is_causal and p.causal_offset == 21
    p = _problem(CONTRACT_CASES["lower_right_lq_gt_lk"](torch.float32))
    assert p.is_causal and p.causal_offset == -8
