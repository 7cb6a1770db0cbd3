"""Query side (docs/methods.md 5): vectorised scores against literal loops written from the spec."""

import plotly.graph_objects as go
import pytest
import torch

from mechcna import MechcnaError, neuron_importance
from mechcna.analyses.attribution import attention_neuron_importance
from mechcna.analyses.query import (
    attention_neuron_queries,
    attention_query_layers,
    ffn_query_layers,
    query_neurons,
)
from mechcna.analyses.query_overlap import query_neuron_tokens, query_value_overlap
from tests.helpers import PROMPTS, build


def _cache(model, prompt):
    with torch.no_grad():
        return model.run_with_cache(model.to_tokens(prompt))[1]


def _literal_top_attention(att, model, k):
    """Top-k attention neurons of each prompt by a sort over a Python list."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        n = model.to_tokens(prompt).shape[1]
        s = att.scores[i]
        items = [
            (float(s[l, p, h, d]), (l, p, h, d))
            for l in range(s.shape[0])
            for p in range(n)
            for h in range(s.shape[2])
            for d in range(s.shape[3])
        ]
        items.sort(key=lambda x: -x[0])
        out.append(items[:k])
    return out


@torch.no_grad()
def _literal_query(model, cache, neurons):
    """docs/methods.md 5.3 literally:
    Q(i,j) += <m[i][p,j] W_out[i][j], key'> / <x_in[l][p], key'> Imp."""
    L, N = model.cfg.n_layers, model.cfg.d_mlp
    Q = torch.zeros(L, N, dtype=torch.float64)
    for imp, (l, p, h, d) in neurons:
        key = model.blocks[l].attn.W_V[h][:, d] * model.blocks[l].ln1.w
        denom = cache[f"blocks.{l}.hook_resid_pre"][0, p] @ key
        for i in range(l):
            m = cache[f"blocks.{i}.mlp.hook_post"][0, p]
            for j in range(N):
                sub = m[j] * model.blocks[i].mlp.W_out[j]
                Q[i, j] += float(sub @ key / denom) * imp
    return Q


def test_query_neurons_match_literal_loop(kind):
    model = build(kind, dtype=torch.float64)
    att = attention_neuron_importance(model, PROMPTS)
    res = query_neurons(model, PROMPTS, k=6, attention=att)
    assert res.scores.shape == (3, model.cfg.n_layers, model.cfg.d_mlp)
    assert res.sources is not None and res.source_importance is not None
    for i, top in enumerate(_literal_top_attention(att, model, 6)):
        assert [tuple(x) for x in res.sources[i].tolist()] == [n for _, n in top]
        ref = _literal_query(model, _cache(model, PROMPTS[i]), top)
        torch.testing.assert_close(res.scores[i], ref, atol=1e-10, rtol=0)
    # computing the attention importance itself gives the same result
    again = query_neurons(model, PROMPTS, k=6)
    torch.testing.assert_close(again.scores, res.scores, atol=1e-12, rtol=0)
    assert list(res.top(3, prompt=0).columns[:2]) == ["layer", "neuron"]
    assert len(res.to_frame()) == res.scores.numel()
    assert isinstance(res.plot(k=10), go.Figure)


def test_single_attention_neuron_queries(kind):
    model = build(kind, dtype=torch.float64)
    neuron = (1, 2, 3, 5)  # layer, pos, head, d_head
    res = attention_neuron_queries(model, PROMPTS, neuron)
    bare = attention_neuron_queries(model, PROMPTS, neuron, scale_by_importance=False)
    att = attention_neuron_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        imp = float(att.scores[i, 1, 2, 3, 5])
        ref = _literal_query(model, _cache(model, prompt), [(imp, (1, 2, 3, 5))])
        torch.testing.assert_close(res.scores[i], ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(res.scores[i], bare.scores[i] * imp, atol=1e-10, rtol=0)
    # negative positions index each prompt's real tokens
    last = attention_neuron_queries(model, PROMPTS, (1, -1, 0, 0))
    assert last.sources is not None
    lengths = [model.to_tokens(p).shape[1] for p in PROMPTS]
    assert last.sources[:, 0, 1].tolist() == [n - 1 for n in lengths]


def _literal_shares(comps, key, imp):
    r = [float((c @ key).detach()) for c in comps]
    S = sum(r)
    return [x / S * imp for x in r]


@pytest.mark.parametrize("key", ["up", "gate", "mean", "compat"])
def test_ffn_query_layers_match_literal_and_sum_to_importance(kind, key):
    model = build(kind, dtype=torch.float64)
    values = neuron_importance(model, PROMPTS)
    compat = key == "compat"
    kw = {"paper_compat": True} if compat else {"key": key}
    if compat:
        values = neuron_importance(model, PROMPTS, paper_compat=True)
    res = ffn_query_layers(model, PROMPTS, k=4, values=values, **kw)  # type: ignore[arg-type]
    assert res.importance is not None and res.neurons is not None
    torch.testing.assert_close(res.scores.sum(1), res.importance.sum(1), atol=1e-10, rtol=0)
    for name, extra in res.extras.items():
        assert name in ("up", "gate")
        torch.testing.assert_close(extra.sum(1), res.importance.sum(1), atol=1e-10, rtol=0)
    gated = kind == "llama"
    for i, prompt in enumerate(PROMPTS):
        cache = _cache(model, prompt)
        top = values.scores[i].flatten().topk(4)
        expect = torch.zeros(2 * model.cfg.n_layers + 1, dtype=torch.float64)
        for imp, flat in zip(top.values.tolist(), top.indices.tolist()):
            l, j = divmod(flat, model.cfg.d_mlp)
            mlp, g2 = model.blocks[l].mlp, model.blocks[l].ln2.w
            if compat and gated:
                keys = [mlp.W_out[j] * g2]
            elif not gated or key == "up":
                keys = [mlp.W_in[:, j] * g2]
            elif key == "gate":
                keys = [mlp.W_gate[:, j] * g2]
            else:
                keys = [mlp.W_in[:, j] * g2, mlp.W_gate[:, j] * g2]
            comps = [cache["blocks.0.hook_resid_pre"][0, -1]]
            for i2 in range(l):
                comps += [cache[f"blocks.{i2}.hook_attn_out"][0, -1]]
                comps += [cache[f"blocks.{i2}.hook_mlp_out"][0, -1]]
            comps += [cache[f"blocks.{l}.hook_attn_out"][0, -1]]
            for kv in keys:
                shares = _literal_shares(comps, kv, imp)
                for c, s in enumerate(shares):
                    expect[c] += s / len(keys)
        torch.testing.assert_close(res.scores[i], expect, atol=1e-10, rtol=0)
    top = res.top(3, prompt=0)
    assert {"component", "score", "label", "name"} <= set(top.columns)
    assert isinstance(res.plot(0), go.Figure)


def test_attention_query_layers_match_literal(kind):
    model = build(kind, dtype=torch.float64)
    att = attention_neuron_importance(model, PROMPTS)
    res = attention_query_layers(model, PROMPTS, k=5, attention=att)
    assert res.importance is not None and res.mean_layer is not None
    torch.testing.assert_close(res.scores.sum(1), res.importance.sum(1), atol=1e-10, rtol=0)
    for i, top in enumerate(_literal_top_attention(att, model, 5)):
        cache = _cache(model, PROMPTS[i])
        expect = torch.zeros(2 * model.cfg.n_layers + 1, dtype=torch.float64)
        for imp, (l, p, h, d) in top:
            key = model.blocks[l].attn.W_V[h][:, d] * model.blocks[l].ln1.w
            comps = [cache["blocks.0.hook_resid_pre"][0, p]]
            for i2 in range(l):
                comps += [cache[f"blocks.{i2}.hook_attn_out"][0, p]]
                comps += [cache[f"blocks.{i2}.hook_mlp_out"][0, p]]
            for c, s in enumerate(_literal_shares(comps, key, imp)):
                expect[c] += s
        torch.testing.assert_close(res.scores[i], expect, atol=1e-10, rtol=0)
        assert float(res.mean_layer[i]) == pytest.approx(sum(n[0] for _, n in top) / 5)
    assert isinstance(res.plot(), go.Figure)


def test_query_value_overlap_counts():
    model = build("gpt2", dtype=torch.float64, n_layers=3)
    values = neuron_importance(model, PROMPTS)
    queries = query_neurons(model, PROMPTS, k=8)
    res = query_value_overlap(values, queries, k=30)
    assert res.dims == ("prompt", "layer", "kind")
    for i in range(3):
        v = set(values.scores[i].flatten().topk(30).indices.tolist())
        flat_q = queries.scores[i].flatten()
        q = {j for j in flat_q.topk(30).indices.tolist() if flat_q[j] != 0}
        assert res.scores[i, :, 1].sum() == len(q & v)
        assert res.scores[i, :, 0].sum() == len(q - v)
        per_layer = [sum(1 for j in q - v if j // model.cfg.d_mlp == l) for l in range(3)]
        assert res.scores[i, :, 0].tolist() == per_layer
    frame = res.to_frame()
    assert set(frame["kind"]) == {"query-only", "query-value"}
    assert frame["percent"].max() <= 100
    fig = res.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) == 2


def test_query_neuron_tokens_use_the_real_norm(kind):
    model = build(kind, dtype=torch.float64)
    res = query_neuron_tokens(model, (0, 3), (1, 2), k=5)
    v = model.blocks[0].mlp.W_out[3]
    ln = model.blocks[1].ln1
    if kind == "gpt2":
        x = v - v.mean()
        x = x / (x.pow(2).mean() + model.cfg.eps).sqrt() * ln.w + ln.b
    else:
        x = v / (v.pow(2).mean() + model.cfg.eps).sqrt() * ln.w
    attn = model.blocks[1].attn
    out = (x @ attn.W_V[2] + attn.b_V[2]) @ attn.W_O[2]
    xf = out - out.mean() if kind == "gpt2" else out
    logits = (xf * model.ln_final.w) @ model.W_U
    expect = [model.to_single_str_token(int(t)) for t in logits.topk(5).indices]
    assert [t for t, _ in res.tokens[1].top] == expect
    assert res.columns == ("original", "through head 1_2")
    assert len(res.to_frame()) == 20 and isinstance(res.plot(), go.Figure)


def test_query_bad_input():
    model = build("llama")
    with pytest.raises(MechcnaError, match="k must be a positive"):
        query_neurons(model, PROMPTS[:1], k=0)
    with pytest.raises(MechcnaError, match="k must be a positive"):
        attention_query_layers(model, PROMPTS[:1], k=0)
    with pytest.raises(MechcnaError, match="head"):
        attention_neuron_queries(model, PROMPTS[:1], (1, 0, 9, 0))
    with pytest.raises(MechcnaError, match="layer"):
        attention_neuron_queries(model, PROMPTS[:1], (5, 0, 0, 0))
    with pytest.raises(MechcnaError, match="position"):
        attention_neuron_queries(model, PROMPTS[:1], (1, 40, 0, 0))
    with pytest.raises(MechcnaError, match="dimension"):
        attention_neuron_queries(model, PROMPTS[:1], (1, 0, 0, 8))
    with pytest.raises(MechcnaError, match="neuron"):
        query_neuron_tokens(model, (0, 999), (1, 0))
    with pytest.raises(MechcnaError, match="prompts"):
        att = attention_neuron_importance(model, PROMPTS[:2])
        query_neurons(model, PROMPTS[:1], attention=att)
