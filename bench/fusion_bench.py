"""A full training step (forward + backward) of the paper's attention fusion, three ways.

Shape of the paper's audio-visual fusion: B = 16, E = 768, one head, 513 audio + 589 visual
tokens (each backbone's own [CLS] included) behind the fusion's [CLS] token (L = 1103), float32,
gradients to every parameter and to the tokens (the encoders below are trained end to end).

  unfused    projects Q, K, V of the whole sequence, materialises the (L, L) softmax, keeps the
             [CLS] row: what the paper's code does (no statistics at all).
  projected  RollingQFusion(mode="projected"): K and V of every token, only the [CLS] query row.
  absorbed   RollingQFusion(mode="absorbed"), the default: K and V projections moved to the query
             side, the kernel attends from one query per head over the raw tokens, backward by
             SharedHeadAttentionFunction (written for this shape).
  absorbed_gqa  the same, through rolling_attention(..., enable_gqa=True) with one key/value head
             and the kernel's generic backward; the line "gqa / shared" is the median of the
             per-round ratios of these two (the decision between them).

Both RollingQFusion rows also return the RollingQ statistics (need_stats=True), as in training.
Each row reports median / p20 / p80 of the step, the speed-up over the unfused step (the median of
per-round ratios; the rounds interleave the three steps, so load changes on a shared machine hit
both sides of each ratio), and the loss and gradient errors relative to the unfused step.

    python -m bench.fusion_bench [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from typing import Callable, List

import torch
import torch.nn.functional as F

from bench.harness import machine_info
from rollingq_kernels import RollingQFusion
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import select_backend


def _time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


CLASSES = 10


def unfused_step(fusion: RollingQFusion, head: torch.Tensor, tokens, labels) -> torch.Tensor:
    """The paper's way: project and attend the whole sequence, keep the [CLS] row. Returns loss."""
    attn = fusion.attn
    x, _, _ = fusion.sequence(tokens)
    B, L, E = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, L, H, D).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, L, D)
    out = attn.out_proj(out.transpose(1, 2).reshape(B, L, E))
    return F.cross_entropy(out[:, 0] @ head, labels)


def fused_step(fusion, head, tokens, labels, mode: str) -> torch.Tensor:
    impl = "gqa" if mode == "absorbed_gqa" else "shared"
    fusion._absorbed_attention = impl
    try:
        out, _ = fusion(tokens, need_stats=True, mode=mode.replace("_gqa", ""))
    finally:
        fusion._absorbed_attention = "shared"
    return F.cross_entropy(out @ head, labels)


def _grads(fusion, head, tokens) -> List[torch.Tensor]:
    return [p.grad.clone() for p in [*fusion.parameters(), head, *tokens]]


def _zero(fusion, head, tokens):
    for p in [*fusion.parameters(), head, *tokens]:
        p.grad = None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _backend_name(x: torch.Tensor) -> str:
    # the backend "auto" picks for the absorbed call's inputs
    q = x[:, :1].unsqueeze(1)
    kv = x.unsqueeze(1)
    return select_backend(make_problem(q, kv, kv, return_stats=True)).name


def run(quick: bool = False) -> List[dict]:
    """Time the three steps at the paper's shape; one dict per row (see the module docstring)."""
    B, E, H, lengths = 16, 768, 1, (513, 589)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    fusion = RollingQFusion(E, H)
    with torch.no_grad():
        fusion.attn.in_proj_bias.normal_(std=0.02)
        fusion.attn.out_proj.bias.normal_(std=0.02)
    head = (torch.randn(E, CLASSES, generator=g) / math.sqrt(E)).requires_grad_(True)
    tokens = [torch.randn(B, n, E, generator=g).requires_grad_(True) for n in lengths]
    labels = torch.randint(0, CLASSES, (B,), generator=g)

    def step(kind):
        def fn():
            _zero(fusion, head, tokens)
            if kind == "unfused":
                loss = unfused_step(fusion, head, tokens, labels)
            else:
                loss = fused_step(fusion, head, tokens, labels, kind)
            loss.backward()
            return loss

        return fn

    # correctness first: loss and gradients of each path against the unfused step
    ref_loss = step("unfused")().detach()
    ref_grads = _grads(fusion, head, tokens)
    errors = {"unfused": (0.0, 0.0)}
    for kind in ("projected", "absorbed", "absorbed_gqa"):
        loss = step(kind)().detach()
        grads = _grads(fusion, head, tokens)
        errors[kind] = (
            abs(float(loss - ref_loss)) / abs(float(ref_loss)),
            max(_rel(a, b) for a, b in zip(grads, ref_grads)),
        )

    # Interleaved rounds: each round times every step back to back, so a load change on a
    # shared machine hits both sides of a ratio; the speed-up is the median of per-round ratios.
    rounds = 2 if quick else 4
    per_round = {
        "unfused": 1,
        "projected": 1,
        "absorbed": 3 if quick else 7,
        "absorbed_gqa": 3 if quick else 7,
    }
    kinds = list(per_round)
    fns = {k: step(k) for k in kinds}
    for k in kinds:  # warm-up
        for _ in range(1 if k == "unfused" else 3):
            fns[k]()
    samples = {k: [] for k in kinds}
    ratios = {k: [] for k in kinds}
    gqa_over_shared = []
    for _ in range(rounds):
        round_ms = {}
        for k in kinds:
            times = [_time_ms(fns[k]) for _ in range(per_round[k])]
            samples[k].extend(times)
            round_ms[k] = statistics.median(times)
        for k in kinds:
            ratios[k].append(round_ms["unfused"] / round_ms[k])
        gqa_over_shared.append(round_ms["absorbed_gqa"] / round_ms["absorbed"])
    info = machine_info()
    backend = _backend_name(fusion.sequence(tokens)[0].detach())
    rows = []
    for kind in kinds:
        t = sorted(samples[kind])
        q = statistics.quantiles(t, n=5) if len(t) >= 2 else [t[0]] * 4
        rows.append(
            {
                "step": kind,
                "shape": f"B={B} E={E} H={H} L=1+{lengths[0]}+{lengths[1]}",
                "backend": "torch" if kind == "unfused" else backend,
                "median_ms": statistics.median(t),
                "p20_ms": q[0],
                "p80_ms": q[3],
                "speedup": statistics.median(ratios[kind]),
                "speedup_min": min(ratios[kind]),
                "speedup_max": max(ratios[kind]),
                "runs": len(t),
                "loss_rel_err": errors[kind][0],
                "grad_rel_err": errors[kind][1],
                "threads": torch.get_num_threads(),
                "gqa_over_shared": statistics.median(gqa_over_shared),
                "gqa_over_shared_min": min(gqa_over_shared),
                "gqa_over_shared_max": max(gqa_over_shared),
                "date": info.get("date", datetime.date.today().isoformat()),
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"machine: {info.get('cpu')}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"command: python -m bench.fusion_bench {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    rows = run(quick=args.quick)
    print(f"{rows[0]['shape']}, float32, forward + backward, {rows[0]['date']}")
    print(
        f"{'step':<13} {'backend':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'speed-up':>9} "
        f"{'loss err':>9} {'grad err':>9}"
    )
    for r in rows:
        print(
            f"{r['step']:<13} {r['backend']:<10} {r['median_ms']:>10.2f} {r['p20_ms']:>9.2f} "
            f"{r['p80_ms']:>9.2f} {r['speedup']:>8.1f}x "
            f"{r['speedup_min']:>6.1f}..{r['speedup_max']:<5.1f} {r['loss_rel_err']:>9.1e} "
            f"{r['grad_rel_err']:>9.1e}"
        )
    r = rows[0]
    print(
        f"gqa / shared (absorbed_gqa time over absorbed time, per round): "
        f"{r['gqa_over_shared']:.3f} ({r['gqa_over_shared_min']:.3f}..{r['gqa_over_shared_max']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
