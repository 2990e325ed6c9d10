"""The fused CPU kernel (backend "cpu", op rollingq::attention_fwd / attention_bwd).

Every check compares with the float64 reference on fresh random inputs, with the outputs the
kernel allocates poisoned with NaN so that an element it forgets to write fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    check_against_reference,
    dtype_id,
    make_case,
    nan_poisoned_outputs,
    random_orthogonal,
    reference,
)

from rollingq_kernels import fused_op, rolling_attention, rolling_attention_reference
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import select_backend
from rollingq_kernels.reference import apply_rotation

pytestmark = pytest.mark.skipif(
    fused_op.load_error() is not None, reason=str(fused_op.load_error())
)


# ---- kernel variants --------------------------------------------------------------------------
# The library carries the kernels compiled for several instruction sets and picks the best the
# CPU runs. Every variant this machine can run is tested: the `isa` fixture switches the loaded
# library to it (C functions of csrc/cpu/dispatch.cpp, through ctypes).


def _cpu_library():
    if fused_op.load_error() is not None:
        return None
    lib = ctypes.CDLL(fused_op.library_path())
    lib.rollingq_cpu_isa.restype = ctypes.c_char_p
    lib.rollingq_cpu_isas.restype = ctypes.c_char_p
    lib.rollingq_cpu_set_isa.argtypes = [ctypes.c_char_p]
    lib.rollingq_cpu_bf16_convert.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
    ]
    lib.rollingq_cpu_set_stream_bytes.argtypes = [ctypes.c_int64]
    lib.rollingq_cpu_set_stream_bytes.restype = ctypes.c_int64
    lib.rollingq_cpu_chunk_tasks.argtypes = [ctypes.c_int64] * 4
    lib.rollingq_cpu_chunk_tasks.restype = ctypes.c_int64
    return lib


_LIB = _cpu_library()
ISAS = _LIB.rollingq_cpu_isas().decode().split(",") if _LIB is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    previous = _LIB.rollingq_cpu_isa()
    assert _LIB.rollingq_cpu_set_isa(request.param.encode()) == 0
    yield request.param
    assert _LIB.rollingq_cpu_set_isa(previous) == 0


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def test_variants_cover_what_the_cpu_offers():
    flags = _cpu_flags()
    assert ISAS[-1] == "generic"
    if {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags:
        assert "avx2" in ISAS
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags:
        # bf16 converted to float32, and bf16 by VDPBF16PS: ranked first on AMD CPUs (Zen 4
        # multiplies bf16 pairs at twice the float32 FMA rate), second on Intel's
        assert "avx512" in ISAS and "avx512_dot" in ISAS
        dot_first = _cpu_vendor() == "AuthenticAMD"
        assert (ISAS.index("avx512_dot") < ISAS.index("avx512")) == dot_first
    # the best runnable variant is the default (ISAS is ordered best first)
    assert _probe(check=True, ROLLINGQ_CPU_ISA=None).stdout.split()[0] == ISAS[0]


# Run in a fresh process: one small call, then print the variant used and the error vs the
# float64 reference.
_ENV_PROBE = """
import ctypes, torch
import rollingq_kernels as rk
from rollingq_kernels import fused_op
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(2, 3, 37, 24, generator=g) for _ in range(3))
out = rk.rolling_attention(q, k, v, backend="cpu", is_causal=True)
ref = rk.rolling_attention_reference(q.double(), k.double(), v.double(), is_causal=True)
lib = ctypes.CDLL(fused_op.library_path())
lib.rollingq_cpu_isa.restype = ctypes.c_char_p
print(lib.rollingq_cpu_isa().decode(), (out.double() - ref).abs().max().item())
"""


def _env(**overrides):
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _probe(check: bool = False, **env) -> subprocess.CompletedProcess:
    """_ENV_PROBE in a fresh process with these environment variables."""
    return subprocess.run(
        [sys.executable, "-c", _ENV_PROBE], capture_output=True, text=True, env=_env(**env),
        check=check,
    )  # fmt: skip


@pytest.mark.parametrize("name", ISAS)
def test_environment_variable_selects_the_variant(name):
    res = _probe(check=True, ROLLINGQ_CPU_ISA=name)
    used, err = res.stdout.split()
    assert used == name
    assert float(err) < 1e-5


def test_environment_variable_naming_an_unknown_variant_is_an_error():
    res = _probe(ROLLINGQ_CPU_ISA="sse9")
    assert res.returncode != 0
    assert "ROLLINGQ_CPU_ISA=sse9 is not a kernel variant" in res.stderr
    assert _LIB.rollingq_cpu_set_isa(b"sse9") == -1


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (id, make_case keyword arguments): every feature alone, then in combination, odd sizes.
CASES = [
    ("plain", dict()),
    ("rot_shared", dict(rotation="shared")),
    ("rot_per_head_row_subset", dict(rotation="per_head", rows="subset")),
    ("rot_rows_per_sample", dict(rotation="shared", rows="batch")),
    ("mod2", dict(modalities=2)),
    ("mod3_no_cls", dict(modalities=3, cls_key=False)),
    ("padding_empty_sample", dict(padding=True, modalities=2)),
    ("causal", dict(causal=True)),
    (
        "all_features",
        dict(rotation="per_head", rows="batch", modalities=3, padding=True, causal=True),
    ),
    ("lq_lt_lk_causal", dict(Lq=7, Lk=129, causal=True, modalities=2, rotation="shared")),
    ("lq_gt_lk_causal", dict(Lq=129, Lk=7, causal=True, padding=True, modalities=2)),
    ("lq1", dict(Lq=1, Lk=129, rotation="shared", modalities=2)),
    ("lk1", dict(Lq=7, Lk=1, modalities=2)),
    ("l1", dict(Lq=1, Lk=1, rotation="per_head", modalities=2)),
    ("l129_d96", dict(B=1, H=2, Lq=129, D=96, rotation="per_head", rows="subset", modalities=2)),
    ("l1000_d40", dict(B=1, H=2, Lq=1000, D=40, rotation="shared", modalities=2, padding=True)),
    ("d1", dict(D=1, rotation="shared", modalities=2, causal=True)),
    ("d8_dv24", dict(D=8, Dv=24, rotation="shared", modalities=2, padding=True)),
    ("d768", dict(B=1, H=1, Lq=33, Lk=70, D=768, rotation="shared", rows="subset", modalities=2)),
    # D + Dv > 256: 256-query tiles, one full and one partial
    (
        "wide_tiles",
        dict(
            B=1,
            H=2,
            Lq=300,
            Lk=333,
            D=136,
            rotation="per_head",
            rows="subset",
            modalities=2,
            padding=True,
            causal=True,
        ),
    ),  # fmt: skip
    ("scale", dict(scale=0.3, modalities=2, causal=True)),
    ("blhd", dict(layout="blhd", Lq=129, rotation="per_head", modalities=2, padding=True)),
    ("strided", dict(layout="strided", Lq=33, rotation="shared", modalities=3, causal=True)),
]


def _run(case, **extra):
    with nan_poisoned_outputs():
        return rolling_attention(case.q, case.k, case.v, backend="cpu", **case.kwargs, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(name, kw, dtype, isa):
    case = make_case(dtype=dtype, seed=hash(name) % 1000, **kw)
    out, stats = _run(case)
    assert out.dtype == dtype and out.shape == case.q.shape[:3] + case.v.shape[3:]
    check_against_reference(case, out, stats, dtype=dtype, what=f"{name}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "lengths,counted",
    [
        ((1, 600, 499), (False, True, True)),  # [CLS | modality 0 | modality 1], blocks of 512
        ((3, 40, 60, 500, 7, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 230), None),  # few + many runs
    ],
    ids=["cls_two_segments", "mixed_run_counts"],
)
def test_forward_with_segment_modalities(lengths, counted, dtype, isa):
    # Contiguous modality segments take the kernel's per-run path for the mass, blocks with many
    # runs the per-modality dot products; both must match the reference.
    from rollingq_kernels import key_modality_from_lengths

    ids = key_modality_from_lengths(lengths, counted)
    M = int(ids.max()) + 1
    case = make_case(
        dtype=dtype, B=2, H=2, Lq=65, Lk=ids.numel(), D=32, rotation="shared", rows="batch",
        padding=True, causal=False, seed=37,
    )  # fmt: skip
    per_sample = torch.stack([ids, ids.roll(7)])  # a boundary moved in sample 1
    case.kwargs.update(key_modality=per_sample, num_modalities=M)
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=dtype, what="segments: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_without_stats_returns_the_same_output(dtype):
    case = make_case(dtype=dtype, Lq=33, rotation="shared", rows="subset", padding=True, seed=3)
    case.kwargs["return_stats"] = False
    out = _run(case)
    assert isinstance(out, torch.Tensor)
    check_against_reference(case, out, None, dtype=dtype)


def test_empty_rows_are_zero_with_minus_inf_lse(isa):
    case = make_case(dtype=torch.float32, B=2, Lq=9, padding=True, modalities=2, seed=5)
    out, stats = _run(case)
    # make_case pads every key of sample 0
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(stats.lse[0], torch.full_like(stats.lse[0], float("-inf")))
    assert torch.equal(stats.modality_mass[0], torch.zeros_like(stats.modality_mass[0]))
    assert not torch.isnan(out).any() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0), (0, 0)])
def test_op_on_empty_sequences(Lq, Lk, isa):
    # The API answers empty problems with the reference; the op itself must still be right.
    g = torch.Generator().manual_seed(31)
    q = torch.randn(2, 3, Lq, 8, generator=g)
    k = torch.randn(2, 3, Lk, 8, generator=g)
    v = torch.randn(2, 3, Lk, 8, generator=g)
    ids = torch.randint(-1, 2, (2, Lk), generator=g, dtype=torch.int32)
    with nan_poisoned_outputs():
        out, lse, mass, key_sum, key_count = torch.ops.rollingq.attention_fwd(
            q, k, v, None, None, ids, 2, None, None, False, 0, 0.5, 0.0, None
        )
    ref_out, ref = rolling_attention_reference(
        q, k, v, key_modality=ids, num_modalities=2, scale=0.5, return_stats=True
    )
    for name, a, b in zip(
        ("out", "lse", "mass", "key_sum", "key_count"),
        (out, lse, mass, key_sum, key_count),
        (ref_out, ref.lse, ref.modality_mass, ref.key_sum, ref.key_count),
    ):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_mass_rows_sum_to_one_minus_unattributed_keys():
    case = make_case(dtype=torch.float32, B=2, H=2, Lq=65, Lk=300, modalities=3, seed=11)
    out, stats = _run(case)
    ids = case.kwargs["key_modality"]
    ref_out, ref_stats = reference(case)
    # mass on the -1 keys, from the reference probabilities
    p = torch.softmax(
        (case.q.double() @ case.k.double().transpose(-1, -2)) / case.q.shape[-1] ** 0.5, -1
    )
    unattributed = (p * (ids == -1)[:, None, None, :]).sum(-1)
    total = stats.modality_mass.double().sum(-1)
    assert (total - (1 - unattributed)).abs().max().item() < 1e-5
    assert_close(out, ref_out, rel=1e-5, name="out")


def test_auto_picks_cpu_for_cpu_tensors():
    case = make_case(dtype=torch.float32, rotation="shared", modalities=2)
    problem = make_problem(case.q, case.k, case.v, **case.kwargs)
    assert select_backend(problem, "auto").name == "cpu"


def _input_copies(case):
    """Copies of a q/k/v-shaped tensor made while the cpu backend runs ``case``."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        out = rolling_attention(case.q, case.k, case.v, backend="cpu", **case.kwargs)
    events = prof.events()
    assert any(e.name == "rollingq::attention_fwd" for e in events)
    qkv_shape = list(case.q.shape)
    copies = [
        (e.name, e.input_shapes)
        for e in events
        if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
        and qkv_shape in list(e.input_shapes)
    ]
    return out, copies


def test_transposed_layout_is_read_in_place():
    # A (B, L, H, D) projection viewed as (B, H, L, D) must reach the kernel without a copy.
    case = make_case(dtype=torch.float32, layout="blhd", Lq=65, rotation="shared", seed=2)
    case.kwargs["return_stats"] = False
    assert not case.q.is_contiguous()
    out, copies = _input_copies(case)
    assert not copies, f"inputs were copied: {copies}"
    check_against_reference(case, out, None, dtype=torch.float32)
    # the probe does see copies: a last dim with stride 2 is (and may be) copied
    strided = make_case(dtype=torch.float32, layout="strided", Lq=65, seed=2)
    strided.kwargs["return_stats"] = False
    assert _input_copies(strided)[1]


# ---- memory safety ------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_flags():
    """csrc/build_flags.txt as {key: [args]} (the file setup.py and CMake read)."""
    flags = {}
    with open(os.path.join(ROOT, "csrc", "build_flags.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, value = line.partition("=")
                flags[key.strip()] = value.split()
    return flags


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    # csrc/cpu/check/sanitize_driver.cpp runs every variant this CPU executes on random problems
    # with exactly-sized buffers; the variants are compiled here with ASan + UBSan (no torch).
    machine = platform.machine().lower()
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    arch = arch.get(machine, "other")
    flags = _build_flags()
    variants = [v for v in ISAS if v != "amx" and f"variant.{arch}.{v}" in flags]
    common = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=fast",
              "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
              "-I" + os.path.join(ROOT, "csrc")]  # fmt: skip
    jobs, objects = [], []
    for v in variants:
        obj = str(tmp_path / f"{v}.o")
        src = os.path.join(ROOT, "csrc", "cpu", "isa", f"{v}.cpp")
        cmd = ["g++", *common, *flags[f"variant.{arch}.{v}"], "-c", src, "-o", obj]
        jobs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
        objects.append(obj)
    for job in jobs:
        _, err = job.communicate(timeout=900)
        assert job.returncode == 0, err[-3000:]
    driver = str(tmp_path / "driver")
    defines = [f"-DROLLINGQ_ISA_{v.upper()}=1" for v in variants]
    src = os.path.join(ROOT, "csrc", "cpu", "check", "sanitize_driver.cpp")
    built = subprocess.run(
        ["g++", *common, *defines, src, *objects, "-o", driver], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-3000:]
    run = subprocess.run(
        [driver, "11", "40", "1" if "amx" in ISAS else "0"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-5000:]


# ---- bf16 rows ---------------------------------------------------------------------------------


def _bf16_convert(src: torch.Tensor, to_bf16: bool) -> torch.Tensor:
    dst = torch.full((src.numel(),), -1, dtype=torch.int16 if to_bf16 else torch.float32)
    rc = _LIB.rollingq_cpu_bf16_convert(src.data_ptr(), dst.data_ptr(), src.numel(), int(to_bf16))
    assert rc == 0
    return dst


@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 100])
def test_bf16_row_conversions_round_to_nearest_even(n, isa):
    # Every kernel writes bf16 outputs and gradients, and reads bf16 rows into float32, through
    # one pair of conversions, a vector at a time with a scalar tail. Their bits must be torch's
    # round-to-nearest-even for every float: ties both ways, values that round up into the next
    # binade or to inf, denormals, zeros of both signs. A NaN stays a NaN with its sign.
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-40, 39, (n,), generator=g)
    bits = x.view(torch.int32)
    # half of the values exactly halfway between two bf16 (low 16 bits 0x8000), odd and even
    tie = torch.rand(n, generator=g) < 0.5
    bits = torch.where(tie, (bits & ~0xFFFF) | 0x8000, bits)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3e-39, 3.3961e38, 1.0 + 2**-8]
    ).view(torch.int32)
    bits[: min(n, len(special))] = special[: min(n, len(special))]
    x = bits.view(torch.float32)
    got = _bf16_convert(x, True)
    want = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(got, want), (x[got != want], got[got != want], want[got != want])

    nan = x.clone()
    nan[n // 2] = float("nan")
    nan.view(torch.int32)[n // 2] |= (1 << 31) if n % 2 else 0  # a negative NaN for odd n
    got = _bf16_convert(nan, True).view(torch.bfloat16)
    assert torch.isnan(got[n // 2]) and bool(got[n // 2].view(torch.int16) < 0) == bool(n % 2)
    keep = torch.arange(n) != n // 2
    assert torch.equal(got[keep].view(torch.int16), want[keep])

    back = _bf16_convert(want, False)
    assert torch.equal(back, want.view(torch.bfloat16).float())


# ---- streaming stores -------------------------------------------------------------------------


@contextlib.contextmanager
def _stream_bytes(n: int):
    previous = _LIB.rollingq_cpu_set_stream_bytes(n)
    assert previous >= -1
    try:
        yield
    finally:
        _LIB.rollingq_cpu_set_stream_bytes(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_streamed_output_rows_have_the_same_bits(layout, dtype, isa):
    # Outputs of at least ROLLINGQ_CPU_STREAM_BYTES (default 1 MiB) are written with streaming
    # stores where every row is whole 64-byte lines (Dv = 64 here, in both layouts). Forced for
    # this small output, they must write every element (the buffer is NaN-poisoned) with the
    # bits of the ordinary stores, and the answer must be the reference's.
    case = make_case(
        dtype=dtype, B=2, H=3, Lq=150, Lk=301, D=40, Dv=64, layout=layout, rotation="shared",
        modalities=2, padding=True, seed=21,
    )  # fmt: skip
    with _stream_bytes(-1):
        plain, plain_stats = _run(case)
    with _stream_bytes(0):
        streamed, stats = _run(case)
    assert streamed.data_ptr() % 64 == 0  # the rows qualify: the streaming path ran
    check_against_reference(case, streamed, stats, dtype=dtype)
    assert torch.equal(streamed, plain) and torch.equal(stats.lse, plain_stats.lse)


def test_stream_threshold_environment_variable():
    ok = _probe(check=True, ROLLINGQ_CPU_STREAM_BYTES="0")
    assert float(ok.stdout.split()[1]) < 1e-5
    bad = _probe(ROLLINGQ_CPU_STREAM_BYTES="4MB")
    assert bad.returncode != 0
    assert "ROLLINGQ_CPU_STREAM_BYTES=4MB is not a byte count" in bad.stderr


# ---- threads --------------------------------------------------------------------------------


# The bf16 forward's own blocking (csrc/cpu/kernels/bf16_engine.h): 128-query tiles, 256-key
# steps with a partial last one (on avx512_dot without masks: scores kept in registers, the
# running max seeded from key 0), K and V^T packed per head as the tiles first ask for keys (causal
# tiles stop inside a key block and the next tile continues it), raw products scaled in the
# softmax when there is no mask, and a running max that moves only by more than 2^8.
BF16_BLOCK_CASES = [
    ("tiles_and_steps", dict(B=1, H=2, Lq=300, Lk=600, D=64, rotation="shared", modalities=2)),
    ("causal_packing", dict(B=1, H=2, Lq=300, Lk=600, D=64, causal=True, modalities=2)),
    ("odd_lk_padding", dict(B=2, H=1, Lq=150, Lk=517, D=32, Dv=48, padding=True, modalities=3)),
    # no mask: on avx512_dot the steps after the first take their scores from registers, here
    # with 96 lanes (a group of 64 and one of 32) and an odd last key
    ("odd_lk_in_registers", dict(B=1, H=2, Lq=90, Lk=333, D=64, Dv=32, modalities=3)),
]


@pytest.mark.parametrize("name,kw", BF16_BLOCK_CASES, ids=[c[0] for c in BF16_BLOCK_CASES])
def test_bf16_key_steps_and_query_tiles(name, kw, isa):
    case = make_case(dtype=torch.bfloat16, seed=len(name), **kw)
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.bfloat16, what=f"{name}: ")


@pytest.mark.parametrize(
    "offset,width", [(1, 42), (0, 41), (2, 44)], ids=["odd_offset", "odd_row_stride", "aligned"]
)
def test_bf16_queries_at_any_address_give_the_same_bits(offset, width, isa):
    # The bf16 forward packs Q^T as the transpose of each query row's 32-bit words (pairs of
    # bf16); rows that are not 4-byte aligned (an odd element offset, an odd row stride) are
    # packed through float instead. Both must give the reference's answer, and the same bits.
    case = make_case(
        dtype=torch.bfloat16, B=2, H=3, Lq=77, Lk=150, D=40, rotation="shared", rows="subset",
        modalities=2, seed=13,
    )  # fmt: skip
    out, stats = _run(case)
    B, H, L, D = case.q.shape
    big = torch.randn(B, H, L, width, dtype=torch.bfloat16)
    big[..., offset : offset + D] = case.q
    q = big[..., offset : offset + D]
    aligned = q.data_ptr() % 4 == 0 and q.stride(2) % 2 == 0
    assert aligned == (offset == 2)
    moved = type(case)(q, case.k, case.v, case.kwargs)
    out2, stats2 = _run(moved)
    check_against_reference(moved, out2, stats2, dtype=torch.bfloat16)
    assert torch.equal(out, out2) and torch.equal(stats.lse, stats2.lse)


@pytest.mark.parametrize("gain", [12, 60, -16])
@pytest.mark.parametrize("late_key", [0, 5, 200, 300, 599])
def test_bf16_running_max_that_moves_after_settling(late_key, gain, isa):
    # Keys of ordinary scores settle every row's running max in the first step; one key far
    # above them (in the first, a middle or the last step) must still rescale what was summed.
    # The forward first tries a step against the settled max (on avx512_dot with its scores in
    # registers, the max seeded at key 0's score + 40) and redoes it when the max moves:
    # with gain 60, row 0's scaled score jumps by about 360, whose exp overflows float32 unless
    # the step is redone (gain 12: by about 70, which the sums survive without rescaling).
    # Gain -16 puts row 0's score about 96 below the others: its probability is a float32
    # subnormal, which avx512_dot's exponent in registers keeps (and bf16 flushes to zero).
    # At key 0 these set the seed: every other key far below it (60, 12) or far above (-16:
    # every lane's first step is redone the stored way).
    case = make_case(dtype=torch.bfloat16, B=1, H=2, Lq=200, Lk=600, D=64, modalities=2, seed=3)
    k = case.k.clone()
    k[:, :, late_key] = (case.q[:, :, :1].float().mean(2) * gain).to(torch.bfloat16)
    case = type(case)(case.q, k, case.v, case.kwargs)
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.bfloat16, what=f"key {late_key}: ")


@pytest.mark.parametrize("scale", [0.5, 40.0, 400.0])
def test_bf16_scores_spread_far_beyond_the_seeded_max(scale, isa):
    # Scaled scores tens to thousands apart: the max seeded from key 0 (avx512_dot: its score
    # + 40) is far below many rows' largest score and far above others', so steps are redone
    # the stored way wherever a probability leaves the headroom. PyTorch's own bf16 attention
    # (the 2x rule's yardstick) rounds the scores to bf16 and is far off at these scales; the
    # kernel multiplies in float32, so it is held to the reference within bf16's rounding of
    # the probabilities and the output.
    case = make_case(
        dtype=torch.bfloat16, B=2, H=2, Lq=150, Lk=333, D=64, modalities=2, seed=23, scale=scale
    )
    out, stats = _run(case)
    ref_out, ref_stats = reference(case)
    err = (out.double() - ref_out).abs()
    assert err.max().item() <= 1 / 128 * ref_out.abs().max().item(), f"max error {err.max():.3e}"
    assert_close(stats.lse, ref_stats.lse, rel=1e-5, name="lse")
    assert_close(stats.modality_mass, ref_stats.modality_mass, rel=1e-2, name="mass", atol=1e-7)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id
)
@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, H=3, Lq=300, D=40, rotation="per_head", modalities=2, padding=True, causal=True),
        # one head: the backward splits the keys into chunks and sums their dq in a second phase
        dict(B=1, H=1, Lq=70, Lk=700, D=24, rotation="shared", rows="subset", modalities=2),
        # a few queries: scores by rows, dK / dV written in place, key chunks
        dict(B=1, H=2, Lq=3, Lk=700, D=64, rotation="shared", modalities=2),
        # one head of several query tiles, shared by the threads (each packs the head's K and V
        # itself); causal: each tile packs further keys than the one before
        dict(
            B=1,
            H=1,
            Lq=700,
            Lk=650,
            D=40,
            rotation="shared",
            rows="subset",
            modalities=2,
            padding=True,
            causal=True,
        ),
    ],
    ids=["many_heads", "one_head_key_chunks", "few_queries", "one_head_query_tiles"],
)
def test_thread_count_does_not_change_a_bit(kw, dtype, isa):
    # Tasks are cut by shape only and every element is reduced in a fixed order inside one task:
    # outputs, statistics and gradients must be bitwise the same for any thread count.
    case = make_case(dtype=dtype, seed=7, **kw)
    case.requires_grad_()
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out, stats = rolling_attention(case.q, case.k, case.v, backend="cpu", **case.kwargs)
        grads = torch.autograd.grad(out, (case.q, case.k, case.v), torch.ones_like(out))
        results.append((out, *stats, *grads))
    names = ("out", *stats._fields, "dq", "dk", "dv")
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            assert torch.equal(a, b), f"{name} differs between thread counts"


@pytest.mark.parametrize(
    "n,share,group,threads,want",
    [
        (16, 1, 16, 2, 1),  # one head of 16 query tiles: every tile its own chunk
        (48, 3, 16, 2, 3),  # three heads over two threads: a third of a head per chunk
        (7, 1, 7, 2, 1),
        (64, 4, 16, 2, 16),  # four heads over two threads: whole heads, K and V packed once
        (64, 4, 16, 4, 16),
        (256, 16, 8, 2, 16),  # many heads: whole heads, a few per chunk
        (17 * 16, 1, 16, 2, 16),  # 17 heads: as many chunks as wanted, whole heads
        (36, 1, 3, 8, 1),  # 12 heads of 3 tiles over 8 threads
        (30, 2, 5, 4, 2),  # 6 heads of 5 tiles over 4 threads: about a share each
        (10, 9, 5, 2, 10),  # a share of more than a head: rounded up to whole heads
    ],
)
def test_chunks_split_a_head_only_where_whole_heads_leave_threads_idle(
    n, share, group, threads, want
):
    # run_tasks hands the threads chunks of tasks. A head's query tiles share its packed K and
    # V, so chunks are whole heads, except where that loads the threads unevenly: a single head
    # of 1000 queries was one chunk, and one thread ran it while the other idled (1.13x SDPA's
    # time at (1, 1, 1000, 65536, 64) on two threads, 0.54x once shared).
    assert _LIB.rollingq_cpu_chunk_tasks(n, share, group, threads) == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("Lk", [1, 300])
@pytest.mark.parametrize("scale", [1e4, 1e6, 1e10, 1e30])
def test_huge_scaled_scores_match_reference(scale, Lk, dtype, isa):
    # Scaled scores of 1e4 to 1e32: the softmax is (nearly) one-hot on each row's largest
    # score, split evenly between tied keys. Small integer inputs make every score exact in
    # any arithmetic, so ties are ties for the kernel and the reference alike (the last key
    # repeats key 5). The bf16 paths that form the exponent from unrounded products (scale
    # inside the softmax, lse folded into one FMA) gave 0 or inf for the row's largest term
    # here, and NaN or wrong outputs and gradients; past kFoldLimit they scale and round first.
    # Gradients: with one key, P = exp(x - lse) = 1 exactly, and dV = P^T dO is checked. With
    # more keys the backward's P is only as exact as the float32 lse, whose ulp at |lse| = 1e5
    # is 2^-7 (log 2 of a two-way tie vanishes in it at 1e11), as in every kernel that keeps
    # lse instead of the scores; and dQ, dK are scale x (dP - delta), zero in exact arithmetic
    # at a one-hot row: rounding noise times the scale in any implementation.
    g = torch.Generator().manual_seed(int(Lk + math.log10(scale)))
    q = torch.randint(-2, 3, (1, 2, 40, 64), generator=g).to(dtype)
    k = torch.randint(-2, 3, (1, 2, Lk, 64), generator=g).to(dtype)
    v = torch.randn(1, 2, Lk, 48, generator=g).to(dtype)
    if Lk > 5:
        k[:, :, -1] = k[:, :, 5]
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with nan_poisoned_outputs():
        out, stats = rolling_attention(*inputs, backend="cpu", scale=scale, return_stats=True)
        gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        (dv,) = torch.autograd.grad(out, inputs[2], gout.to(dtype))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_stats = rolling_attention_reference(*ref_in, scale=scale, return_stats=True)
    (want,) = torch.autograd.grad(ref_out, ref_in[2], gout)
    assert not out.isnan().any()
    err = (out.double() - ref_out).abs().max().item()
    assert err <= 1 / 128 * ref_out.abs().max().item(), f"out: max error {err:.3e}"
    assert_close(stats.lse, ref_stats.lse, rel=1e-6, name="lse")
    if Lk == 1:
        assert_close(dv, want, rel=3e-2 if dtype == torch.bfloat16 else 2e-5, name="dv")


# ---- NaN and infinity -------------------------------------------------------------------------
# A NaN anywhere in a row's visible scores, or a +inf score (inf - inf in the softmax), gives
# that row NaN output, lse and mass, as in torch's SDPA; rows that do not see the NaN are exact,
# and a row that sees no key at all still gives zeros. Hidden positions (causal) are replaced by
# -inf, never added to, so a NaN there is ignored in the forward. Positions are chosen in the
# middle and at the ends of key blocks: the answer must not depend on where a key falls.

NAN = float("nan")
NAN_CASES = ["q_row", "k_first", "k_mid_block", "k_later_step", "k_last", "v_key0", "inf_score"]


def _poisoned(dtype, where, causal, Lq=77):
    case = make_case(
        dtype=dtype, B=2, H=3, Lq=Lq, Lk=300, D=24, rotation="shared", rows="subset",
        modalities=2, causal=causal, seed=41,
    )  # fmt: skip
    q, k, v = (t.clone() for t in (case.q, case.k, case.v))
    if where == "q_row":
        q[1, 2, min(5, Lq - 1), 3] = NAN
    elif where == "k_first":
        k[0, 1, 0, 7] = NAN
    elif where == "k_mid_block":
        k[1, 0, 37, 2] = NAN
    elif where == "k_later_step":  # after the running max has settled (causal: no row sees it)
        k[1, 2, 150, 5] = NAN
    elif where == "k_last":  # causal: no row sees it
        k[0, 0, -1, 0] = NAN
    elif where == "v_key0":  # key 0 is visible from every row
        v[1, 1, 0, 4] = NAN
    elif where == "inf_score":  # the scaled scores overflow to +-inf
        case.kwargs["scale"] = 1e38
    case.q, case.k, case.v = q, k, v
    return case


def _sdpa_in_kernel_precision(case, dtype, grad=None):
    """torch's SDPA on the rotated queries, in the kernel's accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (
        t.detach().to(acc).requires_grad_(grad is not None) for t in (case.q, case.k, case.v)
    )
    kw = case.kwargs
    qr = apply_rotation(q, kw["rotation"].to(acc), kw.get("rotated_queries"))
    out = F.scaled_dot_product_attention(qr, k, v, is_causal=kw["is_causal"], scale=kw.get("scale"))
    scores = (qr @ k.transpose(-1, -2)) * (kw.get("scale") or q.shape[-1] ** -0.5)
    if kw["is_causal"]:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    bad_rows = scores.isnan().any(-1) | (scores == float("inf")).any(-1)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(acc)) if grad is not None else None
    return out.detach(), bad_rows.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where", NAN_CASES)
def test_nan_and_inf_propagate_like_sdpa(where, causal, dtype, isa):
    case = _poisoned(dtype, where, causal)
    want, bad_rows, _ = _sdpa_in_kernel_precision(case, dtype)
    # a key no row sees poisons nothing; float64 scores do not overflow at scale 1e38
    harmless = (where in ("k_last", "k_later_step") and causal) or (
        where == "inf_score" and dtype == torch.float64
    )
    assert bool(want.isnan().any()) != harmless
    out, stats = _run(case)
    assert torch.equal(out.isnan(), want.isnan()), (
        f"NaN at {torch.nonzero(out.isnan() != want.isnan())[:5].tolist()} differs from SDPA"
    )
    assert torch.equal(stats.lse.isnan(), bad_rows)
    assert torch.equal(
        stats.modality_mass.isnan(), bad_rows[..., None].expand_as(stats.modality_mass)
    )
    # everything else matches SDPA computed in the same precision (at scale 1e38 the float64
    # reference does not overflow where float32 does), and the lse the float64 reference
    keep = ~want.isnan()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[
        dtype
    ]
    assert_close(out[keep], want[keep], rel=tol, name="out")
    if where != "inf_score":
        rows = ~bad_rows
        assert_close(
            stats.lse[rows], reference(case)[1].lse[rows], rel=STATS_REL[dtype], name="lse"
        )


# float16 rows are computed in float32 (the float engine): statistics as float32's
STATS_REL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("where", NAN_CASES)
def test_nan_and_inf_reach_the_gradients_sdpa_reaches(where, dtype, isa):
    # Without masks every key takes part, so the NaN pattern of the gradients is fixed by the
    # maths alone (with masks, a NaN can also reach a gradient through 0 * NaN at a hidden
    # position, and where it does depends on the block size, in SDPA as here).
    case = _poisoned(dtype, where, causal=False)
    g = torch.randn(case.q.shape[:3] + case.v.shape[3:], dtype=torch.float64)
    _, _, want = _sdpa_in_kernel_precision(case, dtype, grad=g)
    assert any(w.isnan().any() for w in want)
    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    with nan_poisoned_outputs():
        out, _ = rolling_attention(*inputs, backend="cpu", **case.kwargs)
        got = torch.autograd.grad(out, inputs, g.to(dtype))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a.isnan(), b.isnan()), (
            f"{name}: NaN at {torch.nonzero(a.isnan() != b.isnan())[:5].tolist()} differs from SDPA"
        )


def test_nan_query_of_a_row_that_sees_no_key_still_gives_zeros(isa):
    case = make_case(dtype=torch.float32, B=2, Lq=9, padding=True, modalities=2, seed=5)
    case.q[0, 1, 4, 2] = NAN  # sample 0 sees no key at all (make_case pads all of it)
    out, stats = _run(case)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(stats.lse[0], torch.full_like(stats.lse[0], float("-inf")))
    assert torch.equal(stats.modality_mass[0], torch.zeros_like(stats.modality_mass[0]))
    check_against_reference(case, out, stats, dtype=torch.float32)


# ---- a few queries: scores by rows -------------------------------------------------------------
# Calls of at most half a vector of queries (decoding with a KV cache, RollingQ's [CLS] row alone;
# 8 float32 queries with AVX-512, 4 with AVX2, 2 on 16-byte vectors) take their scores S^T and,
# in the backward, dP^T as dot products along K's and V's rows instead of with queries along
# lanes; bfloat16 calls of so few queries go to the float engine. Lq = 9 is past every
# variant's limit. Every feature goes through the new path: masks, dropout, GQA, rotation of a
# subset of rows, statistics, (B, L, H, D) queries, odd head dims (K packed, padded with zeros),
# a wide head (D + Dv > 256, no panels).

FEW_QUERY_CASES = [
    ("plain", dict()),
    ("gqa_padding", dict(H=6, Hkv=2, key_padding_mask=True)),
    ("bool_mask", dict(attn_mask="bool_full")),
    ("float_mask", dict(attn_mask="float_heads")),
    ("dropout", dict(dropout_p=0.3)),
    ("causal_lower_right", dict(attn_mask="lower_right")),
    ("d64", dict(D=64)),
    # K and V rows H * D apart (a (B, L, H, D) projection), read in place at that stride
    ("kv_blhd_d64", dict(D=64, kv_layout="blhd")),
    ("wide_d760", dict(D=760, Lk=150)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("Lq", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("name,extra", FEW_QUERY_CASES, ids=[c[0] for c in FEW_QUERY_CASES])
def test_few_queries_match_reference(name, extra, Lq, dtype, isa):
    from torch.nn.attention.bias import causal_lower_right

    extra = dict(extra)
    Lk = extra.pop("Lk", 201)
    g = torch.Generator().manual_seed(Lq * 31 + len(name))
    shape = {n: extra.pop(n) for n in ("H", "Hkv", "D") if n in extra}
    q, k, v, kw = _contract_case(dtype, Lq=Lq, Lk=Lk, seed=Lq + len(name), **shape)
    if extra.pop("kv_layout", None) == "blhd":
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        assert k.stride(2) == k.shape[1] * k.shape[3]
    B, H = q.shape[:2]
    if extra.pop("key_padding_mask", False):
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) < 0.7
    mask = extra.pop("attn_mask", None)
    if mask == "lower_right":
        kw["attn_mask"] = causal_lower_right(Lq, Lk)
    elif mask is not None:
        kw["attn_mask"] = _mask(mask, B, H, Lq, Lk, dtype, g)
    if extra.get("dropout_p"):
        extra["rng_state"] = torch.tensor([987654321, 12345], dtype=torch.int64)
    kw.update(extra)
    _check_contract(q, k, v, kw, dtype, f"{name} Lq={Lq}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("r_layout", ["column_major", "row_major"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared_r", "per_head_r"])
def test_few_queries_rotated_across_many_tasks(per_head, r_layout, dtype, isa):
    # A few queries with a rotation: the forward rotates the selected rows of up to 16 tasks in
    # one pass over R. 7 x 5 = 35 (batch, head) tasks cross slices, a per-head R breaks them into
    # runs, (B, Lq) rows select other rows in each sample (some none), and R's two layouts take
    # the two products. Against the reference, and bitwise the same for 1, 2 and 3 threads.
    B, H, Lq, D = 7, 5, 3, 64
    g = torch.Generator().manual_seed(5 + per_head)
    q, k, v, kw = _contract_case(dtype, B=B, H=H, Lq=Lq, Lk=45, D=D, seed=11 + per_head)
    R = random_orthogonal(D, H if per_head else None, generator=g)
    kw["rotation"] = R.contiguous() if r_layout == "row_major" else R.mT.contiguous().mT
    rows = torch.rand(B, Lq, generator=g) < 0.5
    rows[0] = True
    rows[1] = False
    kw["rotated_queries"] = rows
    _check_contract(q, k, v, kw, dtype, f"{r_layout} per_head={per_head}")
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out, stats = rolling_attention(q, k, v, backend="cpu", **kw)
        results.append((out, *stats))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("where", ["q_row", "k_mid_block", "v_key0", "inf_score"])
def test_few_queries_propagate_nan_like_sdpa(where, dtype, isa):
    case = _poisoned(dtype, where, causal=False, Lq=3)
    g = torch.randn(case.q.shape[:3] + case.v.shape[3:], dtype=torch.float64)
    want, bad_rows, want_grads = _sdpa_in_kernel_precision(case, dtype, grad=g)
    assert bool(want.isnan().any())
    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    with nan_poisoned_outputs():
        out, stats = rolling_attention(*inputs, backend="cpu", **case.kwargs)
        got = torch.autograd.grad(out, inputs, g.to(dtype))
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(stats.lse.isnan(), bad_rows)
    keep = ~want.isnan()
    assert_close(out[keep], want[keep], rel=1e-5 if dtype == torch.float32 else 1e-2, name="out")
    for name, a, b in zip(("dq", "dk", "dv"), got, want_grads):
        assert torch.equal(a.isnan(), b.isnan()), name


# ---- the op contract: masks, causal offsets, dropout, grouped-query attention ----------------
# Every case also rotates a subset of rows and takes two-modality statistics, so the new fields are
# checked together with the fused ones. The float64 reference is the oracle (fp64 1e-10, fp32
# 1e-5, bf16 twice the error of the same attention computed in bf16 by plain PyTorch).

CONTRACT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _mask(name, B, H, Lq, Lk, dtype, g):
    if name == "bool_full":
        m = torch.rand(B, H, Lq, Lk, generator=g) < 0.7
        m[0, 1, min(3, Lq - 1)] = False  # a row that sees no key: zeros, lse = -inf
        return m
    if name == "bool_keys":  # (B, 1, 1, Lk): one scalar per key
        m = torch.rand(B, 1, 1, Lk, generator=g) < 0.8
        m[..., 0] = True
        return m
    if name == "bool_1d":
        return torch.rand(Lk, generator=g) < 0.6
    if name == "bool_rows_odd_offset":  # (B, 1, Lq, Lk) rows at an odd byte offset and stride
        return (torch.rand(B, 1, Lq, Lk + 3, generator=g) < 0.7)[..., 1 : Lk + 1]
    if name == "bool_strided":  # keys not contiguous: a transposed view
        return (torch.rand(B, H, Lk, Lq, generator=g) < 0.7).transpose(-1, -2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if name == "float_2d":  # (Lq, Lk), -inf entries and a row of -inf
        m = torch.randn(Lq, Lk, generator=g, dtype=acc)
        m[torch.rand(Lq, Lk, generator=g) < 0.2] = float("-inf")
        m[2] = float("-inf")
        return m.to(torch.float32)
    if name == "float_heads":  # (B, 1, Lq, Lk) float32
        return torch.randn(B, 1, Lq, Lk, generator=g)
    if name == "float_keys_input_dtype":  # (B, 1, 1, Lk) in q's dtype
        return torch.randn(B, 1, 1, Lk, generator=g, dtype=acc).to(dtype)
    if name == "float_rows_input_dtype":  # (B, H, Lq, Lk) in q's dtype, some -inf
        m = torch.randn(B, H, Lq, Lk, generator=g, dtype=acc)
        m[torch.rand(B, H, Lq, Lk, generator=g) < 0.2] = float("-inf")
        m[..., 0] = 0.0
        return m.to(dtype)
    if name == "float_strided":  # columns not contiguous: a transposed view
        return torch.randn(B, H, Lk, Lq, generator=g).transpose(-1, -2)
    raise ValueError(name)


MASKS = [
    "bool_full",
    "bool_keys",
    "bool_1d",
    "bool_rows_odd_offset",
    "bool_strided",
    "float_2d",
    "float_heads",
    "float_keys_input_dtype",
    "float_rows_input_dtype",
    "float_strided",
]


def _contract_case(dtype, *, B=2, H=4, Hkv=None, Lq=37, Lk=70, D=24, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    acc = torch.float64
    q = torch.randn(B, Lq, H, D, generator=g, dtype=acc).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=acc).to(dtype)
    v = torch.randn(B, Hkv, Lk, D + 8, generator=g, dtype=acc).to(dtype)
    ids = torch.randint(-1, 2, (B, Lk), generator=g)
    rows = torch.rand(Lq, generator=g) < 0.3
    kw = dict(
        rotation=random_orthogonal(D, generator=g),
        rotated_queries=rows,
        key_modality=ids,
        num_modalities=2,
        return_stats=True,
        enable_gqa=Hkv != H,
    )
    kw.update(extra)
    return q, k, v, kw


def _reference64(q, k, v, kw):
    kw64 = dict(kw)
    kw64["rotation"] = kw["rotation"].double()
    mask = kw.get("attn_mask")
    if type(mask) is torch.Tensor and mask.is_floating_point():  # not a CausalBias
        kw64["attn_mask"] = mask.double()
    return rolling_attention_reference(q.double(), k.double(), v.double(), **kw64)


def _bf16_bound(q, k, v, kw, ref_out):
    """Max error of the same attention computed by plain PyTorch in bfloat16 (FlashAttention's
    test rule allows twice that)."""
    kwl = dict(kw)
    kwl["rotation"] = kw["rotation"].to(torch.bfloat16)
    mask = kw.get("attn_mask")
    if type(mask) is not torch.Tensor:  # a CausalBias: the offset below
        mask = None
        kwl.update(is_causal=True, causal_offset=k.shape[2] - q.shape[2])
        kw = kwl
    elif mask.is_floating_point():
        kwl["attn_mask"] = mask.to(torch.bfloat16)
    # the reference's arithmetic in bf16: scores and products rounded to bf16
    H, Hkv = q.shape[1], k.shape[1]
    qr = apply_rotation(q, kwl["rotation"], kwl["rotated_queries"])
    kk = k.repeat_interleave(H // Hkv, 1)
    vv = v.repeat_interleave(H // Hkv, 1)
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    s = (qr @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        m = kwl["attn_mask"]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    off = kw.get("causal_offset")
    if kw.get("is_causal"):
        Lq, Lk = s.shape[-2:]
        hidden = torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + (off or 0)
        s = s.masked_fill(hidden, float("-inf"))
    pr = torch.softmax(s.float(), -1).nan_to_num(0.0)
    if kw.get("dropout_p", 0.0) > 0:
        from rollingq_kernels.dropout import dropout_keep_mask

        keep = dropout_keep_mask(kw["rng_state"], kw["dropout_p"], tuple(pr.shape))
        pr = pr * keep / (1 - kw["dropout_p"])
    out = pr.to(torch.bfloat16) @ vv
    return (out.double() - ref_out).abs().max().item()


def _check_contract(q, k, v, kw, dtype, what, grads=True):
    inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    with nan_poisoned_outputs():
        out, stats = rolling_attention(*inputs, backend="cpu", **kw)
    # allocated in q's layout: (B, H, L, D) or (B, L, H, D) order, whichever q's strides have
    for view in (lambda t: t, lambda t: t.transpose(1, 2)):
        assert view(out).is_contiguous() or not view(q).is_contiguous()
    ref_in = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref_out, ref = _reference64(*ref_in, kw)
    finite = torch.isfinite(ref_out)
    if dtype == torch.bfloat16:
        bound = 2 * _bf16_bound(q, k, v, kw, ref_out.detach()) + 1e-3
        err = (out.double() - ref_out.detach()).abs().max().item()
        assert err <= bound, f"{what}: out max error {err:.3e} > {bound:.3e}"
    else:
        assert_close(out, ref_out, rel=REL[dtype], name=f"{what}: out")
    assert torch.equal(out.isnan(), ~finite & ref_out.isnan())
    assert_close(stats.lse, ref.lse, rel=STATS_REL[dtype], name=f"{what}: lse")
    assert_close(stats.modality_mass, ref.modality_mass, rel=STATS_REL[dtype], atol=1e-7,
                 name=f"{what}: mass")  # fmt: skip
    assert_close(stats.key_sum, ref.key_sum, rel=STATS_REL[dtype], name=f"{what}: key_sum")
    assert torch.equal(stats.key_count.double(), ref.key_count)
    if not grads:
        return
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with nan_poisoned_outputs():
        got = torch.autograd.grad(out, inputs, gout.to(dtype))
    want = torch.autograd.grad(ref_out, ref_in, gout)
    rel = GRAD_REL[dtype]
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == dtype
        assert_close(a, b, rel=rel, name=f"{what}: d{name}")


# float16: its output rounding (2^-11 relative), everything before it in float32
REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}
# gradients against the float64 reference's
GRAD_REL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask", MASKS)
def test_attn_mask_matches_reference(mask, dtype, isa):
    g = torch.Generator().manual_seed(hash(mask) % 1000)
    q, k, v, kw = _contract_case(dtype, seed=hash(mask) % 100)
    B, H, Lq, _ = q.shape
    kw["attn_mask"] = _mask(mask, B, H, Lq, k.shape[2], dtype, g)
    if mask != "float_2d":
        _check_contract(q, k, v, kw, dtype, mask)
        return
    # A row whose float mask is all -inf sees no key: zeros, lse = -inf, and no gradient. The
    # reference's autograd gives NaN gradients there (logsumexp of -inf), so its gradients are
    # compared on the same mask with that row opened.
    _check_contract(q, k, v, kw, dtype, mask, grads=False)
    kw["attn_mask"] = kw["attn_mask"].clone()
    kw["attn_mask"][2] = 0.0
    _check_contract(q, k, v, kw, dtype, mask + " (row 2 open)")


@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "Lq,Lk,offset", [(37, 70, None), (70, 37, None), (40, 40, -5), (33, 20, 9), (7, 300, 250)]
)
def test_causal_offsets_match_reference(Lq, Lk, offset, dtype, isa):
    # offset None: the lower-right CausalBias (offset Lk - Lq) through the API; otherwise the op
    # with that offset (rows with i + offset < 0 see no key)
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, kw = _contract_case(dtype, Lq=Lq, Lk=Lk, seed=Lq + Lk)
    if offset is None:
        kw["attn_mask"] = causal_lower_right(Lq, Lk)
        _check_contract(q, k, v, kw, dtype, f"lower-right {Lq}x{Lk}")
        return
    kw.update(is_causal=True, causal_offset=offset)
    p = make_problem(q, k, v, **{n: x for n, x in kw.items() if n != "causal_offset"})
    args = list(p.op_args())
    args[_FWD_ARG["causal_offset"]] = offset
    with nan_poisoned_outputs():
        out, lse, mass, *_ = torch.ops.rollingq.attention_fwd(*args)
    ref_out, ref = _reference64(q, k, v, kw)
    tol = REL.get(dtype, 2e-2)
    assert_close(out, ref_out, rel=tol, name="out")
    assert_close(lse, ref.lse, rel=STATS_REL[dtype], name="lse")
    assert_close(mass, ref.modality_mass, rel=STATS_REL[dtype], atol=1e-7, name="mass")


@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("Hkv", [1, 2])
def test_grouped_query_attention_matches_reference(Hkv, dtype, isa):
    q, k, v, kw = _contract_case(dtype, H=6, Hkv=Hkv, Lq=33, Lk=150, seed=Hkv)
    kw["key_padding_mask"] = torch.rand(2, 150, generator=torch.Generator().manual_seed(1)) < 0.8
    _check_contract(q, k, v, kw, dtype, f"gqa {Hkv}")


# Key blocks that key padding or a bool attn_mask hides from a whole query tile are skipped.
@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("how", ["padding", "bool_causal", "bool_keys", "few_queries"])
def test_key_blocks_hidden_from_a_whole_tile_are_skipped(how, dtype, isa):
    # Sample 0 pads its last 600 of 1000 keys (whole key blocks of either engine: 128 or 256
    # keys), sample 1 pads none; with a bool causal mask every tile also has blocks past its
    # diagonal. NaN in the hidden keys and values: a skipped block adds nothing to a row, as in
    # the reference (a computed one could add 0 * NaN, docs/numerics.md), so the output has no
    # NaN at all, and the rest matches the reference.
    g = torch.Generator().manual_seed(len(how))
    B, H, Lk, D, Dv = 2, 2, 1000, 40, 24
    Lq = 3 if how == "few_queries" else 333
    f64 = torch.float64
    q = torch.randn(B, Lq, H, D, generator=g, dtype=f64).to(dtype).transpose(1, 2)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=f64).to(dtype)
    v = torch.randn(B, H, Lk, Dv, generator=g, dtype=f64).to(dtype)
    visible = torch.ones(B, Lk, dtype=torch.bool)
    visible[0, 400:] = False
    k[0, :, 700] = float("nan")
    v[0, :, 650:660] = float("nan")
    kw = {}
    if how in ("padding", "few_queries"):
        kw["key_padding_mask"] = visible
    elif how == "bool_keys":  # (B, 1, 1, Lk): the same row for every query
        kw["attn_mask"] = visible[:, None, None, :]
    else:  # lower-right causal band and the padding in one (B, 1, Lq, Lk) bool mask
        band = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        kw["attn_mask"] = (band & visible[:, None, :])[:, None].contiguous()
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    gout = torch.randn(B, H, Lq, Dv, generator=g, dtype=f64).to(dtype)
    with nan_poisoned_outputs():
        out = rolling_attention(*inputs, backend="cpu", **kw)
        grads = torch.autograd.grad(out, inputs, gout)
    assert not out.isnan().any()
    for name, t in zip("qkv", grads):  # the backward skips the same blocks
        assert not t.isnan().any(), f"d{name} has NaN"
    ref = rolling_attention_reference(q.double(), k.double(), v.double(), **kw)
    assert not ref.isnan().any()
    tol = {f64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close(out, ref, rel=tol, name=f"{how}: out")
    # gradients against the reference's (whose own backward meets 0 * NaN): on finite inputs
    k[0, :, 700] = 1.0
    v[0, :, 650:660] = 1.0
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with nan_poisoned_outputs():
        got = torch.autograd.grad(rolling_attention(*inputs, backend="cpu", **kw), inputs, gout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(rolling_attention_reference(*leaves, **kw), leaves, gout.double())
    rel = GRAD_REL[dtype]
    for name, a, e in zip("qkv", got, want):
        assert_close(a, e, rel=rel, name=f"{how}: d{name}")
        if name != "q":  # hidden keys get exactly zero gradient
            assert torch.equal(a[0, :, 400:], torch.zeros_like(a[0, :, 400:]))


# Grouped-query calls of a few queries run with each group's query heads folded into the query
# rows of one head (fused_op.fold_query_groups): K and V are read once per group.
FOLD_CASES = [
    # Lq, q's layout, attn_mask, whether the call folds
    (1, "blhd", None, True),  # decoding: one query per head folds in any layout
    (1, "bhld", "pad", True),
    (3, "bhld", "float_heads", True),
    (32, "bhld", "pad_rows", True),
    (3, "blhd", None, False),  # a group's rows are not at one stride in q: unfolded
    (3, "bhld", "rows", False),  # nor in a mask shared by the heads that differs by row
    (3, "bhld", "causal", False),  # causal: row i sees keys <= i, whatever its head
    (33, "bhld", None, False),  # more queries than FOLD_MAX_QUERIES
]


@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("Lq,layout,mask,folds", FOLD_CASES)
def test_grouped_query_heads_folded_into_rows_match_reference(Lq, layout, mask, folds, dtype, isa):
    assert fused_op.FOLD_MAX_QUERIES == 32
    g = torch.Generator().manual_seed(Lq + len(layout) + len(mask or ""))
    B, H, Hkv, Lk, D, Dv = 2, 6, 2, 77, 40, 24
    f64 = torch.float64
    q = torch.randn(B, Lq, H, D, generator=g, dtype=f64).to(dtype).transpose(1, 2)
    if layout == "bhld":
        q = q.contiguous()
    k = torch.randn(B, Hkv, Lk, D + 3, generator=g, dtype=f64).to(dtype)[..., 1 : D + 1]
    v = torch.randn(B, Lk, Hkv, Dv, generator=g, dtype=f64).to(dtype).transpose(1, 2)
    kpm = torch.rand(B, Lk, generator=g) < 0.85
    kpm[:, 0] = True
    kw = dict(enable_gqa=True, key_padding_mask=kpm, is_causal=mask == "causal")
    keys = torch.rand(B, 1, Lq if mask == "rows" else 1, Lk, generator=g) < 0.8
    keys[..., 0] = True  # every row sees a key
    if mask == "pad" or mask == "rows":
        kw["attn_mask"] = keys
    elif mask == "pad_rows":  # a (B, 1, 1, Lk) mask expanded over the rows: stride 0
        kw["attn_mask"] = keys.expand(B, 1, Lq, Lk)
    elif mask == "float_heads":
        kw["attn_mask"] = torch.randn(B, H, Lq, Lk, generator=g, dtype=f64).to(dtype)
    problem = make_problem(q, k, v, **kw)
    assert (fused_op.fold_query_groups(problem) is not None) == folds
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with nan_poisoned_outputs():
        out = rolling_attention(*inputs, backend="cpu", **kw)
    assert out.shape == (B, H, Lq, Dv) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous() if layout == "blhd" else out.is_contiguous()
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kw64 = dict(kw)
    if "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw["attn_mask"].double()
    ref_out = rolling_attention_reference(*ref_in, **kw64)
    if dtype == torch.bfloat16:  # twice the error of PyTorch's own bf16 attention
        sdpa_mask = kw.get("attn_mask")
        kpm4 = kpm[:, None, None, :]
        sdpa_mask = kpm4 if sdpa_mask is None else sdpa_mask & kpm4 if mask != "float_heads" else (
            sdpa_mask.masked_fill(~kpm4, float("-inf"))
        )  # fmt: skip
        if mask == "causal":
            sdpa_mask = sdpa_mask & torch.ones(Lq, Lk, dtype=torch.bool).tril()
        torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
        bound = 2 * (torch_out.double() - ref_out.detach()).abs().max().item() + 1e-3
        err = (out.double() - ref_out.detach()).abs().max().item()
        assert err <= bound, f"out max error {err:.3e} > {bound:.3e}"
    else:
        assert_close(out, ref_out, rel=REL[dtype], name="out")
    gout = torch.randn(out.shape, generator=g, dtype=f64)
    with nan_poisoned_outputs():
        got = torch.autograd.grad(out, inputs, gout.to(dtype))
    want = torch.autograd.grad(ref_out, ref_in, gout)
    rel = GRAD_REL[dtype]
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == dtype
        assert_close(a, b, rel=rel, name=f"d{name}")


@pytest.mark.parametrize("dtype", CONTRACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_is_the_reference_keep_mask(p, dtype, isa):
    # the reference applies dropout_keep_mask(rng_state): any element the kernel kept or dropped
    # differently moves the output far beyond the tolerance
    q, k, v, kw = _contract_case(dtype, H=3, Lq=45, Lk=301, seed=int(p * 10), is_causal=True)
    kw.update(dropout_p=p, rng_state=torch.tensor([-1234567890123, 987654321], dtype=torch.int64))
    _check_contract(q, k, v, kw, dtype, f"dropout {p}")


def test_dropout_keeps_statistics_and_depends_on_the_rng_state(isa):
    q, k, v, kw = _contract_case(torch.float32, H=2, Lq=20, Lk=40, seed=9)
    plain, plain_stats = rolling_attention(q, k, v, backend="cpu", **kw)
    state = torch.tensor([42, 0], dtype=torch.int64)
    a, a_stats = rolling_attention(q, k, v, backend="cpu", dropout_p=0.3, rng_state=state, **kw)
    b, _ = rolling_attention(q, k, v, backend="cpu", dropout_p=0.3, rng_state=state.clone(), **kw)
    c, _ = rolling_attention(
        q, k, v, backend="cpu", dropout_p=0.3, rng_state=torch.tensor([42, 1]), **kw
    )
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    for x, y in zip(a_stats, plain_stats):  # statistics are taken before dropout
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_everything_at_once_with_broadcast_inputs(dtype, isa):
    # GQA + float mask + lower-right causal offset via is_causal... and k / v / side inputs with
    # stride-0 (broadcast) batch dims, odd sizes
    q, k, v, kw = _contract_case(dtype, B=3, H=4, Hkv=2, Lq=29, Lk=131, D=40, seed=77)
    k = k[:1].expand(3, -1, -1, -1)
    v = v[:1].expand(3, -1, -1, -1)
    assert k.stride(0) == 0
    kw["key_padding_mask"] = (torch.arange(131) % 7 != 3).expand(3, 131)
    kw["key_modality"] = kw["key_modality"][:1].expand(3, -1)
    kw["attn_mask"] = torch.randn(1, 4, 29, 131)
    kw.update(dropout_p=0.2, rng_state=torch.tensor([7, 3], dtype=torch.int64))
    _check_contract(q, k, v, kw, dtype, "everything")


# ---- gradients ------------------------------------------------------------------------------


def _op_out(q, k, v, rotation, rows, ids, M, pad, causal, scale):
    return torch.ops.rollingq.attention_fwd(
        q, k, v, rotation, rows, ids, M, pad, None, causal, 0, scale, 0.0, None
    )[0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(rotation="per_head", rows="batch", padding=True, causal=True, modalities=2),
        dict(Lq=5, Lk=7, rotation="shared", padding=True),
        dict(Lq=6, Lk=3, causal=True, rotation="shared", rows="subset"),
    ],
    ids=["rot_rows_pad_causal", "lq_lt_lk_pad", "lq_gt_lk_causal"],
)
def test_gradcheck_float64(kw, isa):
    kw = {"B": 2, "H": 2, "Lq": 5, "D": 4, **kw}
    case = make_case(dtype=torch.float64, seed=13, **kw)
    problem = make_problem(case.q, case.k, case.v, **case.kwargs)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    rest = (
        problem.rotation,
        problem.rotated_queries,
        problem.key_modality,
        problem.num_modalities,
        problem.key_padding_mask,
        problem.is_causal,
        problem.scale,
    )
    assert torch.autograd.gradcheck(lambda a, b, c: _op_out(a, b, c, *rest), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, H=3, Lq=129, D=40, rotation="per_head", rows="batch", padding=True, causal=True),
        dict(B=1, H=2, Lq=70, Lk=300, D=64, Dv=48, rotation="shared", padding=True),
        dict(B=1, H=1, Lq=1, Lk=600, D=96, layout="blhd", rotation="shared"),
        dict(B=1, H=1, Lq=65, Lk=40, D=768, layout="strided", rotation="shared", rows="subset"),
        dict(B=1, H=2, Lq=270, Lk=130, D=136, rotation="per_head", rows="batch", causal=True),
        # unmasked: on avx512_dot P and dS stay in registers; an odd last key block (259 = 2 x
        # 128 + 3: its last key pairs with zero) and a query tile of 17 rows (32 lanes)
        dict(B=2, H=2, Lq=81, Lk=259, D=64, Dv=48, rotation="shared", rows="subset"),
    ],
    ids=["features", "lq_ne_lk", "lq1_blhd", "d768_strided", "wide_tiles", "odd_keys_unmasked"],
)
def test_backward_matches_reference_autograd(kw, dtype, isa):
    case = make_case(dtype=dtype, seed=17, modalities=2, **kw)
    g = torch.randn(case.q.shape[:3] + case.v.shape[3:], dtype=torch.float64)

    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    with nan_poisoned_outputs():
        out, _ = rolling_attention(*inputs, backend="cpu", **case.kwargs)
        got = torch.autograd.grad(out, inputs, g.to(dtype))

    c64 = case.to(dtype=torch.float64)
    kw64 = dict(c64.kwargs)
    if kw64.get("rotation") is not None:
        kw64["rotation"] = kw64["rotation"].double()
    ref_in = [t.detach().requires_grad_() for t in (c64.q, c64.k, c64.v)]
    ref_out, _ = rolling_attention(*ref_in, backend="reference", **kw64)
    want = torch.autograd.grad(ref_out, ref_in, g)
    # float32 gradients: the error of float32 arithmetic over L-long sums, well below 1e-4;
    # bfloat16 / float16: the rounding of the inputs and of the stored gradients (8 / 11 bits).
    rel = GRAD_REL[dtype]
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert_close(a, b, rel=rel, name=f"d{name}")


# ---- registration ---------------------------------------------------------------------------


_FWD_ARG = {name: i for i, name in enumerate(
    "q k v rotation rotated_queries key_modality num_modalities key_padding_mask attn_mask "
    "is_causal causal_offset scale dropout_p rng_state".split()
)}  # fmt: skip


def _op_args(dtype, requires_grad):
    case = make_case(
        dtype=dtype, B=2, H=2, Lq=9, Lk=11, D=8, rotation="per_head", rows="batch",
        modalities=2, padding=True, causal=True, seed=19,
    )  # fmt: skip
    p = make_problem(case.q, case.k, case.v, **case.kwargs)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in (case.q, case.k, case.v))
    return (q, k, v, *p.op_args()[3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_opcheck_forward(dtype):
    torch.library.opcheck(torch.ops.rollingq.attention_fwd.default, _op_args(dtype, True))
    no_stats = list(_op_args(dtype, False))
    no_stats[5], no_stats[6] = None, 0  # key_modality, num_modalities
    torch.library.opcheck(torch.ops.rollingq.attention_fwd.default, tuple(no_stats))


def test_opcheck_backward():
    q, k, v, rot, rows, ids, m, pad, mask, causal, offset, scale, p, rng = _op_args(
        torch.float64, False
    )
    out, lse, *_ = torch.ops.rollingq.attention_fwd(*_op_args(torch.float64, False))
    grad = torch.randn_like(out)
    args = (grad, q, k, v, out, lse, rot, rows, pad, mask, causal, offset, scale, p, rng)
    torch.library.opcheck(torch.ops.rollingq.attention_bwd.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    case = make_case(
        dtype=torch.float32, Lq=17, rotation="per_head", rows="batch", modalities=2, padding=True,
        causal=True, seed=23,
    )  # fmt: skip
    kw = dict(case.kwargs)

    def step(q, k, v):
        out, stats = rolling_attention(q, k, v, **kw)
        return out, out.square().sum(), stats

    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, loss, stats = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    check_against_reference(case, out, stats, dtype=torch.float32)
    eager_in = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    _, eager_loss, eager_stats = step(*eager_in)
    eager_grads = torch.autograd.grad(eager_loss, eager_in)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip((*stats, *grads), (*eager_stats, *eager_grads)):
        torch.testing.assert_close(a, b)
    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- errors ---------------------------------------------------------------------------------


def test_op_rejects_bad_arguments_by_name():
    args = _op_args(torch.float32, False)

    def call(**changes):
        a = list(args)
        for name, value in changes.items():
            a[_FWD_ARG[name]] = value
        return torch.ops.rollingq.attention_fwd(*a)

    ids = args[_FWD_ARG["key_modality"]]
    with pytest.raises(RuntimeError, match=r"rotation must have shape"):
        call(rotation=args[3][:, :4])
    bad_ids = ids.clone()
    bad_ids[0, 0] = 2
    with pytest.raises(ValueError, match=r"key_modality ids must lie in \[-1, 1\]"):
        call(key_modality=bad_ids)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be a bool tensor"):
        call(key_padding_mask=args[_FWD_ARG["key_padding_mask"]].int())
    with pytest.raises(RuntimeError, match=r"k must have shape \(2, Hkv, Lk, 8\)"):
        call(k=args[1][..., :4])
    with pytest.raises(RuntimeError, match=r"q, k and v must share a dtype"):
        call(v=args[2].double())


def test_library_built_for_another_torch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    fake.write_bytes(b"\x7fELF....rollingq-torch-version=1.0.0;....")
    monkeypatch.setattr(fused_op, "_PACKAGE_DIR", str(tmp_path))
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch .* installed"):
        fused_op._load_library("_C")


def test_library_for_another_python_does_not_shadow_this_one(tmp_path, monkeypatch):
    # a leftover build for another interpreter sorts before this one's; it must not be loaded
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (tmp_path / "_C.cpython-30-x86_64-linux-gnu.so").write_bytes(b"stale")
    monkeypatch.setattr(fused_op, "_PACKAGE_DIR", str(tmp_path))
    assert fused_op.library_path("_C") is None
    with pytest.raises(ImportError, match=r"found only \['_C.cpython-30"):
        fused_op._load_library("_C")
    (tmp_path / ("_C" + suffix)).write_bytes(b"rollingq-torch-version=1.0.0;")
    assert fused_op.library_path("_C") == str(tmp_path / ("_C" + suffix))


def test_rotation_is_orthogonal_input_not_renormalised():
    # The kernel applies exactly the matrix it is given (the API does not re-orthogonalise):
    # a scaled rotation must scale the rotated scores like the reference does.
    case = make_case(dtype=torch.float64, Lq=9, modalities=2, seed=29)
    case.kwargs["rotation"] = 1.5 * random_orthogonal(16)
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=torch.float64)


# ---- rotation layouts ------------------------------------------------------------------------
# The kernels read the rotation through its strides (no copy per call): by rows (a module's
# buffer), by columns (a QR factor, R.T of a buffer), or any strides (a slice). Few rotated rows
# by rows take dot products, by columns a product with the rows as broadcast operand, the rest
# the general product; the backward reads R's rows in place when they are whole vectors.


def _rotation_layout(R: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "rows":
        return R.contiguous()
    if layout == "columns":
        return R.transpose(-1, -2).contiguous().transpose(-1, -2)
    # a view into a larger buffer: row stride 3 D + 1, column stride 2, an odd offset
    D = R.shape[-1]
    lead = R.shape[:-2]
    big = torch.full((*lead, 2 * D + 1, 6 * D + 5), float("nan"), dtype=R.dtype)
    view = big[..., 1::2, 3::2][..., :D, :D]
    view.copy_(R)
    return view


ROTATION_LAYOUTS = ["rows", "columns", "strided"]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ROTATION_LAYOUTS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, H=3, Lq=77, Lk=50, D=48, rotation="shared", rows="subset"),
        dict(B=1, H=2, Lq=70, Lk=33, D=40, rotation="per_head", rows="batch"),
        dict(B=2, H=1, Lq=300, Lk=20, D=32, rotation="shared"),  # every row: many per tile
        dict(B=1, H=1, Lq=5, Lk=9, D=768, rotation="shared", rows="subset"),
    ],
    ids=["few_rows", "per_head_odd_d", "all_rows", "d768"],
)
def test_rotation_in_any_layout_matches_reference(kw, layout, dtype, isa):
    case = make_case(dtype=dtype, seed=23, modalities=2, **kw)
    case.kwargs["rotation"] = _rotation_layout(case.kwargs["rotation"], layout)
    if layout != "rows":
        assert not case.kwargs["rotation"].is_contiguous()
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=dtype, what=f"{layout}: ")


@pytest.mark.parametrize("rows", ["half", "cls"])
@pytest.mark.parametrize("layout", ROTATION_LAYOUTS)
@pytest.mark.parametrize("D", [48, 40])
def test_rotation_layout_gradients_match_reference(D, layout, rows, isa):
    case = make_case(
        dtype=torch.float32, B=2, H=2, Lq=67, Lk=45, D=D, seed=29, modalities=2,
        rotation="per_head", rows="batch",
    )  # fmt: skip
    if rows == "cls":  # a [CLS] row per sample (and one more): the few-row products
        sel = torch.zeros(2, 67, dtype=torch.bool)
        sel[:, 0] = True
        sel[1, 66] = True
        case.kwargs["rotated_queries"] = sel
    R = case.kwargs["rotation"]
    case.kwargs["rotation"] = _rotation_layout(R, layout)
    g = torch.randn(case.q.shape, dtype=torch.float64)
    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    with nan_poisoned_outputs():
        out, _ = rolling_attention(*inputs, backend="cpu", **case.kwargs)
        got = torch.autograd.grad(out, inputs, g.float())
    kw64 = {**case.kwargs, "rotation": R.double()}
    ref_in = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    ref_out, _ = rolling_attention(*ref_in, backend="reference", **kw64)
    want = torch.autograd.grad(ref_out, ref_in, g)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rel=2e-5, name=f"{layout} d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rotation_of_head_dim_one_with_a_few_rows(dtype, isa):
    # A (1, 1) rotation has row and column stride 1: it must take the dot-product path, not the
    # by-columns product (which needs whole vectors of D and would leave the rotated row unwritten)
    case = make_case(dtype=dtype, B=2, H=2, Lq=9, Lk=11, D=1, seed=31, modalities=2,
                     rotation="shared")  # fmt: skip
    case.kwargs["rotation"] = torch.tensor([[-1.0]])
    assert case.kwargs["rotation"].stride() == (1, 1)
    sel = torch.zeros(9, dtype=torch.bool)
    sel[4] = True
    case.kwargs["rotated_queries"] = sel
    out, stats = _run(case)
    check_against_reference(case, out, stats, dtype=dtype, what="D = 1: ")


def _huge_page_advice(t):
    """Whether a mapping that holds t's storage carries the huge-page advice (VmFlags "hg" in
    /proc/self/smaps; an madvise'd range becomes a mapping of its own). The advice, not the huge
    pages the kernel then finds, is what the binding controls."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and start < hi
            elif inside and head == "VmFlags:" and "hg" in line.split()[1:]:
                return True
    return False


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages not in madvise mode")
def test_gradients_of_a_few_queries_are_advised_as_huge_pages():
    # dK / dV of a few queries are written faster than 4 KiB pages fault in: the binding advises
    # their whole 2 MiB pages as huge pages (csrc/binding_common.h); deep outputs are left alone.
    # 40 MiB each: above glibc's largest mmap threshold, so each gradient is a mapping of its own.
    g = torch.Generator().manual_seed(90)
    k, v = (torch.randn(1, 1, 20480, 512, generator=g).requires_grad_() for _ in range(2))
    # The deep call first, while no output of this test is advised, and nothing kept from one
    # call to the next: the Lq=300 check once read its dK as advised (1 of 3 runs of the file)
    # while the advised gradients of the Lq=1 call were still alive.
    for lq, advised in ((300, False), (1, True)):
        q = torch.randn(1, 1, lq, 512, generator=g).requires_grad_()
        grad = torch.randn(1, 1, lq, 512, generator=g)

        def grads(q=q, grad=grad):
            out = rolling_attention(q, k, v, backend="cpu")
            return torch.autograd.grad(out, (q, k, v), grad)

        dq, dk, dv = grads()  # (poisoning would touch every page before the advice)
        for name, t in (("dk", dk), ("dv", dv)):
            assert _huge_page_advice(t) == advised, f"Lq={lq} {name}: advice {not advised}"
        del dq, dk, dv
        # the advice changes where memory comes from, not what is written
        with nan_poisoned_outputs():
            got = grads()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(rolling_attention_reference(*leaves), leaves, grad.double())
        for name, a, e in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, e, rel=1e-5, name=f"Lq={lq} {name}")
        del got, want
