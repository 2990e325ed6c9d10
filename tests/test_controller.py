"""The RollingQ controller against the paper's formulas, written out here independently."""

import io
import math

import pytest
import torch
from helpers import assert_close, random_orthogonal

from rollingq_kernels import (
    AttentionStats,
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


def test_estimate_pass_replaces_the_training_statistics():
    # An estimate() pass over the same batches gives the decisions observing them gives, and it
    # takes precedence over stale training statistics ("epoch" = the pass when there is one).
    E = 12
    g = torch.Generator().manual_seed(21)
    batches = _batches(E, g, sizes=(4, 1, 3))
    fa, fb = _fusion(E, 2, seed=21), _fusion(E, 2, seed=21)
    rq_a, rq_b = RollingQ(fa, sigma=0.8), RollingQ(fb, sigma=0.8)
    _observe_all(rq_a, fa, batches)
    rq_b.observe(fb(batches[0], need_stats=True)[1])  # stale: the pass replaces it
    rq_b.estimate(batches[2:], lambda tokens: fb(tokens, need_stats=True))  # an earlier pass
    rq_b.estimate(batches, lambda tokens: fb(tokens, need_stats=True))
    ra, rb = rq_a.step(), rq_b.step()
    assert ra.rotated and rb.rotated and rb.num_samples == ra.num_samples == 8
    assert rb.air == pytest.approx(ra.air, rel=1e-12)
    assert_close(rb.target, ra.target, rel=1e-12, name="target")
    assert_close(fb.attn.rotation, fa.attn.rotation, rel=1e-12, name="R")


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


# --- the official recipe ---------------------------------------------------------------------
#
# The official RollingQ code, end of epoch, written out independently in float64: the AIR (so
# the decision and alpha) of the last training batch, from that batch's forward (before its
# optimizer step); the target from an extra pass over the training set under the end-of-epoch
# weights, with mean keys (and the mean query) taken as the mean of per-batch means; the rotation
# as U V^T of the SVD of t q^T with the determinant fixed on U's last column.


def _snapshot(fusion):
    attn = fusion.attn
    return {
        "cls": fusion.cls_token.detach().clone(),
        "W": attn.in_proj_weight.detach().clone(),
        "b": attn.in_proj_bias.detach().clone(),
        "R": attn.rotation.clone(),
    }


def _project(snap, tokens):
    """The rotated [CLS] query (E,) and the projected keys of each modality (B, L_m, E)."""
    W, b = snap["W"], snap["b"]
    E = W.shape[1]
    q = snap["R"] @ (W[:E] @ snap["cls"] + b[:E])
    return q, [t.detach() @ W[E : 2 * E].T + b[E : 2 * E] for t in tokens]


def _cos(u, v):
    return torch.dot(u, v) / (u.norm() * v.norm())


def _official_end_of_epoch(last_snap, last_tokens, now_snap, pass_batches, sigma, beta, done):
    q, keys = _project(last_snap, last_tokens)
    B = keys[0].shape[0]
    c = torch.tensor(
        [[float(_cos(q, k[i].mean(0))) for k in keys] for i in range(B)], dtype=F64
    )  # (B, 2) per-sample cosines of the last training batch
    air = float((c[:, 0] - c[:, 1]).mean())
    alpha = (1 + math.tanh(-sigma * air)) / 2
    batch_q, batch_k0, batch_k1 = [], [], []
    for tokens in pass_batches:
        qp, (k0, k1) = _project(now_snap, tokens)
        batch_q.append(qp.expand(k0.shape[0], -1).mean(0))  # every sample has the same query
        batch_k0.append(k0.reshape(-1, k0.shape[-1]).mean(0))
        batch_k1.append(k1.reshape(-1, k1.shape[-1]).mean(0))
    qbar = torch.stack(batch_q).mean(0)
    k0bar, k1bar = torch.stack(batch_k0).mean(0), torch.stack(batch_k1).mean(0)
    target = alpha * k0bar / k0bar.norm() + (1 - alpha) * k1bar / k1bar.norm()
    target = target / target.norm() * qbar.norm()
    U, _, Vh = torch.linalg.svd(torch.outer(target / target.norm(), qbar / qbar.norm()))
    R = U @ Vh
    if torch.linalg.det(R) < 0:
        U[:, -1] = -U[:, -1]
        R = U @ Vh
    return {
        "air": air,
        "alpha": alpha,
        "fire": abs(air) > beta and done < 1,
        "target": target,
        "R": R,
        "qbar": qbar,
        "k0bar": k0bar,
        "k1bar": k1bar,
    }


def _dataset(E, g, n=9):
    # modality 0 carries a shared offset; the last sample is shifted, so that a short last batch
    # moves the mean of per-batch means away from the pooled mean
    offset = torch.randn(E, dtype=F64, generator=g) * 1.5
    t0 = torch.randn(n, 6, E, dtype=F64, generator=g) + offset
    t1 = torch.randn(n, 9, E, dtype=F64, generator=g)
    t0[-1] = 8.0 * torch.randn(E, dtype=F64, generator=g)
    t1[-1] = 8.0 * torch.randn(E, dtype=F64, generator=g)
    return t0, t1


def _split(data, sizes):
    out, start = [], 0
    for n in sizes:
        out.append([t[start : start + n] for t in data])
        start += n
    return out


def _train_epoch(fusion, head, opt, rq, batches, labels):
    """One epoch of SGD; returns the weights each batch's forward saw, the last one's included."""
    snaps, start = [], 0
    for tokens in batches:
        n = tokens[0].shape[0]
        snaps.append(_snapshot(fusion))
        out, stats = fusion(tokens, need_stats=True)
        loss = torch.nn.functional.cross_entropy(out @ head, labels[start : start + n])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rq.observe(stats)
        start += n
    return snaps


@pytest.mark.parametrize("sigma", [0.0, 5.0])
@pytest.mark.parametrize("decision", ["fire", "below_beta", "budget_spent"])
@pytest.mark.parametrize("H", [1, 2])
def test_paper_recipe_matches_the_official_end_of_epoch(sigma, decision, H):
    E, sizes = 16, (4, 4, 1)  # an uneven last batch, in training and in the pass
    g = torch.Generator().manual_seed(7 + 3 * H + int(sigma))
    fusion = _fusion(E, H, seed=g.initial_seed())
    head = torch.randn(E, 3, dtype=F64, generator=g, requires_grad=True)
    data = _dataset(E, g)
    labels = torch.randint(0, 3, (sum(sizes),), generator=g)
    opt = torch.optim.SGD([*fusion.parameters(), head], lr=0.05, momentum=0.9)
    batches = _split(data, sizes)
    done = 0
    if decision == "budget_spent":
        fusion.attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
        done = 1
    rq = RollingQ(fusion, recipe="paper", sigma=sigma)
    assert (rq.air_source, rq.target_source, rq.key_mean, rq.method) == (
        "last_batch",
        "pass",
        "batch_mean",
        "svd",
    )
    snaps = _train_epoch(fusion, head, opt, rq, batches, labels)
    fusion.eval()
    rq.estimate(batches, lambda tokens: fusion(tokens, need_stats=True))
    want = _official_end_of_epoch(
        snaps[-1], batches[-1], _snapshot(fusion), batches, sigma, 0.0, done
    )
    # the optimizer steps moved the weights enough to tell the last forward's AIR from the AIR
    # of the end-of-epoch weights on the same batch
    after = _official_end_of_epoch(
        _snapshot(fusion), batches[-1], _snapshot(fusion), batches, sigma, 0.0, done
    )
    assert abs(after["air"] - want["air"]) > 1e-3 * abs(want["air"])
    if decision == "below_beta":
        rq.beta = abs(want["air"]) * (1 + 1e-6)
        want["fire"] = False
    R_old = fusion.attn.rotation.clone()
    report = rq.step()

    assert math.isclose(report.air, want["air"], rel_tol=1e-10, abs_tol=1e-13)
    assert report.num_samples == sizes[-1]  # the AIR is the last batch's
    assert math.isclose(float(report.weights[0]), want["alpha"], rel_tol=1e-10)
    assert report.rotated is want["fire"]
    if not want["fire"]:
        assert report.target is None
        assert torch.equal(fusion.attn.rotation, R_old)
        return
    assert_close(report.target, want["target"], rel=1e-10, name="target")
    # The SVD of the rank-one t q^T fixes only the map q_hat -> t_hat: E - 1 singular values are
    # 0, and which orthonormal completion LAPACK returns for them changes with the last bit of
    # the input. So the rotation is compared where it is defined, and checked to be a rotation.
    R_new = fusion.attn.rotation @ R_old.T
    qhat, that = want["qbar"] / want["qbar"].norm(), want["target"] / want["target"].norm()
    assert_close(R_new @ qhat, that, rel=1e-10, name="R_new q_hat")
    assert_close(want["R"] @ qhat, that, rel=1e-10, name="official R q_hat")
    assert_close(R_new.T @ R_new, torch.eye(E, dtype=F64), rel=1e-13, name="R_new orthogonal")
    assert math.isclose(float(torch.linalg.det(R_new)), 1.0, rel_tol=1e-12)
    # the estimators really differ on these batches: pooled means point elsewhere
    now = _snapshot(fusion)
    for m, name in ((0, "k0bar"), (1, "k1bar")):
        pooled = torch.cat([_project(now, b)[1][m].reshape(-1, E) for b in batches]).mean(0)
        cos = float(_cos(pooled, want[name]))
        assert cos < 0.99, f"the test data should separate the two estimators (cos {cos:.4f})"


def test_paper_recipe_needs_the_pass_and_the_last_batch():
    E = 12
    g = torch.Generator().manual_seed(3)
    fusion = _fusion(E, 1, seed=3)
    batches = _batches(E, g)
    rq = RollingQ(fusion, recipe="paper")
    _observe_all(rq, fusion, batches)
    with pytest.raises(RuntimeError, match=r"target_source='pass'.*estimate\(\)"):
        rq.step()
    assert torch.equal(fusion.attn.rotation, torch.eye(E, dtype=F64))
    rq.reset()
    rq.estimate(batches, lambda tokens: fusion(tokens, need_stats=True))  # a pass alone ...
    with pytest.raises(RuntimeError, match=r"air_source='last_batch'.*observe\(\)"):
        rq.step()  # ... has no last training batch
    rq.observe(fusion(batches[0], need_stats=True)[1])
    rq.estimate(batches, lambda tokens: fusion(tokens, need_stats=True))
    assert rq.step().rotated


def test_last_batch_is_the_last_training_batch_and_survives_the_pass():
    # air_source="last_batch": the AIR of the last observe() before step(), not of the pass's
    # last batch; "epoch" averages the whole epoch; "pass" uses the pass.
    E = 12
    g = torch.Generator().manual_seed(13)
    batches = _batches(E, g, sizes=(3, 5, 2))
    results = {}
    for source in ("last_batch", "epoch", "pass"):
        fusion = _fusion(E, 1, seed=13)
        rq = RollingQ(fusion, air_source=source, max_rotations=0)
        _observe_all(rq, fusion, batches)
        if source != "epoch":  # "epoch" would mean the pass then (checked below)
            rq.estimate(batches[:1], lambda tokens, f=fusion: f(tokens, need_stats=True))
        results[source] = rq.step()
    fusion = _fusion(E, 1, seed=13)
    want = {}
    for name, sub in (("last_batch", batches[-1:]), ("epoch", batches), ("pass", batches[:1])):
        want[name] = float(_paper(fusion, sub, 0.0)[0])
    for source, report in results.items():
        assert report.air == pytest.approx(want[source], rel=1e-10), source
    assert results["last_batch"].num_samples == 2 and results["epoch"].num_samples == 10
    # "epoch" means the pass once there is one
    fusion = _fusion(E, 1, seed=13)
    rq = RollingQ(fusion, max_rotations=0)
    _observe_all(rq, fusion, batches)
    rq.estimate(batches[:1], lambda tokens: fusion(tokens, need_stats=True))
    assert rq.step().air == pytest.approx(want["pass"], rel=1e-10)


def test_batch_mean_equals_pooled_for_equal_batches():
    E = 12
    g = torch.Generator().manual_seed(17)
    batches = _batches(E, g, sizes=(3, 3, 3))
    reports = {}
    for key_mean in ("pooled", "batch_mean"):
        fusion = _fusion(E, 2, seed=17)
        rq = RollingQ(fusion, key_mean=key_mean, sigma=0.3)
        _observe_all(rq, fusion, batches)
        reports[key_mean] = (rq.step(), fusion.attn.rotation)
    (a, Ra), (b, Rb) = reports["pooled"], reports["batch_mean"]
    assert_close(b.target, a.target, rel=1e-12, name="target")
    assert_close(Rb, Ra, rel=1e-12, name="R")


def test_recipe_and_option_errors():
    fusion = _fusion(8, 1, seed=0)
    with pytest.raises(ValueError, match="recipe must be one of"):
        RollingQ(fusion, recipe="official")
    for name in ("air_source", "target_source", "key_mean", "method"):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            RollingQ(fusion, **{name: "bogus"})
    rq = RollingQ(fusion, recipe="paper", method="plane", air_source="epoch")
    assert (rq.air_source, rq.target_source, rq.key_mean, rq.method) == (
        "epoch",
        "pass",
        "batch_mean",
        "plane",
    )
    assert "recipe='paper'" in repr(rq)
    with pytest.raises(ValueError, match="source must be"):
        rq.observe(fusion([torch.randn(1, 2, 8, dtype=F64)] * 2, need_stats=True)[1], source="x")


def test_many_rotations_stay_orthogonal():
    # Every composition is re-orthonormalised: after 1000 rotations R^T R = I to the rounding
    # of one product. (A plain product of the same rotations drifts linearly, to about 1e-13.)
    E, B = 8, 3
    g = torch.Generator().manual_seed(1)
    attn = RollingQAttention(E, 1, dtype=F64)
    rq = RollingQ(attn, max_rotations=1000, method="svd")
    eye = torch.eye(E, dtype=F64)
    for _ in range(1000):
        key_sum = torch.randn(B, 1, 2, E, dtype=F64, generator=g)
        stats = AttentionStats(
            torch.rand(B, 1, 1, 2, dtype=F64, generator=g),
            key_sum,
            torch.full((B, 2), 3.0, dtype=F64),
            torch.zeros(B, 1, 1, dtype=F64),
        )
        rq.observe(stats, torch.randn(B, E, dtype=F64, generator=g))
        assert rq.step().rotated
    err = float((attn.rotation.T @ attn.rotation - eye).abs().max())
    assert err < 2e-15, f"R drifted from orthogonality: {err:.3g}"
    assert int(attn.num_rotations) == 1000
