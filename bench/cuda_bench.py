"""GPU benchmark of the "cuda" backend's forward against SDPA's flash backend.

``run()`` returns one row per (head dim, implementation): bf16 forward, non-causal, the fused
kernel with RollingQ statistics (2 modalities, the [CLS] row rotated) next to torch SDPA
restricted to its flash backend, on the same inputs in the same process. Times are medians (with
20th / 80th percentiles) of CUDA-event-timed launches after warm-up; TFLOP/s uses the forward
FLOP count 4 * B * H * Lq * Lk * D. ``python -m bench.cuda_bench`` prints the table.
"""

from __future__ import annotations

import datetime
import platform
from typing import Callable, Dict, List

import torch

FLOPS_FWD = lambda B, H, Lq, Lk, D: 4.0 * B * H * Lq * Lk * D


def _time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 30) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)


def _pct(sorted_times: List[float], q: float) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(q * (len(sorted_times) - 1) + 0.5))]


def _inputs(D: int, B: int, H: int, L: int):
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(D)
    q, k, v = (
        torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    ids = torch.zeros(L, dtype=torch.long, device=device)
    ids[0] = -1  # a [CLS] key
    ids[L // 2 :] = 1
    rot = torch.linalg.qr(torch.randn(D, D, device=device, dtype=torch.float64))[0].float()
    rows_sel = torch.zeros(L, dtype=torch.bool, device=device)
    rows_sel[0] = True  # only the [CLS] query is rotated
    return q, k, v, ids, rot, rows_sel


def _bench_head_dim(D: int, B: int, H: int, L: int, meta: dict) -> List[Dict[str, object]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rollingq_kernels import cuda_attention
    from rollingq_kernels.api import make_problem

    q, k, v, ids, rot, rows_sel = _inputs(D, B, H, L)
    # validated once, as a module would hold it: the timed call is the fused op itself
    problem = make_problem(
        q, k, v, rotation=rot, rotated_queries=rows_sel, key_modality=ids, num_modalities=2,
        return_stats=True,
    )  # fmt: skip
    why = cuda_attention.unavailable_reason()
    if why:
        raise RuntimeError(f"the cuda backend cannot run: {why}")

    def fused():
        return cuda_attention.forward(problem)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    flops = FLOPS_FWD(B, H, L, L, D)
    timed = {"sdpa_flash": _time_ms(flash), "cuda_fused_stats": _time_ms(fused)}
    base = _pct(timed["sdpa_flash"], 0.5)
    rows = []
    for impl, t in timed.items():
        med = _pct(t, 0.5)
        rows.append(
            {
                "case": f"fwd bf16 B{B} H{H} L{L} D{D}",
                "impl": impl,
                "ms": round(med, 4),
                "p20_ms": round(_pct(t, 0.2), 4),
                "p80_ms": round(_pct(t, 0.8), 4),
                "tflops": round(flops / (med * 1e-3) / 1e12, 2),
                "vs_sdpa_flash": round(med / base, 3),
                **meta,
            }
        )
    return rows


def run(
    head_dims=(64, 128), batch: int = 4, heads: int = 16, seqlen: int = 4096
) -> List[Dict[str, object]]:
    """Rows: case, impl, ms (median), p20_ms, p80_ms, tflops, vs_sdpa_flash (time ratio)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.cuda_bench needs a CUDA device")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
    }
    rows: List[Dict[str, object]] = []
    for D in head_dims:
        rows += _bench_head_dim(D, batch, heads, seqlen, meta)
    return rows


def main() -> None:
    rows = run()
    cols = ["case", "impl", "ms", "p20_ms", "p80_ms", "tflops", "vs_sdpa_flash"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"# {rows[0]['gpu']}, torch {rows[0]['torch']}, {rows[0]['date']}")


if __name__ == "__main__":
    main()
