import pytest
import torch

from mechcna import MechcnaError, NeuronEdit, intervene
from mechcna.attribution import neuron_importance
from mechcna.methods import METHODS, comparison_scores, evaluate_methods, target_ranks
from tests.helpers import PROMPTS, build
from tests.reference import frozen_bs


@pytest.mark.parametrize("paper_compat", [False, True])
def test_comparison_scores_match_literal(kind, paper_compat):
    model = build(kind, dtype=torch.float64)
    res = comparison_scores(model, PROMPTS[:2], paper_compat=paper_compat)
    assert res.scores.shape == (2, len(METHODS), 2, model.cfg.d_mlp)
    imp = neuron_importance(model, PROMPTS[:2], paper_compat=paper_compat)
    torch.testing.assert_close(res.method("log_prob_increase"), imp.scores, atol=1e-10, rtol=0)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS[:2]):
            tokens = model.to_tokens(prompt)
            logits, cache = model.run_with_cache(tokens)
            w = int(logits[0, -1].argmax())
            s = cache["ln_final.hook_scale"][0, -1, 0]
            for l in (0, 1):
                m = cache[f"blocks.{l}.mlp.hook_post"][0, -1]
                W = model.blocks[l].mlp.W_out
                alone = frozen_bs(model, m[:, None] * W, s, paper_compat).log_softmax(-1)
                torch.testing.assert_close(
                    res.method("log_prob")[i, l], alone[:, w], atol=1e-10, rtol=0
                )
                rank = (1 + (alone > alone[:, w : w + 1]).sum(-1)).double()
                torch.testing.assert_close(res.method("rank")[i, l], 1.0 / rank, atol=0, rtol=0)
                torch.testing.assert_close(
                    res.method("coef_x_rank")[i, l], m / rank, atol=1e-12, rtol=0
                )
                torch.testing.assert_close(
                    res.method("norm")[i, l], (m[:, None] * W).norm(dim=-1), atol=1e-12, rtol=0
                )
                base = cache[f"blocks.{l}.hook_resid_mid"][0, -1]
                p0 = frozen_bs(model, base, s, paper_compat).softmax(-1)[w]
                p1 = frozen_bs(model, base + m[:, None] * W, s, paper_compat).softmax(-1)[:, w]
                torch.testing.assert_close(
                    res.method("prob_increase")[i, l], p1 - p0, atol=1e-10, rtol=0
                )


def test_evaluate_methods_matches_manual_intervention():
    model = build("gpt2", dtype=torch.float64)
    scores = comparison_scores(model, PROMPTS)
    table = evaluate_methods(model, PROMPTS, k=5, scores=scores, progress=False)
    assert list(table["method"]) == ["original", *METHODS]
    probs = []
    for i, prompt in enumerate(PROMPTS):
        edit = NeuronEdit(scores.top_neurons("log_prob_increase", i, 5))
        with torch.no_grad(), intervene(model, edit):
            lp = model(prompt)[0, -1].log_softmax(-1)
        probs.append(float(lp[int(scores.target_ids[i])].exp()))
    row = table.set_index("method").loc["log_prob_increase"]
    assert row["prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-12)
    original = table.set_index("method").loc["original"]
    assert 0 < original["mrr"] <= 1 and original["prob"] > row["prob"]
    with pytest.raises(MechcnaError, match="unknown method"):
        scores.method("nope")


@pytest.mark.parametrize("offset", ["zero", "constant", "varying"])
def test_target_ranks_match_literal(offset):
    """The per-target fast path (constant offset) and the chunked path equal a direct count,
    with exact ties in the rows and zero coefficients."""
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(40, 30, generator=gen, dtype=torch.float64).round(decimals=1)
    coef = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    coef[0, :5] = 0
    target = torch.tensor([4, 4, 17])
    off = {
        "zero": torch.zeros(30, dtype=torch.float64),
        "constant": torch.full((30,), 0.75, dtype=torch.float64),
        "varying": torch.randn(30, generator=gen, dtype=torch.float64),
    }[offset]
    logits = coef[..., None] * U + off
    own = logits.gather(-1, target[:, None, None].expand(-1, 40, 1))
    want = (1 + (logits > own).sum(-1)).double()
    assert (want[0, :5] == 1).all() or offset == "varying"
    got = target_ranks(U, coef, off, target, chunk=7)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
