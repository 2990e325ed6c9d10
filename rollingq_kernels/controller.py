"""The RollingQ controller: statistics over an epoch, the AIR, and the query rotation.

Usage, with the statistics the fused kernel computes during ordinary training steps::

    fusion = RollingQFusion(768)
    rq = RollingQ(fusion)                      # beta=0, sigma=0, one rotation; our estimators
    for epoch in range(epochs):
        for batch in loader:
            fused, stats = fusion(tokens, need_stats=True)
            ...loss.backward(); opt.step()
            rq.observe(stats)                  # a few (M, E) sums; no extra pass, no sync
        report = rq.step()                     # AIR; rotates the [CLS] query when it should

``RollingQ(fusion, recipe="paper")`` makes the decisions of the official RollingQ code instead:
the AIR of the last training batch of the epoch, the target from an end-of-epoch statistics pass
(:meth:`RollingQ.estimate`) with mean keys taken as the mean of per-batch means, and the SVD
rotation. docs/rollingq.md lists every difference and why the default differs.

The maths (docs/design.md section 5) is in rollingq_math.py: :func:`modality_cosine`,
:func:`attention_imbalance_rate`, :func:`rollingq_weights`, :func:`rollingq_target`,
:func:`rotation_between` and :func:`compose_rotations`. Under ``torch.distributed`` the sums and
counts are all-reduced in ``step()``, so every rank computes the same rotation.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ._stats import AttentionStats
from .mha import RollingQAttention, RollingQStats
from .rollingq_math import (
    attention_imbalance_rate,
    compose_rotations,
    modality_cosine,
    rollingq_target,
    rollingq_weights,
    rotation_between,
)

__all__ = ["RollingQ", "RollingQReport", "RECIPES"]

#: The settings each ``recipe`` stands for; explicit arguments override them.
RECIPES: Dict[str, Dict[str, str]] = {
    # ours: every observed sample counts, pooled means, the rotation that only turns span(q, t)
    "default": {
        "air_source": "epoch",
        "target_source": "epoch",
        "key_mean": "pooled",
        "method": "plane",
    },
    # the official RollingQ code's decisions
    "paper": {
        "air_source": "last_batch",
        "target_source": "pass",
        "key_mean": "batch_mean",
        "method": "svd",
    },
}

_CHOICES = {
    "air_source": ("epoch", "last_batch", "pass"),
    "target_source": ("epoch", "pass"),
    "key_mean": ("pooled", "batch_mean"),
    "method": ("plane", "svd"),
}


class RollingQReport(NamedTuple):
    """What one :meth:`RollingQ.step` found and did.

    air: the attention imbalance rate, mean over samples of c_0 - c_1 (two modalities); for
        M > 2 the spread max_m c_m - min_m c_m of the mean cosines. Taken over the samples that
        ``air_source`` names.
    cosines: (M,) float64, mean over those samples of cos([CLS] query, mean key of modality m).
    modality_mass: (M,) float64, mean attention mass of the [CLS] row on each modality
        (averaged over heads), over the same samples.
    weights: (M,) float64, the weights of the modalities' key directions in the target
        (alpha and 1 - alpha for two modalities).
    rotated: whether R was updated. angle: the angle of that update in degrees (0 if none).
    num_rotations: rotations applied so far, this one included. num_samples: the samples the AIR
        was taken over.
    target: (E,) float64, the direction the mean [CLS] query was rotated onto (scaled to the mean
        query's norm); None when no rotation fired.
    """

    air: float
    cosines: torch.Tensor
    modality_mass: torch.Tensor
    weights: torch.Tensor
    rotated: bool
    angle: float
    num_rotations: int
    num_samples: int
    target: Optional[torch.Tensor] = None


def _find_attention(module: nn.Module) -> RollingQAttention:
    if isinstance(module, RollingQAttention):
        return module
    found = [m for m in module.modules() if isinstance(m, RollingQAttention)]
    if len(found) != 1:
        raise ValueError(
            f"RollingQ needs a module holding exactly one RollingQAttention; {type(module).__name__}"
            f" holds {len(found)}: pass the one to control"
        )
    return found[0]


# The statistics are kept in three blocks of one flat float64 vector (so that a distributed
# step is a single all-reduce): the training batches observed this epoch, the batches of an
# explicit statistics pass, and the last training batch alone.
_BLOCKS = ("train", "pass", "last")


class RollingQ:
    """Controls the [CLS] query rotation of one :class:`RollingQAttention` (or of the one inside
    a :class:`RollingQFusion` or any model holding exactly one).

    Args:
        module: the attention module, or a model that holds exactly one.
        num_modalities: M, the size of the accumulators (fixed so that every rank all-reduces
            tensors of the same shape, whether or not it has seen data).
        beta: the rotation fires when |AIR| > beta (paper: 0).
        sigma: sharpness of the weights, alpha = (1 + tanh(-sigma AIR)) / 2 (paper: 0, i.e. 1/2).
        max_rotations: at most this many rotations over training (paper: 1). The count lives in
            the module's ``num_rotations`` buffer, so it survives checkpoints.
        recipe: "default" (ours) or "paper" (the official code's decisions): the values of the
            four options below that are not given explicitly (see :data:`RECIPES`).
        air_source: which samples the AIR, the cosines and so alpha come from.
            "epoch": every sample of the epoch's statistics -- the :meth:`estimate` pass when one
            was run this epoch, else every training batch given to :meth:`observe`;
            "last_batch": the last training batch given to :meth:`observe` (its forward, before
            its optimizer step), as the official code does; "pass": the :meth:`estimate` pass.
        target_source: which samples the mean keys and the mean [CLS] query (the target and the
            rotation) come from: "epoch" (as above) or "pass" (the :meth:`estimate` pass; the
            official code's end-of-epoch pass).
        key_mean: how the mean key of a modality (and the mean query) is estimated: "pooled",
            total sum / total count over every sample; "batch_mean", the mean over batches of
            each batch's mean, as the official code does (equal to "pooled" for equal batches;
            a short last batch weighs as much as a full one).
        method: the rotation construction, "plane" (rotates only within span(query, target)) or
            "svd" (the paper's; see :func:`rotation_between`).
        process_group: the group to all-reduce over; None = the default group.
        distributed: None = all-reduce when torch.distributed is initialised; False = never.

    Every composition R <- R_new R is re-orthonormalised (:func:`compose_rotations`), so R stays
    orthogonal to rounding however many rotations are applied. The rotation, the rotation count
    and the AIR history live in the module's ``state_dict``; the running sums of the current
    epoch are in :meth:`state_dict` of this object.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        num_modalities: int = 2,
        beta: float = 0.0,
        sigma: float = 0.0,
        max_rotations: int = 1,
        recipe: str = "default",
        air_source: Optional[str] = None,
        target_source: Optional[str] = None,
        key_mean: Optional[str] = None,
        method: Optional[str] = None,
        process_group: Optional[Any] = None,
        distributed: Optional[bool] = None,
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}; got {recipe!r}")
        options = dict(RECIPES[recipe])
        given = {
            "air_source": air_source,
            "target_source": target_source,
            "key_mean": key_mean,
            "method": method,
        }
        for name, value in given.items():
            if value is not None:
                if value not in _CHOICES[name]:
                    raise ValueError(f"{name} must be one of {list(_CHOICES[name])}; got {value!r}")
                options[name] = value
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1; got {num_modalities}")
        if beta < 0 or max_rotations < 0:
            raise ValueError(f"beta and max_rotations must be >= 0; got {beta}, {max_rotations}")
        self.attention = _find_attention(module)
        self.num_modalities = num_modalities
        self.beta = float(beta)
        self.sigma = float(sigma)
        self.max_rotations = int(max_rotations)
        self.recipe = recipe
        self.air_source: str = options["air_source"]
        self.target_source: str = options["target_source"]
        self.key_mean: str = options["key_mean"]
        self.method: str = options["method"]
        self.process_group = process_group
        self.distributed = distributed
        self.reset()

    def __repr__(self) -> str:
        return (
            f"RollingQ(recipe={self.recipe!r}, air_source={self.air_source!r}, "
            f"target_source={self.target_source!r}, key_mean={self.key_mean!r}, "
            f"method={self.method!r}, beta={self.beta}, sigma={self.sigma}, "
            f"max_rotations={self.max_rotations})"
        )

    # --- accumulation ------------------------------------------------------------------------

    def _layout(self):
        M, E = self.num_modalities, self.attention.embed_dim
        return (
            ("key_sum", (M, E)),  # pooled: sums over every sample
            ("key_count", (M,)),
            ("query_sum", (E,)),
            ("cos_sum", (M,)),
            ("mass_sum", (M,)),
            ("num_queries", ()),
            ("num_cos", ()),
            ("key_batch_mean_sum", (M, E)),  # batch_mean: sums of each batch's mean
            ("key_batches", (M,)),
            ("query_batch_mean_sum", (E,)),
            ("query_batches", ()),
        )

    def _block_size(self) -> int:
        return sum(math.prod(shape) for _, shape in self._layout())

    def reset(self) -> None:
        """Forget every statistic of the current epoch (training batches and pass)."""
        dev = self.attention.rotation.device
        self._sums = torch.zeros(len(_BLOCKS) * self._block_size(), dtype=torch.float64, device=dev)

    def _views(self, sums: torch.Tensor, block: str) -> Dict[str, torch.Tensor]:
        n = self._block_size()
        flat = sums[_BLOCKS.index(block) * n : (_BLOCKS.index(block) + 1) * n]
        out, start = {}, 0
        for name, shape in self._layout():
            size = math.prod(shape)
            out[name] = flat[start : start + size].view(shape)
            start += size
        return out

    @torch.no_grad()
    def observe(
        self,
        stats: Union[RollingQStats, AttentionStats],
        query: Optional[torch.Tensor] = None,
        *,
        row: int = 0,
        source: str = "train",
    ) -> None:
        """Add one batch's statistics to the epoch's sums. No extra pass, no device sync.

        Args:
            stats: the :class:`RollingQStats` a RollingQ module returned (its query is used), or
                the kernel's :class:`AttentionStats` together with ``query``.
            query: with AttentionStats: the queries as the kernel saw them (rotated), either
                (B, E) for the [CLS] row or (B, H, Lq, D), of which row ``row`` is used.
            row: the [CLS] row in ``stats.modality_mass`` (and in a (B, H, Lq, D) ``query``).
            source: "train" (a training batch; it also becomes the last batch) or "pass" (a
                batch of an explicit statistics pass; :meth:`estimate` does this for you).
        """
        if source not in ("train", "pass"):
            raise ValueError(f"source must be 'train' or 'pass'; got {source!r}")
        if isinstance(stats, RollingQStats):
            att, q, row = stats.attention, stats.query, stats.query_row
        else:
            if query is None:
                raise ValueError("observe(AttentionStats) needs the query the kernel saw")
            att, q = stats, query
            if q.dim() == 4:
                q = q[:, :, row].reshape(q.shape[0], -1)  # (B, H*D), heads concatenated
        B, H, M, D = att.key_sum.shape
        E = H * D
        if M != self.num_modalities or E != self.attention.embed_dim:
            raise ValueError(
                f"stats have M={M} modalities and E={E} features; this controller was built for "
                f"M={self.num_modalities}, E={self.attention.embed_dim}"
            )
        if q.dim() != 2 or tuple(q.shape) != (B, E):
            raise ValueError(f"query must have shape ({B}, {E}); got {tuple(q.shape)}")
        if B == 0:
            return
        q = q.detach().to(device=self._sums.device, dtype=torch.float64)
        qh = q.view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        att64 = AttentionStats(*(t.detach().to(self._sums.device, torch.float64) for t in att))
        cos = modality_cosine(qh, att64)[:, 0]  # (B, M)
        # a sample missing a modality has no cosine for it: left out of the AIR
        valid = (att64.key_count > 0).all(dim=-1)
        key_sum = att64.key_sum.permute(0, 2, 1, 3).reshape(B, M, E).sum(0)
        key_count = att64.key_count.sum(0)
        present = key_count > 0
        batch = {
            "key_sum": key_sum,
            "key_count": key_count,
            "query_sum": q.sum(0),
            "cos_sum": (cos * valid[:, None]).sum(0),
            "mass_sum": att64.modality_mass[:, :, row, :].mean(1).sum(0),
            "num_queries": B,
            "num_cos": valid.sum(),
            # this batch's mean key of each modality it has keys of, and its mean query
            "key_batch_mean_sum": key_sum / key_count.clamp_min(1.0)[:, None],
            "key_batches": present.to(torch.float64),
            "query_batch_mean_sum": q.mean(0),
            "query_batches": 1,
        }
        if source == "train":
            last = self._views(self._sums, "last")
            for name, value in batch.items():
                last[name].fill_(0).add_(value)
        block = self._views(self._sums, source)
        for name, value in batch.items():
            block[name] += value

    def estimate(
        self,
        loader: Iterable[Any],
        forward: Callable[[Any], Any],
    ) -> None:
        """An explicit statistics pass over ``loader``, as the official code runs at the end of
        each epoch: its statistics replace those of any earlier pass of this epoch, and are what
        ``air_source="pass"``, ``target_source="pass"`` (and "epoch") use. The training batches'
        statistics, the last one's included, are kept.

        ``forward(batch)`` must run the model with ``need_stats=True`` and return the module's
        :class:`RollingQStats` (or a tuple whose last element is). Runs under ``no_grad``; put
        the model in the mode the pass should see (the official pass runs in eval mode).
        """
        p = self._views(self._sums, "pass")
        for t in p.values():
            t.zero_()
        with torch.no_grad():
            for batch in loader:
                result = forward(batch)
                stats = result if isinstance(result, RollingQStats) else result[-1]
                self.observe(stats, source="pass")

    # --- the update --------------------------------------------------------------------------

    def _reduced_sums(self) -> torch.Tensor:
        sums = self._sums.clone()
        use = self.distributed
        if use is None:
            use = dist.is_available() and dist.is_initialized()
        if use:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
        return sums

    def _source(self, sums: torch.Tensor, source: str, what: str) -> Dict[str, torch.Tensor]:
        have_pass = float(self._views(sums, "pass")["num_queries"]) > 0
        block = {"epoch": "pass" if have_pass else "train", "last_batch": "last"}.get(
            source, source
        )
        v = self._views(sums, block)
        if float(v["num_queries"]) == 0:
            hint = {
                "pass": "run estimate() (or observe(..., source='pass')) before step()",
                "last": "observe() the training batches' statistics before step()",
                "train": "call observe() with the stats of need_stats=True forwards (or "
                "estimate()) first",
            }[block]
            raise RuntimeError(
                f"RollingQ.step() found no statistics for the {what} ({what}_source="
                f"{source!r}): {hint}"
            )
        return v

    @torch.no_grad()
    def step(self, *, rotate: bool = True) -> RollingQReport:
        """End of epoch: compute the AIR and, if it calls for one, rotate the [CLS] query.

        The rotation fires when ``rotate`` and |AIR| > beta and fewer than ``max_rotations``
        rotations were applied: weights w = softmax(-2 sigma c) (alpha and 1 - alpha for two
        modalities), target = sum_m w_m normalize(mean key_m) scaled to |mean query|,
        R_new = rotation taking the mean [CLS] query onto the target, R <- R_new R
        (re-orthonormalised). The AIR comes from ``air_source``, the mean keys and query from
        ``target_source`` (estimated as ``key_mean`` says). The AIR is appended to the module's
        history and every sum is reset. Under torch.distributed this is a collective: every rank
        must call it.
        """
        sums = self._reduced_sums()
        a = self._source(sums, self.air_source, "air")
        n_cos = int(a["num_cos"].item())
        n_q = int(a["num_queries"].item())
        if n_cos == 0:
            raise RuntimeError(
                "RollingQ.step() found no statistics with every modality present: the AIR needs "
                "samples that have keys of every modality"
            )
        cosines = a["cos_sum"] / n_cos
        mass = a["mass_sum"] / n_q
        M = self.num_modalities
        if M == 2:
            air = float(attention_imbalance_rate(cosines))
        else:
            air = float(cosines.max() - cosines.min())
        weights = rollingq_weights(cosines, self.sigma)
        att = self.attention
        done = int(att.num_rotations.item())
        fire = rotate and M >= 2 and abs(air) > self.beta and done < self.max_rotations
        angle = 0.0
        target = None
        if fire:
            t = self._source(sums, self.target_source, "target")
            if self.key_mean == "pooled":
                key_means = t["key_sum"] / t["key_count"].clamp_min(1.0)[:, None]
                query_mean = t["query_sum"] / t["num_queries"]
            else:
                key_means = t["key_batch_mean_sum"] / t["key_batches"].clamp_min(1.0)[:, None]
                query_mean = t["query_batch_mean_sum"] / t["query_batches"]
            target = rollingq_target(query_mean, key_means, weights)
            r_new = rotation_between(query_mean, target, method=self.method)
            cos_angle = torch.dot(query_mean, target) / (query_mean.norm() * target.norm())
            angle = math.degrees(math.acos(max(-1.0, min(1.0, float(cos_angle)))))
            att.rotation.copy_(compose_rotations(r_new, att.rotation))
            att.num_rotations += 1
            target = target.cpu()
        att.air_history.append(air)
        self.reset()
        return RollingQReport(
            air=air,
            cosines=cosines.cpu(),
            modality_mass=mass.cpu(),
            weights=weights.cpu(),
            rotated=fire,
            angle=angle,
            num_rotations=int(att.num_rotations.item()),
            num_samples=n_q,
            target=target,
        )

    # --- checkpointing of the running sums ---------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The running sums of the current epoch (the rotation itself is in the module)."""
        return {"sums": self._sums.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        sums = state["sums"]
        if sums.shape != self._sums.shape:
            raise ValueError(
                f"sums of shape {tuple(sums.shape)} do not fit this controller's {tuple(self._sums.shape)}"
            )
        self._sums.copy_(sums)
