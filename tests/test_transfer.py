"""Feature transfer (docs/methods.md 8): VO transforms against forced attention, pipeline sums."""

import plotly.graph_objects as go
import pytest
import torch

from mechcna import MechcnaError
from mechcna.analyses.key_scores import (
    component_scores,
    head_scores,
    neuron_scores,
    source_position_scores,
)
from mechcna.analyses.transfer import ffn_keys, transform_through_attention
from tests.helpers import build

PROMPT = "12+7="


def _forced_attention_output(model, layer, head, p, vector):
    """Layer ``layer``'s output at the last position when it attends only to position ``p``,
    whose residual is ``vector`` with the real norm scale kept (``z @ W_O``, biases removed by
    subtracting the same run with a zero vector)."""
    tokens = model.to_tokens(PROMPT)
    q = tokens.shape[1] - 1
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
    real_scale = clean[f"blocks.{layer}.ln1.hook_scale"][0, p].clone()

    def run(v):
        store = {}

        def set_resid(x, hook):
            x[0, p] = v
            return x

        def set_scale(s, hook):
            s[0, p] = real_scale
            return s

        def one_hot(pattern, hook):
            pattern[0, :, q] = 0.0
            pattern[0, :, q, p] = 1.0
            return pattern

        def keep_z(z, hook):
            store["z"] = z[0, q].clone()

        hooks = [
            (f"blocks.{layer}.hook_resid_pre", set_resid),
            (f"blocks.{layer}.ln1.hook_scale", set_scale),
            (f"blocks.{layer}.attn.hook_pattern", one_hot),
            (f"blocks.{layer}.attn.hook_z", keep_z),
        ]
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=hooks)
        return store["z"]  # head d_head

    z = run(vector) - run(torch.zeros_like(vector))
    W_O = model.blocks[layer].attn.W_O
    heads = range(model.cfg.n_heads) if head is None else [head]
    return sum(z[h] @ W_O[h] for h in heads)


@pytest.mark.parametrize("layer,head,p", [(0, None, 1), (1, 2, 2), (1, None, 0), (0, 3, 3)])
def test_vo_transform_equals_forced_attention(kind, layer, head, p):
    model = build(kind, dtype=torch.float64)
    vector = torch.randn(model.cfg.d_model, dtype=torch.float64)
    res = transform_through_attention(model, vector, [(layer, head, p)], prompt=PROMPT)
    expect = _forced_attention_output(model, layer, head, p, vector)
    torch.testing.assert_close(res.transformed, expect, atol=1e-10, rtol=0)


def test_two_hops_compose(kind):
    model = build(kind, dtype=torch.float64, n_layers=3)
    path = [(1, None, 1), (2, 2, 3)]  # hops above the neuron's layer 0
    two = transform_through_attention(model, (0, 5), path, prompt=PROMPT)
    first = transform_through_attention(model, (0, 5), path[:1], prompt=PROMPT)
    second = transform_through_attention(model, first.transformed, path[1:], prompt=PROMPT)
    torch.testing.assert_close(two.hops[0], first.transformed, atol=1e-12, rtol=0)
    torch.testing.assert_close(two.transformed, second.transformed, atol=1e-12, rtol=0)
    # batches of vectors transform row by row; token embeddings are W_E rows
    batch = torch.stack([model.blocks[0].mlp.W_out[5], model.W_E[7]])
    both = transform_through_attention(model, batch, path, prompt=PROMPT)
    torch.testing.assert_close(both.transformed[0], two.transformed, atol=1e-12, rtol=0)
    token = model.to_single_str_token(7)
    emb = transform_through_attention(model, token, path, prompt=PROMPT)
    torch.testing.assert_close(both.transformed[1], emb.transformed, atol=1e-12, rtol=0)
    # without a prompt the scale is 1: same direction, different length
    free = transform_through_attention(model, (0, 5), path)
    cos = torch.nn.functional.cosine_similarity(free.transformed, two.transformed, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-10)
    # the coefficient option multiplies by m at the first step's position
    _, cache = model.run_with_cache(PROMPT)
    m = float(cache["blocks.0.mlp.hook_post"][0, 1, 5])
    scaled = transform_through_attention(model, (0, 5), path, prompt=PROMPT, coefficient=True)
    torch.testing.assert_close(scaled.transformed, m * two.transformed, atol=1e-12, rtol=0)
    tokens = two.tokens(5)
    assert tokens.columns == ("original", "after L1 @pos 1", "after L2H2 @pos 3")
    assert list(two.top(3).columns) == list(tokens.columns)
    assert isinstance(two.plot(), go.Figure) and len(two.to_frame(5)) == 30


def test_keys_and_pipeline_sums(kind):
    model = build(kind, dtype=torch.float64)
    keys = ffn_keys(model, 1, 7)
    mlp, g2 = model.blocks[1].mlp, model.blocks[1].ln2.w
    expect = [mlp.W_in[:, 7] * g2] + ([mlp.W_gate[:, 7] * g2] if kind == "llama" else [])
    assert keys.names == (("up", "gate") if kind == "llama" else ("in",))
    torch.testing.assert_close(keys.vectors, torch.stack(expect))
    _, cache = model.run_with_cache(PROMPT)
    attn = model.blocks[1].attn
    q = model.to_tokens(PROMPT).shape[1] - 1
    # step 1: source positions of attention layer 1 at the last position sum to its output
    by_pos = source_position_scores(model, PROMPT, 1, keys)
    out = cache["blocks.1.hook_attn_out"][0, q] - attn.b_O
    torch.testing.assert_close(by_pos.scores.sum(0), keys.inner(out), atol=1e-10, rtol=0)
    # step 2: heads at one source position sum to that position's row
    heads = head_scores(model, PROMPT, 1, keys, source_position=2)
    torch.testing.assert_close(heads.scores.sum(0), by_pos.scores[2], atol=1e-10, rtol=0)
    # steps 3 and 5: components at a position (through a path) sum to the transformed residual
    path = [(0, None, 2), (1, 1, q)]
    comps = component_scores(model, PROMPT, keys, position=2, below_layer=1, path=path[1:])
    resid = cache["blocks.1.hook_resid_pre"][0, 2]
    whole = transform_through_attention(model, resid, path[1:], prompt=PROMPT).transformed
    torch.testing.assert_close(comps.scores.sum(0), keys.inner(whole), atol=1e-10, rtol=0)
    assert comps.rows == ("emb", "A0", "F0") and comps.row_values == (-0.5, 0.0, 0.5)
    # step 6: neurons of FFN 0 plus its bias sum to the F0 component, through two hops
    two = component_scores(model, PROMPT, keys, position=1, below_layer=1, path=path)
    neurons = neuron_scores(model, PROMPT, keys, layer=0, position=1, path=path)
    bias = transform_through_attention(model, model.blocks[0].mlp.b_out, path, prompt=PROMPT)
    total = neurons.scores.sum(0) + keys.inner(bias.transformed)
    torch.testing.assert_close(total, two.scores[2], atol=1e-10, rtol=0)
    top = neurons.top(3)
    assert top["total"].is_monotonic_decreasing and top["row"].iloc[0].startswith("0_")
    by_key = neurons.top(2, by=keys.names[0])
    assert by_key[keys.names[0]].iloc[0] == pytest.approx(float(neurons.scores[:, 0].max()))
    assert isinstance(neurons.plot(), go.Figure)


def test_transfer_bad_input():
    model = build("llama")
    with pytest.raises(MechcnaError, match="layer"):
        transform_through_attention(model, (0, 1), [(5, None, 1)], prompt=PROMPT)
    with pytest.raises(MechcnaError, match="head"):
        transform_through_attention(model, (0, 1), [(1, 4, 1)], prompt=PROMPT)
    with pytest.raises(MechcnaError, match="position"):
        transform_through_attention(model, (0, 1), [(1, 0, 9)], prompt=PROMPT)
    with pytest.raises(MechcnaError, match="position"):
        transform_through_attention(model, (0, 1), [(1, 0, None)], prompt=PROMPT)
    with pytest.raises(MechcnaError, match="at least one"):
        transform_through_attention(model, (0, 1), [])
    with pytest.raises(MechcnaError, match="neuron"):
        transform_through_attention(model, (0, 100), [(1, 0, 1)])
    with pytest.raises(MechcnaError, match="neuron"):
        ffn_keys(model, 1, 48)
    with pytest.raises(MechcnaError, match="position"):
        head_scores(model, PROMPT, 1, (1, 0), source_position=6)
    with pytest.raises(MechcnaError, match="layer"):
        source_position_scores(model, PROMPT, 2, (1, 0))
    with pytest.raises(MechcnaError, match="below_layer"):
        component_scores(model, PROMPT, (1, 0), position=1, below_layer=3)
