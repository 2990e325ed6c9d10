"""The "triton" backend: launchers, tuning configs, the torch ops and the registry glue.

Layers, bottom up:

* ``rolling_attention_triton_forward`` / ``rolling_attention_triton_backward``: plain launchers
  of the kernels in ``triton_attention_kernels.py`` on canonical inputs (see
  :class:`~rollingq_kernels.backends.AttentionProblem`).
* the implementations of ``torch.ops.rollingq.triton_attention_fwd`` / ``_bwd`` (schema, fake
  implementation and autograd are the shared op contract, ``op_contract.py``), so
  ``torch.compile(fullgraph=True)`` traces them as single nodes.
* ``unavailable_reason`` / ``unsupported_reasons`` / ``forward``: the backend protocol of
  ``backends.py``.

The registry declares this backend for CUDA tensors only, so "auto" never picks it for CPU
tensors. Without a GPU, Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported) runs the same kernels on CPU tensors: the tests call the launchers and the ops of this
module directly in that mode; ``backend="triton"`` through the public API stays CUDA-only.

Precision: fp16/bf16 dots run on tensor cores with float32 accumulation. float32 inputs use
3xTF32 products by default (``input_precision="tf32x3"``: each operand split into a TF32 high and
low part, three tensor-core products, about float32 accuracy, parity 1e-5 with the float64
reference) in tiles of at most 64 x 32 so nothing spills; ``ROLLINGQ_TRITON_TF32=1`` allows
single TF32 products (about 5e-4). The rotation of fp16/bf16 queries is a TF32 product whose
result is rounded to the input dtype anyway; float32 queries are rotated by their own kernel.
"""

import functools
import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dropout as _dropout
from . import op_contract as _contract
from ._stats import AttentionStats

try:
    import triton

    from . import triton_attention_kernels as _k

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # triton missing or broken: the backend reports why, nothing else breaks
    triton = None
    _k = None
    _IMPORT_ERROR = f"triton cannot be imported ({type(exc).__name__}: {exc})"

__all__ = [
    "rolling_attention_triton_forward",
    "rolling_attention_triton_backward",
    "rotate_rows",
    "unavailable_reason",
    "unsupported_reasons",
    "forward",
]

MAX_MODALITIES = 64
FAST_HEAD_DIM = 256  # head dims up to this stay in registers whole; larger ones are chunked
_TILED_BLOCK_D = 64  # forward: chunk of the contraction over D
_TILED_BLOCK_DV = 128  # forward: chunk of the output over Dv
_TILED_BWD_BLOCK = 128  # backward: chunk of dK / dV / dQ owned by one program


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Interpreter runs use small fixed tiles (16 x 16) so that small test shapes span several tiles.
# Memory-safety tests instead set this to an ``EmulatedGpu`` so that the interpreter launches
# exactly what a GPU of that kind would: its pruned configs (``config_index`` picks which one the
# autotuner might choose), its split-K plan and the GPU block sizes of the helper kernels.
_EMULATED_GPU = None


class EmulatedGpu:
    def __init__(self, capability=(9, 0), sm_count=132, config_index=0):
        self.capability = tuple(capability)
        self.sm_count = int(sm_count)
        self.config_index = int(config_index)


def _small_tiles() -> bool:
    return _interpreting() and _EMULATED_GPU is None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Backend protocol


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not _interpreting() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def unsupported_reasons(problem) -> List[str]:
    reasons = []
    if problem.device_type == "cpu" and not _interpreting():
        reasons.append("CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1)")
    if problem.num_modalities > MAX_MODALITIES:
        reasons.append(
            f"at most {MAX_MODALITIES} modalities; got num_modalities={problem.num_modalities}"
        )
    if problem.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"supports float16, bfloat16 and float32, not {problem.q.dtype}")
    B, H, _, _ = problem.q.shape
    if B * H > _MAX_GRID_Y:
        reasons.append(f"B * H = {B * H} exceeds the grid limit {_MAX_GRID_Y} of one launch")
    for name, t in (("q", problem.q), ("k", problem.k), ("v", problem.v),
                    ("attn_mask", problem.attn_mask)):  # fmt: skip
        if t is not None and _slice_extent(t) >= 2**31:
            reasons.append(
                f"{name}: one (batch, head) slice spans {_slice_extent(t)} elements; the kernels "
                "index within a slice in 32 bits (< 2^31)"
            )
    return reasons


_MAX_GRID_Y = 65535  # CUDA's limit on the 2nd and 3rd grid dims; axis 1 of every launch is B * H


def _slice_extent(t: Tensor) -> int:
    """One past the largest element offset within one (batch, head) slice of a 4-D tensor: the
    kernels add 64-bit batch / head offsets and 32-bit offsets within the slice."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n > 0)


def forward(p) -> Tuple[Tensor, Optional[AttentionStats]]:
    return _contract.run_forward(_contract.TRITON, p)


# ----------------------------------------------------------------------------------------------
# Configs. On a GPU the kernels are autotuned over the lists below, pruned per architecture and
# head dim; in the interpreter a small fixed config is used (tuning would run every config).


def _capability() -> Tuple[int, int]:
    if _EMULATED_GPU is not None:
        return _EMULATED_GPU.capability
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cfg(bm: int, bn: int, warps: int, stages: int):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _fwd_configs():
    if triton is None:
        return []
    # (BLOCK_M, BLOCK_N, warps, stages), best first: the first one _prune keeps is the untuned
    # default. sm_90 takes the 3-stage 128-row tiles at every head dim; on sm_8x (less shared
    # memory) _prune drops them for head dims >= 128, leaving (128, 64, 8, 2) first.
    # 16-row tiles serve decoding-like calls (Lq <= 16).
    table = [
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 4, 3),
        (128, 64, 8, 2),
        (128, 32, 4, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 64, 8, 2),
        (64, 32, 4, 2),
        (64, 32, 8, 2),
        (32, 64, 4, 2),
        (16, 64, 4, 2),
        (16, 128, 4, 3),
        (16, 32, 4, 2),
    ]
    return [_cfg(*row) for row in table]


def _bwd_dkdv_configs():
    if triton is None:
        return []
    table = [
        (32, 128, 8, 2),
        (64, 128, 8, 2),
        (64, 64, 4, 2),
        (32, 64, 4, 2),
        (32, 64, 8, 2),
        (16, 64, 4, 2),
        (16, 32, 4, 2),
    ]
    return [_cfg(*row) for row in table]


def _bwd_dq_configs():
    if triton is None:
        return []
    table = [
        (128, 64, 8, 2),
        (128, 32, 8, 2),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
        (16, 64, 4, 2),
        (16, 32, 4, 2),
    ]
    return [_cfg(*row) for row in table]


def _prune(configs, named_args, kind: str, **kwargs):
    args = {**named_args, **kwargs}
    lq, lk = int(args["Lq"]), int(args["Lk"])
    chunked = int(args["D_CHUNKS"]) > 1 or int(args["DV_CHUNKS"]) > 1
    width = max(int(args["BLOCK_D"]), int(args["BLOCK_DV"]))
    fp32 = args.get("PRECISION", "none") != "none"
    dropout = bool(args.get("DROPOUT"))
    major, _ = _capability()
    # dropout with a float mask (or any dropout on sm_8x, whose smaller register allocation
    # spills sooner): smaller tiles at head dims >= 128
    float_mask = bool(args.get("HAS_MASK")) and not args.get("MASK_BOOL")
    heavy = dropout and (float_mask or major == 8)
    keep, seen = [], set()
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        small_rows = max(16, _next_pow2(lq))
        # query tiles larger than Lq are wasted work; 16/32-row tiles only pay for short queries
        if bm > small_rows:
            continue
        if kind in ("fwd", "dq") and lq > 64 and bm < 64:
            continue
        if kind == "dkdv" and bn > max(16, _next_pow2(lk)):
            continue
        if chunked:
            # head dims above 256 loop over chunks: a pipelined loop would buffer every chunk's
            # loads (over 200 KiB of shared memory at D = 768), so one stage and 64 x 64 tiles
            if bm * bn > 64 * 64 or (kind == "fwd" and bm > 64):
                continue  # (128 x 32 forward tiles spill)
            c = triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)
        # register budget of the float32 accumulators: (BLOCK_M or BLOCK_N) x head dim
        elif width >= 256:
            if c.num_stages > 2 or bm * bn > 64 * 64:
                continue
            if (kind == "dkdv" and bn > 64) or (kind == "dq" and bm > 64):
                continue
        if not chunked and width >= 128 and kind != "fwd" and bm * bn > 64 * 128:
            continue
        if not chunked and kind == "fwd" and bm == 128:
            # 128-row forward tiles on 4 warps spill at head dim 128, and at 64 once the rotation
            # or the statistics add their registers; so do 128 x 128 tiles with either
            extra = any(args.get(f) for f in ("ROTATE", "STATS", "HAS_MASK", "DROPOUT"))
            if c.num_warps < 8 and (width >= 128 or extra):
                continue
            if width >= 128 and bn > 64 and extra:
                continue
        if heavy and width >= 128 and not chunked:
            # a float mask tile and the dropout words on top of the 128-wide accumulators: the
            # tiles that compile without spills on sm_90 (docs/triton.md, compile table)
            if kind == "fwd" and (bm * bn > 128 * 32 or c.num_warps < 8):
                continue
            if kind == "dq" and bm * bn > 128 * 32:
                continue
            if kind == "dkdv" and (bn > 64 or (bm >= 32 and c.num_warps < 8)):
                continue
        if dropout and width >= 256 and not chunked and kind == "fwd" and bn > 32:
            continue
        if fp32 and (bm * bn > 64 * 32 or c.num_stages > 2):
            continue  # float32 operands take twice the registers and shared memory
        if (fp32 or width >= 256) and not chunked and bm >= 64 and c.num_warps < 8:
            continue  # register budget: spread the float32 accumulators over 8 warps
        if major == 8 and width >= 256 and c.num_stages > 1 and not chunked:
            c = triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)
        if major == 8 and c.num_stages > 2 and width >= 128 and bm >= 128:
            continue  # sm_80/86/89: less shared memory per SM than sm_90
        if major < 9 and bm == 128 and bn == 128:
            continue
        key = (bm, bn, c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            keep.append(c)
    if not keep:
        c = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        keep = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)]
    # at most five candidates: every one is compiled once per specialisation, and tuning time
    # adds up over head dims and feature flags
    return keep[:5]


_FWD_KEY = [
    "LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "D_CHUNKS", "DV_CHUNKS", "ROTATE", "HAS_ROWS",
    "HAS_PAD", "CAUSAL", "STATS", "PRECISION", "HAS_MASK", "MASK_BOOL", "DROPOUT",
]  # fmt: skip
_BWD_KEY = [
    "LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "D_CHUNKS", "DV_CHUNKS", "HAS_PAD", "CAUSAL",
    "PRECISION", "HAS_MASK", "MASK_BOOL", "DROPOUT",
]  # fmt: skip

if triton is not None:
    _fwd_tuned = triton.autotune(
        configs=_fwd_configs(),
        key=_FWD_KEY,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kind="fwd")},
    )(_k._rolling_attn_fwd_kernel)
    _dkdv_tuned = triton.autotune(
        configs=_bwd_dkdv_configs(),
        key=_BWD_KEY,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kind="dkdv")},
    )(_k._rolling_attn_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(
        configs=_bwd_dq_configs(),
        key=_BWD_KEY,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kind="dq")},
    )(_k._rolling_attn_bwd_dq_kernel)

# the interpreter's fixed config: small tiles, so small test shapes still span several tiles
_INTERP_META = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _autotune_enabled() -> bool:
    return os.environ.get("ROLLINGQ_TRITON_AUTOTUNE", "1") != "0"


def _launch(kind: str, tuned, raw, grid, lq: int, lk: int, *args, **meta):
    """Run a tunable kernel: the fixed small config in the interpreter; on a GPU the autotuned
    kernel, or (ROLLINGQ_TRITON_AUTOTUNE=0, e.g. in tests, to skip tuning time) the first config
    the pruning keeps for these shapes and this GPU."""
    if _interpreting() and _EMULATED_GPU is not None:
        configs = {"fwd": _fwd_configs, "dkdv": _bwd_dkdv_configs, "dq": _bwd_dq_configs}[kind]()
        kept = _prune(configs, {"Lq": lq, "Lk": lk}, kind, **meta)
        cfg = kept[min(_EMULATED_GPU.config_index, len(kept) - 1)]
        raw[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif _interpreting():
        raw[grid](*args, **meta, **_INTERP_META)
    elif _autotune_enabled():
        tuned[grid](*args, **meta)
    else:
        configs = {"fwd": _fwd_configs, "dkdv": _bwd_dkdv_configs, "dq": _bwd_dq_configs}[kind]()
        cfg = _prune(configs, {"Lq": lq, "Lk": lk}, kind, **meta)[0]
        raw[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_MAX_BLOCK_M = 128  # the largest BLOCK_M of the forward configs


def _mass_plan(m: int) -> Tuple[int, bool]:
    """(M_PAD, MASS_DOT): up to 8 modalities the statistics reduce per modality in registers
    (M_PAD = next power of two >= 2); more take tensor-core / float32 products with one-hot ids,
    whose width must be at least 16."""
    pad = max(2, _next_pow2(max(m, 1)))
    return (pad, False) if pad <= 8 else (max(16, pad), True)


def _bucket(n: int) -> int:
    return _next_pow2(max(int(n), 1))


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "none"
    return "tf32" if os.environ.get("ROLLINGQ_TRITON_TF32", "0") == "1" else "tf32x3"


def _upcast(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter computes bfloat16 dots wrongly; there they are done in float32.
    return _interpreting() and dtype == torch.bfloat16


def _head_plan(d: int, tiled_block: int) -> Tuple[int, int]:
    """(BLOCK, CHUNKS) for a head dim: whole and padded up to FAST_HEAD_DIM, else chunked."""
    if d <= FAST_HEAD_DIM:
        return max(16, _next_pow2(d)), 1
    return tiled_block, _cdiv(d, tiled_block)


def _as_u8(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _mask_args(attn_mask: Optional[Tensor], shape, dummy: Tensor) -> Tuple[Tensor, tuple, dict]:
    """(pointer, strides, constexprs) of an attn_mask broadcast to ``shape`` (B, H, Lq, Lk): read
    in place through its strides (stride 0 on broadcast dims); a bool mask as uint8 (a view)."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), dict(HAS_MASK=False, MASK_BOOL=False)
    m = attn_mask.expand(shape)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    return m, m.stride(), dict(HAS_MASK=True, MASK_BOOL=is_bool)


def _as_int32(x: int) -> int:
    # the two's complement int32 holding the 32-bit pattern x (the kernels bitcast it to uint32)
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _dropout_args(dropout_p: float, rng_state: Optional[Tensor], lk: int) -> Tuple[tuple, dict]:
    """Scalar kernel arguments of the dropout keep-mask (dropout.py): (ceil(Lk / 4), seed lo, seed
    hi, offset lo, offset hi, threshold, 1 / (1 - p)) and the DROPOUT constexpr."""
    groups = _cdiv(lk, 4)
    if dropout_p <= 0.0:
        return (groups, 0, 0, 0, 0, 0, 1.0), dict(DROPOUT=False)
    if rng_state is None:
        raise ValueError("dropout_p > 0 needs rng_state, an int64 CPU tensor (seed, offset)")
    seed, offset = (int(x) & (2**64 - 1) for x in rng_state.tolist())
    thr = _dropout.dropout_threshold(float(dropout_p))
    words = (seed, seed >> 32, offset, offset >> 32, thr)
    scale = 1.0 / (1.0 - float(dropout_p))
    return (groups, *(_as_int32(w) for w in words), scale), dict(DROPOUT=True)


def _num_splits(bh: int, lq: int, lk: int, device: torch.device) -> Tuple[int, int]:
    """Split-K (flash-decoding) plan (splits, keys per split) for short query blocks."""
    if _EMULATED_GPU is not None:
        n_sm, granule, min_keys = _EMULATED_GPU.sm_count, 128, 512
    elif _interpreting() or device.type != "cuda":
        n_sm, granule, min_keys = 2, 16, 32
    else:
        n_sm, granule, min_keys = _sm_count(device.index or 0), 128, 512
    if lq > 64 or lk < min_keys:
        return 1, lk
    programs = _cdiv(lq, 16 if lq <= 16 else 64) * bh
    if programs >= n_sm:
        return 1, lk
    splits = min(_cdiv(2 * n_sm, programs), _cdiv(lk, granule), 128)
    return _plan_splits(lk, splits, granule)


def _plan_splits(lk: int, splits: int, granule: int = 16) -> Tuple[int, int]:
    per = _cdiv(_cdiv(lk, max(splits, 1)), granule) * granule
    return _cdiv(lk, per), per


# ----------------------------------------------------------------------------------------------
# Launchers


def rotate_rows(
    x: Tensor,
    rotation: Tensor,
    rows: Optional[Tensor],
    *,
    transpose: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """x (B, H, L, D), any strides -> contiguous (B, H, L, D) in ``out_dtype``: on the selected
    rows ``x_i @ R^T`` (the forward rotation) or ``x_i @ R`` (``transpose=True``, its gradient),
    other rows copied. rotation: contiguous (H, D, D) float32; rows: None or bool (B, L)."""
    B, H, L, D = x.shape
    y = torch.empty(B, H, L, D, dtype=out_dtype, device=x.device)
    rows_u8 = _as_u8(rows)
    block_m = 16 if _small_tiles() else 64
    block_d = min(64, max(16, _next_pow2(D)))
    block_c = min(32, max(16, _next_pow2(D)))
    grid = (_cdiv(L, block_m), B * H, _cdiv(D, block_d))
    prec = (
        _precision(torch.float32)
        if x.dtype == torch.float32 or out_dtype == torch.float32
        else "tf32"
    )
    if _interpreting():
        prec = "ieee"
    _k._rotate_rows_kernel[grid](
        x,
        rotation,
        rows_u8 if rows_u8 is not None else y,
        y,
        *x.stride(),
        H,
        L,
        D,
        D if transpose else 1,
        1 if transpose else D,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_C=block_c,
        HAS_ROWS=rows_u8 is not None,
        PRECISION=prec,
        UPCAST=False,
    )
    return y


def rolling_attention_triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rotation: Optional[Tensor] = None,
    rotated_queries: Optional[Tensor] = None,
    key_modality: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    num_modalities: int = 0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    causal_offset: int = 0,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward on canonical inputs (see AttentionProblem).

    Returns out (B, H, Lq, Dv) in q's dtype (contiguous), lse (B, H, Lq), modality_mass
    (B, H, Lq, M) and key_sum (B, H, M, D), all float32; M = num_modalities (0: no statistics,
    key_modality is then ignored). ``num_splits`` forces the number of key splits (tests);
    None lets the flash-decoding heuristic choose (more than one only for short query blocks).
    k and v may have fewer heads than q (grouped-query attention: H a multiple of theirs; they
    are read in place, query head h reads kv head h // (H / Hkv)). With ``is_causal``, key j is
    visible from row i iff j <= i + causal_offset. ``attn_mask``: None, or bool / float
    broadcastable to (B, H, Lq, Lk), read in place. ``dropout_p`` > 0 drops probabilities with the
    keep-mask of ``rng_state`` (dropout.py); lse and the statistics are taken before dropout.
    """
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    group = H // k.shape[1]
    # offsets past Lk show every key and below -Lq hide every key: clamped, i + offset fits int32
    causal_offset = min(max(int(causal_offset), -Lq), Lk) if is_causal else 0
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    M = int(num_modalities)
    stats = M > 0
    if stats and key_modality is None:
        raise ValueError("key_modality is required when num_modalities > 0")
    block_d, d_chunks = _head_plan(D, _TILED_BLOCK_D)
    block_dv, dv_chunks = _head_plan(Dv, _TILED_BLOCK_DV)
    if num_splits is None:
        splits, per = _num_splits(B * H, Lq, Lk, dev)
    else:
        splits, per = _plan_splits(Lk, num_splits)

    # float32 queries are rotated by their own kernel: in the prologue, the accurate (3xTF32)
    # product would cost the main loop its registers
    rotate_inside = rotation is not None and d_chunks == 1 and q.dtype != torch.float32
    if rotation is not None and not rotate_inside:
        q = rotate_rows(q, rotation, rotated_queries, transpose=False, out_dtype=q.dtype)
    rows_u8 = _as_u8(rotated_queries) if rotate_inside else None
    pad_u8 = _as_u8(key_padding_mask)
    ids = key_modality.to(torch.int32).contiguous() if stats else None

    f32 = torch.float32
    # key-sum slots: at most the query tiles of the largest BLOCK_M any config uses
    ks_slots = _cdiv(Lq, _MAX_BLOCK_M)
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, Lq, dtype=f32, device=dev)
    mass = torch.empty(B, H, Lq, M, dtype=f32, device=dev)
    key_sum = torch.empty(B, H, M, D, dtype=f32, device=dev)
    if splits > 1:
        o_buf = torch.empty(splits, B, H, Lq, Dv, dtype=f32, device=dev)
        lse_buf = torch.empty(splits, B, H, Lq, dtype=f32, device=dev)
        mass_buf = torch.empty(splits, B, H, Lq, M, dtype=f32, device=dev)
    else:
        o_buf, lse_buf, mass_buf = out, lse, mass
    if splits > 1 or ks_slots > 1:
        ks_buf = torch.empty(splits, B, H, ks_slots, M, D, dtype=f32, device=dev)
    else:
        ks_buf = key_sum
    dummy = lse
    m_pad, mass_dot = _mass_plan(M)
    rot_chunk = max(16, min(block_d, 4096 // block_d))
    mask_ptr, mask_strides, mask_meta = _mask_args(attn_mask, (B, H, Lq, Lk), dummy)
    drop_args, drop_meta = _dropout_args(dropout_p, rng_state, Lk)

    def grid(meta):
        return (_cdiv(Lq, meta["BLOCK_M"]), B * H, splits * dv_chunks)

    _launch(
        "fwd",
        _fwd_tuned if not _interpreting() else None,
        _k._rolling_attn_fwd_kernel,
        grid,
        Lq,
        Lk,
        q,
        k,
        v,
        rotation if rotate_inside else dummy,
        rows_u8 if rows_u8 is not None else dummy,
        ids if ids is not None else dummy,
        pad_u8 if pad_u8 is not None else dummy,
        o_buf,
        lse_buf,
        mass_buf if stats else dummy,
        ks_buf if stats else dummy,
        mask_ptr,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        H,
        Lq,
        Lk,
        D,
        Dv,
        M,
        group,
        causal_offset,
        per,
        ks_slots,
        float(scale) * _k.LOG2E,
        *drop_args,
        _bucket(Lq),
        _bucket(Lk),
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        D_CHUNKS=d_chunks,
        DV_CHUNKS=dv_chunks,
        ROT_CHUNK=rot_chunk,
        M_PAD=m_pad,
        ROTATE=rotate_inside,
        HAS_ROWS=rows_u8 is not None,
        HAS_PAD=pad_u8 is not None,
        CAUSAL=bool(is_causal),
        STATS=stats,
        PRECISION=_precision(q.dtype),
        ROT_PRECISION="ieee" if _interpreting() else ("tf32x3" if q.dtype == f32 else "tf32"),
        MASS_DOT=mass_dot,
        UPCAST=_upcast(q.dtype),
        **mask_meta,
        **drop_meta,
    )
    if splits > 1:
        rows_total = B * H * Lq
        _k._rolling_attn_merge_kernel[(rows_total,)](
            o_buf,
            lse_buf,
            mass_buf if stats else dummy,
            out,
            lse,
            mass if stats else dummy,
            splits,
            rows_total,
            Dv,
            M,
            BLOCK_S=max(2, _next_pow2(splits)),
            BLOCK_DV=min(block_dv, 128),
            DV_CHUNKS=_cdiv(Dv, min(block_dv, 128)),
            M_PAD=m_pad,
            STATS=stats,
        )
    if stats and ks_buf is not key_sum:
        torch.sum(ks_buf, dim=(0, 3), out=key_sum)
    return out, lse, mass, key_sum


def rolling_attention_triton_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    rotation: Optional[Tensor] = None,
    rotated_queries: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    causal_offset: int = 0,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the forward above (contiguous, in q's dtype).

    The rotated queries are recomputed (one small product) rather than stored by the forward;
    dq of the rotated queries is then taken back through the rotation: dq_i = dq_rot_i @ R.
    The attn_mask is read again and the dropout keep-mask regenerated from ``rng_state``.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    # offsets past Lk show every key and below -Lq hide every key: clamped, i + offset fits int32
    causal_offset = min(max(int(causal_offset), -Lq), Lk) if is_causal else 0
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if rotation is not None:
        q = rotate_rows(q, rotation, rotated_queries, transpose=False, out_dtype=q.dtype)
    out = out.contiguous()
    lse = lse.contiguous()
    if _slice_extent(dout) >= 2**31:  # a gradient laid out more widely than q (32-bit offsets)
        dout = dout.contiguous()
    pad_u8 = _as_u8(key_padding_mask)
    f32 = torch.float32
    if D <= FAST_HEAD_DIM and Dv <= FAST_HEAD_DIM:
        block_d, d_chunks = _head_plan(D, _TILED_BWD_BLOCK)
        block_dv, dv_chunks = _head_plan(Dv, _TILED_BWD_BLOCK)
    else:
        block_d, d_chunks = _TILED_BWD_BLOCK, _cdiv(D, _TILED_BWD_BLOCK)
        block_dv, dv_chunks = _TILED_BWD_BLOCK, _cdiv(Dv, _TILED_BWD_BLOCK)

    delta = torch.empty(B, H, Lq, dtype=f32, device=dev)
    pre_bm = 16 if _small_tiles() else 64
    pre_dv = min(128, max(16, _next_pow2(Dv)))
    _k._rolling_attn_bwd_preprocess_kernel[(_cdiv(Lq, pre_bm), B * H)](
        out,
        dout,
        delta,
        *dout.stride(),
        H,
        Lq,
        Dv,
        BLOCK_M=pre_bm,
        BLOCK_DV=pre_dv,
        DV_CHUNKS=_cdiv(Dv, pre_dv),
    )

    dk = torch.empty(B, Hkv, Lk, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=v.dtype, device=dev)
    dq_buf = torch.empty(B, H, Lq, D, dtype=f32 if rotation is not None else q.dtype, device=dev)
    mask_ptr, mask_strides, mask_meta = _mask_args(attn_mask, (B, H, Lq, Lk), delta)
    drop_args, drop_meta = _dropout_args(dropout_p, rng_state, Lk)
    common = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *mask_strides,
        H,
        Lq,
        Lk,
        D,
        Dv,
        group,
        causal_offset,
        float(scale),
        float(scale) * _k.LOG2E,
        *drop_args,
        _bucket(Lq),
        _bucket(Lk),
    )
    meta = dict(
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        D_CHUNKS=d_chunks,
        DV_CHUNKS=dv_chunks,
        HAS_PAD=pad_u8 is not None,
        CAUSAL=bool(is_causal),
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
        **mask_meta,
        **drop_meta,
    )
    pad_arg = pad_u8 if pad_u8 is not None else delta
    chunks = max(d_chunks, dv_chunks)
    _launch(
        "dkdv",
        _dkdv_tuned if not _interpreting() else None,
        _k._rolling_attn_bwd_dkdv_kernel,
        lambda m: (_cdiv(Lk, m["BLOCK_N"]), B * Hkv, chunks),
        Lq, Lk,
        q, k, v, pad_arg, dout, lse, delta, dk, dv, mask_ptr,
        *common,
        **meta,
    )  # fmt: skip
    _launch(
        "dq",
        _dq_tuned if not _interpreting() else None,
        _k._rolling_attn_bwd_dq_kernel,
        lambda m: (_cdiv(Lq, m["BLOCK_M"]), B * H, d_chunks),
        Lq, Lk,
        q, k, v, pad_arg, dout, lse, delta, dq_buf, mask_ptr,
        *common,
        **meta,
    )  # fmt: skip
    if rotation is None:
        return dq_buf, dk, dv
    dq = rotate_rows(dq_buf, rotation, rotated_queries, transpose=True, out_dtype=q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Implementations of the op family rollingq::triton_attention_fwd / _bwd (schema, fake and
# autograd: op_contract.py). Registered for CUDA tensors, and for CPU tensors so that Triton's
# interpreter can run them.


def _key_count(ids, pad, B: int, M: int, device) -> Tensor:
    """(B, M) float32: non-padded keys of each modality."""
    if M == 0:
        return torch.zeros((B, 0), dtype=torch.float32, device=device)
    counted = ids[..., None] == torch.arange(M, device=ids.device, dtype=ids.dtype)
    if pad is not None:
        counted = counted & pad[..., None]
    return counted.sum(dim=1).to(torch.float32)


def _side_inputs(q, rotation, rotated_queries, key_modality, key_padding_mask):
    # the launchers take full-shape contiguous side inputs: rotation (H, D, D), rows (B, Lq), ids
    # (B, Lk); the contract also allows (D, D), (Lq,) and (Lk,) for one of them shared by all
    B, H = q.shape[0], q.shape[1]

    def c(t, dims, lead):
        if t is None:
            return None
        if t.dim() == dims - 1:
            t = t.expand(lead, *t.shape)
        return t.contiguous()

    return (
        c(rotation, 3, H),
        c(rotated_queries, 2, B),
        c(key_modality, 2, B),
        c(key_padding_mask, 2, B),
    )


@torch.library.impl("rollingq::triton_attention_fwd", ("CPU", "CUDA"), lib=_contract._LIB)
def _triton_fwd_impl(q, k, v, rotation, rotated_queries, key_modality, num_modalities,
                     key_padding_mask, attn_mask, is_causal, causal_offset, scale, dropout_p,
                     rng_state):  # fmt: skip
    rotation, rows, ids, pad = _side_inputs(
        q, rotation, rotated_queries, key_modality, key_padding_mask
    )
    if rotation is None:
        rows = None
    out, lse, mass, key_sum = rolling_attention_triton_forward(
        q, k, v, rotation, rows, ids, pad, num_modalities, is_causal, scale,
        causal_offset=causal_offset, attn_mask=attn_mask, dropout_p=dropout_p,
        rng_state=rng_state,
    )  # fmt: skip
    B, H, Lq, _ = q.shape
    result = _contract.layout_like(q, (B, H, Lq, v.shape[3]))
    result.copy_(out)
    return result, lse, mass, key_sum, _key_count(ids, pad, B, int(num_modalities), q.device)


@torch.library.impl("rollingq::triton_attention_bwd", ("CPU", "CUDA"), lib=_contract._LIB)
def _triton_bwd_impl(grad_out, q, k, v, out, lse, rotation, rotated_queries, key_padding_mask,
                     attn_mask, is_causal, causal_offset, scale, dropout_p,
                     rng_state):  # fmt: skip
    rotation, rows, _, pad = _side_inputs(q, rotation, rotated_queries, None, key_padding_mask)
    if rotation is None:
        rows = None
    dq, dk, dv = rolling_attention_triton_backward(
        grad_out, q, k, v, out, lse, rotation, rows, pad, is_causal, scale,
        causal_offset=causal_offset, attn_mask=attn_mask, dropout_p=dropout_p,
        rng_state=rng_state,
    )  # fmt: skip
    grads = []
    for t, g in ((q, dq), (k, dk), (v, dv)):
        r = _contract.layout_like(t, t.shape)
        r.copy_(g)
        grads.append(r)
    return tuple(grads)
