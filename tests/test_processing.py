"""Weight processing: inferred on any model, recorded on every result, exact or refused.

Processed and unprocessed copies of the same tiny model (issue 13, defect 6): the log-prob
scores of layers and FFN neurons agree exactly; analyses whose numbers processing changes
refuse the processed copy with a message saying how to load it unprocessed.
"""

import copy

import pytest
import torch

import mechcna
from mechcna import NO_PROCESSING, HeadAblation, WeightProcessing, get_processing
from mechcna.analyses.comparative import value_key_products
from mechcna.errors import WeightProcessingError
from mechcna.models.processing import infer_processing
from tests.helpers import PROMPTS, build

ALL = WeightProcessing(True, True, True, True)


def _processed(model, **steps):
    out = copy.deepcopy(model)
    flags = dict(fold_ln=True, center_writing_weights=True, center_unembed=True)
    flags.update(steps)
    out.load_and_process_state_dict(
        out.state_dict(), fold_value_biases=flags.pop("fold_value_biases", True), **flags
    )
    return out


@pytest.fixture(scope="module")
def pair():
    model = build("gpt2", dtype=torch.float64)
    return model, _processed(model)


def test_inferred_on_any_model(pair):
    model, processed = pair
    assert infer_processing(model) == NO_PROCESSING
    assert infer_processing(processed) == ALL
    # load_model recorded NO_PROCESSING on the deep-copied original: the weights win.
    assert get_processing(processed) == ALL
    only_ln = _processed(model, center_writing_weights=False, center_unembed=False,
                         fold_value_biases=False)  # fmt: skip
    assert get_processing(only_ln) == WeightProcessing(fold_ln=True)
    llama = build("llama", dtype=torch.float64)
    assert get_processing(_processed(llama)).fold_ln
    # A bias-free model whose b_O a weight edit set (mean ablation) is not "folded".
    ablated = mechcna.apply_to_weights(llama, HeadAblation.mean_over(llama, [(0, 1)], PROMPTS))
    assert bool(ablated.blocks[0].attn.b_O.any())
    assert get_processing(ablated) == NO_PROCESSING
    mechcna.head_importance(ablated, PROMPTS)  # not refused


def test_invariant_scores_are_exact_on_processed(pair):
    model, processed = pair
    # TransformerLens's processing itself moves the fp64 log-probs by ~3e-7, so the scores
    # agree to that level (and differ by far more under the refused analyses).
    own = (model(PROMPTS[0]).log_softmax(-1) - processed(PROMPTS[0]).log_softmax(-1)).abs().max()
    assert own < 1e-6
    for fn in (mechcna.layer_importance, mechcna.neuron_importance):
        a, b = fn(model, PROMPTS), fn(processed, PROMPTS)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
        assert a.processing == NO_PROCESSING and b.processing == ALL
    # Mean ablation is exact too (the folded b_V stays in b_O either way).
    ref = model.to_tokens(PROMPTS[0])
    a = mechcna.layer_importance(
        model, PROMPTS, interventions=[HeadAblation.mean_over(model, [(1, 0)], ref)]
    )
    b = mechcna.layer_importance(
        processed, PROMPTS, interventions=[HeadAblation.mean_over(processed, [(1, 0)], ref)]
    )
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)


REFUSED = {
    "head_importance": lambda m: mechcna.head_importance(m, PROMPTS),
    "attention_neuron_importance": lambda m: mechcna.attention_neuron_importance(m, PROMPTS),
    "zero head ablation": lambda m: mechcna.layer_importance(
        m, PROMPTS, interventions=[HeadAblation([(1, 0)])]
    ),
    "head_sweep": lambda m: mechcna.head_sweep(m, PROMPTS, progress=False),
    "single_prompt_head_effects": lambda m: mechcna.single_prompt_head_effects(m, PROMPTS[0]),
    "compare_neurons": lambda m: mechcna.analyses.comparative.compare_neurons(
        m, PROMPTS, HeadAblation([(0, 1)])
    ),
    "query_neurons": lambda m: mechcna.query_neurons(m, PROMPTS, k=5),
    "ffn_query_layers": lambda m: mechcna.ffn_query_layers(m, PROMPTS, k=5),
    "ffn_keys": lambda m: mechcna.ffn_keys(m, 1, 3),
    "source_position_scores": lambda m: mechcna.source_position_scores(m, PROMPTS[1], 1, (1, 3)),
    "transform_through_attention": lambda m: mechcna.transform_through_attention(
        m, (0, 3), [(1, None, 0)], prompt=PROMPTS[1]
    ),
    "hidden_interpretable_neurons": lambda m: mechcna.hidden_interpretable_neurons(m, top=5),
    "value_key_products": lambda m: value_key_products(m, [(0, 1), (1, 2)]),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_changed_analyses_refuse_processed(pair, name):
    model, processed = pair
    REFUSED[name](model)  # the unprocessed copy runs
    with pytest.raises(WeightProcessingError, match=r"processing=mechcna\.NO_PROCESSING"):
        REFUSED[name](processed)


def test_every_result_records_processing(pair):
    model, _ = pair
    results = [
        mechcna.source_position_scores(model, PROMPTS[1], 1, (1, 3)),
        value_key_products(model, [(0, 1), (1, 2)]),
        mechcna.head_sweep(model, PROMPTS, progress=False, heads=[(0, 0)]),
        mechcna.single_prompt_head_effects(model, PROMPTS[0], heads=[(0, 0)]),
        mechcna.hidden_interpretable_neurons(model, top=5),
        mechcna.transform_through_attention(
            model, (0, 3), [(1, None, 0)], prompt=PROMPTS[1]
        ).tokens(3),
        mechcna.query_neuron_tokens(model, (0, 3), (1, 2), k=3),
        mechcna.ffn_keys(model, 1, 3),
    ]
    for r in results:
        assert r.processing == NO_PROCESSING, type(r).__name__
