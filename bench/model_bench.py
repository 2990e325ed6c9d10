"""Whole models through the integrations, side by side with torch's SDPA: the forward, and the
forward + backward of training.

For each model, in one process on the same inputs and weights, called in turn round by round
after warm-up (a ratio is the median of the per-round ratios, which cancels load from other
processes better than a ratio of medians), eval mode (no dropout), float32; the forward without
grad, the training step as the forward and the backward of the output's sum into every parameter
(no optimizer step; gradients accumulate alike in both models). Two clocks: wall time
with 2 threads (what a user sees), and the process's CPU time with 1 thread (time spent waiting
for a core on a loaded machine is not counted, so it resolves a few per cent where the wall clock
cannot):
  * transformers ViT and BERT (with padding): ``attn_implementation="sdpa"`` vs the registered
    ``"rollingq"`` (rollingq_kernels.integrations.transformers);
  * a timm-style ViT (F.scaled_dot_product_attention in its blocks) without and inside
    ``rollingq_kernels.patch_sdpa()``.
Each row says where the attention calls ran: the fused kernel of this package or, for a call
no fused backend runs (e.g. a mask the CPU kernel declines), torch's SDPA through the drop-in.

    python -m bench.model_bench [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from bench.harness import format_table, machine_info, save_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2

# (name, config, batch, sequence) -- "base" sizes as deployed, "test" sizes as in the tests
SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "test": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
}  # fmt: skip


@contextlib.contextmanager
def _count_fallbacks(counter: Dict[str, int]):
    """Count the drop-in's calls and the ones it hands to torch's SDPA."""
    from rollingq_kernels import api

    real_torch, real_dropin = api._TORCH_SDPA, api.scaled_dot_product_attention

    def to_torch(*a, **k):
        counter["torch"] += 1
        return real_torch(*a, **k)

    api._TORCH_SDPA = to_torch
    try:
        yield
    finally:
        api._TORCH_SDPA = real_torch
        api.scaled_dot_product_attention = real_dropin


def _where(run: Callable[[], object], calls_per_forward: int) -> str:
    counter = {"torch": 0}
    with _count_fallbacks(counter):
        run()
    n = counter["torch"]
    if n == 0:
        return "fused kernel"
    if n >= calls_per_forward:
        return "torch SDPA (fallback)"
    return f"mixed ({n}/{calls_per_forward} to torch SDPA)"


def _hf_models(size: str, quick: bool):
    import transformers

    from rollingq_kernels.integrations import transformers as rq_hf

    transformers.logging.set_verbosity_error()
    name = rq_hf.register()
    cfg = SIZES[size]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    image = 224 if size == "base" else 16
    patch = 16 if size == "base" else 4
    vit = transformers.ViTModel(
        transformers.ViTConfig(image_size=image, patch_size=patch, **cfg), add_pooling_layer=False
    )
    B_vit = 2 if size == "base" else 8
    vit_in = {"pixel_values": torch.randn(B_vit, 3, image, image, generator=g)}
    bert = transformers.BertModel(
        transformers.BertConfig(vocab_size=1000, max_position_embeddings=512, **cfg),
        add_pooling_layer=False,
    )
    B_bert, L = (4, 128) if size == "base" else (8, 11)
    ids = torch.randint(0, 1000, (B_bert, L), generator=g)
    mask = torch.ones(B_bert, L, dtype=torch.long)
    mask[1, L * 3 // 4 :] = 0
    mask[2, L // 2 :] = 0
    rows = []
    for label, model, inputs, seq in (
        ("transformers ViT", vit, vit_in, (image // patch) ** 2 + 1),
        ("transformers BERT, padded", bert, {"input_ids": ids, "attention_mask": mask}, L),
        (
            "transformers BERT, no padding",
            bert,
            {"input_ids": ids, "attention_mask": torch.ones_like(mask)},
            L,
        ),
    ):
        sdpa = model.eval()
        sdpa.set_attn_implementation("sdpa")
        ours = copy.deepcopy(sdpa)
        ours.set_attn_implementation(name)
        B = next(iter(inputs.values())).shape[0]
        rows.append(
            dict(
                model=label, size=size, batch=B, seq=seq, layers=cfg["num_hidden_layers"],
                baseline=lambda m=sdpa, i=inputs: m(**i), ours=lambda m=ours, i=inputs: m(**i),
                calls=cfg["num_hidden_layers"], train=size == "test",
            )
        )  # fmt: skip
    return rows


def _timm_style(size: str):
    import rollingq_kernels as rk

    # the timm-style model of the tests (timm itself is not a dependency)
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from test_integrations_sdpa_models import TinyViT

    if size == "base":
        model = TinyViT(dim=768, depth=12, num_heads=12, patch=16, image=224)
        B, image = 2, 224
    else:
        model = TinyViT()
        B, image = 8, 16
    model.eval()
    img = torch.randn(B, 3, image, image, generator=torch.Generator().manual_seed(1))

    def patched():
        with rk.patch_sdpa():
            return model(img)

    seq = model.pos_embed.shape[1]
    return [
        dict(model="timm-style ViT (patch_sdpa)", size=size, batch=B, seq=seq,
             layers=len(model.blocks), baseline=lambda: model(img), ours=patched,
             calls=len(model.blocks), train=True)
    ]  # fmt: skip


def paired_times(
    base: Callable, ours: Callable, *, loops: int, warmup: int, reps: int, clock=time.perf_counter
):
    """Both functions called in turn, ``loops`` calls per sample, ``reps`` rounds after
    ``warmup``: (median ms per call of each, median of the per-round ratios ours / base, its
    20th and 80th percentiles). The per-round ratio pairs two samples taken a moment apart, so
    load from other processes cancels out far better than in a ratio of two medians."""
    for _ in range(warmup):
        base(), ours()
    tb, to = [], []
    for _ in range(reps):
        for fn, acc in ((base, tb), (ours, to)):
            t0 = clock()
            for _ in range(loops):
                fn()
            acc.append((clock() - t0) * 1e3 / loops)
    ratios = sorted(o / b for o, b in zip(to, tb))
    q = statistics.quantiles(ratios, n=5) if len(ratios) >= 2 else [ratios[0]] * 4
    return statistics.median(tb), statistics.median(to), statistics.median(ratios), q[0], q[3]


def run(quick: bool = False, reps: int = 0) -> List[dict]:
    torch.set_num_threads(THREADS)
    sizes = ["test"] if quick else ["test", "base"]
    out = []
    for size in sizes:
        try:
            cases = _hf_models(size, quick)
        except ModuleNotFoundError as exc:  # transformers is a dev dependency
            out.append({"model": "transformers", "note": f"skipped: {exc}"})
            cases = []
        cases += _timm_style(size)
        # test-size models take about a millisecond: time 20 forwards per sample
        loops = 20 if size == "test" else 1
        n = reps or (9 if quick else (15 if size == "test" else 7))
        for case in cases:
            with torch.no_grad():
                where = _where(case["ours"], case["calls"])
                diff = (
                    _tensor(case["ours"]()) - _tensor(case["baseline"]())
                ).abs().max().item()  # fmt: skip
                row = _timed(case["baseline"], case["ours"], loops=loops, reps=n)
            out.append(
                dict(
                    model=case["model"], size=size, mode="forward", batch=case["batch"],
                    seq=case["seq"], layers=case["layers"], **row, rounds=n,
                    attention_ran_on=where, max_abs_diff=diff,
                )
            )  # fmt: skip
            print(f"  measured {case['model']} ({size})", file=sys.stderr, flush=True)
            if case.get("train"):
                row = _timed(_step(case["baseline"]), _step(case["ours"]), loops=loops, reps=n)
                out.append(
                    dict(
                        model=case["model"], size=size, mode="forward + backward",
                        batch=case["batch"], seq=case["seq"], layers=case["layers"], **row,
                        rounds=n, attention_ran_on=where, max_abs_diff=None,
                    )
                )  # fmt: skip
                print(f"  measured {case['model']} ({size}), training", file=sys.stderr, flush=True)
    return out


def _step(forward: Callable) -> Callable:
    """The training step of a model's forward: the backward of its output's sum."""

    def step():
        _tensor(forward()).sum().backward()

    return step


def _timed(base: Callable, ours: Callable, *, loops: int, reps: int) -> dict:
    """Both clocks of paired_times: wall with THREADS threads (what a user sees; noisy under load)
    and the process's CPU time with one thread (robust to load: time spent waiting for a core is
    not counted)."""
    torch.set_num_threads(THREADS)
    wall = paired_times(base, ours, loops=loops, warmup=2, reps=reps)
    torch.set_num_threads(1)
    cpu = paired_times(base, ours, loops=loops, warmup=1, reps=reps, clock=time.process_time)
    torch.set_num_threads(THREADS)
    return dict(
        sdpa_ms=wall[0], rollingq_ms=wall[1], ratio=wall[2], p20_p80=f"{wall[3]:.2f}-{wall[4]:.2f}",
        sdpa_cpu_ms=cpu[0], rollingq_cpu_ms=cpu[1], cpu_ratio=cpu[2],
        cpu_p20_p80=f"{cpu[3]:.2f}-{cpu[4]:.2f}",
    )  # fmt: skip


def isa() -> str:
    """The vector extensions the CPU reports (what the kernels and oneDNN can use)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(w for w in wanted if w in flags) or "none of " + ", ".join(wanted)


def _tensor(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return result.last_hidden_state


COLUMNS = [
    ("model", "model", None),
    ("size", "size", None),
    ("mode", "mode", None),
    ("batch", "batch", None),
    ("seq", "seq", None),
    ("layers", "layers", None),
    ("SDPA ms (2 thr, wall)", "sdpa_ms", "{:.1f}"),
    ("rollingq / SDPA, wall", "ratio", "{:.3f}"),
    ("p20-p80", "p20_p80", None),
    ("SDPA CPU ms (1 thr)", "sdpa_cpu_ms", "{:.1f}"),
    ("rollingq / SDPA, CPU time", "cpu_ratio", "{:.3f}"),
    ("p20-p80 ", "cpu_p20_p80", None),
    ("rounds", "rounds", None),
    ("attention ran on", "attention_ran_on", None),
    ("max abs diff", "max_abs_diff", "{:.1e}"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the test-size models only")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds (default 9, quick 5)")
    args = ap.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cores']} cores, torch threads {THREADS}), ISA {isa()}")
    print(f"torch {info['torch']}, {info['date']}, load average {os.getloadavg()}")
    rows = run(quick=args.quick, reps=args.reps)
    print(format_table(rows, COLUMNS))
    path = save_rows("model_bench" + ("-quick" if args.quick else ""), rows)
    print(f"rows saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
