import pytest
import torch

from mechcna import MechcnaError, project_to_vocab, top_tokens
from tests.helpers import build


def test_top_tokens_sign_aware(kind):
    model = build(kind, dtype=torch.float64)
    plain = top_tokens(model, (1, 3), k=5)
    flipped = top_tokens(model, (1, 3), k=5, coefficient=-2.0)
    assert [t for t, _ in plain.top] == [t for t, _ in flipped.bottom]
    assert [t for t, _ in plain.bottom] == [t for t, _ in flipped.top]
    values = [v for _, v in plain.top]
    assert values == sorted(values, reverse=True)
    logits = project_to_vocab(model, model.blocks[1].mlp.W_out[3], paper_compat=True)
    assert plain.top[0][1] == pytest.approx(float(logits.max()))
    assert plain.bottom[0][1] == pytest.approx(float(logits.min()))
    frame = plain.to_frame()
    assert list(frame.columns) == ["side", "rank", "token", "value"] and len(frame) == 10


def test_top_tokens_top_k_like_every_result():
    """``TopTokens.top(k)``/``.bottom(k)`` are DataFrames (as every result's ``.top(k)``),
    checked against a literal sort of the projected logits; the tuple access still works."""
    model = build("gpt2", dtype=torch.float64)
    res = top_tokens(model, (1, 3), k=6, coefficient=-1.5)
    logits = project_to_vocab(model, -1.5 * model.blocks[1].mlp.W_out[3], paper_compat=True)
    order = sorted(range(logits.shape[0]), key=lambda i: -float(logits[i]))
    expect = [model.to_single_str_token(i) for i in order]
    top3 = res.top(3)
    assert list(top3.columns) == ["rank", "token", "value"]
    assert top3["token"].tolist() == expect[:3] and top3["rank"].tolist() == [0, 1, 2]
    assert top3["value"].tolist() == pytest.approx([float(logits[i]) for i in order[:3]])
    assert res.bottom(2)["token"].tolist() == expect[::-1][:2]
    assert len(res.top()) == 6 and len(res.top(100)) == 6
    assert res.top.tokens() == expect[:6] == [t for t, _ in res.top]
    assert res.top[0][0] == expect[0] and len(res.bottom) == 6
    with pytest.raises(MechcnaError, match="k"):
        res.top(0)


def test_projection_is_affine_and_batched(kind):
    model = build(kind, dtype=torch.float64)
    v = torch.randn(4, 3, model.cfg.d_model, dtype=torch.float64)
    out = project_to_vocab(model, v, 2.0, paper_compat=True)
    assert out.shape == (4, 3, model.cfg.d_vocab)
    summed = project_to_vocab(model, v.sum(1), 2.0, paper_compat=True)
    torch.testing.assert_close(out.sum(1), summed, atol=1e-10, rtol=0)


def test_projection_errors():
    model = build("gpt2")
    with pytest.raises(MechcnaError, match="d_model"):
        project_to_vocab(model, torch.zeros(5))
    with pytest.raises(MechcnaError, match="neuron 999 out of range"):
        top_tokens(model, (0, 999))
