"""The CUDA kernels' tile algorithm, run on the CPU against the reference.

No GPU is needed: csrc/cuda/emulation/host_emulation.cpp runs the forward and backward tile loops
of the kernels with the very header functions the kernels call (tile_math.h: online softmax,
split-K merge, masks, tile bounds; params_fill.h: params filling from strides, path choice). It
is built here with the host C++ compiler and called through ctypes on real random data.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import zlib

import pytest
import torch

from rollingq_kernels import _cuda_build
from rollingq_kernels.reference import rolling_attention_reference
from tests.helpers import assert_close, check_against_reference, make_case

_CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


class TensorDesc(ctypes.Structure):
    _fields_ = [
        ("ptr", ctypes.c_void_p),
        ("sizes", ctypes.c_int64 * 4),
        ("strides", ctypes.c_int64 * 4),
    ]


class HostArgs(ctypes.Structure):
    _fields_ = [
        ("q", TensorDesc),
        ("k", TensorDesc),
        ("v", TensorDesc),
        ("out", TensorDesc),
        ("rotation", ctypes.c_void_p),
        ("rotated_rows", ctypes.c_void_p),
        ("key_modality", ctypes.c_void_p),
        ("key_padding", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("modality_mass", ctypes.c_void_p),
        ("key_sum", ctypes.c_void_p),
        ("key_count", ctypes.c_void_p),
        ("scale", ctypes.c_double),
        ("num_modalities", ctypes.c_int32),
        ("is_causal", ctypes.c_int32),
        ("use_double", ctypes.c_int32),
        ("block_m", ctypes.c_int32),
        ("block_n", ctypes.c_int32),
        ("splits", ctypes.c_int32),
    ]


class HostBwdArgs(ctypes.Structure):
    _fields_ = [
        ("fwd", HostArgs),
        ("dout", TensorDesc),
        ("dq", TensorDesc),
        ("dk", TensorDesc),
        ("dv", TensorDesc),
        ("delta", ctypes.c_void_p),
        ("q_rot", ctypes.c_void_p),
    ]


def _desc(t: torch.Tensor) -> TensorDesc:
    assert t.dim() == 4 and t.stride(-1) == 1, "the binding hands over unit last strides"
    return TensorDesc(
        t.data_ptr(), (ctypes.c_int64 * 4)(*t.shape), (ctypes.c_int64 * 4)(*t.stride())
    )


def _ptr(t):
    return None if t is None else t.data_ptr()


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    if _CXX is None:
        pytest.skip("no host C++ compiler (g++ / c++ / $CXX) to build the tile emulation")
    out = tmp_path_factory.mktemp("rq_host") / "librq_host.so"
    cmd = [_CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    cmd += [_cuda_build.emulation_source(), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"building the tile emulation failed:\n{res.stderr}"
    so = ctypes.CDLL(str(out))
    so.rq_host_forward.argtypes = [ctypes.POINTER(HostArgs)]
    so.rq_host_backward.argtypes = [ctypes.POINTER(HostBwdArgs)]
    so.rq_forward_path.argtypes = [ctypes.POINTER(HostArgs), ctypes.c_int]
    so.rq_num_key_tiles.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_int32]
    so.rq_num_key_tiles.restype = ctypes.c_int64
    so.rq_generic_warps_per_block.argtypes = [ctypes.c_int64]
    return so


class _Inputs:
    """The canonical tensors the binding would hand to the kernels, kept alive with the args."""

    def __init__(self, case, dtype, *, stats: bool):
        from rollingq_kernels.api import make_problem

        c = case.to(dtype=dtype)
        kw = dict(c.kwargs)
        kw["return_stats"] = stats
        if kw.get("rotation") is not None:
            kw["rotation"] = kw["rotation"].to(dtype)
        p = make_problem(c.q, c.k, c.v, **kw)
        self.p = p
        # side inputs contiguous, as the CUDA binding hands them to the kernels (the contract
        # allows broadcast strides; the binding copies them)
        self.side = [
            None if t is None else t.contiguous()
            for t in (p.rotation, p.rotated_queries, p.key_modality, p.key_padding_mask)
        ]
        B, H, Lq, D = p.q.shape
        Dv, M = p.v.shape[3], p.num_modalities
        # unit last stride, as the binding guarantees (it copies only when the last stride != 1)
        self.q, self.k, self.v = (
            t if t.stride(-1) == 1 else t.contiguous() for t in (p.q, p.k, p.v)
        )
        self.out = torch.full((B, H, Lq, Dv), float("nan"), dtype=dtype)
        self.lse = torch.full((B, H, Lq), float("nan"), dtype=dtype)
        self.mass = torch.full((B, H, Lq, M), float("nan"), dtype=dtype)
        self.key_sum = torch.full((B, H, M, D), float("nan"), dtype=dtype)
        self.key_count = torch.full((B, M), float("nan"), dtype=dtype)

    def args(self, *, block_m=64, block_n=64, splits=1) -> HostArgs:
        p = self.p
        return HostArgs(
            _desc(self.q),
            _desc(self.k),
            _desc(self.v),
            _desc(self.out),
            *(_ptr(t) for t in self.side),
            self.lse.data_ptr(),
            self.mass.data_ptr(),
            self.key_sum.data_ptr(),
            self.key_count.data_ptr(),
            p.scale,
            p.num_modalities,
            int(p.is_causal),
            int(self.q.dtype == torch.float64),
            block_m,
            block_n,
            splits,
        )

    def stats(self):
        from rollingq_kernels import AttentionStats

        return AttentionStats(self.mass, self.key_sum, self.key_count, self.lse)


def _forward(lib, case, dtype, **tiling):
    inp = _Inputs(case, dtype, stats=True)
    args = inp.args(**tiling)
    assert lib.rq_host_forward(ctypes.byref(args)) == 0
    return inp


FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding": dict(padding=True),
    "rot_shared_all": dict(rotation="shared"),
    "rot_heads_subset": dict(rotation="per_head", rows="subset"),
    "rot_batch_rows_causal_pad": dict(rotation="per_head", rows="batch", causal=True, padding=True),
    "modalities3": dict(modalities=3),
    "everything": dict(rotation="per_head", rows="batch", modalities=2, padding=True, causal=True),
}
SHAPES = {
    "B2H3L7D16": dict(B=2, H=3, Lq=7, D=16),
    "Lq129Lk65D40Dv24": dict(B=2, H=2, Lq=129, Lk=65, D=40, Dv=24),
    "Lq1Lk13D8": dict(B=2, H=1, Lq=1, Lk=13, D=8),
    "Lq70Lk150D64": dict(B=2, H=1, Lq=70, Lk=150, D=64),
}
TILINGS = {
    "kernel64x64": dict(block_m=64, block_n=64, splits=1),
    "tiles16x8_split3": dict(block_m=16, block_n=8, splits=3),
}


@pytest.mark.parametrize("tiling", list(TILINGS), ids=list(TILINGS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
def test_forward_tile_loop_matches_reference_float64(lib, feature, shape, tiling):
    kw = dict(SHAPES[shape])
    kw.update(FEATURES[feature])
    if kw.get("padding"):
        kw["B"] = max(kw.get("B", 2), 2)
    case = make_case(seed=zlib.crc32(f"{feature}/{shape}".encode()) % 1000, **kw)
    inp = _forward(lib, case, torch.float64, **TILINGS[tiling])
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.float64, what=f"{feature}: ")


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_forward_tile_loop_float32_and_strided_layout(lib, layout):
    # float32 accumulation as on the GPU; the (B, L, H, D) layout exercises the stride logic
    case = make_case(
        B=2, H=3, Lq=37, Lk=53, D=24, Dv=40, layout=layout, rotation="per_head", rows="subset",
        modalities=2, padding=True, causal=True, seed=5, dtype=torch.float32,
    )  # fmt: skip
    inp = _forward(lib, case, torch.float32, block_m=16, block_n=16, splits=2)
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.float32, what=f"{layout}: ")


def test_forward_paper_fusion_d768(lib):
    # the paper's single-head fusion: D = 768, [CLS] + two modalities, only [CLS] rotated
    B, L = 2, 9
    ids = torch.tensor([-1, 0, 0, 0, 0, 1, 1, 1, 1])
    case = make_case(B=B, H=1, Lq=L, D=768, rotation="shared", seed=11)
    rows = torch.zeros(L, dtype=torch.bool)
    rows[0] = True
    case.kwargs.update(rotated_queries=rows, key_modality=ids, num_modalities=2)
    inp = _forward(lib, case, torch.float64, block_m=64, block_n=64, splits=2)
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.float64)


@pytest.mark.parametrize("splits", [1, 2, 5, 40])
def test_split_k_merge_is_exact_for_any_split(lib, splits):
    # the merge rule for (m, l, acc, mass) partials: any cut of the key tiles gives the same answer
    case = make_case(B=1, H=2, Lq=33, Lk=160, D=16, modalities=3, padding=False, seed=3)
    inp = _forward(lib, case, torch.float64, block_m=8, block_n=4, splits=splits)
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.float64)
    one = _forward(lib, case, torch.float64, block_m=8, block_n=4, splits=1)
    assert_close(inp.out, one.out, rel=1e-13, name="out vs single pass")
    assert_close(inp.mass, one.mass, rel=1e-13, name="mass vs single pass")


def test_fully_masked_rows_give_zeros_and_neg_inf(lib):
    case = make_case(B=2, H=2, Lq=5, Lk=6, D=8, padding=True, modalities=2, seed=9)
    inp = _forward(lib, case, torch.float64, block_m=4, block_n=4, splits=2)
    # make_case pads every key of sample 0
    assert torch.equal(inp.out[0], torch.zeros_like(inp.out[0]))
    assert torch.isneginf(inp.lse[0]).all()
    assert torch.equal(inp.mass[0], torch.zeros_like(inp.mass[0]))
    assert not torch.isnan(inp.out).any() and not torch.isnan(inp.mass).any()


@pytest.mark.parametrize(
    "feature", ["plain", "causal", "rot_heads_subset", "rot_batch_rows_causal_pad"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_backward_matches_reference_autograd(lib, feature, dtype):
    kw = dict(B=2, H=2, Lq=19, Lk=23, D=12, Dv=10, seed=21)
    kw.update(FEATURES[feature])
    case = make_case(**kw)
    inp = _forward(lib, case, dtype, block_m=16, block_n=16, splits=1)
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(inp.out.shape, generator=g, dtype=torch.float64)

    # reference gradients in float64
    c64 = case.to(dtype=torch.float64)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (c64.q, c64.k, c64.v))
    rkw = {n: c64.kwargs[n] for n in ("rotated_queries", "key_padding_mask", "is_causal")
           if n in c64.kwargs}  # fmt: skip
    if c64.kwargs.get("rotation") is not None:
        rkw["rotation"] = c64.kwargs["rotation"].to(torch.float64)
    ref_out = rolling_attention_reference(q, k, v, **rkw)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout)

    B, H, Lq, D = inp.q.shape
    dq = torch.full_like(inp.q, float("nan"), memory_format=torch.contiguous_format)
    dk = torch.full_like(inp.k, float("nan"), memory_format=torch.contiguous_format)
    dv = torch.full_like(inp.v, float("nan"), memory_format=torch.contiguous_format)
    dout_t = dout.to(dtype)
    delta = torch.full((B, H, Lq), float("nan"), dtype=dtype)
    q_rot = torch.full((B, H, Lq, D), float("nan"), dtype=dtype)
    args = HostBwdArgs(
        inp.args(), _desc(dout_t), _desc(dq), _desc(dk), _desc(dv), delta.data_ptr(),
        q_rot.data_ptr(),
    )  # fmt: skip
    assert lib.rq_host_backward(ctypes.byref(args)) == 0
    rel = 1e-10 if dtype == torch.float64 else 2e-5
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert_close(got, want, rel=rel, name=f"{feature} {name}")


def test_num_key_tiles_is_tight(lib):
    # every visible (i, j) of a query tile lies in the visited key tiles, and the last visited
    # tile holds a visible key (no wasted tile)
    for Lq, Lk in [(1, 1), (7, 7), (70, 150), (150, 70), (129, 64)]:
        for bm, bn in [(64, 64), (16, 8), (8, 16)]:
            for causal in (False, True):
                for m0 in range(0, Lq, bm):
                    n = lib.rq_num_key_tiles(m0, bm, Lq, Lk, bn, int(causal))
                    rows = range(m0, min(m0 + bm, Lq))
                    last_key = max((min(i, Lk - 1) if causal else Lk - 1) for i in rows)
                    want = last_key // bn + 1
                    assert n == want, (Lq, Lk, bm, bn, causal, m0, n, want)


def _path(lib, dtype, shape_q, shape_v=None, *, layout="bhld", misalign=False, M=0):
    kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    B, H, L, D = shape_q
    Dv = D if shape_v is None else shape_v

    def make(d):
        if misalign:
            buf = torch.zeros(B * H * L * d + 1, dtype=dtype)
            return buf[1:].view(B, H, L, d)
        if layout == "blhd":
            return torch.zeros(B, L, H, d, dtype=dtype).transpose(1, 2)
        return torch.zeros(B, H, L, d, dtype=dtype)

    q, k, v = make(D), make(D), make(Dv)
    out = torch.zeros(B, H, L, Dv, dtype=dtype)
    args = HostArgs(_desc(q), _desc(k), _desc(v), _desc(out))
    args.num_modalities = M
    return lib.rq_forward_path(ctypes.byref(args), kind)


def test_forward_path_choice(lib):
    GENERIC, MMA64, MMA128 = 0, 1, 2
    assert _path(lib, torch.float16, (2, 3, 5, 64)) == MMA64
    assert _path(lib, torch.bfloat16, (2, 3, 5, 128)) == MMA128
    assert _path(lib, torch.bfloat16, (2, 3, 5, 128), layout="blhd") == MMA128
    assert _path(lib, torch.float16, (2, 3, 5, 64), M=4) == MMA64
    assert _path(lib, torch.float16, (2, 3, 5, 64), M=5) == GENERIC  # masses live in registers
    assert _path(lib, torch.float32, (2, 3, 5, 64)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 96)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 768)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 64), 128) == GENERIC  # Dv != D
    assert _path(lib, torch.float16, (1, 1, 5, 64), misalign=True) == GENERIC


def test_generic_block_size_fits_shared_memory(lib):
    for per_warp, want in [(1024, 4), (9220, 4), (12288, 4), (16388, 2), (30000, 1), (90000, 1)]:
        assert lib.rq_generic_warps_per_block(per_warp) == want


@pytest.mark.parametrize("d,n", [(64, 64), (128, 64), (16, 32)])
def test_tensor_core_fragment_addressing(lib, d, n):
    # One warp of the tensor-core kernel: its smem addressing (mma_layout.h) feeding mma.sync as
    # the PTX ISA lays out the fragments (emulated), S = Q K^T -> P (repacked from the
    # accumulators) -> O = P V, must equal the matrix product.
    ld = d + 8  # the kernel's padded row pitch
    g = torch.Generator().manual_seed(d + n)
    Q = torch.randn(16, ld, generator=g)
    K = torch.randn(n, ld, generator=g)
    V = torch.randn(n, ld, generator=g)
    out = torch.full((16, d), float("nan"))
    f = ctypes.POINTER(ctypes.c_float)
    lib.rq_mma_warp_tile.argtypes = [f, f, f, ctypes.c_int, ctypes.c_int, ctypes.c_int, f]
    ptrs = [ctypes.cast(t.data_ptr(), f) for t in (Q, K, V)]
    assert lib.rq_mma_warp_tile(*ptrs, d, n, ld, ctypes.cast(out.data_ptr(), f)) == 0
    q, k, v = (t[:, :d].double() for t in (Q, K, V))
    want = (0.01 * (q @ k.T).float().double()) @ v
    assert_close(out, want, rel=1e-5, name="warp tile O")
    assert lib.rq_mma_layout_consistent() == 1
