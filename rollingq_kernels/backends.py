"""Backend registry: what each backend supports, why it cannot run given inputs, and dispatch.

Each backend is declared by a :class:`BackendSpec` (plain data: devices, dtypes per device, head
dims, whether "auto" may pick it) and implemented by a module that is imported only when the
backend is considered for a call. That module provides:

    unavailable_reason() -> Optional[str]      # e.g. the extension is not built; cached by it
    unsupported_reasons(problem) -> list[str]  # feature limits beyond the spec's data
    forward(problem) -> (out, Optional[AttentionStats])

``problem`` is an :class:`AttentionProblem`: the validated, canonical form of one call.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "AttentionProblem",
    "BackendSpec",
    "NoBackendError",
    "register_backend",
    "registered_backends",
    "backend_status",
    "select_backend",
]


@dataclass(frozen=True)
class AttentionProblem:
    """One validated call in canonical form; what every backend receives.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv): as the user gave them (any strides).
    rotation: None or contiguous (H, D, D) in the accumulation dtype (float32, float64 for float64).
    rotated_queries: None (every row is rotated when rotation is given) or contiguous bool (B, Lq).
    key_modality: None when no stats are asked for, else contiguous int32 (B, Lk), ids in [-1, M).
    num_modalities: M; 0 exactly when no stats are asked for.
    key_padding_mask: None or contiguous bool (B, Lk); True = the key takes part.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rotation: Optional[torch.Tensor]
    rotated_queries: Optional[torch.Tensor]
    key_modality: Optional[torch.Tensor]
    num_modalities: int
    key_padding_mask: Optional[torch.Tensor]
    is_causal: bool
    scale: float
    return_stats: bool

    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    def describe(self) -> str:
        B, H, Lq, D = self.q.shape
        return (
            f"{self.q.dtype} on {self.q.device.type}, B={B} H={H} Lq={Lq} "
            f"Lk={self.k.shape[2]} D={D} Dv={self.value_dim}"
        )


_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class BackendSpec:
    """What a backend supports, as data. ``module`` implements it (see the module docstring)."""

    name: str
    module: str
    dtypes: Dict[str, frozenset]  # device type -> supported dtypes
    max_head_dim: Optional[int] = None  # None = no limit (applies to D and Dv)
    auto: bool = True  # may "auto" pick it?
    description: str = ""
    extra_checks: Tuple[Callable[[AttentionProblem], Optional[str]], ...] = field(default=())

    def static_reasons(self, p: AttentionProblem) -> List[str]:
        reasons = []
        dtypes = self.dtypes.get(p.device_type)
        if dtypes is None:
            reasons.append(f"runs on {sorted(self.dtypes)} tensors, not {p.device_type}")
        elif p.q.dtype not in dtypes:
            names = sorted(str(d).replace("torch.", "") for d in dtypes)
            reasons.append(f"supports dtypes {names} on {p.device_type}, not {p.q.dtype}")
        if self.max_head_dim is not None and max(p.head_dim, p.value_dim) > self.max_head_dim:
            reasons.append(
                f"head dims up to {self.max_head_dim}; got D={p.head_dim}, Dv={p.value_dim}"
            )
        for check in self.extra_checks:
            why = check(p)
            if why:
                reasons.append(why)
        return reasons

    def load(self):
        why = _import_backend_module(self.module)
        if why:
            raise ImportError(f"backend {self.name!r} {why}")
        return _LOADED_MODULES[self.module]

    def reasons(self, p: AttentionProblem) -> List[str]:
        """Every reason this backend cannot run ``p``; empty when it can."""
        reasons = self.static_reasons(p)
        if reasons:
            return reasons
        why = _import_backend_module(self.module)
        if why:
            return [why]
        mod = _LOADED_MODULES[self.module]
        why = mod.unavailable_reason()
        if why:
            return [why]
        return list(mod.unsupported_reasons(p))


_LOADED_MODULES: Dict[str, object] = {}


def _import_backend_module(name: str) -> str:
    """Import a backend module into _LOADED_MODULES; "" on success, else why it failed."""
    if name in _LOADED_MODULES:
        return ""
    try:
        _LOADED_MODULES[name] = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        return f"not available: {exc}"
    except Exception as exc:  # a broken optional dependency must not break dispatch
        return f"cannot be imported: {type(exc).__name__}: {exc}"
    return ""


# Dynamo refuses to trace importlib, which would break rolling_attention's full graph under
# torch.compile: there the import runs once, eagerly, while tracing, and only its (constant)
# outcome enters the graph; the module is then read from the dict, which Dynamo can guard.
if hasattr(torch, "_dynamo") and hasattr(torch._dynamo, "assume_constant_result"):
    _import_backend_module = torch._dynamo.assume_constant_result(_import_backend_module)


class NoBackendError(RuntimeError):
    """No backend (or not the one asked for) can run the given inputs."""


_REGISTRY: Dict[str, BackendSpec] = {}
# "auto" tries backends in this order; the reference is always last.
_AUTO_ORDER: List[str] = []


def register_backend(spec: BackendSpec, *, priority: Optional[int] = None) -> None:
    """Add (or replace) a backend. ``priority`` is its place in the "auto" order (0 = first)."""
    _REGISTRY[spec.name] = spec
    if spec.name in _AUTO_ORDER:
        _AUTO_ORDER.remove(spec.name)
    if spec.auto:
        if priority is None:
            # before the reference, after everything else
            priority = len(_AUTO_ORDER) - (1 if "reference" in _AUTO_ORDER else 0)
        _AUTO_ORDER.insert(max(0, min(priority, len(_AUTO_ORDER))), spec.name)


def registered_backends() -> List[str]:
    return list(_REGISTRY)


def backend_status(p: Optional[AttentionProblem] = None) -> Dict[str, List[str]]:
    """Name -> reasons it cannot run ``p`` (or cannot load at all when ``p`` is None)."""
    status = {}
    for name, spec in _REGISTRY.items():
        if p is not None:
            status[name] = spec.reasons(p)
            continue
        try:
            why = spec.load().unavailable_reason()
            status[name] = [why] if why else []
        except Exception as exc:
            status[name] = [f"cannot be imported: {type(exc).__name__}: {exc}"]
    return status


def select_backend(p: AttentionProblem, backend: str = "auto") -> BackendSpec:
    """The backend that will run ``p``. ``backend`` may be "auto" or a registered name.

    The environment variable ROLLINGQ_BACKEND overrides ``backend="auto"``. A named backend that
    cannot run raises :class:`NoBackendError` with its reasons; only "auto" falls back.
    """
    if backend == "auto":
        backend = os.environ.get("ROLLINGQ_BACKEND", "auto") or "auto"
    if backend != "auto":
        spec = _REGISTRY.get(backend)
        if spec is None:
            raise ValueError(
                f"backend must be 'auto' or one of {registered_backends()}; got {backend!r}"
            )
        reasons = spec.reasons(p)
        if reasons:
            raise NoBackendError(
                f"backend {backend!r} cannot run these inputs ({p.describe()}): "
                + "; ".join(reasons)
            )
        return spec
    collected = {}
    for name in _AUTO_ORDER:
        spec = _REGISTRY[name]
        reasons = spec.reasons(p)
        if not reasons:
            return spec
        collected[name] = reasons
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in collected.items())
    raise NoBackendError(f"no backend can run these inputs ({p.describe()}):\n{lines}")


# ----------------------------------------------------------------------------------------------
# The backends of this package. Their modules are imported only when a call considers them.

register_backend(
    BackendSpec(
        name="reference",
        module="rollingq_kernels._reference_backend",
        dtypes={"cpu": _FLOATS, "cuda": _FLOATS},
        description="pure PyTorch, materialised softmax; the oracle",
    )
)
register_backend(
    BackendSpec(
        name="cpu",
        module="rollingq_kernels.cpu_attention",
        dtypes={"cpu": frozenset({torch.float32, torch.bfloat16, torch.float64})},
        description="fused C++ kernel (ATen parallel_for, vectorised)",
    ),
    priority=0,
)
register_backend(
    BackendSpec(
        name="triton",
        module="rollingq_kernels.triton_attention",
        dtypes={"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        description="fused Triton kernels (GPU)",
    ),
    priority=0,
)
register_backend(
    BackendSpec(
        name="cuda",
        module="rollingq_kernels.cuda_attention",
        dtypes={"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        auto=False,  # not the default until it beats the Triton backend on a GPU
        description="fused CUDA C++ kernels (tensor-core MMA)",
    )
)
