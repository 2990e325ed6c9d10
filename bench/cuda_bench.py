"""GPU benchmark of the "cuda" backend's forward against SDPA's flash backend.

``run()`` returns one row per (head dim, implementation): bf16 forward, non-causal, B4 H16 L4096:
torch SDPA restricted to its flash backend; the fused kernel alone (no rotation, no statistics);
and the fused kernel as RollingQ calls it (the [CLS] row rotated, statistics over 2 modalities);
then forward + backward (gradients of q, k, v) of SDPA flash and of the fused op.
All on the same inputs in the same process. Each time is the median (with 20th / 80th
percentiles) of several CUDA-event-timed batches of back-to-back calls after warm-up, divided by
the batch size, so that the Python dispatch of one call does not land on the kernel's time.
Every timed output is checked: the output against SDPA's math backend in float32 (max abs
error, reported), and for the statistics call the lse and per-modality mass of a slice of rows
against a direct computation. TFLOP/s uses the forward FLOP count 4 * B * H * Lq * Lk * D.
Forward + backward rows use 3.5x the forward FLOPs and report the largest gradient difference
from SDPA flash's. ``python -m bench.cuda_bench`` prints the table (about 15 s on an H200).
"""

from __future__ import annotations

import datetime
import math
import platform
from typing import Callable, Dict, List

import torch

FLOPS_FWD = lambda B, H, Lq, Lk, D: 4.0 * B * H * Lq * Lk * D  # noqa: E731


def _time_ms(fn: Callable[[], object], calls: int = 20, batches: int = 7) -> List[float]:
    """Per-call times (ms) of `batches` event-timed batches of `calls` back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
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


def _check(D, q, k, v, ids, rot, plain_out, stats_out, stats) -> Dict[str, float]:
    """Max abs errors of the timed outputs of batch 0 (vs SDPA math in float32) and of the
    statistics of its first 128 rows of head 0 (vs a direct float32 computation)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = q[:1], k[:1], v[:1]  # batch 0: the float32 score matrices stay small
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    q_rot = q.clone()
    q_rot[:, :, 0] = (q[:, :, 0].float() @ rot.T).to(q.dtype)  # the kernel rounds q' to bf16
    with sdpa_kernel(SDPBackend.MATH):
        ref_rot = torch.nn.functional.scaled_dot_product_attention(
            q_rot.float(), k.float(), v.float()
        )
    plain_out, stats_out = plain_out[:1], stats_out[:1]
    s = (q_rot[0, 0, :128].float() @ k[0, 0].float().T) / math.sqrt(D)
    p = torch.softmax(s, dim=-1)
    mass = torch.stack([p[:, ids == m].sum(-1) for m in range(2)], dim=-1)
    return {
        "err_plain": (plain_out.float() - ref).abs().max().item(),
        "err_stats": (stats_out.float() - ref_rot).abs().max().item(),
        "err_lse": (stats.lse[0, 0, :128] - torch.logsumexp(s, dim=-1)).abs().max().item(),
        "err_mass": (stats.modality_mass[0, 0, :128] - mass).abs().max().item(),
    }


def _bench_head_dim(D: int, B: int, H: int, L: int, meta: dict) -> List[Dict[str, object]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rollingq_kernels import cuda_attention
    from rollingq_kernels.api import make_problem

    why = cuda_attention.unavailable_reason()
    if why:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    q, k, v, ids, rot, rows_sel = _inputs(D, B, H, L)
    # validated once, as a module would hold them: the timed call is the fused op itself
    plain = make_problem(q, k, v)
    rolling = make_problem(
        q, k, v, rotation=rot, rotated_queries=rows_sel, key_modality=ids, num_modalities=2,
        return_stats=True,
    )  # fmt: skip

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    impls = {
        "sdpa_flash": flash,
        "cuda_fused": lambda: cuda_attention.forward(plain),
        "cuda_fused_rot_stats": lambda: cuda_attention.forward(rolling),
    }
    timed = {name: _time_ms(fn) for name, fn in impls.items()}
    plain_out, _ = impls["cuda_fused"]()
    stats_out, stats = impls["cuda_fused_rot_stats"]()
    errors = _check(D, q, k, v, ids, rot, plain_out, stats_out, stats)
    flops = FLOPS_FWD(B, H, L, L, D)
    base = _pct(timed["sdpa_flash"], 0.5)
    rows = []
    for impl, t in timed.items():
        med = _pct(t, 0.5)
        err = {"cuda_fused": errors["err_plain"], "cuda_fused_rot_stats": errors["err_stats"]}
        rows.append(
            {
                "case": f"fwd bf16 B{B} H{H} L{L} D{D}",
                "impl": impl,
                "ms": round(med, 4),
                "p20_ms": round(_pct(t, 0.2), 4),
                "p80_ms": round(_pct(t, 0.8), 4),
                "tflops": round(flops / (med * 1e-3) / 1e12, 2),
                "vs_sdpa_flash": round(med / base, 3),
                "max_err": round(err.get(impl, 0.0), 5),
                **(
                    {"err_lse": errors["err_lse"], "err_mass": errors["err_mass"]}
                    if impl == "cuda_fused_rot_stats"
                    else {}
                ),  # fmt: skip
                **meta,
            }
        )
    return rows


def _bench_fwd_bwd(D: int, B: int, H: int, L: int, meta: dict) -> List[Dict[str, object]]:
    """Forward + backward (the gradients of q, k, v for a random dout): SDPA flash against the
    fused op through its autograd formula; the gradients compared with SDPA flash's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rollingq_kernels import cuda_attention
    from rollingq_kernels.api import make_problem

    q, k, v = (t.detach().requires_grad_(True) for t in _inputs(D, B, H, L)[:3])
    dout = torch.randn_like(q)
    plain = make_problem(q, k, v)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    def fused():
        out, _ = cuda_attention.forward(plain)
        return torch.autograd.grad(out, (q, k, v), dout)

    timed = {"sdpa_flash": _time_ms(flash, calls=5), "cuda_fused": _time_ms(fused, calls=5)}
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused(), flash()))
    flops = 3.5 * FLOPS_FWD(B, H, L, L, D)  # backward = 2.5 forwards
    base = _pct(timed["sdpa_flash"], 0.5)
    rows = []
    for impl, t in timed.items():
        med = _pct(t, 0.5)
        rows.append(
            {
                "case": f"fwd+bwd bf16 B{B} H{H} L{L} D{D}",
                "impl": impl,
                "ms": round(med, 4),
                "p20_ms": round(_pct(t, 0.2), 4),
                "p80_ms": round(_pct(t, 0.8), 4),
                "tflops": round(flops / (med * 1e-3) / 1e12, 2),
                "vs_sdpa_flash": round(med / base, 3),
                "max_err": round(err if impl == "cuda_fused" else 0.0, 5),
                **meta,
            }
        )
    return rows


def run(
    head_dims=(64, 128), batch: int = 4, heads: int = 16, seqlen: int = 4096
) -> List[Dict[str, object]]:
    """Rows: case, impl, ms (median), p20_ms, p80_ms, tflops, vs_sdpa_flash (time ratio), max_err
    (vs SDPA math in float32), and for the statistics call err_lse / err_mass."""
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
    for D in head_dims:
        rows += _bench_fwd_bwd(D, batch, heads, seqlen, meta)
    return rows


def main() -> None:
    rows = run()
    cols = ["case", "impl", "ms", "p20_ms", "p80_ms", "tflops", "vs_sdpa_flash", "max_err"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    for r in rows:
        if "err_lse" in r:
            print(f"# {r['case']}: statistics of 128 rows: max |lse err| {r['err_lse']:.2e}, "
                  f"max |mass err| {r['err_mass']:.2e}")  # fmt: skip
    print(f"# {rows[0]['gpu']}, torch {rows[0]['torch']}, {rows[0]['date']}")


if __name__ == "__main__":
    main()
