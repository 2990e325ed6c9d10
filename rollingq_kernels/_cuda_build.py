"""Where the compiled libraries' sources are, and how they are built: one place.

The compiler flags live in ``csrc/build_flags.txt`` (read here, by setup.py and by CMakeLists.txt);
this module finds the sources and reads the flags for the CUDA extension. Used by setup.py (loaded
by file path, so the package need not be importable while it is being built), by the JIT build in
:mod:`rollingq_kernels.cuda_attention`, and by the compile check in tests/test_cuda_compile.py.
Imports nothing beyond the standard library.

The sources are found in the installed package (``rollingq_kernels/csrc``, which the wheel
carries so that the JIT build works where the package was installed without its CUDA library)
and otherwise in the source checkout (``csrc/`` next to the package).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Dict, List, Optional

PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))  # through links (make sanitize)
ROOT = os.path.dirname(PACKAGE_DIR)


def find_csrc() -> str:
    """The directory of the C++ / CUDA sources: the package's copy, else the checkout's."""
    shipped = os.path.join(PACKAGE_DIR, "csrc")
    if os.path.isfile(os.path.join(shipped, "build_flags.txt")):
        return shipped
    return os.path.join(ROOT, "csrc")


CSRC = find_csrc()
CUDA_DIR = os.path.join(CSRC, "cuda")
FLAGS_FILE = os.path.join(CSRC, "build_flags.txt")


def read_build_flags(path: str = FLAGS_FILE) -> Dict[str, List[str]]:
    """The ``key = value`` lines of csrc/build_flags.txt, each value split into arguments."""
    flags = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: expected 'key = value', got {line!r}")
            flags[key.strip()] = value.split()
    return flags


_FLAGS = read_build_flags()
# Machine code and PTX targets of the extension (TORCH_CUDA_ARCH_LIST replaces them).
DEFAULT_GENCODE = _FLAGS["cuda.gencode"]
# The two targets the compile check builds every kernel file for.
CHECK_ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
# torch's extension builder adds the __CUDA_NO_HALF*__ macros; the compile check and CMake use
# them too so that they see exactly what the extension build sees (no implicit half <-> float
# conversions).
TORCH_STYLE_DEFINES = _FLAGS["cuda.defines"]
NVCC_FLAGS = _FLAGS["cuda.nvcc"]
CXX_FLAGS = _FLAGS["cuda.cxx"]


def link_flags() -> List[str]:
    """Linker flags of either library on this platform (``link.elf`` on Linux)."""
    return list(_FLAGS["link.elf"]) if sys.platform.startswith("linux") else []


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
