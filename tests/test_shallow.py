"""Hidden-interpretable shallow neurons (docs/methods.md 8.3): the zero-shot search against a
hand-written loop, concept tokens, and the masking experiment with its random baseline."""

import plotly.graph_objects as go
import pytest
import torch

from mechcna import MechcnaError, intervene
from mechcna.analyses.shallow import concept_tokens, hidden_interpretable_neurons, mask_experiment
from tests.helpers import build
from tests.reference import frozen_bs


def test_concept_tokens_on_tiny_tokenizer():
    model = build("gpt2")
    found = concept_tokens(model)
    expect = {
        *"0123456789",
        *"+-*/=",
        "sum",
        "plus",
        "minus",
        "times",
        "divides",
        "difference",
        "product",
        "ratio",
    }
    assert set(found.values()) == expect
    assert all(model.to_single_str_token(i) == t for i, t in found.items())
    custom = concept_tokens(model, ["THREE", "3", " Plus ", "absent"])
    assert set(custom.values()) == {"3", "plus"}


@pytest.mark.parametrize("aggregate", ["max", "union"])
def test_zero_shot_search_matches_hand_loop(kind, aggregate):
    model = build(kind, dtype=torch.float64, n_layers=3)
    concepts = ["3", "5", "7", "+", "plus", "minus", "sum"]
    ids = set(concept_tokens(model, concepts))
    res = hidden_interpretable_neurons(
        model, neuron_layers=[0, 1], attention_layers=[0, 1, 2], concepts=concepts, top=12,
        thresholds=(0, 1, 2, 3), aggregate=aggregate, chunk=20,
    )  # fmt: skip
    expect = torch.full((3, model.cfg.d_mlp), -1, dtype=torch.long)
    with torch.no_grad():
        for i in (0, 1):
            for j in range(model.cfg.d_mlp):
                per_layer, union = [], set()
                for l in range(i + 1, 3):
                    x = model.blocks[i].mlp.W_out[j]
                    if kind == "gpt2":
                        x = x - x.mean()
                    x = x * model.blocks[l].ln1.w
                    attn = model.blocks[l].attn
                    out = sum(x @ attn.W_V[h] @ attn.W_O[h] for h in range(model.cfg.n_heads))
                    logits = frozen_bs(model, out, 1.0, paper_compat=True)
                    top = set(logits.topk(12).indices.tolist())
                    per_layer.append(len(top & ids))
                    union |= top & ids
                expect[i, j] = max(per_layer) if aggregate == "max" else len(union)
    assert torch.equal(res.counts, expect)
    for m in res.thresholds:
        hand = [(l, j) for l in (0, 1) for j in range(model.cfg.d_mlp) if expect[l, j] >= m]
        assert res.neurons(m) == hand
    assert len(res.neurons(0)) == 2 * model.cfg.d_mlp
    assert list(res.summary()["n_neurons"]) == [len(res.neurons(m)) for m in res.thresholds]
    assert len(res.to_frame()) == 2 * model.cfg.d_mlp
    assert isinstance(res.plot(), go.Figure)


def test_mask_experiment_with_random_baseline():
    model = build("gpt2", dtype=torch.float64)
    prompts = ["12+7=", "3+5=", "the sum of 3 and 5 is"]
    with torch.no_grad():
        own = [int(model(p)[0, -1].argmax()) for p in prompts]
    calls = []

    def evaluate(m, interventions):
        calls.append([n for iv in interventions for n in iv.neurons])
        with torch.no_grad(), intervene(m, *interventions):
            hits = [int(m(p)[0, -1].argmax()) == w for p, w in zip(prompts, own)]
        return sum(hits) / len(hits)

    sets = {"all of layer 0": [(0, j) for j in range(64)], "two": [(0, 1), (0, 2)]}
    res = mask_experiment(model, sets, evaluate, seed=3)
    assert res.base_accuracy == 1.0 and calls[0] == []
    frame = res.to_frame()
    assert list(frame["n_neurons"]) == [64, 2]
    assert [len(c) for c in calls[1:]] == [64, 64, 2, 2]
    assert all(l == 0 for c in calls for l, _ in c)
    assert frame["relative_decrease"].iloc[0] == pytest.approx(100 * (1 - frame["accuracy"][0]))
    assert {"random_accuracy", "random_relative_decrease"} <= set(frame.columns)
    assert isinstance(res.plot(), go.Figure)
    search = hidden_interpretable_neurons(model, top=10, thresholds=(9,))
    res2 = mask_experiment(model, search, evaluate, random_baseline=False)
    assert list(res2.to_frame()["n_neurons"]) == [len(search.neurons(9))]


def test_search_bad_input():
    model = build("llama")
    with pytest.raises(MechcnaError, match="top"):
        hidden_interpretable_neurons(model, top=0)
    with pytest.raises(MechcnaError, match="layer"):
        hidden_interpretable_neurons(model, neuron_layers=[7])
