"""RollingQFusion's options for the official recipe: its initialisation and its dropout."""

import math

import pytest
import torch
from helpers import assert_close, random_orthogonal

from rollingq_kernels import RollingQFusion
from rollingq_kernels.dropout import dropout_keep_mask, new_rng_state
from rollingq_kernels.fusion import SharedHeadAttentionFunction

F64 = torch.float64


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def test_xavier_normal_init_per_projection():
    E = 256
    torch.manual_seed(0)
    fusion = RollingQFusion(E, 4, init="xavier_normal")
    attn = fusion.attn
    weights = [*attn.in_proj_weight.detach().view(3, E, E).unbind(0), attn.out_proj.weight.detach()]
    for name, w in zip(("q", "k", "v", "out"), weights):
        # xavier_normal_ on an (E, E) matrix: N(0, 2 / (E + E)); 65536 draws pin the std to ~0.5%
        assert float(w.std()) == pytest.approx(1 / math.sqrt(E), rel=0.02), name
        assert abs(float(w.mean())) < 5 / E, name
        assert _kurtosis(w) == pytest.approx(3.0, abs=0.1), name  # normal, not uniform (1.8)
    assert not torch.equal(weights[0], weights[1])
    assert bool((attn.in_proj_bias == 0).all()) and bool((attn.out_proj.bias == 0).all())
    # the default is nn.MultiheadAttention's: xavier_uniform_ on the stacked (3E, E) weight
    torch.manual_seed(0)
    default = RollingQFusion(E, 4)
    w = default.attn.in_proj_weight.detach()
    bound = math.sqrt(6 / (E + 3 * E))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert _kurtosis(w) == pytest.approx(1.8, abs=0.05)
    # the reset keeps the parameters (the optimiser's references) in place
    ptr = default.attn.in_proj_weight.data_ptr()
    default.reset_projections_xavier_normal()
    assert default.attn.in_proj_weight.data_ptr() == ptr
    assert _kurtosis(default.attn.in_proj_weight.detach()) == pytest.approx(3.0, abs=0.1)


def test_fusion_option_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        RollingQFusion(8, init="kaiming")
    with pytest.raises(ValueError, match="mode must be one of"):
        RollingQFusion(8, mode="sparse")


# --- dropout -----------------------------------------------------------------------------------


def _shared_by_hand(a, x, keep, scale, p, rng):
    """mixed (B, H, E) and prob_sum (B, H) of the shared-head attention, materialised."""
    B, L, E = x.shape
    H = a.shape[0]
    scores = torch.einsum("ble,he->bhl", x, a) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    prob = torch.softmax(scores, dim=-1)  # (B, H, L)
    if p > 0:
        prob = prob * dropout_keep_mask(rng, p, (B, H, 1, L))[:, :, 0] / (1 - p)
    return torch.einsum("bhl,ble->bhe", prob, x), prob.sum(-1)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shared_head_attention_dropout_against_the_materialised_softmax(p):
    g = torch.Generator().manual_seed(5)
    B, E, H, lengths = 3, 6, 2, (4, 7)
    L = sum(lengths)
    a = torch.randn(H, E, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(B, L, E, dtype=F64, generator=g)
    keep = torch.rand(B, L, generator=g) < 0.8
    keep[:, 0] = True
    ids = torch.tensor([0] * lengths[0] + [1] * lengths[1])
    rng = torch.tensor([1234567, 0], dtype=torch.int64)
    segs = [t.clone().requires_grad_(True) for t in x.split(lengths, dim=1)]

    def run(a, *segs):
        return SharedHeadAttentionFunction.apply(a, keep, ids, 2, 0.7, "auto", p, rng, *segs)

    mixed, prob_sum, mass, key_sum, key_count, lse = run(a, *segs)
    a_ref = a.detach().clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    want_mixed, want_sum = _shared_by_hand(a_ref, x_ref, keep, 0.7, p, rng)
    assert_close(mixed, want_mixed, rel=1e-12, name="mixed")
    assert_close(prob_sum, want_sum, rel=1e-12, name="prob_sum")
    if p > 0:  # dropout really dropped something, and the rescaled weights do not sum to 1
        assert not torch.allclose(prob_sum, torch.ones_like(prob_sum))
    # the statistics are taken before dropout: the same as without it
    ref = SharedHeadAttentionFunction.apply(a, keep, ids, 2, 0.7, "auto", 0.0, None, *segs)
    for got, want, name in zip(
        (mass, key_sum, key_count, lse), ref[2:], ("mass", "sum", "n", "lse")
    ):
        assert_close(got, want, rel=1e-12, name=name)
    # gradients of a loss on both outputs, against autograd through the materialised softmax
    w1 = torch.randn(mixed.shape, dtype=F64, generator=g)
    w2 = torch.randn(prob_sum.shape, dtype=F64, generator=g)
    ((mixed * w1).sum() + (prob_sum * w2).sum()).backward()
    ((want_mixed * w1).sum() + (want_sum * w2).sum()).backward()
    assert_close(a.grad, a_ref.grad, rel=1e-11, name="da")
    assert_close(torch.cat([s.grad for s in segs], 1), x_ref.grad, rel=1e-11, name="dx")
    # and gradcheck, the keep-mask being fixed by rng
    a2 = a.detach().clone().requires_grad_(True)
    s2 = [s.detach().clone().requires_grad_(True) for s in segs]
    assert torch.autograd.gradcheck(lambda a, *s: run(a, *s)[:2], (a2, *s2))


def _fusion_by_hand(fusion, tokens, pad, p, rng):
    """The [CLS] row of the whole sequence, projected and materialised, before output dropout."""
    attn = fusion.attn
    E, H = attn.embed_dim, attn.num_heads
    D = E // H
    W = attn.in_proj_weight
    b = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(3 * E, dtype=W.dtype)
    B = tokens[0].shape[0]
    x = torch.cat([fusion.cls_token.view(1, 1, E).expand(B, 1, E), *tokens], 1)
    L = x.shape[1]
    q = attn.rotation @ (W[:E] @ fusion.cls_token + b[:E])
    k = x @ W[E : 2 * E].T + b[E : 2 * E]
    v = x @ W[2 * E :].T + b[2 * E :]
    scores = torch.einsum("hd,bhld->bhl", q.view(H, D), k.view(B, L, H, D).transpose(1, 2))
    scores = scores / math.sqrt(D)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
    prob = torch.softmax(scores, -1)
    if p > 0:
        prob = prob * dropout_keep_mask(rng, p, (B, H, 1, L))[:, :, 0] / (1 - p)
    heads = torch.einsum("bhl,bhld->bhd", prob, v.view(B, L, H, D).transpose(1, 2))
    return attn.out_proj(heads.reshape(B, E))


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fusion_attention_dropout_matches_the_sequence_by_hand(H, bias):
    E, B, lengths, p = 12, 4, (5, 7), 0.25
    g = torch.Generator().manual_seed(40 + H + 10 * bias)
    torch.manual_seed(g.initial_seed())
    fusion = RollingQFusion(E, H, bias=bias, dtype=F64, dropout=p, init="xavier_normal")
    if bias:
        with torch.no_grad():
            fusion.attn.in_proj_bias.normal_()
            fusion.attn.out_proj.bias.normal_()
    fusion.attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    fusion.out_dropout = torch.nn.Identity()  # the attention dropout alone, here
    tokens = [torch.randn(B, n, E, dtype=F64, generator=g, requires_grad=True) for n in lengths]
    masks = [torch.rand(B, n, generator=g) < 0.3 for n in lengths]
    for m in masks:
        m[:, 0] = False
    pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool), *masks], 1)
    fusion.train()
    torch.manual_seed(99)
    out, stats = fusion(tokens, padding_masks=masks, need_stats=True)
    torch.manual_seed(99)
    rng = new_rng_state()  # the draw the forward made
    want = _fusion_by_hand(fusion, tokens, pad, p, rng)
    assert_close(out, want, rel=1e-12, name="out")
    w = torch.randn(B, E, dtype=F64, generator=g)
    params = [fusion.cls_token, *(t for t in fusion.parameters() if t is not fusion.cls_token)]
    got_g = torch.autograd.grad((out * w).sum(), [*params, *tokens])
    want_g = torch.autograd.grad((want * w).sum(), [*params, *tokens])
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        assert_close(a, b, rel=1e-10, atol=1e-13, name=f"grad {i}")
    # without dropout (eval) the answer is another one, and the statistics are the same
    fusion.eval()
    out_eval, stats_eval = fusion(tokens, padding_masks=masks, need_stats=True)
    assert not torch.allclose(out_eval, out)
    assert_close(out_eval, _fusion_by_hand(fusion, tokens, pad, 0.0, None), rel=1e-12, name="eval")
    for a, b in zip(stats.attention, stats_eval.attention):
        assert_close(a, b, rel=1e-12, name="stats")


def test_fusion_output_dropout():
    E, B, p = 64, 64, 0.2
    torch.manual_seed(3)
    fusion = RollingQFusion(E, 2, dropout=p, init="xavier_normal")
    with torch.no_grad():
        fusion.attn.out_proj.bias.normal_()
    tokens = [torch.randn(B, n, E) for n in (9, 11)]
    fusion.eval()
    ref, _ = fusion(tokens)
    plain = RollingQFusion(E, 2)
    plain.load_state_dict(fusion.state_dict())
    assert torch.equal(plain.eval()(tokens)[0], ref)  # eval: no dropout anywhere
    fusion.train()
    out, _ = fusion(tokens)
    zeros = float((out == 0).float().mean())
    assert abs(zeros - p) < 0.03, f"output dropout zeroed {zeros:.3f} of the entries, wanted {p}"
    kept = out != 0
    # the kept entries are rescaled by 1 / (1 - p); attention dropout moved them too, so only the
    # scale is checked: their mean magnitude is about that of the reference over (1 - p)
    ratio = float(out[kept].abs().mean() / ref[kept].abs().mean())
    assert ratio == pytest.approx(1 / (1 - p), rel=0.15)
    with pytest.raises(ValueError, match="dropout must lie in"):
        RollingQFusion(E, dropout=1.0)


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_absorbed_attention_through_gqa_equals_the_shared_head_function(H, p):
    # the generic path (rolling_attention, one key/value head, enable_gqa) against the
    # hand-written backward: outputs, statistics and every gradient
    E, B, lengths = 12, 3, (5, 8)
    g = torch.Generator().manual_seed(60 + H + int(10 * p))
    torch.manual_seed(g.initial_seed())
    fusion = RollingQFusion(E, H, dtype=F64, dropout=p)
    with torch.no_grad():
        fusion.attn.in_proj_bias.normal_()
    fusion.attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    fusion.out_dropout = torch.nn.Identity()
    tokens = [torch.randn(B, n, E, dtype=F64, generator=g, requires_grad=True) for n in lengths]
    masks = [torch.rand(B, n, generator=g) < 0.3 for n in lengths]
    for m in masks:
        m[:, 0] = False
    w = torch.randn(B, E, dtype=F64, generator=g)
    results = {}
    for impl in ("shared", "gqa"):
        fusion._absorbed_attention = impl
        torch.manual_seed(7)  # the same dropout seed for both
        out, stats = fusion(tokens, padding_masks=masks, need_stats=True)
        grads = torch.autograd.grad((out * w).sum(), [*fusion.parameters(), *tokens])
        results[impl] = (out, stats, grads)
    (o1, s1, g1), (o2, s2, g2) = results["shared"], results["gqa"]
    assert_close(o2, o1, rel=1e-12, name="out")
    for a, b in zip(s2.attention, s1.attention):
        assert_close(a, b, rel=1e-12, name="stats")
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert_close(a, b, rel=1e-10, atol=1e-13, name=f"grad {i}")
