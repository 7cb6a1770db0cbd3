"""Query neurons, key scores, attention transfer, the zero-shot search and value-key products
on sandwich-norm models (tiny Gemma-2-like and Gemma-3-like checkpoints, fp64), each against a
literal computation.

The literal recomputes every residual share from the modules' own weights and the forward
pass's raw activations: an FFN neuron writes ``m * W_out[j] * w_post / s`` with ``s`` the RMS of
the raw (pre-post-norm) FFN output at its position; an attention neuron's output at query
position ``q`` is divided by the RMS of the raw attention output at ``q``; the pre-attention
norm's scale is the RMS of the residual. None of mechcna's capture code is used.
"""

import einops
import pytest
import torch

from mechcna.analyses.comparative import value_key_products
from mechcna.analyses.key_scores import (
    component_scores,
    head_scores,
    neuron_scores,
    source_position_scores,
)
from mechcna.analyses.query import (
    attention_neuron_queries,
    attention_query_layers,
    ffn_query_layers,
    query_neurons,
)
from mechcna.analyses.query_overlap import query_neuron_tokens
from mechcna.analyses.shallow import hidden_interpretable_neurons
from mechcna.analyses.transfer import ffn_keys, transform_through_attention, vo_transform
from tests.helpers import PROMPTS
from tests.test_gemma import build_gemma

ATOL = 1e-10


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request):
    return build_gemma(request.param)


def _rms(x, eps):
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _expand(w, n_heads):
    """Grouped-query weights repeated to one per query head (first axis)."""
    return w.repeat_interleave(n_heads // w.shape[0], 0)


class Shares:
    """Every position's residual shares of one prompt, recomputed from module weights."""

    @torch.no_grad()
    def __init__(self, model, prompt):
        self.model = model
        tokens = model.to_tokens(prompt)
        _, self.cache = model.run_with_cache(tokens)
        self.n = tokens.shape[1]
        self.eps = model.cfg.eps
        self.H = model.cfg.n_heads

    def act(self, name):
        return self.cache[name][0]

    def W_V(self, l):
        return _expand(self.model.blocks[l].attn.W_V, self.H)

    def b_V(self, l):
        return _expand(self.model.blocks[l].attn.b_V, self.H)

    def ffn(self, l, p):
        """``[neuron, d_model]`` each FFN neuron's share of the residual at ``p``, and the
        bias's share."""
        block = self.model.blocks[l]
        post = self.act(f"blocks.{l}.mlp.hook_post")[p]
        s = _rms(post @ block.mlp.W_out + block.mlp.b_out, self.eps)
        w = block.ln2_post.w
        return post[:, None] * block.mlp.W_out * w / s, block.mlp.b_out * w / s

    def attn_post_scale(self, l, q):
        block = self.model.blocks[l]
        pattern = self.act(f"blocks.{l}.attn.hook_pattern")[:, q]  # head pos
        v = _expand(self.act(f"blocks.{l}.attn.hook_v").transpose(0, 1), self.H)  # head pos d
        z = einops.einsum(pattern, v, "head pos, head pos d -> head d")
        raw = einops.einsum(z, block.attn.W_O, "head d, head d m -> m") + block.attn.b_O
        return _rms(raw, self.eps)

    def attn(self, l, q):
        """``[pos, head, d_model]`` each source position's and head's share at ``q``."""
        block = self.model.blocks[l]
        pattern = self.act(f"blocks.{l}.attn.hook_pattern")[:, q]  # head pos
        v = _expand(self.act(f"blocks.{l}.attn.hook_v").transpose(0, 1), self.H)
        coef = pattern[..., None] * v  # head pos d
        out = einops.einsum(coef, block.attn.W_O, "head pos d, head d m -> pos head m")
        return out * block.ln1_post.w / self.attn_post_scale(l, q)

    def components(self, p):
        """``[emb, A0, F0, A1, ...]`` at ``p`` from the hooks (the post-normed outputs)."""
        comps = [self.act("blocks.0.hook_resid_pre")[p]]
        for l in range(self.model.cfg.n_layers):
            comps += [self.act(f"blocks.{l}.hook_attn_out")[p]]
            comps += [self.act(f"blocks.{l}.hook_mlp_out")[p]]
        return torch.stack(comps)

    def ln1(self, l, p):
        return _rms(self.act(f"blocks.{l}.hook_resid_pre")[p], self.eps)

    def vo(self, x, l, head, p, dest):
        """One hop: the frozen pre-norm at ``(l, p)``, V and O of ``head`` (all when None),
        the post-attention norm's weight and frozen scale at ``dest``."""
        block = self.model.blocks[l]
        x = x / self.ln1(l, p) * block.ln1.w
        heads = range(self.H) if head is None else [head]
        out = sum(x @ self.W_V(l)[h] @ block.attn.W_O[h] for h in heads)
        return out * block.ln1_post.w / self.attn_post_scale(l, dest)

    def ffn_keys(self, l, j):
        mlp, w = self.model.blocks[l].mlp, self.model.blocks[l].ln2.w
        return torch.stack([mlp.W_in[:, j] * w, mlp.W_gate[:, j] * w])


def _share_sums_are_outputs(lit):
    """The literal's own check: shares sum to the hooks' layer outputs at every position."""
    for l in range(lit.model.cfg.n_layers):
        for p in range(lit.n):
            vec, bias = lit.ffn(l, p)
            want = lit.act(f"blocks.{l}.hook_mlp_out")[p]
            torch.testing.assert_close(vec.sum(0) + bias, want, atol=ATOL, rtol=0)
            b_O = lit.model.blocks[l].attn.b_O * lit.model.blocks[l].ln1_post.w
            got = lit.attn(l, p).sum((0, 1)) + b_O / lit.attn_post_scale(l, p)
            torch.testing.assert_close(got, lit.act(f"blocks.{l}.hook_attn_out")[p], atol=ATOL,
                                       rtol=0)  # fmt: skip


# ------------------------------------------------------------------------- query neurons
def _literal_queries(lit, sources, weights):
    L, N = lit.model.cfg.n_layers, lit.model.cfg.d_mlp
    want = torch.zeros(L, N, dtype=torch.float64)
    for (l, p, h, d), w in zip(sources.tolist(), weights.tolist()):
        key = lit.W_V(l)[h, :, d] * lit.model.blocks[l].ln1.w
        den = lit.act(f"blocks.{l}.hook_resid_pre")[p] @ key
        for i in range(l):
            want[i] += w * (lit.ffn(i, p)[0] @ key) / den
    return want


def test_literal_shares_sum_to_layer_outputs(gemma):
    _share_sums_are_outputs(Shares(gemma, PROMPTS[2]))


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_query_neurons_match_literal(gemma, prompt):
    res = query_neurons(gemma, prompt, k=40)
    assert res.sources is not None and res.source_importance is not None
    lit = Shares(gemma, prompt)
    want = _literal_queries(lit, res.sources[0], res.source_importance[0])
    assert want.abs().max() > 1e-3  # the scores are not trivially zero
    torch.testing.assert_close(res.scores[0], want, atol=ATOL, rtol=0)


def test_attention_neuron_queries_match_literal(gemma):
    prompt = PROMPTS[2]
    lit = Shares(gemma, prompt)
    for neuron in [(2, 1, 3, 5), (1, 4, 0, 2)]:
        res = attention_neuron_queries(gemma, prompt, neuron, scale_by_importance=False)
        want = _literal_queries(lit, torch.tensor([neuron]), torch.ones(1))
        torch.testing.assert_close(res.scores[0], want, atol=ATOL, rtol=0)


def _literal_shares(comps, keys, last, imp):
    r = comps[: last + 1] @ keys
    return imp * r / r.sum()


def test_ffn_query_layers_match_literal(gemma):
    prompt = PROMPTS[2]
    res = ffn_query_layers(gemma, prompt, k=5)
    assert res.neurons is not None and res.importance is not None
    lit = Shares(gemma, prompt)
    comps = lit.components(lit.n - 1)
    want = torch.zeros(comps.shape[0], dtype=torch.float64)
    for (l, j), imp in zip(res.neurons[0].tolist(), res.importance[0].tolist()):
        for key in lit.ffn_keys(l, j):  # up and gate; the default averages them
            want[: 2 * l + 2] += _literal_shares(comps, key, 2 * l + 1, imp) / 2
    torch.testing.assert_close(res.scores[0], want, atol=ATOL, rtol=0)


def test_attention_query_layers_match_literal(gemma):
    prompt = PROMPTS[2]
    res = attention_query_layers(gemma, prompt, k=5)
    assert res.neurons is not None and res.importance is not None
    lit = Shares(gemma, prompt)
    want = torch.zeros(res.scores.shape[1], dtype=torch.float64)
    for (l, p, h, d), imp in zip(res.neurons[0].tolist(), res.importance[0].tolist()):
        key = lit.W_V(l)[h, :, d] * gemma.blocks[l].ln1.w
        want[: 2 * l + 1] += _literal_shares(lit.components(p), key, 2 * l, imp)
    torch.testing.assert_close(res.scores[0], want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- key scores
def test_key_scores_match_literal(gemma):
    prompt = PROMPTS[2]
    lit = Shares(gemma, prompt)
    keys = lit.ffn_keys(2, 5).T  # d_model key
    torch.testing.assert_close(ffn_keys(gemma, 2, 5).vectors, keys.T, atol=0, rtol=0)
    q = 3
    res = source_position_scores(gemma, prompt, 1, (2, 5), query_position=q)
    want = lit.attn(1, q).sum(1) @ keys
    torch.testing.assert_close(res.scores, want, atol=ATOL, rtol=0)
    res = head_scores(gemma, prompt, 1, (2, 5), source_position=2, query_position=q)
    torch.testing.assert_close(res.scores, lit.attn(1, q)[2] @ keys, atol=ATOL, rtol=0)
    res = neuron_scores(gemma, prompt, (2, 5), layer=0, position=2)
    torch.testing.assert_close(res.scores, lit.ffn(0, 2)[0] @ keys, atol=ATOL, rtol=0)
    res = component_scores(gemma, prompt, (2, 5), position=q, below_layer=2)
    torch.testing.assert_close(res.scores, lit.components(q)[:5] @ keys, atol=ATOL, rtol=0)


def test_key_scores_through_a_path_match_literal(gemma):
    """A path's hop lands on the last token: its post-attention scale is frozen there."""
    prompt = PROMPTS[2]
    lit = Shares(gemma, prompt)
    keys = lit.ffn_keys(2, 5).T
    T = lit.n - 1
    res = source_position_scores(gemma, prompt, 0, (2, 5), query_position=1,
                                 path=[(1, 2, 1)])  # fmt: skip
    moved = lit.vo(lit.attn(0, 1).sum(1), 1, 2, 1, T)
    torch.testing.assert_close(res.scores, moved @ keys, atol=ATOL, rtol=0)
    res = neuron_scores(gemma, prompt, (2, 5), layer=0, position=2, path=[(1, None, 2)])
    moved = lit.vo(lit.ffn(0, 2)[0], 1, None, 2, T)
    torch.testing.assert_close(res.scores, moved @ keys, atol=ATOL, rtol=0)


def test_two_hop_transfer_matches_literal(gemma):
    """Hop 1 lands on hop 2's position, hop 2 on ``destination``."""
    prompt = PROMPTS[2]
    lit = Shares(gemma, prompt)
    path = [(1, None, 1), (2, 3, 2)]
    res = transform_through_attention(gemma, (0, 7), path, prompt, coefficient=True,
                                      destination=4)  # fmt: skip
    u = lit.ffn(0, 1)[0][7]
    torch.testing.assert_close(res.original, u, atol=ATOL, rtol=0)
    first = lit.vo(u, 1, None, 1, 2)
    torch.testing.assert_close(res.hops[0], first, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.hops[1], lit.vo(first, 2, 3, 2, 4), atol=ATOL, rtol=0)
    default = transform_through_attention(gemma, (0, 7), path, prompt, coefficient=True)
    want = lit.vo(first, 2, 3, 2, lit.n - 1)
    torch.testing.assert_close(default.hops[1], want, atol=ATOL, rtol=0)
    assert not torch.allclose(default.hops[1], res.hops[1])  # the destination matters


def test_vo_transform_post_scale(gemma):
    x = torch.randn(
        3, gemma.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    block = gemma.blocks[1]
    z = einops.einsum(x * block.ln1.w / 2.0, _expand(block.attn.W_V, gemma.cfg.n_heads),
                      "b m, h m d -> b h d")  # fmt: skip
    want = einops.einsum(z, block.attn.W_O, "b h d, h d m -> b m") * block.ln1_post.w / 3.0
    got = vo_transform(gemma, x, 1, scale=2.0, post_scale=3.0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------- zero-shot search, value-keys
def _literal_counts(model, concept_ids, i, readers, top):
    """Concept counts of layer ``i``'s neurons: the value vector times the post-FFN norm
    weight, each reader's full-layer VO (scales 1) times the post-attention norm weight, the
    final norm's weight and ``W_U``; the best reader."""
    H = model.cfg.n_heads
    values = model.blocks[i].mlp.W_out * model.blocks[i].ln2_post.w
    is_concept = torch.zeros(model.cfg.d_vocab_out, dtype=torch.bool)
    is_concept[list(concept_ids)] = True
    best = torch.zeros(values.shape[0], dtype=torch.long)
    for l in readers:
        block = model.blocks[l]
        z = einops.einsum(values * block.ln1.w, _expand(block.attn.W_V, H), "n m, h m d -> n h d")
        out = einops.einsum(z, block.attn.W_O, "n h d, h d m -> n m") * block.ln1_post.w
        logits = (out * model.ln_final.w) @ model.W_U
        best = torch.maximum(best, is_concept[logits.topk(top, -1).indices].sum(-1))
    return best


def test_zero_shot_search_matches_literal(gemma):
    res = hidden_interpretable_neurons(gemma, neuron_layers=[0, 1], attention_layers=[1, 2],
                                       top=8, thresholds=(1, 2))  # fmt: skip
    assert len(res.concept_ids) > 5
    for i, readers in ((0, [1, 2]), (1, [2])):
        want = _literal_counts(gemma, res.concept_ids, i, readers, 8)
        assert torch.equal(res.counts[i], want)
    assert (res.counts[2] == -1).all()
    assert res.counts[:2].sum() > 0  # the comparison is not of all-zero counts


def test_value_key_products_with_frozen_coefficients_are_exact_reads(gemma):
    """With coefficients divided by the post-FFN norm's frozen scale, a product is the lower
    neuron's residual share read by the upper neuron's key."""
    from mechcna.analyses.capture import capture

    prompt = PROMPTS[2]
    lit = Shares(gemma, prompt)
    neurons = [(0, 3), (1, 9), (2, 5)]
    cap = capture(gemma, prompt, need=("post",))
    assert cap.post is not None
    coefs = torch.stack([cap.post[0, l, j] for l, j in neurons])
    res = value_key_products(gemma, neurons, key="both", coefficients=coefs)
    T = lit.n - 1
    for a, (i, j) in enumerate(neurons):
        for b, (l, k) in enumerate(neurons):
            if i < l:
                want = lit.ffn(i, T)[0][j] @ lit.ffn_keys(l, k).sum(0)
                torch.testing.assert_close(res.products[a, b], want, atol=ATOL, rtol=0)
            else:
                assert torch.isnan(res.products[a, b])


def test_query_neuron_tokens_match_literal(gemma):
    """The value vector through the real pre-attention norm, V (with b_V), O and the real
    post-attention norm, each applied to the vector alone; logits through the final norm's
    weight, W_U and (Gemma 2) the soft cap."""
    res = query_neuron_tokens(gemma, (0, 4), (2, 1), k=5)
    block = gemma.blocks[2]
    eps = gemma.cfg.eps
    vec = gemma.blocks[0].mlp.W_out[4] * gemma.blocks[0].ln2_post.w
    x = vec / _rms(vec, eps) * block.ln1.w
    out = (x @ _expand(block.attn.W_V, gemma.cfg.n_heads)[1] + _expand(block.attn.b_V,
           gemma.cfg.n_heads)[1]) @ block.attn.W_O[1]  # fmt: skip
    out = out / _rms(out, eps) * block.ln1_post.w
    for got, v in zip(res.tokens, (vec, out)):
        logits = (v * gemma.ln_final.w) @ gemma.W_U
        c = gemma.cfg.output_logits_soft_cap
        logits = c * torch.tanh(logits / c) if c > 0 else logits
        values = torch.tensor([value for _, value in got.top], dtype=torch.float64)
        torch.testing.assert_close(values, logits.topk(5).values, atol=ATOL, rtol=0)


def test_reproduce_quick_runs_the_query_and_transfer_stages_on_a_gemma3_like_model():
    """The stages built on these analyses (query, walkthrough, shallow) refused Gemma before;
    each now runs on the tiny Gemma-3-like model and fills its tables."""
    from mechcna.reproduce import reproduce

    model = build_gemma("gemma3", dtype=torch.float32)
    rep = reproduce(model, "both", settings="quick", progress=False)
    for name in ("query", "walkthrough", "shallow"):
        tables = rep.stage(name).tables
        assert tables and all(len(t) > 0 for t in tables.values()), name
