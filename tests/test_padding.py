"""Padded batches equal prompt-by-prompt runs, also under interventions at given positions.

Intervention ``positions`` mean each prompt's own real positions (``-1``: its last real token),
never a pad column of the right-padded batch (issue 13, defect 1).
"""

import pytest
import torch

import mechcna
from mechcna import HeadAblation, NeuronEdit, Patch, evaluate_accuracy
from mechcna.analyses.comparative import compare_neurons
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import AttentionNeuronEdit, KeepNeurons, NeuronMask
from mechcna.tasks.arithmetic import arithmetic_dataset, default_tokenizer
from tests.helpers import PROMPTS, gpt2_cfg, llama_cfg, randomize_biases_and_norms

IVS = {
    "head_last": lambda: [HeadAblation([(0, 1), (1, 2)], positions=[-1])],
    "neuron_last_two": lambda: [NeuronEdit([(0, 3), (1, 5)], "scale", 4.0, positions=[-2, -1])],
    "keep_first": lambda: [KeepNeurons([(1, 0)], layers=[1], positions=[0, -1])],
    "attention_neurons_last": lambda: [
        AttentionNeuronEdit([(1, 0, h, d) for h in range(4) for d in range(8)] + [(0, -1, 1, 2)])
    ],
}


def _arith_model(kind: str):
    tok = default_tokenizer()
    cfg = (gpt2_cfg if kind == "gpt2" else llama_cfg)(d_vocab=len(tok))
    model = mechcna.load_model(cfg, device="cpu", dtype=torch.float64, tokenizer=tok, seed=0)
    return randomize_biases_and_norms(model)


@pytest.mark.parametrize("iv", sorted(IVS))
def test_accuracy_batched_equals_one_by_one(kind, iv):
    model = _arith_model(kind)
    ds = arithmetic_dataset(n_pairs=1, seed=1, digits=[1, 2], word_prob=0.3).filter(operation="+")
    lengths = {len(model.to_tokens(p)[0]) for p in ds.prompts}
    assert len(lengths) > 1  # the batch really is padded
    batched = evaluate_accuracy(model, ds, IVS[iv](), batch_size=len(ds), progress=False)
    single = evaluate_accuracy(model, ds, IVS[iv](), batch_size=1, progress=False)
    torch.testing.assert_close(batched.logprob, single.logprob, atol=1e-10, rtol=0)
    assert torch.equal(batched.correct, single.correct)
    # And the intervention did something at the last position.
    clean = evaluate_accuracy(model, ds, batch_size=len(ds), progress=False)
    assert (clean.logprob - batched.logprob).abs().max() > 1e-6


@pytest.mark.parametrize(
    "analysis",
    ["layer_importance", "head_importance", "neuron_importance", "attention_neuron_importance"],
)
def test_attribution_batched_equals_one_by_one(model64, analysis):
    fn = getattr(mechcna, analysis)
    ivs = IVS["head_last"]()
    batched = fn(model64, PROMPTS, interventions=ivs)
    for i, prompt in enumerate(PROMPTS):
        single = fn(model64, [prompt], interventions=ivs)
        n = single.scores.shape[2] if analysis == "attention_neuron_importance" else None
        got = batched.scores[i, :, :n] if n else batched.scores[i]
        torch.testing.assert_close(got, single.scores[0], atol=1e-10, rtol=0)
        assert batched.targets[i] == single.targets[0]


def test_query_and_transfer_batched_equal_one_by_one(model64):
    ivs = IVS["neuron_last_two"]()
    batched = mechcna.query_neurons(model64, PROMPTS, k=5, interventions=ivs)
    for i, prompt in enumerate(PROMPTS):
        single = mechcna.query_neurons(model64, [prompt], k=5, interventions=ivs)
        torch.testing.assert_close(batched.scores[i], single.scores[0], atol=1e-10, rtol=0)


def test_cna_batched_equals_one_by_one(model64):
    iv = HeadAblation([(0, 1)], positions=[-1])
    batched = compare_neurons(model64, PROMPTS, iv)
    for i, prompt in enumerate(PROMPTS):
        single = compare_neurons(model64, [prompt], iv)
        torch.testing.assert_close(batched.scores[i], single.scores[0], atol=1e-10, rtol=0)


def test_patch_and_mask_positions_are_per_prompt(model64):
    batch = mechcna.interventions.prompts.prepare_prompts(model64, PROMPTS)
    d_model = model64.cfg.d_model
    src = torch.randn(len(PROMPTS), batch.tokens.shape[1], d_model, dtype=torch.float64)
    name = "blocks.1.hook_resid_pre"
    patch = Patch(name, src, positions=[-1])
    batched = mechcna.layer_importance(model64, PROMPTS, interventions=[patch])
    mask = torch.zeros(len(PROMPTS), 2, model64.cfg.d_mlp, dtype=torch.bool)
    mask[:, 1, :7] = True
    masked = mechcna.layer_importance(
        model64, PROMPTS, interventions=[NeuronMask(mask, positions=[-1])]
    )
    for i, prompt in enumerate(PROMPTS):
        n = int(batch.lengths[i])
        own = Patch(name, src[i : i + 1, :n], positions=[-1])
        single = mechcna.layer_importance(model64, [prompt], interventions=[own])
        torch.testing.assert_close(batched.scores[i], single.scores[0], atol=1e-10, rtol=0)
        one = mechcna.layer_importance(
            model64, [prompt], interventions=[NeuronMask(mask[i : i + 1], positions=[-1])]
        )
        torch.testing.assert_close(masked.scores[i], one.scores[0], atol=1e-10, rtol=0)


def test_position_beyond_a_short_prompt_is_an_error(model64):
    short = min(len(model64.to_tokens(p)[0]) for p in PROMPTS)
    with pytest.raises(MechcnaError, match="outside a prompt"):
        mechcna.layer_importance(
            model64, PROMPTS, interventions=[HeadAblation([(0, 0)], positions=[short])]
        )
    with pytest.raises(MechcnaError, match="outside a prompt"):
        mechcna.layer_importance(
            model64, PROMPTS, interventions=[HeadAblation([(0, 0)], positions=[-short - 1])]
        )


def test_attention_neuron_edit_removes_a_repeated_neuron_once(model64):
    neurons = [(1, 0, 2, 3), (0, 1, 1, 5)]
    once = mechcna.layer_importance(model64, PROMPTS, interventions=[AttentionNeuronEdit(neurons)])
    twice = mechcna.layer_importance(
        model64, PROMPTS, interventions=[AttentionNeuronEdit(neurons + neurons[:1])]
    )
    torch.testing.assert_close(once.scores, twice.scores, atol=1e-12, rtol=0)


def test_mean_over_prompt_strings_excludes_padding(model64):
    """Mean ablation over prompt strings (right-padded) equals the mean over token ids with
    the padding masked out, and over one unpadded prompt equals that prompt's own mean."""
    heads = [(0, 1), (1, 2)]
    by_strings = HeadAblation.mean_over(model64, heads, PROMPTS)
    batch = mechcna.interventions.prompts.prepare_prompts(model64, PROMPTS)
    mask = torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]
    by_ids = HeadAblation.mean_over(model64, heads, batch.tokens, attention_mask=mask)
    one = HeadAblation.mean_over(model64, heads, PROMPTS[:1])
    alone = HeadAblation.mean_over(model64, heads, model64.to_tokens(PROMPTS[0]))
    for head in heads:
        assert by_strings.means is not None and by_ids.means is not None
        torch.testing.assert_close(by_strings.means[head], by_ids.means[head], atol=1e-12, rtol=0)
        assert one.means is not None and alone.means is not None
        torch.testing.assert_close(one.means[head], alone.means[head], atol=1e-12, rtol=0)
