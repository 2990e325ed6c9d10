"""Per-call cost of a tiny attention call: where the time goes between the Python API and the
kernel, side by side with torch's SDPA in one process.

    python -m bench.overhead_bench [--calls N] [--rounds R] [--threads T]

Rows (all on the same (1, 1, 16, 64) float32 CPU inputs; medians, and minima, over rounds of N
back-to-back calls, the rounds of every row interleaved so load from other processes hits them
alike):

    torch SDPA                         F.scaled_dot_product_attention(q, k, v)
    rolling_attention (auto)           the public call: validation, dispatch, op, kernel
    rolling_attention (cpu)            the same with the backend named
    scaled_dot_product_attention       this package's SDPA drop-in
    make_problem                       validation alone
    raw op through torch.ops           torch.ops.rollingq.attention_fwd on canonical arguments,
                                       below autograd (the boxed path)
    raw op through the direct entry    the same op through rollingq_kernels._C's
                                       attention_fwd_below_autograd (what calls without
                                       gradients take)
    ... rotation + stats               the RollingQ call: a contiguous float32 (D, D) rotation of
                                       the first row, int64 key modalities (Lk,), M = 2, stats

and the calls of training, on the same shapes with q, k, v requiring grad, each as a ratio to
torch SDPA's row of the same kind:

    ..., inputs requiring grad         the forward alone (what autograd records included)
    ..., forward + backward            the forward and torch.autograd.grad of q, k, v
    ..., Python formula                the row above with the library's C++ autograd node
                                       switched off: the Python autograd.Function it replaces
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import rollingq_kernels as rk
from rollingq_kernels import fused_op
from rollingq_kernels.api import make_problem

from .harness import machine_info


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(calls: int = 2000, rounds: int = 15, shape=(1, 1, 16, 64)):
    """[(name, median us, median / SDPA's, min us, min / SDPA's min)] for every row."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    B, H, L, D = shape
    rotation = torch.linalg.qr(torch.randn(D, D, generator=g)).Q.contiguous()
    rows_mask = torch.zeros(L, dtype=torch.bool)
    rows_mask[0] = True
    ids = torch.zeros(L, dtype=torch.long)
    ids[0] = -1
    ids[L // 2 :] = 1
    rq = dict(
        rotation=rotation,
        rotated_queries=rows_mask,
        key_modality=ids,
        num_modalities=2,
        return_stats=True,
    )
    rows = [
        ("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("rolling_attention (auto)", lambda: rk.rolling_attention(q, k, v)),
        ("rolling_attention (cpu)", lambda: rk.rolling_attention(q, k, v, backend="cpu")),
        ("scaled_dot_product_attention", lambda: rk.scaled_dot_product_attention(q, k, v)),
        ("make_problem", lambda: make_problem(q, k, v)),
        ("rolling_attention, rotation + stats", lambda: rk.rolling_attention(q, k, v, **rq)),
        ("make_problem, rotation + stats", lambda: make_problem(q, k, v, **rq)),
    ]
    from rollingq_kernels import fused_op

    if fused_op.load_error() is None:
        plain = make_problem(q, k, v).op_args()
        rolling = make_problem(q, k, v, **rq).op_args()
        op = torch.ops.rollingq.attention_fwd.default

        def raw(args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        direct = fused_op.direct_entry()
        rows.insert(5, ("raw op through torch.ops, below autograd", lambda: raw(plain)))
        rows.append(("raw op through torch.ops, rotation + stats", lambda: raw(rolling)))
        if direct is not None:
            rows.insert(6, ("raw op through the direct entry", lambda: direct(*plain)))
            rows.append(
                ("raw op through the direct entry, rotation + stats", lambda: direct(*rolling))
            )
    rows = [(name, fn, "torch SDPA") for name, fn in rows] + _training_rows(q, k, v, rq)
    for _, fn, _ in rows:  # warm-up
        _per_call_us(fn, max(calls // 10, 10))
    samples = {name: [] for name, _, _ in rows}
    for _ in range(rounds):
        for name, fn, _ in rows:
            samples[name].append(_per_call_us(fn, calls))
    out = []
    for name, _, base in rows:
        med, low = statistics.median(samples[name]), min(samples[name])
        out.append(
            (name, med, med / statistics.median(samples[base]), low, low / min(samples[base]))
        )
    return out


def _training_rows(q, k, v, rq):
    """(name, fn, base row) of calls whose inputs require grad: the forward alone, and the forward
    with the gradients of q, k, v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def backward(out):
        torch.autograd.grad(out, (q, k, v), grad)

    def python_formula(fn):
        # the same call with the library's C++ autograd node switched off: the Python
        # autograd.Function it replaces (op_contract._EagerAttention)
        def call():
            saved, fused_op._DIRECT_AUTOGRAD = fused_op._DIRECT_AUTOGRAD, None
            try:
                return fn()
            finally:
                fused_op._DIRECT_AUTOGRAD = saved

        return call

    def fused():
        return rk.rolling_attention(q, k, v, backend="cpu")

    sdpa = "torch SDPA, inputs requiring grad"
    sdpa_step = "torch SDPA, forward + backward"
    return [
        (sdpa, lambda: F.scaled_dot_product_attention(q, k, v), sdpa),
        ("rolling_attention (cpu), inputs requiring grad", fused, sdpa),
        ("rolling_attention (cpu), inputs requiring grad, Python formula",
         python_formula(fused), sdpa),
        (sdpa_step, lambda: backward(F.scaled_dot_product_attention(q, k, v)), sdpa_step),
        ("rolling_attention (cpu), forward + backward", lambda: backward(fused()), sdpa_step),
        ("rolling_attention (cpu), forward + backward, Python formula",
         python_formula(lambda: backward(fused())), sdpa_step),
        ("rolling_attention, rotation + stats, forward + backward",
         lambda: backward(rk.rolling_attention(q, k, v, **rq)[0]), sdpa_step),
    ]  # fmt: skip


def _isa_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"# per-call cost, (1, 1, 16, 64) float32; {info.get('cpu')} ({_isa_flags()}; kernel "
        f"variant {info.get('kernel_isa') or 'not built'}), {info['cores']} cores"
    )
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {info['date']}")
    print(f"# load average before: {info.get('load_average', '?')}")
    rows = run(args.calls, args.rounds)
    print("| call | median us | x SDPA | min us | x SDPA (min) |")
    print("|---|---|---|---|---|")
    for name, med, ratio, low, low_ratio in rows:
        print(f"| {name} | {med:.1f} | {ratio:.2f} | {low:.1f} | {low_ratio:.2f} |")
    with open("/proc/loadavg") as f:
        print(f"# load average after: {' '.join(f.read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
