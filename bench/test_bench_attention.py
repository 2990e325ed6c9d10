"""pytest-benchmark entry points: `pytest bench/` (not part of `make test`).

Each case runs on the same inputs for torch SDPA and every backend that can run here, so the
pytest-benchmark table compares them side by side. Use `--benchmark-only` to skip nothing else.
"""

import pytest
import torch
import torch.nn.functional as F

import rollingq_kernels as rk
from bench.harness import make_rollingq_inputs as make_inputs
from rollingq_kernels.api import make_problem
from rollingq_kernels.backends import _REGISTRY
from rollingq_kernels.reference import apply_rotation

SHAPES = [(4, 8, 1024, 64), (2, 12, 577, 64), (16, 1, 1101, 768)]
BACKENDS = ["torch_sdpa", "reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, shape, backend):
    q, k, v, kw = make_inputs(*shape)
    if backend == "torch_sdpa":
        q_rot = apply_rotation(q, kw["rotation"], kw["rotated_queries"])
        fn = lambda: F.scaled_dot_product_attention(q_rot, k, v)
    else:
        why = _REGISTRY[backend].reasons(make_problem(q, k, v, **kw))
        if why:
            pytest.skip("; ".join(why))
        fn = lambda: rk.rolling_attention(q, k, v, **kw, backend=backend)
    benchmark.group = "forward " + "x".join(map(str, shape))
    benchmark.extra_info["gflop"] = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3] / 1e9
    out = benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
