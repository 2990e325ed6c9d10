"""The "cpu" backend: the fused C++ kernel (csrc/cpu/) through the rollingq::attention_fwd op."""

from __future__ import annotations

from typing import Optional, Sequence

from . import fused_op

_NONE: Sequence[str] = ()


def unavailable_reason() -> Optional[str]:
    return fused_op.load_error()


def unsupported_reasons(problem) -> Sequence[str]:
    return _NONE  # every problem the registry's feature table lets through


# the op call itself: (out, stats or None) for a validated AttentionProblem
forward = fused_op.attention_forward
