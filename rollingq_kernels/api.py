"""The public entry points: validate every argument once, then dispatch to a backend.

:func:`rolling_attention` is the full call (rotation, statistics, SDPA's arguments);
:func:`scaled_dot_product_attention` has exactly the signature and return of
``torch.nn.functional.scaled_dot_product_attention`` and can replace it by assignment or, for a
block of code, with :func:`patch_sdpa`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends as _backends
from ._stats import AttentionStats, accumulation_dtype, read_all_entries
from .backends import AttentionProblem, select_forward
from .dropout import dropout_threshold, new_rng_state
from .reference import autocast_dtype, autocast_inputs

_any_autocast = torch._C._is_any_autocast_enabled  # one C call (about 60 ns)

__all__ = [
    "rolling_attention",
    "make_problem",
    "scaled_dot_product_attention",
    "patch_sdpa",
]

# torch's own SDPA, captured before anything can patch it: the drop-in falls back to it when no
# fused backend of this package can run a call.
_TORCH_SDPA = F.scaled_dot_product_attention


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


_Tensor = torch.Tensor


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def _check_device(name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")


def _check_side(name: str, t: torch.Tensor, q: torch.Tensor, on_cpu: bool) -> None:
    """t is a tensor on q's device. ``is_cpu`` is a flag read; comparing devices builds two
    torch.device objects, several times the cost, so CPU inputs skip it."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not (on_cpu and t.is_cpu):
        _check_device(name, t, q.device)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


class _VersionedCache:
    """Per-tensor memo of a value derived from the tensor's contents, valid while the tensor's
    version counter is unchanged. Keyed by identity (a tensor's ``__eq__`` is elementwise, so
    tensors cannot be dict keys by value); an entry goes when its tensor is freed."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, t: torch.Tensor, extra):
        entry = self._entries.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == (t._version, extra):
            return entry[2]
        return None

    def put(self, t: torch.Tensor, extra, value) -> None:
        key, entries = id(t), self._entries

        def drop(_ref, key=key):
            entries.pop(key, None)

        entries[key] = (weakref.ref(t, drop), (t._version, extra), value)


# key_modality tensors on a GPU whose ids were range-checked, with their version counter and M:
# there the check is a device sync, so a tensor passed again unchanged (the usual case: one layout
# reused every step) is checked once. CPU tensors are checked on every call (no sync).
_CHECKED_IDS = _VersionedCache()
_AMINMAX_DTYPES = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64})


def _aminmax_range(ids: torch.Tensor) -> Tuple[int, int]:
    # aminmax covers the usual id dtypes; the unsigned 16/32/64-bit ones are read widened
    lo, hi = torch.aminmax(ids if ids.dtype in _AMINMAX_DTYPES else ids.to(torch.int64))
    return int(lo), int(hi)


_ID_RANGE = None  # (min, max) of CPU ids: the compiled library's scan, else _aminmax_range


def _cpu_id_range(ids: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of non-empty integer CPU ids of 1 or 2 dims. The compiled library reads them in
    place (about 0.3 us); without it, torch.aminmax and two host reads (about 2.5 us)."""
    global _ID_RANGE
    if _ID_RANGE is None:
        from . import fused_op  # loads the library (the cpu backend will need it anyway)

        _ID_RANGE = fused_op.id_range_entry() or _aminmax_range
    return _ID_RANGE(ids)


def _check_id_range(ids: torch.Tensor, num_modalities) -> int:
    """Range-check the key_modality ids against num_modalities (None = infer); return M."""
    if not torch._C._are_functorch_transforms_active():
        return _check_plain_id_range(ids, num_modalities)
    # under vmap: the ids of every entry, (N, L) or (N, B, L) read as (N * B, L)
    return read_all_entries(
        ids, lambda t: _check_plain_id_range(t.flatten(0, -2) if t.dim() > 2 else t, num_modalities)
    )


def _check_plain_id_range(ids: torch.Tensor, num_modalities) -> int:
    on_gpu = not ids.is_cpu
    if on_gpu:
        if num_modalities is not None and _CHECKED_IDS.get(ids, num_modalities):
            return num_modalities
        lo, hi = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())  # one sync
    else:
        lo, hi = _cpu_id_range(ids)
    if num_modalities is None:
        if hi >= 2**31 - 1:  # M = max id + 1 must fit the kernels' 32-bit modality count
            raise ValueError(
                f"key_modality ids must lie in [-1, 2**31 - 2] when num_modalities is inferred; "
                f"got values in [{lo}, {hi}]"
            )
        num_modalities = max(hi + 1, 1)
    if lo < -1 or hi >= num_modalities:
        raise ValueError(
            f"key_modality ids must lie in [-1, {num_modalities - 1}] (num_modalities="
            f"{num_modalities}); got values in [{lo}, {hi}]"
        )
    if on_gpu:
        _CHECKED_IDS.put(ids, num_modalities, True)
    return num_modalities


def _is_causal_bias(mask) -> bool:
    from torch.nn.attention.bias import CausalBias

    return isinstance(mask, CausalBias)


def _canonical_mask(attn_mask, q, k, B, H, Lq, Lk, is_causal):
    """(mask view or None, is_causal, causal_offset) from SDPA's attn_mask / is_causal."""
    if attn_mask is None:
        return None, is_causal, 0
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if isinstance(attn_mask, CausalBias):
        if is_causal:
            raise ValueError("pass either is_causal=True or a CausalBias attn_mask, not both")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Lq, Lk):
            raise ValueError(
                f"attn_mask is a CausalBias for Lq={attn_mask.seq_len_q}, Lk={attn_mask.seq_len_kv};"
                f" the inputs have Lq={Lq}, Lk={Lk}"
            )
        lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
        return None, True, (Lk - Lq) if lower_right else 0
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"attn_mask must be None, a tensor or a torch.nn.attention.bias.CausalBias; got "
            f"{type(attn_mask).__name__}"
        )
    if is_causal:
        raise ValueError(
            "attn_mask and is_causal=True were both given; as in SDPA, pass one of them (a "
            "CausalBias attn_mask expresses other causal alignments)"
        )
    _check_device("attn_mask", attn_mask, q.device)
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(
            f"attn_mask must be bool (True = takes part) or a float mask of q's dtype {q.dtype} or "
            f"float32; got {attn_mask.dtype}"
        )
    want = (B, H, Lq, Lk)
    if attn_mask.dim() > 4 or attn_mask.dim() == 0:
        raise ValueError(
            f"attn_mask must be broadcastable to (B, H, Lq, Lk) = {want}; got {_shape(attn_mask)}"
        )
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if any(s not in (1, w) for s, w in zip(shape, want)):
        raise ValueError(
            f"attn_mask must be broadcastable to (B, H, Lq, Lk) = {want}; got {_shape(attn_mask)}"
        )
    return attn_mask.reshape(shape).expand(want), False, 0


# Zero ids (every key modality 0) for calls with statistics but no key_modality, by Lk: the
# kernels only read them. CPU only: a GPU tensor filled on one stream and read on another would
# need a synchronisation.
_ZERO_IDS: dict = {}


def _zero_ids(Lk: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(Lk, dtype=torch.int32, device=device)
    ids = _ZERO_IDS.get(Lk)
    if ids is None:
        if len(_ZERO_IDS) >= 64:
            _ZERO_IDS.clear()
        ids = _ZERO_IDS[Lk] = torch.zeros(Lk, dtype=torch.int32)
    return ids


def _is_dtensor(t) -> bool:
    # no DTensor exists before torch.distributed.tensor is imported: no import here
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _check_qkv(q, k, v) -> None:
    """The slow path of the q / k / v checks: raises the error that names what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _is_dtensor(t):
            raise TypeError(
                f"{name} is a DTensor (placements {tuple(t.placements)}); rolling_attention runs "
                "on the local shards: pass q.to_local(), k.to_local(), v.to_local() (shards along "
                "the batch or head dim are independent attentions; the statistics come out per "
                "shard)"
            )
        if t.is_nested:
            raise TypeError(
                f"{name} is a nested tensor; rolling_attention takes dense tensors: pad the "
                "sequences to one length and pass key_padding_mask (True = the key takes part)"
            )
    for name, t, want in (
        ("q", q, "(B, H, Lq, D)"),
        ("k", k, "(B, Hkv, Lk, D)"),
        ("v", v, "(B, Hkv, Lk, Dv)"),
    ):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape {want} (4 dims); got {_shape(t)}")


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
    attn_mask=None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    return_stats: bool = False,
) -> AttentionProblem:
    """Validate the arguments of :func:`rolling_attention` and put them in canonical form.

    Raises TypeError / ValueError naming the argument, what it got and what it wanted.
    (Each check is written for the cost of a tiny call too: flag reads before object building,
    the common case first.)
    """
    return _problem(
        q, k, v, rotation, rotated_queries, key_modality, num_modalities, key_padding_mask,
        attn_mask, is_causal, scale, dropout_p, rng_state, enable_gqa, return_stats,
    )  # fmt: skip


def _problem(
    q, k, v, rotation, rotated_queries, key_modality, num_modalities, key_padding_mask, attn_mask,
    is_causal, scale, dropout_p, rng_state, enable_gqa, return_stats,
) -> AttentionProblem:  # fmt: skip
    # make_problem with positional arguments: rolling_attention calls it once per call
    # exact tensors take the fast path; subclasses (a jagged nested tensor, among others) and
    # anything else are checked first, and a strided nested tensor fails to give its shape
    if not (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor):
        _check_qkv(q, k, v)
    try:
        qs, ks, vs = q.shape, k.shape, v.shape
    except RuntimeError:
        _check_qkv(q, k, v)
        raise
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        _check_qkv(q, k, v)
    on_cpu = q.is_cpu
    dtypes = _backends.supported_dtypes("cpu" if on_cpu else q.device.type)
    if not dtypes:
        raise ValueError(f"q is on {q.device}; no backend runs on {q.device.type} tensors")
    if not (on_cpu and k.is_cpu and v.is_cpu):
        _check_device("k", k, q.device)
        _check_device("v", v, q.device)
    dt = q.dtype
    if dt not in dtypes:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"q has dtype {dt}; supported on {q.device.type}: {names}")
    if k.dtype != dt or v.dtype != dt:
        for name, t in (("k", k), ("v", v)):
            if t.dtype != dt:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {dt}; they must match")
    B, H, Lq, D = qs
    _, Hkv, Lk, _ = ks
    if enable_gqa is not False and enable_gqa is not True:
        raise TypeError(f"enable_gqa must be a bool; got {type(enable_gqa).__name__}")
    if ks[0] != B or ks[3] != D:
        raise ValueError(
            f"k must have shape ({B}, Hkv, Lk, {D}) to match q {_shape(q)}; got {_shape(k)}"
        )
    if Hkv != H and not (enable_gqa and Hkv > 0 and H % Hkv == 0):
        want = "a divisor of" if enable_gqa else "equal to (or, with enable_gqa=True, a divisor of)"
        raise ValueError(
            f"k has {Hkv} heads and q has {H}: k's head count must be {want} q's; got k "
            f"{_shape(k)}, q {_shape(q)}"
        )
    if vs[0] != B or vs[1] != Hkv or vs[2] != Lk:
        raise ValueError(
            f"v must have shape ({B}, {Hkv}, {Lk}, Dv) to match k {_shape(k)}; got {_shape(v)}"
        )
    if D == 0 or vs[3] == 0:
        raise ValueError(f"head dims must be positive; got D={D}, Dv={vs[3]}")

    if is_causal is not False and is_causal is not True:
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    if return_stats is not False and return_stats is not True:
        raise TypeError(f"return_stats must be a bool; got {type(return_stats).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif type(scale) is not float or not math.isfinite(scale):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite; got {scale}")
        scale = float(scale)
    rng = None
    if type(dropout_p) is not float or dropout_p != 0.0:
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
            raise TypeError(f"dropout_p must be a float; got {type(dropout_p).__name__}")
        dropout_p = float(dropout_p)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in [0, 1); got {dropout_p}")
        if dropout_p > 0.0 and dropout_threshold(dropout_p) == 0:
            dropout_p = 0.0  # below 2**-32: no element can be dropped
        if dropout_p > 0.0:
            if rng_state is None:
                rng = new_rng_state()
            else:
                _check_tensor("rng_state", rng_state)
                if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
                    raise ValueError(
                        f"rng_state must be an int64 tensor (seed, offset) of shape (2,); got "
                        f"{rng_state.dtype} {_shape(rng_state)}"
                    )
                if rng_state.device.type != "cpu":
                    raise ValueError(
                        f"rng_state must be a CPU tensor; got one on {rng_state.device}"
                    )
                rng = rng_state

    if attn_mask is None:
        mask, causal_offset = None, 0
    else:
        mask, is_causal, causal_offset = _canonical_mask(attn_mask, q, k, B, H, Lq, Lk, is_causal)

    # --- rotation -------------------------------------------------------------------------
    rot = None
    if rotation is not None:
        _check_side("rotation", rotation, q, on_cpu)
        if not rotation.is_floating_point():
            raise TypeError(f"rotation must be a floating tensor; got {rotation.dtype}")
        acc = accumulation_dtype(dt)
        rs = rotation.shape
        if not (
            (len(rs) == 2 and rs[0] == D and rs[1] == D)
            or (len(rs) == 3 and rs[0] == H and rs[1] == D and rs[2] == D)
        ):
            raise ValueError(
                f"rotation must have shape ({D}, {D}) or ({H}, {D}, {D}) (an orthogonal matrix per "
                f"head, D={D}); got {_shape(rotation)}"
            )
        # any strides: the kernels read R through them (a QR factor is column-major)
        rot = rotation if rotation.dtype == acc else rotation.to(acc)

    # --- rotated rows ---------------------------------------------------------------------
    rows = None
    if rotated_queries is not None:
        _check_tensor("rotated_queries", rotated_queries)
        if rotation is None:
            raise ValueError("rotated_queries was given without a rotation")
        _check_side("rotated_queries", rotated_queries, q, on_cpu)
        if rotated_queries.dtype != torch.bool:
            raise TypeError(f"rotated_queries must be a bool tensor; got {rotated_queries.dtype}")
        rqs = rotated_queries.shape
        if (len(rqs) == 1 and rqs[0] == Lq) or (len(rqs) == 2 and rqs[0] == B and rqs[1] == Lq):
            rows = _last_dim_contiguous(rotated_queries)
        else:
            raise ValueError(
                f"rotated_queries must have shape ({Lq},) or ({B}, {Lq}); got {_shape(rotated_queries)}"
            )

    # --- padding --------------------------------------------------------------------------
    pad = None
    if key_padding_mask is not None:
        _check_side("key_padding_mask", key_padding_mask, q, on_cpu)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (True = the key takes part); got "
                f"{key_padding_mask.dtype}"
            )
        kps = key_padding_mask.shape
        if len(kps) != 2 or kps[0] != B or kps[1] != Lk:
            raise ValueError(
                f"key_padding_mask must have shape ({B}, {Lk}); got {_shape(key_padding_mask)}"
            )
        pad = _last_dim_contiguous(key_padding_mask)

    # --- modalities -----------------------------------------------------------------------
    if num_modalities is not None:
        if type(num_modalities) is not int:
            if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
                raise TypeError(
                    f"num_modalities must be an int or None; got {type(num_modalities).__name__}"
                )
            num_modalities = int(num_modalities)
        limit = _backends.max_supported_modalities()
        if num_modalities < 1 or (limit is not None and num_modalities > limit):
            raise ValueError(
                f"num_modalities must lie in [1, {limit or '...'}]; got {num_modalities}"
            )
        if num_modalities >= 2**31:
            raise ValueError(f"num_modalities must be < 2**31; got {num_modalities}")
    ids = None
    if key_modality is not None:
        _check_side("key_modality", key_modality, q, on_cpu)
        if not _is_integer_dtype(key_modality.dtype):
            raise TypeError(f"key_modality must be an integer tensor; got {key_modality.dtype}")
        kms = key_modality.shape
        if not (
            (len(kms) == 1 and kms[0] == Lk) or (len(kms) == 2 and kms[0] == B and kms[1] == Lk)
        ):
            raise ValueError(
                f"key_modality must have shape ({Lk},) or ({B}, {Lk}); got {_shape(key_modality)}"
            )
        # the ids are checked even when the batch is empty (B = 0 leaves a (Lk,) tensor unread)
        if key_modality.numel() > 0 and not _compiling():
            num_modalities = _check_id_range(key_modality, num_modalities)
        elif num_modalities is None:
            if key_modality.numel() > 0:
                raise ValueError("num_modalities must be given when rolling_attention is compiled")
            num_modalities = 1
    if num_modalities is None:
        num_modalities = 1

    if return_stats:
        ids = _zero_ids(Lk, q.device) if key_modality is None else key_modality
        M = num_modalities
    else:
        M = 0

    return AttentionProblem(
        q, k, v, rot, rows, ids, M, pad, is_causal, scale, return_stats, mask, causal_offset,
        dropout_p, rng,
    )  # fmt: skip


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
    attn_mask=None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    return_stats: bool = False,
    rng_state: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, AttentionStats]]:
    """Scaled-dot-product attention with query rotation and RollingQ statistics in one pass.

    Args:
        q: (B, H, Lq, D) queries (SDPA layout, any strides: a (B, L, H, D) tensor viewed through
            ``.transpose(1, 2)`` is read in place, and the output comes back in the same layout).
        k: (B, Hkv, Lk, D) keys. v: (B, Hkv, Lk, Dv) values. Same dtype and device as q. Hkv == H,
            or with ``enable_gqa=True`` a divisor of H (grouped-query attention, K/V not copied).
        rotation: None, (D, D) or (H, D, D) orthogonal matrix; a rotated row becomes R q_i
            (row form ``q @ R.T``). Applied in float32 (float64 for float64 inputs). Gradients
            flow to it when it requires grad.
        rotated_queries: None (every row, when rotation is given), bool (Lq,) or (B, Lq).
        key_modality: None (every key is modality 0), integer (Lk,) or (B, Lk): modality id of each
            key in [0, M), or -1 for a key that is attended but counted in no modality.
        num_modalities: M; None infers max id + 1 (a device sync on GPU).
        key_padding_mask: None or bool (B, Lk); True = the key takes part.
        attn_mask: as in SDPA: None, a bool tensor (True = takes part) or a float tensor (added to
            the scaled scores) broadcastable to (B, H, Lq, Lk) and read in place through its
            strides, or a ``torch.nn.attention.bias.CausalBias`` (upper-left / lower-right).
        is_causal: top-left aligned causal mask, as in SDPA.
        scale: default 1 / sqrt(D).
        dropout_p: attention dropout on the probabilities (statistics are taken before it). The
            keep-mask is counter-based (``rollingq_kernels.dropout_keep_mask``) and seeded from
            torch's default CPU generator, so ``torch.manual_seed`` reproduces it on every backend.
        enable_gqa: allow k / v with fewer heads than q (SDPA's grouped-query attention).
        return_stats: also return :class:`AttentionStats` (not differentiable).
        rng_state: the dropout seed as an int64 CPU tensor (seed, offset); None draws a new one.
        backend: "auto" or a registered backend name (``rollingq_kernels.registered_backends()``);
            the environment variable ROLLINGQ_BACKEND overrides "auto". A named backend that
            cannot run raises.

    Returns:
        out (B, H, Lq, Dv) in q's dtype and memory layout, or ``(out, stats)`` when
        ``return_stats``. A row with no visible key gives zeros, zero mass and lse = -inf.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    if _any_autocast():  # as torch.autocast treats SDPA (the reference handles its own math)
        autocast = autocast_dtype(q)
        if autocast is not None:
            q, k, v, attn_mask = autocast_inputs(autocast, q, k, v, attn_mask)
    problem = _problem(
        q, k, v, rotation, rotated_queries, key_modality, num_modalities, key_padding_mask,
        attn_mask, is_causal, scale, dropout_p, rng_state, enable_gqa, return_stats,
    )  # fmt: skip
    qs, ks = q.shape, k.shape
    if not (qs[0] and qs[1] and qs[2] and ks[1] and ks[2]):  # (head dims are checked positive)
        # Empty problems (B, H, Lq or Lk = 0) are answered by the reference on any backend.
        backend = "reference"
    _, forward = select_forward(problem, backend)
    out, stats = forward(problem)
    if return_stats:
        return out, stats
    return out


def _placeholder_rng() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int64)


def _plain_problem(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """The canonical problem of a plain SDPA call (4-D tensors of one supported dtype and device,
    a tensor mask or none, no dropout), built with only the checks such a call needs; None for
    anything else, which goes through :func:`make_problem`. A model calls SDPA once per layer,
    so this path is kept short."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if dropout_p or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    if (is_causal is not False and is_causal is not True) or (
        enable_gqa is not False and enable_gqa is not True
    ):
        return None
    if scale is not None and (type(scale) is not float or not math.isfinite(scale)):
        return None
    on_cpu = q.is_cpu and k.is_cpu and v.is_cpu  # flag reads; no torch.device objects
    if not on_cpu and (k.device != q.device or v.device != q.device):
        return None
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt:
        return None
    if dt not in _backends.supported_dtypes("cpu" if on_cpu else q.device.type):
        return None
    B, H, Lq, D = qs
    Bk, Hkv, Lk, Dk = ks
    if Bk != B or Dk != D or D == 0 or vs[0] != B or vs[1] != Hkv or vs[2] != Lk or vs[3] == 0:
        return None
    if Hkv != H and not (enable_gqa and Hkv > 0 and H % Hkv == 0):
        return None
    if mask is not None:
        if type(mask) is not torch.Tensor or is_causal or mask.dim() > 4 or mask.dim() == 0:
            return None
        if not (on_cpu and mask.is_cpu) and mask.device != q.device:
            return None
        if mask.dtype != torch.bool and mask.dtype not in (dt, torch.float32):
            return None
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        if any(s != 1 and s != w for s, w in zip(shape, (B, H, Lq, Lk))):
            return None
        mask = mask.reshape(shape).expand(B, H, Lq, Lk)
    return AttentionProblem(
        q, k, v, None, None, None, 0, None, is_causal,
        1.0 / math.sqrt(D) if scale is None else scale, False, mask,
    )  # fmt: skip


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, through this package's kernels.

    Same signature, arguments and return as torch's, so it can replace it by assignment (or with
    :func:`patch_sdpa`). Inputs are (..., H, L, E) like torch's (3-D inputs are one head; leading
    dims beyond the batch are flattened). A call that no fused backend of this package can run
    (e.g. a dtype or device it does not support, or a float mask that requires grad) is handed to
    torch's own SDPA, never to the O(L^2) reference.
    """
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor):
        if not (
            isinstance(query, _Tensor) and isinstance(key, _Tensor) and isinstance(value, _Tensor)
        ):
            return _TORCH_SDPA(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
            )
        # a jagged nested tensor is a subclass; a DTensor has its sharding rules in torch's SDPA
        to_torch = query.is_nested or key.is_nested or value.is_nested
        to_torch = to_torch or _is_dtensor(query) or _is_dtensor(key) or _is_dtensor(value)
    else:
        to_torch = query.is_nested  # a strided nested tensor's type is Tensor's
    if to_torch:  # variable lengths, distributed tensors: torch's kernels
        return _TORCH_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    if _any_autocast():  # torch.autocast runs SDPA in its lower-precision dtype: so here
        autocast = autocast_dtype(query)
        if autocast is not None:
            query, key, value, attn_mask = autocast_inputs(autocast, query, key, value, attn_mask)
    nd = query.dim()
    if nd < 3 or key.dim() != nd or value.dim() != nd:
        return _TORCH_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    lead = None if nd == 4 else query.shape[:-3] if nd > 4 else query.shape[:-2]
    if nd == 3:
        q4, k4, v4 = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    elif nd == 4:
        q4, k4, v4 = query, key, value
    else:
        # the leading dims' product, not -1: a reshape cannot infer it when a tensor is empty
        q4 = query.reshape(math.prod(query.shape[:-3]), *query.shape[-3:])
        k4 = key.reshape(math.prod(key.shape[:-3]), *key.shape[-3:])
        v4 = value.reshape(math.prod(value.shape[:-3]), *value.shape[-3:])
    mask = attn_mask
    if isinstance(mask, torch.Tensor) and nd != 4 and not _is_causal_bias(mask):
        full = (*lead, *query.shape[-3:-1], key.shape[-2]) if nd > 4 else None
        if nd == 3:
            mask = mask.unsqueeze(-3) if mask.dim() == 3 else mask
        else:
            mask = mask.expand(full).reshape(math.prod(full[:-3]), *full[-3:])
    # The dropout seed is drawn only once a fused backend takes the call: a call handed to torch
    # leaves torch's generator as torch's own SDPA would (same seed, same result).
    draw_seed = isinstance(dropout_p, (int, float)) and dropout_p > 0.0
    try:
        problem = _plain_problem(q4, k4, v4, mask, dropout_p, is_causal, scale, enable_gqa)
        if problem is None:
            problem = make_problem(
                q4, k4, v4, attn_mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                enable_gqa=enable_gqa, rng_state=_placeholder_rng() if draw_seed else None,
            )  # fmt: skip
    except (TypeError, ValueError, RuntimeError):
        # let torch raise its own error for what it does not accept either (a RuntimeError: a
        # tensor that cannot give its shape, as a strided nested key beside a dense query)
        return _TORCH_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    qs, ks = q4.shape, k4.shape
    if not (qs[0] and qs[1] and qs[2] and ks[1] and ks[2]):  # empty (head dims are positive)
        spec = None
    else:
        try:
            spec, forward = select_forward(problem, "auto", warn=False)
        except _backends.NoBackendError:
            spec = None
    if spec is None or not spec.fused:
        return _TORCH_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    if problem.dropout_p > 0.0:
        problem = problem._replace(rng_state=new_rng_state())
    out, _ = forward(problem)
    if nd == 3:
        return out.squeeze(1)
    if nd > 4:
        return out.reshape(*lead, *out.shape[-3:])
    return out


@contextlib.contextmanager
def patch_sdpa():
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is this package's
    :func:`scaled_dot_product_attention` (models that call SDPA — timm, nn.MultiheadAttention
    with need_weights=False, many hand-written blocks — run on the fused kernels)."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
