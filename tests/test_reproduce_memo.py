"""A reproduce run with a checkpoint keeps its attribution calls shard by shard
(mechcna.reproduce.scale.memo): the merged shards equal one call, a rerun reads them back, and
any change of weights, prompts, targets or options computes afresh."""

import pytest
import torch

import mechcna.analyses.attribution as attribution
import mechcna.analyses.comparative as comparative
from mechcna.engine.blocks import BlockCache
from mechcna.interventions.edits import HeadAblation
from mechcna.reproduce import scale
from tests.helpers import build

PROMPTS = [f"{a}+{b}=" for a in range(1, 6) for b in range(2, 6)]  # 20: shards of 16 and 4


@pytest.fixture(scope="module")
def model():
    return build("llama", dtype=torch.float64)


def refuse(*args, **kwargs):
    raise AssertionError("computed again")


@pytest.mark.parametrize("name", ["neuron_importance", "attention_neuron_importance"])
def test_shards_merge_to_one_call_and_a_rerun_reads_them(name, model, tmp_path, monkeypatch):
    targets = ["3"] * 10 + ["5"] * 10
    whole = getattr(attribution, name)(model, PROMPTS, targets, progress=False)
    with scale.memo(tmp_path):
        kept = getattr(scale, name)(model, PROMPTS, targets, progress=False)
    assert len(list(tmp_path.glob(f"{name}-*.pt"))) == 2
    assert kept.scores.shape == whole.scores.shape
    torch.testing.assert_close(kept.scores, whole.scores, rtol=0, atol=1e-10)
    assert kept.targets == whole.targets
    monkeypatch.setattr(attribution, name, refuse)
    with scale.memo(tmp_path):
        again = getattr(scale, name)(model, PROMPTS, targets, progress=False)
    assert torch.equal(again.scores, kept.scores)
    with scale.memo(tmp_path), pytest.raises(AssertionError, match="computed again"):
        getattr(scale, name)(model, PROMPTS, ["3"] * 20, progress=False)  # other targets
    with scale.memo(tmp_path), pytest.raises(AssertionError, match="computed again"):
        getattr(scale, name)(model, PROMPTS[::-1], targets, progress=False)  # other prompts
    with scale.memo(tmp_path), pytest.raises(AssertionError, match="computed again"):
        getattr(scale, name)(model, PROMPTS, targets, progress=False, layers=[0])  # options
    changed = build("llama", dtype=torch.float64)
    with torch.no_grad():
        changed.blocks[0].mlp.W_out[0, 0] += 1e-3
    with scale.memo(tmp_path), pytest.raises(AssertionError, match="computed again"):
        getattr(scale, name)(changed, PROMPTS, targets, progress=False)  # other weights


def test_dataset_cna_through_the_memo_equals_one_call(model, tmp_path, monkeypatch):
    ablate = HeadAblation([(1, 0)])
    whole = comparative.compare_neurons(model, PROMPTS, ablate, None, progress=False)
    with scale.memo(tmp_path):
        kept = scale.compare_neurons(model, PROMPTS, ablate, None, progress=False)
    torch.testing.assert_close(kept.scores, whole.scores, rtol=0, atol=1e-10)
    monkeypatch.setattr(comparative, "compare_neurons", refuse)
    with scale.memo(tmp_path):
        again = scale.compare_neurons(model, PROMPTS, ablate, None, progress=False)
    assert torch.equal(again.scores, kept.scores)
    with scale.memo(tmp_path), pytest.raises(AssertionError, match="computed again"):
        scale.compare_neurons(model, PROMPTS, HeadAblation([(1, 1)]), None, progress=False)


def test_calls_it_cannot_key_run_once_and_keep_nothing(model, tmp_path):
    with scale.memo(tmp_path):
        scale.neuron_importance(model, PROMPTS[:3], None, cache=BlockCache(), progress=False)
        scale.neuron_importance(model, "3+5=", None, progress=False)
    assert not list(tmp_path.iterdir())
    scale.neuron_importance(model, PROMPTS[:3], None, progress=False)  # outside: nothing kept
    assert not list(tmp_path.iterdir())


def test_the_method_comparison_is_kept_whole(model, tmp_path, monkeypatch):
    # its exact rows are formed once per call: shards would form them once per shard
    import mechcna.analyses.methods as methods

    whole = methods.comparison_scores(model, PROMPTS, None)
    with scale.memo(tmp_path):
        kept = scale.comparison_scores(model, PROMPTS, None)
    assert len(list(tmp_path.glob("comparison_scores-*.pt"))) == 1
    torch.testing.assert_close(kept.scores, whole.scores, rtol=0, atol=0)
    monkeypatch.setattr(methods, "comparison_scores", refuse)
    with scale.memo(tmp_path):
        assert torch.equal(scale.comparison_scores(model, PROMPTS, None).scores, kept.scores)
