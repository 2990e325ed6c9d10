"""The oracle itself: against torch's SDPA, brute-force statistics, and the stated rules."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_case, nan_poisoned_outputs, random_orthogonal

import rollingq_kernels as rk
from rollingq_kernels import rolling_attention, rolling_attention_reference


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "Lq,Lk,D", [(1, 1, 8), (7, 7, 40), (129, 129, 64), (7, 13, 96), (13, 7, 8)]
)
def test_matches_torch_sdpa(causal, Lq, Lk, D):
    c = make_case(
        2, 3, Lq, Lk, D, dtype=torch.float64, causal=causal, return_stats=False, layout="blhd"
    )
    out = rolling_attention_reference(c.q, c.k, c.v, is_causal=causal)
    # SDPA gives NaN for rows with no visible key (causal with Lq > Lk cannot happen top-left:
    # row i always sees key 0), so a plain comparison is valid here.
    want = F.scaled_dot_product_attention(c.q, c.k, c.v, is_causal=causal)
    assert_close(out, want, rel=1e-12, name="out")


def test_key_padding_matches_sdpa_bool_mask():
    c = make_case(3, 2, 9, 11, 16, padding=True, return_stats=False)
    pad = c.kwargs["key_padding_mask"]
    out = rolling_attention_reference(c.q, c.k, c.v, key_padding_mask=pad)
    want = F.scaled_dot_product_attention(c.q, c.k, c.v, attn_mask=pad[:, None, None, :])
    # sample 0 has no visible key: we give zeros (older SDPA versions give NaN there)
    assert torch.all(out[0] == 0)
    assert_close(out[1:], want[1:], rel=1e-12, name="out")


def test_scale_argument():
    c = make_case(1, 2, 5, 6, 8, return_stats=False)
    out = rolling_attention_reference(c.q, c.k, c.v, scale=0.3)
    want = F.scaled_dot_product_attention(c.q, c.k, c.v, scale=0.3)
    assert_close(out, want, rel=1e-12, name="out")


@pytest.mark.parametrize("rotation", ["shared", "per_head"])
@pytest.mark.parametrize("rows", ["all", "subset", "batch"])
def test_rotation_equals_prerotated_queries(rotation, rows):
    c = make_case(2, 3, 9, 10, 8, rotation=rotation, rows=rows, return_stats=False)
    R = c.kwargs["rotation"].double()
    sel = c.kwargs.get("rotated_queries")
    out = rolling_attention_reference(c.q, c.k, c.v, rotation=R, rotated_queries=sel)
    # rotate by hand, row by row: q_i <- R q_i
    q = c.q.clone()
    for b in range(2):
        for h in range(3):
            Rh = R if R.dim() == 2 else R[h]
            for i in range(9):
                chosen = sel is None or (sel[i] if sel.dim() == 1 else sel[b, i])
                if chosen:
                    q[b, h, i] = Rh @ c.q[b, h, i]
    want = F.scaled_dot_product_attention(q, c.k, c.v)
    assert_close(out, want, rel=1e-12, name="out")


def _brute_force_stats(c):
    """Every statistic from an explicit softmax, with plain Python loops over modalities."""
    kw = c.kwargs
    B, H, Lq, D = c.q.shape
    Lk = c.k.shape[2]
    M = kw["num_modalities"]
    ids = kw["key_modality"]
    pad = kw.get("key_padding_mask", torch.ones(B, Lk, dtype=torch.bool))
    q = rk.reference.apply_rotation(
        c.q,
        kw.get("rotation", None) if kw.get("rotation") is None else kw["rotation"].double(),
        kw.get("rotated_queries"),
    )
    s = q @ c.k.transpose(-1, -2) / math.sqrt(D)
    vis = pad[:, None, None, :].expand(B, H, Lq, Lk).clone()
    if kw.get("is_causal"):
        vis &= torch.ones(Lq, Lk, dtype=torch.bool).tril()
    mass = torch.zeros(B, H, Lq, M, dtype=torch.float64)
    lse = torch.full((B, H, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                js = [j for j in range(Lk) if vis[b, h, i, j]]
                if not js:
                    continue
                row = s[b, h, i, js]
                lse[b, h, i] = torch.logsumexp(row, 0)
                p = torch.softmax(row, 0)
                for n, j in enumerate(js):
                    if ids[b, j] >= 0:
                        mass[b, h, i, ids[b, j]] += p[n]
    key_sum = torch.zeros(B, H, M, D, dtype=torch.float64)
    key_count = torch.zeros(B, M, dtype=torch.float64)
    for b in range(B):
        for j in range(Lk):
            if pad[b, j] and ids[b, j] >= 0:
                key_sum[b, :, ids[b, j]] += c.k[b, :, j]
                key_count[b, ids[b, j]] += 1
    return mass, key_sum, key_count, lse


@pytest.mark.parametrize(
    "opts",
    [
        dict(modalities=2),
        dict(modalities=3, padding=True),
        dict(modalities=2, causal=True, rotation="per_head", rows="subset"),
        dict(modalities=3, padding=True, causal=True, rotation="shared"),
    ],
    ids=["m2", "m3-pad", "m2-causal-rot", "m3-pad-causal-rot"],
)
def test_stats_match_brute_force(opts):
    c = make_case(2, 2, 6, 9, 8, **opts)
    kw = dict(c.kwargs)
    if "rotation" in kw:
        kw["rotation"] = kw["rotation"].double()
    with nan_poisoned_outputs():
        out, st = rolling_attention_reference(c.q, c.k, c.v, **kw)
    mass, key_sum, key_count, lse = _brute_force_stats(c)
    assert_close(st.modality_mass, mass, rel=1e-12, name="mass")
    assert_close(st.key_sum, key_sum, rel=1e-12, name="key_sum")
    assert torch.equal(st.key_count, key_count)
    assert_close(st.lse, lse, rel=1e-12, name="lse")
    assert not torch.isnan(out).any()


def test_row_rules_mass_sums_and_empty_rows():
    c = make_case(3, 2, 8, 12, 8, modalities=2, padding=True, causal=True)
    out, st = rolling_attention(c.q, c.k, c.v, **c.kwargs, backend="reference")
    ids = c.kwargs["key_modality"]
    pad = c.kwargs["key_padding_mask"]
    # mass on -1 keys, computed from an explicit softmax
    B, H, Lq, D = c.q.shape
    s = c.q @ c.k.transpose(-1, -2) / math.sqrt(D)
    vis = pad[:, None, None, :] & torch.ones(Lq, 12, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    cls_mass = (p * (ids == -1)[:, None, None, :]).sum(-1)
    seen = vis.any(-1).expand(B, H, Lq)
    total = st.modality_mass.sum(-1)
    assert torch.allclose(total[seen], 1.0 - cls_mass[seen], atol=1e-12)
    # sample 0 sees nothing: zeros, zero mass, lse = -inf, never NaN
    assert torch.all(out[0] == 0) and torch.all(st.modality_mass[0] == 0)
    assert torch.all(st.lse[0] == -math.inf)
    assert torch.isfinite(out).all() and not torch.isnan(st.lse).any()


def test_dtypes_of_outputs_and_stats():
    c = make_case(1, 2, 5, 5, 8, dtype=torch.bfloat16, modalities=2)
    out, st = rolling_attention_reference(c.q, c.k, c.v, **c.kwargs)
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in st)
    c = make_case(1, 2, 5, 5, 8, dtype=torch.float64, modalities=2)
    out, st = rolling_attention_reference(c.q, c.k, c.v, **c.kwargs)
    assert all(t.dtype == torch.float64 for t in st)


def test_num_modalities_inferred():
    c = make_case(2, 1, 4, 6, 8, modalities=3)
    kw = dict(c.kwargs)
    kw.pop("num_modalities")
    _, st = rolling_attention(c.q, c.k, c.v, **kw)
    assert st.modality_mass.shape[-1] == int(c.kwargs["key_modality"].max()) + 1


def test_gradcheck_through_rotation_and_masks():
    c = make_case(
        1,
        2,
        5,
        6,
        4,
        rotation="per_head",
        rows="subset",
        padding=False,
        causal=True,
        modalities=2,
        return_stats=False,
    )
    kw = dict(c.kwargs)
    kw["rotation"] = kw["rotation"].double()
    pad = torch.ones(1, 6, dtype=torch.bool)
    pad[0, 3] = False
    kw["key_padding_mask"] = pad
    f = lambda q, k, v: rolling_attention(q, k, v, **kw, backend="reference")
    c.requires_grad_()
    assert torch.autograd.gradcheck(f, (c.q, c.k, c.v))


def test_gradient_through_rotation_is_dq_rot_times_R():
    c = make_case(1, 1, 4, 5, 6, rotation="shared", return_stats=False)
    R = c.kwargs["rotation"].double()
    q = c.q.clone().requires_grad_()
    out = rolling_attention_reference(q, c.k, c.v, rotation=R)
    g = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, g)
    qr = (c.q @ R.T).requires_grad_()
    (dq_rot,) = torch.autograd.grad(F.scaled_dot_product_attention(qr, c.k, c.v), qr, g)
    assert_close(dq, dq_rot @ R, rel=1e-12, name="dq")


def test_key_modality_from_lengths():
    ids = rk.key_modality_from_lengths((1, 512, 588), (False, True, True))
    assert ids.shape == (1101,)
    assert ids[0] == -1 and torch.all(ids[1:513] == 0) and torch.all(ids[513:] == 1)
    assert torch.equal(rk.key_modality_from_lengths((2, 1)), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="counted"):
        rk.key_modality_from_lengths((1, 2), (True,))


def test_random_orthogonal_helper_is_orthogonal():
    R = random_orthogonal(7, 3, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(-1, -2), eye.expand(3, 7, 7), atol=1e-12)


def test_torch_compile_fullgraph_through_validation_and_dispatch():
    # Validation, dispatch and the reference must trace without a graph break.
    c = make_case(2, 2, 7, 9, 8, rotation="shared", rows="subset", modalities=2, padding=True)
    kw = dict(c.kwargs)

    def f(q, k, v):
        out, st = rolling_attention(q, k, v, **kw, backend="reference")
        return out, st.modality_mass

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    out, mass = compiled(c.q, c.k, c.v)
    want_out, want_st = rolling_attention_reference(c.q, c.k, c.v, **kw)
    assert_close(out, want_out, rel=1e-12, name="out")
    assert_close(mass, want_st.modality_mass, rel=1e-12, name="mass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_whose_keys_all_carry_finfo_min_attends_uniformly_like_sdpa(dtype):
    # transformers hides keys with finfo(float32).min added to the scores; a row where every key
    # carries it has scores that vanish next to the mask, so SDPA gives the mean of the values.
    # lse = m + log(sum) rounds back to m there: weights exp(s - lse) would all be 1 (the sum).
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype)
    mask[0] = torch.finfo(torch.float32).min
    mask[1, ..., 3] = torch.finfo(torch.float32).min
    out, st = rolling_attention_reference(q, k, v, attn_mask=mask, return_stats=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out[0], v[0].mean(dim=1, keepdim=True).expand_as(out[0]))
    assert bool(torch.isfinite(st.lse).all())
