"""Bad input raises a TypeError / ValueError that names the argument, never a crash or a wrong
answer; the registry explains why a backend cannot run."""

import pytest
import torch

import rollingq_kernels as rk
from rollingq_kernels import NoBackendError, rolling_attention

B, H, LQ, LK, D = 2, 3, 5, 6, 8


def _good():
    return dict(
        q=torch.randn(B, H, LQ, D),
        k=torch.randn(B, H, LK, D),
        v=torch.randn(B, H, LK, 4),
    )


def _call(**over):
    args = _good()
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return rolling_attention(q, k, v, **args)


BAD = [
    # (overrides, exception, words the message must contain)
    (dict(q=[[1.0]]), TypeError, ["q", "torch.Tensor"]),
    (dict(q=torch.randn(B, LQ, D)), ValueError, ["q", "(B, H, Lq, D)", f"({B}, {LQ}, {D})"]),
    (dict(k=torch.randn(B, H, LK)), ValueError, ["k", "(B, Hkv, Lk, D)"]),
    (dict(k=torch.randn(B, H + 1, LK, D)), ValueError, ["k", "4 heads", "enable_gqa"]),
    (
        dict(k=torch.randn(B, 2, LK, D), v=torch.randn(B, 2, LK, 4), enable_gqa=True),
        ValueError,
        ["k", "divisor", "(2, 2, 6, 8)"],
    ),
    (dict(enable_gqa=1), TypeError, ["enable_gqa", "bool"]),
    (dict(k=torch.randn(B, H, LK, D + 1)), ValueError, ["k", f"({B}, {H}, {LK}, {D + 1})"]),
    (dict(v=torch.randn(B, H, LK + 1, 4)), ValueError, ["v", f"({B}, {H}, {LK}, Dv)"]),
    (dict(v=torch.randn(B + 1, H, LK, 4)), ValueError, ["v"]),
    (dict(k=torch.randn(B, H, LK, D, dtype=torch.float64)), TypeError, ["k", "float64", "float32"]),
    (
        dict(
            q=torch.randn(B, H, LQ, D).int(),
            k=torch.randn(B, H, LK, D).int(),
            v=torch.randn(B, H, LK, 4).int(),
        ),
        TypeError,
        ["q", "int32"],
    ),
    (
        dict(rotation=torch.eye(D + 1)),
        ValueError,
        ["rotation", f"({D}, {D})", f"({D + 1}, {D + 1})"],
    ),
    (dict(rotation=torch.eye(D)[:, :3]), ValueError, ["rotation", f"({D}, 3)"]),
    (dict(rotation=torch.eye(D).expand(H + 1, D, D)), ValueError, ["rotation", f"({H}, {D}, {D})"]),
    (dict(rotation=torch.eye(D, dtype=torch.int64)), TypeError, ["rotation", "floating"]),
    (
        dict(rotated_queries=torch.ones(LQ, dtype=torch.bool)),
        ValueError,
        ["rotated_queries", "rotation"],
    ),
    (
        dict(rotation=torch.eye(D), rotated_queries=torch.ones(LQ + 1, dtype=torch.bool)),
        ValueError,
        ["rotated_queries", f"({LQ},)", f"({LQ + 1},)"],
    ),
    (
        dict(rotation=torch.eye(D), rotated_queries=torch.ones(LQ)),
        TypeError,
        ["rotated_queries", "bool"],
    ),
    (
        dict(key_modality=torch.zeros(LK + 1, dtype=torch.long)),
        ValueError,
        ["key_modality", f"({LK},)"],
    ),
    (dict(key_modality=torch.zeros(LK)), TypeError, ["key_modality", "integer"]),
    (
        dict(key_modality=torch.tensor([0, 1, 2, 0, 1, 2]), num_modalities=2),
        ValueError,
        ["key_modality", "[-1, 1]", "[0, 2]"],
    ),
    (dict(key_modality=torch.tensor([0, 1, -2, 0, 1, 1])), ValueError, ["key_modality", "-2"]),
    (dict(num_modalities=0), ValueError, ["num_modalities", "[1,", "got 0"]),
    (dict(num_modalities=2**32 + 1), ValueError, ["num_modalities", "2**31"]),
    (
        dict(key_modality=torch.zeros(LK, dtype=torch.complex128)),
        TypeError,
        ["key_modality", "integer"],
    ),
    (dict(key_modality=torch.zeros(LK, dtype=torch.bool)), TypeError, ["key_modality", "integer"]),
    (dict(attn_mask=torch.ones(LQ, LK, dtype=torch.int32)), TypeError, ["attn_mask", "int32"]),
    (
        dict(attn_mask=torch.ones(LQ, LK, dtype=torch.float64)),
        TypeError,
        ["attn_mask", "float64", "float32"],
    ),
    (
        dict(attn_mask=torch.ones(LQ + 1, LK, dtype=torch.bool)),
        ValueError,
        ["attn_mask", f"({B}, {H}, {LQ}, {LK})", f"({LQ + 1}, {LK})"],
    ),
    (dict(attn_mask=torch.ones(1, 1, 1, 1, 1, dtype=torch.bool)), ValueError, ["attn_mask"]),
    (dict(attn_mask=[[True]]), TypeError, ["attn_mask", "list"]),
    (
        dict(attn_mask=torch.ones(LQ, LK, dtype=torch.bool), is_causal=True),
        ValueError,
        ["attn_mask", "is_causal"],
    ),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p", "[0, 1)"]),
    (dict(dropout_p="0.1"), TypeError, ["dropout_p"]),
    (
        dict(dropout_p=0.1, rng_state=torch.zeros(3, dtype=torch.int64)),
        ValueError,
        ["rng_state", "(2,)"],
    ),
    (
        dict(dropout_p=0.1, rng_state=torch.zeros(2, dtype=torch.int32)),
        ValueError,
        ["rng_state", "int64"],
    ),
    (dict(num_modalities=2.0), TypeError, ["num_modalities"]),
    (dict(key_padding_mask=torch.ones(B, LK)), TypeError, ["key_padding_mask", "bool"]),
    (
        dict(key_padding_mask=torch.ones(B, LK + 1, dtype=torch.bool)),
        ValueError,
        ["key_padding_mask", f"({B}, {LK})", f"({B}, {LK + 1})"],
    ),
    (dict(key_padding_mask=torch.ones(LK, dtype=torch.bool)), ValueError, ["key_padding_mask"]),
    (dict(is_causal=1), TypeError, ["is_causal", "bool"]),
    (dict(scale="0.1"), TypeError, ["scale"]),
    (dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    (dict(return_stats=None), TypeError, ["return_stats"]),
    (dict(backend="flash"), ValueError, ["backend", "flash"]),
    (dict(backend=3), TypeError, ["backend", "str"]),
]


@pytest.mark.parametrize("over,exc,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_named_error(over, exc, words):
    with pytest.raises(exc) as info:
        _call(**over)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"


@pytest.mark.skipif(not hasattr(torch, "device"), reason="torch without devices")
def test_device_mismatch_names_argument():
    # The meta device stands in for "another device": validation must refuse it before any kernel.
    args = _good()
    with pytest.raises(ValueError, match="k is on meta"):
        rolling_attention(args["q"], args["k"].to("meta"), args["v"])
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        rolling_attention(
            args["q"],
            args["k"],
            args["v"],
            key_padding_mask=torch.ones(B, LK, dtype=torch.bool, device="meta"),
        )


def test_named_backend_that_cannot_run_raises_with_reasons():
    args = _good()
    # the triton backend runs on CUDA tensors only; CPU tensors must be refused with the reason
    with pytest.raises(NoBackendError, match="triton"):
        rolling_attention(args["q"], args["k"], args["v"], backend="triton")


def test_auto_falls_back_and_env_override(monkeypatch):
    args = _good()
    want = rk.rolling_attention_reference(args["q"], args["k"], args["v"])
    out = rolling_attention(args["q"], args["k"], args["v"])
    assert torch.allclose(out, want, atol=1e-6)
    monkeypatch.setenv("ROLLINGQ_BACKEND", "triton")
    with pytest.raises(NoBackendError, match="triton"):
        rolling_attention(args["q"], args["k"], args["v"])
    monkeypatch.setenv("ROLLINGQ_BACKEND", "reference")
    out = rolling_attention(args["q"], args["k"], args["v"])
    assert torch.allclose(out, want, atol=1e-6)


def test_backend_status_lists_every_backend():
    status = rk.backend_status()
    assert set(status) >= {"reference", "cpu", "triton", "cuda"}
    assert status["reference"] == []


def test_empty_problems_give_empty_or_zero_results():
    q = torch.randn(2, 3, 0, 8)
    k = torch.randn(2, 3, 5, 8)
    v = torch.randn(2, 3, 5, 4)
    out, st = rolling_attention(q, k, v, return_stats=True)
    assert out.shape == (2, 3, 0, 4) and st.modality_mass.shape == (2, 3, 0, 1)
    q = torch.randn(2, 3, 4, 8)
    out, st = rolling_attention(q, k[:, :, :0], v[:, :, :0], return_stats=True)
    assert out.shape == (2, 3, 4, 4) and torch.all(out == 0)
    assert torch.all(st.lse == float("-inf")) and torch.all(st.modality_mass == 0)


def test_causal_bias_of_other_lengths_is_refused():
    from torch.nn.attention.bias import causal_lower_right

    with pytest.raises(ValueError, match=r"CausalBias for Lq=4, Lk=6; the inputs have Lq=5"):
        _call(attn_mask=causal_lower_right(4, LK))
    with pytest.raises(ValueError, match="not both"):
        _call(attn_mask=causal_lower_right(LQ, LK), is_causal=True)


def test_backend_registered_from_outside_is_usable_by_name():
    from rollingq_kernels.backends import _REGISTRY, BackendSpec, Features, register_backend

    spec = BackendSpec(
        name="mine",
        module="rollingq_kernels._reference_backend",
        dtypes={"cpu": frozenset({torch.float32})},
        features=Features(),
        auto=False,
    )
    register_backend(spec)
    try:
        args = _good()
        out = rolling_attention(args["q"], args["k"], args["v"], backend="mine")
        want = rk.rolling_attention_reference(args["q"], args["k"], args["v"])
        torch.testing.assert_close(out, want)
        # its declared features are enforced: a bool mask is refused by name
        with pytest.raises(NoBackendError, match="mine.*no bool attn_mask"):
            rolling_attention(
                args["q"], args["k"], args["v"], backend="mine",
                attn_mask=torch.ones(LQ, LK, dtype=torch.bool),
            )  # fmt: skip
        assert "mine" in rk.backends.backend_table()
    finally:
        del _REGISTRY["mine"]
        rk.backends._AUTO_CACHE.clear()
