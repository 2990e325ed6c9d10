"""CPU benchmark of the fused kernel against torch's SDPA, side by side in one process.

    python -m bench.cpu_bench [--quick] [--only NAME ...]

Every pair of functions is timed interleaved (one call of each per round, medians after warm-up,
bench/harness.py), so load from other processes hits both alike; the tables show ratios. Each row
names the kernel variant that ran (csrc/cpu/dispatch.cpp), the cores, and the roofline: the row's
GFLOP/s as a fraction of this machine's matrix-multiply throughput in the same dtype (a 2048^3
torch.mm with the same threads, timed in the same rounds as the row: the median of the per-round
fractions, so a change of machine speed between rows does not move it).

Rows (``run()`` returns them as dicts):
  * fwd        forward with a rotated [CLS] row and two-modality statistics vs SDPA forward on the
               pre-rotated queries (no statistics), float32 and bfloat16;
  * fwd_bwd    the same forward plus backward vs SDPA forward plus backward;
  * fp16       the forward of ``fwd`` in float16 (computed in float32 by the kernel) vs SDPA in
               float16, at the two D = 64 shapes;
  * bias       a float attn_mask of shape (1, 1, L, L) or (B, 1, 1, L), the same mask given to SDPA;
  * dropout    dropout 0.1, forward plus backward, vs SDPA with dropout_p=0.1 (its CPU path
               materialises the L x L probabilities), plus the memory both add;
  * gqa        32 query heads over 8 kv heads vs the same call with K / V repeated to 32 heads;
  * few        a few queries against many keys (scores taken by rows): decoding from a KV cache
               (1 and 4 queries, 4096 keys, through scaled_dot_product_attention, float32 and
               bfloat16; and 64 x 16 heads of one query over 16 keys, a batched decode's first
               steps) and RollingQ's [CLS] row alone at the paper's (16, 1, 1101, 768), with
               rotation and statistics, forward + backward; shapes are (B, H, Lq, Lk, D);
  * grad2      a gradient-penalty step (a double backward: the input gradient with create_graph,
               its squared norm differentiated again) vs SDPA under sdpa_kernel(MATH), the torch
               kernel that has a double backward (its flash kernel refuses one);
  * tiny       per-call time of a (1, 1, 16, 64) call through the public function vs SDPA;
  * memory     peak memory the fused forward with statistics adds at (1, 8, 16384, 64);
  * variants   the bf16 call under every kernel variant this CPU runs (and float32), one process;
  * stream     attention followed by its output projection (the next layer reads the output),
               with the output written by streaming stores and by ordinary stores
               (ROLLINGQ_CPU_STREAM_BYTES 0 and -1, docs/build.md), interleaved in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.harness import (
    _summary,
    attention_flops,
    cpu_library,
    gemm_call,
    gemm_line,
    interleaved_rounds,
    interleaved_times,
    machine_info,
    peak_extra_mib,
    roofline_in_rounds,
    roofline_lead,
    roofline_of,
)
from bench.harness import make_rollingq_inputs as make_inputs

FWD_SHAPES = [(4, 8, 1024, 64), (1, 8, 4096, 64), (2, 12, 577, 64), (16, 1, 1101, 768)]
QUICK_SHAPES = [(2, 4, 257, 64), (2, 1, 301, 768)]
MEMORY_SHAPE = (1, 8, 16384, 64)
MASK_SHAPE = (4, 8, 1024, 64)
THREADS = 2


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pair(name: str, shape, dtype, fused: Callable, sdpa: Callable, *, flops: float, reps: int,
          warmup: int = 1, **extra) -> Dict:  # fmt: skip
    rounds = interleaved_rounds([fused, sdpa], lead=roofline_lead(dtype), warmup=warmup, reps=reps)
    t = [_summary(r) for r in rounds]
    fused_ms, sdpa_ms = t[0]["median_ms"], t[1]["median_ms"]
    gflops = flops / (fused_ms * 1e-3) / 1e9
    return {
        "mode": name,
        "dtype": _dname(dtype),
        "shape": tuple(shape),
        "fused_ms": fused_ms,
        "sdpa_ms": sdpa_ms,
        "fused_over_sdpa": fused_ms / sdpa_ms,
        "speedup": sdpa_ms / fused_ms,
        "fused_gflops": gflops,
        "sdpa_gflops": flops / (sdpa_ms * 1e-3) / 1e9,
        **roofline_of(flops, rounds[0], rounds[2:], dtype),
        **extra,
    }


def bench_forward(shape, dtype=torch.float32, *, reps: int, name: str = "fwd") -> Dict:
    from rollingq_kernels import rolling_attention
    from rollingq_kernels.reference import apply_rotation

    q, k, v, kw = make_inputs(*shape, dtype=dtype)
    q_rot = apply_rotation(q, kw["rotation"], kw["rotated_queries"])
    return _pair(
        name, shape, dtype,
        lambda: rolling_attention(q, k, v, backend="cpu", **kw),
        lambda: F.scaled_dot_product_attention(q_rot, k, v),
        flops=attention_flops(*shape[:3], shape[2], shape[3]), reps=reps, warmup=2,
    )  # fmt: skip


def _fwd_bwd_pair(name, shape, dtype, q0, k0, v0, kw, *, q_sdpa=None, flops, reps) -> Dict:
    """Forward + backward of the fused call (arguments kw) against SDPA's on q_sdpa (default the
    same queries), gradients for q, k, v."""
    from rollingq_kernels import rolling_attention

    q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
    qs = q if q_sdpa is None else q_sdpa.detach().requires_grad_()
    grad = torch.randn(q.shape).to(dtype)

    def fused():
        out, _ = rolling_attention(q, k, v, backend="cpu", **kw)
        torch.autograd.grad(out, (q, k, v), grad)

    def sdpa():
        out = F.scaled_dot_product_attention(qs, k, v)
        torch.autograd.grad(out, (qs, k, v), grad)

    return _pair(name, shape, dtype, fused, sdpa, flops=flops, reps=reps)


def bench_forward_backward(shape, dtype=torch.float32, *, reps: int) -> Dict:
    q, k, v, kw = make_inputs(*shape, dtype=dtype)
    flops = attention_flops(*shape[:3], shape[2], shape[3], mode="fwd_bwd")
    return _fwd_bwd_pair("fwd_bwd", shape, dtype, q, k, v, kw, flops=flops, reps=reps)


def bench_bias(kind: str, shape=MASK_SHAPE, *, reps: int) -> Dict:
    """Plain attention with a float additive mask ("1,1,L,L", "B,1,1,L") or a boolean one
    ("bool B,1,L,L": a mask per row, as transformers builds; "bool B,1,1,L padded": a batch of
    which two samples are padded, to half and three quarters of L), the same mask to both."""
    from rollingq_kernels import rolling_attention

    B, H, L, D = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3))
    if kind == "bool B,1,1,L padded":  # two samples of four padded to a half and 3/4 of L
        bias = torch.ones(B, 1, 1, L, dtype=torch.bool)
        bias[0, ..., L // 2 :] = False
        bias[1, ..., 3 * L // 4 :] = False
    elif kind.startswith("bool"):
        bias = torch.rand(B, 1, L, L, generator=g) < 0.9
        bias[..., 0] = True
    else:
        bias = torch.randn(*((1, 1, L, L) if kind == "1,1,L,L" else (B, 1, 1, L)), generator=g)
    return _pair(
        f"{'mask' if kind.startswith('bool') else 'bias'} ({kind})", shape, torch.float32,
        lambda: rolling_attention(q, k, v, attn_mask=bias, backend="cpu"),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        flops=attention_flops(B, H, L, L, D), reps=reps,
    )  # fmt: skip


def bench_dropout(shape=MASK_SHAPE, p: float = 0.1, *, reps: int, memory: bool) -> Dict:
    from rollingq_kernels import rolling_attention

    B, H, L, D = shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(B, H, L, D, generator=g)

    def fused():
        out = rolling_attention(q, k, v, dropout_p=p, backend="cpu")
        torch.autograd.grad(out, (q, k, v), grad)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        torch.autograd.grad(out, (q, k, v), grad)

    row = _pair(
        f"dropout {p} fwd+bwd", shape, torch.float32, fused, sdpa,
        flops=attention_flops(B, H, L, L, D, mode="fwd_bwd"), reps=reps,
    )  # fmt: skip
    if memory:
        row["fused_extra_mib"] = peak_extra_mib(shape, "cpu", threads=THREADS, mode="dropout")[
            "extra_mib"
        ]
        row["sdpa_extra_mib"] = peak_extra_mib(shape, "sdpa", threads=THREADS, mode="dropout")[
            "extra_mib"
        ]
    return row


def bench_double_backward(shape, *, reps: int) -> Dict:
    """A gradient penalty through attention: out = attention(q, k, v); g = d<out, w>/dq with a
    graph; the gradient of |g|^2 with respect to q, k, v. Fused (the cpu backend's forward and
    backward, the second order by the reference's formula) vs torch's math SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rollingq_kernels import rolling_attention

    B, H, L, D = shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(3)
    )
    w = torch.randn(B, H, L, D, generator=g)

    def step(attention):
        def run():
            out = attention(q, k, v)
            (dq,) = torch.autograd.grad(out, q, w, create_graph=True)
            torch.autograd.grad(dq.square().sum(), (q, k, v))

        return run

    def math_sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    fused, sdpa = (
        _summary(t)["median_ms"]
        for t in interleaved_rounds(
            [step(lambda q, k, v: rolling_attention(q, k, v, backend="cpu")), step(math_sdpa)],
            warmup=1, reps=reps,
        )
    )  # fmt: skip
    return {
        "mode": "grad2",
        "dtype": "float32",
        "shape": tuple(shape),
        "fused_ms": fused,
        "sdpa_ms": sdpa,
        "fused_over_sdpa": fused / sdpa,
    }


def bench_gqa(B=4, Hq=32, Hkv=8, L=1024, D=64, *, reps: int) -> Dict:
    """Grouped-query attention against the same call on K / V repeated to every query head."""
    from rollingq_kernels import rolling_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    k_rep, v_rep = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    rounds = interleaved_rounds(
        [
            lambda: rolling_attention(q, k, v, enable_gqa=True, backend="cpu"),
            lambda: rolling_attention(q, k_rep, v_rep, backend="cpu"),
        ],
        lead=[gemm_call(torch.float32)],
        warmup=1,
        reps=reps,
    )
    t = [_summary(r) for r in rounds]
    flops = attention_flops(B, Hq, L, L, D)
    gqa_ms, rep_ms = t[0]["median_ms"], t[1]["median_ms"]
    return {
        "mode": f"gqa {Hq}q/{Hkv}kv vs repeated K/V",
        "dtype": "float32",
        "shape": (B, Hq, L, D),
        "fused_ms": gqa_ms,
        "repeated_ms": rep_ms,
        "gqa_over_repeated": gqa_ms / rep_ms,
        "fused_gflops": flops / (gqa_ms * 1e-3) / 1e9,
        **roofline_in_rounds(flops, rounds[0], rounds[2]),
    }


def bench_decode(B, H, Lq, Lk, D, dtype, *, reps: int, Hkv: Optional[int] = None) -> Dict:
    """Lq new queries against a KV cache of Lk keys, through the drop-in for SDPA; ``Hkv``: K / V
    heads of grouped-query attention (default H)."""
    from rollingq_kernels import scaled_dot_product_attention

    Hkv = H if Hkv is None else Hkv
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g).to(dtype) for _ in range(2))
    gqa = Hkv != H

    def call(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v, enable_gqa=gqa)

        return run

    what = f"decode fwd, {Lq} quer{'y' if Lq == 1 else 'ies'}"
    if gqa:
        what += f", {H}q/{Hkv}kv heads"
    row = _pair(
        what, (B, H, Lq, Lk, D), dtype,
        call(scaled_dot_product_attention), call(F.scaled_dot_product_attention),
        flops=attention_flops(B, H, Lq, Lk, D), reps=reps, warmup=2,
    )  # fmt: skip
    # memory-bound: what counts is how fast K and V stream in, not the GEMM fraction
    kv = 2 * B * Hkv * Lk * D * q.element_size()
    row["kv_mib"] = kv / 2**20
    row["fused_kv_gbs"] = kv / (row["fused_ms"] * 1e-3) / 1e9
    row["sdpa_kv_gbs"] = kv / (row["sdpa_ms"] * 1e-3) / 1e9
    return row


def bench_cls_row(B, L, D, dtype, *, reps: int) -> Dict:
    """RollingQ's [CLS] row alone (one query, rotated, two-modality statistics) against all L
    tokens, forward + backward, vs SDPA forward + backward on the pre-rotated query."""
    from rollingq_kernels.reference import apply_rotation

    q, k, v, kw = make_inputs(B, 1, L, D, dtype=dtype)
    q = q[:, :, :1]
    kw["rotated_queries"] = None
    return _fwd_bwd_pair(
        "[CLS] row fwd+bwd", (B, 1, 1, L, D), dtype, q, k, v, kw,
        q_sdpa=apply_rotation(q, kw["rotation"], None),
        flops=attention_flops(B, 1, 1, L, D, mode="fwd_bwd"), reps=reps,
    )  # fmt: skip


def bench_tiny(shape=(1, 1, 16, 64), calls: int = 500, *, reps: int) -> Dict:
    """Per-call microseconds of a tiny call through the public function (no statistics)."""
    from rollingq_kernels import rolling_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))

    def many(fn):
        def run():
            for _ in range(calls):
                fn()

        return run

    t = interleaved_times(
        [
            many(lambda: rolling_attention(q, k, v, backend="cpu")),
            many(lambda: F.scaled_dot_product_attention(q, k, v)),
        ],
        warmup=1,
        reps=reps,
    )
    fused_us, sdpa_us = (x["median_ms"] * 1e3 / calls for x in t)
    return {
        "mode": "tiny call (us per call)",
        "dtype": "float32",
        "shape": tuple(shape),
        "fused_us": fused_us,
        "sdpa_us": sdpa_us,
        "fused_over_sdpa": fused_us / sdpa_us,
    }


def bench_variants(shape=(4, 8, 1024, 64), *, reps: int, backward: bool = False) -> Dict:
    """The same bf16 call (rotation + statistics) under every kernel variant this CPU runs but
    the generic one, and the float32 call under the default variant, interleaved in one process
    (the variant is switched through the library's C function before each call): what each way
    of multiplying bf16 gives here (amx: tiles; avx512: converted to float32; avx512_dot:
    VDPBF16PS; avx2: converted)."""
    from rollingq_kernels import rolling_attention

    lib = cpu_library()
    default = lib.rollingq_cpu_isa()
    variants = [v for v in lib.rollingq_cpu_isas().decode().split(",") if v != "generic"]
    qb, kb, vb, kw = make_inputs(*shape, dtype=torch.bfloat16)
    qf, kf, vf = (t.float() for t in (qb, kb, vb))
    tensors = []
    for q, k, v in ((qb, kb, vb), (qf, kf, vf)):
        q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
        tensors.append((q, k, v, torch.randn(q.shape).to(q.dtype)))

    def call(isa: bytes, q, k, v, g):
        def run():
            assert lib.rollingq_cpu_set_isa(isa) == 0
            out, _ = rolling_attention(q, k, v, backend="cpu", **kw)
            if backward:
                torch.autograd.grad(out, (q, k, v), g)

        return run

    fns = [call(v.encode(), *tensors[0]) for v in variants] + [call(default, *tensors[1])]
    try:
        t = interleaved_times(fns, warmup=1, reps=reps)
    finally:
        lib.rollingq_cpu_set_isa(default)
    flops = attention_flops(*shape[:3], shape[2], shape[3], mode="fwd_bwd" if backward else "fwd")
    ms = {v: x["median_ms"] for v, x in zip(variants, t)}
    return {
        "mode": "variants fwd+bwd" if backward else "variants fwd",
        "dtype": "bfloat16",
        "shape": tuple(shape),
        "variant_ms": ms,
        "variant_gflops": {v: flops / (m * 1e-3) / 1e9 for v, m in ms.items()},
        "float32_ms": t[-1]["median_ms"],
        "float32_variant": default.decode(),
    }


def bench_stream(shape, dtype, *, reps: int) -> Dict:
    """Attention (no rotation or statistics) and the output projection after it, with the
    output streamed and stored as usual: the time of each part and of the two together."""
    from rollingq_kernels import rolling_attention

    lib = cpu_library()
    B, H, L, D = shape
    q, k, v, _ = make_inputs(*shape, dtype=dtype)
    weight = (torch.randn(H * D, H * D) / (H * D) ** 0.5).to(dtype)
    parts: Dict[str, List[float]] = {"stream": [], "store": []}

    def call(threshold: int, name: str):
        def run():
            previous = lib.rollingq_cpu_set_stream_bytes(threshold)
            try:
                out = rolling_attention(q, k, v, backend="cpu")
            finally:
                lib.rollingq_cpu_set_stream_bytes(previous)
            t0 = time.perf_counter()
            F.linear(out.transpose(1, 2).reshape(B, L, H * D), weight)
            parts[name].append((time.perf_counter() - t0) * 1e3)

        return run

    t = interleaved_times([call(0, "stream"), call(-1, "store")], warmup=1, reps=reps)
    proj = {n: statistics.median(x[1:]) for n, x in parts.items()}  # after the warm-up round
    return {
        "mode": "stream",
        "dtype": _dname(dtype),
        "shape": tuple(shape),
        "output_mib": B * H * L * D * q.element_size() / 2**20,
        "stream_ms": t[0]["median_ms"],
        "store_ms": t[1]["median_ms"],
        "stream_over_store": t[0]["median_ms"] / t[1]["median_ms"],
        "projection_stream_ms": proj["stream"],
        "projection_store_ms": proj["store"],
    }


ALL = (
    "fwd", "fwd_bwd", "fp16", "few", "one", "bias", "dropout", "gqa", "grad2", "tiny", "memory", "variants",
    "stream",
)  # fmt: skip


def run(quick: bool = False, forward: bool = True, only: Optional[List[str]] = None) -> List[Dict]:
    """All rows (2 threads). ``quick``: small shapes, few repetitions; ``forward=False`` leaves out
    the float32 forward rows (bench.report measures those for every backend); ``only``: a subset
    of ALL."""
    want = set(only or ALL)
    if not forward:
        want.discard("fwd")
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        rows: List[Dict] = []
        shapes = QUICK_SHAPES if quick else FWD_SHAPES
        r_fast, r_slow = (3, 3) if quick else (9, 5)
        if "fwd" in want:
            for dtype in (torch.float32, torch.bfloat16):
                for shape in shapes:
                    rows.append(
                        bench_forward(shape, dtype, reps=r_slow if shape[3] > 64 else r_fast)
                    )
        if "fwd_bwd" in want:
            for dtype in (torch.float32, torch.bfloat16):
                for shape in shapes:
                    reps = 3 if quick or shape[3] > 64 else 5
                    rows.append(bench_forward_backward(shape, dtype, reps=reps))
        if "fp16" in want:
            for shape in shapes[:1] if quick else [(4, 8, 1024, 64), (2, 12, 577, 64)]:
                rows.append(bench_forward(shape, torch.float16, reps=r_fast))
        if "few" in want:
            Lk = 513 if quick else 4096
            for dtype in (torch.float32, torch.bfloat16):
                for Lq in (1, 4):
                    rows.append(bench_decode(1, 32, Lq, Lk, 128, dtype, reps=r_fast))
            # grouped-query attention: 4 query heads per K / V head
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(bench_decode(1, 32, 1, Lk, 128, dtype, reps=r_fast, Hkv=8))
            # the first steps of a batched decode: many heads, one query, a short cache
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(bench_decode(64, 16, 1, 16, 64, dtype, reps=r_fast))
            for dtype in (torch.float32, torch.bfloat16):
                B, L = (2, 301) if quick else (16, 1101)
                rows.append(bench_cls_row(B, L, 768, dtype, reps=r_slow))
        if "one" in want:  # one (batch, head): its query tiles are all the threads have to share
            for dtype in (torch.float32, torch.bfloat16):
                shape = (1, 1, 301, 768) if quick else (1, 1, 1101, 768)
                rows.append(bench_forward(shape, dtype, reps=r_slow, name="one head, forward"))
        mask_shape = (2, 4, 257, 64) if quick else MASK_SHAPE
        if "bias" in want:
            for kind in ("1,1,L,L", "B,1,1,L", "bool B,1,L,L", "bool B,1,1,L padded"):
                rows.append(bench_bias(kind, mask_shape, reps=r_fast))
        if "dropout" in want:
            rows.append(bench_dropout(mask_shape, reps=3 if quick else 5, memory=not quick))
        if "variants" in want:
            shape = (2, 4, 257, 64) if quick else MASK_SHAPE
            rows.append(bench_variants(shape, reps=3 if quick else 5))
            rows.append(bench_variants(shape, reps=3, backward=True))
        if "stream" in want:
            for dtype in (torch.float32, torch.bfloat16):
                for shape in [(2, 4, 257, 64)] if quick else [(4, 8, 1024, 64), (2, 12, 577, 64)]:
                    rows.append(bench_stream(shape, dtype, reps=3 if quick else 15))
        if "gqa" in want:
            rows.append(bench_gqa(L=257 if quick else 1024, reps=r_fast))
        if "grad2" in want:
            rows.append(bench_double_backward((2, 4, 129, 64) if quick else (4, 8, 512, 64),
                                              reps=r_fast))  # fmt: skip
        if "tiny" in want:
            rows.append(bench_tiny(reps=r_fast))
        if "memory" in want:
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
        "isa": info["kernel_isa"],
        "threads": str(THREADS),
        "torch": info["torch"],
        "date": info["date"],
    }


def _fmt(x, f="{:.2f}"):
    return "-" if x is None else f.format(x)


def format_rows(rows: List[Dict]) -> str:
    out = [
        "| mode | dtype | B, H, L, D | fused ms | SDPA ms | fused / SDPA time | speed-up |"
        " fused GFLOP/s | roofline | GEMM GFLOP/s | ISA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        shape = ", ".join(str(s) for s in r["shape"])
        if r["mode"] == "memory":
            notes.append(
                f"peak memory above inputs and outputs, forward with statistics at ({shape}): "
                f"fused {r['fused_extra_mib']:.1f} MiB, SDPA (no statistics) "
                f"{r['sdpa_extra_mib']:.1f} MiB; the reference would hold a "
                f"{r['reference_matrix_mib']:.0f} MiB attention matrix"
            )
            continue
        if r["mode"].startswith("tiny"):
            notes.append(
                f"tiny call ({shape}): fused {r['fused_us']:.1f} us, SDPA {r['sdpa_us']:.1f} us, "
                f"{r['fused_over_sdpa']:.2f}x SDPA's time"
            )
            continue
        if r["mode"].startswith("variants"):
            per = ", ".join(
                f"{v} {m:.1f} ms ({r['variant_gflops'][v]:.0f} GFLOP/s)"
                for v, m in r["variant_ms"].items()
            )
            what = "forward + backward" if "bwd" in r["mode"] else "forward"
            notes.append(
                f"bf16 {what} ({shape}) per kernel variant, one process: {per}; the same call in "
                f"float32 under {r['float32_variant']}: {r['float32_ms']:.1f} ms"
            )
            continue
        if r["mode"] == "stream":
            notes.append(
                f"attention + output projection, {r['dtype']} ({shape}), output "
                f"{r['output_mib']:.1f} MiB: streamed {r['stream_ms']:.1f} ms, stored "
                f"{r['store_ms']:.1f} ms ({r['stream_over_store']:.2f}x the time); the projection "
                f"alone {r['projection_stream_ms']:.2f} / {r['projection_store_ms']:.2f} ms"
            )
            continue
        if r["mode"] == "grad2":
            notes.append(
                f"gradient penalty (double backward), float32 ({shape}): fused "
                f"{r['fused_ms']:.1f} ms, SDPA's math kernel {r['sdpa_ms']:.1f} ms, "
                f"{r['fused_over_sdpa']:.2f}x its time"
            )
            continue
        if r["mode"].startswith("gqa"):
            notes.append(
                f"{r['mode']} ({shape}): {r['fused_ms']:.1f} ms vs {r['repeated_ms']:.1f} ms, "
                f"{r['gqa_over_repeated']:.2f}x the repeated call's time"
            )
            continue
        if "kv_mib" in r:
            notes.append(
                f"{r['mode']}, {r['dtype']} ({shape}): K and V ({r['kv_mib']:.0f} MiB) read at "
                f"{r['fused_kv_gbs']:.1f} GB/s fused, {r['sdpa_kv_gbs']:.1f} GB/s SDPA"
            )
        if "fused_extra_mib" in r:
            notes.append(
                f"{r['mode']} ({shape}): working memory fused {r['fused_extra_mib']:.1f} MiB, "
                f"SDPA {r['sdpa_extra_mib']:.1f} MiB"
            )
        out.append(
            f"| {r['mode']} | {r['dtype']} | {shape} | {r['fused_ms']:.1f} | {r['sdpa_ms']:.1f} | "
            f"{r['fused_over_sdpa']:.2f} | {r['speedup']:.2f}x | {r['fused_gflops']:.0f} | "
            f"{_fmt(r.get('roofline'))} | {_fmt(r.get('gemm_gflops'), '{:.0f}')} | {r['isa']} |"
        )
    return "\n".join(out + [""] + notes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--only", nargs="*", choices=ALL, help="run these rows only")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_cpu_capability']}),"
        f" kernel variant {info['kernel_isa']} of {info['kernel_isas']}, {THREADS} threads,"
        f" load {info.get('load_average', '?')}, {info['date']}"
    )
    print(gemm_line(THREADS))
    rows = run(quick=args.quick, only=args.only)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
