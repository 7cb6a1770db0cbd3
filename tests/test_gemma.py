"""Gemma 2 and Gemma 3 on tiny random checkpoints: sandwich norms, logit soft-capping, QK-norm,
local/global attention and embedding scaling, each against a slow literal computation.

The literal references here recompute everything from the modules' own weights: a post-norm's
scale is recomputed from the raw (pre-norm) layer output, the final norm's from the final
residual, and the soft cap is applied by hand, so none of mechcna's capture, projection or
engine code is reused.
"""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from mechcna import (
    UnsupportedArchitectureError,
    attention_neuron_importance,
    check_model,
    head_importance,
    layer_importance,
    load_model,
    neuron_importance,
)
from mechcna.analyses.comparative import compare_neurons
from mechcna.analyses.heads import head_sweep
from mechcna.analyses.methods import comparison_scores
from mechcna.errors import ModelCheckError
from mechcna.models.architecture import Architecture
from tests.gemma_reference import Literal
from tests.helpers import PROMPTS, llama_cfg, randomize_biases_and_norms, tokenizer

ATOL = 1e-10


def gemma_cfg(kind: str, **kw):
    """A tiny Gemma-2-like (sandwich norms, attention and final soft caps, local/global) or
    Gemma-3-like (sandwich norms, QK-norm, local/global with two RoPE bases) config."""
    fields: dict = dict(
        n_layers=3,
        act_fn="gelu_pytorch_tanh",
        use_normalization_before_and_after=True,
        use_local_attn=True,
        window_size=3,
        attn_types=["local", "global", "local"],
    )
    if kind == "gemma2":
        fields |= dict(
            attn_scores_soft_cap=2.0,
            output_logits_soft_cap=1.5,  # small, so the tanh bends every logit
            original_architecture="Gemma2ForCausalLM",
        )
    else:
        fields |= dict(
            use_qk_norm=True,
            rotary_base_local=10.0,
            original_architecture="Gemma3ForCausalLM",
        )
    fields.update(kw)
    return llama_cfg(**fields)


def build_gemma(kind: str, dtype=torch.float64, seed: int = 0, **kw):
    model = load_model(gemma_cfg(kind, **kw), device="cpu", dtype=dtype, tokenizer=tokenizer(),
                       seed=seed)  # fmt: skip
    randomize_biases_and_norms(model, seed)
    with torch.no_grad():  # make the post-norms and the final norm bite
        gen = torch.Generator().manual_seed(seed + 7)
        for name, p in model.named_parameters():
            if name.endswith("_post.w") or name == "ln_final.w":
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p) * 2 + 0.2)
    return model


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request):
    return build_gemma(request.param)


# ------------------------------------------------------------------------- tests
def test_gemma_architectures_are_accepted_with_effective_value_vectors(gemma):
    arch = Architecture(gemma)
    assert arch.post_norms
    assert arch.logit_soft_cap == pytest.approx(max(gemma.cfg.output_logits_soft_cap, 0.0))
    block = gemma.blocks[1]
    torch.testing.assert_close(arch.W_out(1), block.mlp.W_out * block.ln2_post.w, atol=0, rtol=0)
    torch.testing.assert_close(arch.W_O(1), block.attn.W_O * block.ln1_post.w, atol=0, rtol=0)
    assert arch.W_out_raw(1) is block.mlp.W_out


def test_literal_neurons_sum_to_layer_outputs(gemma):
    """The policy itself: with the post-norm scale frozen, neurons sum exactly to the output."""
    lit = Literal(gemma, PROMPTS[2])
    for l in range(gemma.cfg.n_layers):
        vectors, bias = lit.mlp(l)
        want = lit.act(f"blocks.{l}.hook_mlp_out")[lit.T]
        torch.testing.assert_close(vectors.sum(0) + bias, want, atol=ATOL, rtol=0)
        vectors, bias = lit.attention(l)
        want = lit.act(f"blocks.{l}.hook_attn_out")[lit.T]
        torch.testing.assert_close(vectors.sum((0, 1, 2)) + bias, want, atol=ATOL, rtol=0)


def test_check_model_is_exact_on_gemma(gemma):
    report = check_model(gemma, seq_len=8)
    assert report.max_error < 1e-12


def test_check_model_fails_without_the_post_norm_scale(gemma, monkeypatch):
    """The check can fail: ignore the post-norm (use the raw weights) and it must."""
    monkeypatch.setattr(Architecture, "W_out", Architecture.W_out_raw)
    with pytest.raises(ModelCheckError, match="per-neuron"):
        check_model(gemma, seq_len=8)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_layer_scores_match_literal_and_telescope(gemma, prompt):
    lit = Literal(gemma, prompt)
    res = layer_importance(gemma, prompt)
    want = []
    for l in range(gemma.cfg.n_layers):
        pre = lit.act(f"blocks.{l}.hook_resid_pre")[lit.T]
        mid = lit.act(f"blocks.{l}.hook_resid_mid")[lit.T]
        a_vec, a_b = lit.attention(l)  # the literal sums, not the hooks
        m_vec, m_b = lit.mlp(l)
        a = a_vec.sum((0, 1, 2)) + a_b
        m = m_vec.sum(0) + m_b
        attn_score = lit.logprob(pre + a) - lit.logprob(pre)
        want.append(torch.stack([attn_score, lit.logprob(mid + m) - lit.logprob(mid)]))
    want = torch.stack(want)
    torch.testing.assert_close(res.scores[0], want, atol=ATOL, rtol=0)
    # telescoping to the model's own (soft-capped) log-probability of the target
    real = torch.log_softmax(lit.logits[0, lit.T], -1)[lit.target]
    embed = lit.act("blocks.0.hook_resid_pre")[lit.T]
    total = res.scores[0].sum()
    torch.testing.assert_close(total, real - lit.logprob(embed), atol=ATOL, rtol=0)
    torch.testing.assert_close(res.final_logprob[0], real, atol=ATOL, rtol=0)


def test_head_scores_match_literal(gemma):
    prompt = PROMPTS[0]
    lit = Literal(gemma, prompt)
    res = head_importance(gemma, prompt)
    for l in range(gemma.cfg.n_layers):
        vectors, _ = lit.attention(l)
        pre = lit.act(f"blocks.{l}.hook_resid_pre")[lit.T]
        heads = vectors.sum((0, 2))  # head d_model
        want = lit.logprob(pre + heads) - lit.logprob(pre)
        torch.testing.assert_close(res.scores[0, l], want, atol=ATOL, rtol=0)
    by_pos = head_importance(gemma, prompt, by_position=True)
    l = 1
    vectors, _ = lit.attention(l)
    pre = lit.act(f"blocks.{l}.hook_resid_pre")[lit.T]
    want = lit.logprob(pre + vectors.sum(2)) - lit.logprob(pre)  # pos head
    torch.testing.assert_close(by_pos.scores[0, l], want.T, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["certified", "exact"])
def test_ffn_neuron_scores_match_literal(gemma, method):
    prompt = PROMPTS[2]
    lit = Literal(gemma, prompt)
    res = neuron_importance(gemma, prompt, method=method)
    for l in range(gemma.cfg.n_layers):
        vectors, _ = lit.mlp(l)
        mid = lit.act(f"blocks.{l}.hook_resid_mid")[lit.T]
        want = lit.logprob(mid + vectors) - lit.logprob(mid)
        torch.testing.assert_close(res.scores[0, l], want, atol=ATOL, rtol=0)


def test_attention_neuron_scores_match_literal(gemma):
    prompt = PROMPTS[1]
    lit = Literal(gemma, prompt)
    res = attention_neuron_importance(gemma, prompt)
    n_pos = lit.T + 1
    for l in range(gemma.cfg.n_layers):
        vectors, _ = lit.attention(l)
        pre = lit.act(f"blocks.{l}.hook_resid_pre")[lit.T]
        want = lit.logprob(pre + vectors) - lit.logprob(pre)  # pos head d_head
        torch.testing.assert_close(res.scores[0, l, :n_pos], want, atol=ATOL, rtol=0)


def test_batched_prompts_match_single_prompts(gemma):
    """Padding and per-prompt scales: the batch equals each prompt alone."""
    batch = neuron_importance(gemma, PROMPTS).scores
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(
            batch[i], neuron_importance(gemma, p).scores[0], atol=1e-9, rtol=0
        )


def test_cna_on_gemma_matches_literal_differences(gemma):
    """CNA against a second Gemma (other weights): each side is its literal score, with the
    target of the first model and each model's own frozen scales."""
    kind = "gemma2" if "Gemma2" in gemma.cfg.original_architecture else "gemma3"
    other = build_gemma(kind, seed=5)
    prompt = PROMPTS[2]
    res = compare_neurons(gemma, prompt, other, reference_scale="own")
    lit, lit_o = Literal(gemma, prompt), Literal(other, prompt)
    lit_o.target = lit.target
    for l in range(gemma.cfg.n_layers):
        sides = []
        for x in (lit, lit_o):
            vectors, _ = x.mlp(l)
            mid = x.act(f"blocks.{l}.hook_resid_mid")[x.T]
            sides.append(x.logprob(mid + vectors) - x.logprob(mid))
        torch.testing.assert_close(res.extras["imp_original"][0, l], sides[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(res.extras["imp_other"][0, l], sides[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(res.scores[0, l], sides[0] - sides[1], atol=ATOL, rtol=0)


def test_gemma_model_outputs_are_the_soft_capped_logits():
    """The final soft cap is the model's own: logits never exceed the cap, and mechcna's
    projection of the final residual reproduces them."""
    model = build_gemma("gemma2")
    lit = Literal(model, PROMPTS[0])
    c = model.cfg.output_logits_soft_cap
    assert float(lit.logits.abs().max()) < c
    from mechcna.engine.projection import project_to_vocab

    got = project_to_vocab(model, lit.final, lit.s_final[0])
    torch.testing.assert_close(got, lit.logits[0, lit.T], atol=ATOL, rtol=0)


def test_head_sweep_equals_a_deep_copy_with_the_head_zeroed(gemma):
    """Head ablation on sandwich norms reruns the layer (the post-norm scale changes with the
    ablated head): the sweep equals the real model with that head's W_O zeroed."""
    import copy

    sweep = head_sweep(gemma, PROMPTS, heads=[(1, 2), (2, 0)])
    for row, (layer, head) in enumerate(sweep.heads):
        edited = copy.deepcopy(gemma)
        with torch.no_grad():
            edited.blocks[layer].attn.W_O[head] = 0.0
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                lp = edited(prompt)[0, -1].log_softmax(-1)
            want = lp[int(sweep.targets[i])]
            torch.testing.assert_close(sweep.logprob[row, i], want, atol=1e-9, rtol=0)


def test_soft_cap_alone_is_refused_where_the_expansion_is_used_directly():
    """The eight-method comparison handles sandwich norms but not the soft cap."""
    gemma3 = build_gemma("gemma3")
    assert comparison_scores(gemma3, PROMPTS[0]).scores.isfinite().all()
    with pytest.raises(UnsupportedArchitectureError, match="soft cap"):
        comparison_scores(build_gemma("gemma2"), PROMPTS[0])


def test_layernorm_post_norms_are_refused():
    from mechcna.models.backend import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=8, d_vocab=10,
        act_fn="gelu", normalization_type=None, use_normalization_before_and_after=True,
    )  # fmt: skip
    model = load_model(cfg, device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="not RMSNorm"):
        Architecture(model)


# ---------------------------------------------------- Hugging Face checkpoints (parity)
V = 60
SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=64,
    head_dim=8,
)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_gemma(kind: str):
    torch.manual_seed(0)
    if kind == "gemma2":
        cfg = Gemma2Config(**SMALL, query_pre_attn_scalar=8, sliding_window=4,
                           attn_logit_softcapping=3.0, final_logit_softcapping=2.0)  # fmt: skip
        return _perturb(Gemma2ForCausalLM(cfg))
    cfg = Gemma3TextConfig(
        **SMALL, query_pre_attn_scalar=8, sliding_window=4, layer_types=LAYER_TYPES
    )
    return _perturb(Gemma3ForCausalLM(cfg))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_hf_gemma_logit_parity_and_decomposition(tmp_path, kind):
    """Embedding scaling, QK-norm, local/global attention with two RoPE bases, attention and
    final soft caps: the converted model's logits equal the Hugging Face model's on prompts
    longer than the window, and the decomposition holds."""
    hf = hf_gemma(kind)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", dtype=torch.float64)
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.double()(tokens).logits
        torch.testing.assert_close(model(tokens), want, atol=1e-6, rtol=0)  # fp32 sqrt(d)
    assert check_model(model, seq_len=11).max_error < 1e-10
    # embedding scaling is in the converted weights: hook_embed is sqrt(d_model) * embedding
    emb = hf.get_input_embeddings().weight
    torch.testing.assert_close(model.W_E, emb * 32**0.5, atol=1e-6, rtol=0)
    res = layer_importance(model, tokens[:1])
    real = torch.log_softmax(want[0, -1], -1)[int(want[0, -1].argmax())]
    torch.testing.assert_close(res.final_logprob[0], real, atol=1e-6, rtol=0)
