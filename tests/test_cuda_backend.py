"""The "cuda" backend's Python side on any machine: discovery, reasons, limits.

Runs without a GPU: what must hold here is that the backend says clearly why it cannot run and
that asking for it explicitly raises instead of falling back.
"""

from __future__ import annotations

import pytest
import torch

from rollingq_kernels import NoBackendError, backend_status, rolling_attention
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import _REGISTRY
from tests.helpers import make_case


def test_registered_but_not_auto():
    spec = _REGISTRY["cuda"]
    assert spec.module == "rollingq_kernels.cuda_attention"
    assert spec.auto is False
    assert spec.dtypes == {"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})}


def test_module_imports_without_the_op_glue():
    from rollingq_kernels import cuda_attention

    assert callable(cuda_attention.forward) and callable(cuda_attention.unsupported_reasons)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_reason_is_explicit_without_a_gpu():
    from rollingq_kernels import cuda_attention

    why = cuda_attention.unavailable_reason()
    assert isinstance(why, str) and why
    if torch.version.cuda is None:
        assert "CPU build" in why
    else:
        assert "no CUDA device" in why
    assert backend_status()["cuda"] == [why]


def test_explicit_cuda_backend_on_cpu_tensors_raises():
    case = make_case(B=1, H=2, Lq=5, D=8, dtype=torch.float32, return_stats=False)
    with pytest.raises(NoBackendError, match="cuda"):
        rolling_attention(case.q, case.k, case.v, backend="cuda")


def test_unsupported_reasons_name_the_limit():
    from rollingq_kernels import cuda_attention

    q = torch.randn(1, 1, 3, 8192)
    p = make_problem(q, q, q)
    reasons = cuda_attention.unsupported_reasons(p)
    assert len(reasons) == 1 and "D=8192" in reasons[0] and "shared memory" in reasons[0]
    ok = torch.randn(2, 3, 5, 768)
    assert cuda_attention.unsupported_reasons(make_problem(ok, ok, ok)) == []


@pytest.fixture
def pretend_gpu(monkeypatch):
    """A CUDA build of torch with an sm_90 device, as far as cuda_attention can tell, and a fresh
    load state; the loaders themselves are faked by each test."""
    from rollingq_kernels import cuda_attention

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(cuda_attention, "_loaded", None)
    monkeypatch.setattr(cuda_attention, "_load_error", None)
    return cuda_attention


def test_unavailable_reason_is_the_real_load_error_of_the_cuda_library(pretend_gpu, monkeypatch):
    import importlib

    real_import = importlib.import_module

    def failing_import(name, *args, **kw):
        if name == "rollingq_kernels._C_cuda":
            raise ImportError("_C_cuda.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    monkeypatch.setenv("ROLLINGQ_CUDA_NO_JIT", "1")
    monkeypatch.setattr(pretend_gpu, "_op_library_error", lambda: None)
    why = pretend_gpu.unavailable_reason()
    assert "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev" in why
    assert "does not match the installed torch" in why and "ROLLINGQ_CUDA_NO_JIT=1" in why
    # the reason is kept: a second call does not retry the load
    assert pretend_gpu.unavailable_reason() == why


def test_unavailable_reason_names_a_missing_op_library(pretend_gpu, monkeypatch):
    from rollingq_kernels import fused_op

    monkeypatch.setattr(fused_op, "load_error", lambda: "rollingq_kernels._C is not built")
    why = pretend_gpu.unavailable_reason()
    assert "rollingq_kernels._C is not built" in why and "schema" in why


def test_unavailable_reason_names_a_failed_jit_build(pretend_gpu, monkeypatch):
    import importlib

    real_import = importlib.import_module

    def missing(name, *args, **kw):
        if name == "rollingq_kernels._C_cuda":
            raise ModuleNotFoundError("No module named 'rollingq_kernels._C_cuda'")
        return real_import(name, *args, **kw)

    def broken_build():
        raise RuntimeError("Error building extension 'rollingq_C_cuda'\nnvcc fatal: bad flag")

    monkeypatch.setattr(importlib, "import_module", missing)
    monkeypatch.delenv("ROLLINGQ_CUDA_NO_JIT", raising=False)
    monkeypatch.setattr(pretend_gpu, "_op_library_error", lambda: None)
    monkeypatch.setattr(pretend_gpu._cuda_build, "find_nvcc", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(pretend_gpu, "_jit_build", broken_build)
    why = pretend_gpu.unavailable_reason()
    assert "JIT build of the CUDA extension failed" in why and "nvcc fatal: bad flag" in why


def test_registry_declines_the_features_the_cuda_kernels_do_not_implement():
    # "auto" (or backend="cuda") never sends these to the kernels; the binding refuses them too
    from torch.nn.attention.bias import causal_lower_right

    from rollingq_kernels.backends import _REGISTRY

    features = _REGISTRY["cuda"].features
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 9, 8)
    cases = {
        "bool attn_mask": make_problem(q, q, q, attn_mask=torch.rand(6, 6) < 0.5),
        "float attn_mask": make_problem(q, q, q, attn_mask=torch.randn(6, 6)),
        "offset 3": make_problem(q, kv, kv, attn_mask=causal_lower_right(6, 9), enable_gqa=True),
        "dropout": make_problem(q, q, q, dropout_p=0.1, rng_state=torch.tensor([1, 0])),
        "grouped-query": make_problem(q, kv, kv, enable_gqa=True),
    }
    for what, p in cases.items():
        reasons = features.reasons(p)
        assert any(what in r for r in reasons), (what, reasons)
    plain = make_problem(q, q, q, is_causal=True, key_padding_mask=torch.ones(1, 6, dtype=bool))
    assert features.reasons(plain) == []
