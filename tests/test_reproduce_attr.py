"""The attribution-paper stages of issue 22 against slow, literal references on tiny models,
and their claim tests on synthetic numbers that make them hold and fail."""

import random

import numpy as np
import pytest
import torch

import mechcna
from mechcna.analyses.attribution import attention_neuron_importance, head_importance
from mechcna.analyses.query import attention_neuron_queries, query_neurons
from mechcna.reproduce import ReproduceSettings, attr_more, attr_stages, stats
from mechcna.tasks.knowledge import KnowledgeDataset, KnowledgePrompt
from tests.helpers import build
from tests.reference import frozen_bs

PROMPTS12 = [
    "the sum of 3 and 5 is", "12+7=", "Tim Duncan plays the sport of", "a man works as",
    "a woman works as a", "3+4=", "the product of 2 and 6 is", "Q : what is 5 plus 2 ? A :",
    "the difference between 9 and 4 is", "7-2=", "the ratio of 8 and 2 is", "Tim Duncan plays",
]  # fmt: skip
SETTINGS = ReproduceSettings(histogram_k=7, query_k=4, query_value_k=9, query_zero_k=20)


def _dataset(model, n: int = 12) -> KnowledgeDataset:
    """The model's own top-1 answers to ``n`` prompts, alternating between two types."""
    items = []
    for i, p in enumerate(PROMPTS12[:n]):
        with torch.no_grad():
            top = int(model(model.to_tokens(p))[0, -1].argmax())
        items.append(KnowledgePrompt(p, model.to_single_str_token(top), ("color", "month")[i % 2]))
    return KnowledgeDataset(tuple(items))


@torch.no_grad()
def _answer_stats(model, prompt: str, answer: str, hooks=()) -> tuple[float, float]:
    """Reciprocal rank and probability of the answer, with literal forward hooks."""
    w = model.to_single_token(answer)
    logits = model.run_with_hooks(model.to_tokens(prompt), fwd_hooks=list(hooks))[0, -1]
    lp = logits.double().log_softmax(-1)
    return 1.0 / (int((lp > lp[w]).sum()) + 1), float(lp[w].exp())


def _zero_neurons(neurons):
    hooks = []
    for l in sorted({l for l, _ in neurons}):
        idx = [j for ll, j in neurons if ll == l]

        def hook(act, hook, idx=idx):
            act[..., idx] = 0.0
            return act

        hooks.append((f"blocks.{l}.mlp.hook_post", hook))
    return hooks


# ------------------------------------------------------------------ Table 7
def test_query_zeroing_matches_literal_hooks(kind):
    model = build(kind, dtype=torch.float64)
    data = _dataset(model, 4)
    queries = query_neurons(model, data.prompts, data.answers, k=4)
    per = attr_stages.query_zeroing_effects(model, data, queries, k=12, seed=3, draws=5,
                                            share_k=3)  # fmt: skip
    rng = random.Random(3)
    n_layers, d_mlp = queries.scores.shape[1:]
    for i, item in enumerate(data):
        s = queries.scores[i]
        ranked = sorted(((float(s[l, j]), (l, j)) for l in range(n_layers) for j in range(d_mlp)),
                        key=lambda x: -x[0])  # fmt: skip
        top = [n for v, n in ranked[:12] if v > 0]  # positive query scores only
        assert row_k(per, i) == len(top)
        assert len(top) == 12 or ranked[len(top)][0] <= 0
        before = _answer_stats(model, item.prompt, item.answer)
        after = _answer_stats(model, item.prompt, item.answer, _zero_neurons(top))
        row = per.iloc[i]
        assert (row["rr"], row["prob"]) == pytest.approx(before, rel=1e-9)
        assert (row["rr_top"], row["prob_top"]) == pytest.approx(after, rel=1e-9)
        few = _answer_stats(model, item.prompt, item.answer, _zero_neurons(top[:3]))
        assert (row["rr_share"], row["prob_share"]) == pytest.approx(few, rel=1e-9)
        for d in range(5):
            flat = rng.sample(range(n_layers * d_mlp), len(top))
            rand = [(f // d_mlp, f % d_mlp) for f in flat]
            r = _answer_stats(model, item.prompt, item.answer, _zero_neurons(rand))
            assert (row[f"rr_random_{d}"], row[f"prob_random_{d}"]) == pytest.approx(r, rel=1e-9)
    st = attr_stages.query_zeroing_stage(model, data, queries, replace_k(12))
    table = st.tables["table7"].set_index("type")
    b, a = per["prob"].mean(), per["prob_top"].mean()
    assert table.loc["all", "prob decrease %"] == pytest.approx(100 * (b - a) / b)
    assert table.loc["all", "paper (Llama-7B) MRR/prob decrease %"] == "87 / 95"
    assert len(st.claims) == 2 and st.claims[0].test is not None


def row_k(per, i: int) -> int:
    return int(per.iloc[i]["k"])


def replace_k(k: int) -> ReproduceSettings:
    from dataclasses import replace

    return replace(SETTINGS, query_zero_k=k)


def test_query_zeroing_claim_can_hold_and_fail():
    before = np.ones(20)
    for after, verdict in ((np.full(20, 0.05), stats.HOLDS), (np.full(20, 0.9), stats.FAILS)):
        t = stats.bootstrap_test(attr_stages._both, before, after, before, after, threshold=50.0)
        assert t.verdict == verdict


# ------------------------------------------------------------------ Figures 3 / 10
@torch.no_grad()
def _run(model, item: KnowledgePrompt):
    """Logits and cache of one prompt, its answer's id, last position and final-norm scale."""
    tokens = model.to_tokens(item.prompt)
    logits, cache = model.run_with_cache(tokens)
    T = tokens.shape[1] - 1
    return (
        logits,
        cache,
        model.to_single_token(item.answer),
        T,
        cache["ln_final.hook_scale"][0, T, 0],
    )


def test_interpolation_paths_match_literal_projection(kind):
    model = build(kind, dtype=torch.float64)
    data = _dataset(model, 3)
    layer_lp, line_lp = attr_more.interpolation_paths(model, data)
    L = model.cfg.n_layers
    assert layer_lp.shape == (3, 2 * L + 1) and line_lp.shape == (3, len(attr_more.ALPHAS))
    for i, item in enumerate(data):
        logits, cache, w, T, s = _run(model, item)
        points = [cache["blocks.0.hook_resid_pre"][0, T]]
        for l in range(L):
            points += [cache[f"blocks.{l}.hook_resid_mid"][0, T],
                       cache[f"blocks.{l}.hook_resid_post"][0, T]]  # fmt: skip
        expect = [float(frozen_bs(model, p, s).log_softmax(-1)[w].detach()) for p in points]
        np.testing.assert_allclose(layer_lp[i].numpy(), expect, rtol=1e-9, atol=1e-9)
        # the path ends at the model's own output, the straight line has the same ends
        assert float(layer_lp[i, -1]) == pytest.approx(float(logits[0, T].log_softmax(-1)[w]))
        e, f = points[0], points[-1]
        for a_i, a in enumerate(attr_more.ALPHAS.tolist()):
            x = e + a * (f - e)
            ref = float(frozen_bs(model, x, s).log_softmax(-1)[w].detach())
            assert float(line_lp[i, a_i]) == pytest.approx(ref, abs=1e-9)
    st = attr_more.interpolation_stage(model, data, SETTINGS)
    assert st.tables["interpolation"]["all p"].iloc[-1] == pytest.approx(
        float(line_lp[:, -1].exp().mean())
    )
    assert attr_more.path_labels(2) == [-0.5, 0, 0.5, 1, 1.5]


def test_late_share_gap_holds_and_fails():
    a = np.linspace(0, 1, 21)
    late_jump = np.log(np.stack([1e-4 + (0.9 - 1e-4) * a**8] * 12))  # p jumps at the end
    # log p rises to -0.1 over the first 80% of the path, then falls back to -1
    early = np.stack([np.where(a <= 0.8, -5 + 4.9 * a / 0.8, -0.1 - 0.9 * (a - 0.8) / 0.2)] * 12)
    assert attr_more.late_share_gap(late_jump) > 0 > attr_more.late_share_gap(early)
    for arr, verdict in ((late_jump, stats.HOLDS), (early, stats.FAILS)):
        assert stats.bootstrap_test(attr_more.late_share_gap, arr, threshold=0.0).verdict == verdict


# ------------------------------------------------------------------ Figures 4 / 5 and Figure 2
def test_type_layer_shares_match_a_literal_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, 8, generator=gen)
    data = KnowledgeDataset(tuple(KnowledgePrompt(f"p{i}", "a", "xy"[i % 2]) for i in range(6)))
    shares, per = attr_more.type_layer_shares(scores, data, 4)
    for t in ("x", "y"):
        counts = np.zeros(5)
        for i in range(t == "y", 6, 2):
            ranked = sorted(((float(scores[i, l, j]), l) for l in range(5) for j in range(8)),
                            reverse=True)  # fmt: skip
            for _, l in ranked[:4]:
                counts[l] += 1
        np.testing.assert_allclose(shares.loc[t].to_numpy(), 100 * counts / counts.sum())
    assert per.sum() == 24
    codes = np.array([0.0, 1.0] * 3)
    upper = np.zeros((6, 4))
    upper[:, 3] = 1
    lower = np.zeros((6, 4))
    lower[:, 0] = 1
    assert attr_more.min_upper_share(upper, codes) == 1.0
    assert attr_more.min_upper_share(lower, codes) == 0.0


def test_value_layer_stage_tables_match_slow_counts():
    model = build("llama", n_layers=12)
    data = _dataset(model)
    ffn = mechcna.neuron_importance(model, data.prompts, data.answers)
    att = attention_neuron_importance(model, data.prompts, data.answers)
    st = attr_more.value_layer_stage(model, data, ffn, att, SETTINGS)
    layers = mechcna.layer_importance(model, data.prompts, data.answers).scores
    for c, kind in enumerate(("attention", "FFN")):
        table = st.tables[f"{kind}_top_layers"]
        for t in ("all", "color", "month"):
            rows = [i for i in range(12) if t in ("all", data[i].type)]
            counts = np.zeros(12)
            for i in rows:  # each sentence's top 10 of the 12 layers
                ranked = sorted(range(12), key=lambda l: -float(layers[i, l, c]))[:10]
                counts[ranked] += 1
            np.testing.assert_allclose(table.loc[t].to_numpy(), 100 * counts / counts.sum())
    shares, _ = attr_more.type_layer_shares(ffn.scores, data, attr_more.HEATMAP_K)
    np.testing.assert_allclose(st.tables["FFN_layers"].to_numpy(), shares.to_numpy())
    assert len(st.claims) == 2 and set(st.figures) == {
        "FFN_heatmap", "attention_heatmap", "attention_top_heatmap", "FFN_top_heatmap",
    }  # fmt: skip


def test_probability_increase_matches_literal_projection(kind):
    model = build(kind, dtype=torch.float64)
    data = _dataset(model, 2)
    ffn = mechcna.neuron_importance(model, data.prompts, data.answers)
    prob = attr_more.probability_increase(model, data, ffn)
    for i, item in enumerate(data):
        _, cache, w, T, s = _run(model, item)
        for l in range(model.cfg.n_layers):
            base = cache[f"blocks.{l}.hook_resid_mid"][0, T]
            m = cache[f"blocks.{l}.mlp.hook_post"][0, T]
            aug = base[None] + m[:, None] * model.blocks[l].mlp.W_out
            p = frozen_bs(model, aug, s).softmax(-1)[:, w]
            p0 = frozen_bs(model, base, s).softmax(-1)[w]
            torch.testing.assert_close(prob[i, l], p - p0, rtol=1e-6, atol=1e-9)


def test_prob_histogram_stage_and_its_last_layer_test():
    model = build("gpt2", n_layers=8)
    data = _dataset(model)
    ffn = mechcna.neuron_importance(model, data.prompts, data.answers)
    st = attr_more.prob_histogram_stage(model, data, ffn, SETTINGS)
    hist = st.tables["histograms"]
    expect = np.zeros(8)
    for i in range(len(data)):
        for layer in ffn.top(7, prompt=i)["layer"]:
            expect[int(layer)] += 1
    np.testing.assert_allclose(hist["log-prob increase %"], 100 * expect / expect.sum())
    assert st.claims[1].test is not None  # 8 layers: medium-deep is layers 4-4
    medium, last = np.zeros((12, 8)), np.zeros((12, 8))
    medium[:, 4] = 3
    last[:, 7] = 3
    assert attr_more.region_gap(medium) == 1.0 and attr_more.region_gap(last) == -1.0
    for per, verdict in ((medium, stats.HOLDS), (last, stats.FAILS)):
        assert stats.bootstrap_test(attr_more.region_gap, per, threshold=0.0).verdict == verdict
    assert attr_more.mean_top_layer(torch.arange(16.0).reshape(1, 4, 4), 4).tolist() == [3.0]


# ------------------------------------------------------------------ heads per type
def test_head_type_stage_matches_literal_ablation(kind):
    model = build(kind, dtype=torch.float64)
    data = _dataset(model)
    st = attr_stages.head_type_stage(model, data, SETTINGS)
    imp = head_importance(model, data.prompts, data.answers)
    select, evaluate = attr_stages._split_by_type(data, SETTINGS.seed)
    types = np.array(data.types)
    assert not (select & evaluate).any() and (select | evaluate).all()
    for t in ("color", "month"):
        rows = np.flatnonzero(select & (types == t))
        assert len(rows) == 3 and (evaluate & (types == t)).sum() == 3
        mean = {(l, h): float(np.mean([float(imp.scores[r, l, h]) for r in rows]))
                for l in range(2) for h in range(4)}  # fmt: skip
        assert st.data["heads"][t] == [max(mean, key=lambda x: mean[x])]  # 1% of 8 heads: 1
    per = st.data["per_pair"]
    assert len(per) == 6 * 2
    for _, row in per.iterrows():
        item = data[int(row["prompt"])]
        (l, h) = st.data["heads"][row["head_type"]][0]

        def zero_head(z, hook, h=h):
            z[:, :, h] = 0.0
            return z

        after = _answer_stats(model, item.prompt, item.answer, [(f"blocks.{l}.attn.hook_z",
                                                                   zero_head)])  # fmt: skip
        assert (row["rr_after"], row["prob_after"]) == pytest.approx(after, rel=1e-9)
        assert row["same"] == (row["head_type"] == item.type)
    claim = st.claims[0]
    assert claim.test is not None and claim.test.n == 6


def test_head_type_stage_skips_one_type_and_measures_nothing_without_halves():
    model = build("gpt2")
    data = KnowledgeDataset((KnowledgePrompt("12+7=", "3", "color"),))
    assert attr_stages.head_type_stage(model, data, SETTINGS).notes[0].startswith("Skipped")
    two = _dataset(model, 2)  # one sentence per type: selection halves only
    st = attr_stages.head_type_stage(model, two, SETTINGS)
    assert st.claims[0].verdict == stats.NOT_MEASURED and len(st.data["per_pair"]) == 0
    assert st.tables["head_intervention"]["n same"].tolist() == [0, 0]


# ------------------------------------------------------------------ shared neurons
def test_shared_shares_match_brute_force():
    rng = random.Random(0)
    sets = [set(rng.sample(range(12), 5)) for _ in range(9)]
    types = ["a"] * 5 + ["b"] * 3 + ["c"]
    out = attr_more.shared_shares(sets, types)
    for i, s in enumerate(sets):
        same = [j for j in range(9) if types[j] == types[i]]
        if len(same) < 3:
            assert np.isnan(out[i])
            continue
        shared = {n for n in range(12) if sum(n in sets[j] for j in same) > len(same) / 2}
        assert out[i] == pytest.approx(len(s & shared) / len(s))
    scores = torch.tensor([[[3.0, 0.0, 2.0, 1.0]]])
    assert attr_more.top_sets(scores, 3) == [{0, 2, 3}]
    assert attr_more.top_sets(torch.tensor([[[3.0, 0.0, 0.0]]]), 2, nonzero=True) == [{0}]


def test_shared_neuron_claim_can_hold_and_fail():
    model = build("gpt2")
    data = _dataset(model)
    ffn = mechcna.neuron_importance(model, data.prompts, data.answers)
    queries = query_neurons(model, data.prompts, data.answers, k=4)
    same = ffn.scores.mean(0, keepdim=True).expand_as(ffn.scores).clone()  # every set equal
    rand = torch.randn(ffn.scores.shape, generator=torch.Generator().manual_seed(0))
    from dataclasses import replace

    holds = attr_more.shared_neuron_stage(data, replace(ffn, scores=same),
                                          replace(queries, scores=rand), SETTINGS)  # fmt: skip
    fails = attr_more.shared_neuron_stage(data, replace(ffn, scores=rand),
                                          replace(queries, scores=same), SETTINGS)  # fmt: skip
    assert holds.claims[0].verdict == stats.HOLDS and fails.claims[0].verdict == stats.FAILS
    assert holds.tables["shared"].iloc[0]["value shared %"] == 100.0


# ------------------------------------------------------------------ Table 9 query neuron
def test_query_token_stage_matches_literal_transform(kind):
    model = build(kind, dtype=torch.float64)
    data = _dataset(model, 4)
    att = attention_neuron_importance(model, data.prompts, data.answers)
    st = attr_stages.query_token_stage(model, data, att, SETTINGS)
    table = st.tables["query_neurons"]
    assert len(table) >= 1
    for _, row in table.iterrows():
        i = data.prompts.index(row["prompt"])
        n = model.to_tokens(row["prompt"]).shape[1]
        s = att.scores[i, 1:, :n]  # layers >= 1, positions up to the scored one
        flat = int(s.flatten().argmax())
        l, p, h, d = (int(x) for x in torch.unravel_index(torch.tensor(flat), s.shape))
        l += 1
        assert row["attention neuron"] == f"{l}_{h}_{d}_{p}"
        q = attention_neuron_queries(model, [row["prompt"]], (l, p, h, d), [row["answer"]])
        j = int(q.scores[0].flatten().argmax())
        a, b = j // model.cfg.d_mlp, j % model.cfg.d_mlp
        assert row["query neuron"] == f"{a}_{b}"
        v = model.blocks[a].mlp.W_out[b]
        ln = model.blocks[l].ln1
        if kind == "gpt2":
            x = v - v.mean()
            x = x / (x.pow(2).mean() + model.cfg.eps).sqrt() * ln.w + ln.b
        else:
            x = v / (v.pow(2).mean() + model.cfg.eps).sqrt() * ln.w
        attn = model.blocks[l].attn  # W_V / b_V: grouped-query heads repeated per head
        out = (x @ attn.W_V[h] + attn.b_V[h]) @ attn.W_O[h]
        w = model.to_single_token(row["answer"])
        for vec, col in ((v, "answer rank, value vector"), (out, "answer rank, through head")):
            logits = frozen_bs(model, vec, 1.0, paper_compat=True)
            rank = min(int((logits > logits[w]).sum()), int((logits < logits[w]).sum())) + 1
            assert row[col] == rank
    claim = st.claims[0]
    assert claim.test is not None and claim.test.method == "exact binomial"
    better = int((table["answer rank, through head"] < table["answer rank, value vector"]).sum())
    assert claim.test.estimate == pytest.approx(better / len(table))
    assert attr_stages.target_rank(torch.tensor([0.0, 5.0, -3.0]), 2) == 1
