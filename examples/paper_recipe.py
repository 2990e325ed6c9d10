"""The official RollingQ training recipe, on synthetic audio/visual tokens (nothing downloaded).

Three runs from the same initialisation and the same data order:
  * baseline: no rotation;
  * paper:    RollingQ(recipe="paper"), the official code's decisions: the AIR of the last
              training batch of the epoch, the target from an end-of-epoch statistics pass (mean of
              per-batch means), the SVD rotation;
  * default:  RollingQ() with this package's defaults: the AIR and the target from every training
              batch of the epoch (pooled), the plane rotation, no extra pass.
(``--runs ... default_pass`` adds the default recipe with the end-of-epoch pass, which then gives
both the AIR and the target.)

The recipe is the official one: SGD (lr 1e-3, momentum 0.9, weight decay 1e-4), a cosine schedule
with linear warm-up (per step), batch 64, a class head on the fused [CLS] embedding and a linear
probe head per modality on the detached unimodal features, the fusion initialised as the official
code does (xavier_normal_ per projection, zero biases) with dropout 0.2 on the attention
probabilities and on the output. The rotation is decided at the end of every epoch (after the
statistics pass in paper mode) and applied from the next epoch on; with beta = 0 and one rotation
it fires at the end of the first epoch.

The data stand in for the two backbones' outputs. Every sample has a class; the audio tokens carry
a strong copy of a class prototype for ``--easy-frac`` of the samples (noise for the others), the
visual tokens a weak copy for every sample. Each backbone stand-in (a token-wise MLP) also emits its
own [CLS] token, which is a key of its modality, as the backbones' [CLS] tokens are in the official
model (513 audio and 589 visual keys at full size). Audio is learned first and the fused [CLS]
leans on it: the imbalance RollingQ is about.

    python examples/paper_recipe.py                       # E = 64, 12 epochs, about 3 minutes
    python examples/paper_recipe.py --full                # E = 768, 512 + 588 tokens, 30 epochs
    python examples/paper_recipe.py --plot docs/rollingq_paper_recipe.png

Per epoch it prints, for each run: the AIR and the rotation angle the controller found (its own
AIR: the last batch's in paper mode, the epoch's in default mode), the AIR and the [CLS] attention
mass of both modalities measured the same way for all runs (a statistics pass over the training
set at the end of the epoch, in eval mode), and the test accuracies (fused, the two probes, and
fused with the audio replaced by noise).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rollingq_kernels import RollingQ, RollingQFusion

RUNS = ("baseline", "paper", "default")
# also available: the default recipe with the end-of-epoch pass (it then gives the AIR and target)
CHOICES = (*RUNS, "default_pass")


# --- data --------------------------------------------------------------------------------------


def make_data(n: int, args, g: torch.Generator, protos) -> Dict[str, torch.Tensor]:
    """n samples: audio (n, La, d_in), visual (n, Lv, d_in), labels, and which samples have an
    informative audio track."""
    pa, pv = protos
    y = torch.randint(0, args.classes, (n,), generator=g)
    easy = torch.rand(n, generator=g) < args.easy_frac
    audio = torch.randn(n, args.audio_len, args.d_in, generator=g)
    audio += easy[:, None, None] * args.audio_snr * pa[y][:, None, :]
    visual = torch.randn(n, args.visual_len, args.d_in, generator=g)
    visual += args.visual_snr * pv[y][:, None, :]
    return {"audio": audio, "visual": visual, "y": y, "easy": easy}


def batches(data, batch: int, order: Optional[torch.Tensor] = None):
    n = data["y"].shape[0]
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch):
        idx = order[i : i + batch]
        yield {k: v[idx] for k, v in data.items()}


# --- model -------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Stand-in for a modality's encoder: token-wise MLP, plus its own [CLS] summarising them,
    and a final LayerNorm as a ViT has (so the features have a ViT's scale, about 1 per entry)."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(d_in, dim), nn.GELU(), nn.Linear(dim, dim))
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.cls_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        tokens = self.embed(x)  # (B, L, E)
        cls = self.cls_token + self.cls_proj(tokens.mean(1))  # (B, E)
        out = self.norm(torch.cat([cls[:, None], tokens], 1))
        return out, out[:, 0]  # the backbone's [CLS] is a key of its modality


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        E = args.dim
        self.audio = Backbone(args.d_in, E)
        self.visual = Backbone(args.d_in, E)
        self.fusion = RollingQFusion(E, 1, init="xavier_normal", dropout=args.dropout)
        self.head = nn.Linear(E, args.classes)
        # probes on detached unimodal features: they measure, they do not train the backbones
        self.probe_audio = nn.Linear(E, args.classes)
        self.probe_visual = nn.Linear(E, args.classes)

    def forward(self, audio, visual, need_stats=False):
        ta, ca = self.audio(audio)
        tv, cv = self.visual(visual)
        fused, stats = self.fusion([ta, tv], need_stats=need_stats)
        return (
            self.head(fused),
            self.probe_audio(ca.detach()),
            self.probe_visual(cv.detach()),
            stats,
        )


def warmup_cosine(opt, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- training ----------------------------------------------------------------------------------


@torch.no_grad()
def measure(model, data, batch: int) -> Dict[str, float]:
    """AIR and [CLS] mass per modality of the model as it is, over ``data`` (eval mode), with a
    throw-away controller, so every run is measured the same way."""
    was = model.training
    model.eval()
    rq = RollingQ(model.fusion, max_rotations=0)
    mass = torch.zeros(2)
    n = 0
    for b in batches(data, batch):
        stats = model(b["audio"], b["visual"], need_stats=True)[-1]
        rq.observe(stats, source="pass")
        mass += stats.attention.modality_mass[:, :, 0, :].mean(1).sum(0).float()
        n += b["y"].shape[0]
    report = rq.step(rotate=False)
    model.fusion.attn.air_history.pop()  # measuring is not an epoch of the controlled model
    model.train(was)
    return {"air": report.air, "mass_audio": float(mass[0] / n), "mass_visual": float(mass[1] / n)}


@torch.no_grad()
def evaluate(model, data, batch: int, g: torch.Generator) -> Dict[str, float]:
    model.eval()
    hits = {"acc": 0, "acc_audio_probe": 0, "acc_visual_probe": 0, "acc_audio_noised": 0}
    for b in batches(data, batch):
        logits, pa, pv, _ = model(b["audio"], b["visual"])
        noised = model(torch.randn(b["audio"].shape, generator=g), b["visual"])[0]
        y = b["y"]
        hits["acc"] += int((logits.argmax(-1) == y).sum())
        hits["acc_audio_probe"] += int((pa.argmax(-1) == y).sum())
        hits["acc_visual_probe"] += int((pv.argmax(-1) == y).sum())
        hits["acc_audio_noised"] += int((noised.argmax(-1) == y).sum())
    n = data["y"].shape[0]
    return {k: v / n for k, v in hits.items()}


def train(args, run: str, data, test, log=print) -> List[Dict[str, float]]:
    torch.manual_seed(args.seed)
    model = Model(args)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    n = data["y"].shape[0]
    steps_per_epoch = math.ceil(n / args.batch)
    sched = warmup_cosine(opt, args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch)
    rq = None
    if run == "paper":
        rq = RollingQ(model.fusion, recipe="paper", beta=args.beta, sigma=args.sigma)
    elif run in ("default", "default_pass"):
        rq = RollingQ(model.fusion, beta=args.beta, sigma=args.sigma)
    order_g = torch.Generator().manual_seed(args.seed + 1)
    noise_g = torch.Generator().manual_seed(args.seed + 2)
    # epoch 0: the initial model, measured like every epoch's end
    history = [
        {
            "epoch": 0,
            "lr": 0.0,
            "loss": float("nan"),
            "air_controller": float("nan"),
            "alpha": float("nan"),
            "rotated": False,
            "angle": 0.0,
            **measure(model, data, args.batch),
            **evaluate(model, test, args.batch, noise_g),
            "seconds": 0.0,
        }
    ]
    log(format_row(run, history[0]))
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total = 0.0
        for b in batches(data, args.batch, torch.randperm(n, generator=order_g)):
            logits, pa, pv, stats = model(b["audio"], b["visual"], need_stats=rq is not None)
            y = b["y"]
            loss = F.cross_entropy(logits, y)
            probe_loss = F.cross_entropy(pa, y) + F.cross_entropy(pv, y)
            opt.zero_grad()
            (loss + probe_loss).backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * y.shape[0]
            if rq is not None:
                rq.observe(stats)  # the forward's statistics: before this batch's step
        report = None
        if rq is not None:
            if run in ("paper", "default_pass"):  # the official end-of-epoch pass
                model.eval()
                rq.estimate(
                    batches(data, args.batch),
                    lambda b: model(b["audio"], b["visual"], need_stats=True),
                )
            report = rq.step(rotate=epoch >= args.rotate_from)
        row = {
            "epoch": epoch,
            "lr": sched.get_last_lr()[0],
            "loss": total / n,
            "air_controller": report.air if report is not None else float("nan"),
            "alpha": float(report.weights[0]) if report is not None else float("nan"),
            "rotated": bool(report.rotated) if report is not None else False,
            "angle": report.angle if report is not None else 0.0,
            **measure(model, data, args.batch),
            **evaluate(model, test, args.batch, noise_g),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log(format_row(run, row))
    return history


def format_row(run: str, r: Dict[str, float]) -> str:
    ctrl = "      -" if math.isnan(r["air_controller"]) else f"{r['air_controller']:+7.3f}"
    return (
        f"{run:<8} {r['epoch']:>3} {r['lr']:.2e} {r['loss']:6.3f} {ctrl} "
        f"{r['angle']:6.2f}{'*' if r['rotated'] else ' '} {r['air']:+7.3f} "
        f"{r['mass_audio']:6.3f} {r['mass_visual']:6.3f}  {r['acc']:.3f} "
        f"{r['acc_audio_probe']:.3f} {r['acc_visual_probe']:.3f} {r['acc_audio_noised']:.3f}"
    )


HEADER = (
    "run      ep  lr       loss   AIR(c)  angle    AIR    m_aud  m_vis   acc   "
    "p_aud p_vis acc(aud noise)\n"
    "         (AIR(c): the controller's own; angle in degrees, * = rotated at this epoch's end;\n"
    "          AIR, m_aud, m_vis: a pass over the training set in eval mode after the epoch's\n"
    "          rotation; accuracies on the test set; epoch 0: the initial model)"
)


# --- entry point -------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="E=768, 512+588 tokens, 30 epochs")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=CHOICES)
    ap.add_argument("--epochs", type=int, default=None, help="default 12 (30 with --full)")
    ap.add_argument("--dim", type=int, default=None, help="E; default 64 (768 with --full)")
    ap.add_argument("--audio-len", type=int, default=None, help="default 32 (512 with --full)")
    ap.add_argument("--visual-len", type=int, default=None, help="default 36 (588 with --full)")
    ap.add_argument("--d-in", type=int, default=32)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--train", type=int, default=6400)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--sigma", type=float, default=0.0)
    ap.add_argument("--rotate-from", type=int, default=1, help="first epoch whose end may rotate")
    ap.add_argument("--easy-frac", type=float, default=0.7)
    ap.add_argument("--audio-snr", type=float, default=3.0)
    ap.add_argument("--visual-snr", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=str, default=None, help="write the plot (PNG) here")
    ap.add_argument("--json", type=str, default=None, help="write the histories here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    full = {"epochs": 30, "dim": 768, "audio_len": 512, "visual_len": 588}
    small = {"epochs": 12, "dim": 64, "audio_len": 32, "visual_len": 36}
    for k, v in (full if args.full else small).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def run_all(args, log=print) -> Dict[str, List[Dict[str, float]]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1000 + args.seed)
    protos = tuple(
        F.normalize(torch.randn(args.classes, args.d_in, generator=g), dim=-1) * 2.0
        for _ in range(2)
    )
    data = make_data(args.train, args, g, protos)
    test = make_data(args.test, args, g, protos)
    log(
        f"E={args.dim}, audio {args.audio_len}+1 keys, visual {args.visual_len}+1 keys, "
        f"{args.train} training samples, batch {args.batch}, {args.epochs} epochs, "
        f"SGD lr {args.lr} momentum {args.momentum} wd {args.weight_decay}, "
        f"warm-up {args.warmup_epochs} epoch(s) + cosine, dropout {args.dropout}, "
        f"beta {args.beta}, sigma {args.sigma}"
    )
    log(HEADER)
    return {run: train(args, run, data, test, log) for run in args.runs}


def plot(histories: Dict[str, List[Dict[str, float]]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "baseline": "tab:gray",
        "paper": "tab:orange",
        "default": "tab:blue",
        "default_pass": "tab:green",
    }
    fig, (ax_air, ax_mass) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90)
    for run, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        c = colors.get(run)
        ax_air.plot(ep, [r["air"] for r in hist], color=c, marker="o", ms=3, label=run)
        ax_mass.plot(ep, [r["mass_audio"] for r in hist], color=c, marker="o", ms=3,
                     label=f"{run}: audio")  # fmt: skip
        ax_mass.plot(ep, [r["mass_visual"] for r in hist], color=c, ls="--", marker="s", ms=3,
                     label=f"{run}: visual")  # fmt: skip
        for r in hist:
            if r["rotated"]:
                for ax in (ax_air, ax_mass):
                    ax.axvline(r["epoch"], color=c, ls=":", lw=1)
    ax_air.axhline(0.0, color="black", lw=0.5)
    ax_air.set_title("AIR (end-of-epoch pass; > 0: audio favoured)", fontsize=9)
    ax_mass.set_title("[CLS] attention mass per modality", fontsize=9)
    for ax in (ax_air, ax_mass):
        ax.set_xlabel("epoch (dotted: a rotation at the end of that epoch)", fontsize=8)
        ax.tick_params(labelsize=8)
    ax_air.legend(fontsize=7)
    ax_mass.legend(fontsize=6, ncol=3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    histories = run_all(args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": histories}, indent=1))
    if args.plot:
        plot(histories, args.plot, f"E={args.dim}, {args.epochs} epochs, seed {args.seed}")
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
