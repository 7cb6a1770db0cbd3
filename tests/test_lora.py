"""LoRA on attention layers: zero adapters change nothing, merging equals the parametrised
forward, the delta is the flattened low-rank product, training lowers the loss."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from mechcna import MechcnaError, arithmetic_dataset
from mechcna.applications.lora import attach_lora, lora_finetune, lora_layer_sweep, merge_lora
from tests.helpers import build


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine two threads per
    process make training steps ~30x slower (measured); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["3 + 5 =", "12 - 7 =", "the sum of 4 and 2 is"]


def _tokens(model):
    return model.to_tokens(PROMPTS[0])


@pytest.mark.parametrize("rank", [0, 4])
def test_zero_up_leaves_the_model_bitwise_unchanged(model, rank):
    tokens = _tokens(model)
    with torch.no_grad():
        ref = model(tokens)
        work = copy.deepcopy(model)
        attach_lora(work, [0, 1], ("q", "k", "v", "o"), rank=rank)
        assert torch.equal(work(tokens), ref)
        merge_lora(work)
        assert torch.equal(work(tokens), ref)
    for name, p in model.named_parameters():
        assert torch.equal(p, work.get_parameter(name)), name


def test_merge_equals_parametrised_forward_and_delta_is_low_rank(kind):
    model = build(kind, dtype=torch.float64)
    tokens = _tokens(model)
    work = copy.deepcopy(model)
    adapters = attach_lora(work, 1, ("q", "k", "v", "o"), rank=2, alpha=4.0, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=gen, dtype=torch.float64))
        live = work(tokens)
        deltas = {n: a.delta().clone() for n, a in adapters.items()}
    # reference: the flattened Hugging Face layout, q_proj-like [d_model, head*d_head]
    for name, a in adapters.items():
        heads = a.shape[0]
        flat = (a.down @ a.up) * 2.0  # alpha / rank
        if a.target == "o":
            ref = flat.reshape(heads, a.shape[1], a.shape[2])
        else:
            ref = flat.reshape(a.shape[1], heads, a.shape[2]).permute(1, 0, 2)
        torch.testing.assert_close(deltas[name], ref, rtol=0, atol=1e-12)
        assert torch.linalg.matrix_rank(flat) <= 2
    merge_lora(work)
    assert not parametrize.is_parametrized(work.blocks[1].attn)
    with torch.no_grad():
        torch.testing.assert_close(work(tokens), live, rtol=0, atol=1e-10)
        for name, d in deltas.items():
            diff = work.get_parameter(name) - model.get_parameter(name)
            torch.testing.assert_close(diff, d, rtol=0, atol=1e-12)
        # layer 0 is untouched
        assert torch.equal(work.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q)


def test_bad_arguments_raise_before_work(model):
    with pytest.raises(MechcnaError, match="layer"):
        attach_lora(copy.deepcopy(model), 7)
    with pytest.raises(MechcnaError, match="targets"):
        attach_lora(copy.deepcopy(model), 0, ("x",))
    with pytest.raises(MechcnaError, match="rank"):
        attach_lora(copy.deepcopy(model), 0, rank=-1)
    work = copy.deepcopy(model)
    attach_lora(work, 0)
    with pytest.raises(MechcnaError, match="already"):
        attach_lora(work, 1)


def _data(model):
    return arithmetic_dataset(
        ["+", "-"], 1, templates=4, n_pairs=40, tokenizer=model, nonnegative_subtraction=False
    )


def test_loss_at_scored_positions_equals_cross_entropy_of_full_logits(kind):
    from mechcna.applications.lora import _loss
    from mechcna.interventions.prompts import prepare_prompts, single_token_ids

    model = build(kind, dtype=torch.float64)
    data = _data(model)
    batch = prepare_prompts(model, data.prompts[:12])
    target = single_token_ids(model, data.targets[:12])
    with torch.no_grad():
        logits = model(batch.tokens)[batch.batch_index, batch.positions]
        ref = -logits.log_softmax(-1).gather(-1, target[:, None]).mean()
        fast = _loss(model, batch.tokens, batch.positions, target)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)


def test_training_lowers_the_loss_and_leaves_the_input_model_alone(kind):
    model = build(kind)
    data = _data(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    run = lora_finetune(
        model, 0, data, steps=60, batch_size=16, lr=1e-2, rank=4, seed=0, progress=False
    )
    assert len(run.losses) == 60
    first, last = sum(run.losses[:5]) / 5, sum(run.losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert run.model is not None and run.accuracy_after >= 0.0
    assert set(run.to_frame().columns) == {"step", "loss"}
    assert run.plot().layout.xaxis.title.text == "step"
    # the recorded deltas rebuild the merged model
    rebuilt = run.apply_to(model)
    for n, p in run.model.named_parameters():
        torch.testing.assert_close(rebuilt.get_parameter(n), p, rtol=0, atol=1e-6)
    # the same seed gives the same run
    again = lora_finetune(
        model, 0, data, steps=60, batch_size=16, lr=1e-2, rank=4, seed=0, progress=False
    )
    assert again.losses == run.losses


def test_sweep_one_run_per_layer(model):
    data = _data(model)
    sweep = lora_layer_sweep(model, [0, 1], data, steps=3, progress=False, keep_models=False)
    frame = sweep.to_frame()
    assert frame["layer"].tolist() == [0, 1]
    assert all(r.model is None for r in sweep.runs)
    assert sweep.plot().layout.xaxis.dtick == 1
    with pytest.raises(MechcnaError, match="no training cases"):
        lora_finetune(model, 0, data.filter(operation="*"), steps=1, progress=False)
