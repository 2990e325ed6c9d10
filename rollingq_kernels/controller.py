"""The RollingQ controller: statistics over an epoch, the AIR, and the query rotation.

Usage, with the statistics the fused kernel computes during ordinary training steps::

    fusion = RollingQFusion(768)
    rq = RollingQ(fusion)                      # paper defaults: beta=0, sigma=0, one rotation
    for epoch in range(epochs):
        for batch in loader:
            fused, stats = fusion(tokens, need_stats=True)
            ...loss.backward(); opt.step()
            rq.observe(stats)                  # a few (M, E) sums; no extra pass, no sync
        report = rq.step()                     # AIR; rotates the [CLS] query when it should

The maths (docs/design.md section 5) is in rollingq_math.py: :func:`modality_cosine`,
:func:`attention_imbalance_rate`, :func:`rollingq_weights`, :func:`rollingq_target` and
:func:`rotation_between`. Under ``torch.distributed`` the sums and counts are all-reduced in
``step()``, so every rank computes the same rotation.
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
    modality_cosine,
    rollingq_target,
    rollingq_weights,
    rotation_between,
)

__all__ = ["RollingQ", "RollingQReport"]


class RollingQReport(NamedTuple):
    """What one :meth:`RollingQ.step` found and did.

    air: the attention imbalance rate, mean over samples of c_0 - c_1 (two modalities); for
        M > 2 the spread max_m c_m - min_m c_m of the mean cosines.
    cosines: (M,) float64, mean over samples of cos([CLS] query, mean key of modality m).
    modality_mass: (M,) float64, mean attention mass of the [CLS] row on each modality
        (averaged over heads).
    weights: (M,) float64, the weights of the modalities' key directions in the target.
    rotated: whether R was updated. angle: the angle of that update in degrees (0 if none).
    num_rotations: rotations applied so far, this one included. num_samples: samples seen.
    """

    air: float
    cosines: torch.Tensor
    modality_mass: torch.Tensor
    weights: torch.Tensor
    rotated: bool
    angle: float
    num_rotations: int
    num_samples: int


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
        method: "plane" (rotate only within span(query, target)) or "svd" (the paper's).
        process_group: the group to all-reduce over; None = the default group.
        distributed: None = all-reduce when torch.distributed is initialised; False = never.

    The rotation, the rotation count and the AIR history live in the module's ``state_dict``;
    the running sums of the current epoch are in :meth:`state_dict` of this object.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        num_modalities: int = 2,
        beta: float = 0.0,
        sigma: float = 0.0,
        max_rotations: int = 1,
        method: str = "plane",
        process_group: Optional[Any] = None,
        distributed: Optional[bool] = None,
    ) -> None:
        if method not in ("plane", "svd"):
            raise ValueError(f"method must be 'plane' or 'svd'; got {method!r}")
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1; got {num_modalities}")
        if beta < 0 or max_rotations < 0:
            raise ValueError(f"beta and max_rotations must be >= 0; got {beta}, {max_rotations}")
        self.attention = _find_attention(module)
        self.num_modalities = num_modalities
        self.beta = float(beta)
        self.sigma = float(sigma)
        self.max_rotations = int(max_rotations)
        self.method = method
        self.process_group = process_group
        self.distributed = distributed
        self.reset()

    # --- accumulation ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the sums of the current epoch."""
        M, E = self.num_modalities, self.attention.embed_dim
        dev = self.attention.rotation.device
        # One flat float64 vector, so that a distributed step is a single all-reduce.
        # Layout: key_sum (M*E) | key_count (M) | query_sum (E) | cos_sum (M) | mass_sum (M) |
        #         num_queries | num_cos
        self._sums = torch.zeros(M * E + M + E + M + M + 2, dtype=torch.float64, device=dev)

    def _views(self, sums: torch.Tensor) -> Dict[str, torch.Tensor]:
        M, E = self.num_modalities, self.attention.embed_dim
        names = (
            ("key_sum", M * E, (M, E)),
            ("key_count", M, (M,)),
            ("query_sum", E, (E,)),
            ("cos_sum", M, (M,)),
            ("mass_sum", M, (M,)),
            ("num_queries", 1, ()),
            ("num_cos", 1, ()),
        )
        out, start = {}, 0
        for name, n, shape in names:
            out[name] = sums[start : start + n].view(shape)
            start += n
        return out

    @torch.no_grad()
    def observe(
        self,
        stats: Union[RollingQStats, AttentionStats],
        query: Optional[torch.Tensor] = None,
        *,
        row: int = 0,
    ) -> None:
        """Add one batch's statistics to the epoch's sums. No extra pass, no device sync.

        Args:
            stats: the :class:`RollingQStats` a RollingQ module returned (its query is used), or
                the kernel's :class:`AttentionStats` together with ``query``.
            query: with AttentionStats: the queries as the kernel saw them (rotated), either
                (B, E) for the [CLS] row or (B, H, Lq, D), of which row ``row`` is used.
            row: the [CLS] row in ``stats.modality_mass`` (and in a (B, H, Lq, D) ``query``).
        """
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
        q = q.detach().to(device=self._sums.device, dtype=torch.float64)
        qh = q.view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        att64 = AttentionStats(*(t.detach().to(self._sums.device, torch.float64) for t in att))
        cos = modality_cosine(qh, att64)[:, 0]  # (B, M)
        # a sample missing a modality has no cosine for it: left out of the AIR
        valid = (att64.key_count > 0).all(dim=-1)
        s = self._views(self._sums)
        s["key_sum"] += att64.key_sum.permute(0, 2, 1, 3).reshape(B, M, E).sum(0)
        s["key_count"] += att64.key_count.sum(0)
        s["query_sum"] += q.sum(0)
        s["cos_sum"] += (cos * valid[:, None]).sum(0)
        s["mass_sum"] += att64.modality_mass[:, :, row, :].mean(1).sum(0)
        s["num_queries"] += B
        s["num_cos"] += valid.sum()

    def estimate(
        self,
        loader: Iterable[Any],
        forward: Callable[[Any], Any],
    ) -> None:
        """An explicit statistics pass over ``loader`` (the paper's way), replacing the sums.

        ``forward(batch)`` must run the model with ``need_stats=True`` and return the module's
        :class:`RollingQStats` (or a tuple whose last element is). Runs under ``no_grad``.
        """
        self.reset()
        with torch.no_grad():
            for batch in loader:
                result = forward(batch)
                stats = result if isinstance(result, RollingQStats) else result[-1]
                self.observe(stats)

    # --- the update --------------------------------------------------------------------------

    def _reduced_sums(self) -> torch.Tensor:
        sums = self._sums.clone()
        use = self.distributed
        if use is None:
            use = dist.is_available() and dist.is_initialized()
        if use:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
        return sums

    @torch.no_grad()
    def step(self, *, rotate: bool = True) -> RollingQReport:
        """End of epoch: compute the AIR and, if it calls for one, rotate the [CLS] query.

        The rotation fires when ``rotate`` and |AIR| > beta and fewer than ``max_rotations``
        rotations were applied: weights w = softmax(-2 sigma c) (alpha and 1 - alpha for two
        modalities), target = sum_m w_m normalize(mean key_m) scaled to |mean query|,
        R_new = rotation taking the mean [CLS] query onto the target, R <- R_new R. The AIR is
        appended to the module's history and the sums are reset. Under torch.distributed this is
        a collective: every rank must call it.
        """
        s = self._views(self._reduced_sums())
        n_cos = int(s["num_cos"].item())
        n_q = int(s["num_queries"].item())
        if n_q == 0 or n_cos == 0:
            raise RuntimeError(
                "RollingQ.step() found no statistics: call observe() with the stats of "
                "need_stats=True forwards (or estimate()) first, with every modality present"
            )
        cosines = s["cos_sum"] / n_cos
        mass = s["mass_sum"] / n_q
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
        if fire:
            key_means = s["key_sum"] / s["key_count"].clamp_min(1.0)[:, None]
            query_mean = s["query_sum"] / n_q
            target = rollingq_target(query_mean, key_means, weights)
            r_new = rotation_between(query_mean, target, method=self.method)
            cos_angle = torch.dot(query_mean, target) / (query_mean.norm() * target.norm())
            angle = math.degrees(math.acos(max(-1.0, min(1.0, float(cos_angle)))))
            att.compose_rotation(r_new)
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
