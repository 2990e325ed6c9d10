"""Build script: the pure-Python package plus the C++ (CPU) and, where possible, CUDA extensions.

Environment variables:
  ROLLINGQ_NO_EXT=1      install the pure-Python package only (no compiler needed)
  ROLLINGQ_FORCE_CUDA=1  build the CUDA extension even when torch.cuda.is_available() is False
                         (needs nvcc and a CUDA build of torch)
  ROLLINGQ_NO_CUDA=1     never build the CUDA extension
  MAX_JOBS               parallel compile jobs (torch's BuildExtension reads it)
"""

import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_config():
    # rollingq_kernels/_cuda_build.py by file path: the package itself is not importable yet.
    path = os.path.join(ROOT, "rollingq_kernels", "_cuda_build.py")
    spec = importlib.util.spec_from_file_location("_rollingq_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extension():
    """The CUDA extension rollingq_kernels._C_cuda, or None (with the reason printed).

    Built when torch is a CUDA build, a CUDA toolkit is found and a GPU is visible, or when
    ROLLINGQ_FORCE_CUDA=1 (then a missing toolkit or a CPU build of torch is an error). Without
    ROLLINGQ_FORCE_CUDA, a machine without CUDA simply gets the CPU extension only.
    """
    if os.environ.get("ROLLINGQ_NO_CUDA") == "1":
        return None
    force = os.environ.get("ROLLINGQ_FORCE_CUDA") == "1"
    import torch
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)")
    if missing and force:
        raise RuntimeError(
            "ROLLINGQ_FORCE_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(missing)
        )
    if not missing and not force and not torch.cuda.is_available():
        missing.append("no GPU is visible (ROLLINGQ_FORCE_CUDA=1 builds it anyway)")
    if missing:
        print("rollingq: skipping the CUDA extension: " + "; ".join(missing))
        return None
    cfg = _cuda_build_config()
    return cpp_extension.CUDAExtension(
        name="rollingq_kernels._C_cuda",
        sources=[os.path.relpath(s, ROOT) for s in cfg.extension_sources()],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.nvcc_flags()},
    )


def _extensions():
    if os.environ.get("ROLLINGQ_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    exts = [e for e in (_cpu_extension(), _cuda_extension()) if e is not None]
    if not exts:
        return [], {}
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def _cpu_extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cpu_sources += sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return None
    from torch.utils.cpp_extension import CppExtension

    cxx = ["-O3", "-std=c++20", "-fopenmp", "-march=native", "-ffp-contract=fast"]
    if os.environ.get("ROLLINGQ_PORTABLE") == "1":
        cxx.remove("-march=native")
    ext = CppExtension(
        name="rollingq_kernels._C",
        sources=cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return ext


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
