"""The "reference" backend: the oracle in rollingq_kernels.reference, behind the registry."""

from __future__ import annotations

from typing import List, Optional

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
        is_causal=p.is_causal,
        scale=p.scale,
        return_stats=p.return_stats,
    )
    if p.return_stats:
        return result
    return result, None
