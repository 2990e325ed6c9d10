"""RollingQAttention as an nn.MultiheadAttention drop-in inside nn.Transformer* layers.

Equality with the same layers holding nn.MultiheadAttention (same weights, dropout off) in train
and eval mode, with every mask form those layers pass (bool and float key padding, bool and
float causal masks, the is_causal hint), batch_first both ways, kdim / vdim; attention dropout in
training through the kernels' keep-mask (reproducible from a seed, the same on the fused and the
weights paths).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fused_everywhere import fused_everywhere
from helpers import assert_close
from torch import nn

from rollingq_kernels import RollingQAttention
from rollingq_kernels.dropout import dropout_keep_mask, new_rng_state
from rollingq_kernels.integrations.torch_nn import replace_multihead_attention

F64 = torch.float64
E, H, B, L = 24, 4, 3, 7


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # the one-time notice that a call runs on the reference while a kernel declines a feature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _seq(x, batch_first):
    return x if batch_first else x.transpose(0, 1)


def _masks(kind, g, dtype=F64, Lq=L, Lk=L):
    """(attn_mask, key_padding_mask, is_causal) in the forms nn.Transformer* layers take."""
    pad = torch.rand(B, Lk, generator=g) < 0.35
    pad[:, 0] = False  # no row without a key
    causal_bool = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)  # True = not attended
    causal_float = nn.Transformer.generate_square_subsequent_mask(Lq, dtype=dtype)
    float_pad = torch.zeros(B, Lk, dtype=dtype).masked_fill(pad, float("-inf"))
    return {
        "none": (None, None, False),
        "bool_pad": (None, pad, False),
        "float_pad": (None, float_pad, False),
        "causal_bool": (causal_bool, None, False),
        "causal_float": (causal_float, None, False),
        "causal_hint": (causal_float, None, True),
        "causal_hint_pad": (causal_bool, pad, True),
        "causal_float_pad": (causal_float, float_pad, False),
        "bias_float": (torch.randn(Lq, Lk, generator=g, dtype=dtype), None, False),
    }[kind]


MASKS = [
    "none", "bool_pad", "float_pad", "causal_bool", "causal_float", "causal_hint",
    "causal_hint_pad", "causal_float_pad", "bias_float",
]  # fmt: skip


def _encoder_pair(batch_first, norm_first=False, dtype=F64, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=37, dropout=dropout, batch_first=batch_first, norm_first=norm_first,
        dtype=dtype,
    )  # fmt: skip
    with torch.no_grad():
        layer.self_attn.in_proj_bias.normal_()
    ours = replace_multihead_attention(copy.deepcopy(layer))
    assert isinstance(ours.self_attn, RollingQAttention)
    return layer, ours


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encoder_layer_matches_multihead_attention(batch_first, mask, mode):
    g = torch.Generator().manual_seed(hash((batch_first, mask, mode)) % 2**31)
    layer, ours = _encoder_pair(batch_first, norm_first=mask.endswith("pad"))
    layer.train(mode == "train"), ours.train(mode == "train")
    attn_mask, pad, causal = _masks(mask, g)
    x = torch.randn(B, L, E, generator=g, dtype=F64)
    xs = _seq(x, batch_first).requires_grad_()
    kw = dict(src_mask=attn_mask, src_key_padding_mask=pad, is_causal=causal)
    want = layer(xs, **kw)
    got = ours(xs, **kw)
    assert_close(got, want, rel=1e-10, name=f"{mask} out")
    if mode == "train":
        w = torch.randn_like(want)
        gx_want, *gp_want = torch.autograd.grad((want * w).sum(), [xs, *layer.parameters()])
        gx_got, *gp_got = torch.autograd.grad((got * w).sum(), [xs, *ours.parameters()])
        assert_close(gx_got, gx_want, rel=1e-10, name="dx")
        for (n, _), a, b in zip(layer.named_parameters(), gp_got, gp_want):
            assert_close(a, b, rel=1e-9, atol=1e-13, name=f"d{n}")


@pytest.mark.parametrize("mask", ["none", "bool_pad", "float_pad", "causal_float"])
def test_encoder_layer_inference_fast_path_never_bypasses_the_module(mask):
    # In eval mode without grad, nn.TransformerEncoderLayer runs a fused kernel of its own on the
    # attention weights. RollingQAttention must still be called: with a rotation of every row the
    # output is MultiheadAttention's with W_q <- R W_q, which to_multihead_attention() builds.
    g = torch.Generator().manual_seed(3)
    layer, ours = _encoder_pair(True, dtype=torch.float32)
    ours.self_attn.rotated_queries = "all"
    q, _ = torch.linalg.qr(torch.randn(E, E, generator=g, dtype=F64))
    ours.self_attn.compose_rotation(q.float())
    layer.self_attn = ours.self_attn.to_multihead_attention()
    layer.eval(), ours.eval()
    calls = []
    ours.self_attn.register_forward_hook(lambda *a: calls.append(1))
    attn_mask, pad, causal = _masks(mask, g, dtype=torch.float32)
    x = torch.randn(B, L, E, generator=g)
    with torch.no_grad():
        got = ours(x, src_mask=attn_mask, src_key_padding_mask=pad, is_causal=causal)
        want = layer(x, src_mask=attn_mask, src_key_padding_mask=pad, is_causal=causal)
    assert calls, "the encoder layer bypassed RollingQAttention"
    keep = (
        1.0 if pad is None else (~(pad.bool() if pad.dtype == torch.bool else pad < 0))[..., None]
    )
    assert_close(got * keep, want * keep, rel=2e-5, name="eval no_grad")


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("masks", ["causal_bool", "causal_float_pads", "hint"])
def test_decoder_layer_matches_multihead_attention(batch_first, mode, masks):
    g = torch.Generator().manual_seed(hash((batch_first, mode, masks)) % 2**31)
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(
        E, H, dim_feedforward=29, dropout=0.0, batch_first=batch_first, dtype=F64
    )
    ours = replace_multihead_attention(copy.deepcopy(layer))
    assert isinstance(ours.self_attn, RollingQAttention)
    assert isinstance(ours.multihead_attn, RollingQAttention)
    layer.train(mode == "train"), ours.train(mode == "train")
    Lm = 9
    tgt = _seq(torch.randn(B, L, E, generator=g, dtype=F64), batch_first).requires_grad_()
    mem = _seq(torch.randn(B, Lm, E, generator=g, dtype=F64), batch_first).requires_grad_()
    tgt_mask, _, hint = _masks("causal_hint" if masks == "hint" else "causal_bool", g)
    kw = {"tgt_mask": tgt_mask, "tgt_is_causal": hint}
    if masks == "causal_float_pads":
        kw["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        _, kw["tgt_key_padding_mask"], _ = _masks("float_pad", g)
        _, kw["memory_key_padding_mask"], _ = _masks("bool_pad", g, Lk=Lm)
    want = layer(tgt, mem, **kw)
    got = ours(tgt, mem, **kw)
    assert_close(got, want, rel=1e-10, name="decoder out")
    if mode == "train":
        w = torch.randn_like(want)
        want_g = torch.autograd.grad((want * w).sum(), [tgt, mem])
        got_g = torch.autograd.grad((got * w).sum(), [tgt, mem])
        for name, a, b in zip(("dtgt", "dmem"), got_g, want_g):
            assert_close(a, b, rel=1e-10, name=name)


def test_whole_transformer_and_nested_tensor_encoder():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Transformer(
        E, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=31, dropout=0.0,
        batch_first=True, dtype=torch.float32,
    )  # fmt: skip
    assert model.encoder.use_nested_tensor  # the fast nested path is on for MultiheadAttention
    ours = replace_multihead_attention(copy.deepcopy(model))
    assert not ours.encoder.use_nested_tensor
    assert sum(isinstance(m, RollingQAttention) for m in ours.modules()) == 6
    src = torch.randn(B, 8, E, generator=g)
    tgt = torch.randn(B, L, E, generator=g)
    pad = torch.zeros(B, 8, dtype=torch.bool)
    pad[1, 5:] = True  # right padding: what the nested-tensor path needs
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    kw = dict(src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_mask=causal,
              tgt_is_causal=True)  # fmt: skip
    for mode in ("train", "eval"):
        model.train(mode == "train"), ours.train(mode == "train")
        with torch.no_grad():
            want = model(src, tgt, **kw)
            got = ours(src, tgt, **kw)
        assert_close(got, want, rel=2e-5, name=f"nn.Transformer {mode}")
    # a nested tensor reaching the module is refused with the remedy
    with pytest.raises(TypeError, match="use_nested_tensor"):
        ours.encoder.layers[0].self_attn(torch.nested.nested_tensor([src[0], src[1, :5]]))


@pytest.mark.parametrize("kdim,vdim", [(16, 24), (24, 10), (12, 12)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_kdim_vdim(kdim, vdim, need_weights):
    g = torch.Generator().manual_seed(kdim + vdim)
    torch.manual_seed(kdim)
    mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=True, dtype=F64)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    assert not mha._qkv_same_embed_dim
    ours = RollingQAttention.from_multihead_attention(mha)
    assert not ours._qkv_same_embed_dim and ours.in_proj_weight is None
    assert (ours.kdim, ours.vdim) == (kdim, vdim)
    q = torch.randn(B, L, E, generator=g, dtype=F64)
    k = torch.randn(B, 9, kdim, generator=g, dtype=F64)
    v = torch.randn(B, 9, vdim, generator=g, dtype=F64)
    pad = torch.rand(B, 9, generator=g) < 0.3
    pad[:, 0] = False
    want = mha(q, k, v, key_padding_mask=pad, need_weights=need_weights)
    got = ours(q, k, v, key_padding_mask=pad, need_weights=need_weights)
    assert_close(got[0], want[0], rel=1e-12, name="out")
    if need_weights:
        assert_close(got[1], want[1], rel=1e-12, name="weights")
    else:
        assert got[1] is None and want[1] is None
    back = ours.to_multihead_attention()
    assert back.state_dict().keys() == mha.state_dict().keys()
    assert_close(back(q, k, v, key_padding_mask=pad)[0], want[0], rel=1e-12, name="round trip")


def test_weights_with_causal_hint_and_unbatched_input():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    ours = RollingQAttention.from_multihead_attention(mha)
    x = torch.randn(B, L, E, generator=g, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    for avg in (True, False):
        want = mha(x, x, x, attn_mask=causal, is_causal=True, average_attn_weights=avg)
        got = ours(x, x, x, attn_mask=causal, is_causal=True, average_attn_weights=avg)
        assert_close(got[0], want[0], rel=1e-12, name="out")
        assert_close(got[1], want[1], rel=1e-12, name=f"weights avg={avg}")
    # is_causal alone: the causal mask (nn.MultiheadAttention insists on attn_mask)
    alone, _ = ours(x, need_weights=False, is_causal=True)
    assert_close(alone, mha(x, x, x, attn_mask=causal)[0], rel=1e-12, name="is_causal alone")
    # unbatched (L, E) with a per-head (H, L, L) mask
    xu = x[0]
    hm = torch.randn(H, L, L, generator=g, dtype=F64)
    for nw in (False, True):
        want = mha(xu, xu, xu, attn_mask=hm, need_weights=nw, average_attn_weights=False)
        got = ours(xu, xu, xu, attn_mask=hm, need_weights=nw, average_attn_weights=False)
        assert_close(got[0], want[0], rel=1e-12, name="unbatched out")
        if nw:
            assert got[1].shape == (H, L, L)
            assert_close(got[1], want[1], rel=1e-12, name="unbatched weights")


# ---- attention dropout in training ----------------------------------------------------------


@pytest.mark.parametrize("state", ["kernels", "fused_everywhere"])
def test_dropout_is_the_keep_mask_on_both_paths(state):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    p = 0.3
    mod = RollingQAttention(E, H, dropout=p, dtype=F64).train()
    with torch.no_grad():
        mod.in_proj_bias.normal_()
    x = torch.randn(B, L, E, generator=g, dtype=F64, requires_grad=True)
    pad = torch.rand(B, L, generator=g) < 0.3
    pad[:, 0] = False
    ctx = fused_everywhere() if state == "fused_everywhere" else _null()
    with ctx:
        torch.manual_seed(123)
        fused, none = mod(x, key_padding_mask=pad, need_weights=False)
        torch.manual_seed(123)
        again, _ = mod(x, key_padding_mask=pad, need_weights=False)
        torch.manual_seed(123)
        with_w, weights = mod(x, key_padding_mask=pad, average_attn_weights=False)
        other, _ = mod(x, key_padding_mask=pad, need_weights=False)
    assert none is None
    assert torch.equal(fused, again)  # same seed, same keep-mask
    assert not torch.allclose(fused, other)  # next draw, other mask
    assert_close(fused, with_w, rel=1e-12, name="fused vs weights path")
    # the weights are softmax * keep / (1 - p), keep = the keep-mask of the seed drawn
    torch.manual_seed(123)
    keep = dropout_keep_mask(new_rng_state(), p, (B, H, L, L))
    with torch.no_grad():
        mod.eval()
        _, clean = mod(x, key_padding_mask=pad, average_attn_weights=False)
        mod.train()
    assert_close(weights, clean * keep / (1 - p), rel=1e-12, name="dropped weights")
    w = torch.randn_like(fused)
    (gx_fused,) = torch.autograd.grad((fused * w).sum(), x)
    (gx_weights,) = torch.autograd.grad((with_w * w).sum(), x)
    assert_close(gx_fused, gx_weights, rel=1e-10, name="dx through dropout")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_training_with_dropout_is_reproducible_and_learns():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, L, E, generator=g)
    target = torch.randn(8, L, E, generator=g)

    def run(seed):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
        layer = replace_multihead_attention(layer).train()
        assert layer.self_attn.dropout == 0.1
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        torch.manual_seed(seed)
        losses = []
        for _ in range(6):
            loss = ((layer(x) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    a, b, c = run(1), run(1), run(2)
    assert a == b  # the same seed: the same dropout masks, the same training run
    assert a != c
    assert a[-1] < a[0]


def test_compiles_inside_an_encoder_layer():
    import torch._dynamo

    torch._dynamo.reset()
    layer, ours = _encoder_pair(True, dtype=torch.float32)
    ours.eval()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, L, E, generator=g)
    _, pad, _ = _masks("bool_pad", g)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x, src_key_padding_mask=pad)
        want = ours(x, src_key_padding_mask=pad)
    assert_close(got, want, rel=1e-6, name="compiled layer")
