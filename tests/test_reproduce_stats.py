"""The reproduction's statistics and the six test-design faults of issue 21, each with a test
that the old design fails."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

import mechcna
from mechcna.analyses.head_results import HeadSweep
from mechcna.reproduce import ReproduceSettings, reproduce, shallow_stage, stats
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce import claim_tests as ct
from mechcna.reproduce.plan import Checkpoint, expected_times


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("k,n", [(0, 10), (3, 6), (6, 6), (7, 16), (120, 400), (1, 1)])
def test_clopper_pearson_equals_scipy_binomtest(k, n):
    lo, hi = stats.clopper_pearson(k, n)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert stats.clopper_pearson(0, 0) != stats.clopper_pearson(0, 0)  # (nan, nan)


def test_clopper_pearson_known_value():
    # 3 of 6: the "95% interval 12-88%"
    lo, hi = stats.clopper_pearson(3, 6)
    assert round(100 * lo) == 12 and round(100 * hi) == 88


def test_paired_bootstrap_is_deterministic_and_covers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    a = stats.paired_bootstrap(np.mean, x, seed=3)
    assert a == stats.paired_bootstrap(np.mean, x, seed=3)
    assert a[0] == pytest.approx(x.mean()) and a[1] < a[0] < a[2]
    # coverage of the true mean 0 over repeated samples of n = 50: about 95%
    hits = 0
    for r in range(200):
        s = np.random.default_rng(100 + r).normal(size=50)
        _, lo, hi = stats.paired_bootstrap(np.mean, s, n_boot=400, seed=r)
        hits += lo <= 0.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_bootstrap_keeps_pairs_together():
    """A constant paired difference has a zero-width interval; unpaired it would not."""
    before = np.random.default_rng(0).normal(size=30)
    after = before - 2.0
    est, lo, hi = stats.paired_bootstrap(lambda b, a: float(np.mean(b - a)), before, after)
    assert est == lo == hi == pytest.approx(2.0)


def test_verdict():
    assert stats.verdict(0.3, 0.5, 0.2) == "holds"
    assert stats.verdict(0.1, 0.3, 0.2) == "inconclusive"
    assert stats.verdict(0.0, 0.2, 0.2) == "does not hold"
    assert stats.verdict(1.0, 5.0, 10.0, "below") == "holds"
    assert stats.verdict(12.0, 15.0, 10.0, "below") == "does not hold"
    assert stats.verdict(float("nan"), 1.0, 0.0) == "not measured"
    t = stats.Test(5, 0.9, 0.8, 0.95, 0.5)  # a bootstrap over 5 cases: not trusted
    assert t.verdict == "inconclusive"
    assert replace(t, n=10).verdict == "holds"
    assert replace(t, method="exact binomial").verdict == "holds"


# ------------------------------------------------------------------------------ sweeps
def _sweep(correct: np.ndarray, base: np.ndarray, ops: list[str] | None = None) -> HeadSweep:
    n_heads, n_cases = correct.shape
    heads = tuple((i // 10, i % 10) for i in range(n_heads))
    labels = pd.DataFrame({"operation": ops or ["+"] * n_cases})
    lp = torch.zeros(n_heads, n_cases)
    return HeadSweep(
        heads=heads, correct=torch.from_numpy(correct), logprob=lp,
        prediction=torch.zeros(n_heads, n_cases, dtype=torch.long),
        base_correct=torch.from_numpy(base), base_logprob=torch.zeros(n_cases),
        base_prediction=torch.zeros(n_cases, dtype=torch.long),
        targets=torch.zeros(n_cases, dtype=torch.long), labels=labels,
        n_layers=n_heads // 10 + 1, n_heads=10,
    )  # fmt: skip


def test_winners_curse_is_gone():
    """Fault 1. 200 heads that each break 8% of the cases at random: the old design (best of
    the heads, scored on the cases it was chosen on) reports a large decrease and 'holds'; the
    new one scores the chosen head on held-out cases and does not hold."""
    rng = np.random.default_rng(0)
    correct = rng.random((200, 40)) > 0.08
    sweep = _sweep(correct, np.ones(40, dtype=bool))
    old_head = arith.top_head(sweep, ["+"])
    old = sweep.summary().set_index("head").loc[f"{old_head[0]}_{old_head[1]}"]
    assert 100 * old["relative_decrease"] >= 20  # the old claim would hold on noise
    head, test = ct.top_head_test(sweep, ["+"], threshold=20.0)
    select, evaluate = ct.split_halves(40)
    assert not (select & evaluate).any() and (select | evaluate).all()
    assert head == arith.top_head(ct.sub_sweep(sweep, select), ["+"])
    assert test.n == 20 and test.estimate < 100 * old["relative_decrease"]
    assert test.verdict != "holds"
    # a head that really matters still holds on the held-out half
    correct[7] = rng.random(40) > 0.6
    head, test = ct.top_head_test(replace(sweep, correct=torch.from_numpy(correct)), ["+"])
    assert head == sweep.heads[7] and test.verdict == "holds"


def test_split_halves_by_operation():
    """Each operation is split in halves on its own (a plain random split of these 14 cases
    leaves the two divisions in one half at seed 3), deterministic in the seed."""
    groups = ["+"] * 5 + ["/"] * 2 + ["-"] * 6 + ["*"]
    plain, _ = ct.split_halves(len(groups), 3)
    div = np.array(groups) == "/"
    assert plain[div].all() or not plain[div].any()  # the fault the groups remove
    select, evaluate = ct.split_halves(len(groups), 1, groups)
    assert not (select & evaluate).any() and (select | evaluate).all()
    labels = np.array(groups)
    for op, n in (("+", 5), ("/", 2), ("-", 6), ("*", 1)):
        assert select[labels == op].sum() == (n + 1) // 2
        assert evaluate[labels == op].sum() == n // 2
    again, _ = ct.split_halves(len(groups), 1, groups)
    np.testing.assert_array_equal(select, again)
    others = [ct.split_halves(len(groups), seed, groups)[0] for seed in range(2, 8)]
    assert any((o != select).any() for o in others)


def test_quiet_heads_use_the_absolute_change():
    """Fault 2. Half of the heads raise accuracy by 10 points: the old count (delta > -2
    points) calls every head quiet; the absolute change counts half."""
    base = np.zeros(50, dtype=bool)
    base[:40] = True  # 80%
    correct = np.tile(base, (20, 1))
    correct[:10, 40:45] = True  # +10 points for heads 0-9
    sweep = _sweep(correct, base)
    old = float(np.mean(sweep.summary()["delta_accuracy"].to_numpy() > -0.02))
    assert old == 1.0
    t = ct.quiet_heads_test(sweep)
    assert t.estimate == 0.5 and t.n == 50 and t.verdict == "does not hold"


# ------------------------------------------------------------------------------ Table 7
def test_operand_concepts_exclude_the_operand():
    """Fault 3. With tied embeddings the operand is its own top token: it must not count."""
    concepts = ct.number_concepts()
    tokens = ["3", " 3", "▁3", "three", " Three", "III", "cat", "5"]
    assert ct.operand_concepts(tokens, "3", concepts) == 4  # three, Three, III, 5
    assert sum(t.strip().strip("▁") in concepts or t.strip().lower() in concepts
               for t in tokens) == 7  # the old count  # fmt: skip


def test_operand_table_reads_below_the_head(shipped):
    layer = 2
    table, counts = shallow_stage.operand_tokens_table(shipped, layer)
    assert table["reader layer"].tolist() == [0, 1] and set(counts) == {0, 1}
    assert all(len(c) == 10 for c in counts.values())  # operands 0-9 are single tokens
    from mechcna.analyses.transfer import transform_through_attention

    comp = transform_through_attention(shipped, "3", path=[(1, None, None)]).tokens(10)
    moved = [x for x, _ in comp.tokens[1].top]
    assert counts[1]["3"][1] == ct.operand_concepts(moved, "3", ct.number_concepts())


# ------------------------------------------------------------------------------ Table 8
def test_chance_rate_matches_a_simulation():
    rng = np.random.default_rng(0)
    v, c, top = 300, 40, 10
    hits = np.array([np.isin(rng.choice(v, top, replace=False), np.arange(c)).sum()
                     for _ in range(20000)])  # fmt: skip
    for m in (1, 2, 3):
        assert ct.chance_rate(v, c, top, m) == pytest.approx(np.mean(hits >= m), abs=0.01)
    two = ct.chance_rate(v, c, top, 2, readers=2)
    assert two == pytest.approx(1 - (1 - ct.chance_rate(v, c, top, 2)) ** 2)
    assert ct.chance_rate(v, c, top, 0) == 1.0


def test_auto_thresholds_select_a_few_percent():
    """Fault 4. Counts where the paper's M = 0-3 select 100%, 60%, 30% and 10% of the pool:
    the automatic M selects at most 5%, and the next M shows the '> M' reading."""
    counts = np.repeat([0, 1, 2, 3, 4, 5], [400, 300, 200, 60, 30, 10])
    ms = ct.auto_thresholds(counts, len(counts), share=0.05)
    assert ms == (4, 5, 6)
    assert (counts >= ms[0]).mean() <= 0.05 and (counts >= 3).mean() > 0.05
    assert ct.auto_thresholds(counts, len(counts), share=0.05, top=5) == (4, 5)


def test_table8_says_when_a_search_selects_everything(shipped):
    """The old shipped-model thresholds (M = 2-8 of the top 10) select every searched
    neuron: the table says so and the claim is not measured rather than 'random = found'."""
    data = arith.arithmetic_stage(shipped, ReproduceSettings.quick()).data["dataset"]
    cases = data.filter(operation="+")
    s = replace(ReproduceSettings.quick(), thresholds=(0,))
    stage = shallow_stage.shallow_stage(shipped, cases, (2, 0), s)
    t8 = stage.tables["table8"]
    assert t8["selects everything"].all()
    assert "selects every neuron" in " ".join(stage.notes)
    claim = next(c for c in stage.claims if c.claim.startswith("Zeroing the hidden"))
    assert claim.verdict == "not measured"


# ------------------------------------------------------------------------------ CNA
def test_coefficient_fall_is_tested_by_magnitude_and_trend():
    """Fault 5. A 1% fall at every K passes the old test (> 0) but not the magnitude test,
    and shows no trend with K."""
    rng = np.random.default_rng(0)
    falls = {k: 1.0 + 0.1 * rng.normal(size=30) for k in (100, 50, 10)}
    assert all(np.mean(v) > 0 for v in falls.values())  # the old verdict: holds
    mag, trend = ct.coefficient_tests(falls, 49.1)
    assert mag.verdict == "does not hold" and trend.verdict != "holds"
    paperlike = {100: 49.0 + rng.normal(size=30), 10: 77.0 + rng.normal(size=30)}
    mag, trend = ct.coefficient_tests(paperlike, 40.0)
    assert mag.verdict == "holds" and trend.verdict == "holds"


def test_coefficient_falls_equal_mask_keep_table(shipped):
    from mechcna.analyses.case_ablation import lowest_neuron_table, mask_keep_table
    from mechcna.analyses.comparative import compare_neurons
    from mechcna.interventions.edits import HeadAblation

    s = ReproduceSettings.quick()
    data = arith.arithmetic_stage(shipped, s).data["dataset"]
    cases = arith.cna_cases(shipped, data, s)
    cna = compare_neurons(shipped, cases.prompts, HeadAblation([(2, 0)]), cases.targets)
    t5 = mask_keep_table(shipped, cases.prompts, cna, ks=[50, 10], progress=False)
    m, m_o = cna.extras["coefficient"], cna.extras["coefficient_other"]
    for k in (50, 10):
        falls = ct.coefficient_falls(m, m_o, cna.top_mask(k))
        assert np.mean(falls) == pytest.approx(t5.loc["coef", f"top{k}"], rel=1e-12)
    lowest = arith.lowest_neuron_per_case(shipped, cases, cna, [50, 10])
    t6 = lowest_neuron_table(shipped, cases.prompts, cna, ks=[50, 10])
    for k in (50, 10):
        assert np.mean(lowest[k]) == pytest.approx(t6.loc["lowest_neuron_ablation", f"top{k}"])


# ------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


def test_quick_run_reports_every_k_and_the_papers_filter(shipped, tmp_path):
    """Fault 5 (lowest neuron at every K) and fault 6 (the paper's top-10 filter by default);
    checkpoints: a rerun loads every finished stage instead of running it."""
    assert ReproduceSettings().knowledge_top_k == 10
    assert ReproduceSettings.standard().knowledge_top_k == 10
    s = ReproduceSettings.quick()
    rep = reproduce(shipped, "arithmetic", settings=s, progress=False, checkpoint=tmp_path)
    lowest = [c for c in rep.claim_list if c.claim.startswith("Zeroing the lowest-layer")]
    assert len(lowest) == len(s.cna_ks)
    saved = Checkpoint(tmp_path, str(shipped.cfg.model_name), "arithmetic", vars(s))
    assert saved.finished() == sorted(
        ["arithmetic_data", "heads", "cna", "shallow", "pe_graph", "trace", "cells"]
    )
    calls = []
    original = arith.head_stage

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    arith.head_stage = spy
    try:
        again = reproduce(shipped, "arithmetic", settings=s, progress=False, checkpoint=tmp_path)
    finally:
        arith.head_stage = original
    assert not calls
    pd.testing.assert_frame_equal(again.claims, rep.claims)
    knowledge = reproduce(shipped, "attribution", quick=True, progress=False).stage("knowledge")
    assert "the paper's filter: gold answer in the top 10" in " ".join(knowledge.notes)


def test_presets_and_expected_times(shipped):
    quick, standard, paper = (ReproduceSettings.named(n) for n in ("quick", "standard", "paper"))
    assert standard.sweep_cases is not None and standard.sweep_cases >= 400
    # every correct 1-digit + and - case for CNA (issue 21), in standard as in paper
    assert standard.cna_cases is None and paper.cna_cases is None
    assert standard.cna_split == "all" and standard.zero_shot_readers is None
    data = mechcna.arithmetic_dataset(standard.operations, standard.digits, standard.templates,
                                      standard.n_pairs, split="heldout")  # fmt: skip
    assert len(data) >= standard.sweep_cases  # two halves of at least 200 cases
    assert paper.max_prompts is None and 3 in paper.digits
    times = expected_times(shipped, quick)
    assert times["stage"].tolist()[-1] == "total" and len(times) == 21  # 20 stages + total
    # every stage runs in standard (ATTR Table 7, the head intervention and appendix B too);
    # a preset can leave them out with the settings of the same names
    extra = ["query_zeroing", "head_types", "division"]
    assert set(extra) <= set(expected_times(shipped, standard)["stage"])
    assert set(extra) <= set(expected_times(shipped, paper)["stage"])
    assert standard.query_zeroing and standard.head_types and standard.division
    assert paper.query_zeroing and paper.head_types and paper.division
    lean = replace(standard, query_zeroing=False, head_types=False, division=False)
    assert not set(extra) & set(expected_times(shipped, lean)["stage"])
    assert (times["expected seconds"] > 0).all()
    big = expected_times(shipped, standard)["expected seconds"].iloc[-1]
    assert big > times["expected seconds"].iloc[-1]
    with pytest.raises(mechcna.MechcnaError, match="preset"):
        ReproduceSettings.named("huge")


def test_table7_neuron_rows(shipped):
    """Table 7's neuron rows: not interpretable directly (at most one concept), their count
    through the best reader equal to the search's."""
    s = ReproduceSettings.quick()
    search = shallow_stage._search(shipped, 2, s)[0]
    rows = shallow_stage.hidden_neuron_rows(shipped, search)
    assert len(rows) > 0 and (rows["concepts direct"] <= 1).all()
    for _, r in rows.iterrows():
        l, j = map(int, r["neuron"].split("_"))
        assert r["concepts through attention"] == int(search.counts[l, j])
        assert r["attention layer"] == int(search.best_layer[l, j])


def test_operand_claim_is_tested_after_attention_without_the_operand():
    """Fault 3: with tied embeddings the old 'after > before' test could never pass (the
    operand's own top tokens are 10 of 10 numerals); the claim tests the count after the
    reader, without the operand's own token, so a reader that yields number words holds."""
    from mechcna.reproduce.core import StageBuilder

    s = ReproduceSettings.quick()
    tied = {0: {d: (9, 3) for d in "0123456789"}, 1: {d: (9, 0) for d in "0123456789"}}
    st = StageBuilder("shallow", "t", "arithmetic")
    shallow_stage._operand_claim(st, 2, tied, s)  # reader: two layers below the head = layer 0
    assert st.claims[0].test is not None and st.claims[0].verdict == "holds"
    assert all(a <= b for c in tied.values() for b, a in c.values())  # old test: fails
    st = StageBuilder("shallow", "t", "arithmetic")
    shallow_stage._operand_claim(st, 3, tied, s)  # reader layer 1: nothing after
    assert st.claims[0].verdict == "does not hold"


def test_expected_times_add_the_streamed_attribution_calls(monkeypatch, tmp_path):
    """A model whose FFN rows the default cache cannot keep streams every attribution call
    (Gemma 3 270M: about 74 s a call here, against SmolLM2's 2.5 s), or reads them from the
    disk cache when its limit allows (about 21 s): the estimate adds those calls to the stages
    that make them, and only to those; the method comparison adds its float64 rows."""
    from mechcna.reproduce import plan
    from tests.helpers import build

    model = build("llama")
    s = ReproduceSettings.quick()
    assert plan.streamed_call_seconds(model) == 0.0  # a tiny model's rows fit
    base = expected_times(model, s).set_index("stage")["expected seconds"]
    # the comparison's vocabulary rows scale with n_layers x d_mlp x d_model x d_vocab, the
    # rest of the stage with the parameter count
    c, u = model.cfg, plan._UNIT
    work = c.n_layers * c.d_mlp * c.d_model * c.d_vocab
    _, n, m = plan._prompt_sizes(s)
    assert base["methods"] == pytest.approx(
        u["methods_fixed"] * work / plan._REFERENCE_ROW_WORK
        + u["methods"] * m * plan._params(model) / plan._REFERENCE_PARAMS
    )
    monkeypatch.setenv("MECHCNA_BLOCK_BUDGET", "1K")
    monkeypatch.setenv("MECHCNA_DISK_CACHE", "0")
    call = plan.streamed_call_seconds(model)
    assert call == pytest.approx(74.0 * c.n_layers * c.d_model**2 * c.d_vocab
                                 / (18 * 640**2 * 262144))  # fmt: skip
    extra = expected_times(model, s).set_index("stage")["expected seconds"] - base
    # the method comparison also forms every FFN row in float64 that no cache keeps
    assert extra["methods"] == pytest.approx(call * m + plan._UNKEPT_ROW_SECONDS * work)
    assert extra["value_neurons"] == pytest.approx(2 * call * n)
    assert extra["cna"] == pytest.approx(2 * call * plan._cna_cases(s))
    assert (extra.drop(["methods", "value_neurons", "cna", "trace", "division", "total"],
                       errors="ignore") == 0).all()  # fmt: skip
    assert extra["total"] == pytest.approx(extra.drop("total").sum())
    monkeypatch.setenv("MECHCNA_DISK_CACHE", "1")  # rows on disk: read, not streamed
    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MECHCNA_DISK_CACHE_BYTES", "40G")
    rows = c.n_layers * c.d_mlp * c.d_vocab * 2
    assert plan.streamed_call_seconds(model) == pytest.approx(21.0 * rows / 19.3e9)
