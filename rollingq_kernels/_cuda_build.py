"""How the CUDA extension is built: sources and compiler flags, in one place.

Used by setup.py (loaded by file path, so the package need not be importable while it is being
built), by the JIT build in :mod:`rollingq_kernels.cuda_attention`, and by the compile check in
tests/test_cuda_compile.py. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")

# Machine code for Ampere (sm_80, also runs on sm_86/89) and Hopper (sm_90a), plus compute_80
# PTX so that newer GPUs can JIT-compile the kernels.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=compute_80",
]
# The two targets the compile check builds every kernel file for.
CHECK_ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}

# torch's extension builder adds the __CUDA_NO_HALF*__ macros; the compile check uses them too so
# that it sees exactly what the extension build sees (no implicit half <-> float conversions).
TORCH_STYLE_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]


def kernel_sources() -> List[str]:
    """The .cu files of the extension (absolute paths), sorted."""
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def binding_source() -> str:
    return os.path.join(CUDA_DIR, "binding.cpp")


def extension_sources() -> List[str]:
    return kernel_sources() + [binding_source()]


def emulation_source() -> str:
    """The CPU emulation of the tile algorithm (built with a host compiler by the tests)."""
    return os.path.join(CUDA_DIR, "emulation", "host_emulation.cpp")


def gencode_flags() -> List[str]:
    """Architecture flags: TORCH_CUDA_ARCH_LIST wins when set (torch then adds its own)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return list(DEFAULT_GENCODE)


def nvcc_flags() -> List[str]:
    return NVCC_FLAGS + gencode_flags()


def find_nvcc() -> Optional[str]:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH; None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.exists(cand):
                return cand
    return shutil.which("nvcc")


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root (with include/cuda_runtime_api.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = find_nvcc()
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for home in cands:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None
