import plotly.graph_objects as go
import pytest
import torch

from mechcna import TokenizationError
from mechcna.analyses.attribution import (
    attention_neuron_importance,
    head_importance,
    layer_importance,
    neuron_importance,
)
from mechcna.analyses.capture import attention_coefficients, capture
from mechcna.engine.blocks import BlockCache, ffn_block
from mechcna.engine.projection import final_norm_state, project_to_vocab
from tests import reference
from tests.helpers import PROMPTS, build

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _unpadded(model, prompt):
    return model.to_tokens(prompt)[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["certified", "exact"])
def test_ffn_neurons_match_literal_reference(kind, dtype, method):
    model = build(kind, dtype=dtype)
    res = neuron_importance(model, PROMPTS, method=method)
    assert res.scores.shape == (3, model.cfg.n_layers, model.cfg.d_mlp)
    assert res.dims == ("prompt", "layer", "neuron")
    for i, prompt in enumerate(PROMPTS):
        ref, w = reference.literal_ffn_scores(model, _unpadded(model, prompt))
        assert int(res.target_ids[i]) == w
        torch.testing.assert_close(res.scores[i].to(ref), ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_neurons_match_literal_reference(kind, dtype):
    model = build(kind, dtype=dtype)
    res = attention_neuron_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tokens = _unpadded(model, prompt)
        ref, _ = reference.literal_attention_scores(model, tokens)
        n = len(tokens)
        torch.testing.assert_close(res.scores[i, :, :n].to(ref), ref, atol=TOL[dtype], rtol=0)
        assert torch.all(res.scores[i, :, n:] == 0)  # padding positions


def test_paper_compat_matches_reference(kind):
    model = build(kind, dtype=torch.float64)
    res = neuron_importance(model, PROMPTS[:1], paper_compat=True)
    ref, _ = reference.literal_ffn_scores(model, _unpadded(model, PROMPTS[0]), paper_compat=True)
    torch.testing.assert_close(res.scores[0], ref, atol=1e-10, rtol=0)
    if kind == "gpt2":  # LayerNorm bias and b_U matter for GPT-2
        default = neuron_importance(model, PROMPTS[:1])
        assert (default.scores - res.scores).abs().max() > 1e-6


def test_layers_and_heads_match_reference(kind):
    model = build(kind, dtype=torch.float64)
    layers = layer_importance(model, PROMPTS)
    heads = head_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tokens = _unpadded(model, prompt)
        ref, _ = reference.literal_layer_scores(model, tokens)
        torch.testing.assert_close(layers.scores[i], ref, atol=1e-10, rtol=0)
        ref_h, _ = reference.literal_head_scores(model, tokens)
        torch.testing.assert_close(heads.scores[i], ref_h, atol=1e-10, rtol=0)


def test_layer_scores_telescope(kind):
    model = build(kind, dtype=torch.float64)
    res = layer_importance(model, PROMPTS)
    assert res.final_logprob is not None and res.embedding_logprob is not None
    total = res.scores.sum((1, 2))
    torch.testing.assert_close(total, res.final_logprob - res.embedding_logprob, atol=1e-10, rtol=0)
    # the final log-prob is the model's own log-prob of its top-1 token
    for i, prompt in enumerate(PROMPTS):
        logits = model(prompt)[0, -1]
        expect = logits.log_softmax(-1)[int(res.target_ids[i])]
        torch.testing.assert_close(res.final_logprob[i], expect, atol=1e-10, rtol=0)


def test_neuron_contributions_sum_to_layer(kind):
    model = build(kind, dtype=torch.float64)
    cap = capture(model, PROMPTS)
    assert cap.post is not None
    for l in range(model.cfg.n_layers):
        total = cap.post[:, l] @ model.blocks[l].mlp.W_out + model.blocks[l].mlp.b_out
        torch.testing.assert_close(total, cap.mlp_out[:, l], atol=1e-10, rtol=0)
        coef = attention_coefficients(cap)[:, l]  # prompt pos head d_head
        vec = torch.einsum("bphk,hkd->bd", coef, model.blocks[l].attn.W_O)
        torch.testing.assert_close(
            vec + model.blocks[l].attn.b_O, cap.attn_out[:, l], atol=1e-10, rtol=0
        )
        assert cap.z is not None
        torch.testing.assert_close(coef.sum(1), cap.z[:, l], atol=1e-10, rtol=0)


def test_head_positions_sum_to_head_vectors(kind):
    model = build(kind, dtype=torch.float64)
    by_pos = head_importance(model, PROMPTS, by_position=True)
    assert by_pos.dims == ("prompt", "layer", "head", "pos")
    # a prompt whose head output comes from one position only scores the same either way
    single = head_importance(model, ["3"], by_position=True)
    plain = head_importance(model, ["3"])
    n = model.to_tokens("3").shape[1]
    if n == 1:
        torch.testing.assert_close(single.scores[..., 0], plain.scores, atol=1e-10, rtol=0)
    assert isinstance(by_pos.plot(), go.Figure)


def test_default_projection_reproduces_logits(kind):
    model = build(kind, dtype=torch.float64)
    tokens = model.to_tokens(PROMPTS[0])
    logits, cache = model.run_with_cache(tokens)
    state = final_norm_state(model, PROMPTS[0])
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    projected = project_to_vocab(model, final, state.scale[0])
    torch.testing.assert_close(projected, logits[0, -1], atol=1e-10, rtol=0)
    compat = project_to_vocab(model, final, state.scale[0], paper_compat=True)
    ref = reference.frozen_bs(model, final, state.scale[0], paper_compat=True)
    torch.testing.assert_close(compat, ref, atol=1e-10, rtol=0)


def test_target_override_and_errors():
    model = build("gpt2", dtype=torch.float64)
    res = neuron_importance(model, PROMPTS[:2], targets="8")
    eight = model.to_single_token("8")
    assert res.targets == ("8", "8") and res.target_ids.tolist() == [eight, eight]
    ref, _ = reference.literal_ffn_scores(model, _unpadded(model, PROMPTS[1]), target=eight)
    torch.testing.assert_close(res.scores[1], ref, atol=1e-10, rtol=0)
    with pytest.raises(TokenizationError, match="not a single token"):
        neuron_importance(model, PROMPTS[:1], targets="12")


def test_scored_position_option(kind):
    model = build(kind, dtype=torch.float64)
    res = neuron_importance(model, ["the sum of 3 and 5 is"], position=-2)
    tokens = _unpadded(model, "the sum of 3 and 5 is")[:-1]
    ref, _ = reference.literal_ffn_scores(model, tokens)
    torch.testing.assert_close(res.scores[0], ref, atol=1e-10, rtol=0)


def test_results_api(kind):
    model = build(kind)
    res = neuron_importance(model, PROMPTS)
    top = res.top(5, prompt=0)
    assert list(top.columns[:2]) == ["layer", "neuron"] and len(top) == 5
    assert top["score"].is_monotonic_decreasing
    flat = res.scores[0].flatten()
    assert top["score"].iloc[0] == pytest.approx(float(flat.max()))
    assert "coefficient" in top.columns
    frame = res.to_frame()
    assert len(frame) == res.scores.numel() and {"prompt", "layer", "neuron", "score"} <= set(frame)
    assert isinstance(res.plot(k=10), go.Figure)
    assert isinstance(layer_importance(model, PROMPTS).plot(0), go.Figure)
    assert isinstance(head_importance(model, PROMPTS).plot(), go.Figure)
    att = attention_neuron_importance(model, PROMPTS)
    assert list(att.top(3, prompt=1).columns[:4]) == ["layer", "pos", "head", "d_head"]


def test_block_cache_reuse_and_invalidation():
    model = build("gpt2", dtype=torch.float64)
    cache = BlockCache()
    neuron_importance(model, PROMPTS[:1], cache=cache)
    assert cache.misses == model.cfg.n_layers and cache.hits == 0
    neuron_importance(model, PROMPTS[1:], cache=cache)
    assert cache.hits == model.cfg.n_layers
    before = ffn_block(model, 0, cache).U.clone()
    with torch.no_grad():
        model.blocks[0].mlp.W_out.mul_(2.0)  # in-place edit must invalidate
    after = ffn_block(model, 0, cache)
    assert not torch.allclose(before, after.U)
    res = neuron_importance(model, PROMPTS[:1], cache=cache)
    ref, _ = reference.literal_ffn_scores(model, _unpadded(model, PROMPTS[0]))
    torch.testing.assert_close(res.scores[0], ref, atol=1e-10, rtol=0)
    no_cache = BlockCache(budget=0)
    neuron_importance(model, PROMPTS[:1], cache=no_cache)
    assert no_cache.nbytes == 0
