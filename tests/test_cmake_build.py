"""The CMake build (CMakeLists.txt) configures, compiles, and gives a library that works.

The library is loaded in a fresh interpreter: this process already holds the setup.py build,
and one process cannot register the rollingq op schema twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent(
    """
    import sys, torch
    import rollingq_kernels.op_contract  # defines the op schema the library implements
    torch.ops.load_library(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 24, generator=g) for _ in range(3))
    out, lse, *_ = torch.ops.rollingq.attention_fwd(
        q, k, v, None, None, None, 0, None, None, True, 0, 0.2, 0.0, None
    )
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    err = (out - want).abs().max().item()
    assert err < 1e-5, err
    # the library is also the Python module with the direct entry to the forward op
    import importlib.util
    spec = importlib.util.spec_from_file_location("rollingq_kernels._C", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    direct = module.attention_fwd_below_autograd(
        q, k, v, None, None, None, 0, None, None, True, 0, 0.2, 0.0, None
    )
    assert torch.equal(direct[0], out)
    print("ok", err)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_configures_compiles_and_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    configure = subprocess.run(
        [
            "cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(
        ["cmake", "--build", str(build)], capture_output=True, text=True, env=env
    )
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    library = build / "_C.so"
    assert library.is_file()
    assert b"rollingq-torch-version=" + torch.__version__.split("+")[0].encode() in (
        library.read_bytes()
    )
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(library)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
