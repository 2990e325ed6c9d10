"""The pure-PyTorch oracle: rolling attention, its statistics, and the RollingQ maths.

Everything here is written for clarity, not speed: the attention matrix is materialised, the
statistics are computed from it separately. It runs on any device and dtype torch supports and is
differentiable with ordinary autograd, so ``gradcheck`` in float64 works on it directly. Every
backend is tested against this module; it imports no backend.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._stats import AttentionStats

__all__ = [
    "rolling_attention_reference",
    "accumulation_dtype",
    "apply_rotation",
    "visibility_mask",
    "modality_onehot",
    "key_modality_from_lengths",
    "modality_cosine",
    "attention_imbalance_rate",
    "rollingq_weights",
    "rollingq_target",
    "rotation_between",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (DESIGN.md section 2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rotation(
    q: torch.Tensor,
    rotation: Optional[torch.Tensor],
    rotated_queries: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rotate the selected rows of q (B, H, Lq, D): q_i <- R q_i, i.e. row form q_i @ R.T.

    rotation: None, (D, D) shared by all heads, or (H, D, D) one per head.
    rotated_queries: None (every row), bool (Lq,) or bool (B, Lq).
    The result has q's dtype.
    """
    if rotation is None:
        return q
    B, H, Lq, D = q.shape
    R = rotation.to(q.dtype)
    if R.dim() == 2:
        rotated = torch.matmul(q, R.transpose(0, 1))
    else:
        rotated = torch.matmul(q, R.transpose(-1, -2).unsqueeze(0))
    if rotated_queries is None:
        return rotated
    sel = rotated_queries.to(torch.bool)
    sel = sel.view(1, Lq) if sel.dim() == 1 else sel
    return torch.where(sel[:, None, :, None], rotated, q)


def visibility_mask(
    batch: int,
    lq: int,
    lk: int,
    *,
    key_padding_mask: Optional[torch.Tensor],
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): True where query i may attend to key j.

    Causal is top-left aligned as in SDPA: key j is visible to row i when j <= i.
    """
    visible = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    return visible


def modality_onehot(
    key_modality: Optional[torch.Tensor],
    num_modalities: int,
    key_padding_mask: Optional[torch.Tensor],
    batch: int,
    lk: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(B, Lk, M) one-hot of each key's modality; rows of id -1 and padded keys are all zero.

    ``key_modality=None`` puts every key in modality 0.
    """
    if key_modality is None:
        ids = torch.zeros(batch, lk, dtype=torch.long, device=device)
    else:
        ids = key_modality.to(device=device, dtype=torch.long)
        ids = ids.expand(batch, lk) if ids.dim() == 1 else ids
    onehot = ids[..., None] == torch.arange(num_modalities, device=device)
    if key_padding_mask is not None:
        onehot = onehot & key_padding_mask.to(torch.bool)[..., None]
    return onehot.to(dtype)


def rolling_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rotation: Optional[torch.Tensor] = None,
    rotated_queries: Optional[torch.Tensor] = None,
    key_modality: Optional[torch.Tensor] = None,
    num_modalities: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_stats: bool = False,
):
    """Rolling attention computed the obvious way (materialised softmax). See DESIGN.md section 2.

    Args:
        q: (B, H, Lq, D); k: (B, H, Lk, D); v: (B, H, Lk, Dv). Any strides, same dtype.
        rotation: None, (D, D) or (H, D, D); rotated rows become q_i <- R q_i.
        rotated_queries: None (all rows), bool (Lq,) or (B, Lq).
        key_modality: None (every key is modality 0), integer (Lk,) or (B, Lk) with ids in
            [-1, M); -1 keys are attended but counted in no modality.
        num_modalities: M; None means max id + 1 (at least 1).
        key_padding_mask: None or bool (B, Lk), True = the key takes part.
        is_causal: top-left aligned causal mask.
        scale: softmax scale, default 1/sqrt(D).
        return_stats: also return :class:`AttentionStats`.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, and the stats when ``return_stats``. The arithmetic is done
        in float32 (float64 for float64 inputs), so a float64 call is the oracle.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    rot = None if rotation is None else rotation.to(acc)
    qf = apply_rotation(qf, rot, rotated_queries)

    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    visible = visibility_mask(
        B, Lq, Lk, key_padding_mask=key_padding_mask, is_causal=is_causal, device=q.device
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row that sees no key has lse = -inf; shift it by 0 instead so exp() gives 0, not NaN.
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - shift[..., None])
    probs = torch.where(visible, probs, torch.zeros_like(probs))
    out = torch.matmul(probs, vf).to(q.dtype)
    if not return_stats:
        return out

    if num_modalities is None:
        num_modalities = 1 if key_modality is None else max(int(key_modality.max()) + 1, 1)
    with torch.no_grad():
        onehot = modality_onehot(
            key_modality, num_modalities, key_padding_mask, B, Lk, dtype=acc, device=q.device
        )
        mass = torch.matmul(probs.detach(), onehot[:, None])  # (B, H, Lq, M)
        key_sum = torch.einsum("bhkd,bkm->bhmd", kf.detach(), onehot)
        key_count = onehot.sum(dim=1)
        stats = AttentionStats(mass, key_sum, key_count, lse.detach())
    return out, stats


def key_modality_from_lengths(
    lengths: Sequence[int],
    counted: Optional[Sequence[bool]] = None,
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Modality ids (int64, (sum(lengths),)) for a sequence made of consecutive segments.

    Segment s gets the next modality id if ``counted[s]`` (default: every segment counts), else -1.
    ``key_modality_from_lengths((1, 512, 588), (False, True, True))`` gives
    ``[-1, 0 x512, 1 x588]``: a [CLS] key followed by two modalities.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be non-negative; got {lengths}")
    if counted is None:
        counted = [True] * len(lengths)
    counted = [bool(c) for c in counted]
    if len(counted) != len(lengths):
        raise ValueError(
            f"counted must have one entry per segment: got {len(counted)} for {len(lengths)} lengths"
        )
    ids = []
    next_id = 0
    for n, c in zip(lengths, counted):
        ids.append(torch.full((n,), next_id if c else -1, dtype=torch.long, device=device))
        next_id += int(c)
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(ids)


# ----------------------------------------------------------------------------------------------
# RollingQ maths (DESIGN.md section 3). Statistics are taken over the full embedding E = H * D.


def _full_embedding(x: torch.Tensor) -> torch.Tensor:
    # (B, H, N, D) -> (B, N, H * D), heads concatenated as nn.MultiheadAttention lays them out.
    B, H, N, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, H * D)


def modality_cosine(query: torch.Tensor, stats: AttentionStats, eps: float = 1e-12) -> torch.Tensor:
    """Cosine between each query row and each modality's mean key, over the full embedding.

    Args:
        query: (B, H, Lq, D), the query rows as the kernel saw them (already rotated).
        stats: the :class:`AttentionStats` of that call (key_sum, key_count are used).
    Returns:
        (B, Lq, M) float; 0 for a modality with no key in a sample.
    """
    q = _full_embedding(query.to(stats.key_sum.dtype))
    means = _full_embedding(stats.key_mean())  # (B, M, E)
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    mn = means / means.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.matmul(qn, mn.transpose(-1, -2))


def attention_imbalance_rate(cosines: torch.Tensor) -> torch.Tensor:
    """The paper's AIR for two modalities: mean over samples of (c_0 - c_1).

    cosines: (..., 2), e.g. (B, 2) for the [CLS] row of each sample. Positive: modality 0 favoured.
    """
    if cosines.shape[-1] != 2:
        raise ValueError(
            "attention_imbalance_rate is defined for two modalities: cosines must have shape "
            f"(..., 2); got {tuple(cosines.shape)}"
        )
    return (cosines[..., 0] - cosines[..., 1]).mean()


def rollingq_weights(cosines: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weights of the modalities' key directions in the rotation target.

    cosines: (M,) mean cosines, or (N, M) per-sample cosines (averaged first).
    Returns softmax(-2 * sigma * c) over modalities, (M,). For M = 2 this is the paper's
    alpha = (1 + tanh(-sigma * AIR)) / 2 for modality 0 and 1 - alpha for modality 1.
    """
    c = cosines if cosines.dim() == 1 else cosines.reshape(-1, cosines.shape[-1]).mean(0)
    return torch.softmax(-2.0 * sigma * c, dim=-1)


def rollingq_target(
    query_mean: torch.Tensor,
    key_means: torch.Tensor,
    weights: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """sum_m w_m * normalize(key_means[m]), rescaled to the norm of ``query_mean``.

    query_mean: (E,) mean [CLS] query; key_means: (M, E); weights: (M,). Returns (E,).
    """
    directions = key_means / key_means.norm(dim=-1, keepdim=True).clamp_min(eps)
    target = (weights[:, None].to(directions.dtype) * directions).sum(0)
    return target * (query_mean.norm() / target.norm().clamp_min(eps))


def _orthogonal_unit(u: torch.Tensor) -> torch.Tensor:
    # A unit vector orthogonal to unit u: Gram-Schmidt on the axis least aligned with u.
    axis = torch.zeros_like(u)
    axis[torch.argmin(u.abs())] = 1.0
    w = axis - torch.dot(axis, u) * u
    return w / w.norm()


def rotation_between(
    x: torch.Tensor, y: torch.Tensor, method: str = "plane", eps: float = 1e-7
) -> torch.Tensor:
    """An orthogonal (E, E) matrix R with det +1 and R x_hat = y_hat.

    method="plane": the rotation within span(x, y), identity on its orthogonal complement.
        x ~ y gives the identity; x ~ -y rotates by pi in a plane through x (any such plane works).
    method="svd": U V^T from the SVD of y x^T, with the last column of U negated if that makes
        det +1 (the construction of the paper's official code). On the complement of span(x, y) it
        is some orthogonal map chosen by the SVD, not necessarily the identity.
    Computed in float64 internally; returned in x's dtype.
    """
    if x.dim() != 1 or y.shape != x.shape:
        raise ValueError(
            f"x and y must be vectors of the same length; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    out_dtype = x.dtype
    xd, yd = x.to(torch.float64), y.to(torch.float64)
    if xd.norm() == 0 or yd.norm() == 0:
        raise ValueError("rotation_between needs non-zero x and y")
    u = xd / xd.norm()
    t = yd / yd.norm()
    E = u.numel()
    eye = torch.eye(E, dtype=torch.float64, device=x.device)
    if method == "svd":
        U, _, Vh = torch.linalg.svd(torch.outer(t, u))
        R = U @ Vh
        if torch.linalg.det(R) < 0:
            U = U.clone()
            U[:, -1] = -U[:, -1]
            R = U @ Vh
        return R.to(out_dtype)
    if method != "plane":
        raise ValueError(f"method must be 'plane' or 'svd'; got {method!r}")
    cos = torch.dot(u, t).clamp(-1.0, 1.0)
    w = t - cos * u
    sin = w.norm()
    if sin < eps:
        if cos > 0:
            return eye.to(out_dtype)
        w = _orthogonal_unit(u)
        cos, sin = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    else:
        w = w / sin
    # Rotation by theta in the plane (u, w): u -> cos u + sin w, w -> -sin u + cos w.
    R = (
        eye
        + sin * (torch.outer(w, u) - torch.outer(u, w))
        + (cos - 1.0) * (torch.outer(u, u) + torch.outer(w, w))
    )
    return R.to(out_dtype)
