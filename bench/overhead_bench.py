"""Per-call cost of a tiny attention call: where the time goes between the Python API and the
kernel, side by side with torch's SDPA in one process.

    python -m bench.overhead_bench [--calls N] [--rounds R]

Rows (all on the same (1, 1, 16, 64) float32 CPU inputs, medians over rounds of N back-to-back
calls, the rounds of every row interleaved so load from other processes hits them alike):

    torch SDPA                         F.scaled_dot_product_attention(q, k, v)
    rolling_attention (auto)           the public call: validation, dispatch, op, kernel
    rolling_attention (cpu)            the same with the backend named
    scaled_dot_product_attention       this package's SDPA drop-in
    make_problem                       validation alone
    raw op, below autograd             torch.ops.rollingq.attention_fwd on canonical arguments
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import rollingq_kernels as rk
from rollingq_kernels.api import make_problem

from .harness import machine_info


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(calls: int = 2000, rounds: int = 7, shape=(1, 1, 16, 64)):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    problem = make_problem(q, k, v)
    args = problem.op_args()
    rows = [
        ("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("rolling_attention (auto)", lambda: rk.rolling_attention(q, k, v)),
        ("rolling_attention (cpu)", lambda: rk.rolling_attention(q, k, v, backend="cpu")),
        ("scaled_dot_product_attention", lambda: rk.scaled_dot_product_attention(q, k, v)),
        ("make_problem", lambda: make_problem(q, k, v)),
    ]
    from rollingq_kernels import fused_op

    if fused_op.load_error() is None:

        def raw():
            with torch._C._AutoDispatchBelowAutograd():
                return torch.ops.rollingq.attention_fwd(*args)

        rows.append(("raw op, below autograd", raw))
    for _, fn in rows:  # warm-up
        _per_call_us(fn, max(calls // 10, 10))
    samples = {name: [] for name, _ in rows}
    for _ in range(rounds):
        for name, fn in rows:
            samples[name].append(_per_call_us(fn, calls))
    base = statistics.median(samples["torch SDPA"])
    out = []
    for name, _ in rows:
        med = statistics.median(samples[name])
        out.append((name, med, med / base))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    info = machine_info()
    isa = torch.backends.cpu.get_cpu_capability()
    print(
        f"# per-call cost, (1, 1, 16, 64) float32; {info.get('cpu')} ({isa}), {info['cores']} cores"
    )
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| call | us per call (median) | x SDPA |")
    print("|---|---|---|")
    for name, us, ratio in run(args.calls, args.rounds):
        print(f"| {name} | {us:.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
