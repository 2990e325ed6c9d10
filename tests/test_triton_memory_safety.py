"""Memory safety of the Triton kernels at the tile sizes a GPU really runs.

The interpreter tests use 16 x 16 tiles. Here the launchers run as on an sm_90 / sm_80 GPU
(``triton_attention.EmulatedGpu``: the configs the pruning keeps for those shapes, each one the
autotuner might pick; the GPU split-K plan; the GPU block sizes of the helper kernels) inside
``tests/triton_bounds.checked_memory``, which fails on any masked-in load or store outside the
storage of the launch's tensor arguments. Shapes are the benchmark's (batch reduced, lengths
with the same remainders modulo every tile size: 77 and 205 behave like 1101 at 16/32/64/128
rows), and results are also compared with the float64 reference.

The full matrix (both architectures, every kept config) runs with ROLLINGQ_FULL_MATRIX=1.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (the CPU interpreter)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from helpers import (  # noqa: E402
    assert_close,
    check_against_reference,
    make_case,
    nan_poisoned_outputs,
    reference,
)
from triton_bounds import OutOfBoundsAccess, checked_memory  # noqa: E402

from rollingq_kernels import triton_attention as ta  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402

pytestmark = pytest.mark.interpreter


@triton.jit
def _copy_kernel(X, Y, n, LOAD_BOUND, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < LOAD_BOUND, other=0.0)
    tl.store(Y + offs, x, mask=offs < n)


def _raises_oob(fn):
    try:
        fn()
    except Exception as exc:  # the interpreter wraps what a kernel raises
        cause = exc
        while cause is not None and not isinstance(cause, OutOfBoundsAccess):
            cause = cause.__cause__ or cause.__context__
        return cause is not None or "OutOfBoundsAccess" in str(exc)
    return False


def test_checker_accepts_masked_tails_and_catches_overruns():
    x, y = torch.randn(40), torch.empty(16)
    with checked_memory():
        _copy_kernel[(1,)](x, y, 16, 40, BLOCK=64)  # masked tails: fine
        assert torch.equal(y, x[:16])
        assert _raises_oob(lambda: _copy_kernel[(1,)](x, y, 16, 41, BLOCK=64))  # reads x[40]
        assert _raises_oob(lambda: _copy_kernel[(1,)](x, y, 17, 40, BLOCK=64))  # writes y[16]


def _emulate(monkeypatch, arch, index):
    monkeypatch.setattr(ta, "_EMULATED_GPU", ta.EmulatedGpu(arch, 132 if arch[0] == 9 else 108,
                                                             index))  # fmt: skip


def _run_checked(case, backward):
    p = make_problem(case.q, case.k, case.v, **case.kwargs)
    with checked_memory(), nan_poisoned_outputs():
        out, stats = ta.forward(p)
        grads = None
        if backward:
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, (case.q, case.k, case.v), g)
    return out, stats, grads


# (name, make_case kwargs, backward): the benchmark's and the smoke check's shapes, small batch
CASES = {
    "paper_d768_cls_rs": (dict(B=2, H=1, Lq=77, D=768, rotation="per_head", rows="subset",
                               modalities=2, layout="blhd"), True),
    "paper_d768_cls_only_split": (dict(B=1, H=1, Lq=1, Lk=600, D=768, rotation="per_head",
                                       rows="subset", modalities=2, layout="blhd"), False),
    "d128_rs_pad_causal": (dict(B=1, H=2, Lq=205, D=128, rotation="per_head", modalities=2,
                                padding=True, causal=True, layout="blhd"), True),
    "d128_cls_only_split": (dict(B=1, H=2, Lq=1, Lk=1101, D=128, rotation="per_head",
                                 rows="subset", modalities=2, layout="blhd"), False),
    "d256_plain_strided": (dict(B=1, H=1, Lq=77, Lk=205, D=256, layout="strided",
                                return_stats=False), True),
}  # fmt: skip
# the full matrix takes about 40 minutes on two cores: on demand only
FULL = (
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ROLLINGQ_FULL_MATRIX") != "1",
                       reason="full matrix: set ROLLINGQ_FULL_MATRIX=1"),
)  # fmt: skip
FAST = {("paper_d768_cls_rs", (9, 0), 0), ("d128_cls_only_split", (9, 0), 0),
        ("d128_rs_pad_causal", (9, 0), 0)}  # fmt: skip


def _params():
    out = []
    for name in CASES:
        for arch in ((9, 0), (8, 0)):
            for index in range(5):
                marks = () if (name, arch, index) in FAST else FULL
                out.append(pytest.param(name, arch, index, marks=marks,
                                        id=f"{name}-sm{arch[0]}{arch[1]}-cfg{index}"))  # fmt: skip
    return out


@pytest.mark.parametrize("name,arch,index", _params())
def test_device_tiles_stay_in_bounds(monkeypatch, name, arch, index):
    kw, backward = CASES[name]
    _emulate(monkeypatch, arch, index)
    case = make_case(dtype=torch.bfloat16, seed=index, **kw)
    if backward:
        case.requires_grad_()
    out, stats, grads = _run_checked(case, backward)
    check_against_reference(case, out, stats, dtype=torch.bfloat16, what=f"{name}: ")
    if grads is not None:
        for g in grads:
            assert torch.isfinite(g).all()


def test_emulation_plans_like_the_device(monkeypatch):
    # the emulated launch must take the GPU's split-K plan and tile sizes, not the interpreter's
    _emulate(monkeypatch, (9, 0), 0)
    assert ta._num_splits(1, 1, 1101, torch.device("cpu")) == (9, 128)
    assert not ta._small_tiles()
    kept = ta._prune(ta._fwd_configs(), {"Lq": 1101, "Lk": 1101}, "fwd", BLOCK_D=64, BLOCK_DV=128,
                     D_CHUNKS=12, DV_CHUNKS=6)  # fmt: skip
    assert all(c.num_stages == 1 for c in kept)


@pytest.mark.parametrize("arch", [(9, 0), pytest.param((8, 0), marks=FULL)],
                         ids=["sm90", "sm80"])  # fmt: skip
def test_grouped_heads_and_lower_right_causal_stay_in_bounds(monkeypatch, arch):
    """Grouped-query attention (K/V read in place with fewer heads) and a bottom-right causal
    mask (KV-cache continuation), forward with statistics and backward, at device tiles."""
    from helpers import Case
    from torch.nn.attention.bias import causal_lower_right

    _emulate(monkeypatch, arch, 0)
    c = make_case(2, 4, 77, 205, 128, dtype=torch.bfloat16, seed=5, rotation="per_head",
                  modalities=2, padding=True, layout="blhd")  # fmt: skip
    kw = dict(c.kwargs, enable_gqa=True, attn_mask=causal_lower_right(77, 205))
    case = Case(c.q, c.k[:, :2], c.v[:, :2], kw).requires_grad_()
    out, stats, grads = _run_checked(case, backward=True)
    group = 2
    expanded = Case(case.q, case.k.repeat_interleave(group, 1), case.v.repeat_interleave(group, 1),
                    {k: v for k, v in kw.items() if k != "enable_gqa"})  # fmt: skip
    # (plain bf16 PyTorch, the 2x rule's yardstick, has no bottom-right mask: relative bound)
    ref_out, ref_stats = reference(expanded)
    assert_close(out, ref_out, rel=2e-2, name="gqa lower-right out")
    assert_close(stats.modality_mass, ref_stats.modality_mass, rel=2e-2, name="mass")
    assert_close(stats.key_sum, ref_stats.key_sum, rel=1e-5, name="key_sum")
    assert grads[1].shape == case.k.shape and torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("arch", [(9, 0), pytest.param((8, 0), marks=FULL)],
                         ids=["sm90", "sm80"])  # fmt: skip
def test_masks_and_dropout_stay_in_bounds(monkeypatch, arch):
    """attn_mask read in place through broadcast strides (a float (1, 1, Lq, Lk) mask for every
    batch entry and head, a bool (B, 1, 1, Lk) one) and dropout, at the device tiles: the 128-wide
    head dim takes the tiles pruned for a float mask with dropout; D = 768 the chunked path."""
    from helpers import Case

    _emulate(monkeypatch, arch, 0)
    rng = torch.tensor([-987654321, 5], dtype=torch.int64)
    c = make_case(1, 2, 77, 205, 128, dtype=torch.bfloat16, seed=9, rotation="per_head",
                  modalities=2, padding=True, layout="blhd")  # fmt: skip
    kw = dict(c.kwargs, enable_gqa=True, attn_mask=torch.randn(1, 1, 77, 205), dropout_p=0.1,
              rng_state=rng)  # fmt: skip
    case = Case(c.q, c.k[:, :1], c.v[:, :1], kw).requires_grad_()
    out, stats, grads = _run_checked(case, backward=True)
    ref_out, ref_stats = reference(case)
    assert_close(out, ref_out, rel=2e-2, name="float mask + dropout out")
    assert_close(stats.modality_mass, ref_stats.modality_mass, rel=2e-2, name="mass")
    assert all(torch.isfinite(g).all() for g in grads)

    c = make_case(2, 1, 77, 93, 768, dtype=torch.bfloat16, seed=10, rotation="per_head",
                  rows="subset", modalities=2, layout="blhd")  # fmt: skip
    kw = dict(c.kwargs, attn_mask=torch.rand(2, 1, 1, 93) < 0.8, dropout_p=0.1, rng_state=rng)
    case = Case(c.q, c.k, c.v, kw)
    out, stats, _ = _run_checked(case, backward=False)
    ref_out, _ = reference(case)
    assert_close(out, ref_out, rel=2e-2, name="D=768 bool mask + dropout out")


def test_paper_shape_float16_every_row_rotated_in_bounds(monkeypatch):
    """The paper's fusion case as the GPU benchmark ran it when it hit an illegal memory access
    (float16 / bfloat16, D = 768, rotation with statistics; here float16 with every row rotated,
    an odd length and batch 2): every launch of the sm_90 plan stays inside its tensors."""
    _emulate(monkeypatch, (9, 0), 0)
    case = make_case(2, 1, 101, 101, 768, dtype=torch.float16, seed=11, rotation="per_head",
                     modalities=2, layout="blhd")  # fmt: skip
    out, stats, _ = _run_checked(case, backward=False)
    check_against_reference(case, out, stats, dtype=torch.float16, what="fp16 D=768: ")
