"""nn layers over :func:`rolling_attention`: a drop-in MultiheadAttention and the [CLS] fusion.

``RollingQAttention`` has nn.MultiheadAttention's parameters under the same names, so a
MultiheadAttention state_dict loads into it unchanged; on top it holds the RollingQ rotation of
the [CLS] query (an (E, E) buffer, identity at start) and returns the kernel's statistics.

``RollingQFusion`` is the paper's attention fusion: a learned [CLS] token in front of the tokens
of every modality, one attention layer, and the fused [CLS] embedding as output. Only the [CLS]
row is computed and, by default, the key and value projections are absorbed into the query side,
so the tokens are never projected (see :meth:`RollingQFusion.forward`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import AttentionStats
from .api import rolling_attention
from .reference import key_modality_from_lengths

__all__ = ["RollingQStats", "RollingQAttention", "RollingQFusion"]


class RollingQStats(NamedTuple):
    """What a RollingQ module returns next to its output when asked for statistics.

    Fields:
        attention: the kernel's :class:`AttentionStats` (B = batch, H = heads, Lq = query rows,
            M = modalities, D = head dim): modality_mass (B, H, Lq, M), key_sum (B, H, M, D) of the
            *projected* keys, key_count (B, M), lse (B, H, Lq); float32 (float64 for float64).
        query: (B, E), the tracked query row (the [CLS] row) as attention saw it, i.e. after the
            rotation; detached, in the module's dtype.
        query_row: index of that row in the query sequence.
    """

    attention: AttentionStats
    query: torch.Tensor
    query_row: int


def _mha_to_keep_mask(
    key_padding_mask: Optional[torch.Tensor], name: str
) -> Optional[torch.Tensor]:
    # nn.MultiheadAttention's convention is True = ignore; the kernel's is True = takes part.
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = padding, ignored, as in nn.MultiheadAttention);"
            f" got {key_padding_mask.dtype}. Additive float masks are not supported."
        )
    return ~key_padding_mask


class RollingQAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` with RollingQ's query rotation.

    Parameters have MultiheadAttention's names and shapes (``in_proj_weight`` (3E, E),
    ``in_proj_bias`` (3E,), ``out_proj``), so ``load_state_dict(mha.state_dict())`` works,
    strict included. Buffers: ``rotation`` (E, E), identity at start, and ``num_rotations``
    (int64 scalar); the AIR history is kept in the extra state. All three are in ``state_dict``.

    The rotation acts on the full-embedding query of the rows chosen by ``rotated_queries``
    (default row 0, the [CLS] row), before the heads are split: q_i <- R q_i. How it is applied:
    identity: not at all; every row rotated: folded into the query projection (R W_q, R b_q);
    one head, or R block-diagonal per head: by the fused kernel (rotation (H, D, D) and
    rotated_queries); otherwise one (rows x E x E) matmul on the selected rows only.

    Differences from nn.MultiheadAttention, all explicit:
      * attention dropout cannot be fused into the kernel: ``dropout > 0`` is stored (and copied
        by :meth:`from_multihead_attention`) but ``forward`` raises in training mode. Put dropout
        on the output yourself, or set ``dropout=0``.
      * no attention weights: ``need_weights=True`` and ``attn_mask`` raise; the second output is
        :class:`RollingQStats` when ``need_stats=True``, else None (MultiheadAttention returns None
        there too with ``need_weights=False``).
      * ``kdim``/``vdim`` different from E, ``add_bias_kv`` and ``add_zero_attn`` are not supported.
      * a query row whose keys are all padded gets zeros before ``out_proj`` (MultiheadAttention
        gives NaN).

    Args:
        embed_dim: E. num_heads: H (E must be divisible by H).
        bias: projection biases, as in MultiheadAttention.
        dropout: see above.
        batch_first: True: (B, L, E) inputs and outputs; False: (L, B, E).
        rotated_queries: int, sequence of ints, or "all": the query rows the rotation applies to.
        backend: the :func:`rolling_attention` backend ("auto" by default).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        rotated_queries: Union[int, Sequence[int], str] = 0,
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads; got embed_dim={embed_dim},"
                f" num_heads={num_heads}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1]; got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.backend = backend
        if isinstance(rotated_queries, str):
            if rotated_queries != "all":
                raise ValueError(
                    f"rotated_queries must be an int, ints or 'all'; got {rotated_queries!r}"
                )
            self.rotated_queries: Union[str, Tuple[int, ...]] = "all"
        else:
            rows = (rotated_queries,) if isinstance(rotated_queries, int) else rotated_queries
            rows = tuple(sorted({int(r) for r in rows}))
            if not rows or rows[0] < 0:
                raise ValueError(f"rotated_queries must be non-negative row indices; got {rows}")
            self.rotated_queries = rows

        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.register_buffer("rotation", torch.eye(embed_dim, **factory))
        self.register_buffer("num_rotations", torch.zeros((), dtype=torch.long, device=device))
        self.air_history: List[float] = []
        self._rotation_cache: Optional[Tuple[Any, Dict[str, Any]]] = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_multihead_attention(
        cls, mha: nn.MultiheadAttention, **kwargs: Any
    ) -> RollingQAttention:
        """A RollingQAttention with ``mha``'s configuration and a copy of its weights.

        ``kwargs`` go to the constructor (e.g. ``rotated_queries``, ``backend``, ``dropout``).
        """
        if not mha._qkv_same_embed_dim:
            raise ValueError("from_multihead_attention needs kdim == vdim == embed_dim")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        w = mha.in_proj_weight
        kwargs.setdefault("bias", mha.in_proj_bias is not None)
        kwargs.setdefault("dropout", mha.dropout)
        kwargs.setdefault("batch_first", mha.batch_first)
        module = cls(mha.embed_dim, mha.num_heads, device=w.device, dtype=w.dtype, **kwargs)
        module.load_state_dict(mha.state_dict())
        return module

    # --- RollingQ state ----------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return {"air_history": list(self.air_history)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.air_history = [float(a) for a in state.get("air_history", [])]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A plain MultiheadAttention state_dict has no RollingQ state: keep ours (identity, 0,
        # empty history) instead of reporting missing keys, so it loads with strict=True.
        for name, value in (
            ("rotation", self.rotation),
            ("num_rotations", self.num_rotations),
            ("_extra_state", self.get_extra_state()),
        ):
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def compose_rotation(self, new_rotation: torch.Tensor) -> None:
        """R <- new_rotation @ R (in place, so DDP and optimisers keep seeing the same buffer)."""
        E = self.embed_dim
        if tuple(new_rotation.shape) != (E, E):
            raise ValueError(
                f"new_rotation must have shape ({E}, {E}); got {tuple(new_rotation.shape)}"
            )
        composed = new_rotation.to(torch.float64) @ self.rotation.to(torch.float64)
        self.rotation.copy_(composed.to(device=self.rotation.device, dtype=self.rotation.dtype))
        self.num_rotations += 1

    @torch.no_grad()
    def reset_rotation(self) -> None:
        """Back to the identity, with no rotation counted and an empty AIR history."""
        self.rotation.copy_(torch.eye(self.embed_dim, dtype=self.rotation.dtype))
        self.num_rotations.zero_()
        self.air_history = []

    def _rotation_plan(self) -> Dict[str, Any]:
        # How R is applied depends on its structure; checked once per change of the buffer
        # (its version counter moves with every in-place write, its pointer with .to()).
        R = self.rotation
        key = (R._version, R.data_ptr(), R.dtype, R.device)
        if self._rotation_cache is not None and self._rotation_cache[0] == key:
            return self._rotation_cache[1]
        H, D = self.num_heads, self.head_dim
        with torch.no_grad():
            identity = bool(
                torch.equal(R, torch.eye(self.embed_dim, dtype=R.dtype, device=R.device))
            )
            blocks = R.view(H, D, H, D).permute(0, 2, 1, 3)  # blocks[i, j] = R[iD:(i+1)D, jD:..]
            diag = torch.eye(H, dtype=torch.bool, device=R.device)
            block_diagonal = H == 1 or not bool(blocks[~diag].any())
            per_head = blocks[diag].contiguous() if block_diagonal else None  # (H, D, D)
        plan = {"identity": identity, "per_head": per_head}
        self._rotation_cache = (key, plan)
        return plan

    def _selected_rows(self, lq: int) -> Optional[Tuple[int, ...]]:
        # None = every row.
        if self.rotated_queries == "all":
            return None
        rows = tuple(r for r in self.rotated_queries if r < lq)
        if len(rows) == lq:
            return None
        return rows

    def tracked_row(self) -> int:
        """The query row whose statistics the controller uses: the first rotated row."""
        return 0 if self.rotated_queries == "all" else self.rotated_queries[0]

    # --- forward -----------------------------------------------------------------------------

    def _split(self):
        E = self.embed_dim
        w = self.in_proj_weight
        b = self.in_proj_bias
        # unbind, not three slices: its backward writes one (3E, E) gradient instead of
        # zero-filling a full-size gradient per slice
        ws = w.view(3, E, E).unbind(0)
        bs = (None, None, None) if b is None else b.view(3, E).unbind(0)
        return ws, bs

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        *,
        key_modality: Optional[torch.Tensor] = None,
        num_modalities: Optional[int] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_stats: bool = False,
        is_causal: bool = False,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[RollingQStats]]:
        """Multi-head attention with the RollingQ rotation on the selected query rows.

        Args:
            query: (B, Lq, E) (``batch_first``), (Lq, B, E) otherwise, or unbatched (Lq, E).
            key, value: (B, Lk, E) likewise; None means ``key = query`` and ``value = key``.
            key_modality: None, integer (Lk,) or (B, Lk): modality id of each key, -1 for a key
                counted in no modality (e.g. the [CLS] key). Only used for the statistics.
            num_modalities: M; None infers it from ``key_modality``.
            key_padding_mask: None or bool (B, Lk) with nn.MultiheadAttention's convention:
                **True = padding, ignored**.
            need_stats: also return :class:`RollingQStats`.
            is_causal: top-left aligned causal mask (SDPA semantics).
            need_weights, attn_mask: accepted for MultiheadAttention call compatibility; only
                ``False`` / ``None`` are supported.

        Returns:
            (out, stats): out like ``query`` (E features) in the module's dtype; stats is
            :class:`RollingQStats` when ``need_stats`` else None.
        """
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: the fused kernel never materialises the "
                "attention matrix; use need_stats=True for per-modality attention mass"
            )
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported; use key_padding_mask or is_causal")
        if self.training and self.dropout > 0.0:
            raise RuntimeError(
                f"RollingQAttention has dropout={self.dropout}, but attention dropout cannot be "
                "fused into the kernel; construct it with dropout=0.0 (and apply dropout to the "
                "output if you need it), or call .eval()"
            )
        unbatched = query.dim() == 2
        key = query if key is None else key
        value = key if value is None else value
        same_kv = key is value
        self_attention = same_kv and key is query
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have shape (B, L, {self.embed_dim}) (batch_first) or unbatched "
                    f"(L, {self.embed_dim}); got {tuple(t.shape)}"
                )
        B, Lq, E = query.shape
        H, D = self.num_heads, self.head_dim

        plan = self._rotation_plan()
        rows = self._selected_rows(Lq)
        (wq, wk, wv), (bq, bk, bv) = self._split()
        R = self.rotation
        kernel_rotation = None
        kernel_rows = None
        explicit_rows = None
        folded = False
        if not plan["identity"] and rows != ():
            if rows is None and B * Lq > E:
                # every row: R (W_q x + b_q) = (R W_q) x + R b_q, one (E, E, E) product per call,
                # cheaper than rotating B * Lq > E rows
                wq = R @ wq
                bq = None if bq is None else R @ bq
                folded = True
            elif rows is None:
                explicit_rows = tuple(range(Lq))
            elif plan["per_head"] is not None:
                kernel_rotation = plan["per_head"]
                sel = torch.zeros(Lq, dtype=torch.bool)
                sel[list(rows)] = True
                kernel_rows = sel.to(query.device)
            else:
                explicit_rows = rows

        if self_attention and not folded:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, wq, bq)
            if same_kv:
                bkv = None if self.in_proj_bias is None else self.in_proj_bias[E:]
                k, v = F.linear(key, self.in_proj_weight[E:], bkv).chunk(2, dim=-1)
            else:
                k = F.linear(key, wk, bk)
                v = F.linear(value, wv, bv)
        if explicit_rows is not None and len(explicit_rows) == Lq:
            q = q @ R.transpose(0, 1)
        elif explicit_rows is not None:
            idx = torch.tensor(explicit_rows, device=q.device)
            q = q.index_copy(1, idx, q.index_select(1, idx) @ R.transpose(0, 1))

        Lk = k.shape[1]
        qh = q.view(B, Lq, H, D).transpose(1, 2)
        kh = k.view(B, Lk, H, D).transpose(1, 2)
        vh = v.view(B, Lk, H, D).transpose(1, 2)
        result = rolling_attention(
            qh,
            kh,
            vh,
            rotation=kernel_rotation,
            rotated_queries=kernel_rows,
            key_modality=key_modality if need_stats else None,
            num_modalities=num_modalities if need_stats else None,
            key_padding_mask=_mha_to_keep_mask(key_padding_mask, "key_padding_mask"),
            is_causal=is_causal,
            return_stats=need_stats,
            backend=self.backend,
        )
        attn, kstats = result if need_stats else (result, None)
        out = self.out_proj(attn.transpose(1, 2).reshape(B, Lq, E))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_stats:
            return out, None
        row = min(self.tracked_row(), Lq - 1)
        with torch.no_grad():
            tracked = q[:, row].detach()
            if kernel_rotation is not None and row in rows:
                tracked = tracked @ R.transpose(0, 1)
        return out, RollingQStats(kstats, tracked, row)


class SharedHeadAttentionFunction(torch.autograd.Function):
    """One query row per head over keys = values = x, shared by all heads (Lq = 1).

    ``apply(a, keep, ids, num_modalities, scale, backend, *segments)``: x (B, L, E) is the
    concatenation of ``segments`` (each (B, L_s, E)) along L. Forward: :func:`rolling_attention`
    on ``a`` (H, E) broadcast over the batch and x broadcast over the heads (stride-0 views), with
    statistics (the log-sum-exp is needed for the backward). Returns (mixed (B, H, E),
    modality_mass, key_sum, key_count, lse); only ``mixed`` is differentiable.

    Backward, written for this shape because both gradients are rank one per (sample, head):
    with p_j = exp(scale a.x_j - lse) and ds_j = p_j (g.x_j - g.mixed) for the incoming g,
    dx_j = sum_h (scale ds_hj a_h + p_hj g_h) and da_h = scale sum_j ds_hj x_j. Per segment that
    is two reads of its tokens and one write of their gradient, as a fresh tensor the optimiser can
    take without a copy -- instead of a generic attention backward that materialises separate
    (B, H, L, E) key and value gradients in different layouts and sums them over the heads.
    """

    @staticmethod
    def forward(ctx, a, keep, ids, num_modalities, scale, backend, *segments):
        x = torch.cat(segments, dim=1) if len(segments) > 1 else segments[0]
        B, L, E = x.shape
        H = a.shape[0]
        kv = x.unsqueeze(1).expand(B, H, L, E)
        mixed, st = rolling_attention(
            a.view(1, H, 1, E).expand(B, H, 1, E),
            kv,
            kv,
            key_modality=ids,
            num_modalities=num_modalities,
            key_padding_mask=keep,
            scale=scale,
            return_stats=True,
            backend=backend,
        )
        mixed = mixed[:, :, 0]
        # the segments, not x: x is freed now, and the backward works segment by segment
        ctx.save_for_backward(a, keep, mixed, st.lse, *segments)
        ctx.scale = scale
        ctx.mark_non_differentiable(*st)
        return (mixed, *st)

    @staticmethod
    def backward(ctx, g, *unused):
        a, keep, mixed, lse, *segments = ctx.saved_tensors
        scale = ctx.scale
        H, E = a.shape
        B = g.shape[0]
        dtype = segments[0].dtype
        acc = lse.dtype
        both = torch.cat([a.unsqueeze(0).expand(B, H, E), g.to(dtype)], dim=1)  # (B, 2H, E)
        delta = (g.to(acc) * mixed.to(acc)).sum(-1).unsqueeze(1)  # (B, 1, H)
        lse_row = lse[:, :, 0].unsqueeze(1)  # (B, 1, H)
        da = torch.zeros(H, E, dtype=dtype, device=a.device)
        grads = []
        start = 0
        for seg in segments:
            n = seg.shape[1]
            if not ctx.needs_input_grad[6 + len(grads)] and not ctx.needs_input_grad[0]:
                grads.append(None)
                start += n
                continue
            dots = torch.bmm(seg.expand(B, n, E), both.transpose(1, 2))  # (B, n, 2H): a.x, g.x
            p = torch.exp(dots[..., :H].to(acc) * scale - lse_row)
            if keep is not None:  # where, not a product: a padded key's exp may overflow
                p = p.masked_fill(~keep[:, start : start + n].unsqueeze(-1), 0.0)
            ds = p * (dots[..., H:].to(acc) - delta)
            coef = torch.cat([ds * scale, p], dim=-1).to(dtype)  # (B, n, 2H)
            grads.append(torch.bmm(coef, both) if ctx.needs_input_grad[6 + len(grads)] else None)
            da += coef[..., :H].reshape(B * n, H).transpose(0, 1) @ seg.expand(B, n, E).reshape(
                B * n, E
            )
            start += n
        return (da, None, None, None, None, None, *grads)


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
    """

    MODES = ("absorbed", "projected", "full")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        *,
        bias: bool = True,
        mode: str = "absorbed",
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {list(self.MODES)}; got {mode!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mode = mode
        self.cls_token = nn.Parameter(torch.empty(embed_dim, device=device, dtype=dtype))
        nn.init.normal_(self.cls_token, std=0.02)
        self.attn = RollingQAttention(
            embed_dim,
            num_heads,
            bias=bias,
            batch_first=True,
            rotated_queries=0,
            backend=backend,
            device=device,
            dtype=dtype,
        )

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
            return self._absorbed(segments, ids, pad, len(tokens), need_stats)
        x, ids, pad = self.sequence(tokens, padding_masks)
        M = len(tokens)
        kw = {"key_padding_mask": pad, "need_stats": need_stats}
        if need_stats:
            kw.update(key_modality=ids, num_modalities=M)
        if mode == "full":
            out, stats = self.attn(x, **kw)
            return out[:, 0], stats
        out, stats = self.attn(x[:, :1], x, **kw)
        return out[:, 0], stats

    def _absorbed(self, segments, ids, pad, M, need_stats):
        attn = self.attn
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
        outputs = SharedHeadAttentionFunction.apply(
            absorbed,
            _mha_to_keep_mask(pad, "padding_masks"),
            ids if need_stats else None,
            M if need_stats else None,
            1.0 / math.sqrt(D),
            attn.backend,
            *segments,
        )
        mixed = outputs[0]  # (B, H, E)
        kstats = AttentionStats(*outputs[1:])
        heads = torch.einsum("bhe,hde->bhd", mixed, wv.view(H, D, E))
        if bv is not None:
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
