"""evaluate_accuracy: equals a per-case loop, under interventions too; results and plots."""

import plotly.graph_objects as go
import pytest
import torch

import mechcna
from mechcna import HeadAblation, NeuronEdit, apply_to_weights, evaluate_accuracy
from mechcna.analyses.evaluation import AccuracyResult
from mechcna.errors import MechcnaError, TokenizationError
from mechcna.tasks.arithmetic import arithmetic_dataset, default_tokenizer
from tests.helpers import gpt2_cfg, llama_cfg, randomize_biases_and_norms
from tests.test_arithmetic import gpt2_like_tokenizer


def _model(kind: str, tokenizer=None):
    tok = tokenizer or default_tokenizer()
    cfg = (gpt2_cfg if kind == "gpt2" else llama_cfg)(d_vocab=len(tok))
    model = mechcna.load_model(cfg, device="cpu", tokenizer=tok, seed=0)
    return randomize_biases_and_norms(model)


def _reference(model, dataset):
    """Obviously-correct loop: one unpadded forward pass per case."""
    correct, logprob = [], []
    with torch.no_grad():
        for case in dataset:
            logp = model(model.to_tokens(case.prompt))[0, -1].log_softmax(-1)
            target = model.to_tokens(case.target, prepend_bos=False)[0, 0]
            correct.append(bool(logp.argmax() == target))
            logprob.append(float(logp[target]))
    return torch.tensor(correct), torch.tensor(logprob)


@pytest.fixture(scope="module")
def small_dataset():
    return arithmetic_dataset(n_pairs=2, seed=1, digits=[1, 2], word_prob=0.3)


def test_matches_per_case_loop(kind, small_dataset):
    model = _model(kind)
    result = evaluate_accuracy(model, small_dataset, batch_size=7, progress=False)
    correct, logprob = _reference(model, small_dataset)
    assert torch.equal(result.correct.cpu(), correct)
    torch.testing.assert_close(result.logprob.cpu(), logprob, atol=1e-5, rtol=1e-5)
    assert result.accuracy == pytest.approx(float(correct.float().mean()))


def test_under_interventions_matches_edited_weights(kind, small_dataset):
    small_dataset = small_dataset.filter(template=[1, 4], digits=1)
    model = _model(kind)
    interventions = [HeadAblation([(1, 0), (0, 2)]), NeuronEdit([(0, 3), (1, 5)])]
    base = evaluate_accuracy(model, small_dataset, progress=False)
    cut = evaluate_accuracy(model, small_dataset, interventions, batch_size=16, progress=False)
    edited = apply_to_weights(model, *interventions)
    correct, logprob = _reference(edited, small_dataset)
    assert torch.equal(cut.correct.cpu(), correct)
    torch.testing.assert_close(cut.logprob.cpu(), logprob, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cut.logprob, base.logprob)
    assert len(cut.interventions) == 2
    assert not model.hook_dict["blocks.0.attn.hook_z"].fwd_hooks  # hooks removed after


def test_gpt2_like_tokenizer_with_multi_digit_targets():
    tok = gpt2_like_tokenizer()
    model = _model("gpt2", tok)
    model.cfg.default_prepend_bos = False  # as GPT-2 in the papers
    ds = arithmetic_dataset("+", 2, n_pairs=3, tokenizer=tok)
    result = evaluate_accuracy(model, ds, batch_size=5, progress=False)
    correct, logprob = _reference(model, ds)
    assert torch.equal(result.correct.cpu(), correct)
    torch.testing.assert_close(result.logprob.cpu(), logprob, atol=1e-5, rtol=1e-5)


def test_frames_and_plot(small_dataset):
    model = _model("llama")
    result = evaluate_accuracy(model, small_dataset, progress=False)
    assert isinstance(result, AccuracyResult)
    cells = result.to_frame()
    assert list(cells.columns) == [
        "operation",
        "digits",
        "template",
        "n",
        "accuracy",
        "mean_logprob",
    ]
    assert len(cells) == 4 * 2 * 4 and cells["n"].sum() == len(small_dataset)
    frame = small_dataset.to_frame()
    one = frame[(frame.operation == "+") & (frame.digits == 2) & (frame.template == 3)]
    row = cells[(cells.operation == "+") & (cells.digits == 2) & (cells.template == 3)].iloc[0]
    assert row["n"] == len(one)
    mask = torch.tensor(((frame.operation == "+") & (frame.digits == 2)).to_numpy())
    mask &= torch.tensor((frame.template == 3).to_numpy())
    assert row["accuracy"] == pytest.approx(float(result.correct[mask].float().mean()))
    by_kind = result.to_frame(["operation", "kind"])
    assert set(by_kind["kind"]) <= {"memorize", "change-one"}
    assert len(result.case_frame()) == len(small_dataset)
    fig = result.plot()
    assert isinstance(fig, go.Figure) and len(fig.data[0].x) == len(cells)  # type: ignore[attr-defined]


def test_bad_input(small_dataset):
    model = _model("llama")
    with pytest.raises(MechcnaError, match="batch_size"):
        evaluate_accuracy(model, small_dataset, batch_size=0, progress=False)
    bad = mechcna.ArithmeticDataset(
        (mechcna.ArithmeticCase("1+2=", "3 4", "+", 1, 4, "memorize", 1, 2, "3", 0),)
    )
    with pytest.raises(TokenizationError, match="single token"):
        evaluate_accuracy(model, bad, progress=False)
    with pytest.raises(mechcna.errors.EmptyInputError, match="no cases"):
        evaluate_accuracy(model, small_dataset.filter(digits=3), progress=False)


def test_plot_is_in_percent_and_names_interventions_briefly(small_dataset):
    from mechcna.analyses.evaluation import describe_intervention

    model = _model("llama")
    heads = [(layer, head) for layer in range(2) for head in range(2)]
    res = evaluate_accuracy(model, small_dataset, [HeadAblation(heads)], progress=False)
    fig = res.plot()
    assert fig.layout.yaxis.range == (0, 100)
    assert list(fig.data[0].y) == pytest.approx(list(100 * res.to_frame()["accuracy"]))
    title = fig.layout.title.text
    assert f"{100 * res.accuracy:.1f}%" in title
    assert "HeadAblation(zero: 0.0, 0.1, 1.0, 1.1)" in title and "positions" not in title
    assert max(len(line) for line in title.split("<br>")) < 100
    assert describe_intervention(NeuronEdit([(0, i) for i in range(9)])).endswith("(+5 more))")
