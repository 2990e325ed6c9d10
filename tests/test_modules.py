"""RollingQAttention against nn.MultiheadAttention, and RollingQFusion's three paths."""

import io

import pytest
import torch
from helpers import assert_close, random_orthogonal
from torch import nn

from rollingq_kernels import RollingQAttention, RollingQFusion, RollingQStats

F64 = torch.float64


def _mha(E, H, *, bias=True, batch_first=True, dtype=F64, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=dtype)
    if bias:  # MultiheadAttention starts its biases at zero: make them matter
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_grads(got, want, rel, what=""):
    assert got.keys() == want.keys(), f"{what}: {sorted(got)} != {sorted(want)}"
    for name in want:
        assert_close(got[name], want[name], rel=rel, atol=1e-13, name=f"{what}{name}.grad")


@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["self", "cross", "kv_differ"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_identity_rotation_matches_multihead_attention(H, bias, kind, padding):
    E, B, Lq, Lk = 24, 3, 7, 7 if kind == "self" else 11
    mha = _mha(E, H, bias=bias, seed=H + 10 * bias)
    mod = RollingQAttention(E, H, bias=bias, dtype=F64)
    mod.load_state_dict(mha.state_dict())  # strict: the RollingQ buffers are filled in
    g = torch.Generator().manual_seed(hash((H, bias, kind, padding)) % 2**31)
    x = torch.randn(B, Lq, E, dtype=F64, generator=g, requires_grad=True)
    if kind == "self":
        args = (x, x, x)
    else:
        kv = torch.randn(B, Lk, E, dtype=F64, generator=g)
        v = kv if kind == "cross" else torch.randn(B, Lk, E, dtype=F64, generator=g)
        args = (x, kv, v)
    pad = None
    if padding:
        pad = torch.rand(B, Lk, generator=g) < 0.4  # True = ignored, MultiheadAttention's way
        pad[:, 0] = False
    want, _ = mha(*args, key_padding_mask=pad, need_weights=False)
    got, stats = mod(*args, key_padding_mask=pad, need_weights=False)
    assert stats is None
    assert_close(got, want, rel=1e-12, name="out")
    # the default need_weights=True: MultiheadAttention's weights, and the same output
    with torch.no_grad():
        want_w_out, want_w = mha(*args, key_padding_mask=pad)
        got_w_out, got_w = mod(*args, key_padding_mask=pad)
        _, got_heads = mod(*args, key_padding_mask=pad, average_attn_weights=False)
    assert_close(got_w, want_w, rel=1e-12, name="weights")
    assert_close(got_heads.mean(1), want_w, rel=1e-12, name="per-head weights")
    assert_close(got_w_out, want_w_out, rel=1e-12, name="out with weights")
    w = torch.randn_like(want)
    (want * w).sum().backward()
    want_g, want_x = _grads(mha), x.grad.clone()
    x.grad = None
    (got * w).sum().backward()
    _assert_grads(_grads(mod), want_g, 1e-11)
    assert_close(x.grad, want_x, rel=1e-11, name="x.grad")


def test_float32_seq_first_and_unbatched():
    E, H = 32, 2
    mha = _mha(E, H, batch_first=False, dtype=torch.float32, seed=3)
    mod = RollingQAttention.from_multihead_attention(mha)
    assert mod.batch_first is False and mod.rotation.dtype == torch.float32
    x = torch.randn(9, 4, E)  # (L, B, E)
    want, _ = mha(x, x, x, need_weights=False)
    got, _ = mod(x, need_weights=False)
    assert_close(got, want, rel=1e-5, name="seq-first out")
    xu = torch.randn(5, E)  # unbatched (L, E)
    want_u, _ = mha(xu, xu, xu, need_weights=False)
    got_u, _ = mod(xu, need_weights=False)
    assert_close(got_u, want_u, rel=1e-5, name="unbatched out")


def _rotated_mha(mha, R):
    """A MultiheadAttention whose query projection is followed by R: W_q <- R W_q, b_q <- R b_q."""
    E = mha.embed_dim
    rot = nn.MultiheadAttention(E, mha.num_heads, batch_first=True, dtype=F64)
    rot.load_state_dict(mha.state_dict())
    with torch.no_grad():
        rot.in_proj_weight[:E] = R @ mha.in_proj_weight[:E]
        rot.in_proj_bias[:E] = R @ mha.in_proj_bias[:E]
    return rot


def _block_diagonal(H, D, g):
    return torch.block_diag(*random_orthogonal(D, H, dtype=F64, generator=g))


@pytest.mark.parametrize(
    "H,structure,rows,L",
    [
        (4, "dense", (0,), 7),  # a separate matmul on the [CLS] row
        (4, "dense", (0, 3), 7),
        (4, "block", (0,), 7),  # the kernel's per-head rotation
        (1, "dense", (0, 2), 7),  # one head: always the kernel's rotation
        (4, "dense", "all", 7),  # B * L <= E: every row rotated after the projection
        (4, "dense", "all", 9),  # B * L > E: folded into the query projection
        (4, "dense", (0, 1, 2, 3, 4, 5, 6, 7, 8), 9),  # every row listed: folded too
    ],
)
def test_cls_rotation_matches_multihead_attention_on_rotated_queries(H, structure, rows, L):
    E, B = 24, 3
    D = E // H
    g = torch.Generator().manual_seed(100 + H + len(rows))
    mha = _mha(E, H, seed=5)
    R = (
        random_orthogonal(E, dtype=F64, generator=g)
        if structure == "dense"
        else _block_diagonal(H, D, g)
    )
    mod = RollingQAttention.from_multihead_attention(mha, rotated_queries=rows)
    mod.compose_rotation(R)
    plan = mod._rotation_plan()
    assert not plan["identity"]
    assert (plan["per_head"] is not None) == (structure == "block" or H == 1)
    rot = _rotated_mha(mha, R)
    x = torch.randn(B, L, E, dtype=F64, generator=g, requires_grad=True)
    pad = torch.rand(B, L, generator=g) < 0.3
    pad[:, 0] = False
    plain, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    rotated, _ = rot(x, x, x, key_padding_mask=pad, need_weights=False)
    chosen = torch.zeros(L, dtype=torch.bool)
    chosen[list(range(L)) if rows == "all" else list(rows)] = True
    want = torch.where(chosen[None, :, None], rotated, plain)
    got, stats = mod(x, key_padding_mask=pad, need_stats=True)
    assert_close(got, want, rel=1e-12, name="out")
    with torch.no_grad():  # the weights path applies the rotation the same way
        got_w, weights = mod(x, key_padding_mask=pad)
        _, want_rot_w = rot(x, x, x, key_padding_mask=pad, average_attn_weights=False)
        _, want_plain_w = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
        _, heads = mod(x, key_padding_mask=pad, average_attn_weights=False)
    assert_close(got_w, want, rel=1e-12, name="out with weights")
    want_w = torch.where(chosen[None, None, :, None], want_rot_w, want_plain_w)
    assert_close(heads, want_w, rel=1e-12, name="weights of rotated rows")
    assert_close(weights, want_w.mean(1), rel=1e-12, name="averaged weights")
    # the tracked [CLS] query is the rotated one: R (W_q x_0 + b_q)
    q0 = x[:, 0].detach() @ mha.in_proj_weight[:E].detach().T + mha.in_proj_bias[:E].detach()
    assert_close(stats.query, q0 @ R.T, rel=1e-12, name="stats.query")
    w = torch.randn_like(want)
    (want * w).sum().backward()
    want_x = x.grad.clone()
    x.grad = None
    (got * w).sum().backward()
    assert_close(x.grad, want_x, rel=1e-11, name="x.grad")
    # gradient of W_q: the rotated rows' part goes through R
    gq_plain = mha.in_proj_weight.grad[:E]
    gq_rot = rot.in_proj_weight.grad[:E]
    want_wq = gq_plain + R.T @ gq_rot
    assert_close(mod.in_proj_weight.grad[:E], want_wq, rel=1e-11, name="W_q.grad")


def test_rotation_change_is_seen_by_the_next_forward():
    E, H = 16, 2
    mod = RollingQAttention(E, H, dtype=F64)
    x = torch.randn(2, 5, E, dtype=F64)
    before, _ = mod(x, need_weights=False)
    g = torch.Generator().manual_seed(7)
    mod.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    after, _ = mod(x, need_weights=False)
    assert not torch.allclose(before[:, 0], after[:, 0])
    assert_close(after[:, 1:], before[:, 1:], rel=1e-13, name="unrotated rows")
    assert int(mod.num_rotations) == 1


def test_state_dict_round_trip_and_multihead_attention_load():
    E, H = 16, 4
    g = torch.Generator().manual_seed(11)
    mod = RollingQAttention(E, H, dtype=F64)
    mod.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    mod.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    mod.air_history.extend([0.25, -0.125])
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = RollingQAttention(E, H, dtype=F64)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.rotation, mod.rotation)
    assert int(fresh.num_rotations) == 2
    assert fresh.air_history == [0.25, -0.125]
    x = torch.randn(2, 6, E, dtype=F64)
    assert torch.equal(fresh(x, need_weights=False)[0], mod(x, need_weights=False)[0])
    # and a RollingQAttention state_dict back into MultiheadAttention (strict=False: the
    # RollingQ buffers are extra) gives the same module at identity
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    plain = RollingQAttention(E, H, dtype=F64)
    result = mha.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["_extra_state", "num_rotations", "rotation"]
    assert_close(mha(x, x, x, need_weights=False)[0], plain(x)[0], rel=1e-12, name="out")
    # and the supported way back: to_multihead_attention()
    back = plain.to_multihead_attention()
    assert isinstance(back, nn.MultiheadAttention)
    assert back.state_dict().keys() == mha.state_dict().keys()
    assert_close(back(x, x, x)[0], plain(x)[0], rel=1e-12, name="to_multihead_attention")
    with pytest.raises(ValueError, match="reset_rotation"):
        mod.to_multihead_attention()  # a [CLS]-row rotation has no MultiheadAttention form


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="add_bias_kv"):
        RollingQAttention(8, 2, add_bias_kv=True)
    mha = nn.MultiheadAttention(8, 2, add_zero_attn=True, batch_first=True)
    with pytest.raises(ValueError, match="add_zero_attn"):
        RollingQAttention.from_multihead_attention(mha)
    mod = RollingQAttention(8, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="True = padding"):
        mod(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        mod(x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="batch \\* heads"):
        mod(x, attn_mask=torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        RollingQAttention(10, 3)
    with pytest.raises(ValueError, match="dropout"):
        RollingQAttention(8, 2, dropout=1.0)


# ---- RollingQFusion -------------------------------------------------------------------------


def _fusion_inputs(B, lengths, E, g, padding):
    tokens = [torch.randn(B, n, E, dtype=F64, generator=g, requires_grad=True) for n in lengths]
    masks = None
    if padding:
        masks = []
        for n in lengths:
            m = torch.rand(B, n, generator=g) < 0.3
            m[:, 0] = False
            masks.append(m)
        masks[-1][0, :] = True  # sample 0 has no token of the last modality at all
    return tokens, masks


def _run(fusion, tokens, masks, mode, w):
    for p in list(fusion.parameters()) + tokens:
        p.grad = None
    out, stats = fusion(tokens, padding_masks=masks, need_stats=True, mode=mode)
    loss = (out * w).sum()
    loss.backward()
    grads = _grads(fusion)
    grads.update({f"tokens[{i}]": t.grad.clone() for i, t in enumerate(tokens)})
    return out, loss, grads, stats


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("rotated", [False, True], ids=["identity", "rotated"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fusion_cls_paths_agree_with_the_full_sequence(H, padding, rotated, bias):
    E, B, lengths = 18, 4, (5, 8)
    g = torch.Generator().manual_seed(1000 * H + 100 * padding + 10 * rotated + bias)
    torch.manual_seed(g.initial_seed())
    fusion = RollingQFusion(E, H, bias=bias, dtype=F64)
    if bias:
        with torch.no_grad():
            fusion.attn.in_proj_bias.normal_()
            fusion.attn.out_proj.bias.normal_()
    if rotated:
        fusion.attn.compose_rotation(random_orthogonal(E, dtype=F64, generator=g))
    tokens, masks = _fusion_inputs(B, lengths, E, g, padding)
    w = torch.randn(B, E, dtype=F64, generator=g)
    full_out, full_loss, full_grads, full_stats = _run(fusion, tokens, masks, "full", w)
    for mode in ("projected", "absorbed"):
        out, loss, grads, stats = _run(fusion, tokens, masks, mode, w)
        assert_close(out, full_out, rel=1e-12, name=f"{mode} out")
        assert_close(loss, full_loss, rel=1e-12, name=f"{mode} loss")
        _assert_grads(grads, full_grads, 1e-10, what=f"{mode} ")
        assert isinstance(stats, RollingQStats) and stats.query_row == 0
        fa, a = full_stats.attention, stats.attention
        assert_close(a.modality_mass, fa.modality_mass[:, :, :1], rel=1e-12, name=f"{mode} mass")
        assert_close(a.lse, fa.lse[:, :, :1], rel=1e-12, name=f"{mode} lse")
        assert_close(a.key_sum, fa.key_sum, rel=1e-12, name=f"{mode} key_sum")
        assert torch.equal(a.key_count, fa.key_count)
        assert_close(stats.query, full_stats.query, rel=1e-12, name=f"{mode} query")


def test_fusion_stats_are_the_projected_keys():
    # Independently of the paths: the key sums are sums of W_k x + b_k over each modality.
    E, H, B = 12, 2, 3
    g = torch.Generator().manual_seed(77)
    fusion = RollingQFusion(E, H, dtype=F64)
    with torch.no_grad():
        fusion.attn.in_proj_bias.normal_()
    tokens = [torch.randn(B, n, E, dtype=F64, generator=g) for n in (4, 6, 3)]
    _, stats = fusion(tokens, need_stats=True)
    wk = fusion.attn.in_proj_weight[E : 2 * E].detach()
    bk = fusion.attn.in_proj_bias[E : 2 * E].detach()
    want = torch.stack([(t @ wk.T + bk).sum(1) for t in tokens], 1)  # (B, M, E)
    got = stats.attention.key_sum.permute(0, 2, 1, 3).reshape(B, 3, E)
    assert_close(got, want, rel=1e-12, name="key_sum")
    assert stats.attention.key_count.tolist() == [[4.0, 6.0, 3.0]] * B
    mass = stats.attention.modality_mass.sum(-1)  # (B, H, 1): all but the [CLS] key's share
    assert bool(((mass > 0) & (mass < 1)).all())


def test_shared_head_attention_gradcheck_and_huge_padded_tokens():
    from rollingq_kernels.modules import SharedHeadAttentionFunction

    g = torch.Generator().manual_seed(88)
    B, L, E, H = 2, 7, 6, 3
    a = torch.randn(H, E, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(B, L, E, dtype=F64, generator=g)
    keep = torch.rand(B, L, generator=g) < 0.7
    keep[:, 0] = True

    def mixed(a, x0, x1):  # the sequence in two segments, as the fusion passes it
        return SharedHeadAttentionFunction.apply(
            a, keep, None, None, 0.4, "auto", 0.0, None, x0, x1
        )[0]

    x0, x1 = (t.clone().requires_grad_(True) for t in (x[:, :3], x[:, 3:]))
    assert torch.autograd.gradcheck(mixed, (a, x0, x1))
    # padded tokens with enormous values: their exp would overflow; they must still get
    # exactly zero gradient and leave every other gradient finite and right
    x_big = x.clone()
    x_big[~keep] = 1e6
    b0, b1 = (t.clone().requires_grad_(True) for t in (x_big[:, :3], x_big[:, 3:]))
    out = mixed(a, b0, b1)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    dx_big = torch.cat([b0.grad, b1.grad], 1)
    assert torch.isfinite(dx_big).all() and torch.isfinite(a.grad).all()
    assert bool((dx_big[~keep] == 0).all())
    a_ref = a.detach().clone().requires_grad_(True)
    (mixed(a_ref, x0, x1) * w).sum().backward()
    dx_ref = torch.cat([x0.grad, x1.grad], 1)
    assert_close(dx_big[keep], dx_ref[keep], rel=1e-12, name="dx")
    assert_close(a.grad, a_ref.grad, rel=1e-12, name="da")


def test_module_rotation_stays_orthogonal_over_many_compositions():
    # RollingQAttention.compose_rotation re-orthonormalises like the controller: a plain product
    # of 1000 float64 rotations drifts from orthogonality by about 1e-13
    mod = RollingQAttention(8, 2).double()
    g = torch.Generator().manual_seed(3)
    plain = torch.eye(8, dtype=torch.float64)
    for _ in range(1000):
        step = random_orthogonal(8, dtype=torch.float64, generator=g)
        mod.compose_rotation(step)
        plain = step @ plain
    eye = torch.eye(8, dtype=torch.float64)
    drift = (mod.rotation.T @ mod.rotation - eye).abs().max().item()
    assert drift < 2e-15, drift
    assert (plain.T @ plain - eye).abs().max().item() > drift
    torch.testing.assert_close(mod.rotation, plain, rtol=0, atol=1e-12)
