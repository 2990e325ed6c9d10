"""The public entry point: validate every argument once, then dispatch to a backend."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ._stats import AttentionStats, accumulation_dtype
from .backends import AttentionProblem, select_backend

__all__ = ["rolling_attention", "make_problem"]

_BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")
_SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def _check_device(name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rotation: Optional[torch.Tensor] = None,
    rotated_queries: Optional[torch.Tensor] = None,
    key_modality: Optional[torch.Tensor] = None,
    num_modalities: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_stats: bool = False,
) -> AttentionProblem:
    """Validate the arguments of :func:`rolling_attention` and put them in canonical form.

    Raises TypeError / ValueError naming the argument, what it got and what it wanted.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    for name, t, want in (
        ("q", q, "(B, H, Lq, D)"),
        ("k", k, "(B, H, Lk, D)"),
        ("v", v, "(B, H, Lk, Dv)"),
    ):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape {want} (4 dims); got {_shape(t)}")
    device = q.device
    if device.type not in _SUPPORTED_DTYPES:
        raise ValueError(f"q is on {device}; supported devices are cpu and cuda")
    _check_device("k", k, device)
    _check_device("v", v, device)
    if q.dtype not in _SUPPORTED_DTYPES[device.type]:
        names = [str(d).replace("torch.", "") for d in _SUPPORTED_DTYPES[device.type]]
        raise TypeError(f"q has dtype {q.dtype}; supported on {device.type}: {names}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k must have shape ({B}, {H}, Lk, {D}) to match q {_shape(q)}; got {_shape(k)}"
        )
    if tuple(v.shape[:3]) != (B, H, Lk):
        raise ValueError(
            f"v must have shape ({B}, {H}, {Lk}, Dv) to match k {_shape(k)}; got {_shape(v)}"
        )
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be positive; got D={D}, Dv={v.shape[3]}")

    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool; got {type(return_stats).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    scale = float(scale)

    acc = accumulation_dtype(q.dtype)

    # --- rotation -------------------------------------------------------------------------
    rot = None
    if rotation is not None:
        _check_tensor("rotation", rotation)
        _check_device("rotation", rotation, device)
        if not rotation.is_floating_point():
            raise TypeError(f"rotation must be a floating tensor; got {rotation.dtype}")
        if rotation.dim() == 2 and tuple(rotation.shape) == (D, D):
            rot = rotation.to(acc).unsqueeze(0).expand(H, D, D).contiguous()
        elif rotation.dim() == 3 and tuple(rotation.shape) == (H, D, D):
            rot = rotation.to(acc).contiguous()
        else:
            raise ValueError(
                f"rotation must have shape ({D}, {D}) or ({H}, {D}, {D}) (an orthogonal matrix per "
                f"head, D={D}); got {_shape(rotation)}"
            )

    # --- rotated rows ---------------------------------------------------------------------
    rows = None
    if rotated_queries is not None:
        _check_tensor("rotated_queries", rotated_queries)
        if rotation is None:
            raise ValueError("rotated_queries was given without a rotation")
        _check_device("rotated_queries", rotated_queries, device)
        if rotated_queries.dtype != torch.bool:
            raise TypeError(f"rotated_queries must be a bool tensor; got {rotated_queries.dtype}")
        if tuple(rotated_queries.shape) == (Lq,):
            rows = rotated_queries.unsqueeze(0).expand(B, Lq).contiguous()
        elif tuple(rotated_queries.shape) == (B, Lq):
            rows = rotated_queries.contiguous()
        else:
            raise ValueError(
                f"rotated_queries must have shape ({Lq},) or ({B}, {Lq}); got {_shape(rotated_queries)}"
            )

    # --- padding --------------------------------------------------------------------------
    pad = None
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask)
        _check_device("key_padding_mask", key_padding_mask, device)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (True = the key takes part); got "
                f"{key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must have shape ({B}, {Lk}); got {_shape(key_padding_mask)}"
            )
        pad = key_padding_mask.contiguous()

    # --- modalities -----------------------------------------------------------------------
    if num_modalities is not None:
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
            raise TypeError(
                f"num_modalities must be an int or None; got {type(num_modalities).__name__}"
            )
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1; got {num_modalities}")
    ids = None
    if key_modality is not None:
        _check_tensor("key_modality", key_modality)
        _check_device("key_modality", key_modality, device)
        if key_modality.dtype.is_floating_point or key_modality.dtype in (
            torch.bool,
            torch.complex64,
        ):
            raise TypeError(f"key_modality must be an integer tensor; got {key_modality.dtype}")
        if tuple(key_modality.shape) == (Lk,):
            ids = key_modality.unsqueeze(0).expand(B, Lk)
        elif tuple(key_modality.shape) == (B, Lk):
            ids = key_modality
        else:
            raise ValueError(
                f"key_modality must have shape ({Lk},) or ({B}, {Lk}); got {_shape(key_modality)}"
            )
        if not _compiling() and ids.numel() > 0:
            lo, hi = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())
            if num_modalities is None:
                num_modalities = max(hi + 1, 1)
            if lo < -1 or hi >= num_modalities:
                raise ValueError(
                    f"key_modality ids must lie in [-1, {num_modalities - 1}] (num_modalities="
                    f"{num_modalities}); got values in [{lo}, {hi}]"
                )
        elif num_modalities is None:
            if ids.numel() > 0:
                raise ValueError("num_modalities must be given when rolling_attention is compiled")
            num_modalities = 1
    if num_modalities is None:
        num_modalities = 1

    if return_stats:
        if ids is None:
            ids = torch.zeros(B, Lk, dtype=torch.int32, device=device)
        else:
            ids = ids.to(torch.int32).contiguous()
        M = num_modalities
    else:
        ids, M = None, 0

    return AttentionProblem(
        q=q,
        k=k,
        v=v,
        rotation=rot,
        rotated_queries=rows,
        key_modality=ids,
        num_modalities=M,
        key_padding_mask=pad,
        is_causal=is_causal,
        scale=scale,
        return_stats=return_stats,
    )


def rolling_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rotation: Optional[torch.Tensor] = None,
    rotated_queries: Optional[torch.Tensor] = None,
    key_modality: Optional[torch.Tensor] = None,
    num_modalities: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_stats: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, AttentionStats]]:
    """Scaled-dot-product attention with query rotation and RollingQ statistics in one pass.

    Args:
        q: (B, H, Lq, D) queries (SDPA layout, any strides: a (B, L, H, D) tensor viewed through
            ``.transpose(1, 2)`` is read in place).
        k: (B, H, Lk, D) keys. v: (B, H, Lk, Dv) values. Same dtype and device as q.
        rotation: None, (D, D) or (H, D, D) orthogonal matrix; a rotated row becomes R q_i
            (row form ``q @ R.T``). Applied in float32 (float64 for float64 inputs).
        rotated_queries: None (every row, when rotation is given), bool (Lq,) or (B, Lq).
        key_modality: None (every key is modality 0), integer (Lk,) or (B, Lk): modality id of each
            key in [0, M), or -1 for a key that is attended but counted in no modality.
        num_modalities: M; None infers max id + 1 (a device sync on GPU).
        key_padding_mask: None or bool (B, Lk); True = the key takes part.
        is_causal: top-left aligned causal mask, as in SDPA.
        scale: default 1 / sqrt(D).
        return_stats: also return :class:`AttentionStats` (not differentiable).
        backend: "auto", "cpu", "triton", "cuda" or "reference"; the environment variable
            ROLLINGQ_BACKEND overrides "auto". A named backend that cannot run raises.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, or ``(out, stats)`` when ``return_stats``.
        A row with no visible key gives zeros, zero mass and lse = -inf.
    """
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}; got {backend!r}")
    problem = make_problem(
        q,
        k,
        v,
        rotation=rotation,
        rotated_queries=rotated_queries,
        key_modality=key_modality,
        num_modalities=num_modalities,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        scale=scale,
        return_stats=return_stats,
    )
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        # Empty problems (B, H, Lq or Lk = 0) are answered by the reference on any backend.
        backend = "reference"
    spec = select_backend(problem, backend)
    out, stats = spec.load().forward(problem)
    if return_stats:
        return out, stats
    return out
