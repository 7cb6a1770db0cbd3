"""`reproduce --quick` end to end on the shipped model; each table equals a direct call of the
library function it comes from (on the shipped model and on tiny random models)."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import mechcna
from mechcna.analyses.case_ablation import mask_keep_table
from mechcna.analyses.comparative import compare_neurons
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.analyses.heads import head_sweep
from mechcna.analyses.methods import evaluate_methods
from mechcna.analyses.query import attention_query_layers, query_neurons
from mechcna.analyses.query_overlap import query_value_overlap
from mechcna.interventions.edits import AttentionNeuronEdit, HeadAblation
from mechcna.reproduce import (
    ReproduceSettings,
    query_stages,
    reproduce,
    shallow_stage,
    to_markdown,
    write_report,
)
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce import attribution as attr
from mechcna.reproduce import claim_tests as ct
from mechcna.reproduce.core import Reproduction, markdown_table
from mechcna.reproduce.plan import head_passes
from mechcna.tasks.knowledge import KnowledgeDataset, KnowledgePrompt
from tests.helpers import PROMPTS, build

STAGES = [
    "knowledge", "methods", "value_neurons", "zeroing", "query", "walkthrough",
    "query_zeroing", "interpolation", "value_layers", "prob_histogram", "head_types",
    "shared_neurons", "query_tokens",
    "arithmetic_data", "heads", "cna", "shallow", "pe_graph", "trace", "cells",
]  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


@pytest.fixture(scope="module")
def quick(shipped):
    return reproduce(shipped, quick=True, progress=False)


def test_quick_end_to_end_on_shipped_model(quick, tmp_path):
    assert [s.name for s in quick.stages] == STAGES
    assert all(s.seconds > 0 for s in quick.stages)
    timings = quick.timings()
    assert timings.iloc[-1]["seconds"] == pytest.approx(sum(s.seconds for s in quick.stages))
    claims = quick.claims_frame()
    assert len(claims) >= 12
    assert set(claims["verdict"]) <= {"holds", "does not hold", "inconclusive", "not measured"}
    assert list(claims.columns) == [
        "paper", "claim", "paper's figure", "ours", "n", "estimate", "lo", "hi", "test",
        "interval", "verdict",
    ]  # fmt: skip
    measured = claims[claims["verdict"] != "not measured"]
    assert (measured["n"] > 0).all() and (measured["lo"] <= measured["hi"]).all()
    # The word-level model knows no capital: the attribution stages ran on the arithmetic
    # fallback, and said so.
    knowledge = quick.stage("knowledge")
    assert knowledge.tables["survivors"]["kept"].sum() == 0
    assert any("No knowledge prompt survived" in n for n in knowledge.notes)
    assert len(knowledge.data["dataset"]) > 0
    page = write_report(quick, tmp_path / "run")
    text = (tmp_path / "run" / "reproduce.md").read_text()
    assert "## Claims" in text and "paper (Llama-7B)" in text and "paper (GPT-2)" in text
    assert "ARITH Table 5" in text and "ATTR Table 2" in text
    html = page.read_text()
    n_figures = sum(len(s.figures) for s in quick.stages)
    assert n_figures >= 8 and html.count("ARITH Table 5") >= 1
    assert len(list((tmp_path / "run").glob("table-*.csv"))) >= 20
    assert quick.plot().data


def test_verdicts_follow_the_numbers(quick):
    """Each verdict is recomputed from its interval, and the method claim's estimate from the
    stage's own per-prompt table."""
    from mechcna.reproduce import stats

    for c in quick.claim_list:
        if c.test is None:
            continue
        t = c.test
        expected = stats.verdict(t.lo, t.hi, t.threshold, t.side)
        if t.method == "paired bootstrap" and t.n < stats.MIN_BOOTSTRAP_N:
            expected = "inconclusive" if expected != "not measured" else expected
        assert c.verdict == expected
        assert t.lo <= t.estimate + 1e-9 or t.method != "exact binomial"
    per = quick.stage("methods").data["per_prompt"]
    wide = per.pivot(index="prompt", columns="method", values="mrr")
    others = wide.drop(columns=["original", "log_prob_increase"])
    margin = others.mean().min() - wide["log_prob_increase"].mean()
    claim = next(c for c in quick.claim_list if "MRR after zeroing" in c.claim)
    assert claim.test is not None and claim.test.estimate == pytest.approx(margin, abs=1e-12)


def test_method_table_equals_direct_call(quick, shipped):
    data = quick.stage("knowledge").data["method_dataset"]
    table = quick.stage("methods").tables["methods"]
    direct = evaluate_methods(shipped, data.prompts, data.answers, k=10, progress=False)
    assert table["method"].tolist() == direct["method"].tolist()
    np.testing.assert_allclose(table["mrr"], direct["mrr"], rtol=1e-10)
    np.testing.assert_allclose(table["prob %"], 100 * direct["prob"], rtol=1e-10)
    assert table["paper (Llama-7B) mrr"].iloc[1] == 0.312  # log_prob_increase row


def test_head_and_cna_tables_equal_direct_calls(quick, shipped):
    s = ReproduceSettings.quick()
    data = quick.stage("arithmetic_data").data["dataset"]
    cases = arith._subsample(data, s.sweep_cases, s.seed)
    heads = quick.stage("heads")
    # split first, then sweep: every head on the selection half only
    select, evaluate = heads.data["selection"], heads.data["evaluation"]
    assert not (select & evaluate).any() and (select | evaluate).all()
    ops = np.array([c.operation for c in cases])
    for op in set(ops):  # each operation split in halves (the extra case to selection)
        assert select[ops == op].sum() == ((ops == op).sum() + 1) // 2
    np.testing.assert_array_equal(select, ct.split_halves(len(cases), s.seed, list(ops))[0])
    half = head_sweep(shipped, arith._take(cases, select), progress=False)
    sweep = heads.data["sweep"]
    assert sweep.n_cases == int(select.sum()) and len(sweep.heads) == len(half.heads)
    assert torch.equal(sweep.correct, half.correct)
    direct = half.table(by="operation", heads="top", k=5)
    pd.testing.assert_frame_equal(heads.tables["table1"][direct.columns], direct)
    # the top head is chosen on the selection half (HeadSweep.top on that half)
    head = heads.data["head"]
    assert head == arith.top_head(half, ["+", "-"])
    # Tables 7-8 run below the top head above layer 0 (the top head itself when it is there).
    shallow = heads.data["shallow_head"]
    assert shallow == arith.top_head(half, ["+", "-"], min_layer=1) and shallow[0] >= 1
    if head[0] > 0:
        assert shallow == head
    # only the chosen heads are ablated on the evaluation half
    held = heads.data["held"]
    op_heads = {op: arith.top_head(half, [op]) for op in s.operations}
    assert heads.data["op_heads"] == op_heads
    assert set(held.heads) == {head, shallow, *op_heads.values()}
    assert held.n_cases == int(evaluate.sum())
    # Table 2 / the top-head claim: the chosen head scored on held-out cases, by hand
    held_cases = arith._take(cases, evaluate)
    frame = held_cases.to_frame()
    base = evaluate_accuracy(shipped, held_cases, progress=False).correct.double().numpy()
    for _, row in heads.tables["table2"].iterrows():
        l, h = map(int, row["head"].split("_"))
        after = evaluate_accuracy(shipped, held_cases, [HeadAblation([(l, h)])], progress=False)
        m = (frame["operation"] == row["operation"]) & (frame["digits"] == row["digits"])
        m = m.to_numpy()
        b, a = base[m].mean(), after.correct.double().numpy()[m].mean()
        assert row["n (evaluation)"] == m.sum()
        assert row["relative decrease %"] == pytest.approx(100 * (b - a) / b, nan_ok=True)
    claim = next(c for c in heads.claims if c.claim.startswith("A few heads"))
    assert claim.test is not None and claim.test.n == int(frame["operation"].isin(["+", "-"]).sum())
    quiet = next(c for c in heads.claims if c.claim.startswith("Most heads"))
    assert quiet.test is not None and quiet.test.n == int(select.sum())
    # the cost model counts these (case, forward pass) pairs (with at most 2 + ops + 1 chosen
    # heads, and ceil(n / 2) selection cases where each operation's odd case goes there)
    n_heads, most = len(sweep.heads), 2 + len(s.operations) + ("/" in s.operations)
    assert len(held.heads) <= most
    exact = sweep.n_cases * (n_heads + 1) + held.n_cases * (most + 1)
    passes = head_passes(shipped, s, len(cases))
    assert abs(passes - exact) <= len(s.operations) * (n_heads - most)
    assert passes < len(cases) * (n_heads + 1)  # the old design swept every case
    cna_cases = quick.stage("cna").data["cases"]
    cna = compare_neurons(shipped, cna_cases.prompts, HeadAblation([head]), cna_cases.targets)
    deep = range(head[0], shipped.cfg.n_layers)
    t5 = mask_keep_table(shipped, cna_cases.prompts, cna, ks=s.cna_ks, deep_layers=deep,
                         progress=False)  # fmt: skip
    ours = quick.stage("cna").tables["table5"].set_index(["experiment", "K"])["ours %"]
    for exp, row in t5.iterrows():
        for col, value in row.items():
            assert ours[(exp, col)] == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_stages_left_to_the_paper_preset_are_not_run(shipped):
    """query_zeroing and head_types off: the run has neither stage (the quick run has both)."""
    s = replace(ReproduceSettings.quick(), query_zeroing=False, head_types=False)
    rep = reproduce(shipped, "attribution", settings=s, progress=False)
    names = [st.name for st in rep.stages]
    assert names == [n for n in STAGES[:13] if n not in ("query_zeroing", "head_types")]


def _top1_dataset(model) -> KnowledgeDataset:
    """The tiny model's own top-1 answers to the test prompts, two 'types'."""
    items = []
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            top = int(model(model.to_tokens(p))[0, -1].argmax())
        items.append(KnowledgePrompt(p, model.to_single_str_token(top), ("color", "month")[i % 2]))
    return KnowledgeDataset(tuple(items))


def test_attribution_stage_tables_equal_direct_calls(kind):
    model = build(kind)
    data = _top1_dataset(model)
    s = ReproduceSettings(histogram_k=7, ffn_k=5, attention_k=6, query_k=4, query_value_k=9)
    value = attr.value_neuron_stage(model, data, s)
    ffn, att = value.data["ffn"], value.data["attention"]
    direct = mechcna.neuron_importance(model, data.prompts, data.answers)
    torch.testing.assert_close(ffn.scores, direct.scores, rtol=0, atol=0)
    # layer histogram vs a slow count: each prompt's top-k (layer, neuron) pairs
    expected = np.zeros(model.cfg.n_layers, dtype=int)
    for i in range(len(data)):
        for label in direct.top(7, prompt=i)["layer"]:
            expected[int(label)] += 1
    hist = value.tables["layer_histogram"]
    assert hist["FFN count"].tolist() == expected.tolist()
    zeroing = attr.intervention_stage(model, data, ffn, att, s)
    per_prompt = attr.zeroing_effects(model, data, ffn, att, 5, 6, s.seed, s.random_draws)
    draws = [f"rr_random_{d}" for d in range(s.random_draws)]
    assert len(draws) >= 5 and per_prompt[draws].notna().all().all()
    pd.testing.assert_frame_equal(zeroing.data["per_prompt"][per_prompt.columns], per_prompt)
    mean = per_prompt[draws].mean(axis=1).mean()
    assert zeroing.tables["zeroing"].iloc[0]["random MRR decrease %"] == pytest.approx(
        100 * (per_prompt["rr"].mean() - mean) / per_prompt["rr"].mean()
    )
    before = per_prompt["rr"].mean()
    row = zeroing.tables["zeroing"].iloc[0]
    assert row["MRR decrease %"] == pytest.approx(
        100 * (before - per_prompt["rr_top"].mean()) / before
    )
    query = query_stages.query_stage(model, data, ffn, att, s)
    overlap = query_value_overlap(
        ffn, query_neurons(model, data.prompts, data.answers, k=4, attention=att), k=9
    )
    counts = overlap.scores.sum(0)
    assert query.tables["query_value"]["query-only"].tolist() == counts[:, 0].tolist()
    # the query heatmap: one labelled category axis, in component order, equal to the shares
    heat = query.figures["query_heatmap"]
    n = 2 * model.cfg.n_layers + 1
    words = ["embedding"] + [f"L{c // 2} {'FFN' if c % 2 else 'attention'}" for c in range(n - 1)]
    assert list(heat.data[0].x) == words and heat.layout.xaxis.type == "category"
    assert "l.5" not in (heat.layout.xaxis.title.text or "") and heat.layout.xaxis.ticktext is None
    aq = attention_query_layers(model, data.prompts, data.answers, k=4, attention=att)
    np.testing.assert_allclose(heat.data[0].z[0], aq.scores.double().mean(0).numpy(), rtol=1e-6)
    walk = query_stages.walkthrough_stage(model, data, ffn, att)
    alone = mechcna.neuron_importance(model, data.prompts[:1], data.answers[:1])
    np.testing.assert_allclose(
        walk.tables["ffn_neurons"]["score"], alone.top(10, prompt=0)["score"], rtol=1e-5
    )


def test_empty_dataset_skips_gracefully():
    model = build("llama")
    empty = KnowledgeDataset(())
    s = ReproduceSettings()
    for result in (
        attr.value_neuron_stage(model, empty, s),
        attr.method_stage(model, empty, s),
        attr.intervention_stage(model, empty, None, None, s),
        query_stages.query_stage(model, empty, None, None, s),
        query_stages.walkthrough_stage(model, empty),
    ):
        assert result.notes and result.notes[0].startswith("Skipped")
        assert not result.claims


def test_attention_neuron_edit_removes_exactly_the_scored_terms(kind):
    """Removing every source position of a head at T equals zeroing its z at T; removing one
    neuron changes the logits by exactly its direct contribution when nothing follows."""
    model = build(kind)
    tokens = model.to_tokens(PROMPTS[2])
    t = tokens.shape[1] - 1
    every = [(1, p, 2, d) for p in range(t + 1) for d in range(model.cfg.d_head)]
    with torch.no_grad():
        with mechcna.intervene(model, HeadAblation([(1, 2)], positions=[t])):
            ablated = model(tokens)
        with mechcna.intervene(model, AttentionNeuronEdit(every)):
            edited = model(tokens)
        torch.testing.assert_close(edited, ablated, atol=1e-5, rtol=1e-5)
        clean = model(tokens)
        with mechcna.intervene(model, AttentionNeuronEdit([(1, 0, 2, 3)])):
            one = model(tokens)
    torch.testing.assert_close(one[0, :t], clean[0, :t])  # earlier positions untouched
    with pytest.raises(mechcna.MechcnaError, match="after the query position"):
        with mechcna.intervene(model, AttentionNeuronEdit([(1, 5, 0, 0)], position=2)):
            model(tokens)


def test_prompt_forms():
    data = mechcna.arithmetic_dataset("+", 1, 4, n_pairs=3, split="heldout")
    few = arith.apply_prompt_form(data, "few-shot", shots=2)
    assert all(f.prompt.endswith(c.prompt) and f.prompt.count("\n") == 2
               for f, c in zip(few, data))  # fmt: skip
    assert arith.apply_prompt_form(data, "zero-shot", shots=2) is data
    with pytest.raises(mechcna.MechcnaError, match="prompt_form"):
        arith.apply_prompt_form(data, "one-shot")


def test_markdown_table():
    frame = pd.DataFrame({"a": [1.23456789, float("nan")], "b|c": ["x|y", "z"]})
    assert markdown_table(frame).splitlines() == [
        "| a | b|c |", "|---|---|", "| 1.235 | x\\|y |", "|  | z |",
    ]  # fmt: skip
    assert "## Claims" in to_markdown(Reproduction("m", {}, (), "here", "today"))


def test_command_end_to_end(tmp_path, capsys):
    """``mechcna reproduce --quick`` (the arithmetic paper, to keep the suite fast; the fixture
    above runs both papers through the same library call)."""
    from mechcna.reproduce.command import main

    out = tmp_path / "run"
    argv = ["--model", "mechcna/arith-small", "--out", str(out), "--paper", "arithmetic"]
    assert main([*argv, "--quick", "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "verdict" in printed and "total" in printed and "index.html" in printed
    assert (out / "index.html").is_file() and (out / "reproduce.md").is_file()
    assert "mechcna reproduce --model mechcna/arith-small" in (out / "provenance.json").read_text()
    (tmp_path / "file").write_text("")
    with pytest.raises(mechcna.MechcnaError, match="not a folder"):
        main(["--model", "no/such-model", "--out", str(tmp_path / "file")])


def test_stage_lock_is_held_during_stages_and_released(tmp_path):
    import fcntl

    from mechcna.reproduce.core import StageResult, run_stages

    lock = tmp_path / "heavy.lock"
    seen = []

    def probe(name: str):
        def thunk() -> StageResult:
            with open(lock, "a") as f:  # a second open file: the stage's lock must block it
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append(False)
                except BlockingIOError:
                    seen.append(True)
            return StageResult(name, name, "attribution", 0.0)

        return name, thunk

    for hold in (0.0, 3600.0):  # released between stages / held across them
        seen.clear()
        out = run_stages([probe("a"), probe("b")], progress=False, lock=lock, hold=hold)
        assert [s.name for s in out] == ["a", "b"] and seen == [True, True]
        with open(lock, "a") as f:  # released after the run
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    seen.clear()
    run_stages([probe("c")], progress=False)
    assert seen == [False]


def test_zero_shot_table_equals_direct_search_with_its_readers(quick, shipped):
    """Table 8 of the quick run: the shallow neurons read through the head's layer alone
    (quick: zero_shot_readers=1), equal to a direct search with those readers and the
    automatically chosen M; the found sets' accuracy equals a direct masked evaluation."""
    from mechcna.analyses.evaluation import evaluate_accuracy
    from mechcna.analyses.shallow import hidden_interpretable_neurons
    from mechcna.interventions.edits import NeuronEdit

    s = ReproduceSettings.quick()
    layer = quick.stage("heads").data["shallow_head"][0]
    cases = quick.stage("cna").data["cases"]
    ours = quick.stage("shallow").tables["table8"]
    ms = ours["M (count >= M)"].tolist()
    search = hidden_interpretable_neurons(
        shipped, neuron_layers=range(layer), attention_layers=[layer], top=10, thresholds=ms
    )
    pool = layer * shipped.cfg.d_mlp
    searched = search.counts[search.counts >= 0].numpy()
    assert tuple(ms) == ct.auto_thresholds(searched, pool, s.zero_shot_share, top=10)
    assert (search.counts >= ms[0]).sum() <= s.zero_shot_share * pool or ms[0] == 10
    base = evaluate_accuracy(shipped, cases, progress=False).accuracy
    for m, n, dec in zip(ms, ours["n_neurons"], ours["relative_decrease"], strict=True):
        assert n == len(search.neurons(m))
        acc = evaluate_accuracy(shipped, cases, [NeuronEdit(search.neurons(m))] if n else [],
                                progress=False).accuracy  # fmt: skip
        assert dec == pytest.approx(100 * (base - acc) / base, abs=1e-9)
    assert f"attention layers [{layer}]" in " ".join(quick.stage("shallow").notes)
    two = shallow_stage._search(shipped, layer, replace(s, zero_shot_readers=2))[0]
    assert list(two.attention_layers) == [layer - 1, layer]
    every = shallow_stage._search(shipped, layer, replace(s, zero_shot_readers=None))[0]
    assert list(every.attention_layers) == list(range(layer + 1))
    with pytest.raises(mechcna.MechcnaError, match="zero_shot_readers"):
        replace(s, zero_shot_readers=0)
    with pytest.raises(mechcna.MechcnaError, match="random_draws"):
        replace(s, random_draws=4)
