"""attn_implementation="rollingq" in Hugging Face transformers, against attn_implementation="sdpa".

Tiny models from configs with random weights (nothing downloaded, HF offline): ViT, CLIP, BERT
with padding, a Llama-like decoder with grouped KV heads and generation with a KV cache. Each test
runs in two states: "kernels" (the package as it is: a call no fused kernel runs goes to torch's
SDPA) and "fused_everywhere" (every such call runs through this package's path on the reference,
see fused_everywhere.py), so the glue is checked whatever the kernels support today.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from fused_everywhere import fused_everywhere  # noqa: E402
from helpers import assert_close, rel_l2  # noqa: E402

import rollingq_kernels as rk  # noqa: E402
from rollingq_kernels.integrations import transformers as rq_hf  # noqa: E402
from rollingq_kernels.reference import rolling_attention_reference  # noqa: E402

transformers.logging.set_verbosity_error()
NAME = rq_hf.register()
STATES = ["kernels", "fused_everywhere"]


def _state(state):
    return fused_everywhere() if state == "fused_everywhere" else contextlib.nullcontext()


# ---- tiny models ----------------------------------------------------------------------------

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _vit(**over):
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, **{**SMALL, **over})
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def _bert(**over):
    cfg = transformers.BertConfig(vocab_size=101, max_position_embeddings=40, **{**SMALL, **over})
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _clip(**over):
    text = dict(vocab_size=101, max_position_embeddings=20, bos_token_id=0, eos_token_id=2, **SMALL)
    vision = dict(image_size=16, patch_size=4, **SMALL)
    text.update(over)
    vision.update(over)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.CLIPModel(cfg)


def _llama(**over):
    cfg = transformers.LlamaConfig(
        vocab_size=101, max_position_embeddings=64, num_key_value_heads=2, pad_token_id=0,
        **{**SMALL, **over},
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


BUILDERS = {"vit": _vit, "bert": _bert, "clip": _clip, "llama": _llama}


def _inputs(name, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 16, 16, generator=g).to(dtype)
    ids = torch.randint(3, 101, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    if name == "vit":
        return {"pixel_values": pixels}
    if name == "llama":
        mask[1, :4] = 0  # left padding, as for generation
        mask[2, :2] = 0
        return {"input_ids": ids, "attention_mask": mask}
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    if name == "bert":
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _output(name, out):
    if name == "llama":
        return out.logits
    if name == "clip":
        return torch.cat([out.text_embeds, out.image_embeds], 0)
    return out.last_hidden_state


def _valid(name, inputs, t):
    # positions that are padding give values no one reads (and that differ between sdpa's
    # materialised masks and any other correct implementation): compare real tokens only
    if name in ("bert", "llama"):
        return t * inputs["attention_mask"][..., None].to(t.dtype)
    return t


def _pair(name, seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    sdpa = BUILDERS[name](**over).to(dtype)
    sdpa.set_attn_implementation("sdpa")
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation(NAME)
    assert ours.config._attn_implementation == NAME
    return sdpa, ours


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of this package's attention function and mask builder."""
    seen = {"attention": 0, "mask": 0}
    attn, mask = rq_hf.attention_forward, rq_hf.mask_function

    def counted_attention(*a, **k):
        seen["attention"] += 1
        return attn(*a, **k)

    def counted_mask(*a, **k):
        seen["mask"] += 1
        return mask(*a, **k)

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, counted_attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, NAME, counted_mask)
    return seen


# ---- eval: the same outputs as sdpa ---------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_eval_matches_sdpa_fp32(name, state, calls):
    sdpa, ours = _pair(name, seed=1)
    sdpa.eval(), ours.eval()
    inputs = _inputs(name, seed=2)
    with torch.no_grad(), _state(state):
        want = _valid(name, inputs, _output(name, sdpa(**inputs)))
        got = _valid(name, inputs, _output(name, ours(**inputs)))
    assert calls["attention"] >= 2  # both layers (of each tower) ran through this package
    if name != "vit":
        assert calls["mask"] >= 1
    assert_close(got, want, rel=1e-5, name=f"{name} {state}")


def test_padding_reaches_the_attention():
    # transformers builds masks only for names in its mask interface: without the registered
    # mask builder padding would be dropped silently. It must make a difference here.
    sdpa, ours = _pair("bert", seed=3)
    sdpa.eval(), ours.eval()
    inputs = _inputs("bert", seed=4)
    with torch.no_grad():
        got = ours(**inputs).last_hidden_state
        unpadded = ours(input_ids=inputs["input_ids"]).last_hidden_state
        want = sdpa(**inputs).last_hidden_state
    keep = inputs["attention_mask"][..., None]
    assert rel_l2(got * keep, unpadded * keep) > 1e-3  # 100x the parity tolerance
    assert_close(got * keep, want * keep, rel=1e-5, name="padded bert")


def test_padding_only_mask_is_a_broadcast_view():
    from transformers.masking_utils import bidirectional_mask_function

    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for skip in (False, True):
        m = rq_hf.mask_function(
            2, 4, 4, mask_function=bidirectional_mask_function, attention_mask=pad,
            allow_is_bidirectional_skip=skip,
        )  # fmt: skip
        assert m.shape == (2, 1, 1, 4) and m.dtype == torch.bool
        assert torch.equal(m[:, 0, 0], pad.bool())
    # no padding at all: no mask where transformers' sdpa builder gives none
    ones = torch.ones(2, 4, dtype=torch.long)
    kw = dict(mask_function=bidirectional_mask_function, attention_mask=ones)
    assert rq_hf.mask_function(2, 4, 4, allow_is_bidirectional_skip=True, **kw) is None
    assert rq_hf.mask_function(2, 4, 4, **kw).all()


@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_eval_matches_sdpa_bf16_by_the_2x_rule(name):
    sdpa, ours = _pair(name, seed=5)
    ref = copy.deepcopy(sdpa).double().eval()
    sdpa, ours = sdpa.to(torch.bfloat16).eval(), ours.to(torch.bfloat16).eval()
    inputs = _inputs(name, seed=6)
    with torch.no_grad():
        want = _valid(name, inputs, _output(name, ref(**_cast(inputs, torch.float64))))
        low = _valid(name, inputs, _output(name, sdpa(**_cast(inputs, torch.bfloat16))))
        for state in STATES:
            with _state(state):
                got = _valid(name, inputs, _output(name, ours(**_cast(inputs, torch.bfloat16))))
            err = (got.double() - want).abs().max().item()
            bound = 2 * (low.double() - want).abs().max().item() + 1e-3
            assert err <= bound, f"{name} {state}: bf16 error {err:.3e} > 2x sdpa's ({bound:.3e})"


def _cast(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


# ---- generation with a KV cache (grouped-query attention) -----------------------------------


@pytest.mark.parametrize("state", STATES)
def test_llama_generate_with_kv_cache(state, calls):
    sdpa, ours = _pair("llama", seed=7)
    sdpa.eval(), ours.eval()
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads
    inputs = _inputs("llama", seed=8)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), _state(state):
        want = sdpa.generate(**inputs, **kw)
        n = calls["attention"]
        got = ours.generate(**inputs, **kw)
    assert calls["attention"] - n == 2 * 6  # prefill + 5 cached steps, 2 layers
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        # logits of left-padded rows are real (the last position is a real token)
        assert_close(a, b, rel=1e-5, name=f"{state} step {step} logits")


@pytest.mark.parametrize("state", STATES)
def test_llama_cached_chunk_is_bottom_right_causal(state):
    # a second chunk of several tokens against a filled cache: Lq < Lk with causality
    sdpa, ours = _pair("llama", seed=9)
    sdpa.eval(), ours.eval()
    ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(10))
    outs = []
    with torch.no_grad(), _state(state):
        for model in (sdpa, ours):
            first = model(input_ids=ids[:, :6], use_cache=True)
            second = model(input_ids=ids[:, 6:], cache=first.past_key_values)
            whole = model(input_ids=ids).logits[:, 6:]
            assert_close(second.logits, whole, rel=1e-5, name="chunked vs whole")
            outs.append(second.logits)
    assert_close(outs[1], outs[0], rel=1e-5, name=f"{state} cached chunk")


# ---- training: one step, and dropout --------------------------------------------------------


def _step(model, inputs, name, seed):
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    out = _valid(name, inputs, _output(name, model(**inputs)))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _dropout_config(name, p):
    if name == "llama":
        return dict(attention_dropout=p)
    return dict(attention_probs_dropout_prob=p, hidden_dropout_prob=0.0)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_training_step_matches_sdpa_without_dropout(name, state):
    over = _dropout_config(name, 0.0)
    sdpa, ours = _pair(name, seed=11, **over)
    inputs = _inputs(name, seed=12)
    with _state(state):
        out_s, grads_s = _step(sdpa, inputs, name, 0)
        out_o, grads_o = _step(ours, inputs, name, 0)
        assert_close(out_o, out_s, rel=1e-5, name="train out")
        assert grads_o.keys() == grads_s.keys()
        for n in grads_s:
            # atol: the key-bias gradient is zero in exact arithmetic (softmax is shift-invariant)
            assert_close(grads_o[n], grads_s[n], rel=2e-5, atol=1e-7, name=f"grad {n}")
        # one optimizer step, then the two models still agree
        for model in (sdpa, ours):
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
        model_outs = [_step(m, inputs, name, 1)[0] for m in (sdpa, ours)]
    assert_close(model_outs[1], model_outs[0], rel=1e-5, name="after one step")


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_training_with_attention_dropout(name, state):
    over = _dropout_config(name, 0.2)
    sdpa, ours = _pair(name, seed=13, **over)
    inputs = _inputs(name, seed=14)
    with _state(state):
        out_a, grads_a = _step(ours, inputs, name, 5)
        out_b, grads_b = _step(ours, inputs, name, 5)
        out_c, _ = _step(ours, inputs, name, 6)
        ours.eval()
        with torch.no_grad():
            clean = _valid(name, inputs, _output(name, ours(**inputs)))
        # the same seed gives the same keep-masks: identical outputs and gradients
        assert torch.equal(out_a, out_b)
        for n in grads_a:
            assert torch.equal(grads_a[n], grads_b[n]), n
        assert not torch.equal(out_a, out_c)  # another seed, other masks
        # statistically sane against sdpa's dropout: the same size of perturbation
        ours_dev = [rel_l2(_step(ours, inputs, name, s)[0], clean) for s in range(20, 23)]
        sdpa_dev = [rel_l2(_step(sdpa, inputs, name, s)[0], clean) for s in range(20, 23)]
    ratio = sum(ours_dev) / sum(sdpa_dev)
    assert 0.6 < ratio < 1.6, (ours_dev, sdpa_dev)
    for g in grads_a.values():
        assert torch.isfinite(g).all()


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,state", [("vit", "kernels"), ("bert", "fused_everywhere"), ("llama", "kernels")],
)  # fmt: skip
def test_compiles_without_graph_breaks(name, state):
    import torch._dynamo

    torch._dynamo.reset()
    _, ours = _pair(name, seed=15)
    ours.eval()
    inputs = _inputs(name, seed=16)
    with torch.no_grad(), _state(state):
        want = _output(name, ours(**inputs))
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        got = _output(name, compiled(**inputs))
    assert_close(_valid(name, inputs, got), _valid(name, inputs, want), rel=1e-6, name="compiled")


# ---- RollingQ statistics of chosen layers ---------------------------------------------------


@pytest.mark.parametrize("state", STATES)
def test_record_stats_of_chosen_layers(state, monkeypatch):
    sdpa, ours = _pair("bert", seed=17)
    sdpa.eval(), ours.eval()
    inputs = _inputs("bert", seed=18)
    ids = rk.key_modality_from_lengths((1, 5, 5), (False, True, True))  # [CLS | m0 x5 | m1 x5]
    layer = "encoder.layer.1.attention.self"
    seen = []
    real = rq_hf.rolling_attention

    def spy(q, k, v, **kw):
        seen.append((q.detach(), k.detach(), v.detach(), kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(rq_hf, "rolling_attention", spy)
    with torch.no_grad(), _state(state):
        with rq_hf.record_stats(ours, ids, layers=[layer], num_modalities=2,
                                key_padding_mask=inputs["attention_mask"]) as rec:  # fmt: skip
            got = ours(**inputs).last_hidden_state
        want = sdpa(**inputs).last_hidden_state
        after = ours(**inputs).last_hidden_state
    keep = inputs["attention_mask"][..., None]
    assert_close(got * keep, want * keep, rel=1e-5, name="output while recording")
    assert_close(after * keep, want * keep, rel=1e-5, name="output after recording")
    assert len(seen) == 1 and list(rec.stats) == [layer]  # one layer, one call
    q, k, v, kw = seen[0]
    s = rec.stats[layer]
    ref_out, ref = rolling_attention_reference(
        q.double(), k.double(), v.double(), key_modality=ids, num_modalities=2,
        key_padding_mask=inputs["attention_mask"].bool(), attn_mask=kw["attn_mask"],
        return_stats=True,
    )  # fmt: skip
    assert_close(s.attention.modality_mass, ref.modality_mass, rel=2e-5, atol=1e-7, name="mass")
    assert_close(s.attention.key_sum, ref.key_sum, rel=2e-5, name="key_sum")
    assert torch.equal(s.attention.key_count.double(), ref.key_count)
    # padded keys count nowhere: sample 2 has tokens 0..2, i.e. [CLS] and two of modality 0
    assert s.attention.key_count[2].tolist() == [2.0, 0.0]
    B, H, _, D = q.shape
    assert torch.equal(s.query, q[:, :, 0].reshape(B, H * D))
    cos = rec.cosines(layer)
    assert cos.shape == (3, 2) and bool((cos.abs() <= 1 + 1e-6).all())
    means = ref.key_sum / ref.key_count.clamp_min(1)[:, None, :, None]
    full = means.permute(0, 2, 1, 3).reshape(B, 2, H * D)
    want_cos = torch.nn.functional.cosine_similarity(s.query.double()[:, None], full, dim=-1)
    want_cos[2, 1] = 0.0  # no key of modality 1 in sample 2
    assert_close(cos, want_cos, rel=1e-5, name="cosines")


def test_record_stats_names_unknown_layers():
    _, ours = _pair("bert", seed=19)
    with pytest.raises(ValueError, match="not attention modules"):
        with rq_hf.record_stats(ours, torch.zeros(11, dtype=torch.long), layers=["nope"]):
            pass
    with pytest.raises(TypeError, match="name"):
        rq_hf.register("")
