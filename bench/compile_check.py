"""Compile the Triton kernels for sm_80 and sm_90 without a GPU.

    python bench/compile_check.py [--quick] [--arch 90]

Triton's interpreter runs the kernels' Python semantics but not the compiler: code that the
interpreter accepts can still fail to compile (e.g. a non-constexpr global) or need more shared
memory than the GPU has. This script compiles representative variants of every kernel with
Triton's own toolchain (ptxas ships with the triton wheel) for the given architectures, using the
configs the launchers would pick untuned, and reports the shared memory of each. No GPU needed;
TRITON_INTERPRET must not be set. Exit status 1 if any variant fails or exceeds shared memory.
"""

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rollingq_kernels import triton_attention as ta  # noqa: E402
from rollingq_kernels import triton_attention_kernels as K  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TY = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(fn, pointers, floats, const, arch, warps, stages):
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    opts = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _config(kind, arch, lq, lk, meta):
    saved = ta._capability
    ta._capability = lambda: (arch // 10, arch % 10)
    try:
        configs = {"fwd": ta._fwd_configs, "dkdv": ta._bwd_dkdv_configs, "dq": ta._bwd_dq_configs}
        return ta._prune(configs[kind](), {"Lq": lq, "Lk": lk}, kind, **meta)[0]
    finally:
        ta._capability = saved


def _fwd_variant(dtype, D, lq, lk, features, split=False):
    block_d, d_chunks = ta._head_plan(D, ta._TILED_BLOCK_D)
    block_dv, dv_chunks = ta._head_plan(D, ta._TILED_BLOCK_DV)
    rotate = "rot" in features and d_chunks == 1
    meta = dict(
        BLOCK_D=block_d, BLOCK_DV=block_dv, D_CHUNKS=d_chunks, DV_CHUNKS=dv_chunks,
        ROT_CHUNK=max(16, min(block_d, 4096 // block_d)), M_PAD=16, ROTATE=rotate,
        HAS_ROWS=rotate, HAS_PAD="pad" in features, CAUSAL="causal" in features,
        STATS="stats" in features, PRECISION="none" if dtype != "fp32" else "ieee",
        ROT_PRECISION="tf32" if dtype != "fp32" else "ieee", MASS_FP32=dtype == "fp32",
        UPCAST=False,
    )  # fmt: skip
    t = TY[dtype]
    pointers = dict(
        Q=t, K=t, V=t, R="*fp32", ROWS="*u8", IDS="*i32", PAD="*u8",
        O="*fp32" if split else t, LSE="*fp32", MASS="*fp32", KSUM="*fp32",
    )  # fmt: skip
    name = f"fwd {dtype} D={D} Lq={lq} {'+'.join(features) or 'plain'}{' split' if split else ''}"
    return name, "fwd", K._rolling_attn_fwd_kernel, pointers, {"qk_scale"}, meta, lq, lk


def _bwd_variants(dtype, D, lq, lk, features):
    if D <= ta.FAST_HEAD_DIM:
        block_d, d_chunks = ta._head_plan(D, ta._TILED_BWD_BLOCK)
    else:
        block_d, d_chunks = ta._TILED_BWD_BLOCK, -(-D // ta._TILED_BWD_BLOCK)
    meta = dict(
        BLOCK_D=block_d, BLOCK_DV=block_d, D_CHUNKS=d_chunks, DV_CHUNKS=d_chunks,
        HAS_PAD="pad" in features, CAUSAL="causal" in features,
        PRECISION="none" if dtype != "fp32" else "ieee", UPCAST=False,
    )  # fmt: skip
    t = TY[dtype]
    base = dict(Q=t, K=t, V=t, PAD="*u8", DO=t, LSE="*fp32", DELTA="*fp32")
    tag = f"{dtype} D={D} Lq={lq} {'+'.join(features) or 'plain'}"
    return [
        (f"dkdv {tag}", "dkdv", K._rolling_attn_bwd_dkdv_kernel, dict(base, DK=t, DV=t),
         {"scale", "qk_scale"}, meta, lq, lk),
        (f"dq {tag}", "dq", K._rolling_attn_bwd_dq_kernel, dict(base, DQ="*fp32"),
         {"scale", "qk_scale"}, meta, lq, lk),
    ]  # fmt: skip


def variants(quick):
    full = ("rot", "pad", "causal", "stats")
    out = [
        _fwd_variant("bf16", 128, 4096, 4096, full),
        _fwd_variant("bf16", 128, 1, 16384, ("rot", "stats"), split=True),
        *_bwd_variants("bf16", 128, 4096, 4096, ("pad", "causal")),
    ]
    if not quick:
        out += [
            _fwd_variant("bf16", 128, 4096, 4096, ()),
            _fwd_variant("bf16", 768, 1101, 1101, ("pad", "stats")),
            _fwd_variant("fp32", 64, 4096, 4096, full),
            _fwd_variant("fp16", 256, 2048, 2048, full),
            _fwd_variant("bf16", 40, 77, 300, full),
            *_bwd_variants("fp32", 64, 4096, 4096, ("pad",)),
            *_bwd_variants("bf16", 256, 2048, 2048, ("causal",)),
            *_bwd_variants("bf16", 768, 1101, 1101, ("pad",)),
        ]
    return out


def _misc(arch):
    """The kernels launched with fixed block sizes: merge, rotation, preprocess."""
    yield (
        "merge",
        lambda: _compile(
            K._rolling_attn_merge_kernel,
            dict(OP="*fp32", LSEP="*fp32", MASSP="*fp32", O="*bf16", LSE="*fp32", MASS="*fp32"),
            set(),
            dict(BLOCK_S=64, BLOCK_DV=128, DV_CHUNKS=1, M_PAD=16, STATS=True),
            arch, 4, 1,
        ),
    )  # fmt: skip
    for x, y, prec in (("*bf16", "*bf16", "tf32"), ("*fp32", "*bf16", "ieee")):
        yield (
            f"rotate {x}->{y}",
            lambda x=x, y=y, prec=prec: _compile(
                K._rotate_rows_kernel, dict(X=x, R="*fp32", ROWS="*u8", Y=y), set(),
                dict(BLOCK_M=64, BLOCK_D=64, BLOCK_C=32, HAS_ROWS=True, PRECISION=prec,
                     UPCAST=False),
                arch, 4, 2,
            ),
        )  # fmt: skip
    yield (
        "preprocess",
        lambda: _compile(
            K._rolling_attn_bwd_preprocess_kernel, dict(O="*bf16", DO="*bf16", DELTA="*fp32"),
            set(), dict(BLOCK_M=64, BLOCK_DV=128, DV_CHUNKS=1), arch, 4, 1,
        ),
    )  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the most important variants only")
    ap.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    ap.add_argument("--only", default="", help="only the variants whose name contains this")
    args = ap.parse_args(argv)
    failures = 0
    for arch in args.arch or [90, 80]:
        jobs = []
        for name, kind, fn, pointers, floats, meta, lq, lk in variants(args.quick):
            if args.only not in name:
                continue
            cfg = _config(kind, arch, lq, lk, meta)
            const = dict(meta, **cfg.kwargs)
            label = f"{name} [{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}]"
            jobs.append(
                (label, lambda fn=fn, p=pointers, f=floats, c=const, cfg=cfg, arch=arch: _compile(
                    fn, p, f, c, arch, cfg.num_warps, cfg.num_stages))
            )  # fmt: skip
        jobs += [job for job in _misc(arch) if args.only in job[0]]
        for label, job in jobs:
            t = time.perf_counter()
            try:
                kernel = job()
            except Exception as exc:
                failures += 1
                msg = str(exc).strip().splitlines()
                print(f"sm_{arch} FAIL {label}: {type(exc).__name__}: {' | '.join(msg[-3:])[:600]}")
                continue
            smem = kernel.metadata.shared
            ok = smem <= SMEM_LIMIT[arch]
            failures += 0 if ok else 1
            print(
                f"sm_{arch} {'ok  ' if ok else 'SMEM'} {label}: shared {smem / 1024:.0f} KiB, "
                f"{time.perf_counter() - t:.1f} s",
                flush=True,
            )
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
