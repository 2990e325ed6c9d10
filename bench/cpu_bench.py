"""CPU benchmark of the fused kernel: speed against torch SDPA and the reference, and memory.

Everything is fp32 with 2 threads. Timings are medians after warm-up, with the compared
functions run interleaved (one call of each per round) in one process on the same inputs, so
that load from other processes hits all of them alike; the table shows ratios.

    python -m bench.cpu_bench [--quick]

Rows (``run()`` returns them as dicts):
  * fwd       fused forward with a rotated [CLS] row and statistics (M = 2) vs SDPA forward
              (no rotation, no statistics) vs the reference (materialised softmax + statistics);
  * fwd_bwd   the same forward plus backward vs SDPA forward plus backward;
  * memory    peak resident memory the fused forward with statistics adds above its inputs and
              outputs at (1, 8, 16384, 64), measured in a fresh process (see peak_extra_mib).
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F

from bench.harness import attention_flops, interleaved_times, machine_info, peak_extra_mib
from bench.harness import make_rollingq_inputs as make_inputs

FWD_SHAPES = [(4, 8, 1024, 64), (1, 8, 4096, 64), (2, 12, 577, 64), (16, 1, 1101, 768)]
QUICK_SHAPES = [(2, 4, 257, 64), (2, 1, 301, 768)]
MEMORY_SHAPE = (1, 8, 16384, 64)
THREADS = 2


def interleaved_medians(fns, *, warmup: int, reps: int) -> List[float]:
    """Median seconds of each function, called in turn (see bench.harness.interleaved_times)."""
    return [t["median_ms"] * 1e-3 for t in interleaved_times(fns, warmup=warmup, reps=reps)]


def _flops(B, H, L, D, mode):
    return attention_flops(B, H, L, L, D, mode=mode)


def bench_forward(shape, *, reps: int, with_reference: bool = True) -> Dict:
    from rollingq_kernels import rolling_attention

    B, H, L, D = shape
    q, k, v, kw = make_inputs(*shape)
    fns = [
        lambda: rolling_attention(q, k, v, backend="cpu", **kw),
        lambda: F.scaled_dot_product_attention(q, k, v),
    ]
    if with_reference:
        fns.append(lambda: rolling_attention(q, k, v, backend="reference", **kw))
    t = interleaved_medians(fns, warmup=2, reps=reps)
    row = {
        "mode": "fwd",
        "shape": shape,
        "fused_ms": t[0] * 1e3,
        "sdpa_ms": t[1] * 1e3,
        "fused_over_sdpa": t[0] / t[1],
        "fused_gflops": _flops(*shape, "fwd") / t[0] / 1e9,
        "sdpa_gflops": _flops(*shape, "fwd") / t[1] / 1e9,
    }
    if with_reference:
        row["reference_ms"] = t[2] * 1e3
        row["reference_over_fused"] = t[2] / t[0]
    return row


def bench_forward_backward(shape, *, reps: int) -> Dict:
    from rollingq_kernels import rolling_attention

    q0, k0, v0, kw = make_inputs(*shape)
    q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
    grad = torch.randn(q.shape)

    def fused():
        out, _ = rolling_attention(q, k, v, backend="cpu", **kw)
        torch.autograd.grad(out, (q, k, v), grad)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    t = interleaved_medians([fused, sdpa], warmup=1, reps=reps)
    return {
        "mode": "fwd_bwd",
        "shape": shape,
        "fused_ms": t[0] * 1e3,
        "sdpa_ms": t[1] * 1e3,
        "fused_over_sdpa": t[0] / t[1],
        "fused_gflops": _flops(*shape, "fwd_bwd") / t[0] / 1e9,
        "sdpa_gflops": _flops(*shape, "fwd_bwd") / t[1] / 1e9,
    }


def run(quick: bool = False, forward: bool = True) -> List[Dict]:
    """All rows of the CPU benchmark (fp32, 2 threads). ``quick``: small shapes, few repetitions;
    ``forward=False`` leaves out the forward rows (bench.report measures those for every backend)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        rows: List[Dict] = []
        shapes = QUICK_SHAPES if quick else FWD_SHAPES
        for shape in shapes if forward else []:
            reps = 3 if quick else (5 if shape[2] * shape[3] > 300_000 else 9)
            rows.append(bench_forward(shape, reps=reps))
        for shape in shapes[:-1] if not quick else shapes[:1]:
            rows.append(bench_forward_backward(shape, reps=3 if quick else 5))
        mem_shape = (1, 8, 2048, 64) if quick else MEMORY_SHAPE
        fused = peak_extra_mib(mem_shape, "cpu", threads=THREADS)
        sdpa = peak_extra_mib(mem_shape, "sdpa", threads=THREADS)
        B, H, L, _ = mem_shape
        rows.append(
            {
                "mode": "memory",
                "shape": mem_shape,
                "fused_extra_mib": fused["extra_mib"],
                "sdpa_extra_mib": sdpa["extra_mib"],
                "fused_outputs_mib": fused["outputs_mib"],
                "reference_matrix_mib": B * H * L * L * 4 / 2**20,
            }
        )
        info = machine()
        for row in rows:
            row.update(info)
        return rows
    finally:
        torch.set_num_threads(prev)


def machine() -> Dict[str, str]:
    info = machine_info()
    return {
        "machine": f"{info['cpu']}, {info['cores']} cores",
        "threads": str(THREADS),
        "torch": info["torch"],
        "date": info["date"],
    }


def format_rows(rows: List[Dict]) -> str:
    lines = [
        "| mode | B, H, L, D | fused ms | SDPA ms | fused / SDPA | reference / fused | fused GFLOP/s |"
        " SDPA GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mem = []
    for r in rows:
        shape = ", ".join(str(s) for s in r["shape"])
        if r["mode"] == "memory":
            mem.append(
                f"peak memory above inputs and outputs, forward with statistics at ({shape}): "
                f"fused {r['fused_extra_mib']:.1f} MiB, SDPA (no statistics) "
                f"{r['sdpa_extra_mib']:.1f} MiB; the reference would hold a "
                f"{r['reference_matrix_mib']:.0f} MiB attention matrix"
            )
            continue
        ref = f"{r['reference_over_fused']:.2f}x" if "reference_over_fused" in r else "-"
        lines.append(
            f"| {r['mode']} | {shape} | {r['fused_ms']:.1f} | {r['sdpa_ms']:.1f} | "
            f"{r['fused_over_sdpa']:.2f} | {ref} | {r['fused_gflops']:.0f} | "
            f"{r['sdpa_gflops']:.0f} |"
        )
    return "\n".join(lines + [""] + mem)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    info = machine()
    print(f"{info['machine']}, torch {info['torch']}, {THREADS} threads, {info['date']}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
