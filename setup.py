"""Build script: the pure-Python package plus the C++ (CPU) and, where possible, CUDA extensions.

Environment variables:
  ROLLINGQ_NO_EXT=1      install the pure-Python package only (no compiler needed)
  ROLLINGQ_FORCE_CUDA=1  build the CUDA extension even when torch.cuda.is_available() is False
                         (needs nvcc and a CUDA build of torch)
  ROLLINGQ_NO_CUDA=1     never build the CUDA extension
  ROLLINGQ_NATIVE=1      compile the CPU library for this machine only (-march=native); off by
                         default: the library carries kernel variants for several instruction
                         sets and picks one when it runs (csrc/build_flags.txt)
  MAX_JOBS               parallel compile jobs (torch's BuildExtension reads it)
"""

import glob
import importlib.util
import os
import platform

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
    exts = [e for e in (_cpu_extension(), _cuda_extension()) if e is not None]
    if not exts:
        return [], {}
    return exts, {"build_ext": _build_ext_class().with_options(no_python_abi_suffix=False)}


# ---- the CPU library: flags from csrc/build_flags.txt (CMakeLists.txt reads the same file) ----

FLAGS_FILE = os.path.join(ROOT, "csrc", "build_flags.txt")


def read_build_flags(path: str = FLAGS_FILE) -> dict:
    """The ``key = value`` lines of csrc/build_flags.txt, values split into argument lists."""
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


def _target_arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return "other"


def _compiler_accepts(flags) -> bool:
    """Whether the C++ compiler torch builds extensions with takes these flags."""
    import subprocess
    import tempfile

    from torch.utils.cpp_extension import get_cxx_compiler

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [get_cxx_compiler(), *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _cpu_variants(flags: dict):
    """[(name, source, flags)] of the kernel variants this machine's compiler can build."""
    prefix = f"variant.{_target_arch()}."
    variants = []
    for key, vflags in flags.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name != "generic" and not _compiler_accepts(vflags):
            print(
                f"rollingq: the compiler does not take {' '.join(vflags)}: "
                f"the {name} kernel variant is left out"
            )
            continue
        variants.append((name, os.path.join("csrc", "cpu", "isa", f"{name}.cpp"), vflags))
    return variants


def _cpu_extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cpu_sources += sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return None
    import torch
    from torch.utils.cpp_extension import CppExtension

    flags = read_build_flags()
    native = flags["native"] if os.environ.get("ROLLINGQ_NATIVE") == "1" else []
    variants = _cpu_variants(flags)
    cxx = flags["cxx"] + [f"-DROLLINGQ_ISA_{name.upper()}=1" for name, _, _ in variants]
    ext = CppExtension(
        name="rollingq_kernels._C",
        sources=cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx + native},
        extra_link_args=flags["link"],
    )
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # compiled apart, each with its own instruction-set flags (see _build_ext_class)
    ext.rollingq_variants = [(src, cxx + vflags + native + [abi]) for _, src, vflags in variants]
    return ext


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithVariants(BuildExtension):
        """torch's BuildExtension plus per-file flags: the kernel variants of the CPU library are
        compiled one by one with their instruction-set flags and linked in as objects."""

        def build_extension(self, ext):
            objects = []
            for src, cflags in getattr(ext, "rollingq_variants", []):
                objects += self.compiler.compile(
                    [src],
                    output_dir=self.build_temp,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": list(cflags)},
                    depends=ext.depends,
                )
            ext.extra_objects = [o for o in (ext.extra_objects or []) if o not in objects] + objects
            super().build_extension(ext)

    return BuildWithVariants


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
