"""The "cuda" backend: the fused CUDA C++ kernels of csrc/cuda/, behind torch.ops.rollingq.

The kernels register CUDA implementations of the ``rollingq::attention_fwd`` and
``rollingq::attention_bwd`` ops (schema, fake impls and autograd: :mod:`rollingq_kernels.op_contract`;
the CPU library that comes with them: :mod:`rollingq_kernels.fused_op`). This module only makes sure
the CUDA library is loaded:

1. ``rollingq_kernels._C_cuda``, built by setup.py where a CUDA build of torch and nvcc exist;
2. otherwise a JIT build with ``torch.utils.cpp_extension.load`` (ninja, nvcc) for the GPU at
   hand, from the sources the package carries (``rollingq_kernels/csrc`` when installed,
   ``csrc/`` in a checkout), cached by torch in its extensions directory
   (``TORCH_EXTENSIONS_DIR``).

Every reason it cannot run (CPU build of torch, no GPU, a GPU older than sm_80, nvcc missing,
the build failing) is reported by :func:`unavailable_reason`, never raised at import.
Environment: ``ROLLINGQ_CUDA_NO_JIT=1`` disables step 2; ``ROLLINGQ_CUDA_VERBOSE=1`` shows the
JIT build's compiler output.
"""

from __future__ import annotations

import importlib
import os
from typing import List, Optional

import torch

from . import _cuda_build

__all__ = ["unavailable_reason", "unsupported_reasons", "forward", "load_library"]

# Shared memory a single warp of the generic kernels may use (bytes); every sm_80+ GPU allows a
# block this much after cudaFuncSetAttribute.
_GENERIC_SMEM_LIMIT = 96 * 1024
_MAX_GRID_YZ = 65535

_loaded: Optional[bool] = None
_load_error: Optional[str] = None


def _jit_arch_flags() -> List[str]:
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def _jit_build() -> None:
    """Compile and load the CUDA library from the sources the package carries (an installed
    package has them in rollingq_kernels/csrc, a checkout in csrc/; see _cuda_build)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    sources = _cuda_build.extension_sources()
    missing = [s for s in sources + [_cuda_build.FLAGS_FILE] if not os.path.isfile(s)]
    if not sources or missing:
        raise RuntimeError(
            f"the CUDA sources are not where the package looks for them ({_cuda_build.CSRC}): "
            f"missing {missing or 'every .cu file'}; reinstall the package"
        )
    if not is_ninja_available():
        raise RuntimeError("the JIT build needs ninja, which is not installed (pip install ninja)")
    load(
        name="rollingq_C_cuda",
        sources=sources,
        extra_include_paths=[_cuda_build.CSRC],
        extra_cflags=list(_cuda_build.CXX_FLAGS),
        extra_cuda_cflags=list(_cuda_build.NVCC_FLAGS) + _jit_arch_flags(),
        extra_ldflags=_cuda_build.link_flags(),
        verbose=os.environ.get("ROLLINGQ_CUDA_VERBOSE") == "1",
    )


def _op_library_error() -> Optional[str]:
    """Why the op schema this library implements is missing (rollingq_kernels._C via fused_op)."""
    try:
        from . import fused_op
    except Exception as exc:  # noqa: BLE001 - the reason is reported, never raised
        return (
            f"the op glue rollingq_kernels.fused_op cannot be imported: {type(exc).__name__}: {exc}"
        )
    why = fused_op.load_error()
    if why:
        return (
            "the CUDA kernels implement the rollingq ops whose schema, fake impls and autograd "
            f"come with the compiled library rollingq_kernels._C, and {why}"
        )
    return None


def load_library() -> Optional[str]:
    """Load the CUDA library once (prebuilt, else JIT-built); None on success, else why not.

    The op schema (rollingq_kernels._C, through fused_op) is loaded first: the CUDA library only
    adds implementations to it.
    """
    global _loaded, _load_error
    if _loaded is not None:
        return _load_error
    why = _op_library_error()
    if why:
        _loaded, _load_error = False, why
        return _load_error
    try:
        importlib.import_module("rollingq_kernels._C_cuda")
        _loaded, _load_error = True, None
        return None
    except ImportError as exc:
        prebuilt = str(exc)
        if "undefined symbol" in prebuilt or "version" in prebuilt.lower():
            prebuilt = (
                f"rollingq_kernels._C_cuda does not match the installed torch "
                f"{torch.__version__} (rebuild the package): {exc}"
            )
    if os.environ.get("ROLLINGQ_CUDA_NO_JIT") == "1":
        _loaded, _load_error = (
            False,
            (f"the CUDA extension is not built ({prebuilt}) and ROLLINGQ_CUDA_NO_JIT=1"),
        )
        return _load_error
    if _cuda_build.find_nvcc() is None:
        _loaded, _load_error = (
            False,
            (
                f"the CUDA extension rollingq_kernels._C_cuda is not built ({prebuilt}) and nvcc "
                "was not found for a JIT build (set CUDA_HOME, or reinstall with a CUDA toolkit "
                "present)"
            ),
        )
        return _load_error
    try:
        _jit_build()
    except Exception as exc:  # a failed build makes the backend unavailable, not the package
        text = str(exc).strip().splitlines()
        tail = " | ".join(text[-6:]) if text else ""
        _loaded, _load_error = (
            False,
            (
                f"JIT build of the CUDA extension failed ({type(exc).__name__}): {tail} "
                "(ROLLINGQ_CUDA_VERBOSE=1 shows the compiler output)"
            ),
        )
        return _load_error
    _loaded, _load_error = True, None
    return None


def unavailable_reason() -> Optional[str]:
    """None when the backend can run on this machine, else the first reason it cannot: a CPU
    build of torch, no GPU, a GPU older than sm_80, or the real error of loading (or JIT-building)
    the compiled libraries."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA support)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return "the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16/f16)"
    return load_library()


def unsupported_reasons(p) -> List[str]:
    reasons = []
    B, H = p.q.shape[0], p.q.shape[1]
    if B > _MAX_GRID_YZ or H > _MAX_GRID_YZ:
        reasons.append(f"batch and heads must each be <= {_MAX_GRID_YZ}; got B={B}, H={H}")
    D, Dv, M = p.head_dim, p.value_dim, p.num_modalities
    fwd_bytes = (2 * D + Dv + M) * 4
    bwd_bytes = (2 * D + 2 * Dv) * 4
    if max(fwd_bytes, bwd_bytes) > _GENERIC_SMEM_LIMIT:
        reasons.append(
            f"D={D}, Dv={Dv}, M={M} need {max(fwd_bytes, bwd_bytes)} bytes of shared memory per "
            f"row in the generic kernels; at most {_GENERIC_SMEM_LIMIT}"
        )
    if p.q.device.type == "cuda" and torch.cuda.get_device_capability(p.q.device)[0] < 8:
        reasons.append(f"{p.q.device} is older than compute capability 8.0")
    return reasons


def forward(p):
    """(out, Optional[AttentionStats]) for an :class:`~rollingq_kernels.backends.AttentionProblem`."""
    why = load_library()
    if why:
        raise RuntimeError(f"the rollingq CUDA backend is unavailable: {why}")
    from . import fused_op, op_contract

    return op_contract.run_forward(
        op_contract.COMPILED,
        p,
        direct=fused_op.direct_entry(),
        direct_backward=fused_op.direct_backward_entry(),
        direct_autograd=fused_op.direct_autograd_entry(),
    )
