"""The main job (`make bench`): speed, memory and parity of every backend on this machine.

For each shape and dtype (float32, bfloat16), side by side in one process on the same inputs:
  * torch SDPA (the anchor): plain attention on pre-rotated queries, no statistics;
  * every registered backend that can run here, with the [CLS] row rotated and the statistics;
  * the reference (materialised softmax + separate statistics, what the paper's code does).
The functions of one shape are called in turn, round by round, so load hits all alike. Columns:
median time (ms), time relative to SDPA, GFLOP/s (4*B*H*Lq*Lk*D), the roofline (GFLOP/s as a
fraction of this machine's measured matrix-multiply throughput in the same dtype), the working
memory one call adds above its inputs and outputs (MiB, fresh process per row, see
bench/harness.py), and the max abs error of the output against the float64 reference. The header
names the CPU, its cores, torch's CPU capability and the CPU kernel variant that ran. Rows are
saved with machine, versions and date to bench/results/report.json (not tracked; the runs that
docs/performance.md quotes are kept beside it as report_<machine>.json).

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
    _summary,
    attention_flops,
    cpu_kernel_isa,
    format_table,
    gemm_line,
    interleaved_rounds,
    machine_info,
    make_rollingq_inputs,
    peak_extra_mib,
    roofline_lead,
    roofline_of,
    save_rows,
)
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import registered_backends
from rollingq_kernels.reference import apply_rotation

ISA = cpu_kernel_isa()["isa"]  # the CPU kernel variant that runs (csrc/cpu/dispatch.cpp)
DEFAULT_SHAPES = [(4, 8, 1024, 64), (1, 8, 4096, 64), (2, 12, 577, 64), (16, 1, 1101, 768)]
QUICK_SHAPES = [(2, 4, 257, 64), (2, 1, 301, 768)]


def bench_shape(
    B: int, H: int, L: int, D: int, *, memory: bool, reps: int, dtype=torch.float32
) -> List[dict]:
    """One shape: SDPA, every backend that can run it, interleaved call by call."""
    q, k, v, kw = make_rollingq_inputs(B, H, L, D, dtype=dtype)
    q_rot = apply_rotation(q, kw["rotation"], kw["rotated_queries"])
    ref_kw = {**kw, "rotation": kw["rotation"].double(), "return_stats": False}
    ref = rk.rolling_attention_reference(q.double(), k.double(), v.double(), **ref_kw)
    shape = f"({B}, {H}, {L}, {D})"
    dname = str(dtype).replace("torch.", "")
    names = ["sdpa"]
    fns = [lambda: F.scaled_dot_product_attention(q_rot, k, v)]
    rows = [{"shape": shape, "dtype": dname, "backend": "torch SDPA (no rot/stats)"}]
    problem = make_problem(q, k, v, **kw)
    skipped = []
    for name in registered_backends():
        reasons = rk.backends._REGISTRY[name].reasons(problem)
        if reasons:
            skipped.append(
                {"shape": shape, "dtype": dname, "backend": name, "note": "; ".join(reasons)[:120]}
            )
            continue
        if name == "reference" and dtype != torch.float32:
            continue  # the O(L^2) oracle once per shape is enough
        names.append(name)
        fns.append(lambda n=name: rk.rolling_attention(q, k, v, **kw, backend=n)[0])
        backend = f"{name} (rot+stats)" + (f" [{ISA}]" if name == "cpu" else "")
        rows.append({"shape": shape, "dtype": dname, "backend": backend})
    # Heavy rows (the O(L^2) reference) get fewer rounds only through `reps`; all rows the same.
    # the roofline's GEMM runs in the same rounds (bench/harness.py roofline_in_rounds); it and
    # the reference sweep the caches, so they lead each round and the others rotate after them
    heavy = [i for i, n in enumerate(names) if n == "reference"]
    fast = [i for i in range(len(fns)) if i not in heavy]
    rounds = interleaved_rounds(
        [fns[i] for i in fast], lead=[*(fns[i] for i in heavy), *roofline_lead(dtype)], reps=reps
    )
    by_fn = dict(zip(fast + heavy, rounds))
    flops = attention_flops(B, H, L, L, D)
    times = [_summary(by_fn[i]) for i in range(len(fns))]
    for i, (name, fn, row, t) in enumerate(zip(names, fns, rows, times)):
        out = fn()
        row.update(t)
        row["gflops"] = flops / (t["median_ms"] * 1e-3) / 1e9
        row.update(roofline_of(flops, by_fn[i], rounds[len(fns) :], dtype))
        row["vs_sdpa"] = t["median_ms"] / times[0]["median_ms"]
        row["max_err"] = (out.double() - ref).abs().max().item()
        if memory:
            try:
                if dtype == torch.float32:  # memory does not depend on the dtype's speed path
                    row["peak_mib"] = peak_extra_mib((B, H, L, D), name)["extra_mib"]
            except Exception as exc:  # report, never hide
                row["note"] = f"memory probe failed: {exc}"[:200]
    return rows + skipped


def bench_attention(shapes, *, memory: bool, reps: int) -> List[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, L, D in shapes:
            rows += bench_shape(B, H, L, D, memory=memory, reps=reps, dtype=dtype)
            print(f"  measured {(B, H, L, D)} {dtype}", file=sys.stderr, flush=True)
    return rows


ATTN_COLUMNS = [
    ("shape (B, H, L, D)", "shape", None),
    ("dtype", "dtype", None),
    ("backend", "backend", None),
    ("median ms", "median_ms", "{:.2f}"),
    ("x SDPA time", "vs_sdpa", "{:.2f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("roofline", "roofline", "{:.2f}"),
    ("GEMM GFLOP/s", "gemm_gflops", "{:.0f}"),
    ("peak MiB above in/out", "peak_mib", "{:.1f}"),
    ("max err vs fp64", "max_err", "{:.1e}"),
    ("note", "note", None),
]

# Further suites contributed by the backends and modules: module name -> title.
SUITES = {
    "bench.cpu_bench": "CPU kernel vs SDPA: forward + backward, masks, dropout, GQA, per-call cost, memory",
    "bench.fusion_bench": "RollingQ fusion training step (paper shape)",
    "bench.model_bench": "Whole models through the integrations vs SDPA (forward; training step)",
}


# The report's attention table already has every backend's forward; the CPU suite adds the rest.
SUITE_ARGS = {"bench.cpu_bench": {"forward": False}}


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
    ap.add_argument(
        "--shapes", nargs="*", help="B,H,L,D ... (default: the four shapes of docs/performance.md)"
    )
    ap.add_argument("--only", choices=["attention", *SUITES], help="run one part only")
    args = ap.parse_args(argv)

    info = machine_info()
    print("# rollingq_kernels benchmark report")
    print(f"machine: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})")
    print(
        f"CPU kernel variant: {info['kernel_isa']} (this CPU runs: {info['kernel_isas']}); "
        f"torch CPU capability {info['torch_cpu_capability']}; load average "
        f"{info.get('load_average', '?')}"
    )
    print(gemm_line(info["torch_threads"]))
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
        print("## Attention forward (rotated [CLS] row + 2-modality stats for backends)")
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
        suite_rows = mod.run(**SUITE_ARGS.get(mod_name, {}), quick=args.quick)
        print(f"## {title}")
        print(
            mod.format_rows(suite_rows)
            if hasattr(mod, "format_rows")
            else _generic_table(suite_rows)
        )
        print()
        saved[mod_name] = suite_rows
    path = save_rows("report" + ("-quick" if args.quick else ""), [], extra={"suites": saved})
    print(f"rows saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
