"""One measuring harness for every benchmark: timing, peak memory, FLOPs, machine description.

Rules (docs/design.md section 7): baselines run in the same process on the same inputs, timings are
medians (with 20th/80th percentiles) after warm-up, and every saved row carries the machine, the
versions and the date.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def attention_flops(
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    D: int,
    Dv: Optional[int] = None,
    *,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """2 matmuls of 2*B*H*Lq*Lk*D each (4*B*H*Lq*Lk*D for D = Dv); backward is 2.5x forward."""
    Dv = D if Dv is None else Dv
    f = 2.0 * B * H * Lq * Lk * (D + Dv)
    if causal:
        f /= 2.0
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def _summary(times_ms: List[float]) -> Dict[str, float]:
    times_ms = sorted(times_ms)
    q = statistics.quantiles(times_ms, n=5) if len(times_ms) >= 2 else [times_ms[0]] * 4
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": q[0],
        "p80_ms": q[3],
        "reps": len(times_ms),
    }


def interleaved_times(
    fns: Sequence[Callable[[], object]], *, warmup: int = 1, reps: int = 7
) -> List[Dict[str, float]]:
    """Median / p20 / p80 milliseconds of each function, called in turn (one call of each per
    round) after ``warmup`` rounds, so that load from other processes hits all of them alike."""
    return [_summary(t) for t in interleaved_rounds(fns, warmup=warmup, reps=reps)]


def interleaved_rounds(
    fns: Sequence[Callable[[], object]],
    *,
    warmup: int = 1,
    reps: int = 7,
    lead: Sequence[Callable[[], object]] = (),
) -> List[List[float]]:
    """Milliseconds of every call, per function, round by round (times[i][r] is function i in
    round r): what interleaved_times summarises, kept for ratios taken within a round.

    ``lead``: functions that sweep the caches (a 2048^3 GEMM, the O(L^2) reference), called first
    in every round; their times follow those of ``fns`` in the result. ``fns`` are called after
    them in an order rotated by one each round, so that each of them follows the sweep equally
    often (a function always called right after the reference found its inputs evicted while the
    next one found them warm: 1.2x instead of 1.0x at (16, 1, 1101, 768))."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in (*lead, *fns):
            fn()
    sync()
    n = len(fns)
    times: List[List[float]] = [[] for _ in range(n + len(lead))]
    for r in range(reps):
        order = [n + j for j in range(len(lead))] + [(r + i) % n for i in range(n)]
        for i in order:
            fn = fns[i] if i < n else lead[i - n]
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def make_rollingq_inputs(B: int, H: int, L: int, D: int, *, dtype=torch.float32, seed: int = 0):
    """The kernel as RollingQ calls it: q, k, v are (B, L, H, D) projections viewed as
    (B, H, L, D) (read in place), the sequence is [CLS | modality 0 | modality 1], the [CLS] row is
    rotated and the statistics are on. Returns q, k, v and the keyword arguments."""
    from rollingq_kernels import key_modality_from_lengths

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    n0 = (L - 1) // 2
    ids = key_modality_from_lengths((1, n0, L - 1 - n0), (False, True, True))
    rot = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q.float()
    rows = torch.zeros(L, dtype=torch.bool)
    rows[0] = True
    kwargs = dict(
        rotation=rot, rotated_queries=rows, key_modality=ids, num_modalities=2, return_stats=True
    )
    return q, k, v, kwargs


# Peak memory of one call, in a fresh interpreter: allocate the inputs, warm the call up on a
# small problem (thread pool, libraries), reset the resident-set high-water mark through
# /proc/self/clear_refs ("5"), run one call and read VmHWM. What the call added is
# VmHWM - VmRSS(before); the outputs it returns are subtracted to leave its working memory.
# tracemalloc cannot see torch's allocations and torch's CPU allocator keeps no peak statistic.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))
    from bench.harness import make_rollingq_inputs
    from rollingq_kernels import rolling_attention
    import torch.nn.functional as F
    B, H, L, D = (int(x) for x in sys.argv[3].split(","))
    which, mode = sys.argv[4], sys.argv[5]

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    q, k, v, kw = make_rollingq_inputs(B, H, L, D)
    sq, sk, sv, skw = make_rollingq_inputs(1, H, 64, D)
    if mode == "dropout":  # forward + backward with dropout 0.1, no statistics
        for t in (q, k, v, sq, sk, sv):
            t.requires_grad_()
        if which == "sdpa":
            attn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        else:
            attn = lambda q, k, v: rolling_attention(q, k, v, dropout_p=0.1, backend=which)

        def call(q, k, v, kw):
            out = attn(q, k, v)
            return [out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))]
    elif which == "sdpa":
        call = lambda q, k, v, kw: F.scaled_dot_product_attention(q, k, v)
    else:
        call = lambda q, k, v, kw: rolling_attention(q, k, v, backend=which, **kw)
    call(sq, sk, sv, skw)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    result = call(q, k, v, kw)
    peak = status("VmHWM")
    if isinstance(result, torch.Tensor):
        tensors = [result]
    elif isinstance(result, list):
        tensors = result
    else:
        tensors = [result[0], *result[1]]
    out_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(peak - before - out_bytes, out_bytes)
    """
)


def peak_extra_mib(
    shape, which: str, *, threads: Optional[int] = None, mode: str = "fwd"
) -> Dict[str, float]:
    """Working memory (MiB) one call adds above its inputs and outputs, CPU only.

    ``which``: "sdpa" (torch SDPA on the same q, k, v, no statistics) or a backend name (called
    with the RollingQ arguments of :func:`make_rollingq_inputs`). ``mode``: "fwd", or "dropout"
    (forward and backward with dropout 0.1, the gradients counted as outputs).
    """
    root = str(Path(__file__).resolve().parent.parent)
    threads = torch.get_num_threads() if threads is None else threads
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            root,
            str(threads),
            ",".join(str(s) for s in shape),
            which,
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    extra, out_bytes = (int(x) for x in res.stdout.split())
    return {"extra_mib": extra / 2**20, "outputs_mib": out_bytes / 2**20}


def cpu_library():
    """The loaded CPU library's C functions through ctypes (csrc/cpu/dispatch.cpp):
    ``rollingq_cpu_isa()``, ``rollingq_cpu_isas()`` (bytes), ``rollingq_cpu_set_isa(name)`` and
    ``rollingq_cpu_set_stream_bytes(n)``; None when the library is not built."""
    import ctypes

    from rollingq_kernels import fused_op

    if fused_op.load_error() is not None:
        return None
    lib = ctypes.CDLL(fused_op.library_path())
    lib.rollingq_cpu_isa.restype = ctypes.c_char_p
    lib.rollingq_cpu_isas.restype = ctypes.c_char_p
    lib.rollingq_cpu_set_isa.argtypes = [ctypes.c_char_p]
    lib.rollingq_cpu_set_stream_bytes.argtypes = [ctypes.c_int64]
    lib.rollingq_cpu_set_stream_bytes.restype = ctypes.c_int64
    return lib


def cpu_kernel_isa() -> Dict[str, str]:
    """The CPU kernel variant in use and the ones this machine can run (csrc/cpu/dispatch.cpp),
    read from the loaded library; empty strings when the library is not built."""
    lib = cpu_library()
    if lib is None:
        return {"isa": "", "isas": ""}
    return {"isa": lib.rollingq_cpu_isa().decode(), "isas": lib.rollingq_cpu_isas().decode()}


_GEMM_CACHE: Dict[tuple, float] = {}


GEMM_N = 2048  # the roofline's matrix multiply: GEMM_N^3 in the row's dtype


def gemm_call(dtype=torch.float32, n: int = GEMM_N) -> Callable[[], object]:
    """One n x n x n torch.mm in ``dtype`` (inputs made once): the roofline's reference call,
    timed in the same rounds as the rows it is compared with (roofline_in_rounds)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def roofline_in_rounds(
    flops: float, fn_ms: Sequence[float], gemm_ms: Sequence[float], n: int = GEMM_N
) -> Dict[str, float]:
    """A row's GFLOP/s as a fraction of the GEMM's, round by round (both timed in each round,
    interleaved_rounds): the median of the per-round fractions, and the GEMM's median GFLOP/s.
    This virtual machine's speed moves by up to 2x between minutes; a GEMM measured once at the
    start of a run is not the reference of a row measured minutes later."""
    gemm_flops = 2.0 * n**3
    fractions = [(flops / f) / (gemm_flops / g) for f, g in zip(fn_ms, gemm_ms)]
    return {
        "roofline": statistics.median(fractions),
        "gemm_gflops": gemm_flops / (statistics.median(gemm_ms) * 1e-3) / 1e9,
    }


GEMM_PROBE_N = 256  # a first, small product: how long the full one would take
GEMM_PROBE_LIMIT_S = 2.0  # a full GEMM_N^3 product slower than this is not timed
# The probe's best of this many products: one 256^3 product lasts 0.1 ms at a hardware rate, so a
# single sample that met a preempted core read 8 GFLOP/s on a 390 GFLOP/s bf16 machine and took
# its roofline away. Load only slows a product down: the fastest of a few is the machine's rate.
GEMM_PROBE_REPS = 5
NO_HARDWARE_FRACTION = 0.1  # below this fraction of float32's rate a dtype has no hardware path


def _gemm_rate(dtype, n: int, reps: int, best: bool = False) -> float:
    """GFLOP/s of an n x n x n product: the median of ``reps`` after a warm-up, or the fastest."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    times = interleaved_rounds([lambda: a @ b], warmup=1, reps=reps)[0]
    t = min(times) if best else statistics.median(times)
    return 2.0 * n**3 / (t * 1e-3) / 1e9


def gemm_gflops(dtype=torch.float32, n: int = GEMM_N, reps: int = 5) -> float:
    """This machine's matrix-multiply throughput (GFLOP/s) in ``dtype`` with torch's current
    thread count: the median of ``reps`` n x n x n products after a warm-up. The roofline the
    attention rows are compared with. A GEMM_PROBE_N product is timed first (the fastest of
    GEMM_PROBE_REPS); where it says the full product would take over GEMM_PROBE_LIMIT_S (torch's
    bf16 GEMM on a CPU without bf16 instructions runs below 1 GFLOP/s: an hour per benchmark),
    the probe's rate is the answer."""
    key = (dtype, n, torch.get_num_threads())
    if key not in _GEMM_CACHE:
        probe = _gemm_rate(dtype, min(n, GEMM_PROBE_N), reps=GEMM_PROBE_REPS, best=True)
        if 2.0 * n**3 / (probe * 1e9) > GEMM_PROBE_LIMIT_S:
            _GEMM_CACHE[key] = probe
        else:
            _GEMM_CACHE[key] = _gemm_rate(dtype, n, reps)
    return _GEMM_CACHE[key]


def gemm_has_hardware(dtype) -> bool:
    """Whether torch multiplies ``dtype`` at a hardware rate here: float32 always; another dtype
    where its GEMM reaches NO_HARDWARE_FRACTION of float32's. Where it does not, a fraction of
    that GEMM says nothing about the machine, and the rows of that dtype have no roofline."""
    if dtype == torch.float32:
        return True
    return gemm_gflops(dtype) >= NO_HARDWARE_FRACTION * gemm_gflops(torch.float32)


def roofline_lead(dtype) -> List[Callable[[], object]]:
    """The roofline's GEMM as the `lead` of interleaved_rounds: [gemm_call(dtype)], or nothing
    where the dtype has no hardware GEMM (gemm_has_hardware)."""
    return [gemm_call(dtype)] if gemm_has_hardware(dtype) else []


def roofline_of(flops: float, fn_ms: Sequence[float], lead_ms: Sequence[Sequence[float]], dtype):
    """roofline_in_rounds against the GEMM timed as roofline_lead(dtype) (``lead_ms``: its rounds,
    empty when it was not timed), or no roofline (None) with the probe's GEMM rate."""
    if not lead_ms:
        return {"roofline": None, "gemm_gflops": gemm_gflops(dtype)}
    return roofline_in_rounds(flops, fn_ms, lead_ms[-1])


def gemm_line(threads: int) -> str:
    """The header line of the GEMM rates the rooflines divide by (a dtype without a hardware
    GEMM is named as such: its rows have no roofline)."""
    parts = []
    for dtype in (torch.float32, torch.bfloat16):
        rate = f"{str(dtype).replace('torch.', '')} {gemm_gflops(dtype):.1f} GFLOP/s"
        if not gemm_has_hardware(dtype):
            rate += " (no hardware path in torch here: its rows have no roofline)"
        parts.append(rate)
    return (
        f"GEMM at the start ({threads} threads, {GEMM_N}^3 torch.mm): {', '.join(parts)}; each "
        "row's roofline divides by the same GEMM timed in the row's own rounds (its column)"
    )


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{f"kernel_{k}": v for k, v in cpu_kernel_isa().items()},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        with open("/proc/loadavg") as f:
            info["load_average"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save_rows(name: str, rows: List[dict], extra: Optional[dict] = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"machine": machine_info(), "command": " ".join(sys.argv), "rows": rows}
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def format_table(rows: List[dict], columns: List[tuple]) -> str:
    """Markdown table; ``columns`` = [(header, key, format)], missing values shown as '-'."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            val = r.get(key)
            cells.append("-" if val is None else (fmt.format(val) if fmt else str(val)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
