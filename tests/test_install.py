"""Installing the package: it builds against the installed torch or says how to, an installed
(non-editable) package runs the fused kernels from anywhere, and a library that cannot be loaded
is reported, never silently replaced.

The end-to-end test builds a source distribution, builds a wheel from it with the torch of a fresh
virtual environment, installs the wheel there and runs a fused call outside the source tree (a full
C++ build: a few minutes on two cores; marked slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None

import rollingq_kernels as rk
from rollingq_kernels import _cuda_build, backends, fused_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_VERSION = torch.__version__.split("+")[0]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ROLLINGQ_"))}
    env.update(extra)
    return env


# ---- what pip sees ---------------------------------------------------------------------------


@pytest.mark.skipif(tomllib is None, reason="needs tomllib (Python 3.11+)")
def test_build_requirements_never_pull_torch():
    # An isolated build installs build-system.requires into a fresh environment: a torch listed
    # there is the newest one the index has (a CUDA build of several GB), not the installed one.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    names = [
        re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in meta["build-system"]["requires"]
    ]
    assert "torch" not in names and "pybind11" not in names, names
    deps = [
        re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in meta["project"]["dependencies"]
    ]
    assert deps == ["torch", "ninja"], deps  # numpy and pybind11 are not used by the package


def test_a_build_without_torch_stops_and_names_the_flag(tmp_path):
    # What pip's isolated build environment looks like to setup.py: no torch to import.
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.modules["torch"] = None  # import torch -> ImportError
        sys.argv = ["setup.py", "-q", "build_ext", "--build-temp", {str(tmp_path / "t")!r},
                    "--build-lib", {str(tmp_path / "l")!r}]
        runpy.run_path("setup.py", run_name="__main__")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "pip install --no-build-isolation ." in res.stderr, res.stderr[-3000:]
    assert "torch cannot be imported" in res.stderr and "ROLLINGQ_NO_EXT=1" in res.stderr
    assert not os.path.exists(tmp_path / "l"), "nothing may be built without torch"


def test_a_build_against_a_too_old_torch_stops(tmp_path):
    code = textwrap.dedent(
        f"""
        import runpy, sys, types
        sys.modules["torch"] = types.SimpleNamespace(__version__="2.5.1+cpu")
        sys.argv = ["setup.py", "-q", "build_ext", "--build-temp", {str(tmp_path / "t")!r}]
        runpy.run_path("setup.py", run_name="__main__")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "needs torch >= 2.6 to build; found torch 2.5.1+cpu" in res.stderr, res.stderr[-3000:]


def test_build_flags_come_from_one_file():
    flags = _cuda_build.read_build_flags()
    assert flags["native"] == ["-march=native"]
    # -march=native only on request: not in the flags of any library built by default
    for key, value in flags.items():
        if key != "native":
            assert "-march=native" not in value, key
    assert _cuda_build.NVCC_FLAGS == flags["cuda.nvcc"]
    assert _cuda_build.CXX_FLAGS == flags["cuda.cxx"]
    assert _cuda_build.DEFAULT_GENCODE == flags["cuda.gencode"]
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    assert "csrc/build_flags.txt" in cmake
    for key in (
        "cxx",
        "link",
        "link.elf",
        "native",
        "cuda.nvcc",
        "cuda.gencode",
        "cuda.defines",
        "cuda.cxx",
    ):
        assert "${ROLLINGQ_FLAGS_" + key + "}" in cmake, key
    # no flag spelled out in CMake itself (comments and option descriptions aside)
    code = [ln for ln in cmake.splitlines() if not ln.lstrip().startswith(("#", "option("))]
    for flag in ("-march", "-O3", "--use_fast_math", "sm_80", "-fopenmp", "--exclude-libs"):
        assert not any(flag in ln for ln in code), flag
    if sys.platform.startswith("linux"):
        assert _cuda_build.link_flags() == flags["link.elf"] == ["-Wl,--exclude-libs,ALL"]
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    # both libraries and the JIT build link with them
    assert setup_py.count("CONFIG.link_flags()") == 2
    with open(os.path.join(ROOT, "rollingq_kernels", "cuda_attention.py")) as f:
        assert "extra_ldflags=_cuda_build.link_flags()" in f.read()


def _static_runtime_compiler(tmp_path):
    """A g++ that links the C++ runtime statically (what one GPU machine's compiler did)."""
    import shutil

    gxx = shutil.which("g++")
    if gxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    if not os.path.isabs(archive):
        pytest.skip("g++ has no static libstdc++.a")
    wrapper = tmp_path / "g++-static-runtime"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_link_flags_keep_a_statically_linked_cxx_runtime_working(tmp_path):
    # With a compiler that links libstdc++ statically, an extension linked without link.elf
    # formatted no numbers ("n = " instead of "n = 3"; a segfault on one GPU machine), so every
    # error message of the package that carries a number was broken. With the package's linker
    # flags the probe extension formats them.
    env = dict(os.environ, CXX=_static_runtime_compiler(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "toolchain_probe.py"),
                           "--package-link-flags"], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "number: ok (number raised RuntimeError: n = 3)" in proc.stdout, proc.stdout
    assert "text: ok (text -> n=7)" in proc.stdout, proc.stdout


# ---- a library that does not load is reported ----------------------------------------------


def _fresh_dispatch():
    backends._AUTO_CACHE.clear()
    backends._WARNED.clear()


def test_auto_warns_once_naming_why_the_cpu_library_did_not_load(monkeypatch):
    why = "the compiled library cannot be loaded: _C.so was built against torch 2.99.0"
    monkeypatch.setattr(fused_op, "_LOAD_ERROR", why)
    _fresh_dispatch()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    try:
        with pytest.warns(RuntimeWarning) as record:
            out = rk.rolling_attention(q, k, v)
        messages = [str(w.message) for w in record if w.category is RuntimeWarning]
        assert len(messages) == 1, messages
        assert "'cpu' cannot run this call" in messages[0] and "2.99.0" in messages[0]
        assert "O(L^2) reference" in messages[0]
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once
            rk.rolling_attention(q, k, v)
        with pytest.raises(rk.NoBackendError, match="2.99.0"):
            rk.rolling_attention(q, k, v, backend="cpu")
    finally:
        monkeypatch.undo()
        _fresh_dispatch()


def test_a_library_for_another_torch_is_refused_with_both_versions(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "rollingq_kernels"
    pkg.mkdir(parents=True)
    (pkg / "_C.so").write_bytes(b"\x7fELF...rollingq-torch-version=2.99.1;...")
    monkeypatch.setattr(fused_op, "_PACKAGE_DIR", str(pkg))
    with pytest.raises(ImportError) as info:
        fused_op._load_library("_C")
    msg = str(info.value)
    assert "2.99.1" in msg and torch.__version__ in msg
    # installed (no setup.py next to the package): the hint is a reinstall, not an in-place build
    assert "--no-build-isolation" in msg and "build_ext --inplace" not in msg
    (tmp_path / "site" / "setup.py").write_text("")
    with pytest.raises(ImportError, match="build_ext --inplace"):
        fused_op._load_library("_C")
    with pytest.raises(ImportError, match="_C_cuda is not built for this Python"):
        fused_op._load_library("_C_cuda")


# ---- end to end: sdist -> wheel -> fresh venv -> fused call --------------------------------

CHECK = r"""
import os, sys, warnings
import torch
import torch.nn.functional as F

import rollingq_kernels as rk
from rollingq_kernels import _cuda_build, cuda_attention, fused_op

warnings.simplefilter("error", RuntimeWarning)  # no fallback to the reference, no downgrade

pkg = os.path.dirname(rk.__file__)
assert pkg.startswith(sys.prefix), (pkg, sys.prefix)  # the installed copy, not the checkout
assert fused_op.load_error() is None, fused_op.load_error()

g = torch.Generator().manual_seed(0)
B, H, Lq, Lk, D = 2, 3, 37, 29, 24
q = torch.randn(B, Lq, H, D, generator=g).transpose(1, 2)  # non-contiguous, as models pass it
k = torch.randn(B, H, Lk, D, generator=g)
v = torch.randn(B, H, Lk, D + 8, generator=g)
out = rk.rolling_attention(q, k, v, backend="cpu")
ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
err = ((out - ref).norm() / ref.norm()).item()
assert err <= 1e-5, err
auto = rk.rolling_attention(q, k, v)  # "auto" takes the compiled library: no warning
torch.testing.assert_close(auto, out, rtol=0, atol=0)

# the JIT build of the CUDA library finds its sources inside the installed package
assert _cuda_build.CSRC == os.path.join(pkg, "csrc"), _cuda_build.CSRC
seen = {}
import torch.utils.cpp_extension as ce
ce.load = lambda **kw: seen.update(kw)
ce.is_ninja_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (9, 0)
cuda_attention._jit_build()
assert seen["sources"] and all(os.path.isfile(s) and s.startswith(pkg) for s in seen["sources"])
assert seen["extra_include_paths"] == [os.path.join(pkg, "csrc")]
print("ok", err)
"""


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    )
    return res


@pytest.mark.slow
@pytest.mark.skipif(fused_op.load_error() is not None, reason="no compiler set-up to build with")
def test_wheel_built_from_the_sdist_runs_fused_from_a_fresh_venv(tmp_path):
    env = _clean_env(MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
         "-d", str(dist)],
        cwd=ROOT, env=_clean_env(ROLLINGQ_NO_EXT="1"),
    )  # fmt: skip
    (sdist,) = dist.glob("rollingq_kernels-*.tar.gz")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    py = str(venv / "bin" / "python")
    # the installed torch's own version: never a newer one (or the multi-GB CUDA build)
    torch_spec = os.environ.get("TORCH_SPEC", f"torch=={TORCH_VERSION}")
    _run([py, "-m", "pip", "install", "-q", torch_spec, "setuptools", "wheel", "ninja"], env=env)

    wheels = tmp_path / "wheels"
    _run(
        [py, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-build-isolation", "--no-deps",
         str(sdist), "-w", str(wheels)],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    (wheel,) = wheels.glob("rollingq_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"rollingq_kernels/_C\..*so", n) for n in names), names
    for src in _cuda_build.extension_sources() + [_cuda_build.FLAGS_FILE]:
        rel = os.path.relpath(src, _cuda_build.CSRC)
        assert f"rollingq_kernels/csrc/{rel}" in names, rel
    assert "rollingq_kernels/csrc/rollingq_params.h" in names

    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=env)
    res = _run([py, "-c", CHECK], cwd=tmp_path, env=env)  # outside the source tree
    assert res.stdout.startswith("ok"), res.stdout
