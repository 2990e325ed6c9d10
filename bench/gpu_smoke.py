"""Smoke and parity check of the Triton backend at the benchmark's shapes: is it right?

    python bench/gpu_smoke.py [--out DIR] [--rehearsal] [--only TEXT]

Runs in under a minute on an H100/H200 (kernels compiled untuned, ROLLINGQ_TRITON_AUTOTUNE=0)
and prints one PASS / FAIL line per check as soon as it is known, then a verdict. Every output is
compared with the float64 reference computed on the same device from the same (rounded) inputs:

* outputs and gradients in float16 / bfloat16 by the 2x rule: the kernel's max error is at most
  twice that of the same attention written in plain PyTorch in that dtype, plus 1e-3;
* statistics (modality mass, key sums, lse) by the relative tolerances of tests/helpers.py.

Checks, in order: plain, rotation, rotation + statistics (bf16 and fp16) at B=1, H=16, L=2048,
D=128; causal + key padding at D=64; the [CLS]-only query over 16k keys (the split-K path with
its merge); one forward + backward with rotation. Then, each in its own subprocess (with
CUDA_LAUNCH_BLOCKING=1) so that an illegal memory access cannot take the other checks down:
the paper's fusion shape (D=768, L=1101, [CLS]-only rotation, statistics, forward + backward,
and the [CLS]-only query at D=768) on the Triton kernels, and torch SDPA's default backend at
D=768 as a baseline. A baseline failure is reported but does not fail the smoke check.

--rehearsal runs the same checks at tiny shapes on the CPU through Triton's interpreter, so the
script itself is exercised without a GPU. Results: smoke.json in --out (default $OUT).
Exit status 0 when every check of the Triton backend passed, 1 otherwise.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REHEARSAL = "--rehearsal" in sys.argv or os.environ.get("GPU_CHECK_REHEARSAL") == "1"
if REHEARSAL:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("ROLLINGQ_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

from rollingq_kernels.api import make_problem  # noqa: E402
from rollingq_kernels.reference import (  # noqa: E402
    apply_rotation,
    rolling_attention_reference,
    visibility_mask,
)

STATS_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-5}


def _ta():
    from rollingq_kernels import triton_attention as ta

    return ta


# ----------------------------------------------------------------------------------------------
# Inputs and comparisons


class Spec:
    """One call: shapes, dtype and features (rows = "all" | "cls": only query row 0 rotated)."""

    def __init__(self, B, H, Lq, Lk, D, dtype, rot=False, rows="all", stats=0, pad=False,
                 causal=False, seed=0):  # fmt: skip
        self.B, self.H, self.Lq, self.Lk, self.D = B, H, Lq, Lk, D
        self.dtype, self.rot, self.rows, self.stats = dtype, rot, rows, stats
        self.pad, self.causal, self.seed = pad, causal, seed

    def make(self, device):
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        B, H, Lq, Lk, D = self.B, self.H, self.Lq, self.Lk, self.D

        def proj(L):  # a (B, L, H, D) projection viewed as (B, H, L, D)
            x = torch.randn(B, L, H, D, generator=g).to(device=device, dtype=self.dtype)
            return x.transpose(1, 2)

        q, k, v = proj(Lq), proj(Lk), proj(Lk)
        kw = {"is_causal": self.causal}
        if self.rot:
            a = torch.randn(H, D, D, generator=g, dtype=torch.float64)
            kw["rotation"] = torch.linalg.qr(a)[0].to(device=device, dtype=torch.float32)
            if self.rows == "cls":
                sel = torch.zeros(Lq, dtype=torch.bool)
                sel[0] = True
                kw["rotated_queries"] = sel.to(device)
        if self.stats:
            # [CLS] key (id -1), then one contiguous run of keys per modality
            per = max(1, (Lk - 1) // self.stats)
            ids = torch.clamp(torch.arange(Lk) - 1, min=0) // per
            ids = torch.clamp(ids, max=self.stats - 1)
            ids[0] = -1
            kw["key_modality"] = ids.to(device)
            kw["num_modalities"] = self.stats
            kw["return_stats"] = True
        if self.pad:
            pad = torch.rand(B, Lk, generator=g) < 0.85
            pad[:, 0] = True
            kw["key_padding_mask"] = pad.to(device)
        return q, k, v, kw


def _kernel(q, k, v, kw):
    out, stats = _ta().forward(make_problem(q, k, v, **kw))
    return out, stats


def _reference(q, k, v, kw):
    """float64 reference on the inputs' device, from the same rounded inputs."""
    kw64 = dict(kw)
    if kw64.get("rotation") is not None:
        kw64["rotation"] = kw64["rotation"].double()
    res = rolling_attention_reference(q.double(), k.double(), v.double(), **kw64)
    return res if isinstance(res, tuple) else (res, None)


def _plain(q, k, v, kw):
    """The same attention written by hand in the inputs' dtype (the 2x rule's yardstick)."""
    rot = kw.get("rotation")
    qr = apply_rotation(q, None if rot is None else rot.to(q.dtype), kw.get("rotated_queries"))
    s = (qr @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    vis = visibility_mask(q.shape[0], q.shape[2], k.shape[2], device=q.device,
                          key_padding_mask=kw.get("key_padding_mask"),
                          is_causal=kw.get("is_causal", False))  # fmt: skip
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def _max_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    fin = torch.isfinite(e)
    if not torch.equal(torch.isinf(a), torch.isinf(e)):
        return float("inf")
    return (a[fin] - e[fin]).abs().max().item() if fin.any() else 0.0


def _rel(a, e):
    a, e = a.detach().double(), e.detach().double()
    if not torch.equal(torch.isinf(a), torch.isinf(e)) or torch.isnan(a).any():
        return float("inf")
    fin = torch.isfinite(e)
    d = e[fin].norm().item()
    return (a[fin] - e[fin]).norm().item() / (d if d > 0 else 1.0)


def _two_x(name, got, want, plain, lines):
    err, base = _max_err(got, want), _max_err(plain, want)
    bound = 2.0 * base + 1e-3
    ok = err <= bound
    lines.append(f"{name} err {err:.2e} (bound {bound:.2e} = 2x torch {base:.2e} + 1e-3)")
    return ok


def _check_stats(stats, ref, dtype, lines):
    tol = STATS_TOL[dtype]
    ok = True
    for field in ("modality_mass", "key_sum", "lse"):
        r = _rel(getattr(stats, field), getattr(ref, field))
        ok &= r <= tol
        lines.append(f"{field} rel {r:.1e} (tol {tol:.0e})")
    same = torch.equal(stats.key_count.double(), ref.key_count.double())
    ok &= same
    if not same:
        lines.append("key_count differs")
    return ok


# ----------------------------------------------------------------------------------------------
# Checks


def forward_check(spec: Spec, device):
    q, k, v, kw = spec.make(device)
    out, stats = _kernel(q, k, v, kw)
    ref_out, ref_stats = _reference(q, k, v, kw)
    lines = []
    ok = _two_x("out", out, ref_out, _plain(q, k, v, kw), lines)
    if spec.stats:
        ok &= _check_stats(stats, ref_stats, spec.dtype, lines)
    return ok, "; ".join(lines)


def split_check(spec: Spec, device):
    B, H, Lk = spec.B, spec.H, spec.Lk
    splits, _ = _ta()._num_splits(B * H, spec.Lq, Lk, device)
    ok, detail = forward_check(spec, device)
    if splits <= 1:
        return False, f"expected the split-K path, got {splits} split(s); {detail}"
    return ok, f"{splits} splits; {detail}"


def backward_check(spec: Spec, device):
    q, k, v, kw = spec.make(device)
    kw = dict(kw, return_stats=False)
    kw.pop("key_modality", None)
    kw.pop("num_modalities", None)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = _kernel(q, k, v, kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out = _reference(q64, k64, v64, kw)[0]
    want = torch.autograd.grad(ref_out, (q64, k64, v64), g.double())
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    plain = torch.autograd.grad(_plain(ql, kl, vl, kw), (ql, kl, vl), g)
    lines = []
    ok = _two_x("out", out, ref_out, _plain(q, k, v, kw), lines)
    for n, a, e, p in zip(("dq", "dk", "dv"), got, want, plain):
        ok &= _two_x(n, a, e, p, lines)
    return ok, "; ".join(lines)


def paper_check(spec: Spec, device):
    ok1, d1 = forward_check(spec, device)
    ok2, d2 = backward_check(spec, device)
    return ok1 and ok2, f"fwd: {d1} | fwd+bwd: {d2}"


def sdpa_check(spec: Spec, device):
    """Baseline: torch SDPA with its default backend choice, forward and backward."""
    import torch.nn.functional as F

    q, k, v, _ = spec.make(device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref = _reference(q.detach(), k.detach(), v.detach(), {})[0]
    err = _max_err(out, ref)
    return err < 0.1, f"max err {err:.2e} vs float64"


def checks(rehearsal: bool):
    """(name, function, spec, run in a subprocess, counts toward the verdict)."""
    bf, fp = torch.bfloat16, torch.float16
    if rehearsal:  # same paths, tiny shapes: the interpreter runs 16 x 16 tiles
        # (one (batch, head) for the [CLS] checks: the interpreter plans splits for 2 "SMs")
        L, D, H, Lcls, Dp, Lp, Bc, Hc = 37, 32, 2, 300, 48, 21, 1, 1
    else:
        L, D, H, Lcls, Dp, Lp, Bc, Hc = 2048, 128, 16, 16384, 768, 1101, 2, 16
    D64 = 64 if not rehearsal else 16
    return [
        ("plain bf16", forward_check, Spec(1, H, L, L, D, bf), False, True),
        ("rotation bf16", forward_check, Spec(1, H, L, L, D, bf, rot=True), False, True),
        ("rotation+stats bf16", forward_check, Spec(1, H, L, L, D, bf, rot=True, stats=2),
         False, True),
        ("rotation+stats fp16", forward_check, Spec(1, H, L, L, D, fp, rot=True, stats=2),
         False, True),
        ("causal+padding+stats bf16 d64", forward_check,
         Spec(2, H, L // 2 + 3, L // 2 + 3, D64, bf, rot=True, rows="cls", stats=3, pad=True,
              causal=True), False, True),
        ("[CLS]-only split-K bf16", split_check,
         Spec(Bc, Hc, 1, Lcls, D, bf, rot=True, rows="cls", stats=2), False, True),
        ("fwd+bwd rotation bf16", backward_check, Spec(1, H, L, L, D, bf, rot=True), False, True),
        ("paper D=768 bf16 (subprocess)", paper_check,
         Spec(2, 1, Lp, Lp, Dp, bf, rot=True, rows="cls", stats=2), True, True),
        ("[CLS]-only D=768 bf16 (subprocess)", split_check,
         Spec(1 if rehearsal else 16, 1, 1, max(Lp, 40), Dp, bf, rot=True, rows="cls", stats=2), True, True),
        ("baseline: torch SDPA default D=768 (subprocess)", sdpa_check,
         Spec(16, 1, Lp, Lp, Dp, bf), True, False),
    ]  # fmt: skip


def _run_one(fn, spec, device):
    t0 = time.perf_counter()
    try:
        ok, detail = fn(spec, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        status = "PASS" if ok else "FAIL"
    except Exception as exc:
        status = "ERROR"
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        # where it happened (with CUDA_LAUNCH_BLOCKING=1 the failing launch itself)
        frames = traceback.extract_tb(exc.__traceback__)[-4:]
        detail += " at " + " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames))
        if os.environ.get("GPU_SMOKE_TRACEBACK") == "1":
            traceback.print_exc()
    return {"status": status, "detail": detail, "seconds": time.perf_counter() - t0}


def _run_child(name, rehearsal, timeout):
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name]
    if rehearsal:
        cmd.append("--rehearsal")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "ERROR", "detail": f"timed out after {timeout} s",
                "seconds": time.perf_counter() - t0}  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:400]
    return {"status": "ERROR", "detail": f"subprocess exited {proc.returncode}: {tail}",
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--rehearsal", action="store_true", help="tiny shapes, CPU interpreter")
    ap.add_argument("--only", default="", help="only the checks whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-timeout", type=float, default=150.0)
    args = ap.parse_args(argv)
    rehearsal = args.rehearsal or REHEARSAL
    if not rehearsal and not torch.cuda.is_available():
        print("no CUDA device: use --rehearsal to exercise the script on the CPU")
        return 2
    device = torch.device("cpu" if rehearsal else "cuda")
    table = checks(rehearsal)
    if args.child:
        name, fn, spec, _, _ = next(c for c in table if c[0] == args.child)
        print(json.dumps(_run_one(fn, spec, device)), flush=True)
        return 0

    t_start = time.perf_counter()
    results = []
    for name, fn, spec, isolated, counts in table:
        if args.only and args.only not in name:
            continue
        if isolated:
            res = _run_child(name, rehearsal, args.child_timeout)
        else:
            res = _run_one(fn, spec, device)
        res.update(name=name, counts=counts)
        results.append(res)
        tag = res["status"] if counts else f"{res['status']} (baseline, not counted)"
        print(f"{tag:5} {name} [{res['seconds']:.1f} s]: {res['detail']}", flush=True)
    bad = [r for r in results if r["counts"] and r["status"] != "PASS"]
    verdict = "PASS" if not bad else "FAIL"
    elapsed = time.perf_counter() - t_start
    print(f"SMOKE VERDICT: {verdict} ({len(results) - len(bad)}/{len(results)} passed incl. "
          f"baselines, {elapsed:.0f} s)", flush=True)  # fmt: skip
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "smoke.json"), "w") as fh:
            json.dump({"verdict": verdict, "seconds": elapsed, "rehearsal": rehearsal,
                       "torch": torch.__version__, "checks": results}, fh, indent=1)  # fmt: skip
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
