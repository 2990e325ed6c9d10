"""The pure-PyTorch oracle: rolling attention and its statistics.

Everything here is written for clarity, not speed: the attention matrix is materialised, the
statistics are computed from it separately. It runs on any device and dtype torch supports and is
differentiable with ordinary autograd, so ``gradcheck`` in float64 works on it directly. Every
backend is tested against this module; it imports no backend.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ._stats import AttentionStats, accumulation_dtype, read_all_entries
from .dropout import dropout_keep_mask

__all__ = [
    "rolling_attention_reference",
    "accumulation_dtype",
    "apply_rotation",
    "causal_offset_of",
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


def causal_offset_of(attn_mask, is_causal: bool, lq: int, lk: int) -> Optional[int]:
    """The causal alignment of a call as one integer, or None when it is not causal: key j is
    visible to row i when j <= i + offset. ``is_causal`` (SDPA's top-left alignment) is 0;
    ``torch.nn.attention.bias.causal_upper_left`` is 0 and ``causal_lower_right`` is Lk - Lq."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if isinstance(attn_mask, CausalBias):
        if attn_mask.variant == CausalVariant.LOWER_RIGHT:
            return lk - lq
        return 0
    return 0 if is_causal else None


def visibility_mask(
    batch: int,
    lq: int,
    lk: int,
    *,
    key_padding_mask: Optional[torch.Tensor],
    is_causal: bool,
    device: torch.device,
    causal_offset: int = 0,
) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): True where query i may attend to key j (padding and causality only;
    ``attn_mask`` is applied to the scores separately). Causal: key j is visible to row i when
    j <= i + causal_offset (0 is SDPA's top-left alignment)."""
    visible = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(causal_offset)
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


def _weighted_values(weights: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """weights (B, H, Lq, Lk) @ v (B, H, Lk, Dv), where a key hidden from a row (visible False)
    takes no part in it even when its value is NaN or infinite. A visible key takes part with
    IEEE arithmetic, as in SDPA: a weight of 0 times inf or NaN is NaN.

    Under torch.compile this is the plain product (no data-dependent branch in the graph): there a
    NaN or inf value of a hidden key reaches every row as 0 * NaN, as in SDPA's math backend."""
    if torch.compiler.is_compiling():
        return torch.matmul(weights, v)
    if torch._C._are_functorch_transforms_active():
        return _weighted_values_no_branch(weights, v, visible)
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(weights, v)
    out = torch.matmul(weights, torch.where(finite, v, torch.zeros_like(v)))
    bad_keys = torch.nonzero((~finite).flatten(0, 1).any(-1).any(0)).flatten()
    # the non-finite values, restricted to the rows that see their key (rare: tests of NaN rules)
    sub = v[:, :, bad_keys, :]  # (B, H, J, Dv)
    w = weights[..., bad_keys]  # (B, H, Lq, J)
    seen = visible[..., bad_keys].expand(w.shape)[..., None]  # (B, H, Lq, J, 1)
    bad = ~torch.isfinite(sub)[:, :, None]  # (B, H, 1, J, Dv)
    part = torch.where(seen & bad, w[..., None] * sub[:, :, None], v.new_zeros(()))
    return out + part.sum(-2)


def _weighted_values_no_branch(weights, v, visible):
    """:func:`_weighted_values` without a branch on the data, for torch.func transforms (vmap
    cannot branch per entry): the finite values in one product, then each output element's
    visible non-finite values counted by products of indicators. A visible +inf (-inf) with a
    positive weight makes it +inf (-inf), both make it NaN, and a visible NaN, or an inf under
    a zero weight (0 * inf), makes it NaN."""
    finite = torch.isfinite(v)
    out = torch.matmul(weights, torch.where(finite, v, torch.zeros_like(v)))
    seen = visible.expand(weights.shape).to(weights.dtype)
    positive = seen * (weights > 0).to(weights.dtype)

    def hits(rows, cond):  # (B, H, Lq, Dv): how many of a row's keys in ``rows`` meet cond
        return torch.matmul(rows, cond.to(weights.dtype)) > 0

    inf = torch.tensor(math.inf, dtype=out.dtype, device=out.device)
    nan = hits(seen, torch.isnan(v)) | hits(seen - positive, torch.isinf(v))
    out = out + torch.where(hits(positive, v == math.inf), inf, 0.0)
    out = out + torch.where(hits(positive, v == -math.inf), -inf, 0.0)
    return torch.where(nan, torch.nan, out)


_any_autocast = torch._C._is_any_autocast_enabled  # one C call (about 60 ns)


def autocast_dtype(q) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs SDPA in on q's device, or None outside autocast (or for a q
    that is not a tensor)."""
    if not _any_autocast() or not isinstance(q, torch.Tensor):
        return None
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_inputs(dtype: torch.dtype, *tensors) -> tuple:
    """SDPA's autocast policy (lower precision): every floating tensor but a float64 one in the
    autocast dtype; anything else (a bool mask, a CausalBias, None) as it is."""
    from torch.nn.attention.bias import CausalBias

    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor)
        and not isinstance(t, CausalBias)
        and t.is_floating_point()
        and t.dtype not in (dtype, torch.float64)
        else t
        for t in tensors
    )


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
    attn_mask: Union[None, torch.Tensor, torch.nn.attention.bias.CausalBias] = None,
    is_causal: bool = False,
    causal_offset: Optional[int] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    return_stats: bool = False,
):
    """Rolling attention computed the obvious way (materialised softmax); docs/design.md.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv). Any strides, same dtype.
            Hkv == H, or with ``enable_gqa`` a divisor of H (query head h reads kv head
            h // (H // Hkv)).
        rotation: None, (D, D) or (H, D, D); rotated rows become q_i <- R q_i.
        rotated_queries: None (all rows), bool (Lq,) or (B, Lq).
        key_modality: None (every key is modality 0), integer (Lk,) or (B, Lk) with ids in
            [-1, M); -1 keys are attended but counted in no modality.
        num_modalities: M; None means max id + 1 (at least 1).
        key_padding_mask: None or bool (B, Lk), True = the key takes part.
        attn_mask: None; a bool tensor broadcastable to (B, H, Lq, Lk), True = takes part; a
            float tensor added to the scaled scores; or a ``CausalBias``. SDPA's semantics.
        is_causal: top-left aligned causal mask (key j visible to row i when j <= i).
        causal_offset: with ``is_causal``, key j is visible to row i when j <= i + offset
            (overrides the alignment is_causal implies; a CausalBias sets it too).
        scale: softmax scale, default 1/sqrt(D).
        dropout_p, rng_state: attention dropout on the probabilities with the keep-mask of
            :func:`rollingq_kernels.dropout.dropout_keep_mask` for ``rng_state`` (required when
            ``dropout_p > 0``). The statistics are taken before dropout.
        return_stats: also return :class:`AttentionStats`.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, and the stats when ``return_stats``. The arithmetic is done
        in float32 (float64 for float64 inputs), so a float64 call is the oracle. NaN and inf follow
        the definition softmax(q k^T * scale + mask) v, as SDPA's math backend does; a row that
        sees no key gives zeros, lse = -inf and zero mass.
    """
    from torch.nn.attention.bias import CausalBias

    autocast = autocast_dtype(q)
    if autocast is not None:
        # as torch.autocast treats SDPA: the inputs in its dtype, the arithmetic as without it
        q, k, v, attn_mask = autocast_inputs(autocast, q, k, v, attn_mask)
        with torch.autocast(q.device.type, enabled=False):
            return rolling_attention_reference(
                q, k, v, rotation=rotation, rotated_queries=rotated_queries,
                key_modality=key_modality, num_modalities=num_modalities,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                causal_offset=causal_offset, scale=scale, dropout_p=dropout_p,
                rng_state=rng_state, enable_gqa=enable_gqa, return_stats=return_stats,
            )  # fmt: skip
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(attn_mask, CausalBias):
        causal_offset = causal_offset_of(attn_mask, False, Lq, Lk)
        is_causal, attn_mask = True, None
    elif is_causal and causal_offset is None:
        causal_offset = 0
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if Hkv != H:
        if not enable_gqa or H % Hkv:
            raise ValueError(f"k has {Hkv} heads and q {H}: that needs enable_gqa and H % Hkv == 0")
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    rot = None if rotation is None else rotation.to(acc)
    qf = apply_rotation(qf, rot, rotated_queries)

    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)
    visible = visibility_mask(
        B,
        Lq,
        Lk,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        causal_offset=causal_offset or 0,
        device=q.device,
    )
    # Hidden positions are replaced by -inf (never added to): a NaN there reaches no row.
    scores = scores.masked_fill(~visible, float("-inf"))
    # softmax shifted by the row maximum, normalised by the row sum: exp(s - lse) would be wrong
    # where lse = m + log(sum) rounds back to m (m near the dtype's minimum, as with a mask of
    # finfo.min), giving every key a weight of 1.
    if Lk:
        m = scores.amax(dim=-1)
    else:  # no key at all
        m = scores.new_full(scores.shape[:-1], float("-inf"))
    # A row that sees no key (m = -inf) is shifted by 0 so exp() gives 0, not NaN; a +inf score
    # has no softmax (inf - inf): NaN, as for a NaN score, which propagates by itself.
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shift = torch.where(m == float("inf"), torch.full_like(m, float("nan")), shift)
    e = torch.exp(scores - shift[..., None])
    total = e.sum(dim=-1)
    lse = shift + torch.log(total)
    probs = e / torch.where(total == 0, torch.ones_like(total), total)[..., None]
    weights = probs
    if dropout_p > 0.0:
        if rng_state is None:
            raise ValueError("dropout_p > 0 needs rng_state (seed, offset)")
        keep = dropout_keep_mask(rng_state, dropout_p, (B, H, Lq, Lk), device=q.device)
        weights = probs * keep.to(acc) / (1.0 - dropout_p)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    out = _weighted_values(weights, vf, visible).to(q.dtype)
    if not return_stats:
        return out

    if num_modalities is None:
        if key_modality is None or key_modality.numel() == 0:
            num_modalities = 1
        else:
            num_modalities = max(read_all_entries(key_modality, lambda t: int(t.max())) + 1, 1)
    with torch.no_grad():
        onehot = modality_onehot(
            key_modality, num_modalities, key_padding_mask, B, Lk, dtype=acc, device=q.device
        )
        mass = torch.matmul(probs.detach(), onehot[:, None])  # (B, H, Lq, M)
        kd = kf.detach()
        if torch.compiler.is_compiling() or (
            not torch._C._are_functorch_transforms_active() and bool(torch.isfinite(kd).all())
        ):
            key_sum = torch.einsum("bhkd,bkm->bhmd", kd, onehot)
        else:  # a non-finite key reaches its own modality's sum only (not through 0 * NaN)
            counted = onehot.bool()[:, None, :, :, None]  # (B, 1, Lk, M, 1)
            key_sum = torch.where(counted, kd[:, :, :, None, :], 0).sum(2)
        key_count = onehot.sum(dim=1)
        stats = AttentionStats(mass, key_sum, key_count, lse.detach())
    return out, stats
