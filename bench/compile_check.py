"""Compile what the Triton launchers really launch, for sm_80 and sm_90, without a GPU.

    python bench/compile_check.py [--set ci|bench|tests|all] [--arch 90] [--jobs N]
                                  [--only TEXT] [--markdown FILE] [--json FILE]

Triton's interpreter runs the kernels' Python semantics, not the compiler: code the interpreter
accepts can still fail to compile, need more shared memory than the GPU has, or spill registers.
This script runs the real launchers (``rolling_attention_triton_forward`` / ``_backward``) on
``meta`` tensors with every kernel launch recorded instead of executed, as they would run on a
GPU of the target kind (its split-K plan, its pruned tuning configs), then compiles each recorded
launch exactly as Triton's JIT would: the same argument specialisation (integers equal to 1
become constants; pointers and integers divisible by 16 get the alignment hint), the same
constexprs, BLOCK sizes, num_warps and num_stages. ptxas (shipped with triton) reports registers,
spill stores/loads and the stack frame; the compiled metadata gives the shared memory.

Sets of variants:
    smoke  exactly what bench/gpu_smoke.py launches
    ci     a few representative launches (seconds to minutes); `make test` runs it for sm_90
    bench  what bench/gpu_bench.py launches (bf16, every config the autotuner may pick)
    tests  what tests/test_triton_gpu.py and bench/gpu_smoke.py launch (first config, untuned)
    all    bench + tests

Exit status 1 when a variant fails to compile, needs more shared memory than the architecture
allows, or (with --fail-on-spill) spills. TRITON_INTERPRET must be unset. No GPU is needed.
"""

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Opt-in maximum of dynamic shared memory per block (CUDA programming guide, compute capabilities)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
# fake device addresses: allocations are 512-byte aligned, as the CUDA caching allocator's are
_BASE_PTR = 1 << 20


# ----------------------------------------------------------------------------------------------
# Recording the launches


@dataclass(frozen=True)
class TensorArg:
    """What the JIT sees of a tensor argument: its dtype and its address."""

    dtype: str
    ptr: int

    def data_ptr(self) -> int:
        return self.ptr

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


class _JitTensor:
    # the object handed to Triton's binder (it reads .dtype and data_ptr())
    def __init__(self, t: TensorArg):
        self.dtype = t.torch_dtype
        self._ptr = t.ptr

    def data_ptr(self):
        return self._ptr


@dataclass
class Launch:
    kernel: str  # attribute name in triton_attention_kernels
    args: tuple
    kwargs: dict
    configs: List[Tuple[dict, int, int]]  # (BLOCK kwargs, num_warps, num_stages) candidates

    def key(self, cfg) -> str:
        return repr((self.kernel, self.args, sorted(self.kwargs.items()), cfg))


def _arg(x):
    if isinstance(x, torch.Tensor):
        return TensorArg(
            str(x.dtype).replace("torch.", ""), _BASE_PTR + x.storage_offset() * x.element_size()
        )
    return x


@contextlib.contextmanager
def recording(arch: int, tuned: bool, sink: List[Launch]):
    """Run the launchers as on a GPU of compute capability ``arch``, recording launches."""
    from rollingq_kernels import triton_attention as ta
    from rollingq_kernels import triton_attention_kernels as K

    saved = {
        "launch": ta._launch,
        "interp": ta._interpreting,
        "emu": ta._EMULATED_GPU,
        "kernels": {
            n: getattr(K, n) for n in dir(K) if n.startswith("_") and n.endswith("_kernel")
        },
    }

    def launch(kind, _tuned, raw, grid, lq, lk, *args, **meta):
        table = {"fwd": ta._fwd_configs, "dkdv": ta._bwd_dkdv_configs, "dq": ta._bwd_dq_configs}
        kept = ta._prune(table[kind](), {"Lq": lq, "Lk": lk}, kind, **meta)
        if not tuned:
            kept = kept[:1]
        cfgs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]
        sink.append(Launch(raw.__name__, tuple(_arg(a) for a in args), dict(meta), cfgs))

    class _Fixed:
        def __init__(self, name):
            self.name = name
            self.__name__ = name

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                warps = kwargs.pop("num_warps", 4)
                stages = kwargs.pop("num_stages", 3)  # Triton's default on CUDA
                sink.append(
                    Launch(self.name, tuple(_arg(a) for a in args), kwargs, [({}, warps, stages)])
                )

            return run

    ta._launch = launch
    ta._interpreting = lambda: False
    ta._EMULATED_GPU = ta.EmulatedGpu((arch // 10, arch % 10), SM_COUNT.get(arch, 100))
    for n in saved["kernels"]:
        fixed = _Fixed(n)
        fixed.fn = saved["kernels"][n]
        setattr(K, n, fixed)
    try:
        yield
    finally:
        ta._launch = saved["launch"]
        ta._interpreting = saved["interp"]
        ta._EMULATED_GPU = saved["emu"]
        for n, k in saved["kernels"].items():
            setattr(K, n, k)


# ----------------------------------------------------------------------------------------------
# Scenarios: the calls the benchmark, the smoke script and the GPU tests make


def _t(shape, dtype, layout="bhld"):
    B, H, L, D = shape
    if layout == "blhd":
        return torch.empty(B, L, H, D, dtype=dtype, device="meta").transpose(1, 2)
    if layout == "strided":
        return torch.empty(B, H, L, 2 * D, dtype=dtype, device="meta")[..., ::2]
    return torch.empty(B, H, L, D, dtype=dtype, device="meta")


@dataclass
class Scenario:
    name: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: torch.dtype = torch.bfloat16
    rot: bool = False
    rows: str = "all"  # "all" | "subset" (a bool row mask)
    stats: int = 0  # number of modalities; 0 = no statistics
    pad: bool = False
    causal: bool = False
    layout: str = "blhd"
    bwd: bool = False
    tuned: bool = False
    tags: set = field(default_factory=set)

    def run(self):
        from rollingq_kernels import triton_attention as ta

        B, H, Lq, Lk, D = self.B, self.H, self.Lq, self.Lk, self.D
        q = _t((B, H, Lq, D), self.dtype, self.layout)
        k = _t((B, H, Lk, D), self.dtype, self.layout)
        v = _t((B, H, Lk, D), self.dtype, self.layout)
        rot = torch.empty(H, D, D, device="meta") if self.rot else None
        rows = torch.empty(B, Lq, dtype=torch.bool, device="meta") if (
            self.rot and self.rows == "subset") else None  # fmt: skip
        ids = torch.empty(B, Lk, dtype=torch.int32, device="meta") if self.stats else None
        pad = torch.empty(B, Lk, dtype=torch.bool, device="meta") if self.pad else None
        out, lse, _, _ = ta.rolling_attention_triton_forward(
            q, k, v, rot, rows, ids, pad, self.stats, self.causal, None
        )
        if self.bwd:
            dout = _t((B, H, Lq, D), self.dtype, "blhd")
            ta.rolling_attention_triton_backward(
                dout, q, k, v, out, lse, rot, rows, pad, self.causal, None
            )


def _bench_scenarios() -> List[Scenario]:
    out = []
    for D in (128, 64):
        L = 2048
        B, H = 16384 // L, 2048 // D
        for feat, kw in (("plain", {}), ("rot", dict(rot=True)),
                         ("rot+stats", dict(rot=True, stats=2))):  # fmt: skip
            out.append(Scenario(f"bench d{D} L{L} {feat}", B, H, L, L, D, bwd=True, tuned=True,
                                tags={"bench"}, **kw))  # fmt: skip
    out.append(Scenario("bench cls-only Lk16384 d128 rot+stats", 8, 16, 1, 16384, 128, rot=True,
                        rows="subset", stats=2, tuned=True, tags={"bench"}))  # fmt: skip
    return out


def _smoke_scenarios() -> List[Scenario]:
    # bench/gpu_smoke.py: benchmark shapes (smaller batch), untuned; fp16 and bf16
    out = []
    for dt in (torch.bfloat16, torch.float16):
        n = str(dt).replace("torch.", "")
        out += [
            Scenario(f"smoke {n} d128 L2048 rot+stats", 1, 16, 2048, 2048, 128, dt, rot=True,
                     stats=2, bwd=True, tags={"tests"}),
            Scenario(f"smoke {n} cls-only Lk4096 d128", 2, 4, 1, 4096, 128, dt, rot=True,
                     rows="subset", stats=2, tags={"tests"}),
        ]  # fmt: skip
    out += [
        Scenario("smoke bf16 d768 L1101 rot+stats", 2, 1, 1101, 1101, 768, rot=True,
                 rows="subset", stats=2, bwd=True, tags={"tests", "bench"}),
        Scenario("smoke bf16 d768 cls-only Lk1101", 16, 1, 1, 1101, 768, rot=True,
                 rows="subset", stats=2, tags={"tests", "bench"}),
    ]  # fmt: skip
    return out


def _test_scenarios() -> List[Scenario]:
    out = []
    dts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for n, dt in dts.items():
        for Lq, Lk in ((1, 1), (7, 7), (129, 129), (1000, 1000), (77, 300), (300, 77)):
            out.append(
                Scenario(
                    f"test {n} d64 {Lq}x{Lk} rot+pad+stats",
                    2,
                    3,
                    Lq,
                    Lk,
                    64,
                    dt,
                    rot=True,
                    rows="subset",
                    stats=3,
                    pad=True,
                    tags={"tests"},
                )
            )
            out.append(Scenario(f"test {n} d64 {Lq}x{Lk} causal+pad+stats", 2, 3, Lq, Lk, 64,
                                dt, rot=True, rows="subset", stats=8, pad=True, causal=True,
                                tags={"tests"}))  # fmt: skip
        for D in (8, 40, 96, 128, 256, 768):
            if n == "fp16" and D != 256:
                continue
            out.append(Scenario(f"test {n} d{D} 129x257 rot+pad+stats", 2, 1 if D == 768 else 2,
                                129, 257, D, dt, rot=True, rows="subset", stats=2, pad=True,
                                layout="strided", tags={"tests"}))  # fmt: skip
    for n in ("bf16", "fp32"):
        dt = dts[n]
        out += [
            Scenario(f"test grad {n} d64 129", 2, 2, 129, 129, 64, dt, rot=True, rows="subset",
                     pad=True, bwd=True, tags={"tests"}),
            Scenario(f"test grad {n} d128 300x77 causal", 2, 2, 300, 77, 128, dt, rot=True,
                     causal=True, bwd=True, tags={"tests"}),
            Scenario(f"test grad {n} d768 65", 2, 1, 65, 65, 768, dt, rot=True, rows="subset",
                     pad=True, bwd=True, tags={"tests"}),
        ]  # fmt: skip
    return out


def _ci_scenarios() -> List[Scenario]:
    return [
        Scenario("ci bf16 d128 L4096 rot+stats", 4, 16, 4096, 4096, 128, rot=True, stats=2,
                 bwd=True, tags={"ci"}),
        Scenario("ci fp16 d256 L2048 causal+pad+stats", 2, 2, 2048, 2048, 256, torch.float16,
                 rot=True, rows="subset", stats=2, pad=True, causal=True, tags={"ci"}),
        Scenario("ci bf16 d768 L1101 rot+stats", 2, 1, 1101, 1101, 768, rot=True, rows="subset",
                 stats=2, tags={"ci"}),
        Scenario("ci fp32 d64 L1000 rot+stats", 2, 2, 1000, 1000, 64, torch.float32, rot=True,
                 stats=2, tags={"ci"}),
    ]  # fmt: skip


def _from_smoke() -> List[Scenario]:
    """The exact calls of bench/gpu_smoke.py (same shapes, layouts and flags)."""
    import importlib

    smoke = importlib.import_module("bench.gpu_smoke")
    out = []
    for name, fn, spec, _isolated, counts in smoke.checks(rehearsal=False):
        if not counts:
            continue
        kw = dict(rot=spec.rot, rows="subset" if spec.rows == "cls" else "all",
                  stats=spec.stats, pad=spec.pad, causal=spec.causal)  # fmt: skip
        args = (spec.B, spec.H, spec.Lq, spec.Lk, spec.D, spec.dtype)
        bwd_only = fn.__name__ == "backward_check"
        if not bwd_only:
            out.append(Scenario(f"smoke {name}", *args, tags={"smoke"}, **kw))
        if fn.__name__ in ("backward_check", "paper_check"):
            kw.update(stats=0)
            out.append(Scenario(f"smoke {name} bwd", *args, bwd=True, tags={"smoke"}, **kw))
    return out


def scenarios(which: str) -> List[Scenario]:
    if which == "smoke":
        return _from_smoke()
    if which == "ci":
        return _ci_scenarios()
    if which == "bench":
        return _bench_scenarios() + [s for s in _smoke_scenarios() if "bench" in s.tags]
    if which == "tests":
        return _smoke_scenarios() + _test_scenarios()
    if which == "all":
        seen, out = set(), []
        for s in _bench_scenarios() + _smoke_scenarios() + _test_scenarios():
            if s.name not in seen:
                seen.add(s.name)
                out.append(s)
        return out
    raise ValueError(which)


# ----------------------------------------------------------------------------------------------
# Compiling one launch the way the JIT does


_PTXAS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    re.S,
)


def compile_launch(kernel: str, args: tuple, kwargs: dict, cfg, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from rollingq_kernels import triton_attention_kernels as K

    fn = getattr(K, kernel)
    block, warps, stages = cfg
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs, **block, num_warps=warps, num_stages=stages, debug=False)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    jit_args = [_JitTensor(a) if isinstance(a, TensorArg) else a for a in args]
    bound, spec, opts = binder(*jit_args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    t0 = time.perf_counter()
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    res = {"compile_s": time.perf_counter() - t0, "shared": int(compiled.metadata.shared)}
    m = _PTXAS.search(buf.getvalue())
    if m:
        res.update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]), regs=int(m[4]))
    else:
        res.update(stack=None, spill_st=None, spill_ld=None, regs=None)
    return res


def _job(payload):
    kernel, args, kwargs, cfg, arch, cache = payload
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: a cache hit would skip ptxas and its log
    try:
        return compile_launch(kernel, args, kwargs, cfg, arch)
    except Exception as exc:  # reported per variant
        lines = [x for x in str(exc).strip().splitlines() if x.strip()]
        return {"error": f"{type(exc).__name__}: {' | '.join(lines[-3:])[:400]}"}


# ----------------------------------------------------------------------------------------------


def _label(launch: Launch) -> str:
    kw = launch.kwargs
    name = launch.kernel.replace("_rolling_attn_", "").replace("_kernel", "").strip("_")
    flags = [f for f in ("ROTATE", "HAS_PAD", "CAUSAL", "STATS") if kw.get(f)]
    if kw.get("D_CHUNKS", 1) > 1:
        flags.append(f"chunks{kw['D_CHUNKS']}x{kw.get('DV_CHUNKS')}")
    if (
        launch.kernel == "_rolling_attn_fwd_kernel"
        and launch.args[7].dtype == "float32"
        and (launch.args[0].dtype != "float32")
    ):
        flags.append("split")
    return f"{name}{'[' + ','.join(f.lower() for f in flags) + ']' if flags else ''}"


def collect(which: str, arches: List[int], only: str = "") -> List[dict]:
    rows, seen = [], {}
    for arch in arches:
        for sc in scenarios(which):
            if only and only not in sc.name:
                continue
            sink: List[Launch] = []
            with recording(arch, sc.tuned, sink):
                sc.run()
            for ln in sink:
                for i, cfg in enumerate(ln.configs):
                    key = (arch, ln.key(cfg))
                    if key in seen:
                        seen[key]["scenarios"].append(sc.name)
                        continue
                    dtype = (
                        ln.args[0].dtype if ln.args and isinstance(ln.args[0], TensorArg) else "?"
                    )
                    row = dict(
                        arch=arch, scenario=sc.name, scenarios=[sc.name], kernel=ln.kernel,
                        label=_label(ln), dtype=dtype, cfg=cfg, first=i == 0,
                        payload=(ln.kernel, ln.args, ln.kwargs, cfg, arch),
                    )  # fmt: skip
                    seen[key] = row
                    rows.append(row)
    return rows


def _cfg_str(cfg) -> str:
    block, warps, stages = cfg
    bm, bn = block.get("BLOCK_M"), block.get("BLOCK_N")
    tile = f"{bm}x{bn} " if bm else ""
    return f"{tile}w{warps} s{stages}"


def _dtype_short(d):
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(d, d)


def verdict(row, fail_on_spill=False) -> Optional[str]:
    r = row["result"]
    if "error" in r:
        return "compile error"
    if r["shared"] > SMEM_LIMIT[row["arch"]]:
        return (
            f"shared memory {r['shared'] / 1024:.1f} KiB > {SMEM_LIMIT[row['arch']] / 1024:.0f} KiB"
        )
    if fail_on_spill and (r.get("spill_st") or 0) > 0:
        return "spills"
    return None


def markdown(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["scenario"], r["kernel"], r["label"], r["dtype"], repr(r["cfg"])), {})[
            r["arch"]
        ] = r
    arches = sorted({r["arch"] for r in rows}, reverse=True)
    head = (
        "| variant | kernel | dtype | config | "
        + " | ".join(f"sm_{a}: regs / spill st-ld (B) / stack (B) / smem (KiB)" for a in arches)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(arches))]
    for (sc, _kernel, label, dtype, _cfg), per in by.items():
        any_row = next(iter(per.values()))
        cells = []
        for a in arches:
            r = per.get(a)
            if r is None:
                cells.append("-")
                continue
            res = r["result"]
            if "error" in res:
                cells.append("**error**")
                continue
            smem = f"{res['shared'] / 1024:.1f}"
            if res["shared"] > SMEM_LIMIT[a]:
                smem = f"**{smem} > {SMEM_LIMIT[a] // 1024}**"
            spill = f"{res['spill_st']}-{res['spill_ld']}"
            if res["spill_st"]:
                spill = f"**{spill}**"
            cells.append(f"{res['regs']} / {spill} / {res['stack']} / {smem}")
        lines.append(
            f"| {sc} | {label} | {_dtype_short(dtype)} | {_cfg_str(any_row['cfg'])}"
            f"{'' if any_row['first'] else ' (tuning candidate)'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="all", choices=["ci", "smoke", "bench", "tests", "all"])
    ap.add_argument(
        "--warm",
        action="store_true",
        help="only fill Triton's own kernel cache (as the GPU run will look it up), "
        "report nothing; used by bench/gpu_check.sh to compile in parallel",
    )
    ap.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    ap.add_argument("--only", default="", help="only scenarios whose name contains this")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--markdown", help="write the table to this file")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--fail-on-spill", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    args = ap.parse_args(argv)
    arches = args.arch or [90, 80]
    for a in arches:
        if a not in SMEM_LIMIT:
            ap.error(f"--arch {a}: known architectures are {sorted(SMEM_LIMIT)}")
    import triton

    rows = collect(args.set, arches, args.only)
    rows = [r for r in rows if args.kernel in r["kernel"]]
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(rows)} compilations "
          f"({args.set}, sm_{'/sm_'.join(map(str, arches))})", flush=True)  # fmt: skip
    if args.list:
        for r in rows:
            print(f"sm_{r['arch']} {r['scenario']}: {r['label']} {_cfg_str(r['cfg'])}")
        return 0
    t0 = time.perf_counter()
    if args.warm:
        from triton import knobs

        cache_dir = knobs.cache.dir
        payloads = [r["payload"] + (cache_dir,) for r in rows]
        with cf.ProcessPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(_job, payloads))
        n_err = sum("error" in r for r in results)
        print(f"warmed {cache_dir}: {len(rows) - n_err} kernels compiled, {n_err} errors, "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory() as cache:
        payloads = [r["payload"] + (cache,) for r in rows]
        if args.jobs > 1:
            with cf.ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(_job, payloads))
        else:
            results = [_job(p) for p in payloads]
    failures = 0
    for r, res in zip(rows, results):
        r["result"] = res
        bad = verdict(r, args.fail_on_spill)
        failures += bad is not None
        tag = "FAIL" if bad else "ok  "
        if "error" in res:
            detail = res["error"]
        else:
            detail = (f"regs {res['regs']}, spill {res['spill_st']}/{res['spill_ld']} B, stack "
                      f"{res['stack']} B, smem {res['shared'] / 1024:.1f} KiB, "
                      f"{res['compile_s']:.0f} s")  # fmt: skip
        print(f"sm_{r['arch']} {tag} {r['scenario']}: {r['label']} {_dtype_short(r['dtype'])} "
              f"{_cfg_str(r['cfg'])}: {detail}{' <- ' + bad if bad else ''}")  # fmt: skip
    table = markdown(rows)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{k: v for k, v in r.items() if k != "payload"} for r in rows], fh,
                      indent=1, default=str)  # fmt: skip
    print(f"{failures} failure(s) in {len(rows)} compilations, {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
