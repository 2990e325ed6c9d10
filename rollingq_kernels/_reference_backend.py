"""The "reference" backend: the oracle in rollingq_kernels.reference, behind the registry."""

from __future__ import annotations

from typing import List, Optional

from .op_contract import layout_like
from .reference import rolling_attention_reference


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reasons(problem) -> List[str]:
    return []


def forward(p):
    result = rolling_attention_reference(
        p.q,
        p.k,
        p.v,
        rotation=p.rotation,
        rotated_queries=p.rotated_queries,
        key_modality=p.key_modality,
        num_modalities=p.num_modalities if p.return_stats else None,
        key_padding_mask=p.key_padding_mask,
        attn_mask=p.attn_mask,
        is_causal=p.is_causal,
        causal_offset=p.causal_offset,
        scale=p.scale,
        dropout_p=p.dropout_p,
        rng_state=p.rng_state,
        enable_gqa=p.gqa,
        return_stats=p.return_stats,
    )
    out, stats = result if p.return_stats else (result, None)
    # the output in q's memory layout, as every backend returns it
    return layout_like(p.q, out.shape).copy_(out), stats
