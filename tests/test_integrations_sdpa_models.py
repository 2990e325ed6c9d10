"""Models that call torch.nn.functional.scaled_dot_product_attention themselves, switched with
``patch_sdpa()``: a ViT written the way timm writes it (qkv linear, reshape / permute, SDPA with
dropout in training) and nn.MultiheadAttention(need_weights=False). timm itself is not a
dependency (it does not import beside the CPU torch), so its attention block is written here.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from fused_everywhere import fused_everywhere
from helpers import assert_close, rel_l2
from torch import nn

import rollingq_kernels as rk
from rollingq_kernels import api

STATES = ["kernels", "fused_everywhere"]


def _state(state):
    return fused_everywhere() if state == "fused_everywhere" else contextlib.nullcontext()


class Attention(nn.Module):
    """timm's vision_transformer.Attention, fused path."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=48, depth=2, num_heads=4, patch=4, image=16, attn_drop=0.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, attn_drop) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, img, attn_mask=None):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return self.norm(x)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that reach this package's drop-in while patch_sdpa() is active."""
    seen = []
    real = api.scaled_dot_product_attention

    def wrapper(*a, **k):
        seen.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(api, "scaled_dot_product_attention", wrapper)
    return seen


def _vit_pair(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyViT(**kw)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_timm_style_vit_eval(state, mask, counted):
    model, _ = _vit_pair(seed=1)
    model.eval()
    g = torch.Generator().manual_seed(2)
    img = torch.randn(3, 3, 16, 16, generator=g)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(3, 1, 1, 17, generator=g) < 0.8
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(1, 4, 17, 17, generator=g)
    with torch.no_grad():
        want = model(img, attn_mask)
        with rk.patch_sdpa(), _state(state):
            got = model(img, attn_mask)
    assert len(counted) == 2  # both blocks went through the drop-in
    assert_close(got, want, rel=1e-5, name=f"timm-style ViT {state} {mask}")


def test_timm_style_vit_bf16_by_the_2x_rule():
    model, _ = _vit_pair(seed=3)
    ref = copy.deepcopy(model).double().eval()
    low = model.to(torch.bfloat16).eval()
    img = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(img.double())
        torch_err = (low(img.bfloat16()).double() - want).abs().max().item()
        for state in STATES:
            with rk.patch_sdpa(), _state(state):
                got = low(img.bfloat16())
            err = (got.double() - want).abs().max().item()
            assert err <= 2 * torch_err + 1e-3, (state, err, torch_err)


@pytest.mark.parametrize("state", STATES)
def test_timm_style_vit_training_step(state):
    torch.manual_seed(5)
    plain = TinyViT()
    ours = copy.deepcopy(plain)
    img = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    w = torch.randn(4, 17, 48, generator=torch.Generator().manual_seed(7))
    (plain(img) * w).sum().backward()
    with rk.patch_sdpa(), _state(state):
        (ours(img) * w).sum().backward()
    for (n, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert_close(a.grad, b.grad, rel=2e-5, atol=1e-9, name=f"d{n}")


@pytest.mark.parametrize("state", STATES)
def test_timm_style_vit_attention_dropout(state):
    model, _ = _vit_pair(seed=8, attn_drop=0.2)
    img = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        clean = model(img)
    model.train()

    def run(seed, patched=True):
        torch.manual_seed(seed)
        ctx = rk.patch_sdpa() if patched else contextlib.nullcontext()
        with ctx, _state(state):
            out = model(img)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        return out.detach(), grads

    a, ga = run(1)
    b, gb = run(1)
    c, _ = run(2)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c)
    ours = sum(rel_l2(run(s)[0], clean) for s in range(10, 14))
    torch_dev = sum(rel_l2(run(s, patched=False)[0], clean) for s in range(10, 14))
    assert 0.6 < ours / torch_dev < 1.6, (ours, torch_dev)


# ---- nn.MultiheadAttention(need_weights=False) ----------------------------------------------


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("masks", ["none", "pad", "causal_pad", "float"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_need_weights_false(state, masks, batch_first, counted):
    torch.manual_seed(10)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 32, generator=g)
    x = x if batch_first else x.transpose(0, 1)
    x.requires_grad_()
    kw = {}
    if masks in ("pad", "causal_pad"):
        pad = torch.rand(3, 9, generator=g) < 0.3
        pad[:, 0] = False
        kw["key_padding_mask"] = pad
    if masks == "causal_pad":
        kw["attn_mask"] = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = not attended
    if masks == "float":
        kw["attn_mask"] = torch.randn(12, 9, 9, generator=g)
    want, _ = mha(x, x, x, need_weights=False, **kw)
    with rk.patch_sdpa(), _state(state):
        got, _ = mha(x, x, x, need_weights=False, **kw)
    assert len(counted) == 1
    assert_close(got, want, rel=1e-5, name="MultiheadAttention")
    w = torch.randn_like(want)
    (gw,) = torch.autograd.grad((want * w).sum(), x)
    (gg,) = torch.autograd.grad((got * w).sum(), x)
    assert_close(gg, gw, rel=2e-5, name="dx")


@pytest.mark.parametrize("state", STATES)
def test_multihead_attention_dropout_reproducible(state):
    torch.manual_seed(12)
    mha = nn.MultiheadAttention(32, 4, dropout=0.25, batch_first=True).train()
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(13))
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with rk.patch_sdpa(), _state(state):
            outs.append(mha(x, x, x, need_weights=False)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
