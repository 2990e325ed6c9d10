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
