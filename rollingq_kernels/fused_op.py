"""The fused attention op shared by the compiled backends (CPU here, CUDA alongside).

``rollingq_kernels._C`` defines the schema ``rollingq::attention_fwd`` / ``attention_bwd`` with
TORCH_LIBRARY and the CPU implementation; a CUDA build adds its implementation to the same
schema. This module loads that library (refusing one built against another torch), registers the
fake implementations (so torch.compile and torch.export trace the op without running it) and the
autograd formula, and turns an :class:`AttentionProblem` into one call of the op.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional, Tuple

import torch

from ._stats import AttentionStats

__all__ = ["attention_forward", "load_error", "library_path"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_VERSION_MARK = re.compile(rb"rollingq-torch-version=([0-9]+\.[0-9]+\.[0-9]+);")


def library_path(name: str = "_C") -> Optional[str]:
    """Path of the compiled library ``rollingq_kernels.<name>``, or None when it is not built."""
    for pattern in (f"{name}.*.so", f"{name}.so", f"{name}.*.pyd", f"{name}.pyd"):
        hits = sorted(glob.glob(os.path.join(_PACKAGE_DIR, pattern)))
        if hits:
            return hits[0]
    return None


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


def _load_library(name: str = "_C") -> None:
    """Load a compiled library of this package, after checking which torch it was built for.

    The version is read from the file, not from the loaded library: a library compiled against
    another torch may fail to load, or worse load and register ops with a mismatched ABI.
    """
    path = library_path(name)
    if path is None:
        raise ImportError(
            f"rollingq_kernels.{name} is not built; build it with "
            "`python setup.py build_ext --inplace` (or `make build`)"
        )
    with open(path, "rb") as f:
        found = _VERSION_MARK.search(f.read())
    built = found.group(1).decode() if found else "an unknown version"
    if built != _installed_torch():
        raise ImportError(
            f"{path} was built against torch {built} but torch {torch.__version__} is installed; "
            "rebuild it with `python setup.py build_ext --inplace`"
        )
    torch.ops.load_library(path)


_LOAD_ERROR: Optional[str] = None
try:
    _load_library("_C")
except (ImportError, OSError) as exc:
    _LOAD_ERROR = f"the compiled library cannot be loaded: {exc}"


def load_error() -> Optional[str]:
    """Why the op is not available (None when it is)."""
    return _LOAD_ERROR


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _LOAD_ERROR is None:

    @torch.library.register_fake("rollingq::attention_fwd")
    def _attention_fwd_fake(
        q, k, v, rotation, rotated_queries, key_modality, num_modalities, key_padding_mask,
        is_causal, scale,
    ):  # fmt: skip
        B, H, Lq, D = q.shape
        Dv = v.shape[3]
        acc = _acc_dtype(q.dtype)
        M = num_modalities
        return (
            q.new_empty((B, H, Lq, Dv)),
            q.new_empty((B, H, Lq), dtype=acc),
            q.new_empty((B, H, Lq, M), dtype=acc),
            q.new_empty((B, H, M, D), dtype=acc),
            q.new_empty((B, M), dtype=acc),
        )

    @torch.library.register_fake("rollingq::attention_bwd")
    def _attention_bwd_fake(
        grad_out, q, k, v, out, lse, rotation, rotated_queries, key_padding_mask, is_causal,
        scale,
    ):  # fmt: skip
        return (
            q.new_empty(q.shape),
            k.new_empty(k.shape),
            v.new_empty(v.shape),
        )

    def _setup_context(ctx, inputs, output):
        q, k, v, rotation, rotated_queries, _ids, _m, key_padding_mask, is_causal, scale = inputs
        out, lse = output[0], output[1]
        ctx.save_for_backward(q, k, v, out, lse, rotation, rotated_queries, key_padding_mask)
        ctx.is_causal = is_causal
        ctx.scale = scale
        # lse and the statistics carry no gradient (DESIGN.md section 2)
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, grad_out, *_grad_stats):
        q, k, v, out, lse, rotation, rotated_queries, key_padding_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = torch.ops.rollingq.attention_bwd(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            rotation,
            rotated_queries,
            key_padding_mask,
            ctx.is_causal,
            ctx.scale,
        )
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "rollingq::attention_fwd", _backward, setup_context=_setup_context
    )


def attention_forward(problem) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Run ``rollingq::attention_fwd`` on a validated :class:`AttentionProblem`.

    Returns out (B, H, Lq, Dv) in q's dtype and, when ``problem.return_stats``, the
    :class:`AttentionStats` (float32; float64 for float64 inputs).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    out, lse, mass, key_sum, key_count = torch.ops.rollingq.attention_fwd(
        problem.q,
        problem.k,
        problem.v,
        problem.rotation,
        problem.rotated_queries,
        problem.key_modality,
        problem.num_modalities,
        problem.key_padding_mask,
        problem.is_causal,
        problem.scale,
    )
    if not problem.return_stats:
        return out, None
    return out, AttentionStats(mass, key_sum, key_count, lse)
