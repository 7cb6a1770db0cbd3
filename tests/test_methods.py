import pytest
import torch

from mechcna import MechcnaError, NeuronEdit, intervene
from mechcna.analyses.attribution import neuron_importance
from mechcna.analyses.methods import METHODS, comparison_scores, evaluate_methods, target_ranks
from mechcna.engine.blocks import BlockCache, layer_rows, model_cache
from tests.helpers import PROMPTS, build
from tests.reference import frozen_bs


def _assert_literal(model, res, prompts, paper_compat=False, atol=1e-10):
    """Every method's scores against the literal computation (``frozen_bs`` per neuron);
    ranks exactly, the plain products to rounding."""
    tight, rel = (1e-12, 0.0) if atol < 1e-6 else (1e-6, 1e-5)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            tokens = model.to_tokens(prompt)
            logits, cache = model.run_with_cache(tokens)
            w = int(logits[0, -1].argmax())
            s = cache["ln_final.hook_scale"][0, -1, 0]
            for l in range(model.cfg.n_layers):
                m = cache[f"blocks.{l}.mlp.hook_post"][0, -1]
                W = model.blocks[l].mlp.W_out
                alone = frozen_bs(model, m[:, None] * W, s, paper_compat).log_softmax(-1)
                torch.testing.assert_close(
                    res.method("log_prob")[i, l], alone[:, w], atol=atol, rtol=0
                )
                rank = (1 + (alone > alone[:, w : w + 1]).sum(-1)).to(alone.dtype)
                torch.testing.assert_close(res.method("rank")[i, l], 1.0 / rank, atol=0, rtol=0)
                torch.testing.assert_close(
                    res.method("coef_x_rank")[i, l], m / rank, atol=tight, rtol=rel
                )
                torch.testing.assert_close(
                    res.method("norm")[i, l], (m[:, None] * W).norm(dim=-1), atol=tight, rtol=rel
                )
                base = cache[f"blocks.{l}.hook_resid_mid"][0, -1]
                p0 = frozen_bs(model, base, s, paper_compat).softmax(-1)[w]
                p1 = frozen_bs(model, base + m[:, None] * W, s, paper_compat).softmax(-1)[:, w]
                torch.testing.assert_close(
                    res.method("prob_increase")[i, l], p1 - p0, atol=atol, rtol=0
                )
                lp0 = frozen_bs(model, base, s, paper_compat).log_softmax(-1)[w]
                lp1 = frozen_bs(model, base + m[:, None] * W, s, paper_compat).log_softmax(-1)
                torch.testing.assert_close(
                    res.method("log_prob_increase")[i, l], lp1[:, w] - lp0, atol=atol, rtol=0
                )


@pytest.mark.parametrize("paper_compat", [False, True])
def test_comparison_scores_match_literal(kind, paper_compat):
    model = build(kind, dtype=torch.float64)
    res = comparison_scores(model, PROMPTS[:2], paper_compat=paper_compat)
    assert res.scores.shape == (2, len(METHODS), 2, model.cfg.d_mlp)
    imp = neuron_importance(model, PROMPTS[:2], paper_compat=paper_compat)
    torch.testing.assert_close(res.method("log_prob_increase"), imp.scores, atol=1e-10, rtol=0)
    _assert_literal(model, res, PROMPTS[:2], paper_compat)


def test_comparison_scores_float32_fill_the_row_cache_and_follow_weight_changes(kind):
    """float32: rows stored in 16 bits in the model's cache. The rows comparison_scores
    fills serve neuron_importance (equal to a fresh cache's), and an in-place weight edit
    is never answered from the old rows (content checksums)."""
    model = build(kind)
    res = comparison_scores(model, PROMPTS[:2])
    _assert_literal(model, res, PROMPTS[:2], atol=1e-4)
    cache = model_cache(model)
    stores = [layer_rows(model, "ffn", l, cache).store for l in range(2)]
    assert all(bool(store.known.all()) for store in stores)
    imp = neuron_importance(model, PROMPTS[:2])
    fresh = neuron_importance(model, PROMPTS[:2], cache=BlockCache(disk=False))
    torch.testing.assert_close(imp.scores, fresh.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.method("log_prob_increase"), imp.scores, atol=1e-5, rtol=0)
    with torch.no_grad():
        model.blocks[1].mlp.W_out.data.mul_(1.5)
    changed = comparison_scores(model, PROMPTS[:2])
    assert layer_rows(model, "ffn", 0, cache).store is stores[0]
    assert layer_rows(model, "ffn", 1, cache).store is not stores[1]
    assert not torch.equal(changed.method("log_prob")[:, 1], res.method("log_prob")[:, 1])
    _assert_literal(model, changed, PROMPTS[:2], atol=1e-4)


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
