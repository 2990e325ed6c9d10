"""Loading the compiled library that implements the ``rollingq::attention_fwd / _bwd`` op family.

``rollingq_kernels._C`` registers the CPU implementation of the ops whose schema, fake
implementation and autograd formula live in :mod:`rollingq_kernels.op_contract`; a CUDA build
(``_C_cuda``, see :mod:`rollingq_kernels.cuda_attention`) registers the CUDA implementation of the
same ops. This module finds the library built for this interpreter, refuses one built against
another torch, loads it, and runs the op on an :class:`AttentionProblem`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sysconfig
import warnings
from typing import Callable, Optional, Tuple

import torch

from . import op_contract
from ._stats import AttentionStats

__all__ = [
    "attention_forward",
    "direct_backward_entry",
    "direct_entry",
    "fold_query_groups",
    "id_range_entry",
    "load_error",
    "library_path",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_VERSION_MARK = re.compile(rb"rollingq-torch-version=([0-9]+\.[0-9]+\.[0-9]+);")


def library_path(name: str = "_C") -> Optional[str]:
    """Path of ``rollingq_kernels.<name>`` built for this interpreter, or None when it is not built.

    Only the file with this interpreter's extension suffix (e.g. ``.cpython-311-x86_64-linux-gnu
    .so``) or the suffix-less ``<name>.so`` (CMake's) is taken: a library left over from another
    Python is never picked up in its place.
    """
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for candidate in (name + suffix, name + ".so", name + ".pyd"):
        path = os.path.join(_PACKAGE_DIR, candidate)
        if os.path.isfile(path):
            return path
    return None


def _other_builds(name: str) -> list:
    return sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(_PACKAGE_DIR, f"{name}.*"))
        if p.endswith((".so", ".pyd"))
    )


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


def _rebuild_hint() -> str:
    """How to build the library: in place in a source checkout, else by reinstalling."""
    if os.path.isfile(os.path.join(os.path.dirname(_PACKAGE_DIR), "setup.py")):
        return "build it with `python setup.py build_ext --inplace` (or `make build`)"
    return (
        "reinstall the package from its source against the installed torch with "
        "`pip install --no-build-isolation --force-reinstall --no-deps <source>` (docs/build.md)"
    )


def _load_library(name: str = "_C") -> str:
    """Load a compiled library of this package, after checking which torch it was built for;
    return its path.

    The version is read from the file, not from the loaded library: a library compiled against
    another torch may fail to load, or worse load and register ops with a mismatched ABI.
    """
    path = library_path(name)
    if path is None:
        others = _other_builds(name)
        found = f" (found only {others}, built for another Python)" if others else ""
        raise ImportError(
            f"rollingq_kernels.{name} is not built for this Python{found}; {_rebuild_hint()}"
        )
    with open(path, "rb") as f:
        found = _VERSION_MARK.search(f.read())
    built = found.group(1).decode() if found else "an unknown version"
    if built != _installed_torch():
        raise ImportError(
            f"{path} was built against torch {built} but torch {torch.__version__} is installed; "
            f"{_rebuild_hint()}"
        )
    torch.ops.load_library(path)
    return path


def _python_entries(path: str) -> Tuple[Optional[Callable], ...]:
    """``attention_fwd_below_autograd``, ``key_modality_range``, ``attention_bwd_below_autograd``
    and ``attention_fwd_autograd`` of the library's Python module (csrc/python_module.cpp),
    imported from the file already loaded; None for each entry the library lacks, with a warning
    where the forward's is missing."""
    try:
        spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return (
            module.attention_fwd_below_autograd,
            module.key_modality_range,
            getattr(module, "attention_bwd_below_autograd", None),
            getattr(module, "attention_fwd_autograd", None),
        )
    except (ImportError, AttributeError) as exc:
        warnings.warn(
            f"{path} has no Python entry ({exc}): calls go through torch.ops, several "
            f"microseconds slower per call; {_rebuild_hint()}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, None, None, None


_LOAD_ERROR: Optional[str] = None
_DIRECT: Optional[Callable] = None
_DIRECT_BACKWARD: Optional[Callable] = None
_DIRECT_AUTOGRAD: Optional[Callable] = None
_ID_RANGE: Optional[Callable] = None
try:
    _DIRECT, _ID_RANGE, _DIRECT_BACKWARD, _DIRECT_AUTOGRAD = _python_entries(_load_library("_C"))
except (ImportError, OSError, RuntimeError) as exc:
    _LOAD_ERROR = f"the compiled library cannot be loaded: {exc}"


def load_error() -> Optional[str]:
    """Why the op is not available (None when it is)."""
    return _LOAD_ERROR


def attention_forward(problem) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Run ``rollingq::attention_fwd`` on a validated :class:`AttentionProblem`: (out, stats)."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    folded = fold_query_groups(problem)
    out, stats = op_contract.run_forward(
        op_contract.COMPILED,
        problem if folded is None else folded,
        direct=_DIRECT,
        direct_backward=_DIRECT_BACKWARD,
        direct_autograd=_DIRECT_AUTOGRAD,
    )
    if folded is not None:
        out = out.view(*problem.q.shape[:3], out.shape[3])
    return out, stats


# Grouped-query calls of at most this many queries fold their groups into the query rows.
FOLD_MAX_QUERIES = 32


def fold_query_groups(problem):
    """The same attention with each group of query heads that shares a K / V head folded into the
    query rows of one head, or None where it does not fold.

    Each query head of a group reads the group's K and V; a call of a few queries (decoding) is
    bound by that reading, so (B, H, Lq, D) queries over (B, Hkv, Lk, D) keys run as (B, Hkv,
    H / Hkv * Lq, D) queries over the same keys, read once per group (docs/performance.md:
    0.36-0.52x the time at Lq <= 8). Only views are taken (no copy), so this applies where the
    group's rows lie at one stride from each other in q (one query per head, or heads that are
    whole blocks of rows) and in the mask, and where every row sees the same keys in the same way:
    not with a causal mask (row i sees keys <= i), dropout (its keep-mask is keyed by head and
    row), a rotation or statistics.
    """
    q, k = problem.q, problem.k
    Hkv = k.shape[1]
    if Hkv == q.shape[1]:  # no groups: every call without GQA leaves here
        return None
    B, H, Lq, D = q.shape
    if (
        Lq > FOLD_MAX_QUERIES
        or problem.return_stats
        or problem.rotation is not None
        or problem.is_causal
        or problem.dropout_p > 0.0
        or q.numel() == 0
        or k.shape[2] == 0
    ):
        return None
    mask = problem.attn_mask
    if Lq > 1 and (
        q.stride(1) != Lq * q.stride(2)
        or (mask is not None and mask.stride(1) != Lq * mask.stride(2))
    ):
        return None
    rows = H // Hkv * Lq
    if mask is not None:
        mask = mask.view(B, Hkv, rows, mask.shape[3])
    return problem._replace(q=q.view(B, Hkv, rows, D), attn_mask=mask)


def id_range_entry() -> Optional[Callable]:
    """The library's ``key_modality_range(ids) -> (min, max)`` for non-empty integer CPU tensors
    of 1 or 2 dims (None when the library is not loaded or has none)."""
    return _ID_RANGE


def direct_entry() -> Optional[Callable]:
    """The library's direct entry to ``rollingq::attention_fwd`` below autograd (None when the
    library is not loaded or has none); the CUDA backend calls the same op through it."""
    return _DIRECT


def direct_backward_entry() -> Optional[Callable]:
    """The library's direct entry to ``rollingq::attention_bwd`` below autograd (None when the
    library is not loaded or has none): what the eager autograd formula's backward calls."""
    return _DIRECT_BACKWARD


def direct_autograd_entry() -> Optional[Callable]:
    """The library's entry to ``rollingq::attention_fwd`` with a C++ autograd node for the
    gradients of q, k and v (None when the library is not loaded or has none)."""
    return _DIRECT_AUTOGRAD
