"""A drop-in ``nn.MultiheadAttention`` with RollingQ's query rotation and statistics.

``RollingQAttention`` has nn.MultiheadAttention's parameters under the same names, so a
MultiheadAttention state_dict loads into it unchanged; on top it holds the RollingQ rotation of
the [CLS] query (an (E, E) buffer, identity at start) and returns the kernel's statistics.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import AttentionStats
from .api import rolling_attention

__all__ = ["RollingQStats", "RollingQAttention"]


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
