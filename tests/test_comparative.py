import copy

import plotly.graph_objects as go
import pytest
import torch

from mechcna import HeadAblation, MechcnaError, NeuronEdit, apply_to_weights, intervene
from mechcna.analyses.attribution import neuron_importance
from mechcna.analyses.case_ablation import lowest_neuron_table, mask_keep_table
from mechcna.analyses.comparative import (
    cna_table,
    compare_inputs,
    compare_neurons,
    value_key_products,
)
from mechcna.errors import EmptyInputError, InvalidOptionError
from mechcna.interventions.edits import NeuronMask
from tests.helpers import PROMPTS, build


def test_self_comparison_is_exactly_zero(kind):
    model = build(kind, dtype=torch.float64)
    res = compare_neurons(model, PROMPTS, copy.deepcopy(model))  # an identical second model
    assert torch.all(res.delta == 0)
    assert torch.all(res.extras["coefficient_delta"] == 0)
    # M' = M by construction is refused: a table of zeros would mean nothing (issue 23)
    with pytest.raises(EmptyInputError, match="no interventions"):
        compare_neurons(model, PROMPTS, [])
    with pytest.raises(InvalidOptionError, match="M itself"):
        compare_neurons(model, PROMPTS, model)


def test_last_layer_head_ablation_leaves_lower_layers_zero(kind):
    model = build(kind, dtype=torch.float64, n_layers=3)
    res = compare_neurons(model, PROMPTS, HeadAblation([(2, 1)]))
    assert torch.all(res.delta[:, :2] == 0)
    assert res.delta[:, 2].abs().max() > 1e-8


def test_matches_independent_scores(kind):
    model = build(kind, dtype=torch.float64)
    ablation = HeadAblation([(0, 1), (1, 2)])
    res = compare_neurons(model, PROMPTS, ablation, reference_scale="own")
    imp = neuron_importance(model, PROMPTS)
    imp_o = neuron_importance(
        model, PROMPTS, targets=imp.target_ids.tolist(), interventions=[ablation]
    )
    torch.testing.assert_close(res.extras["imp_original"], imp.scores, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.extras["imp_other"], imp_o.scores, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.delta, imp.scores - imp_o.scores, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        res.extras["coefficient"] - imp_o.coefficients, res.extras["coefficient_delta"]
    )


def test_second_model_equals_intervention(kind):
    model = build(kind, dtype=torch.float64)
    ablation = HeadAblation([(1, 0)])
    by_hook = compare_neurons(model, PROMPTS, ablation)
    by_model = compare_neurons(model, PROMPTS, apply_to_weights(model, ablation))
    torch.testing.assert_close(by_model.delta, by_hook.delta, atol=1e-10, rtol=0)


def test_original_reference_scale_is_default():
    model = build("gpt2", dtype=torch.float64)
    ablation = HeadAblation([(0, 0)])
    orig = compare_neurons(model, PROMPTS, ablation)
    own = compare_neurons(model, PROMPTS, ablation, reference_scale="own")
    assert orig.reference_scale == "original"
    torch.testing.assert_close(orig.extras["imp_original"], own.extras["imp_original"])
    assert (orig.extras["imp_other"] - own.extras["imp_other"]).abs().max() > 1e-9


def test_dataset_aggregation_equals_loop(kind):
    model = build(kind, dtype=torch.float64)
    ablation = HeadAblation([(1, 3)])
    res = compare_neurons(model, PROMPTS, ablation)
    counts: dict[tuple[int, int], int] = {}
    for i, prompt in enumerate(PROMPTS):
        single = compare_neurons(model, [prompt], ablation)
        torch.testing.assert_close(single.delta[0], res.delta[i], atol=1e-10, rtol=0)
        assert single.top_sets(5)[0] == res.top_sets(5)[i]
        for n in single.top_sets(5)[0]:
            counts[n] = counts.get(n, 0) + 1
    frame = res.counts(5)
    got = {(int(r.layer), int(r.neuron)): int(r.count) for r in frame.itertuples()}
    assert got == counts
    mean = res.delta.mean(0)
    row = frame.iloc[0]
    assert row["mean_delta"] == pytest.approx(float(mean[int(row["layer"]), int(row["neuron"])]))
    assert isinstance(res.plot(), go.Figure) and isinstance(res.plot(prompt=0, k=5), go.Figure)
    table = cna_table(model, res, prompt=0, k=4)
    assert len(table) == 4 and table["cna"].is_monotonic_decreasing


def test_compare_inputs_is_difference_of_importances(kind):
    model = build(kind, dtype=torch.float64)
    a, b = ["a woman works as a"], ["a man works as a"]
    res = compare_inputs(model, a, b, "nurse")
    ia = neuron_importance(model, a, "nurse")
    ib = neuron_importance(model, b, "nurse")
    torch.testing.assert_close(res.delta, ia.scores - ib.scores, atol=1e-10, rtol=0)
    with pytest.raises(MechcnaError, match="other prompts"):
        compare_inputs(model, a, a + b, "nurse")


def test_neuron_mask_equals_per_prompt_edits(kind):
    model = build(kind, dtype=torch.float64)
    tokens = model.to_tokens(["12+7=", "3+5=", "9-4="])
    mask = torch.zeros(3, 2, model.cfg.d_mlp, dtype=torch.bool)
    mask[0, 0, 3] = mask[1, 1, 5] = mask[1, 0, 1] = True
    with torch.no_grad(), intervene(model, NeuronMask(mask)):
        batched = model(tokens)
    with torch.no_grad():
        for i in range(3):
            edits = (
                [NeuronEdit([tuple(x) for x in mask[i].nonzero().tolist()])]
                if mask[i].any()
                else []
            )
            with intervene(model, *edits):
                single = model(tokens[i : i + 1])
            torch.testing.assert_close(batched[i], single[0], atol=1e-10, rtol=0)


def test_mask_keep_and_lowest_tables_match_manual(kind):
    model = build(kind, dtype=torch.float64)
    ablation = HeadAblation([(0, 1)])
    res = compare_neurons(model, PROMPTS, ablation, targets=["5", "9", "basketball"])
    table = mask_keep_table(model, PROMPTS, res, ks=(3,), deep_layers=[0, 1], progress=False)
    assert list(table.index) == ["mask", "keep", "random", "coef"]
    target = res.target_ids

    def accuracy(edits_per_prompt):
        ok = []
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad(), intervene(model, *edits_per_prompt(i)):
                ok.append(int(model(prompt)[0, -1].argmax()) == int(target[i]))
        return sum(ok) / len(ok)

    acc = accuracy(lambda i: [])
    assert table.attrs["original_accuracy"] == pytest.approx(acc)
    masked = accuracy(lambda i: [NeuronEdit(res.top_sets(3)[i])])
    expect = 100 * (acc - masked) / acc if acc else float("nan")
    if acc:
        assert table.loc["mask", "top3"] == pytest.approx(expect)
    m, m_o = res.extras["coefficient"].abs(), res.extras["coefficient_other"].abs()
    coef = []
    for i, ns in enumerate(res.top_sets(3)):
        before = sum(float(m[i, l, n]) for l, n in ns)
        after = sum(float(m_o[i, l, n]) for l, n in ns)
        coef.append(100 * (before - after) / before)
    assert table.loc["coef", "top3"] == pytest.approx(sum(coef) / len(coef))
    low = lowest_neuron_table(model, PROMPTS, res, ks=(3,))
    assert low.shape == (1, 1)
    from mechcna.analyses.plotting import experiment_bars

    fig = experiment_bars(table)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4


def test_value_key_products_manual(kind):
    model = build(kind, dtype=torch.float64)
    neurons = [(0, 3), (1, 5), (1, 7)]
    res = value_key_products(model, neurons)
    expect = model.blocks[0].mlp.W_out[3] @ (model.blocks[1].mlp.W_in[:, 5] * model.blocks[1].ln2.w)
    assert float(res.products[0, 1]) == pytest.approx(float(expect))
    assert torch.isnan(res.products[1, 0]) and torch.isnan(res.products[1, 2])
    assert len(res.to_frame()) == 2
    assert isinstance(res.plot(), go.Figure)
    if kind == "gpt2":
        with pytest.raises(MechcnaError, match="gated"):
            value_key_products(model, neurons, key="gate")
