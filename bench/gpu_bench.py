"""GPU benchmark of the Triton backend against torch SDPA's flash backend and the reference.

    python bench/gpu_bench.py [--out DIR] [--budget SECONDS] [--dry-run]

Forward and forward+backward throughput (TFLOP/s from 4*B*H*Lq*Lk*D for the forward, 2.5x that
for the backward), bf16, head dims 64 and 128, L = 1024 ... 16384 at 16k tokens per batch, plus
the paper's fusion shape (B=16, H=1, L=1101, D=768) and a [CLS]-only query (Lq = 1). Providers,
all on the same inputs in one process:

    sdpa        torch SDPA, flash backend (any backend for D > 256), no rotation, no stats
    triton      this package's Triton kernels, no rotation, no stats
    triton+rot  with a per-head rotation of every query row
    triton+rs   with the rotation and the RollingQ statistics (2 modalities and a [CLS] key)
    reference   the materialised-softmax reference with rotation and stats (small L only)

Times are medians (with 20/80 percentiles) of CUDA-event timings after warm-up; autotuning
happens during warm-up. Results go to stdout as one table and, with --out (default: $OUT when
set), to gpu_bench.json and gpu_bench.md. --budget stops starting new cases after that many
seconds so the whole run has a bounded wall time. --dry-run runs tiny shapes on the CPU (Triton
only under TRITON_INTERPRET=1) to check the harness without a GPU.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rollingq_kernels import rolling_attention_reference  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402

PROVIDERS = ("sdpa", "triton", "triton+rot", "triton+rs", "reference")


def _flops(B, H, Lq, Lk, D, mode):
    fwd = 4.0 * B * H * Lq * Lk * D
    return fwd if mode == "fwd" else 3.5 * fwd


def _cases(dry: bool):
    """(name, B, H, Lq, Lk, D, rows) with rows = "all" or "cls" (only query row 0 rotated)."""
    if dry:
        return [
            ("d16 L32", 1, 2, 32, 32, 16, "all"),
            ("paper-like D48", 1, 1, 17, 17, 48, "cls"),
            ("cls-only", 1, 1, 1, 40, 16, "cls"),
        ]

    # Most important first: under --budget the tail is what gets skipped. The targets are stated
    # for hdim 128 at L >= 2048; the paper's fusion shape follows.
    def grid(D, L):
        return (f"d{D} L{L}", max(1, 16384 // L), 2048 // D, L, L, D, "all")

    return [
        grid(128, 2048),
        grid(128, 4096),
        ("paper B16 H1 L1101 D768", 16, 1, 1101, 1101, 768, "cls"),
        grid(128, 8192),
        grid(64, 2048),
        grid(64, 4096),
        grid(128, 16384),
        grid(128, 1024),
        ("cls-only B8 H16 Lk16384 D128", 8, 16, 1, 16384, 128, "cls"),
        grid(64, 1024),
        grid(64, 8192),
        grid(64, 16384),
        ("cls-only B16 H1 Lk1101 D768", 16, 1, 1, 1101, 768, "cls"),
    ]


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, min_reps=5, max_reps=30, target_s=0.25, warmup=2):
        for _ in range(warmup):
            fn()  # warm-up: compilation and autotuning happen here
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        est = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(max_reps, max(min_reps, target_s / est)))
        times = []
        for _ in range(reps):
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        n = len(times)
        return statistics.median(times), times[int(0.2 * (n - 1))], times[round(0.8 * (n - 1))]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _inputs(B, H, Lq, Lk, D, rows, dtype, device, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)

    # (B, L, H, D) projections viewed as (B, H, L, D), as in a Transformer block
    q = rnd(B, Lq, H, D).transpose(1, 2)
    k = rnd(B, Lk, H, D).transpose(1, 2)
    v = rnd(B, Lk, H, D).transpose(1, 2)
    a = torch.randn(H, D, D, generator=gen, dtype=torch.float64)
    rot = torch.linalg.qr(a)[0].to(device=device, dtype=torch.float32)
    sel = None
    if rows == "cls":
        sel = torch.zeros(Lq, dtype=torch.bool, device=device)
        sel[0] = True
    n0 = (Lk - 1) // 2
    ids = torch.tensor([-1] + [0] * n0 + [1] * (Lk - 1 - n0), device=device)
    return q, k, v, rot, sel, ids


def _provider_fn(name, q, k, v, rot, sel, ids, mode, device):
    D = q.shape[-1]
    if name == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if (device.type == "cuda" and D <= 256) else None

        def f():
            if backends is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v)

    elif name.startswith("triton"):
        from rollingq_kernels import triton_attention as ta

        kw = {}
        if name in ("triton+rot", "triton+rs"):
            kw = dict(rotation=rot, rotated_queries=sel)
        if name == "triton+rs":
            kw.update(key_modality=ids, num_modalities=2, return_stats=True)
        problem = make_problem(q, k, v, **kw)

        def f():
            return ta.forward(problem)[0]

    elif name == "reference":

        def f():
            return rolling_attention_reference(
                q, k, v, rotation=rot, rotated_queries=sel, key_modality=ids, num_modalities=2,
                return_stats=True,
            )[0]  # fmt: skip

    else:
        raise ValueError(name)
    if mode == "fwd":
        return f
    g = torch.randn_like(q[..., : v.shape[-1]])

    def fb():
        for t in (q, k, v):
            t.grad = None
        f().backward(g)

    return fb


def _skip_reason(name, B, H, Lq, Lk, D, device, dry):
    if name.startswith("triton") and device.type != "cuda" and not dry:
        return "no GPU"
    if name.startswith("triton") and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "needs TRITON_INTERPRET=1 on CPU"
    if name == "reference" and B * H * Lq * Lk * 4 * 4 > 16e9:
        return "materialised scores too large"
    return None


def run(args, on_case=None):
    dry = args.dry_run
    device = torch.device("cuda" if (torch.cuda.is_available() and not dry) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = _Timer(device)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    rows = []
    for case in _cases(dry):
        cname, B, H, Lq, Lk, D, sel_rows = case
        for mode in ("fwd", "fwd+bwd"):
            if time.perf_counter() - start > args.budget:
                rows.append(dict(case=cname, mode=mode, provider="*", status="skipped: budget"))
                continue
            q, k, v, rot, sel, ids = _inputs(B, H, Lq, Lk, D, sel_rows, dtype, device, gen)
            if mode == "fwd+bwd":
                for t in (q, k, v):
                    t.requires_grad_(True)
            for name in PROVIDERS:
                row = dict(case=cname, mode=mode, provider=name, B=B, H=H, Lq=Lq, Lk=Lk, D=D)
                why = _skip_reason(name, B, H, Lq, Lk, D, device, dry)
                if why:
                    rows.append(dict(row, status=f"skipped: {why}"))
                    continue
                try:
                    fn = _provider_fn(name, q, k, v, rot, sel, ids, mode, device)
                    if dry:
                        med, p20, p80 = timer(fn, min_reps=1, max_reps=2, warmup=1)
                    else:
                        med, p20, p80 = timer(fn)
                except Exception as exc:  # one failing provider must not end the benchmark
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(dict(row, status=f"error: {msg}"))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                tflops = _flops(B, H, Lq, Lk, D, mode) / (med * 1e-3) / 1e12
                rows.append(dict(row, status="ok", ms=med, p20=p20, p80=p80, tflops=tflops))
            del q, k, v
        if on_case is not None:
            on_case(rows, device)  # write what we have: a time limit must not lose it all
    return rows, device


def _add_ratios(rows):
    by = {(r["case"], r["mode"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        base = by.get((r["case"], r["mode"], "sdpa"))
        if base is not None:
            r["vs_sdpa"] = base["ms"] / r["ms"]  # > 1: faster than SDPA
        if r["provider"] == "triton+rs":
            plain = by.get((r["case"], r["mode"], "triton+rot"))
            if plain is not None:
                r["stats_overhead"] = r["ms"] / plain["ms"] - 1.0


def _fmt(r):
    if r.get("status") != "ok":
        return f"| {r['case']} | {r['mode']} | {r['provider']} | {r['status']} | | | |"
    vs = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else ""
    so = f"{100 * r['stats_overhead']:+.1f}%" if "stats_overhead" in r else ""
    return (
        f"| {r['case']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} "
        f"({r['p20']:.3f}-{r['p80']:.3f}) | {r['tflops']:.1f} | {vs} | {so} |"
    )


def summary_table(rows):
    """One line per (case, mode): TFLOP/s per provider, triton+rs vs sdpa, cost of the stats."""
    head = "| case | mode | " + " | ".join(PROVIDERS) + " | rs/sdpa | stats cost |"
    lines = [head, "|" + "---|" * (len(PROVIDERS) + 4)]
    keys = []
    for r in rows:
        if (r["case"], r["mode"]) not in keys:
            keys.append((r["case"], r["mode"]))
    for case, mode in keys:
        cells = []
        rs = None
        for name in PROVIDERS:
            r = next(
                (x for x in rows if (x["case"], x["mode"], x["provider"]) == (case, mode, name)),
                None,
            )
            if r is None:
                r = next(
                    (x for x in rows if (x["case"], x["mode"], x["provider"]) == (case, mode, "*")),
                    {"status": "-"},
                )
            if r.get("status") == "ok":
                cells.append(f"{r['tflops']:.3g}")
                rs = r if name == "triton+rs" else rs
            else:
                cells.append(str(r.get("status", "-")).split(":")[0])
        vs = f"{rs['vs_sdpa']:.2f}x" if rs and "vs_sdpa" in rs else "-"
        so = f"{100 * rs['stats_overhead']:+.1f}%" if rs and "stats_overhead" in rs else "-"
        lines.append(f"| {case} | {mode} | " + " | ".join(cells) + f" | {vs} | {so} |")
    return "\n".join(lines)


def _environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for json/markdown")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds before skipping cases")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()

    def report(rows, device, final=False):
        _add_ratios(rows)
        env = _environment(device)
        header = (
            "| case | mode | provider | ms median (p20-p80) | TFLOP/s | speed vs sdpa "
            "| stats cost |\n|---|---|---|---|---|---|---|"
        )
        detail = "\n".join([header] + [_fmt(r) for r in rows])
        summary = summary_table(rows)
        title = f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
        if final:
            print(title)
            print("TFLOP/s (bf16 on GPU); rs = rotation + stats; stats cost = rs vs rotation only")
            print(summary)
        else:
            print(f"... {rows[-1]['case']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
                json.dump({"environment": env, "complete": final, "rows": rows}, fh, indent=1)
            with open(os.path.join(args.out, "gpu_bench.md"), "w") as fh:
                fh.write(f"# Triton backend benchmark\n\n{title}\n\n")
                fh.write(f"Command: `{env['command']}`\n\nTFLOP/s:\n\n{summary}\n\n")
                fh.write(f"Details (times in ms):\n\n{detail}\n")

    rows, device = run(args, on_case=report)
    report(rows, device, final=True)
    # a failing Triton provider fails the check; a baseline that cannot run is only reported
    bad = [
        r
        for r in rows
        if str(r.get("status", "")).startswith("error") and r["provider"].startswith("triton")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
