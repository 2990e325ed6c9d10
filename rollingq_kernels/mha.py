"""A drop-in ``nn.MultiheadAttention`` with RollingQ's query rotation and statistics.

``RollingQAttention`` has nn.MultiheadAttention's constructor, parameters, attributes and forward,
so it replaces one inside nn.Transformer*Layer or any model and a MultiheadAttention state_dict
loads into it unchanged; on top it holds the RollingQ rotation of the [CLS] query (an (E, E)
buffer, identity at start) and returns the kernel's statistics.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import AttentionStats, accumulation_dtype
from .api import rolling_attention
from .dropout import dropout_keep_mask, new_rng_state
from .rollingq_math import compose_rotations

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


def _no_fast_path(module: nn.Module, args) -> None:
    # A forward pre-hook that does nothing. nn.TransformerEncoderLayer takes a fused inference
    # path that reads self_attn's weights and never calls self_attn (it would skip the rotation
    # and the statistics); it does not take it when a submodule has hooks.
    return None


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # nn.MultiheadAttention's convention: a bool mask is True where attention is NOT allowed
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask


class RollingQAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` with RollingQ's query rotation.

    Same constructor arguments (in the same order), parameters, attributes and ``forward`` as
    ``nn.MultiheadAttention``, so it replaces one inside ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` or any model (``rollingq_kernels.integrations.torch_nn.
    replace_multihead_attention`` swaps them all), and a MultiheadAttention state_dict loads into it
    unchanged (strict). On top it holds the RollingQ rotation ``rotation`` (E, E), identity at
    start, and ``num_rotations``; the AIR history is kept in the extra state. All three are in
    ``state_dict``; :meth:`to_multihead_attention` goes back to a plain module.

    The rotation acts on the full-embedding query of the rows chosen by ``rotated_queries``
    (default row 0, the [CLS] row), before the heads are split: q_i <- R q_i. How it is applied:
    identity: not at all; every row rotated: folded into the query projection (R W_q, R b_q);
    one head, or R block-diagonal per head: by the fused kernel (rotation (H, D, D) and
    rotated_queries); otherwise one (rows x E x E) matmul on the selected rows only.

    ``forward`` follows nn.MultiheadAttention: ``key_padding_mask`` and ``attn_mask`` bool (True =
    **not** attended) or float (added to the scores), ``is_causal`` as a hint with ``attn_mask``
    (or alone: the causal mask itself), ``need_weights`` (default True, as in MultiheadAttention)
    and ``average_attn_weights``. With ``need_weights=False`` the fused kernel runs; with
    ``need_weights=True`` the attention weights are materialised (O(L^2) memory, as
    MultiheadAttention does then): pass ``need_weights=False`` wherever the weights are not used,
    as nn.Transformer*Layer do. ``need_stats=True`` returns :class:`RollingQStats` as the second
    output instead of the weights, from the fused kernel. Attention dropout (``dropout > 0`` in
    training) is the kernel's counter-based dropout, seeded from torch's generator
    (``torch.manual_seed`` reproduces it; the weights path uses the same keep-mask).

    Differences from nn.MultiheadAttention, all explicit:
      * ``batch_first`` defaults to True (MultiheadAttention: False);
        :meth:`from_multihead_attention` copies the module's setting.
      * ``add_bias_kv`` and ``add_zero_attn`` are not supported (ValueError).
      * a query row whose keys are all masked gets zeros before ``out_proj`` (and zero weights)
        where MultiheadAttention's weights path gives NaN.
      * ``is_causal=True`` without ``attn_mask`` is accepted (the causal mask), where
        MultiheadAttention raises.
      * nested-tensor inputs are refused: an ``nn.TransformerEncoder`` built with
        ``enable_nested_tensor=True`` needs ``use_nested_tensor = False`` once its layers hold a
        RollingQAttention (``replace_multihead_attention`` sets it).

    Args:
        embed_dim: E. num_heads: H (E must be divisible by H).
        dropout: attention dropout probability in training.
        bias: projection biases, as in MultiheadAttention.
        add_bias_kv, add_zero_attn: accepted for signature compatibility; must be False.
        kdim, vdim: feature sizes of key and value (default E), as in MultiheadAttention.
        batch_first: True: (B, L, E) inputs and outputs; False: (L, B, E).
        rotated_queries: int, sequence of ints, or "all": the query rows the rotation applies to.
        backend: the :func:`rolling_attention` backend ("auto" by default).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        rotated_queries: Union[int, Sequence[int], str] = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads; got embed_dim={embed_dim},"
                f" num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        if add_bias_kv or add_zero_attn:
            raise ValueError(
                "add_bias_kv and add_zero_attn are not supported by RollingQAttention; got "
                f"add_bias_kv={add_bias_kv}, add_zero_attn={add_zero_attn}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
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

        E = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * E, E, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(E, E, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(E, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(E, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * E, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
            E, E, bias=bias, **factory
        )
        self.register_buffer("rotation", torch.eye(E, **factory))
        self.register_buffer("num_rotations", torch.zeros((), dtype=torch.long, device=device))
        self.air_history: List[float] = []
        self._rotation_cache: Optional[Tuple[Any, Dict[str, Any]]] = None
        self._reset_parameters()
        self.register_forward_pre_hook(_no_fast_path)

    def _reset_parameters(self) -> None:
        # MultiheadAttention's initialisation.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
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
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by RollingQAttention")
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        kwargs.setdefault("bias", mha.in_proj_bias is not None)
        kwargs.setdefault("dropout", mha.dropout)
        kwargs.setdefault("batch_first", mha.batch_first)
        kwargs.setdefault("kdim", mha.kdim)
        kwargs.setdefault("vdim", mha.vdim)
        module = cls(mha.embed_dim, mha.num_heads, device=w.device, dtype=w.dtype, **kwargs)
        module.load_state_dict(mha.state_dict())
        module.train(mha.training)
        return module

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with this module's configuration and weights.

        A rotation applied to every row (``rotated_queries="all"``) is folded into the query
        projection (W_q <- R W_q, b_q <- R b_q), so the result computes the same function. A
        rotation of some rows only (the [CLS] row) cannot be expressed by MultiheadAttention:
        that raises ValueError; :meth:`reset_rotation` first to drop it knowingly.
        """
        w = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.in_proj_bias is not None,
            kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=w.device,
            dtype=w.dtype,
        )  # fmt: skip
        state = {
            k: v
            for k, v in self.state_dict().items()
            if k not in ("rotation", "num_rotations", "_extra_state")
        }
        if not self._rotation_plan()["identity"]:
            if self.rotated_queries != "all":
                raise ValueError(
                    f"the rotation applies to query rows {self.rotated_queries} only, which "
                    "nn.MultiheadAttention cannot express; call reset_rotation() first to drop it"
                )
            E = self.embed_dim
            R = self.rotation.detach().to(torch.float64)
            qkey = "in_proj_weight" if self._qkv_same_embed_dim else "q_proj_weight"
            wq = state[qkey].clone()
            wq[:E] = (R @ wq[:E].to(torch.float64)).to(wq.dtype)
            state[qkey] = wq
            if self.in_proj_bias is not None:
                b = state["in_proj_bias"].clone()
                b[:E] = (R @ b[:E].to(torch.float64)).to(b.dtype)
                state["in_proj_bias"] = b
        mha.load_state_dict(state)
        mha.train(self.training)
        return mha

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
        # re-orthonormalised: a plain product drifts from orthogonality with every composition
        composed = compose_rotations(new_rotation.to(self.rotation), self.rotation)
        self.rotation.copy_(composed)
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
        if torch.compiler.is_compiling():
            # the structure is data-dependent: a traced forward applies R as a general matrix,
            # which is right for every R (the identity included)
            return {"identity": False, "per_head": None}
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
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            # unbind, not three slices: its backward writes one (3E, E) gradient instead of
            # zero-filling a full-size gradient per slice
            ws = self.in_proj_weight.view(3, E, E).unbind(0)
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        bs = (None, None, None) if b is None else b.view(3, E).unbind(0)
        return ws, bs

    def _masks(self, key_padding_mask, attn_mask, is_causal, need_weights, B, Lq, Lk, dtype):
        """nn.MultiheadAttention's masks -> (key_padding keep-mask, attn_mask for the kernel,
        is_causal), with MultiheadAttention's rules for the is_causal hint."""
        H = self.num_heads
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if tuple(key_padding_mask.shape) != (B, Lk):
                raise ValueError(
                    f"key_padding_mask must have shape ({B}, {Lk}) (batch, keys); got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.dtype == torch.bool:
                pad = ~key_padding_mask  # the kernel's convention: True = takes part
            elif key_padding_mask.is_floating_point():
                pad = key_padding_mask.to(dtype).view(B, 1, 1, Lk)  # additive, merged below
            else:
                raise TypeError(
                    "key_padding_mask must be bool (True = padding, ignored) or float (added to "
                    f"the scores), as in nn.MultiheadAttention; got {key_padding_mask.dtype}"
                )
        if is_causal and attn_mask is not None and pad is None and not need_weights:
            attn_mask = None  # the hint: attn_mask is the causal mask
        elif attn_mask is not None:
            is_causal = False
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(
                    "attn_mask must be bool (True = not attended) or float (added to the "
                    f"scores), as in nn.MultiheadAttention; got {attn_mask.dtype}"
                )
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (Lq, Lk):
                    raise ValueError(
                        f"a 2-D attn_mask must have shape ({Lq}, {Lk}); got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask.view(1, 1, Lq, Lk)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (B * H, Lq, Lk):
                    raise ValueError(
                        f"a 3-D attn_mask must have shape (batch * heads, Lq, Lk) = "
                        f"({B * H}, {Lq}, {Lk}); got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask.view(B, H, Lq, Lk)
            else:
                raise ValueError(
                    f"attn_mask must be 2-D (Lq, Lk) or 3-D (batch * heads, Lq, Lk); got "
                    f"{attn_mask.dim()}-D {tuple(attn_mask.shape)}"
                )
            if attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask if pad is None or pad.dtype == torch.bool else attn_mask
            else:
                attn_mask = attn_mask.to(dtype)
        if pad is not None and pad.dtype != torch.bool:
            # a float key_padding_mask is additive: it joins attn_mask (as MultiheadAttention
            # merges them); alone it stays a broadcast (B, 1, 1, Lk) view
            attn_mask = pad if attn_mask is None else _float_mask(attn_mask, dtype) + pad
            pad = None
        return pad, attn_mask, is_causal

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        key_modality: Optional[torch.Tensor] = None,
        num_modalities: Optional[int] = None,
        need_stats: bool = False,
    ) -> Tuple[torch.Tensor, Union[None, torch.Tensor, RollingQStats]]:
        """Multi-head attention with the RollingQ rotation on the selected query rows.

        Args (nn.MultiheadAttention's, in its order):
            query: (B, Lq, E) (``batch_first``), (Lq, B, E) otherwise, or unbatched (Lq, E).
            key, value: (B, Lk, kdim) / (B, Lk, vdim) likewise; None means ``key = query`` and
                ``value = key``.
            key_padding_mask: None, bool (B, Lk) **True = padding, ignored**, or float (B, Lk)
                added to the scores.
            need_weights: return the attention weights (materialised: O(L^2)); False runs the
                fused kernel.
            attn_mask: None, (Lq, Lk) or (B * H, Lq, Lk); bool True = not attended, or float.
            average_attn_weights: weights averaged over heads (B, Lq, Lk), else (B, H, Lq, Lk).
            is_causal: with attn_mask, a hint that it is the causal mask (used as
                MultiheadAttention uses it); alone, the causal mask (top-left aligned).
        RollingQ's (keyword only):
            key_modality: None, integer (Lk,) or (B, Lk): modality id of each key, -1 for a key
                counted in no modality (e.g. the [CLS] key). Only used for the statistics.
            num_modalities: M; None infers it from ``key_modality``.
            need_stats: return :class:`RollingQStats` as the second output (instead of the
                weights; the fused kernel runs).

        Returns:
            (out, second): out like ``query`` (E features) in the module's dtype; second is
            :class:`RollingQStats` with ``need_stats``, else the weights with ``need_weights``,
            else None.
        """
        if query.is_nested or (key is not None and key.is_nested):
            raise TypeError(
                "RollingQAttention does not take nested tensors; an nn.TransformerEncoder built "
                "with enable_nested_tensor=True passes them in eval mode: set its "
                "use_nested_tensor = False (replace_multihead_attention does)"
            )
        unbatched = query.dim() == 2
        key = query if key is None else key
        value = key if value is None else value
        same_kv = key is value
        self_attention = same_kv and key is query
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for name, t, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.dim() != 3 or t.shape[-1] != dim:
                layout = "(B, L, {0})" if self.batch_first else "(L, B, {0})"
                raise ValueError(
                    f"{name} must have shape {layout.format(dim)} or unbatched (L, {dim}); got "
                    f"{tuple(t.shape) if not unbatched else tuple(t.shape[1:])}"
                )
        B, Lq, E = query.shape
        Lk = key.shape[1]
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"query, key and value must share the batch size and key and value the length; "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        H, D = self.num_heads, self.head_dim
        weights_path = need_weights and not need_stats
        pad, mask, causal = self._masks(
            key_padding_mask, attn_mask, is_causal, weights_path, B, Lq, Lk, query.dtype
        )
        dropout_p = self.dropout if self.training else 0.0

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

        if self_attention and not folded and self._qkv_same_embed_dim:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, wq, bq)
            if same_kv and self._qkv_same_embed_dim:
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

        qh = q.view(B, Lq, H, D).transpose(1, 2)
        kh = k.view(B, Lk, H, D).transpose(1, 2)
        vh = v.view(B, Lk, H, D).transpose(1, 2)
        weights = None
        if weights_path:
            attn, weights = _attention_with_weights(
                qh, kh, vh, kernel_rotation, kernel_rows, pad, mask, causal, dropout_p
            )
            kstats = None
        else:
            result = rolling_attention(
                qh,
                kh,
                vh,
                rotation=kernel_rotation,
                rotated_queries=kernel_rows,
                key_modality=key_modality if need_stats else None,
                num_modalities=num_modalities if need_stats else None,
                key_padding_mask=pad,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=dropout_p,
                return_stats=need_stats,
                backend=self.backend,
            )
            attn, kstats = result if need_stats else (result, None)
        # attn is in q's (B, Lq, H, D) layout: this reshape is free
        out = self.out_proj(attn.transpose(1, 2).reshape(B, Lq, E))
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_stats:
            return out, weights
        row = min(self.tracked_row(), Lq - 1)
        with torch.no_grad():
            tracked = q[:, row].detach()
            if kernel_rotation is not None and row in rows:
                tracked = tracked @ R.transpose(0, 1)
        return out, RollingQStats(kstats, tracked, row)


def _attention_with_weights(q, k, v, rotation, rows, pad, mask, is_causal, dropout_p):
    """Attention with materialised weights (nn.MultiheadAttention's need_weights path): returns
    (out (B, H, Lq, Dv) in q's dtype, weights (B, H, Lq, Lk) after dropout, as MultiheadAttention
    returns them). Dropout uses the kernels' keep-mask, so a seed gives the same result on both
    paths. Differentiable by autograd; O(Lq * Lk) memory."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if rotation is not None:
        rotated = torch.matmul(qf, rotation.to(acc).transpose(-1, -2).unsqueeze(0))
        qf = torch.where(rows.view(1, 1, Lq, 1), rotated, qf)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(D)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)
    if pad is not None:
        scores = scores.masked_fill(~pad.view(B, 1, 1, Lk), float("-inf"))
    if is_causal:
        visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    e = torch.exp(scores - top)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(new_rng_state(), dropout_p, (B, H, Lq, Lk), device=q.device)
        probs = probs * keep.to(acc) / (1.0 - dropout_p)
    out = torch.matmul(probs, vf).to(q.dtype)
    return out, probs.to(q.dtype)
