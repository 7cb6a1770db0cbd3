"""CNA of LoRA (Tables 9-10), pruning (Table 11) and gender-bias editing (Tables 12-13)."""

import copy
import math

import pytest
import torch

from mechcna import KeepNeurons, MechcnaError, arithmetic_dataset, intervene
from mechcna.applications.bias import (
    bias_metric,
    bias_neurons,
    gender_bias_experiment,
    gender_prompts,
    profession_logprobs,
    text_logprob,
)
from mechcna.applications.lora import attach_lora, merge_lora
from mechcna.applications.lora_analysis import (
    coefficient_increase,
    coefficient_increase_table,
    coefficient_table,
    compare_lora,
)
from mechcna.applications.pruning import (
    cna_keep_set,
    prune_model,
    pruning_experiment,
    random_keep_set,
)
from tests.helpers import build
from tests.test_lora import _one_thread  # noqa: F401  (autouse: one torch thread)


def _perturbed_lora(model, layer=0, seed=0):
    work = copy.deepcopy(model)
    adapters = attach_lora(work, layer, ("q", "v", "o"), rank=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(0.5 * torch.randn(a.up.shape, generator=gen).to(a.up))
    return merge_lora(work)


PROMPTS = ["3 + 5 =", "9 - 4 =", "the sum of 2 and 6 is"]
TARGETS = ["8", "5", "8"]


def test_lora_cna_sign_convention_and_coefficients(kind):
    model = build(kind, dtype=torch.float64)
    lora = _perturbed_lora(model)
    a = compare_lora(model, lora, PROMPTS, TARGETS)
    b = compare_lora(model, lora, PROMPTS, TARGETS, direction="original_minus_lora")
    torch.testing.assert_close(a.comparison.scores, -b.comparison.scores, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.coefficient_original, b.coefficient_original)
    torch.testing.assert_close(a.coefficient_lora, b.coefficient_lora)
    # the coefficients are the models' own hook_post values at the last position
    _, cache = model.run_with_cache(model.to_tokens(PROMPTS[0]))
    torch.testing.assert_close(
        a.coefficient_original[0, 1], cache["blocks.1.mlp.hook_post"][0, -1].double()
    )
    # a model compared with an identical copy (the same object is refused): zero CNA and zero
    # coefficient increase
    same = compare_lora(model, copy.deepcopy(model), PROMPTS, TARGETS)
    assert same.comparison.scores.abs().max() == 0
    assert all(v == 0 for v in coefficient_increase(same, (5, 2)).values())
    with pytest.raises(MechcnaError, match="direction"):
        compare_lora(model, lora, PROMPTS, TARGETS, direction="up")


def test_lora_frame_names_models_and_default_targets_are_the_originals(kind):
    model = build(kind, dtype=torch.float64)
    lora = _perturbed_lora(model)
    own = [int(model(model.to_tokens(p))[0, -1].argmax()) for p in PROMPTS]
    for direction in ("lora_minus_original", "original_minus_lora"):
        comp = compare_lora(model, lora, PROMPTS, direction=direction)
        assert comp.comparison.target_ids.tolist() == own
        frame = comp.to_frame()
        assert {"imp_original", "imp_lora", "m_original", "m_lora"} <= set(frame.columns)
        torch.testing.assert_close(
            torch.tensor(frame["m_original"].to_numpy()),
            comp.coefficient_original.flatten().double().cpu(),
        )
        torch.testing.assert_close(
            torch.tensor(frame["m_lora"].to_numpy()),
            comp.coefficient_lora.flatten().double().cpu(),
        )


def test_coefficient_increase_by_hand(kind):
    model = build(kind, dtype=torch.float64)
    comp = compare_lora(model, _perturbed_lora(model), PROMPTS, TARGETS)
    got = coefficient_increase(comp, (3,))["top3"]
    ref = []
    for i, neurons in enumerate(comp.comparison.top_sets(3)):
        before = sum(abs(float(comp.coefficient_original[i, l, n])) for l, n in neurons)
        after = sum(abs(float(comp.coefficient_lora[i, l, n])) for l, n in neurons)
        ref.append(100 * (after - before) / before)
    assert math.isclose(got, sum(ref) / len(ref), rel_tol=1e-9)
    table = coefficient_increase_table({0: comp, 1: comp}, (3,), {"all": [0, 1], "none": [5]})
    assert list(table.index) == ["all"] and math.isclose(table.loc["all", "top3"], got)
    t9 = coefficient_table({0: comp}, prompt=1, k=2)
    assert list(t9.columns) == ["neuron", "ori", "L0"] and len(t9) == 2


def test_pruning_through_weights_equals_through_hooks(model):
    gen = torch.Generator().manual_seed(0)
    keep = [(1, int(i)) for i in torch.randperm(model.cfg.d_mlp, generator=gen)[:7]]
    tokens = model.to_tokens(PROMPTS[2])
    pruned = prune_model(model, keep, [1])
    with torch.no_grad(), intervene(model, KeepNeurons(keep, [1])):
        hooked = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), hooked, rtol=1e-5, atol=1e-5)
    zeroed = (pruned.blocks[1].mlp.W_out.abs().sum(1) == 0).sum()
    assert int(zeroed) == model.cfg.d_mlp - 7
    assert torch.equal(pruned.blocks[0].mlp.W_out, model.blocks[0].mlp.W_out)
    rand = random_keep_set(model, [0, 1], 7, seed=1)
    assert len(set(rand)) == 7 and {l for l, _ in rand} <= {0, 1}
    with pytest.raises(MechcnaError, match="cannot keep"):
        random_keep_set(model, [1], model.cfg.d_mlp + 1)


def test_keep_set_is_union_of_case_tops_and_experiment_runs(kind):
    model = build(kind)
    comp = compare_lora(model, _perturbed_lora(model), PROMPTS, TARGETS).comparison
    keep = cna_keep_set(comp, 4, layers=[1])
    ref = {(l, n) for row in comp.top_sets(4) for l, n in row if l == 1}
    assert set(keep) == ref
    data = arithmetic_dataset("+", 1, templates=4, n_pairs=10, tokenizer=model)
    res = pruning_experiment(
        model, comp, [1], 0, data, data, k=4, steps=2, progress=False, lora_accuracy=0.5
    )
    assert res.n_pruned == model.cfg.d_mlp - len(keep)
    assert set(res.to_frame()["model"]) == {
        "origin", "lora", "pruned_cna", "pruned_random", "lora_pruned_cna", "lora_pruned_random",
    }  # fmt: skip
    assert 0 < res.pruned_share < 1 and res.plot().data
    # per-case correctness of every pruned model (for paired intervals), averaging to its accuracy
    assert set(res.correct) == {"pruned_cna", "pruned_random", "lora_pruned_cna",
                                "lora_pruned_random"}  # fmt: skip
    for name, per in res.correct.items():
        assert len(per) == len(data)
        assert sum(per) / len(per) == pytest.approx(res.accuracy[name], abs=1e-6)


def test_bias_metric_by_hand():
    # two templates, three professions: woman-biased, woman-biased, man-biased
    w = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0]], dtype=torch.float64)
    m = torch.tensor([[-2.0, -2.0, -1.0], [-2.5, -1.5, -3.0]], dtype=torch.float64)
    got = bias_metric(torch.stack([w, m]), [1, 1, -1])
    # gaps w - m: [[1, 0, -2], [1, -1, 1]]; oriented: [[1, 0, 2], [1, -1, -1]]
    assert math.isclose(got["signed_total"], 2 / 6)
    assert math.isclose(got["signed_woman"], 1 / 4)
    assert math.isclose(got["signed_man"], 1 / 2)
    assert math.isclose(got["abs_total"], 6 / 6)
    assert math.isclose(got["abs_woman"], 3 / 4)
    assert math.isclose(got["abs_man"], 3 / 2)
    with pytest.raises(MechcnaError, match="directions"):
        bias_metric(torch.stack([w, m]), [1, 0, -1])


def test_bias_pipeline_on_tiny_model(kind):
    model = build(kind)
    templates = ["a {g} works as a", "the {g} works as a"]
    assert gender_prompts(templates, "man")[0] == "a man works as a"
    lp = profession_logprobs(model, ["nurse", "driver"], templates)
    assert lp.shape == (2, 2, 2)
    found = bias_neurons(model, ["nurse"], ["driver"], templates[:1], k=5)
    assert len(found.neurons) == 5 and found.scores.shape[0] == 2
    # the sum aggregate is the top of the summed oriented CNA
    flat = found.scores.double().sum(0).flatten()
    n = found.scores.shape[2]
    assert [l * n + i for l, i in found.neurons] == flat.topk(5).indices.tolist()
    count = bias_neurons(model, ["nurse"], ["driver"], templates[:1], k=5, aggregate="count")
    assert len(count.neurons) == 5
    with pytest.raises(MechcnaError, match="'doctor' is not in the model's vocabulary"):
        gender_bias_experiment(model, templates=templates, professions=["nurse", "doctor"])
    res = gender_bias_experiment(
        model, templates=templates, professions=["nurse", "driver"], threshold=0.0,
        k=3, n_random=2, cost_text=["the sum of 3 and 4 is 7"],
    )  # fmt: skip
    assert list(res.metrics.index) == ["original", "cna", "random_0", "random_1"]
    assert "text_logprob" in res.metrics and math.isfinite(res.reduction())
    assert res.plot().data and len(res.neurons.to_frame()) == 3
    assert text_logprob(model, ["3 + 5 = 8"]) < 0
