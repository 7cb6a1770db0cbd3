"""The arithmetic paper's section 4.2 and appendix B stages of ``mechcna reproduce``
(prediction-enhancing graph, feature-transfer trace, templates 1-3 and 3-digit cells, the
division head): each against a slow, obviously-correct reference, and their claims able to
fail."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import mechcna
from mechcna.analyses.case_ablation import mask_keep_table
from mechcna.analyses.comparative import compare_neurons, value_key_products
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.interventions.edits import HeadAblation
from mechcna.interventions.prompts import prepare_prompts
from mechcna.reproduce import ReproduceSettings, expected_times, reproduce
from mechcna.reproduce import arith_cells as ac
from mechcna.reproduce import arith_graph as ag
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce.core import StageBuilder
from mechcna.reproduce.stats import FAILS, HOLDS, NOT_MEASURED
from tests.helpers import PROMPTS, build

NEW = ["pe_graph", "trace", "cells"]


@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


@pytest.fixture(scope="module")
def settings():
    return replace(
        ReproduceSettings.quick(), operations=("+", "-", "/"), cna_cases=6, division_cases=6
    )


@pytest.fixture(scope="module")
def run(shipped, settings):
    return reproduce(shipped, "arithmetic", settings=settings, progress=False)


def _key(model, l, k):
    """The up key ``W_in[:, k] * ln2.w`` (``W_in`` for non-gated MLPs)."""
    return model.W_in[l][:, k].detach() * model.blocks[l].ln2.w.detach()


def _gate_key(model, l, k):
    return model.W_gate[l][:, k].detach() * model.blocks[l].ln2.w.detach()


# --------------------------------------------------------------------------- PE graph
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pair_cosines_equal_a_loop(kind):
    model = build(kind)
    lower, upper = [(0, 3), (0, 7), (1, 2)], [(1, 5), (1, 9), (0, 1)]
    got = ag.pair_cosines(model, lower, upper)
    for i, (li, ki) in enumerate(lower):
        for j, (lj, kj) in enumerate(upper):
            if li < lj:
                want = torch.nn.functional.cosine_similarity(
                    model.W_out[li][ki].detach().double(), _key(model, lj, kj).double(), dim=0
                )
                assert got[i, j] == pytest.approx(float(want), abs=1e-6)
            else:
                assert np.isnan(got[i, j])


def test_alignment_sees_a_value_written_into_a_key():
    """A lower neuron whose value is the upper neuron's key: |cos| 1, far above random lower
    neurons of its layer; the same neuron made orthogonal to the key: cos 0."""
    model = build("llama")
    key = _key(model, 1, 4)
    with torch.no_grad():
        model.blocks[0].mlp.W_out[6] = 3.0 * key
    top = [(0, 6), (1, 4)]
    draws = ag._random_lower(top, int(model.cfg.d_mlp or 0), 5, np.random.default_rng(0))
    assert all((0, 6) not in d and d[0][0] == 0 for d in draws)
    own, rand, pairs = ag.alignment(model, top, draws)
    assert pairs == 1 and own == pytest.approx(1.0, abs=1e-5) and rand < 0.6
    with torch.no_grad():
        other = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
        model.blocks[0].mlp.W_out[6] = other - (other @ key) / (key @ key) * key
    own, _, _ = ag.alignment(model, top, draws)
    assert own == pytest.approx(0.0, abs=1e-5)


def test_pe_claim_can_hold_and_fail():
    s = ReproduceSettings.quick()
    rng = np.random.default_rng(0)
    rands = rng.uniform(0.1, 0.2, 30)
    for tops, verdict in ((rands * 3, HOLDS), (rands / 3, FAILS)):
        st = StageBuilder("pe_graph", "t", "arithmetic")
        ag._pe_claim(st, tops, rands, 10, 30, s)
        assert st.claims[0].verdict == verdict
    st = StageBuilder("pe_graph", "t", "arithmetic")
    ag._pe_claim(st, np.array([]), np.array([]), 10, 4, s)
    assert st.claims[0].verdict == NOT_MEASURED


def test_pe_graph_stage_equals_direct_calls(run, shipped, settings):
    cna, cases = run.stage("cna").data["cna"], run.stage("cna").data["cases"]
    st = run.stage("pe_graph")
    k = min(settings.cna_ks)
    top0 = cna.top_sets(k)[0]
    m0 = torch.stack([cna.extras["coefficient"][0, l, j] for l, j in top0])
    direct = value_key_products(shipped, top0, key="both", coefficients=m0).to_frame()
    edges = st.tables["pe_edges"]
    assert len(edges) == len(direct)
    mine = {(a, b): p for a, b, p in zip(edges["value_of"], edges["key_of"], edges["product"])}
    for a, b, p in zip(direct["value_of"], direct["key_of"], direct["product"], strict=True):
        assert mine[(a, b)] == pytest.approx(p, rel=1e-5, abs=1e-7)
        # the m-scaled product by hand: m_i * W_out[i] . (W_in + W_gate)[:, j] * ln2.w
        (li, ki), (lj, kj) = (tuple(map(int, x.split("_"))) for x in (a, b))
        i = top0.index((li, ki))
        vec = float(m0[i]) * shipped.W_out[li][ki].detach()
        by_hand = vec @ (_key(shipped, lj, kj) + _gate_key(shipped, lj, kj))
        assert p == pytest.approx(float(by_hand), rel=1e-4, abs=1e-6)
    table = st.tables["pe_alignment"]
    assert len(table) == len(cases)
    # the test's own |cos| of the top pairs, recomputed pair by pair
    for i, top in enumerate(cna.top_sets(k)[:3]):
        cos = [
            float(
                torch.nn.functional.cosine_similarity(
                    shipped.W_out[a[0]][a[1]].detach(), _key(shipped, *b), dim=0
                ).abs()
            )
            for a in top
            for b in top
            if a[0] < b[0]
        ]
        assert table["pairs"][i] == len(cos)
        if cos:
            assert table["mean |cos| top"][i] == pytest.approx(np.mean(cos), rel=1e-5)
    assert "pe_graph" in st.figures and len(st.figures["pe_graph"].data) == len(edges[: 3 * k]) + 1


# --------------------------------------------------------------------------- trace
def _slow_head_scores(model, ids, layer, q, p, neuron):
    """Per head: alpha[h, q, p] * v[p, h] @ W_O[h], dotted with the neuron's keys."""
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None])
    pattern, v = cache["pattern", layer][0], cache["v", layer][0]
    if v.shape[1] != model.cfg.n_heads:
        v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)
    keys = [_key(model, *neuron)]
    if model.cfg.gated_mlp:
        keys.append(_gate_key(model, *neuron))
    out = []
    for h in range(model.cfg.n_heads):
        vec = pattern[h, q, p] * v[p, h] @ model.W_O[layer][h].detach()
        out.append(sum(float(vec @ key) for key in keys))
    return np.array(out)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_trace_case_equals_a_slow_reference(kind):
    model = build(kind, n_layers=4)
    prompt, head, neuron = PROMPTS[0], (2, 2), (3, 5)
    row, steps = ag.trace_case(model, prompt, neuron, head)
    ids = prepare_prompts(model, prompt).tokens[0]
    q = len(ids) - 1
    by_pos = np.array([_slow_head_scores(model, ids, 2, q, p, neuron).sum() for p in range(q + 1)])
    p = int(np.abs(by_pos).argmax())
    assert row["source position"] == p
    np.testing.assert_allclose(steps["positions"].total().numpy(), by_pos, rtol=1e-4, atol=1e-6)
    heads = _slow_head_scores(model, ids, 2, q, p, neuron)
    np.testing.assert_allclose(steps["heads"].total().numpy(), heads, rtol=1e-4, atol=1e-6)
    order = np.argsort(-np.abs(heads), kind="stable").tolist()
    assert row["ablated head rank"] == order.index(2) + 1
    comps = steps["components"]
    attn = [i for i, r in enumerate(comps.rows) if r.startswith("A")]
    best = max(attn, key=lambda i: abs(float(comps.total()[i])))
    assert row["top attention component"] == comps.rows[best]
    has_ffn = any(r.startswith("F") for r in steps["two_hop"].rows)
    assert ("neurons" in steps) == has_ffn
    assert {"positions", "heads", "components", "sources", "two_hop"} <= set(steps)


def test_trace_claims_can_hold_and_fail():
    import pandas as pd

    s = ReproduceSettings.quick()
    for rank, operand, verdict in ((1, True, HOLDS), (3, False, FAILS)):
        summary = pd.DataFrame({"ablated head rank": [rank] * 20, "operand": [operand] * 20,
                                "operand positions": [2] * 20, "positions": [5] * 20})  # fmt: skip
        st = StageBuilder("trace", "t", "arithmetic")
        ag._trace_claims(st, summary, 4, (1, 2), s)
        assert [c.verdict for c in st.claims] == [verdict, verdict]
    summary = pd.DataFrame({"ablated head rank": [1] * 4, "operand": [None] * 4,
                            "operand positions": [2] * 4, "positions": [5] * 4})  # fmt: skip
    st = StageBuilder("trace", "t", "arithmetic")
    ag._trace_claims(st, summary, 4, (0, 0), s)
    assert st.claims[1].verdict == NOT_MEASURED


def test_trace_stage_on_the_shipped_model(run, settings):
    st = run.stage("trace")
    table = st.tables["trace_cases"]
    assert len(table) == min(settings.trace_cases or 99, len(run.stage("cna").data["cases"]))
    head = run.stage("heads").data["head"]
    first = int((table["ablated head rank"] == 1).sum())
    assert st.claims[0].test is not None and st.claims[0].test.estimate == first / len(table)
    if head[0] == 0:  # nothing below layer 0: the two-hop claim is not measured
        assert st.claims[1].verdict == NOT_MEASURED


# --------------------------------------------------------------------------- cells
def test_extra_cells_are_the_other_templates_and_three_digits(shipped, settings):
    cases = ac.extra_cells(shipped, settings, "zero-shot")
    frame = cases.to_frame()
    assert set(frame["template"]) == {1, 2, 3, 4}
    assert set(frame.loc[frame["template"] == 4, "digits"]) == {3}
    assert set(frame.loc[frame["template"] != 4, "digits"]) == set(settings.digits)
    assert set(frame["operation"]) == set(settings.operations)
    none = replace(settings, cell_templates=(4,), cell_digits=(1,))
    assert len(ac.extra_cells(shipped, none, "zero-shot")) == 0


def test_cells_claims_equal_direct_evaluation(run, shipped, settings):
    st = run.stage("cells")
    cs = st.data["cells"]
    head = run.stage("heads").data["head"]
    assert cs.heads[0] == head
    cases = ac.extra_cells(shipped, settings, "zero-shot")
    base = evaluate_accuracy(shipped, cases, progress=False).correct.double().numpy()
    after = evaluate_accuracy(shipped, cases, [HeadAblation([head])], progress=False)
    after = after.correct.double().numpy()
    frame = cases.to_frame()
    ops = frame["operation"].isin(["+", "-"]).to_numpy()
    masks = [ops & (frame["template"] != 4).to_numpy(), ops & (frame["digits"] == 3).to_numpy()]
    for claim, mask in zip(st.claims, masks, strict=True):
        if claim.test is None:
            assert base[mask].sum() == 0
            continue
        want = 100 * (base[mask].mean() - after[mask].mean()) / base[mask].mean()
        assert claim.test.estimate == pytest.approx(want)
        assert claim.test.n == int(mask.sum())
    t1 = st.tables["templates"]
    paper_col = t1.columns[-1]
    for cell, value in zip(t1.index, t1[paper_col], strict=True):
        assert (value != "") == cell.startswith("2D"), (cell, value)
    assert "cells_top_heads" in st.tables


# --------------------------------------------------------------------------- division
def test_division_tables_equal_direct_calls(run, shipped, settings):
    st = run.stage("division")
    head, cases = st.data["head"], st.data["cases"]
    # chosen on the selection half's / cases, scored on the held-out / cases
    heads = run.stage("heads").data
    sweep, held = heads["sweep"], heads["held"]
    assert head == heads["division_head"] == arith.top_head(sweep, ["/"])
    assert head in held.heads and held.n_cases + sweep.n_cases == min(
        settings.sweep_cases or 10**9, len(run.stage("arithmetic_data").data["dataset"])
    )
    div = torch.from_numpy((held.labels["operation"] == "/").to_numpy(copy=True))
    b = held.base_correct[div].double().numpy()
    a = held.correct[held.heads.index(head), div].double().numpy()
    assert len(b) > 0
    if b.sum():
        assert st.claims[0].test is not None and st.claims[0].test.n == len(b)
        assert st.claims[0].test.estimate == pytest.approx(100 * (b.mean() - a.mean()) / b.mean())
    else:  # no held-out division right before the ablation: not measured
        assert st.claims[0].test is None
    assert 0 < len(cases) <= settings.division_cases
    assert set(cases.to_frame()["operation"]) == {"/"}
    assert all(evaluate_accuracy(shipped, cases, progress=False).correct.tolist())
    cna = compare_neurons(shipped, cases.prompts, HeadAblation([head]), cases.targets)
    ks = [k for k in settings.cna_ks if k < (shipped.cfg.n_layers - head[0]) * shipped.cfg.d_mlp]
    t15 = mask_keep_table(shipped, cases.prompts, cna, ks=ks, progress=False, seed=settings.seed,
                          deep_layers=range(head[0], shipped.cfg.n_layers))  # fmt: skip
    ours = st.tables["table15"].set_index(["experiment", "K"])["ours %"]
    for exp, row in t15.iterrows():
        for col, value in row.items():
            assert ours[(exp, col)] == pytest.approx(value)
    assert st.tables["table15"]["paper (Llama-7B)"].notna().any()
    assert all(c.claim.startswith(f"Division head {head[0]}_{head[1]}") for c in st.claims[1:])
    assert any("Table 15" in c.paper_figure for c in st.claims)
    assert any("Table 16" in c.paper_figure for c in st.claims)


def test_division_is_not_measured_without_division(shipped):
    s = ReproduceSettings.quick()
    data = arith.arithmetic_stage(shipped, s).data["dataset"]
    heads = arith.head_stage(shipped, data, s).data
    st = ac.division_stage(shipped, data, heads["sweep"], heads["held"], s)
    assert [c.verdict for c in st.claims] == [NOT_MEASURED]
    assert heads["division_head"] is None


# --------------------------------------------------------------------------- wiring
def test_stages_and_expected_times(run, shipped, settings):
    names = [s.name for s in run.stages]
    assert names[-4:] == [*NEW, "division"]
    quick = ReproduceSettings.quick()
    times = expected_times(shipped, quick, "arithmetic")
    assert times["stage"].tolist() == ["arithmetic_data", "heads", "cna", "shallow", *NEW, "total"]
    # appendix B runs in standard (10 cases, no Table 17) and in paper (all, with Table 17)
    standard = expected_times(shipped, ReproduceSettings.standard(), "arithmetic")
    assert "division" in standard["stage"].tolist()
    paper = ReproduceSettings.paper()
    assert "division" in expected_times(shipped, paper, "arithmetic")["stage"].tolist()
    assert paper.division_zero_shot and paper.trace_cases is None and 3 in paper.digits
    assert ReproduceSettings.standard().division
    assert not ReproduceSettings.standard().division_zero_shot


def test_key_stages_are_not_measured_on_models_the_keys_refuse(run, settings, monkeypatch):
    """A model the key analyses refuse makes both stages say so instead of failing the run (a
    logit soft cap, Gemma 2, is no longer refused: the key analyses handle it)."""
    from mechcna.errors import UnsupportedArchitectureError

    model = build("llama")
    model.cfg.output_logits_soft_cap = 30.0
    cna, cases = run.stage("cna").data["cna"], run.stage("cna").data["cases"]
    assert ag.unsupported(model) == ""

    def refuse(*args, **kwargs):
        raise UnsupportedArchitectureError("keys through this block are refused")

    monkeypatch.setattr(ag, "ffn_keys", refuse)
    pe = ag.pe_graph_stage(model, cases, cna, settings)
    trace = ag.trace_stage(model, cases, cna, (0, 0), settings)
    for st in (pe, trace):
        assert st.claims and all(c.verdict == NOT_MEASURED for c in st.claims)
        assert "refused" in st.claims[0].ours
