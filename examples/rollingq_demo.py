"""RollingQ on a synthetic two-modality task: train with and without it, compare.

The task (C classes, two token sequences per sample):
  * modality 0 ("easy"): for a fraction ``--easy-frac`` of the samples its tokens carry a strong
    copy of the class prototype; for the others they are pure noise.
  * modality 1 ("hard"): every sample's tokens carry a weak copy of its class prototype, so the
    class is only visible when the [CLS] attends to many of its tokens at once.
The easy modality is learned first; once the [CLS] attention leans on it, the hard modality gets
little attention and so little gradient. The samples whose easy tokens are noise can only be
solved by the hard modality, and so can every sample when the easy modality is replaced by noise
at test time (the paper's test of dynamic adaptability).

Model: a token-wise MLP encoder per modality (with a modality embedding), RollingQFusion
(one head, the [CLS] row only), a linear classifier. The same initialisation and data order are
used with and without RollingQ. The controller collects statistics during the ordinary training
steps (no extra pass), and may rotate the [CLS] query at the end of an epoch from
``--rotate-from`` on (paper defaults: beta = 0, sigma = 0, one rotation).

    python examples/rollingq_demo.py            # about a minute on two CPU cores
    python examples/rollingq_demo.py --seeds 0 1 2 --plot bench/results/rollingq_demo.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from rollingq_kernels import RollingQ, RollingQFusion


def make_data(n: int, args, g: torch.Generator, protos) -> Dict[str, torch.Tensor]:
    proto0, proto1 = protos
    y = torch.randint(0, args.classes, (n,), generator=g)
    easy = torch.rand(n, generator=g) < args.easy_frac
    x0 = torch.randn(n, args.len0, args.d_in, generator=g)
    x0 = x0 + easy[:, None, None] * args.easy_snr * proto0[y][:, None, :]
    x1 = torch.randn(n, args.len1, args.d_in, generator=g) + args.hard_snr * proto1[y][:, None, :]
    return {"x0": x0, "x1": x1, "y": y, "easy": easy}


class Model(nn.Module):
    def __init__(self, d_in: int, dim: int, classes: int):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in range(2)
        )
        self.modality_embedding = nn.Parameter(torch.randn(2, dim) * 0.5)
        self.fusion = RollingQFusion(dim, 1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x0, x1, need_stats=False):
        tokens = [enc(x) + e for enc, x, e in zip(self.encoders, (x0, x1), self.modality_embedding)]
        fused, stats = self.fusion(tokens, need_stats=need_stats)
        return self.head(fused), stats


@torch.no_grad()
def evaluate(model, data, *, noise_easy: bool = False, g=None) -> Dict[str, float]:
    x0 = torch.randn(data["x0"].shape, generator=g) if noise_easy else data["x0"]
    logits, stats = model(x0, data["x1"], need_stats=True)
    correct = (logits.argmax(-1) == data["y"]).float()
    mass = stats.attention.modality_mass[:, :, 0, :].mean((0, 1))
    return {
        "acc": correct.mean().item(),
        "acc_hard_only": correct[~data["easy"]].mean().item(),
        "mass0": mass[0].item(),
        "mass1": mass[1].item(),
    }


def train(args, data, test, use_rollingq: bool, seed: int) -> List[Dict[str, float]]:
    torch.manual_seed(seed)
    model = Model(args.d_in, args.dim, args.classes)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rq = RollingQ(model.fusion, beta=args.beta, sigma=args.sigma) if use_rollingq else None
    n = data["y"].shape[0]
    order_g = torch.Generator().manual_seed(seed + 1)
    noise_g = torch.Generator().manual_seed(seed + 2)
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=order_g)
        mass = torch.zeros(2)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            logits, stats = model(data["x0"][idx], data["x1"][idx], need_stats=True)
            loss = F.cross_entropy(logits, data["y"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mass += stats.attention.modality_mass[:, :, 0, :].mean(1).sum(0)
            if rq is not None:
                rq.observe(stats)
        report = rq.step(rotate=epoch + 1 >= args.rotate_from) if rq is not None else None
        model.eval()
        ev = evaluate(model, test)
        noisy = evaluate(model, test, noise_easy=True, g=noise_g)
        row = {
            "epoch": epoch + 1,
            "air": model_air(model, data),
            "air_observed": report.air if report is not None else float("nan"),
            "train_mass0": (mass[0] / n).item(),
            "train_mass1": (mass[1] / n).item(),
            "acc": ev["acc"],
            "acc_hard_only": ev["acc_hard_only"],
            "acc_easy_noised": noisy["acc"],
            "rotated": bool(report.rotated) if report is not None else False,
        }
        history.append(row)
    return history


@torch.no_grad()
def model_air(model, data, batch: int = 1000) -> float:
    """The AIR of the model as it is at the end of an epoch, from a statistics pass over the
    training set; measured the same way for both runs (the controller's own AIR is accumulated
    during the epoch, while the model changes)."""
    rq = RollingQ(model.fusion, max_rotations=0)
    for i in range(0, data["y"].shape[0], batch):
        _, stats = model(data["x0"][i : i + batch], data["x1"][i : i + batch], need_stats=True)
        rq.observe(stats)
    report = rq.step(rotate=False)
    model.fusion.attn.air_history.pop()  # measuring is not an epoch of the controlled model
    return report.air


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rotate-from", type=int, default=2, help="first epoch whose end may rotate")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--sigma", type=float, default=0.0)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--d-in", type=int, default=16)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--len0", type=int, default=8)
    ap.add_argument("--len1", type=int, default=16)
    ap.add_argument("--easy-frac", type=float, default=0.8)
    ap.add_argument("--easy-snr", type=float, default=2.0)
    ap.add_argument("--hard-snr", type=float, default=0.25)
    ap.add_argument("--plot", type=str, default="bench/results/rollingq_demo.png")
    # the tensors are tiny: more threads only add synchronisation (and contention on a shared box)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    runs: Dict[str, List[List[Dict[str, float]]]] = {"baseline": [], "rollingq": []}
    for seed in args.seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        protos = (
            F.normalize(torch.randn(args.classes, args.d_in, generator=g), dim=-1) * 2.0,
            F.normalize(torch.randn(args.classes, args.d_in, generator=g), dim=-1) * 2.0,
        )
        data = make_data(args.train, args, g, protos)
        test = make_data(args.test, args, g, protos)
        for name, use in (("baseline", False), ("rollingq", True)):
            hist = train(args, data, test, use, seed)
            runs[name].append(hist)
            print(f"\nseed {seed}, {name}")
            print(
                "epoch    AIR  mass m0  mass m1   acc  acc(m0 noise-only samples)  acc(m0 replaced by noise)"
            )
            for r in hist:
                print(
                    f"{r['epoch']:>5} {r['air']:+.3f}   {r['train_mass0']:.3f}    {r['train_mass1']:.3f}  "
                    f"{r['acc']:.3f}  {r['acc_hard_only']:>26.3f}  {r['acc_easy_noised']:>25.3f}"
                    + ("   <- rotated" if r["rotated"] else "")
                )
    print(
        f"\nmean over seeds {args.seeds} (AIR from an end-of-epoch pass; mass = train [CLS] mass)"
    )
    print("        ---------- baseline ----------------   ---------- RollingQ ----------------")
    print("epoch    AIR  mass m0   acc  acc(m0 noise)     AIR  mass m0   acc  acc(m0 noise)")
    for e in range(args.epochs):
        cells = []
        for name in ("baseline", "rollingq"):
            rows = [h[e] for h in runs[name]]

            def mean(key, rows=rows):
                return sum(r[key] for r in rows) / len(rows)

            cells.append(
                f"{mean('air'):+.3f}   {mean('train_mass0'):.3f}  {mean('acc'):.3f}  "
                f"{mean('acc_easy_noised'):13.3f}"
            )
        print(f"{e + 1:>5} {cells[0]}   {cells[1]}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if args.plot:
        plot(runs, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("air", "AIR (c_m0 - c_m1)"),
        ("train_mass0", "[CLS] attention mass on m0 (easy)"),
        ("acc", "test accuracy"),
        ("acc_easy_noised", "test accuracy, m0 replaced by noise"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.2), dpi=80)
    colors = {"baseline": "tab:gray", "rollingq": "tab:blue"}
    for ax, (key, title) in zip(axes, panels):
        for name, hists in runs.items():
            for i, h in enumerate(hists):
                ax.plot(
                    [r["epoch"] for r in h],
                    [r[key] for r in h],
                    color=colors[name],
                    alpha=0.8,
                    label=name if i == 0 else None,
                )
                for r in h:
                    if r["rotated"]:
                        ax.axvline(r["epoch"], color=colors[name], ls=":", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
