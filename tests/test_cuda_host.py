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
from tests.helpers import assert_close, check_against_reference, dtype_id, make_case, reference

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


def _binding_side_inputs(p):
    """rotation, rows, ids, padding as the CUDA binding hands them to the kernels: short forms
    expanded ((D, D) -> (H, D, D), (Lq,) -> (B, Lq), (Lk,) -> (B, Lk)), ids int32, contiguous."""
    B, H, Lq, D = p.q.shape
    Lk = p.k.shape[2]
    full = ((H, D, D), (B, Lq), (B, Lk), (B, Lk))
    side = (p.rotation, p.rotated_queries, p.key_modality, p.key_padding_mask)
    out = [None if t is None else t.expand(shape).contiguous() for t, shape in zip(side, full)]
    if out[2] is not None:
        out[2] = out[2].to(torch.int32)
    return out


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
        self.side = _binding_side_inputs(p)
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


def _path(lib, dtype, shape_q, shape_v=None, *, layout="bhld", misalign=False, M=0, scale=0.125):
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
    args.scale = scale
    return lib.rq_forward_path(ctypes.byref(args), kind)


def test_forward_path_choice(lib):
    GENERIC, MMA64, MMA128 = 0, 1, 2
    assert _path(lib, torch.float16, (2, 3, 5, 64)) == MMA64
    assert _path(lib, torch.bfloat16, (2, 3, 5, 128)) == MMA128
    assert _path(lib, torch.bfloat16, (2, 3, 5, 128), layout="blhd") == MMA128
    assert _path(lib, torch.float16, (2, 3, 5, 64), M=8) == MMA64
    # the one-hot columns of the modality mass fill one n8 tile
    assert _path(lib, torch.float16, (2, 3, 5, 64), M=9) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 64), scale=-0.5) == GENERIC  # needs scale > 0
    assert _path(lib, torch.float16, (2, 3, 5, 64), scale=0.0) == GENERIC
    assert _path(lib, torch.float32, (2, 3, 5, 64)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 96)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 768)) == GENERIC
    assert _path(lib, torch.float16, (2, 3, 5, 64), 128) == GENERIC  # Dv != D
    assert _path(lib, torch.float16, (1, 1, 5, 64), misalign=True) == GENERIC


def test_generic_block_size_fits_shared_memory(lib):
    for per_warp, want in [(1024, 4), (9220, 4), (12288, 4), (16388, 2), (30000, 1), (90000, 1)]:
        assert lib.rq_generic_warps_per_block(per_warp) == want


# ---- the tensor-core forward itself, run by the SIMT executor ------------------------------------
# csrc/cuda/emulation/simt_runner.cpp compiles fwd_mma_kernel.cuh with the host compiler: the
# kernel's primitives (simt.cuh) then call the executor of simt_emulator.cpp, which runs every
# thread of a block as a fiber, implements ldmatrix / mma.sync / cp.async / shuffles from the PTX
# ISA, and reports races, divergent collectives, out-of-bounds accesses and bank conflicts.

_SIMT_SOURCES = ("simt_emulator.cpp", "simt_runner.cpp")
_ERR = 4096


class MmaArgs(ctypes.Structure):
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
        ("kind", ctypes.c_int32),
    ]


@pytest.fixture(scope="session")
def simt(tmp_path_factory):
    if _CXX is None:
        pytest.skip("no host C++ compiler (g++ / c++ / $CXX) to build the SIMT executor")
    out = tmp_path_factory.mktemp("rq_simt") / "librq_simt.so"
    emu_dir = os.path.join(_cuda_build.CUDA_DIR, "emulation")
    cmd = [_CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    cmd += [f"-I{_cuda_build.CUDA_DIR}", *(os.path.join(emu_dir, f) for f in _SIMT_SOURCES)]
    cmd += ["-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"building the SIMT executor failed:\n{res.stderr}"
    so = ctypes.CDLL(str(out))
    so.rq_simt_forward.argtypes = [ctypes.POINTER(MmaArgs)]
    u32p = ctypes.POINTER(ctypes.c_uint32)
    so.rq_simt_fragments.argtypes = [ctypes.c_int] * 5 + [u32p] * 3
    so.rq_simt_hazard.argtypes = [ctypes.c_int]
    so.rq_swizzle.argtypes = [ctypes.c_int] * 3
    so.rq_simt_error.argtypes = [ctypes.c_char_p, ctypes.c_int]
    so.rq_simt_report.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return so


def _simt_error(simt) -> str:
    buf = ctypes.create_string_buffer(_ERR)
    simt.rq_simt_error(buf, _ERR)
    return buf.value.decode()


def _simt_report(simt):
    """{site: (warp instructions, wavefronts, worst bank-conflict degree)} of the last run."""
    n = simt.rq_simt_report(None, 0) + 1
    buf = ctypes.create_string_buffer(n)
    simt.rq_simt_report(buf, n)
    rows = {}
    for line in buf.value.decode().splitlines():
        site, instr, wave, ways = line.split("\t")
        rows[site] = (int(instr), int(wave), int(ways))
    return rows


@pytest.mark.parametrize("d", [64, 128])
def test_swizzle_is_a_conflict_free_bijection(simt, d):
    rows = 128
    off = torch.tensor([[simt.rq_swizzle(d, r, c) for c in range(d)] for r in range(rows)])
    # a permutation of each row's d elements, keeping the 8 elements of a 16-byte chunk together
    want_row = torch.arange(rows).unsqueeze(1) * d
    assert torch.equal(off.sort(dim=1).values, want_row + torch.arange(d))
    assert torch.equal(off % 8, torch.arange(d).expand(rows, d) % 8)
    # 8 consecutive rows (an ldmatrix phase) at one logical chunk: 8 different 16-byte bank groups
    chunk = (off // 8) % 8  # 16-byte group within the 128-byte line of banks
    for r0 in range(0, rows, 8):
        for c in range(0, d, 8):
            assert len(set(chunk[r0 : r0 + 8, c].tolist())) == 8, (r0, c)
    # 8 consecutive chunks of one row (a quarter-warp of cp.async): also 8 different groups
    for r in range(rows):
        for c0 in range(0, d, 64):
            assert len(set(chunk[r, c0 : c0 + 64 : 8].tolist())) == 8, (r, c0)


def _decode(reg, half):
    """(row, col) of the element the test tiles store at this register half: bits (r << 8) | c."""
    bits = (reg >> (16 * half)) & 0xFFFF
    return bits >> 8, bits & 0xFF


@pytest.mark.parametrize(
    "d,row0,ks,np_,dp", [(64, 16, 1, 3, 2), (128, 96, 7, 1, 6), (64, 0, 0, 0, 0)]
)
def test_ldmatrix_delivers_the_mma_operand_fragments(simt, d, row0, ks, np_, dp):
    # The kernel's ldmatrix addressing on swizzled tiles against the operand layout of
    # mma.m16n8k16 in the PTX ISA (lane l, g = l // 4, t = l % 4):
    #   A:  a{0,1,2,3} hold A[g + 8 (j & 1)][2t + 8 (j >> 1) + half]
    #   B:  b{0,1} hold B[2t + 8 j + half][g]
    a, k, v = ((ctypes.c_uint32 * 128)() for _ in range(3))
    assert simt.rq_simt_fragments(d, row0, ks, np_, dp, a, k, v) == 0, _simt_error(simt)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            for half in range(2):
                # Q rows row0.., head-dim columns 16 ks..
                assert _decode(a[4 * lane + j], half) == (
                    row0 + g + 8 * (j & 1),
                    16 * ks + 2 * t + 8 * (j >> 1) + half,
                )
                # K tile, B[k][n] = K[n][k]: registers 0, 1 n-tile 2 np, registers 2, 3 n-tile 2 np + 1
                n, kb = 16 * np_ + g + 8 * (j >> 1), 16 * ks + 2 * t + 8 * (j & 1) + half
                assert _decode(k[4 * lane + j], half) == (n, kb)
                # V tile, B[k][n] = V[k][n], through ldmatrix.trans
                kv, nv = 16 * np_ + 2 * t + 8 * (j & 1) + half, 16 * dp + g + 8 * (j >> 1)
                assert _decode(v[4 * lane + j], half) == (kv, nv)  # fmt: skip
    report = _simt_report(simt)
    ldsm = {s: r for s, r in report.items() if "ldmatrix" in s}
    assert len(ldsm) == 3 and all(r[2] == 1 for r in ldsm.values()), ldsm


HAZARDS = {
    0: None,
    1: "in flight",
    2: "no barrier",
    3: "read it with no barrier",
    4: "no cp.async.wait_group covered",
    5: "divergent warp collective",
    6: "deadlock",
    7: None,
    8: "outside the block",
    9: "outside every buffer",
}


@pytest.mark.parametrize("which", sorted(HAZARDS))
def test_executor_reports_each_misuse(simt, which):
    # Each probe is a small kernel; all but 0 and 7 are wrong in one way the executor must name.
    rc = simt.rq_simt_hazard(which)
    err = _simt_error(simt)
    if HAZARDS[which] is None:
        assert rc == 0 and err == "", err
    else:
        assert rc != 0 and HAZARDS[which] in err, err
    if which == 7:  # 32 lanes reading words 8 apart: 8 of them per bank
        (ways,) = [r[2] for s, r in _simt_report(simt).items() if "ld.shared" in s]
        assert ways == 8


class _MmaInputs:
    """A problem in the canonical form the binding hands to the tensor-core path, for the SIMT run.

    The side inputs come from make_problem (on float32 copies: the CPU has no float16 problem);
    q, k, v are the case's tensors in the 16-bit dtype, in their own layout (unit last stride).
    Outputs are poisoned with NaN.
    """

    def __init__(self, case, dtype, scale=None):
        from rollingq_kernels.api import make_problem

        kw = dict(case.kwargs)
        kw["return_stats"] = True
        if scale is not None:
            kw["scale"] = scale
        c32 = case.to(dtype=torch.float32)
        kw32 = {**c32.kwargs, **{k: kw[k] for k in ("return_stats", "scale") if k in kw}}
        if kw32.get("rotation") is not None:
            kw32["rotation"] = kw32["rotation"].float()
        p = make_problem(c32.q, c32.k, c32.v, **kw32)
        self.p = p
        self.side = _binding_side_inputs(p)
        low = case.to(dtype=dtype)
        self.q, self.k, self.v = (
            t if t.stride(-1) == 1 else t.contiguous() for t in (low.q, low.k, low.v)
        )
        B, H, Lq, D = self.q.shape
        M = p.num_modalities
        self.out = torch.full((B, H, Lq, self.v.shape[3]), float("nan"), dtype=dtype)
        self.lse = torch.full((B, H, Lq), float("nan"))
        self.mass = torch.full((B, H, Lq, M), float("nan"))
        self.key_sum = torch.full((B, H, M, D), float("nan"))
        self.key_count = torch.full((B, M), float("nan"))
        self.kind = {torch.float16: 1, torch.bfloat16: 2}[dtype]

    def args(self):
        p = self.p
        return MmaArgs(
            _desc(self.q), _desc(self.k), _desc(self.v), _desc(self.out),
            *(_ptr(t) for t in self.side), self.lse.data_ptr(), self.mass.data_ptr(),
            self.key_sum.data_ptr(), self.key_count.data_ptr(), p.scale, p.num_modalities,
            int(p.is_causal), self.kind,
        )  # fmt: skip

    def stats(self):
        from rollingq_kernels import AttentionStats

        return AttentionStats(self.mass, self.key_sum, self.key_count, self.lse)


def _simt_forward(simt, case, dtype, **kw):
    inp = _MmaInputs(case, dtype, **kw)
    args = inp.args()
    rc = simt.rq_simt_forward(ctypes.byref(args))
    assert rc == 0, _simt_error(simt)
    return inp


def _assert_conflict_free(simt):
    report = _simt_report(simt)
    assert any("ldmatrix.trans" in s for s in report) and any("cp.async" in s for s in report)
    bad = {s: r for s, r in report.items() if r[2] > 1}
    assert not bad, f"shared-memory bank conflicts (site: instructions, wavefronts, ways): {bad}"


MMA_FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding": dict(padding=True),
    "rotation_rows": dict(rotation="per_head", rows="batch"),
    "stats3": dict(modalities=3),
    "everything": dict(rotation="per_head", rows="subset", modalities=2, padding=True, causal=True),
}
MMA_SHAPES = {  # odd sizes: partial query blocks and key tiles, Lk > Lq and Lk < Lq
    "Lq129Lk150": dict(Lq=129, Lk=150),
    "Lq70Lk13": dict(Lq=70, Lk=13),
}


# every feature in bf16; float16 (another mma type and rounding) on the plain and the full case
MMA_CASES = [(torch.bfloat16, f) for f in MMA_FEATURES] + [
    (torch.float16, f) for f in ("plain", "everything")
]


@pytest.mark.parametrize("shape", list(MMA_SHAPES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "dtype,feature", MMA_CASES, ids=[f"{dtype_id(d)}-{f}" for d, f in MMA_CASES]
)
def test_tensor_core_forward_kernel_matches_reference(simt, dtype, feature, d, shape):
    kw = dict(MMA_SHAPES[shape])
    kw.update(MMA_FEATURES[feature])
    seed = zlib.crc32(f"{feature}/{shape}/{d}".encode()) % 1000
    case = make_case(B=2, H=2, D=d, seed=seed, **kw)
    inp = _simt_forward(simt, case, dtype)
    check_against_reference(case, inp.out, inp.stats(), dtype=dtype, what=f"{feature} D={d}: ")
    _assert_conflict_free(simt)


@pytest.mark.parametrize("d", [64, 128])
def test_tensor_core_forward_layouts_and_eight_modalities(simt, d):
    # (B, L, H, D) views read in place, 8 modalities (the one-hot tile full), causal with Lk > Lq
    case = make_case(B=2, H=3, Lq=45, Lk=200, D=d, layout="blhd", modalities=8, padding=True,
                     causal=True, rotation="shared", seed=d)  # fmt: skip
    inp = _simt_forward(simt, case, torch.bfloat16)
    assert inp.q.stride(1) == d  # really the transposed layout
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.bfloat16)
    _assert_conflict_free(simt)


def test_tensor_core_forward_empty_rows_and_a_single_key(simt):
    # sample 0 has every key padded: zero output, lse = -inf, zero mass; Lk = 1
    case = make_case(B=2, H=2, Lq=5, Lk=1, D=64, padding=True, modalities=2, cls_key=False, seed=2)
    inp = _simt_forward(simt, case, torch.float16)
    assert torch.equal(inp.out[0].float(), torch.zeros_like(inp.out[0].float()))
    assert torch.isneginf(inp.lse[0]).all()
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.float16)


def test_tensor_core_forward_without_query_rows(simt):
    # Lq = 0: no row to write, but the key sums and counts are still owed (one block per head)
    case = make_case(B=2, H=2, Lq=0, Lk=77, D=128, modalities=3, padding=True, seed=6)
    inp = _simt_forward(simt, case, torch.bfloat16)
    _, ref = reference(case)
    assert inp.out.numel() == 0 and inp.lse.numel() == 0
    assert_close(inp.key_sum, ref.key_sum, rel=2e-2, name="key_sum")  # of the bf16 keys
    assert torch.equal(inp.key_count.double(), ref.key_count)


def test_tensor_core_forward_ignores_out_of_range_ids(simt):
    # A direct op call may pass int32 ids outside [-1, M) (the binding narrows nothing then): such
    # keys take part and count nowhere, like id -1; 259 must not alias modality 3 as an int8.
    case = make_case(B=2, H=2, Lq=40, Lk=90, D=64, modalities=4, seed=8)
    inp = _MmaInputs(case, torch.bfloat16)
    ids = inp.side[2].clone()
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[:, 5::7] = True
    ids[bad] = torch.tensor([259, -7, 4, 1 << 20], dtype=torch.int32).repeat(ids.numel())[
        : int(bad.sum())
    ]
    inp.side[2] = ids
    args = inp.args()
    assert simt.rq_simt_forward(ctypes.byref(args)) == 0, _simt_error(simt)
    want = case.kwargs["key_modality"].clone()
    want[bad] = -1
    case.kwargs["key_modality"] = want
    check_against_reference(case, inp.out, inp.stats(), dtype=torch.bfloat16)


def test_tensor_core_path_declines_what_it_cannot_run(simt):
    case = make_case(B=1, H=1, Lq=9, D=64, seed=1)
    with pytest.raises(AssertionError, match="generic path"):
        _simt_forward(simt, case, torch.bfloat16, scale=-0.125)
    case = make_case(B=1, H=1, Lq=9, Lk=0, D=64, modalities=2, cls_key=False, seed=1)  # no key
    with pytest.raises(AssertionError, match="generic path"):
        _simt_forward(simt, case, torch.bfloat16)


# ---- the tensor-core backward, run by the SIMT executor --------------------------------------------


class MmaBwdArgs(ctypes.Structure):
    _fields_ = [
        ("fwd", MmaArgs),
        ("dout", TensorDesc),
        ("dq", TensorDesc),
        ("dk", TensorDesc),
        ("dv", TensorDesc),
        ("delta", ctypes.c_void_p),
        ("q_rot", ctypes.c_void_p),
    ]


def _simt_backward(simt, case, dtype, dout):
    """Forward then backward of the tensor-core path; the gradients (dq, dk, dv) in dtype."""
    simt.rq_simt_backward.argtypes = [ctypes.POINTER(MmaBwdArgs)]
    inp = _simt_forward(simt, case, dtype)
    B, H, Lq, D = inp.q.shape
    grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (inp.q, inp.k, inp.v)]
    dout_t = dout.to(dtype)
    delta = torch.full((B, H, Lq), float("nan"))
    q_rot = torch.full((B, H, Lq, D), float("nan"))
    args = MmaBwdArgs(
        inp.args(), _desc(dout_t), *(_desc(g) for g in grads), delta.data_ptr(), q_rot.data_ptr()
    )
    rc = simt.rq_simt_backward(ctypes.byref(args))
    assert rc == 0, _simt_error(simt)
    return inp, grads


def _reference_grads(case, dout, dtype):
    """Gradients of the reference in float64, on inputs rounded to dtype (what the kernel sees)."""
    c = case.to(dtype=dtype).to(dtype=torch.float64)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (c.q, c.k, c.v))
    kw = {n: c.kwargs[n] for n in ("rotated_queries", "key_padding_mask", "is_causal")
          if n in c.kwargs}  # fmt: skip
    if c.kwargs.get("rotation") is not None:
        kw["rotation"] = c.kwargs["rotation"].to(torch.float64)
    out = rolling_attention_reference(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), dout)


# relative L2 error of the gradients against the float64 reference on the rounded inputs: P and dS
# are rounded to the 16-bit type before their MMAs (as in FlashAttention-2)
BWD_TOL = {torch.float16: 1.5e-3, torch.bfloat16: 1e-2}  # measured: 4e-4 and 3.5e-3


# every feature in float16 (the tighter bound) at Lq 129, Lk 150; bfloat16 and the short shape
# (Lk < Lq, one partial key tile) on the full case
BWD_CASES = [(torch.float16, f, "Lq129Lk150") for f in
             ("plain", "causal", "padding", "rotation_rows", "everything")] + [
    (torch.bfloat16, "everything", "Lq129Lk150"),
    (torch.float16, "everything", "Lq70Lk13"),
]  # fmt: skip


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "dtype,feature,shape", BWD_CASES, ids=[f"{dtype_id(d)}-{f}-{s}" for d, f, s in BWD_CASES]
)
def test_tensor_core_backward_matches_reference_gradients(simt, dtype, feature, shape, d):
    kw = dict(MMA_SHAPES[shape])
    kw.update(MMA_FEATURES[feature])
    kw["return_stats"] = False
    case = make_case(B=2, H=2, D=d, seed=zlib.crc32(f"bwd/{feature}/{shape}".encode()) % 1000, **kw)
    g = torch.Generator().manual_seed(d)
    dout = torch.randn(2, 2, kw["Lq"], d, generator=g, dtype=torch.float64)
    _, grads = _simt_backward(simt, case, dtype, dout)
    ref = _reference_grads(case, dout, dtype)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        assert_close(got, want, rel=BWD_TOL[dtype], name=f"{feature} D={d} {name}")
    _assert_conflict_free(simt)
