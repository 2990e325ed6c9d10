"""The main job (`make bench`): speed, memory and parity of every backend on this machine.

For each shape, side by side in one process on the same inputs:
  * torch SDPA (the anchor): plain attention on pre-rotated queries, no statistics;
  * every registered backend that can run here, with the [CLS] row rotated and the statistics;
  * the reference (materialised softmax + separate statistics, what the paper's code does).
Columns: median time (ms), time relative to SDPA, GFLOP/s (4*B*H*Lq*Lk*D), peak memory above the
inputs (MiB, fresh process per row), and the max abs error of the output against the float64
reference. Rows are saved with machine, versions and date to bench/results/report.json.

    python -m bench.report [--quick] [--no-memory] [--shapes B,H,L,D ...] [--only attention]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List

import torch
import torch.nn.functional as F

import rollingq_kernels as rk
from bench.harness import (
    attention_flops,
    format_table,
    machine_info,
    peak_memory_in_subprocess,
    save_rows,
    time_fn,
)
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import registered_backends
from rollingq_kernels.reference import apply_rotation

DEFAULT_SHAPES = [(4, 8, 1024, 64), (1, 8, 4096, 64), (16, 1, 1101, 768)]
QUICK_SHAPES = [(2, 4, 257, 64), (2, 1, 301, 768)]


def make_inputs(B: int, H: int, L: int, D: int, dtype=torch.float32, seed: int = 0):
    """[CLS | modality 0 | modality 1] with a rotated [CLS] row, as RollingQ uses the kernel."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    n0 = (L - 1) // 2
    ids = rk.key_modality_from_lengths((1, n0, L - 1 - n0), (False, True, True))
    rot = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q.float()
    rows = torch.zeros(L, dtype=torch.bool)
    rows[0] = True
    kwargs = dict(
        rotation=rot, rotated_queries=rows, key_modality=ids, num_modalities=2, return_stats=True
    )
    return q, k, v, kwargs


_MEM_SETUP = """
import rollingq_kernels as rk, torch
from bench.report import make_inputs
q, k, v, kw = make_inputs({B}, {H}, {L}, {D})
torch.set_num_threads({threads})
"""
_MEM_RUN = {
    "torch_sdpa": "out = torch.nn.functional.scaled_dot_product_attention(q, k, v)",
    "backend": "out = rk.rolling_attention(q, k, v, **kw, backend={name!r})",
}


def _measure(name, fn, *, shape, flops, ref, memory, mem_setup, mem_run, reps) -> dict:
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    t = time_fn(fn, warmup=1, reps=reps)
    r = {
        "shape": shape,
        "backend": name,
        "median_ms": t["median_ms"],
        "p20_ms": t["p20_ms"],
        "p80_ms": t["p80_ms"],
        "gflops": flops / (t["median_ms"] * 1e-3) / 1e9,
        "max_err": (out.double() - ref).abs().max().item(),
    }
    if memory:
        try:
            r["peak_mib"] = peak_memory_in_subprocess(mem_setup, mem_run)
        except Exception as exc:  # report, never hide
            r["peak_mib"] = None
            r["note"] = f"memory probe failed: {exc}"[:200]
    return r


def bench_shape(B: int, H: int, L: int, D: int, *, memory: bool, reps: int) -> List[dict]:
    q, k, v, kw = make_inputs(B, H, L, D)
    q_rot = apply_rotation(q, kw["rotation"], kw["rotated_queries"])
    ref_kw = {**kw, "rotation": kw["rotation"].double(), "return_stats": False}
    ref = rk.rolling_attention_reference(q.double(), k.double(), v.double(), **ref_kw)
    common = dict(
        shape=f"({B}, {H}, {L}, {D})",
        flops=attention_flops(B, H, L, L, D),
        ref=ref,
        memory=memory,
        mem_setup=_MEM_SETUP.format(B=B, H=H, L=L, D=D, threads=torch.get_num_threads()),
        reps=reps,
    )
    sdpa = _measure(
        "torch SDPA (no rot/stats)",
        lambda: F.scaled_dot_product_attention(q_rot, k, v),
        mem_run=_MEM_RUN["torch_sdpa"],
        **common,
    )
    rows = [sdpa]
    problem = make_problem(q, k, v, **kw)
    for name in registered_backends():
        reasons = rk.backends._REGISTRY[name].reasons(problem)
        if reasons:
            rows.append(
                {"shape": common["shape"], "backend": name, "note": "; ".join(reasons)[:120]}
            )
            continue
        rows.append(
            _measure(
                f"{name} (rot+stats)",
                lambda n=name: rk.rolling_attention(q, k, v, **kw, backend=n),
                mem_run=_MEM_RUN["backend"].format(name=name),
                **common,
            )
        )
    for r in rows:
        if "median_ms" in r:
            r["vs_sdpa"] = r["median_ms"] / sdpa["median_ms"]
    return rows


def bench_attention(shapes, *, memory: bool, reps: int) -> List[dict]:
    rows = []
    for B, H, L, D in shapes:
        rows += bench_shape(B, H, L, D, memory=memory, reps=reps)
        print(f"  measured {(B, H, L, D)}", file=sys.stderr, flush=True)
    return rows


ATTN_COLUMNS = [
    ("shape (B, H, L, D)", "shape", None),
    ("backend", "backend", None),
    ("median ms", "median_ms", "{:.2f}"),
    ("x SDPA time", "vs_sdpa", "{:.2f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("peak MiB", "peak_mib", "{:.0f}"),
    ("max err vs fp64", "max_err", "{:.1e}"),
    ("note", "note", None),
]

# Further suites contributed by the backends and modules: module name -> title.
SUITES = {
    "bench.cpu_bench": "CPU kernel: forward / backward vs SDPA, memory",
    "bench.fusion_bench": "RollingQ fusion training step (paper shape)",
}


def _generic_table(rows: List[dict]) -> str:
    keys: List[str] = []
    for r in rows:
        for key in r:
            if key not in keys:
                keys.append(key)
    cols = []
    for key in keys:
        sample = next((r[key] for r in rows if r.get(key) is not None), None)
        fmt = "{:.3g}" if isinstance(sample, float) else None
        cols.append((key, key, fmt))
    return format_table(rows, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-row memory probes")
    ap.add_argument("--shapes", nargs="*", help="B,H,L,D ... (default: the issue's shapes)")
    ap.add_argument("--only", choices=["attention", *SUITES], help="run one part only")
    args = ap.parse_args(argv)

    info = machine_info()
    print("# rollingq_kernels benchmark report")
    print(f"machine: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})")
    print(
        f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, {info['date']}"
    )
    print(f"command: python -m bench.report {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"backends: { {n: (r or 'available') for n, r in rk.backend_status().items()} }")
    print()

    saved = {}
    if args.only in (None, "attention"):
        if args.shapes:
            shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        else:
            shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
        rows = bench_attention(shapes, memory=not args.no_memory, reps=3 if args.quick else 7)
        print("## Attention forward, float32 (rotated [CLS] row + 2-modality stats for backends)")
        print(format_table(rows, ATTN_COLUMNS))
        print()
        saved["attention"] = rows
    for mod_name, title in SUITES.items():
        if args.only not in (None, mod_name):
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            continue
        suite_rows = mod.run(quick=args.quick)
        print(f"## {title}")
        print(_generic_table(suite_rows))
        print()
        saved[mod_name] = suite_rows
    path = save_rows("report" + ("-quick" if args.quick else ""), [], extra={"suites": saved})
    print(f"rows saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
