"""torch.autocast: the package treats attention as torch's autocast treats SDPA (lower precision):
q, k, v and a float mask are cast to the autocast dtype (a float64 tensor is not), the result is
in that dtype, and the arithmetic is the same as a call on the cast inputs outside autocast.

Checked against the same call outside autocast on inputs cast by hand (bit for bit), against
torch's SDPA under the same autocast (dtype, and the 2x rule against the float64 reference), and
through gradients to float32 leaves.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import CountKernelCalls, check_against_reference, make_case, nan_poisoned_outputs

import rollingq_kernels as rk
from rollingq_kernels.backends import backend_status

BACKENDS = ["reference"] + (["cpu"] if backend_status().get("cpu") == [] else [])


def _cast(dtype, *ts):
    return [t if t is None or t.dtype in (torch.float64, torch.bool) else t.to(dtype) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_rolling_attention_under_autocast_is_the_call_on_cast_inputs(backend, low):
    case = make_case(2, 3, 9, 13, 24, dtype=torch.float32, seed=1, layout="blhd",
                     rotation="shared", rows="subset", modalities=2, padding=True)  # fmt: skip
    mask = torch.randn(1, 3, 9, 13)  # float32: cast like q, k, v
    kw = dict(case.kwargs, attn_mask=mask, backend=backend)
    with torch.autocast("cpu", dtype=low), nan_poisoned_outputs():
        out, stats = rk.rolling_attention(case.q, case.k, case.v, **kw)
    q, k, v, m = _cast(low, case.q, case.k, case.v, mask)
    with nan_poisoned_outputs():
        want, want_stats = rk.rolling_attention(q, k, v, **dict(kw, attn_mask=m))
    assert out.dtype == low and stats.lse.dtype == torch.float32
    assert torch.equal(out, want)
    for name, a, b in zip(stats._fields, stats, want_stats):
        assert torch.equal(a, b), name
    # and it is attention in that dtype: the 2x rule against the float64 reference
    ref_case = make_case(2, 3, 9, 13, 24, dtype=torch.float32, seed=1, layout="blhd",
                         rotation="shared", rows="subset", modalities=2, padding=True)  # fmt: skip
    ref_case.q, ref_case.k, ref_case.v = (t.to(low).float() for t in (q, k, v))
    ref_case.kwargs["attn_mask"] = m.float()
    check_against_reference(ref_case, out, dtype=low, what=f"{backend} under autocast ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_float32_leaves_through_the_cast(backend):
    case = make_case(2, 2, 7, 10, 16, dtype=torch.float32, seed=2, rotation="shared")
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (case.q, case.k, case.v))
    w = torch.randn(2, 2, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rk.rolling_attention(q, k, v, rotation=case.kwargs["rotation"], backend=backend)
    (out.float() * w).sum().backward()
    qb, kb, vb = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    out_b = rk.rolling_attention(qb, kb, vb, rotation=case.kwargs["rotation"], backend=backend)
    (out_b.float() * w).sum().backward()
    for name, leaf, cast in (("dq", q, qb), ("dk", k, kb), ("dv", v, vb)):
        assert leaf.grad.dtype == torch.float32, name
        assert torch.equal(leaf.grad, cast.grad.float()), name


def test_float64_stays_float64_and_mixed_inputs_are_cast_as_torch_does():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rk.rolling_attention(q, k, v).dtype == torch.float64
        assert F.scaled_dot_product_attention(q, k, v).dtype == torch.float64  # torch's rule
        # float32 q with bfloat16 k, v: an error outside autocast, the same dtype inside
        qf, kb, vb = q.float(), k.bfloat16(), v.bfloat16()
        assert rk.rolling_attention(qf, kb, vb).dtype == torch.bfloat16
        assert rk.scaled_dot_product_attention(qf, kb, vb).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        rk.rolling_attention(qf, kb, vb)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_sdpa_drop_in_under_autocast_matches_torch_dtype_and_numerics():
    case = make_case(2, 4, 11, 11, 32, dtype=torch.float32, seed=3, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), nan_poisoned_outputs():
        out = rk.scaled_dot_product_attention(case.q, case.k, case.v, is_causal=True)
        torch_out = F.scaled_dot_product_attention(case.q, case.k, case.v, is_causal=True)
    assert out.dtype == torch_out.dtype == torch.bfloat16
    q, k, v = _cast(torch.bfloat16, case.q, case.k, case.v)
    assert torch.equal(out, rk.scaled_dot_product_attention(q, k, v, is_causal=True))
    case.q, case.k, case.v = (t.float() for t in (q, k, v))
    check_against_reference(case, out, dtype=torch.bfloat16, what="drop-in under autocast ")


class _RopeAttention(torch.nn.Module):
    """timm-style attention with a rotary embedding kept in float32: under autocast the
    projections come out in bfloat16 and q, k, multiplied by the float32 cos / sin tables, in
    float32, so SDPA gets mixed dtypes (torch's autocast casts them)."""

    def __init__(self, dim=32, heads=4, length=17):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        angle = torch.outer(torch.arange(length), torch.rand(dim // heads // 2))
        self.register_buffer("cos", angle.cos().repeat(1, 2))
        self.register_buffer("sin", angle.sin().repeat(1, 2))

    def rope(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat([-x2, x1], dim=-1) * self.sin

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.rope(q), self.rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_a_float32_rope_model_under_autocast_runs_the_fused_kernel():
    torch.manual_seed(4)
    model = _RopeAttention()
    x = torch.randn(2, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        with rk.patch_sdpa(), CountKernelCalls() as count:
            got = model(x)
    assert count.calls == 1  # mixed dtypes under autocast are the kernel's, not handed to torch
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_a_backward_inside_autocast_keeps_the_rotation_gradient_in_float32():
    # a backward run inside the autocast block (torch advises against it, models do it): the
    # fused formula's own products for the rotation's gradient must not drop to bfloat16 (the
    # reference is plain torch: its backward under autocast is torch's, as for any model)
    backend = "cpu"
    case = make_case(2, 2, 7, 10, 16, dtype=torch.bfloat16, seed=5, rotation="per_head")
    rot = case.kwargs["rotation"]
    w = torch.randn(2, 2, 7, 16)
    grads = []
    for inside in (False, True):
        r = rot.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            out = rk.rolling_attention(case.q, case.k, case.v, rotation=r, backend=backend)
            (out.float() * w).sum().backward()
        grads.append(r.grad)
    assert grads[1].dtype == torch.float32
    assert torch.equal(grads[0], grads[1])
