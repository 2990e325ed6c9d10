"""The RollingQ controller against the paper's formulas, written out here independently."""

import io
import math

import pytest
import torch
from helpers import assert_close, random_orthogonal

from rollingq_kernels import (
    RollingQ,
    RollingQAttention,
    RollingQFusion,
    key_modality_from_lengths,
)

F64 = torch.float64


def _fusion(E, H, seed):
    torch.manual_seed(seed)
    fusion = RollingQFusion(E, H, dtype=F64)
    with torch.no_grad():
        fusion.attn.in_proj_bias.normal_()
    return fusion


def _batches(E, g, sizes=(3, 5, 2), lengths=(6, 9), shift=1.5):
    # modality 0's tokens share a common offset, so its mean key has a clear direction
    offset = torch.randn(E, dtype=F64, generator=g) * shift
    out = []
    for B in sizes:
        t0 = torch.randn(B, lengths[0], E, dtype=F64, generator=g) + offset
        t1 = torch.randn(B, lengths[1], E, dtype=F64, generator=g)
        out.append([t0, t1])
    return out


def _paper(fusion, batches, sigma):
    """AIR, alpha, the target and the mean query from the paper's definitions, by hand."""
    attn = fusion.attn
    E = attn.embed_dim
    W, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    q = attn.rotation @ (W[:E] @ fusion.cls_token.detach() + b[:E])  # the rotated [CLS] query
    cos0, cos1, keys0, keys1, queries = [], [], [], [], []
    for t0, t1 in batches:
        k0 = t0.detach() @ W[E : 2 * E].T + b[E : 2 * E]  # (B, L0, E) projected keys
        k1 = t1.detach() @ W[E : 2 * E].T + b[E : 2 * E]
        for i in range(k0.shape[0]):
            m0, m1 = k0[i].mean(0), k1[i].mean(0)
            cos0.append(torch.dot(q, m0) / (q.norm() * m0.norm()))
            cos1.append(torch.dot(q, m1) / (q.norm() * m1.norm()))
            queries.append(q)
        keys0.append(k0.reshape(-1, E))
        keys1.append(k1.reshape(-1, E))
    air = (torch.stack(cos0) - torch.stack(cos1)).mean()
    alpha = (1 + torch.tanh(-sigma * air)) / 2
    k0bar, k1bar = torch.cat(keys0).mean(0), torch.cat(keys1).mean(0)
    qbar = torch.stack(queries).mean(0)
    target = alpha * k0bar / k0bar.norm() + (1 - alpha) * k1bar / k1bar.norm()
    target = target / target.norm() * qbar.norm()
    return air, alpha, target, qbar


def _observe_all(rq, fusion, batches):
    for tokens in batches:
        _, stats = fusion(tokens, need_stats=True)
        rq.observe(stats)


@pytest.mark.parametrize("method", ["plane", "svd"])
@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("sigma", [0.0, 0.7])
@pytest.mark.parametrize("start", ["identity", "rotated"])
def test_step_matches_the_paper(method, H, sigma, start):
    E = 16
    g = torch.Generator().manual_seed(31 + 7 * H + int(10 * sigma) + (method == "svd"))
    fusion = _fusion(E, H, seed=g.initial_seed())
    done = 0
    if start == "rotated":  # a rotation from an earlier epoch: the new one composes on the left
        fusion.attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
        done = 1
    batches = _batches(E, g)
    air, alpha, target, qbar = _paper(fusion, batches, sigma)
    R_old = fusion.attn.rotation.clone()
    rq = RollingQ(fusion, sigma=sigma, method=method, max_rotations=done + 1)
    _observe_all(rq, fusion, batches)
    report = rq.step()

    assert report.rotated and report.num_rotations == done + 1 and report.num_samples == 10
    assert math.isclose(report.air, float(air), rel_tol=1e-10, abs_tol=1e-12)
    assert_close(report.weights, torch.stack([alpha, 1 - alpha]), rel=1e-10, name="weights")
    assert fusion.attn.air_history == [report.air]
    R = fusion.attn.rotation
    R_new = R @ R_old.T  # R = R_new R_old
    eye = torch.eye(E, dtype=F64)
    assert_close(R_new @ R_new.T, eye, rel=1e-10, name="R_new orthogonal")
    assert math.isclose(float(torch.linalg.det(R_new)), 1.0, rel_tol=1e-10)
    # R_new takes the mean [CLS] query onto the target
    assert_close(R_new @ qbar, target, rel=1e-10, name="R_new q")
    angle = math.degrees(math.acos(float(torch.dot(qbar, target) / (qbar.norm() * target.norm()))))
    assert math.isclose(report.angle, angle, rel_tol=1e-9)
    if method == "plane":  # identity on the complement of span(q, target)
        basis, _ = torch.linalg.qr(torch.stack([qbar, target], 1))
        v = torch.randn(E, dtype=F64, generator=g)
        v = v - basis @ (basis.T @ v)
        assert_close(R_new @ v, v, rel=1e-10, name="complement")
    # the next forward's [CLS] query points at the target
    _, stats = fusion(batches[0], need_stats=True)
    assert_close(stats.query[0], target, rel=1e-10, name="rotated query")


def test_threshold_budget_and_history():
    E = 12
    g = torch.Generator().manual_seed(5)
    fusion = _fusion(E, 1, seed=5)
    batches = _batches(E, g)
    air = float(_paper(fusion, batches, 0.0)[0])
    rq = RollingQ(fusion, beta=abs(air) + 1e-3, max_rotations=2)
    _observe_all(rq, fusion, batches)
    first = rq.step()
    assert not first.rotated and first.angle == 0.0
    assert torch.equal(fusion.attn.rotation, torch.eye(E, dtype=F64))
    rq.beta = 0.0
    _observe_all(rq, fusion, batches)
    assert rq.step(rotate=False).rotated is False  # the caller can hold the rotation back
    for expect in (True, True, False):  # budget of two rotations
        _observe_all(rq, fusion, batches)
        assert rq.step().rotated is expect
    assert int(fusion.attn.num_rotations) == 2
    assert len(fusion.attn.air_history) == 5
    # after the rotation the imbalance is gone (sigma = 0 aims at the equal mix)
    hist = fusion.attn.air_history
    assert hist[:3] == pytest.approx([air] * 3, rel=1e-12)
    # after the rotation the imbalance is mostly gone (sigma = 0 aims at the equal mix of the
    # mean keys; the AIR uses per-sample means, so not exactly 0) ...
    assert abs(hist[3]) < 0.2 * abs(hist[2])
    # ... and the second rotation finds the query already on the target: R_new = I
    assert hist[4] == pytest.approx(hist[3], rel=1e-9)
    with pytest.raises(RuntimeError, match="no statistics"):
        rq.step()


def test_checkpoint_resumes_the_rotation_state():
    E = 12
    g = torch.Generator().manual_seed(9)
    fusion = _fusion(E, 2, seed=9)
    batches = _batches(E, g)
    rq = RollingQ(fusion)
    _observe_all(rq, fusion, batches[:2])
    partial = rq.state_dict()
    _observe_all(rq, fusion, batches[2:])
    assert rq.step().rotated
    buf = io.BytesIO()
    torch.save(fusion.state_dict(), buf)
    buf.seek(0)
    resumed = _fusion(E, 2, seed=123)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(resumed.attn.rotation, fusion.attn.rotation)
    assert resumed.attn.air_history == fusion.attn.air_history
    rq2 = RollingQ(resumed)
    _observe_all(rq2, resumed, batches)
    assert not rq2.step().rotated  # the one rotation was already spent before the checkpoint
    # the running sums resume too: half an epoch restored + the other half == the whole epoch
    fusion3 = _fusion(E, 2, seed=9)
    rq3 = RollingQ(fusion3)
    rq3.load_state_dict(partial)
    _observe_all(rq3, fusion3, batches[2:])
    fusion4 = _fusion(E, 2, seed=9)
    rq4 = RollingQ(fusion4)
    _observe_all(rq4, fusion4, batches)
    r3, r4 = rq3.step(), rq4.step()
    assert r3.air == pytest.approx(r4.air, rel=1e-12)
    assert torch.allclose(fusion3.attn.rotation, fusion4.attn.rotation, rtol=0, atol=1e-12)


def test_estimate_pass_equals_observing_the_training_steps():
    E = 12
    g = torch.Generator().manual_seed(21)
    fusion = _fusion(E, 2, seed=21)
    batches = _batches(E, g, sizes=(4, 1, 3))
    rq_a, rq_b = RollingQ(fusion), RollingQ(fusion)
    _observe_all(rq_a, fusion, batches)
    rq_b.observe(fusion(batches[0], need_stats=True)[1])  # stale sums: estimate replaces them
    rq_b.estimate(batches, lambda tokens: fusion(tokens, need_stats=True))
    assert torch.equal(rq_a.state_dict()["sums"], rq_b.state_dict()["sums"])


def test_attention_stats_and_query_input_on_a_self_attention_layer():
    # A RollingQAttention over [CLS | m0 | m1]: observe(AttentionStats, query) with the kernel's
    # (B, H, Lq, D) queries gives the same sums as observe(RollingQStats).
    E, H, B = 16, 4, 3
    g = torch.Generator().manual_seed(41)
    torch.manual_seed(41)
    attn = RollingQAttention(E, H, dtype=F64)
    attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    ids = key_modality_from_lengths((1, 5, 7), (False, True, True))
    x = torch.randn(B, 13, E, dtype=F64, generator=g)
    _, stats = attn(x, key_modality=ids, need_stats=True)
    rq_a, rq_b = RollingQ(attn), RollingQ(attn)
    rq_a.observe(stats)
    q = (x @ attn.in_proj_weight[:E].T + attn.in_proj_bias[:E]).detach()
    q = q.clone()
    q[:, 0] = q[:, 0] @ attn.rotation.T
    rq_b.observe(stats.attention, q.view(B, 13, H, E // H).transpose(1, 2), row=0)
    assert torch.allclose(rq_a.state_dict()["sums"], rq_b.state_dict()["sums"], atol=1e-12)
    with pytest.raises(ValueError, match="needs the query"):
        rq_b.observe(stats.attention)


def test_three_modalities_use_the_softmax_weights():
    E = 12
    g = torch.Generator().manual_seed(51)
    fusion = _fusion(E, 1, seed=51)
    tokens = [
        torch.randn(4, n, E, dtype=F64, generator=g) + 0.5 * i for i, n in enumerate((3, 4, 5))
    ]
    rq = RollingQ(fusion, num_modalities=3, sigma=1.3)
    rq.observe(fusion(tokens, need_stats=True)[1])
    report = rq.step()
    # independent: per-sample cosines between the [CLS] query and each modality's mean key
    attn = fusion.attn
    W, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    q = W[:E] @ fusion.cls_token.detach() + b[:E]
    c = torch.stack(
        [
            torch.nn.functional.cosine_similarity(
                (t @ W[E : 2 * E].T + b[E : 2 * E]).mean(1), q[None], dim=-1
            )
            for t in tokens
        ],
        -1,
    ).mean(0)
    e = torch.exp(-2 * 1.3 * c)
    assert_close(report.cosines, c, rel=1e-10, name="cosines")
    assert_close(report.weights, e / e.sum(), rel=1e-10, name="weights")
    assert math.isclose(report.air, float(c.max() - c.min()), rel_tol=1e-10)
    assert report.rotated
