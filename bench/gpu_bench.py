"""GPU benchmark of the Triton backend against torch SDPA's flash backend, with every timed
output checked.

    python bench/gpu_bench.py [--out DIR] [--budget SECONDS] [--dry-run] [--only TEXT]

Forward and forward+backward throughput (TFLOP/s from 4*B*H*Lq*Lk*D for the forward, 3.5x that
for forward+backward), bf16, head dims 64 and 128, L = 1024 ... 16384 at 16k tokens per batch, and
a [CLS]-only query (Lq = 1) over 16k keys. Providers, on the same inputs:

    sdpa        torch SDPA, flash backend, no rotation, no stats (the anchor)
    triton      this package's Triton kernels, no rotation, no stats
    triton+rot  with a per-head rotation of every query row (of row 0 only for [CLS] cases)
    triton+rs   with the rotation and the RollingQ statistics (2 modalities and a [CLS] key)
    reference   the materialised-softmax reference with rotation and stats (small L only)

Correctness: every provider's output (forward) or gradients (forward+backward) are compared with
SDPA's math backend in float32 on the same bf16 inputs (the rotated rows rounded to bf16, as the
kernels do); a Triton provider fails when its max error exceeds twice SDPA flash's error on the
same problem plus 1e-3. Timing: the median over 7 spans of back-to-back calls between one pair of
CUDA events, each span about 25 ms long, so launch overhead does not land on sub-millisecond
kernels; autotuning happens in the warm-up, whose wall time and the chosen configs are recorded.

Isolation: each case runs in a child process. When a provider kills its CUDA context (an illegal
memory access, say), the child dies, the provider is recorded as crashed, and a new child goes on
with the providers that remain, so one crash cannot hide the others.

fp32 and head dims above 256 are not benchmarked (bench/gpu_smoke.py checks D = 768). --budget
stops starting new cases after that many seconds. Results go to stdout and, with --out (default
$OUT), to gpu_bench.json and gpu_bench.md after every case. --dry-run runs tiny shapes on the CPU
through Triton's interpreter to exercise the harness without a GPU.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rollingq_kernels import rolling_attention_reference  # noqa: E402
from rollingq_kernels.api import make_problem  # noqa: E402
from rollingq_kernels.reference import apply_rotation  # noqa: E402

PROVIDERS = ("sdpa", "triton", "triton+rot", "triton+rs", "reference")
MODES = ("fwd", "fwd+bwd")


def _flops(B, H, Lq, Lk, D, mode):
    fwd = 4.0 * B * H * Lq * Lk * D
    return fwd if mode == "fwd" else 3.5 * fwd


def cases(dry: bool):
    """(name, B, H, Lq, Lk, D, rows) with rows = "all" or "cls" (only query row 0 rotated)."""
    if dry:
        return [("d16 L32", 1, 2, 32, 32, 16, "all"), ("cls-only Lk40", 1, 1, 1, 40, 16, "cls")]

    # most important first: under --budget the tail is skipped. Targets: hdim 128, L >= 2048.
    def grid(D, L):
        return (f"d{D} L{L}", max(1, 16384 // L), 2048 // D, L, L, D, "all")

    return [
        grid(128, 2048),
        grid(128, 4096),
        grid(128, 8192),
        grid(64, 2048),
        grid(64, 4096),
        ("cls-only B8 H16 Lk16384 D128", 8, 16, 1, 16384, 128, "cls"),
        grid(128, 16384),
        grid(128, 1024),
        grid(64, 1024),
        grid(64, 8192),
        grid(64, 16384),
    ]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, *, span_ms=25.0, spans=7, warmup=2):
    """(median, p20, p80) milliseconds per call, and the warm-up's wall time in seconds."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()  # compilation and autotuning happen here
    _sync(device)
    warm_s = time.perf_counter() - t0
    t = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t, 1e-6) * 1e3
    inner = max(1, min(200, int(math.ceil(span_ms / one))))
    if device.type != "cuda":
        inner, spans = 1, 2
    per_call = []
    for _ in range(spans):
        if device.type == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            per_call.append(a.elapsed_time(b) / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            per_call.append((time.perf_counter() - t) * 1e3 / inner)
    per_call.sort()
    n = len(per_call)
    med = statistics.median(per_call)
    return (med, per_call[int(0.2 * (n - 1))], per_call[round(0.8 * (n - 1))]), warm_s, inner


# ----------------------------------------------------------------------------------------------
# Inputs, providers, the correctness yardstick


def make_inputs(B, H, Lq, Lk, D, rows, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # (B, L, H, D) projections viewed as (B, H, L, D), as in a Transformer block
    q = rnd(B, Lq, H, D).transpose(1, 2)
    k = rnd(B, Lk, H, D).transpose(1, 2)
    v = rnd(B, Lk, H, D).transpose(1, 2)
    a = torch.randn(H, D, D, generator=gen, dtype=torch.float64)
    rot = torch.linalg.qr(a)[0].to(device=device, dtype=torch.float32).contiguous()
    sel = None
    if rows == "cls":
        sel = torch.zeros(Lq, dtype=torch.bool, device=device)
        sel[0] = True
    n0 = (Lk - 1) // 2
    ids = torch.tensor([-1] + [0] * n0 + [1] * (Lk - 1 - n0), device=device)
    return q, k, v, rot, sel, ids


def _flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _math32(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def _rotated(q, rot, sel):
    # what the kernels attend with: the rotated rows rounded to q's dtype
    return apply_rotation(q.float(), rot, sel).to(q.dtype)


def provider_fn(name, q, k, v, rot, sel, ids, mode):
    """A callable running one timed call; returns the output (forward)."""
    if name == "sdpa":

        def f():
            return _flash(q, k, v)

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
    # fault injection for the harness's own test (tests/test_gpu_check.py): "crash:NAME" kills
    # the process as an illegal memory access would, "wrong:NAME" corrupts the output
    faults = os.environ.get("GPU_BENCH_FAULT", "").split(",")
    if f"crash:{name}" in faults:

        def f(f=f):
            os._exit(134)

    elif f"wrong:{name}" in faults:

        def f(f=f):
            return f() * 2.0

    if mode == "fwd":
        return f
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    g = g.to(q)

    def fb():
        for t in (q, k, v):
            t.grad = None
        out = f()
        out.backward(g)
        return out

    fb.cotangent = g
    return fb


def _grads_of(fn, q, k, v):
    for t in (q, k, v):
        t.grad = None
    fn()
    return [t.grad.detach().clone() for t in (q, k, v)]


def _chunks(B, H, Lq, Lk, budget_bytes=2 << 30):
    per_head = Lq * Lk * 4 * 4  # scores, probabilities and their gradients in float32
    hc = max(1, min(H, budget_bytes // max(per_head, 1)))
    for b in range(B):
        for h0 in range(0, H, hc):
            yield b, slice(h0, min(H, h0 + hc))


def math_reference(q, k, v, rot, sel, rotated, g=None):
    """SDPA math in float32 on the (rotated, rounded) inputs, chunked over (batch, heads) so the
    materialised scores stay small; with a cotangent g also dq, dk, dv."""
    B, H, Lq, _ = q.shape
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    grads = [torch.empty(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v)]
    for b, hs in _chunks(B, H, Lq, k.shape[2]):
        qs = q[b : b + 1, hs].detach().float().requires_grad_(g is not None)
        ks = k[b : b + 1, hs].detach().float().requires_grad_(g is not None)
        vs = v[b : b + 1, hs].detach().float().requires_grad_(g is not None)
        with torch.set_grad_enabled(g is not None):
            qq = qs
            if rotated:
                qq = apply_rotation(qs, rot[hs], sel).to(q.dtype).float()
            o = _math32(qq, ks, vs)
        out[b : b + 1, hs] = o.detach()
        if g is not None:
            dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), g[b : b + 1, hs].float())
            grads[0][b : b + 1, hs] = dq
            grads[1][b : b + 1, hs] = dk
            grads[2][b : b + 1, hs] = dv
    return out, (grads if g is not None else None)


def _max_err(a, e):
    a, e = a.detach().float(), e.detach().float()
    if torch.isnan(a).any() != torch.isnan(e).any():
        return float("inf")
    return (a - e).abs().max().item()


# ----------------------------------------------------------------------------------------------
# One case in a child process: JSON lines on stdout


def _emit(**kw):
    print("@@" + json.dumps(kw), flush=True)


def _tuning_info():
    from rollingq_kernels import triton_attention as ta

    info = {}
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        tuner = getattr(ta, name, None)
        if tuner is None or not getattr(tuner, "cache", None):
            continue
        info[name.strip("_").replace("_tuned", "")] = {
            "config": str(getattr(tuner, "best_config", "")),
            "bench_s": getattr(tuner, "bench_time", None),
        }
    return info


def run_case(case, todo, dry):
    cname, B, H, Lq, Lk, D, rows = case
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.bfloat16 if not dry else torch.float32
    for mode in MODES:
        names = [p for p in PROVIDERS if (mode, p) in todo]
        if not names:
            continue
        q, k, v, rot, sel, ids = make_inputs(B, H, Lq, Lk, D, rows, dtype, device)
        if mode == "fwd+bwd":
            for t in (q, k, v):
                t.requires_grad_(True)
        refs = {}
        yard = {}
        for name in names:
            row = dict(case=cname, mode=mode, provider=name, B=B, H=H, Lq=Lq, Lk=Lk, D=D)
            why = skip_reason(name, B, H, Lq, Lk, D, device, dry)
            if why:
                _emit(row=dict(row, status=f"skipped: {why}"))
                continue
            _emit(start=[mode, name])
            try:
                fn = provider_fn(name, q, k, v, rot, sel, ids, mode)
                (med, p20, p80), warm_s, inner = time_calls(fn, device)
                tuned = _tuning_info() if name.startswith("triton") else {}
                # correctness of what was timed
                rotated = name in ("triton+rot", "triton+rs", "reference")
                g = getattr(fn, "cotangent", None)
                if rotated not in refs:
                    refs[rotated] = math_reference(q, k, v, rot, sel, rotated, g)
                    qq = _rotated(q.detach(), rot, sel) if rotated else q.detach()
                    if g is None:
                        yard[rotated] = [_max_err(_flash(qq, k.detach(), v.detach()),
                                                  refs[rotated][0])]  # fmt: skip
                    else:
                        qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))

                        def flash_fb(qf=qf, kf=kf, vf=vf, rotated=rotated, g=g, rot=rot, sel=sel):
                            qr = _rotated(qf, rot, sel) if rotated else qf
                            _flash(qr, kf, vf).backward(g)

                        fg = _grads_of(flash_fb, qf, kf, vf)
                        yard[rotated] = [_max_err(a, e) for a, e in zip(fg, refs[rotated][1])]
                ref_out, ref_grads = refs[rotated]
                if g is None:
                    errs = [_max_err(fn(), ref_out)]
                else:
                    errs = [_max_err(a, e) for a, e in zip(_grads_of(fn, q, k, v), ref_grads)]
                bounds = [2.0 * y + 1e-3 for y in yard[rotated]]
                correct = all(e <= b for e, b in zip(errs, bounds))
                status = "ok" if (correct or not name.startswith("triton")) else "wrong"
                tflops = _flops(B, H, Lq, Lk, D, mode) / (med * 1e-3) / 1e12
                _emit(row=dict(row, status=status, ms=med, p20=p20, p80=p80, tflops=tflops,
                               calls_per_span=inner, warmup_s=warm_s, max_err=errs,
                               err_bound=bounds, tuning=tuned))  # fmt: skip
            except Exception as exc:  # a Python-level failure: record it and go on
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                _emit(row=dict(row, status=f"error: {msg}"))
                if "CUDA error" in msg or "AcceleratorError" in msg:
                    raise  # the context is gone: let the parent restart a child
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del q, k, v


def skip_reason(name, B, H, Lq, Lk, D, device, dry):
    if name == "reference" and B * H * Lq * Lk * 4 * 4 > 16e9:
        return "materialised scores too large"
    return None


# ----------------------------------------------------------------------------------------------
# Parent: children per case, restarts after a crash, reports


def _child(case_name, todo, dry, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case_name,
           "--todo", json.dumps(sorted(todo))]  # fmt: skip
    if dry:
        cmd.append("--dry-run")
    rows, started, err = [], None, ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, err = "timeout", f"timed out after {timeout:.0f} s"
    for line in out.splitlines():
        if not line.startswith("@@"):
            continue
        msg = json.loads(line[2:])
        if "start" in msg:
            started = tuple(msg["start"])
        else:
            rows.append(msg["row"])
            started = None
    return rows, started, rc, err


def run(args, on_case=None):
    dry = args.dry_run
    start = time.perf_counter()
    all_rows = []
    for case in cases(dry):
        if args.only and args.only not in case[0]:
            continue
        todo = {(m, p) for m in MODES for p in PROVIDERS}
        if time.perf_counter() - start > args.budget:
            all_rows.append(dict(case=case[0], mode="*", provider="*", status="skipped: budget"))
            continue
        for _attempt in range(len(todo) + 1):
            left = args.budget + 60 - (time.perf_counter() - start)
            rows, started, rc, err = _child(case[0], todo, dry, max(30.0, left))
            all_rows.extend(rows)
            todo -= {(r["mode"], r["provider"]) for r in rows}
            if rc == 0 or not todo:
                break
            tail = " | ".join(err.strip().splitlines()[-2:])[:300]
            if started is None:  # died outside a provider: give up on this case
                all_rows.append(dict(case=case[0], mode="*", provider="*",
                                     status=f"error: child exited {rc}: {tail}"))  # fmt: skip
                break
            all_rows.append(dict(case=case[0], mode=started[0], provider=started[1],
                                 status=f"crashed: child exited {rc}: {tail}"))  # fmt: skip
            todo.discard(started)
            print(f"!! {case[0]} {started[0]} {started[1]} crashed ({tail})", flush=True)
        if on_case is not None:
            on_case(all_rows)  # write what we have: a time limit must not lose it all
    return all_rows


def _add_ratios(rows):
    by = {(r["case"], r["mode"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if "ms" not in r:
            continue
        base = by.get((r["case"], r["mode"], "sdpa"))
        if base is not None:
            r["vs_sdpa"] = base["ms"] / r["ms"]  # > 1: faster than SDPA
        if r["provider"] == "triton+rs":
            plain = by.get((r["case"], r["mode"], "triton+rot"))
            if plain is not None:
                r["stats_overhead"] = r["ms"] / plain["ms"] - 1.0


def summary_table(rows):
    """One line per (case, mode): TFLOP/s per provider, ratios to SDPA flash, cost of the stats."""
    head = "| case | mode | " + " | ".join(PROVIDERS) + " | triton/sdpa | rs/sdpa | stats cost |"
    lines = [head, "|" + "---|" * (len(PROVIDERS) + 5)]
    keys = []
    for r in rows:
        if (r["case"], r["mode"]) not in keys and r["mode"] != "*":
            keys.append((r["case"], r["mode"]))
    for case, mode in keys:
        cells, got = [], {}
        for name in PROVIDERS:
            r = next((x for x in rows if (x["case"], x["mode"], x["provider"]) == (case, mode, name)),
                     {"status": "-"})  # fmt: skip
            got[name] = r
            if "tflops" in r:
                mark = "" if r["status"] == "ok" else " WRONG"
                cells.append(f"{r['tflops']:.3g}{mark}")
            else:
                cells.append(str(r.get("status", "-")).split(":")[0])

        def ratio(name, got=got):
            r = got[name]
            return f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else "-"

        rs = got["triton+rs"]
        so = f"{100 * rs['stats_overhead']:+.1f}%" if "stats_overhead" in rs else "-"
        lines.append(f"| {case} | {mode} | " + " | ".join(cells)
                     + f" | {ratio('triton')} | {ratio('triton+rs')} | {so} |")  # fmt: skip
    return "\n".join(lines)


def _fmt(r):
    if "ms" not in r:
        return f"| {r['case']} | {r['mode']} | {r['provider']} | {r['status']} | | | | | |"
    vs = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else ""
    so = f"{100 * r['stats_overhead']:+.1f}%" if "stats_overhead" in r else ""
    errs = ", ".join(f"{e:.1e}" for e in r["max_err"])
    bnd = ", ".join(f"{e:.1e}" for e in r["err_bound"])
    tune = "; ".join(f"{k}: {v['config']} ({v['bench_s'] or 0:.1f} s)"
                     for k, v in r.get("tuning", {}).items())  # fmt: skip
    return (
        f"| {r['case']} | {r['mode']} | {r['provider']} | {r['status']} | {r['ms']:.3f} "
        f"({r['p20']:.3f}-{r['p80']:.3f}) x{r['calls_per_span']} | {r['tflops']:.1f} | {vs} | "
        f"{so} | {errs} (bound {bnd}) | warm-up {r['warmup_s']:.1f} s; {tune} |"
    )


def _environment(dry):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if (torch.cuda.is_available() and not dry)
        else platform.machine(),
    }  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available() and not dry:
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for json/markdown")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds before skipping cases")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--only", default="", help="only the cases whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--todo", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        case = next(c for c in cases(args.dry_run) if c[0] == args.child)
        run_case(case, {tuple(x) for x in json.loads(args.todo)}, args.dry_run)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to exercise the harness on the CPU")
        return 2

    t0 = time.perf_counter()
    env = _environment(args.dry_run)

    def report(rows, final=False, complete=None):
        complete = final if complete is None else complete
        _add_ratios(rows)
        header = (
            "| case | mode | provider | status | ms/call median (p20-p80) x calls per span "
            "| TFLOP/s | vs sdpa | stats cost | max error (bound) | tuning |\n"
            "|---|---|---|---|---|---|---|---|---|---|"
        )
        detail = "\n".join([header] + [_fmt(r) for r in rows])
        summary = summary_table(rows)
        title = f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
        if final:
            print(title)
            print("TFLOP/s (bf16); rs = rotation + stats; stats cost = rs vs rotation only; "
                  "WRONG = output outside the 2x-SDPA-flash error bound")  # fmt: skip
            print(summary)
        elif rows:
            print(f"... {rows[-1]['case']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
                json.dump({"environment": env, "complete": complete, "rows": rows}, fh, indent=1)
            with open(os.path.join(args.out, "gpu_bench.md"), "w") as fh:
                fh.write(f"# Triton backend benchmark\n\n{title}\n\n")
                fh.write(f"Command: `{env['command']}`\n\nTFLOP/s:\n\n{summary}\n\n")
                fh.write(f"Details:\n\n{detail}\n")

    partial: list = []

    def on_case(rows):
        partial[:] = rows
        report(rows)

    try:
        rows = run(args, on_case=on_case)
    except KeyboardInterrupt:  # the time limit (SIGINT): report what finished
        print("-- interrupted: reporting the cases that finished", flush=True)
        rows = partial + [dict(case="*", mode="*", provider="*", status="skipped: interrupted")]
        report(rows, final=True, complete=False)
        return 130
    report(rows, final=True)
    # a wrong, failing or crashing Triton provider fails the benchmark; baselines only report
    bad = [r for r in rows if r["provider"].startswith("triton") and r.get("status") != "ok"
           and not str(r.get("status", "")).startswith("skipped")]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
