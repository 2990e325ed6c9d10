"""Every CUDA source compiles: each .cu with nvcc for sm_80 and sm_90a (one nvcc call per file with
both targets, as the extension build does), the binding with the host compiler against torch's
headers.

The kernels cannot run without a GPU; this is the check that they build exactly as the extension
build compiles them (same flags, same half/bfloat16 macros as torch's builder). The jobs run in
parallel over the machine's cores, into a temporary directory (nothing is cached in the repo).
ptxas must report no register spills: a spill in a tile kernel is a performance bug. Where a
disassembler is at hand (cuobjdump: CUDA_HOME, PATH or the triton wheel), the machine code of the
tensor-core forward is also checked for what its design promises: ldmatrix (LDSM) and cp.async
(LDGSTS) in the key-tile loop, 128 MMAs per warp and tile, and few plain shared loads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rollingq_kernels import _cuda_build

NVCC = _cuda_build.find_nvcc()
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")

KERNELS = [os.path.basename(p) for p in _cuda_build.kernel_sources()]
ARCHS = list(_cuda_build.CHECK_ARCHS)


def _nvcc_cmd(src: str, obj: str):
    return [
        NVCC,
        "-c",
        *_cuda_build.NVCC_FLAGS,
        *_cuda_build.TORCH_STYLE_DEFINES,
        *(f"-gencode={_cuda_build.CHECK_ARCHS[a]}" for a in ARCHS),
        "-Xptxas=-v",
        "--Werror=all-warnings",
        f"-I{_cuda_build.CSRC}",
        src,
        "-o",
        obj,
    ]


def _binding_cmd(stub_dir: str):
    import torch.utils.cpp_extension as ce

    # The CPU wheel of torch ships the c10/cuda headers but not the header its CUDA build
    # generates at configure time; an empty stand-in is enough to check the binding's syntax and
    # types. Everything else (torch, CUDA runtime, Python) is the real thing.
    os.makedirs(os.path.join(stub_dir, "c10", "cuda", "impl"), exist_ok=True)
    with open(os.path.join(stub_dir, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n")
    cuda_home = _cuda_build.find_cuda_home()
    assert cuda_home is not None, "nvcc was found but no CUDA include directory"
    cmd = [CXX, "-fsyntax-only", *_cuda_build.CXX_FLAGS, "-Wall", "-Wextra", "-Werror"]
    cmd += [f"-I{stub_dir}", f"-I{_cuda_build.CSRC}"]
    for inc in ce.include_paths():
        cmd.append(f"-isystem{inc}")
    cmd += [f"-isystem{os.path.join(cuda_home, 'include')}"]
    cmd += [f"-isystem{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C_cuda"]
    cmd.append(_cuda_build.binding_source())
    return cmd


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run every compile job once, in parallel; map job -> (returncode, output, seconds)."""
    out_dir = tmp_path_factory.mktemp("rq_nvcc")
    jobs = {}
    for name in KERNELS:
        jobs[name] = _nvcc_cmd(os.path.join(_cuda_build.CUDA_DIR, name), str(out_dir / f"{name}.o"))
    if CXX is not None:
        jobs["binding.cpp"] = _binding_cmd(str(out_dir / "stub"))

    def run(cmd):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0

    t0 = time.perf_counter()
    workers = max(1, min(len(jobs), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(run, cmd) for key, cmd in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    total = time.perf_counter() - t0
    sys.stderr.write(
        f"\n[cuda compile check] {len(jobs)} jobs on {workers} workers: {total:.1f}s\n"
    )
    results["_dir"] = str(out_dir)
    return results


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles(compiled, name):
    code, output, seconds = compiled[name]
    assert code == 0, f"nvcc failed for {name} ({ARCHS}) after {seconds:.1f}s:\n{output}"
    for arch in ARCHS:
        assert f"for '{arch}'" in output or "Compiling entry function" not in output, (
            f"ptxas did not compile {name} for {arch}:\n{output}"
        )
    spills = re.findall(r"(\d+) bytes spill stores", output)
    kernels = output.count("Compiling entry function")
    assert len(spills) == kernels, f"ptxas did not report on every kernel of {name}:\n{output}"
    assert all(int(s) == 0 for s in spills), f"{name} spills registers:\n{output}"


MMA_FILES = [k for k in KERNELS if k.startswith("fwd_mma_") and "_hd" in k]


@pytest.mark.parametrize("name", MMA_FILES)
def test_tensor_core_forward_machine_code(compiled, name, tmp_path_factory):
    from bench import cuda_cost_table as cct

    code, _, _ = compiled[name]
    assert code == 0
    cuobjdump = cct.find_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA_HOME, PATH or the triton wheel) to read the machine code")
    obj = os.path.join(compiled["_dir"], f"{name}.o")
    kernels = {}
    for arch in ARCHS:
        res = subprocess.run(
            [cuobjdump, "-sass", "-arch", arch, obj], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        for fn, instrs in cct.parse_sass(res.stdout).items():
            if "fwd_mma_kernel" in fn:
                kernels[(arch, fn)] = cct.mix(cct.main_loop(instrs))
    assert len(kernels) == 4 * len(ARCHS), sorted(kernels)  # causal x statistics, per arch
    for (arch, fn), loop in kernels.items():
        what = f"{name} {arch} {fn}: key-tile loop {loop}"
        extra = 0 if "Lb0EEEv" in fn else loop["HMMA"] - 128  # one-hot mass MMAs with statistics
        assert loop["HMMA"] - extra == 128 and 0 <= extra <= 8, what
        assert loop["LDSM"] >= 32 and loop["LDGSTS"] >= 4, what
        assert loop["LDS"] <= 20, what  # the fragments all come through ldmatrix


BWD_MMA_FILES = [k for k in KERNELS if k.startswith("bwd_mma_")]


@pytest.mark.parametrize("name", BWD_MMA_FILES)
def test_tensor_core_backward_machine_code(compiled, name):
    from bench import cuda_cost_table as cct

    code, _, _ = compiled[name]
    assert code == 0
    cuobjdump = cct.find_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA_HOME, PATH or the triton wheel) to read the machine code")
    obj = os.path.join(compiled["_dir"], f"{name}.o")
    loops = {}
    for arch in ARCHS:
        res = subprocess.run(
            [cuobjdump, "-sass", "-arch", arch, obj], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        for fn, instrs in cct.parse_sass(res.stdout).items():
            if "bwd_mma_dq_kernel" in fn or "bwd_mma_dkdv_kernel" in fn:
                loops[(arch, fn)] = cct.mix(cct.main_loop(instrs))
    assert len(loops) == 4 * len(ARCHS), sorted(loops)  # dq and dkdv, causal or not, per arch
    for (arch, fn), loop in loops.items():
        # dq: 3 products per key tile (S, dP, dQ); dkdv: 4 per query tile (S^T, dP^T, dV, dK)
        want = 4 if "dkdv" in fn else 3
        what = f"{name} {arch} {fn}: loop {loop}"
        assert loop["HMMA"] % want == 0 and loop["HMMA"] >= 32 * want, what
        assert loop["LDSM"] > 0 and loop["LDGSTS"] > 0 and loop["LDS"] <= 16, what


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_binding_compiles(compiled):
    code, output, seconds = compiled["binding.cpp"]
    assert code == 0, f"the torch binding does not compile ({seconds:.1f}s):\n{output}"


def test_every_kernel_file_is_in_the_build():
    # the extension builds exactly the files this check compiles, plus the binding
    srcs = _cuda_build.extension_sources()
    assert sorted(os.path.basename(s) for s in srcs[:-1]) == sorted(KERNELS)
    assert srcs[-1].endswith("binding.cpp") and os.path.exists(srcs[-1])
    assert len(KERNELS) >= 10
