"""Backend registry: what each backend supports (as data), why it cannot run given inputs, dispatch.

Each backend is declared by a :class:`BackendSpec` — devices and dtypes, head-dim limit, and the
:class:`Features` it implements — and implemented by a module that is imported only when the
backend is considered for a call. That module provides:

    unavailable_reason() -> Optional[str]      # e.g. the extension is not built; cached by it
    unsupported_reasons(problem) -> list[str]  # limits that depend on sizes (not on features)
    forward(problem) -> (out, Optional[AttentionStats])

``problem`` is an :class:`AttentionProblem`: the validated, canonical form of one call. The public
API validates against the union of what the registered backends declare, and "auto" takes the
first backend, in priority order, that declares every feature the call uses and can load. The
decision is cached per problem signature (device, dtype, head dims, features used).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = [
    "AttentionProblem",
    "BackendSpec",
    "Features",
    "NoBackendError",
    "backend_status",
    "backend_table",
    "register_backend",
    "registered_backends",
    "select_backend",
    "supported_dtypes",
]


class AttentionProblem(NamedTuple):
    """One validated call in canonical form; what every backend receives (an immutable record:
    a NamedTuple, which is several times cheaper to build per call than a frozen dataclass).

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): as the user gave them (any strides).
        Hkv == H, or a divisor of H for grouped-query attention.
    rotation: None, or one contiguous (D, D) matrix for every head, or (H, D, D) with each
        matrix contiguous; in the accumulation dtype (float32; float64 for float64 inputs).
    rotated_queries: None (every row is rotated when rotation is given), or bool (Lq,) (the same
        rows in every batch entry) or (B, Lq); last dim contiguous.
    key_modality: None when no stats are asked for, else an integer tensor (Lk,) (the same ids in
        every batch entry) or (B, Lk) of any integer dtype and strides, ids in [-1, M) (checked).
        The short forms are never expanded in Python: each backend reads them as broadcasts.
    num_modalities: M; 0 exactly when no stats are asked for.
    key_padding_mask: None or bool (B, Lk), last dim contiguous; True = the key takes part.
    attn_mask: None or a (B, H, Lq, Lk) view (stride 0 on broadcast dims, never copied) of a bool
        mask (True = takes part) or a float mask in q's dtype or float32 (added to scaled scores).
    is_causal, causal_offset: when is_causal, key j is visible to row i iff j <= i + causal_offset.
    dropout_p, rng_state: attention dropout; rng_state is an int64 CPU tensor (seed, offset) when
        dropout_p > 0, else None.
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
    attn_mask: Optional[torch.Tensor] = None
    causal_offset: int = 0
    dropout_p: float = 0.0
    rng_state: Optional[torch.Tensor] = None

    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def gqa(self) -> bool:
        return self.k.shape[1] != self.q.shape[1]

    @property
    def mask_kind(self) -> Optional[str]:
        if self.attn_mask is None:
            return None
        return "bool" if self.attn_mask.dtype == torch.bool else "float"

    def needs_grad(self) -> bool:
        """Will autograd ask for a backward of this call?"""
        if not torch.is_grad_enabled():
            return False
        if self.q.requires_grad or self.k.requires_grad or self.v.requires_grad:
            return True
        rot, mask = self.rotation, self.attn_mask
        return (rot is not None and rot.requires_grad) or (mask is not None and mask.requires_grad)

    def has_tangents(self) -> bool:
        """Does forward-mode AD give an input a tangent (torch.func.jvp, jacfwd, hessian,
        torch.autograd.forward_ad)? Only a backend declaring forward_ad can carry it. Inside a
        torch.func transform under a forward-mode one, every call counts as carrying one: there
        the tangent can sit in a wrapper that unpack_dual does not open (hessian's)."""
        if _forward_ad._current_level < 0:  # no dual level open: nothing can carry a tangent
            return False
        if torch._C._are_functorch_transforms_active():
            return True
        return any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None
            for t in (self.q, self.k, self.v, self.rotation, self.attn_mask)
        )

    def op_args(self) -> tuple:
        """The arguments of ``rollingq::*attention_fwd`` (op_contract.FWD_SCHEMA), in order."""
        return (
            self.q,
            self.k,
            self.v,
            self.rotation,
            self.rotated_queries,
            self.key_modality,
            self.num_modalities,
            self.key_padding_mask,
            self.attn_mask,
            self.is_causal,
            self.causal_offset,
            self.scale,
            self.dropout_p,
            self.rng_state,
        )

    def signature(self) -> tuple:
        """Everything a backend's feature declaration depends on (the dispatch cache key).

        Computed on every call that "auto" dispatches, so it reads each attribute once."""
        q, k, v, rot, mask, causal = (
            self.q,
            self.k,
            self.v,
            self.rotation,
            self.attn_mask,
            self.is_causal,
        )
        qs = q.shape
        grad = torch.is_grad_enabled() and (
            q.requires_grad
            or k.requires_grad
            or v.requires_grad
            or (rot is not None and rot.requires_grad)
            or (mask is not None and mask.requires_grad)
        )
        return (
            q.device,
            q.dtype,
            qs[3],
            v.shape[3],
            rot is not None,
            self.num_modalities,
            self.key_padding_mask is not None,
            None if mask is None else mask.dtype == torch.bool,
            grad and mask is not None and mask.requires_grad,
            causal,
            causal and self.causal_offset != 0,
            self.dropout_p > 0.0,
            k.shape[1] != qs[1],
            grad,
            _forward_ad._current_level >= 0 and self.has_tangents(),
        )

    def describe(self) -> str:
        B, H, Lq, D = self.q.shape
        feats = [
            name
            for name, on in (
                ("rotation", self.rotation is not None),
                (f"stats M={self.num_modalities}", self.num_modalities > 0),
                ("key_padding_mask", self.key_padding_mask is not None),
                (f"{self.mask_kind} attn_mask", self.attn_mask is not None),
                (f"causal offset {self.causal_offset}", self.is_causal),
                (f"dropout {self.dropout_p}", self.dropout_p > 0.0),
                (f"GQA Hkv={self.k.shape[1]}", self.gqa),
            )
            if on
        ]
        return (
            f"{self.q.dtype} on {self.q.device.type}, B={B} H={H} Lq={Lq} Lk={self.k.shape[2]} "
            f"D={D} Dv={self.value_dim}" + (f"; {', '.join(feats)}" if feats else "")
        )


@dataclass(frozen=True)
class Features:
    """The features a backend implements beyond plain attention (data, checked by the registry)."""

    rotation: bool = True
    max_modalities: Optional[int] = None  # None = no limit
    key_padding: bool = True
    causal: bool = True  # is_causal with SDPA's top-left alignment
    causal_offset: bool = False  # any other alignment (e.g. CausalBias lower-right)
    attn_mask: FrozenSet[str] = frozenset()  # subset of {"bool", "float"}
    attn_mask_grad: bool = False  # gradient with respect to a float attn_mask
    dropout: bool = False
    gqa: bool = False
    backward: bool = True
    forward_ad: bool = False  # forward-mode AD: tangents through the call (jvp)

    def reasons(self, p: AttentionProblem) -> List[str]:
        out = []
        if p.rotation is not None and not self.rotation:
            out.append("no query rotation")
        if self.max_modalities is not None and p.num_modalities > self.max_modalities:
            out.append(f"at most {self.max_modalities} modalities; got {p.num_modalities}")
        if p.key_padding_mask is not None and not self.key_padding:
            out.append("no key_padding_mask")
        if p.is_causal and not self.causal:
            out.append("no causal masking")
        if p.is_causal and p.causal_offset != 0 and not self.causal_offset:
            out.append(f"causal alignment other than top-left (offset {p.causal_offset})")
        kind = p.mask_kind
        if kind is not None and kind not in self.attn_mask:
            out.append(f"no {kind} attn_mask")
        elif kind == "float" and p.attn_mask.requires_grad and torch.is_grad_enabled():
            if not self.attn_mask_grad:
                out.append("no gradient with respect to attn_mask")
        if p.dropout_p > 0.0 and not self.dropout:
            out.append("no dropout")
        if p.gqa and not self.gqa:
            out.append("no grouped-query attention (k/v with fewer heads than q)")
        if not self.backward and p.needs_grad():
            out.append("forward only (inputs require grad)")
        if not self.forward_ad and p.has_tangents():
            out.append(
                "no forward-mode AD (an input carries a tangent: torch.func.jvp, jacfwd, hessian, "
                "torch.autograd.forward_ad)"
            )
        return out

    def summary(self) -> str:
        parts = []
        for name in ("rotation", "key_padding", "causal", "causal_offset", "dropout", "gqa"):
            parts.append(f"{name}={'yes' if getattr(self, name) else 'no'}")
        masks = "+".join(sorted(self.attn_mask)) or "no"
        parts.append(f"attn_mask={masks}{' (with grad)' if self.attn_mask_grad else ''}")
        parts.append(f"modalities<={self.max_modalities or 'any'}")
        parts.append(f"backward={'yes' if self.backward else 'no'}")
        parts.append(f"forward_ad={'yes' if self.forward_ad else 'no'}")
        return ", ".join(parts)


_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class BackendSpec:
    """What a backend supports, as data. ``module`` implements it (see the module docstring)."""

    name: str
    module: str
    dtypes: Dict[str, frozenset]  # device type -> supported dtypes
    max_head_dim: Optional[int] = None  # None = no limit (applies to D and Dv)
    features: Features = field(default_factory=Features)
    auto: bool = True  # may "auto" pick it?
    fused: bool = True  # O(L) memory; "auto" warns when it falls back from a fused backend
    description: str = ""
    extra_checks: Tuple[Callable[[AttentionProblem], Optional[str]], ...] = field(default=())

    def static_reasons(self, p: AttentionProblem) -> List[str]:
        """Reasons that depend only on the problem's signature (device, dtype, dims, features)."""
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
        reasons.extend(self.features.reasons(p))
        return reasons

    def load(self):
        """The implementing module (imported on first use); raises ImportError if it cannot be."""
        why = _import_module(self.module)
        if why:
            raise ImportError(why)
        return _module(self.module)

    def unavailable(self) -> Optional[str]:
        """Why the backend cannot load at all (None when it can)."""
        why = _import_module(self.module)
        if why:
            return why
        return _module(self.module).unavailable_reason()

    def reasons(self, p: AttentionProblem) -> List[str]:
        """Every reason this backend cannot run ``p``; empty when it can."""
        reasons = self.static_reasons(p)
        if reasons:
            return reasons
        why = self.unavailable()
        if why:
            return [why]
        return list(_module(self.module).unsupported_reasons(p))


def _import_module(name: str) -> str:
    """Import a backend module; return "" or why it cannot be imported."""
    if name in sys.modules:
        return ""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        return f"not available: {exc}"
    except Exception as exc:  # a broken optional dependency must not break dispatch
        return f"cannot be imported: {type(exc).__name__}: {exc}"
    return ""


# Under torch.compile the import machinery must not be traced: the import's result is a constant
# of the traced program. This is what torch.compiler.assume_constant_result does; the marker is
# set directly because calling that function imports torch._dynamo (over a second), which an
# import of this package must not pay. tests/test_reference.py traces dispatch to check it.
_import_module._dynamo_marked_constant = True


def _module(name: str):
    """The module ``name``, imported already (by _import_module), as an attribute of its package.

    Not ``sys.modules[name]``: torch.compile reads sys.modules as it was when the trace began, so
    a backend module first imported during the trace (the first call of a process, compiled) was
    missing from it (KeyError). A package's attributes are read as they are."""
    root, _, rest = name.partition(".")
    module = sys.modules[root]
    for part in rest.split(".") if rest else ():
        module = getattr(module, part)
    return module


class NoBackendError(RuntimeError):
    """No backend (or not the one asked for) can run the given inputs."""


_REGISTRY: Dict[str, BackendSpec] = {}
# "auto" tries backends in this order; the reference is always last.
_AUTO_ORDER: List[str] = []
# signature -> ((name, spec, unsupported_reasons), ...) for "auto"; (name, signature) -> (spec,
# unsupported_reasons) for a named backend that runs that signature
_AUTO_CACHE: Dict[tuple, tuple] = {}
_DTYPE_CACHE: Dict[str, frozenset] = {}
_WARNED: set = set()


def register_backend(spec: BackendSpec, *, priority: Optional[int] = None) -> None:
    """Add (or replace) a backend. ``priority`` is its place in the "auto" order (0 = first).

    A registered backend can be named in ``rolling_attention(..., backend=name)`` and in
    ``ROLLINGQ_BACKEND``; with ``auto=True`` "auto" considers it.
    """
    _REGISTRY[spec.name] = spec
    _AUTO_CACHE.clear()
    _DTYPE_CACHE.clear()
    if spec.name in _AUTO_ORDER:
        _AUTO_ORDER.remove(spec.name)
    if spec.auto:
        if priority is None:
            # before the reference, after everything else
            priority = len(_AUTO_ORDER) - (1 if "reference" in _AUTO_ORDER else 0)
        _AUTO_ORDER.insert(max(0, min(priority, len(_AUTO_ORDER))), spec.name)


def registered_backends() -> List[str]:
    return list(_REGISTRY)


def supported_dtypes(device_type: str) -> frozenset:
    """Every dtype some registered backend runs on ``device_type``."""
    found = _DTYPE_CACHE.get(device_type)
    if found is None:
        out = set()
        for spec in _REGISTRY.values():
            out |= spec.dtypes.get(device_type, frozenset())
        found = _DTYPE_CACHE[device_type] = frozenset(out)
    return found


def max_supported_modalities() -> Optional[int]:
    """The largest modality count some registered backend takes (None = no limit)."""
    most = 0
    for spec in _REGISTRY.values():
        limit = spec.features.max_modalities
        if limit is None:
            return None
        most = max(most, limit)
    return most


def backend_status(p: Optional[AttentionProblem] = None) -> Dict[str, List[str]]:
    """Name -> reasons it cannot run ``p`` (or cannot load at all when ``p`` is None)."""
    status = {}
    for name, spec in _REGISTRY.items():
        if p is not None:
            status[name] = spec.reasons(p)
            continue
        why = spec.unavailable()
        status[name] = [why] if why else []
    return status


def backend_table() -> str:
    """A printable table: every backend, its devices and dtypes, features, and whether it loads."""
    lines = ["| backend | auto | devices: dtypes | max head dim | features | status |"]
    lines.append("|---|---|---|---|---|---|")
    for name, spec in _REGISTRY.items():
        devs = "; ".join(
            f"{dev}: {', '.join(sorted(str(d).replace('torch.', '') for d in dts))}"
            for dev, dts in spec.dtypes.items()
        )
        why = spec.unavailable()
        lines.append(
            f"| {name} | {'yes' if spec.auto else 'no'} | {devs} | {spec.max_head_dim or 'any'} "
            f"| {spec.features.summary()} | {why or 'available'} |"
        )
    return "\n".join(lines)


def _warn_once(key, message: str) -> None:
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


_ENV_NAME = "ROLLINGQ_BACKEND"
try:  # os.environ's own store, read without re-encoding the name on every call
    _ENV_STORE, _ENV_KEY, _ENV_DECODE = (
        os.environ._data,
        os.environ.encodekey(_ENV_NAME),
        os.environ.decodevalue,
    )
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENV_STORE = None


def _env_backend() -> str:
    """ROLLINGQ_BACKEND, or "auto" when it is unset or empty. Read on every call (a test or a
    program may set it at any time); os.environ.get costs about a microsecond, a dict read of
    os.environ's store a tenth of that, which matters on the per-call path."""
    if _ENV_STORE is None:
        return os.environ.get(_ENV_NAME) or "auto"
    raw = _ENV_STORE.get(_ENV_KEY)
    return _ENV_DECODE(raw) if raw else "auto"


def select_backend(p: AttentionProblem, backend: str = "auto", *, warn: bool = True) -> BackendSpec:
    """The backend that will run ``p``. ``backend`` may be "auto" or a registered name.

    The environment variable ROLLINGQ_BACKEND overrides ``backend="auto"``. A named backend that
    cannot run raises :class:`NoBackendError` with its reasons; only "auto" falls back, and it
    warns once (per reason) when it falls back from a fused backend to the O(L^2) reference.
    """
    return select_forward(p, backend, warn=warn)[0]


def select_forward(p: AttentionProblem, backend: str = "auto", *, warn: bool = True):
    """:func:`select_backend` and the chosen backend's ``forward`` function: (spec, forward).

    The decision is cached per problem signature with the backend module's functions, so a call
    of a known signature costs two dict reads and the backend's size check."""
    if backend == "auto":
        backend = _env_backend()
    key = p.signature()
    if backend != "auto":
        named = _AUTO_CACHE.get((backend, key))
        if named is not None and not named[2](p):
            return named[0], named[1]
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
        # it runs this signature: next time only its size check is asked
        module = _module(spec.module)
        _AUTO_CACHE[(backend, key)] = (spec, module.forward, module.unsupported_reasons)
        return spec, module.forward
    candidates = _AUTO_CACHE.get(key)
    passed: Dict[str, List[str]] = {}
    if candidates is None:
        found = []
        for name in _AUTO_ORDER:
            spec = _REGISTRY[name]
            reasons = spec.static_reasons(p)
            if not reasons:
                why = spec.unavailable()
                reasons = [why] if why else []
            if reasons:
                passed[name] = reasons
            else:
                # the module is imported now (unavailable() did it): keep its functions at hand
                module = _module(spec.module)
                found.append((name, spec, module.forward, module.unsupported_reasons))
        candidates = tuple(found)
        _AUTO_CACHE[key] = candidates
    for name, spec, forward, unsupported_reasons in candidates:
        reasons = unsupported_reasons(p)
        if reasons:
            passed[name] = list(reasons)
            continue
        if warn and not spec.fused:
            _warn_fallback(p, passed)
        return spec, forward
    for name in _AUTO_ORDER:
        if name not in passed:
            passed[name] = _REGISTRY[name].reasons(p) or ["not applicable"]
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in passed.items())
    raise NoBackendError(f"no backend can run these inputs ({p.describe()}):\n{lines}")


def _warn_fallback(p: AttentionProblem, passed: Dict[str, List[str]]) -> None:
    # Falling back to the reference is slow (materialised L x L scores): say why, once per reason,
    # when a fused backend for this device was passed over. Computed on the (rare) slow path only.
    if not passed:
        for name in _AUTO_ORDER:
            spec = _REGISTRY[name]
            if spec.fused and p.device_type in spec.dtypes:
                reasons = spec.reasons(p)
                if reasons:
                    passed[name] = reasons
    for name, reasons in passed.items():
        spec = _REGISTRY[name]
        if not spec.fused or p.device_type not in spec.dtypes:
            continue
        _warn_once(
            (name, tuple(reasons)),
            f"rolling_attention: backend 'auto' runs the O(L^2) reference because {name!r} "
            f"cannot run this call: {'; '.join(reasons)}",
        )


# ----------------------------------------------------------------------------------------------
# The backends of this package. Their modules are imported only when a call considers them.

register_backend(
    BackendSpec(
        name="reference",
        module="rollingq_kernels._reference_backend",
        dtypes={"cpu": _FLOATS, "cuda": _FLOATS},
        features=Features(
            causal_offset=True,
            attn_mask=frozenset({"bool", "float"}),
            attn_mask_grad=True,
            dropout=True,
            gqa=True,
            forward_ad=True,
        ),
        fused=False,
        description="pure PyTorch, materialised softmax; the oracle",
    )
)
register_backend(
    BackendSpec(
        name="cpu",
        module="rollingq_kernels.cpu_attention",
        dtypes={"cpu": frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})},
        features=Features(
            causal_offset=True,
            attn_mask=frozenset({"bool", "float"}),
            dropout=True,
            gqa=True,
        ),
        description="fused C++ kernel (ATen parallel_for, vectorised)",
    ),
    priority=0,
)
register_backend(
    BackendSpec(
        name="triton",
        module="rollingq_kernels.triton_attention",
        dtypes={"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        features=Features(
            max_modalities=None,
            causal_offset=True,
            attn_mask=frozenset({"bool", "float"}),
            dropout=True,
            gqa=True,
        ),
        description="fused Triton kernels (GPU)",
    ),
    priority=0,
)
register_backend(
    BackendSpec(
        name="cuda",
        module="rollingq_kernels.cuda_attention",
        dtypes={"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        features=Features(),
        auto=False,  # not the default until it beats the Triton backend on a GPU
        description="fused CUDA C++ kernels (tensor-core MMA)",
    )
)
