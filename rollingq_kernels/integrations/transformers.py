"""Hugging Face transformers: this package's attention as an ``attn_implementation``.

::

    from rollingq_kernels.integrations import transformers as rq_hf

    rq_hf.register()  # once; returns "rollingq"
    model = AutoModel.from_config(config, attn_implementation="rollingq")
    # or, for a model already built:  model.set_attn_implementation("rollingq")

``register()`` adds two things under one name:

* the attention function (transformers' ``AttentionInterface``): every argument transformers'
  own ``"sdpa"`` implementation handles — boolean masks, ``is_causal``, attention dropout in
  training, grouped-query attention without copying K/V (``enable_gqa``), ``scaling``, T5-style
  ``position_bias`` — goes to :func:`rollingq_kernels.scaled_dot_product_attention`, which runs the
  fused kernel when a backend of this package can, and torch's SDPA otherwise;
* the mask builder (``AttentionMaskInterface``): transformers builds attention masks only for the
  names registered there, so without it padding would be dropped silently. It builds the masks
  ``"sdpa"`` builds (boolean, True = attend, ``None`` where ``is_causal`` suffices), except that a
  padding-only mask of a bidirectional model is returned as a broadcast (B, 1, 1, Lk) view instead
  of a materialised (B, 1, Lq, Lk) tensor.

:func:`record_stats` additionally records the RollingQ statistics (per-modality attention mass,
key sums, the [CLS] query) of chosen layers for a given modality layout of the sequence.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..api import rolling_attention, scaled_dot_product_attention
from ..mha import RollingQStats
from ..rollingq_math import modality_cosine

__all__ = [
    "DEFAULT_NAME",
    "StatsRecorder",
    "attention_forward",
    "mask_function",
    "record_stats",
    "register",
]

DEFAULT_NAME = "rollingq"


# ---- the attention function -----------------------------------------------------------------


def _position_bias_mask(position_bias, attention_mask, is_causal, q_len, k_len, dtype, device):
    # An additive float mask holding the bias where a key is visible and the dtype's lowest value
    # elsewhere, as transformers' "sdpa" builds it.
    low = torch.finfo(dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        return torch.where(visible, position_bias, low)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, low)
    return position_bias + attention_mask


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers' attention-function signature: (B, H, Lq, D) query, (B, Hkv, Lk, D) key and
    value, the mask built by :func:`mask_function`; returns ((B, Lq, H, Dv) output, None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "attn_implementation='rollingq' does not support softcap (logit soft-capping); got "
            f"softcap={kwargs['softcap']}; use attn_implementation='eager' for this model"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            "attn_implementation='rollingq' does not support attention sinks (s_aux); use "
            "attn_implementation='eager' for this model"
        )
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' "sdpa": the flag only where no mask was built and there is more than one
    # query (one query row sees every cached key: lower-right alignment without a mask).
    is_causal = bool(is_causal) and q_len > 1 and attention_mask is None
    if is_causal and k_len > q_len:
        # Only a prefill into an empty static cache gets here: the keys past q_len are empty
        # slots that upper-left causality hides anyway.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _position_bias_mask(
            position_bias, attention_mask, is_causal, q_len, key.shape[2], query.dtype, query.device
        )
        is_causal = False
    gqa = key.shape[1] != query.shape[1]

    recorder = _RECORDING.get(id(module)) if _RECORDING else None
    if recorder is not None:
        out = recorder._attend(module, query, key, value, attention_mask, dropout, scaling,
                               is_causal, gqa)  # fmt: skip
    else:
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
            scale=scaling, enable_gqa=gqa,
        )  # fmt: skip
    # the output is in query's layout: for the usual (B, L, H, D) projections this is free
    out = out.transpose(1, 2).contiguous()
    return out, None


# ---- the mask builder -----------------------------------------------------------------------


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    **kwargs,
):
    """transformers' mask-interface signature; the masks of its "sdpa" builder (see the module
    docstring for the one difference)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if (
        mask_function is mu.bidirectional_mask_function
        and attention_mask is not None
        and attention_mask.dim() == 2
        and local_size is None
        and not use_vmap
    ):
        # padding only: one row of the mask serves every query row, read through stride 0
        pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        pad = pad[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if allow_is_bidirectional_skip and mu._ignore_bidirectional_mask_sdpa(pad, kv_length):
            return None  # no padding at all: no mask (as "sdpa" decides it)
        return pad[:, None, None, :]
    return mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, **kwargs,
    )  # fmt: skip


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention function and the mask builder with transformers under ``name``
    (usable as ``attn_implementation=name``); returns ``name``. Calling it again is harmless."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str; got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name


# ---- RollingQ statistics of chosen layers ---------------------------------------------------

# id(attention module) -> recorder; empty unless record_stats() is active
_RECORDING: Dict[int, StatsRecorder] = {}


class StatsRecorder:
    """Holds the statistics recorded by :func:`record_stats`: ``stats[name]`` is a
    :class:`~rollingq_kernels.RollingQStats` per recorded layer (its last call), with the kernel's
    :class:`~rollingq_kernels.AttentionStats` (B, H, ...) and the query of row ``query_row``
    as (B, H * D)."""

    def __init__(self, names: Dict[int, str], key_modality, num_modalities, key_padding_mask,
                 query_row: int):  # fmt: skip
        self._names = names
        self.key_modality = key_modality
        self.num_modalities = num_modalities
        self.key_padding_mask = key_padding_mask
        self.query_row = query_row
        self.stats: Dict[str, RollingQStats] = {}

    def cosines(self, name: str) -> torch.Tensor:
        """(B, M): cosine of the recorded layer's query row with each modality's mean key (full
        embedding), the quantity behind the Attention Imbalance Rate."""
        s = self.stats[name]
        B, H, M, D = s.attention.key_sum.shape
        query = s.query.view(B, 1, H, D).transpose(1, 2)
        return modality_cosine(query, s.attention)[:, 0]

    def _attend(self, module, query, key, value, mask, dropout, scaling, is_causal, gqa):
        B, H, Lq, D = query.shape
        Lk = key.shape[2]
        ids = self.key_modality
        if ids.shape[-1] != Lk:
            raise ValueError(
                f"record_stats: key_modality has {ids.shape[-1]} keys but layer "
                f"{self._names[id(module)]!r} attends over Lk={Lk}"
            )
        pad = self.key_padding_mask
        if pad is not None:
            pad = pad.to(device=query.device, dtype=torch.bool)[:, -Lk:]
        out, stats = rolling_attention(
            query, key, value, key_modality=ids.to(query.device),
            num_modalities=self.num_modalities, key_padding_mask=pad, attn_mask=mask,
            is_causal=is_causal, scale=scaling, dropout_p=dropout, enable_gqa=gqa,
            return_stats=True,
        )  # fmt: skip
        row = min(self.query_row, Lq - 1)
        tracked = query[:, :, row].detach().reshape(B, H * D)
        self.stats[self._names[id(module)]] = RollingQStats(stats, tracked, row)
        return out


def _attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    # the modules that call the attention function: those holding a config with an attention
    # implementation and the usual projection names, or any module with `is_causal` set
    found = {}
    for name, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or not hasattr(cfg, "_attn_implementation"):
            continue
        if any(hasattr(mod, p) for p in ("q_proj", "query", "qkv_proj", "qkv", "c_attn")):
            found[name] = mod
    return found


@contextlib.contextmanager
def record_stats(
    model: nn.Module,
    key_modality: torch.Tensor,
    *,
    layers: Union[None, str, Iterable[str]] = None,
    num_modalities: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_row: int = 0,
) -> Iterator[StatsRecorder]:
    """Within the block, the chosen attention layers of ``model`` (run with this package's
    ``attn_implementation``) also compute the RollingQ statistics, in the same fused pass.

    Args:
        model: a transformers model whose ``config._attn_implementation`` is the registered name.
        key_modality: integer (Lk,) or (B, Lk): modality id of each key (-1 = counted nowhere,
            e.g. the [CLS] key), as for :func:`rollingq_kernels.rolling_attention`.
        layers: names of attention modules (as in ``model.named_modules()``), a substring every
            chosen name contains, or None for every attention module found.
        num_modalities: M (None infers it from the ids).
        key_padding_mask: the model's 2-D ``attention_mask`` (1 / True = real token), so that
            padded keys count in no modality.
        query_row: the query row whose query is kept (the [CLS] row, 0, by default).

    Yields a :class:`StatsRecorder`; ``recorder.stats[name]`` holds each layer's last call.
    Eager mode only (the recorder is not traced by torch.compile).
    """
    modules = _attention_modules(model)
    if isinstance(layers, str):
        chosen = {n: m for n, m in modules.items() if layers in n}
    elif layers is not None:
        wanted = list(layers)
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise ValueError(
                f"layers {missing} are not attention modules of this model; found "
                f"{sorted(modules)[:8]}{' ...' if len(modules) > 8 else ''}"
            )
        chosen = {n: modules[n] for n in wanted}
    else:
        chosen = modules
    if not chosen:
        raise ValueError(f"record_stats found no attention module matching layers={layers!r}")
    if not isinstance(key_modality, torch.Tensor) or key_modality.is_floating_point():
        raise TypeError("key_modality must be an integer tensor of shape (Lk,) or (B, Lk)")
    names = {id(m): n for n, m in chosen.items()}
    recorder = StatsRecorder(names, key_modality, num_modalities, key_padding_mask, query_row)
    for mid in names:
        if mid in _RECORDING:
            raise RuntimeError("record_stats blocks on the same layer cannot be nested")
    for mid in names:
        _RECORDING[mid] = recorder
    try:
        yield recorder
    finally:
        for mid in names:
            _RECORDING.pop(mid, None)
