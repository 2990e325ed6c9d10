"""Build script: the Python package plus the C++ (CPU) and, where possible, CUDA extensions.

The extensions are compiled against the torch that is installed where the package goes, so the
build needs that torch: install torch first, then

    pip install --no-build-isolation .

(pip's default build isolation hides the installed torch; the build then stops and says so).

Environment variables:
  ROLLINGQ_NO_EXT=1      install the pure-Python package only (no compiler, no torch at build time;
                         the "cpu" backend is then unavailable)
  ROLLINGQ_FORCE_CUDA=1  build the CUDA extension even when torch.cuda.is_available() is False
                         (needs nvcc and a CUDA build of torch)
  ROLLINGQ_NO_CUDA=1     never build the CUDA extension
  ROLLINGQ_NATIVE=1      compile the CPU library for this machine only (-march=native); off by
                         default: the library carries kernel variants for several instruction
                         sets and picks one when it runs (csrc/build_flags.txt)
  MAX_JOBS               parallel compile jobs (torch's BuildExtension reads it)
"""

import fnmatch
import glob
import importlib.util
import os
import platform
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))

NEEDS_TORCH = """
rollingq-kernels: torch cannot be imported in this build environment ({error}).

The C++ library is compiled against the torch it will run with, so the build must see the torch
installed where the package goes. pip builds in an isolated environment unless told otherwise,
and that environment has no torch. Install torch first, then build without isolation:

    pip install --no-build-isolation .                  (a source checkout)
    pip install --no-build-isolation rollingq-kernels   (a source distribution)

(the build also needs setuptools, wheel and, for a parallel build, ninja in that environment).
ROLLINGQ_NO_EXT=1 installs the pure-Python package without compiling anything: the "cpu" backend
is then unavailable and "auto" runs the O(L^2) reference, with a warning.
"""


def _build_config():
    # rollingq_kernels/_cuda_build.py by file path: the package itself is not importable yet.
    path = os.path.join(ROOT, "rollingq_kernels", "_cuda_build.py")
    spec = importlib.util.spec_from_file_location("_rollingq_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CONFIG = _build_config()


def _import_torch():
    """torch, or None with the reason kept in TORCH_ERROR."""
    global TORCH_ERROR
    try:
        import torch
    except ImportError as exc:
        TORCH_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    TORCH_ERROR = None
    return torch


TORCH_ERROR = None
MIN_TORCH = (2, 6)  # as pyproject.toml's dependency


# ---- the CUDA library ------------------------------------------------------------------------


def _cuda_extension():
    """The CUDA extension rollingq_kernels._C_cuda, or None (with the reason printed).

    Built when torch is a CUDA build, a CUDA toolkit is found and a GPU is visible, or when
    ROLLINGQ_FORCE_CUDA=1 (then a missing toolkit or a CPU build of torch is an error). Without
    ROLLINGQ_FORCE_CUDA, a machine without CUDA simply gets the CPU extension only; an installed
    package without the CUDA library builds it on first use where it finds nvcc
    (rollingq_kernels/cuda_attention.py).
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
    return cpp_extension.CUDAExtension(
        name="rollingq_kernels._C_cuda",
        sources=[os.path.relpath(s, ROOT) for s in CONFIG.extension_sources()],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CONFIG.CXX_FLAGS, "nvcc": CONFIG.nvcc_flags()},
        extra_link_args=CONFIG.link_flags(),
    )


# ---- the CPU library: flags from csrc/build_flags.txt (CMakeLists.txt reads the same file) ----


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


def _cpu_sources():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    return sources + sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def _cpu_extension():
    cpu_sources = _cpu_sources()
    if not cpu_sources:
        return None
    import torch
    from torch.utils.cpp_extension import CppExtension

    flags = CONFIG.read_build_flags()
    native = flags["native"] if os.environ.get("ROLLINGQ_NATIVE") == "1" else []
    variants = _cpu_variants(flags)
    cxx = flags["cxx"] + [f"-DROLLINGQ_ISA_{name.upper()}=1" for name, _, _ in variants]
    ext = CppExtension(
        name="rollingq_kernels._C",
        sources=cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx + native},
        extra_link_args=flags["link"] + CONFIG.link_flags(),
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


class NeedsTorch(build_ext):
    """Stands in for the extension build where torch cannot be imported: metadata and source
    distributions need no torch, but compiling does, and this says how to give it one."""

    def run(self):
        raise SystemExit(NEEDS_TORCH.format(error=TORCH_ERROR))


# ---- the sources inside the package ----------------------------------------------------------

# What the package carries of csrc/ (as rollingq_kernels/csrc): the JIT build of the CUDA library
# compiles from it where the package was installed without that library.
SHIPPED_SOURCES = ("*.h", "*.cuh", "*.cu", "*.cpp", "build_flags.txt")


def _shipped_sources():
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in sorted(files):
            if any(fnmatch.fnmatch(name, pat) for pat in SHIPPED_SOURCES):
                found.append(
                    os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, "csrc"))
                )
    return sorted(found)


class BuildPyWithSources(build_py):
    """build_py, plus csrc/ copied to rollingq_kernels/csrc in the build (so in every wheel)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ of the checkout
        target = os.path.join(self.build_lib, "rollingq_kernels", "csrc")
        for rel in _shipped_sources():
            dst = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, "csrc", rel), dst)

    def get_outputs(self, include_bytecode=True):
        if getattr(self, "editable_mode", False):
            return super().get_outputs(include_bytecode)
        target = os.path.join(self.build_lib, "rollingq_kernels", "csrc")
        shipped = [os.path.join(target, rel) for rel in _shipped_sources()]
        return super().get_outputs(include_bytecode) + shipped


def _extensions():
    """(ext_modules, cmdclass) of this build."""
    cmdclass = {"build_py": BuildPyWithSources}
    if os.environ.get("ROLLINGQ_NO_EXT") == "1":
        return [], cmdclass
    if _import_torch() is None:
        # the build stops at build_ext, with NEEDS_TORCH; an sdist or metadata needs no torch
        placeholder = Extension("rollingq_kernels._C", sources=_cpu_sources())
        return [placeholder], {**cmdclass, "build_ext": NeedsTorch}
    torch = _import_torch()
    found = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        raise SystemExit(
            f"rollingq-kernels needs torch >= {'.'.join(map(str, MIN_TORCH))} to build; found "
            f"torch {torch.__version__}. Install a newer torch first, then build again."
        )
    exts = [e for e in (_cpu_extension(), _cuda_extension()) if e is not None]
    if not exts:
        return [], cmdclass
    build = _build_ext_class().with_options(no_python_abi_suffix=False)
    return exts, {**cmdclass, "build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
