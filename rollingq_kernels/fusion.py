"""The paper's [CLS] attention fusion, computing only the [CLS] row.

``RollingQFusion`` puts a learned [CLS] token in front of the tokens of every modality, runs one
attention layer and returns the fused [CLS] embedding. By default the key and value projections
are absorbed into the query side, so the tokens are never projected (see
:meth:`RollingQFusion.forward`); ``SharedHeadAttentionFunction`` is the attention of that form
(one query row per head over keys = values = the raw tokens) with a backward written for it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import AttentionStats
from .api import rolling_attention
from .dropout import dropout_keep_mask, new_rng_state
from .mha import RollingQAttention, RollingQStats, _mha_to_keep_mask
from .rollingq_math import key_modality_from_lengths

__all__ = ["RollingQFusion", "SharedHeadAttentionFunction"]


class SharedHeadAttentionFunction(torch.autograd.Function):
    """One query row per head over keys = values = x, shared by all heads (Lq = 1).

    ``apply(a, keep, ids, num_modalities, scale, backend, dropout_p, rng_state, *segments)``:
    x (B, L, E) is the concatenation of ``segments`` (each (B, L_s, E)) along L. Forward:
    :func:`rolling_attention` on ``a`` (H, E) broadcast over the batch and x broadcast over the
    heads (stride-0 views), with statistics (the log-sum-exp is needed for the backward) and the
    kernel's attention dropout (``dropout_p``, keep-mask from ``rng_state``). Returns (mixed
    (B, H, E), prob_sum (B, H), modality_mass, key_sum, key_count, lse); ``mixed`` and
    ``prob_sum`` are differentiable.

    prob_sum_h = sum_j d_j p_j, with d_j = keep_j / (1 - dropout_p) the dropout factor: the total
    weight the values got. It is 1 without dropout; with dropout the absorbed value bias needs it
    (sum_j d_j p_j (W_v x_j + b_v) = W_v mixed + prob_sum b_v), and it costs one more read of the
    tokens in the forward.

    Backward, written for this shape because both gradients are rank one per (sample, head):
    with p_j = exp(scale a.x_j - lse), the incoming g (for mixed) and g_s (for prob_sum),
    ds_j = p_j (d_j (g.x_j + g_s) - g.mixed - g_s prob_sum), dx_j = sum_h (scale ds_hj a_h +
    d_hj p_hj g_h) and da_h = scale sum_j ds_hj x_j; the keep-mask is regenerated from
    ``rng_state`` (:func:`rollingq_kernels.dropout.dropout_keep_mask`), never stored. Per segment
    that is two reads of its tokens and one write of their gradient, as a fresh tensor the
    optimiser can take without a copy -- instead of a generic attention backward that materialises
    separate (B, H, L, E) key and value gradients in different layouts and sums them over the heads.
    """

    @staticmethod
    def forward(ctx, a, keep, ids, num_modalities, scale, backend, dropout_p, rng_state, *segments):
        x = torch.cat(segments, dim=1) if len(segments) > 1 else segments[0]
        B, L, E = x.shape
        H = a.shape[0]
        kv = x.unsqueeze(1).expand(B, H, L, E)
        dropout_p = float(dropout_p)
        mixed, st = rolling_attention(
            a.view(1, H, 1, E).expand(B, H, 1, E),
            kv,
            kv,
            key_modality=ids,
            num_modalities=num_modalities,
            key_padding_mask=keep,
            scale=scale,
            dropout_p=dropout_p,
            rng_state=rng_state if dropout_p > 0.0 else None,
            return_stats=True,
            backend=backend,
        )
        mixed = mixed[:, :, 0]
        acc = st.lse.dtype
        factor = None
        if dropout_p > 0.0:
            # d_j = keep_j / (1 - p), (B, L, H); and the weight the values got in total
            keep_mask = dropout_keep_mask(rng_state, dropout_p, (B, H, 1, L), device=x.device)
            factor = keep_mask[:, :, 0].transpose(1, 2).to(acc) / (1.0 - dropout_p)
            prob = _probabilities(x, a, st.lse, scale, keep, 0, L)
            prob_sum = (prob * factor).sum(1)
        else:
            prob_sum = torch.ones(B, H, dtype=acc, device=x.device)
            ctx.mark_non_differentiable(prob_sum)
        # the segments, not x: x is freed now, and the backward works segment by segment
        ctx.save_for_backward(a, keep, mixed, prob_sum, st.lse, rng_state, *segments)
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(*st)
        return (mixed, prob_sum, *st)

    @staticmethod
    def backward(ctx, g, g_sum, *unused):
        a, keep, mixed, prob_sum, lse, rng_state, *segments = ctx.saved_tensors
        scale, p_drop = ctx.scale, ctx.dropout_p
        H, E = a.shape
        B = g.shape[0]
        L = sum(seg.shape[1] for seg in segments)
        dtype = segments[0].dtype
        acc = lse.dtype
        both = torch.cat([a.unsqueeze(0).expand(B, H, E), g.to(dtype)], dim=1)  # (B, 2H, E)
        delta = (g.to(acc) * mixed.to(acc)).sum(-1)  # (B, H)
        if g_sum is not None and p_drop > 0.0:
            g_sum = g_sum.to(acc)
            delta = delta + g_sum * prob_sum
        else:
            g_sum = None
        delta = delta.unsqueeze(1)  # (B, 1, H)
        factor = None
        if p_drop > 0.0:
            keep_mask = dropout_keep_mask(rng_state, p_drop, (B, H, 1, L), device=a.device)
            factor = keep_mask[:, :, 0].transpose(1, 2).to(acc) / (1.0 - p_drop)  # (B, L, H)
        lse_row = lse[:, :, 0].unsqueeze(1)  # (B, 1, H)
        da = torch.zeros(H, E, dtype=dtype, device=a.device)
        first = 8  # index of the first segment among the inputs
        grads = []
        start = 0
        for seg in segments:
            n = seg.shape[1]
            if not ctx.needs_input_grad[first + len(grads)] and not ctx.needs_input_grad[0]:
                grads.append(None)
                start += n
                continue
            dots = torch.bmm(seg.expand(B, n, E), both.transpose(1, 2))  # (B, n, 2H): a.x, g.x
            p = torch.exp(dots[..., :H].to(acc) * scale - lse_row)
            if keep is not None:  # where, not a product: a padded key's exp may overflow
                p = p.masked_fill(~keep[:, start : start + n].unsqueeze(-1), 0.0)
            gx = dots[..., H:].to(acc)
            if g_sum is not None:
                gx = gx + g_sum.unsqueeze(1)
            if factor is not None:
                d = factor[:, start : start + n]
                ds = p * (d * gx - delta)
                pv = p * d
            else:
                ds = p * (gx - delta)
                pv = p
            coef = torch.cat([ds * scale, pv], dim=-1).to(dtype)  # (B, n, 2H)
            grads.append(
                torch.bmm(coef, both) if ctx.needs_input_grad[first + len(grads)] else None
            )
            da += coef[..., :H].reshape(B * n, H).transpose(0, 1) @ seg.expand(B, n, E).reshape(
                B * n, E
            )
            start += n
        return (da, None, None, None, None, None, None, None, *grads)


def _shared_attention_gqa(
    a, keep, ids, num_modalities, scale, backend, dropout_p, rng_state, *segments
):
    """What :class:`SharedHeadAttentionFunction` computes, through the generic path instead:
    :func:`rolling_attention` with one key/value head shared by the H query heads
    (``enable_gqa=True``) and the kernel's own backward (dK and dV, summed into the tokens'
    gradient by autograd). Kept to measure the two side by side (bench/fusion_bench.py)."""
    x = torch.cat(segments, dim=1) if len(segments) > 1 else segments[0]
    B, L, E = x.shape
    H = a.shape[0]
    kv = x.unsqueeze(1)  # (B, 1, L, E)
    dropout_p = float(dropout_p)
    out, st = rolling_attention(
        a.view(1, H, 1, E).expand(B, H, 1, E),
        kv,
        kv,
        key_modality=ids,
        num_modalities=num_modalities,
        key_padding_mask=keep,
        scale=scale,
        dropout_p=dropout_p,
        rng_state=rng_state if dropout_p > 0.0 else None,
        enable_gqa=True,
        return_stats=True,
        backend=backend,
    )
    acc = st.lse.dtype
    if dropout_p > 0.0:
        # the kept, rescaled probability mass, differentiable: the softmax materialised (Lq = 1)
        scores = torch.matmul(x, a.transpose(0, 1).to(x.dtype)).to(acc) * scale  # (B, L, H)
        if keep is not None:
            scores = scores.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        keep_mask = dropout_keep_mask(rng_state, dropout_p, (B, H, 1, L), device=x.device)
        factor = keep_mask[:, :, 0].transpose(1, 2).to(acc) / (1.0 - dropout_p)
        prob_sum = (torch.softmax(scores, dim=1) * factor).sum(1)
    else:
        prob_sum = torch.ones(B, H, dtype=acc, device=x.device)
    return (out[:, :, 0], prob_sum, *st)


def _probabilities(x, a, lse, scale, keep, start, n):
    # p_j = exp(scale a_h.x_j - lse_h) for keys start..start+n of x, (B, n, H), in lse's dtype;
    # exactly 0 on padded keys
    acc = lse.dtype
    dots = torch.matmul(x[:, start : start + n], a.transpose(0, 1).to(x.dtype))  # (B, n, H)
    p = torch.exp(dots.to(acc) * scale - lse[:, :, 0].unsqueeze(1))
    if keep is not None:
        p = p.masked_fill(~keep[:, start : start + n].unsqueeze(-1), 0.0)
    return p


class RollingQFusion(nn.Module):
    """The paper's attention fusion: [CLS | tokens of modality 0 | modality 1 | ...] -> [CLS].

    A learned [CLS] token (``cls_token``, (E,)) is put in front of the modalities' tokens, one
    :class:`RollingQAttention` layer (``attn``; its [CLS] row is the rotated one) attends from the
    [CLS] row to the whole sequence (the [CLS] key included, counted in no modality), and the
    fused [CLS] embedding (B, E) is returned. No residual, norm or MLP: add them around it.

    Since only the [CLS] row is needed, only that row is computed (Lq = 1); the loss and gradients
    are those of the whole sequence's [CLS] row. ``mode`` chooses how (all give the same result):
      * "absorbed" (default): the key and value projections move to the query side. Per head h,
        score_j = (W_k,h^T q_h) . x_j + q_h . b_k,h, and the second term is the same for every j,
        so it cancels in the softmax; out_h = W_v,h (sum_j p_hj x_j) + b_v,h since the
        probabilities sum to 1. The kernel attends from one E-dim query per head to the raw
        tokens, shared by all heads (a stride-0 view): O(B L E) work instead of O(B L E^2).
        The statistics are mapped back to projected keys (mean key = W_k mean(x) + b_k).
      * "projected": project the keys and values of every token, attend from the [CLS] row.
      * "full": project and attend the whole sequence, keep row 0 (what the paper's code does).

    ``init`` chooses the initialisation of the projections: "mha" (default), that of
    nn.MultiheadAttention (xavier_uniform_ on the stacked (3E, E) in-projection, nn.Linear's
    default for ``out_proj``, zero biases); "xavier_normal", that of the official RollingQ code
    (xavier_normal_ on each of the four (E, E) projections separately, zero biases). The [CLS]
    token starts as N(0, 0.02^2) either way.
    """

    MODES = ("absorbed", "projected", "full")
    INITS = ("mha", "xavier_normal")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        *,
        bias: bool = True,
        mode: str = "absorbed",
        init: str = "mha",
        dropout: float = 0.0,
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {list(self.MODES)}; got {mode!r}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {list(self.INITS)}; got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mode = mode
        self.dropout = float(dropout)
        self.cls_token = nn.Parameter(torch.empty(embed_dim, device=device, dtype=dtype))
        nn.init.normal_(self.cls_token, std=0.02)
        self.attn = RollingQAttention(
            embed_dim,
            num_heads,
            bias=bias,
            batch_first=True,
            rotated_queries=0,
            dropout=dropout,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.out_dropout = nn.Dropout(dropout)
        # how the absorbed path attends: "shared" (SharedHeadAttentionFunction, its own backward)
        # or "gqa" (rolling_attention with one shared key/value head); see bench/fusion_bench.py
        self._absorbed_attention = "shared"
        if init == "xavier_normal":
            self.reset_projections_xavier_normal()

    @torch.no_grad()
    def reset_projections_xavier_normal(self) -> None:
        """Re-initialise the projections as the official RollingQ code does: xavier_normal_ on
        each (E, E) projection (query, key, value, output) separately, every bias zero."""
        attn = self.attn
        for w in attn.in_proj_weight.view(3, self.embed_dim, self.embed_dim).unbind(0):
            nn.init.xavier_normal_(w)
        nn.init.xavier_normal_(attn.out_proj.weight)
        for b in (attn.in_proj_bias, attn.out_proj.bias):
            if b is not None:
                nn.init.zeros_(b)

    def sequence(
        self,
        tokens: Sequence[torch.Tensor],
        padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The fused sequence: (x (B, L, E), key_modality int64 (L,), padding (B, L) or None).

        ``padding_masks``: one bool (B, L_m) or None per modality, True = padding (ignored).
        """
        segments, ids, pad = self._segments(tokens, padding_masks)
        return torch.cat(segments, dim=1), ids, pad

    def _segments(self, tokens, padding_masks):
        # ([cls (B, 1, E), *tokens], ids, pad): the pieces of the sequence, not yet concatenated
        if len(tokens) == 0:
            raise ValueError("tokens must hold at least one modality")
        B = tokens[0].shape[0]
        E = self.embed_dim
        for m, t in enumerate(tokens):
            if t.dim() != 3 or t.shape[0] != B or t.shape[2] != E:
                raise ValueError(
                    f"tokens[{m}] must have shape ({B}, L_{m}, {E}); got {tuple(t.shape)}"
                )
        cls = self.cls_token.view(1, 1, E).expand(B, 1, E).to(tokens[0].dtype)
        lengths = [1] + [t.shape[1] for t in tokens]
        ids = key_modality_from_lengths(lengths, [False] + [True] * len(tokens), device=cls.device)
        pad = None
        if padding_masks is not None:
            if len(padding_masks) != len(tokens):
                raise ValueError(
                    f"padding_masks needs one entry per modality ({len(tokens)}); got {len(padding_masks)}"
                )
            if any(p is not None for p in padding_masks):
                parts = [torch.zeros(B, 1, dtype=torch.bool, device=cls.device)]
                for m, (p, t) in enumerate(zip(padding_masks, tokens)):
                    if p is None:
                        p = torch.zeros(B, t.shape[1], dtype=torch.bool, device=cls.device)
                    elif p.dtype != torch.bool or tuple(p.shape) != (B, t.shape[1]):
                        raise ValueError(
                            f"padding_masks[{m}] must be bool ({B}, {t.shape[1]}); got "
                            f"{p.dtype} {tuple(p.shape)}"
                        )
                    parts.append(p)
                pad = torch.cat(parts, dim=1)
        return [cls, *tokens], ids, pad

    def forward(
        self,
        tokens: Sequence[torch.Tensor],
        *,
        padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
        need_stats: bool = False,
        mode: Optional[str] = None,
    ) -> Tuple[torch.Tensor, Optional[RollingQStats]]:
        """Fuse the modalities into the [CLS] embedding.

        Args:
            tokens: one (B, L_m, E) tensor per modality, in modality-id order.
            padding_masks: None, or one bool (B, L_m) or None per modality; True = padding.
            need_stats: also return :class:`RollingQStats` (key sums of the projected keys).
            mode: "absorbed", "projected" or "full"; None = the constructor's ``mode``.

        Returns:
            (out (B, E) in the tokens' dtype, stats or None).
        """
        mode = self.mode if mode is None else mode
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {list(self.MODES)}; got {mode!r}")
        if mode == "absorbed":
            segments, ids, pad = self._segments(tokens, padding_masks)
            out, stats = self._absorbed(segments, ids, pad, len(tokens), need_stats)
            return self.out_dropout(out), stats
        x, ids, pad = self.sequence(tokens, padding_masks)
        M = len(tokens)
        kw = {"key_padding_mask": pad, "need_stats": need_stats, "need_weights": False}
        if need_stats:
            kw.update(key_modality=ids, num_modalities=M)
        if mode == "full":
            out, stats = self.attn(x, **kw)
        else:
            out, stats = self.attn(x[:, :1], x, **kw)
        return self.out_dropout(out[:, 0]), stats

    def _absorbed(self, segments, ids, pad, M, need_stats):
        attn = self.attn
        p_drop = self.dropout if self.training else 0.0
        rng_state = new_rng_state() if p_drop > 0.0 else None
        B, E = segments[0].shape[0], self.embed_dim
        dtype = segments[0].dtype
        H, D = attn.num_heads, attn.head_dim
        (wq, wk, wv), (bq, bk, bv) = attn._split()
        q = F.linear(self.cls_token.to(dtype), wq, bq)  # (E,): the same [CLS] query per sample
        if not attn._rotation_plan()["identity"]:
            q = attn.rotation @ q
        qh = q.view(H, D)
        # (H, E): each head's query pulled back through its key projection
        absorbed = torch.einsum("hd,hde->he", qh, wk.view(H, D, E))
        shared = (
            _shared_attention_gqa
            if self._absorbed_attention == "gqa"
            else SharedHeadAttentionFunction.apply
        )
        outputs = shared(
            absorbed,
            _mha_to_keep_mask(pad, "padding_masks"),
            ids if need_stats else None,
            M if need_stats else None,
            1.0 / math.sqrt(D),
            attn.backend,
            p_drop,
            rng_state,
            *segments,
        )
        mixed, prob_sum = outputs[0], outputs[1]  # (B, H, E), (B, H)
        kstats = AttentionStats(*outputs[2:])
        heads = torch.einsum("bhe,hde->bhd", mixed, wv.view(H, D, E))
        if bv is not None and p_drop > 0.0:
            # the kept probabilities, rescaled, no longer sum to 1
            heads = heads + prob_sum.to(dtype).unsqueeze(-1) * bv.view(H, D)
        elif bv is not None:
            heads = heads + bv.view(H, D)
        out = attn.out_proj(heads.reshape(B, E))
        if not need_stats:
            return out, None
        with torch.no_grad():
            raw = kstats.key_sum[:, 0]  # (B, M, E) sums of raw tokens; every head saw the same
            acc = raw.dtype
            key_sum = raw @ wk.detach().to(acc).transpose(0, 1)
            lse = kstats.lse
            if bk is not None:
                key_sum = key_sum + kstats.key_count[..., None] * bk.detach().to(acc)
                # the constant q_h . b_k,h was left out of every score
                shift = (qh.detach().to(acc) * bk.detach().to(acc).view(H, D)).sum(-1) / math.sqrt(
                    D
                )
                lse = lse + shift.view(1, H, 1)
            key_sum = key_sum.view(B, M, H, D).permute(0, 2, 1, 3).contiguous()
            stats = AttentionStats(kstats.modality_mass, key_sum, kstats.key_count, lse)
            tracked = q.detach().view(1, E).expand(B, E)
        return out, RollingQStats(stats, tracked, 0)
