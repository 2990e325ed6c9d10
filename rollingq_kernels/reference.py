"""The pure-PyTorch oracle: rolling attention and its statistics.

Everything here is written for clarity, not speed: the attention matrix is materialised, the
statistics are computed from it separately. It runs on any device and dtype torch supports and is
differentiable with ordinary autograd, so ``gradcheck`` in float64 works on it directly. Every
backend is tested against this module; it imports no backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._stats import AttentionStats, accumulation_dtype

__all__ = [
    "rolling_attention_reference",
    "accumulation_dtype",
    "apply_rotation",
    "visibility_mask",
    "modality_onehot",
]


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
