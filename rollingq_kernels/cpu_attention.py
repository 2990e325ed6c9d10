"""The "cpu" backend: the fused C++ kernel (csrc/cpu/) through the rollingq::attention_fwd op."""

from __future__ import annotations

from typing import List, Optional

from . import fused_op


def unavailable_reason() -> Optional[str]:
    return fused_op.load_error()


def unsupported_reasons(problem) -> List[str]:
    return []


def forward(problem):
    return fused_op.attention_forward(problem)
