"""Issue 21, second pass: the default preset, both arithmetic prompt forms side by side, the
pruned Table 8 concept list and the LoRA verdicts of docs/applications.md."""

import argparse

import pandas as pd
import pytest
import torch

import mechcna
from mechcna.reproduce import ReproduceSettings


# ------------------------------------------------------------------------------ default preset
def test_default_preset_is_standard(monkeypatch, tmp_path):
    """The library call and both command lines run ``standard`` when no preset is named."""
    import mechcna.reproduce as rp
    from mechcna.cli import papers
    from mechcna.reproduce import command

    parser = argparse.ArgumentParser()
    papers._args(parser)
    assert papers._settings(parser.parse_args([])).preset == "standard"
    assert papers._settings(parser.parse_args(["--quick"])).preset == "quick"
    assert papers._settings(parser.parse_args(["--preset", "full"])).preset == "full"
    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    chosen = []

    def stop(model, paper, *, settings, **kwargs):
        chosen.append(settings.preset)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(command, "reproduce", stop)
    for argv, preset in (([], "standard"), (["--quick"], "quick"), (["--preset", "full"], "full")):
        with pytest.raises(KeyboardInterrupt):
            command.main(["--model", "m", "--out", str(tmp_path / "o"), *argv])
        assert chosen.pop() == preset
    monkeypatch.setattr(rp, "run_stages", lambda stages, progress, lock: [])
    monkeypatch.setattr(rp, "expected_times", lambda *a, **k: pd.DataFrame())
    assert rp.reproduce(model, progress=False).settings["preset"] == "standard"
    assert rp.reproduce(model, quick=True, progress=False).settings["preset"] == "quick"
    assert ReproduceSettings.named("full").preset == "full"


# ------------------------------------------------------------------------------ labels
def test_attribution_rows_mark_their_sources(shipped_quick_attribution):
    """Every ATTR paper figure on a claim row is marked as a secondary source or as one
    prompt's notebook printout; Table 7 (query neurons) is labelled as the other experiment."""
    rep = shipped_quick_attribution
    rows = [c for c in rep.claim_list if c.paper == "attribution"]
    assert rows
    for c in rows:
        assert "(secondary source)" in c.paper_figure or (
            "notebook printout for one prompt" in c.paper_figure
        ), c.paper_figure
    printout = [c for c in rows if "20.37 of 32" in c.paper_figure]
    assert printout and all("one prompt" in c.paper_figure for c in printout)
    zeroing = rep.stage("zeroing").tables["zeroing"]
    t7 = [c for c in zeroing.columns if "Table 7" in c]
    assert t7 and all("QUERY neurons (other experiment)" in c for c in t7)
    layers = rep.stage("query").tables["query_layers"]
    cols = [c for c in layers.columns if "20.37" in str(layers[c].iloc[0])]
    assert cols and all("notebook printout, one prompt" in c for c in cols)


@pytest.fixture(scope="module")
def shipped_quick_attribution():
    from mechcna.reproduce import reproduce

    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    return reproduce(model, "attribution", quick=True, progress=False)


# ------------------------------------------------------------------------------ Table 8
@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


def _slow_counts(model, concepts, neuron_layers, readers, top):
    """Reference: each neuron through each later reader one at a time, its top tokens
    matched against the concept texts by string (the search does it by id masks)."""
    from mechcna.analyses.shallow import concept_tokens
    from mechcna.analyses.transfer import vo_transform
    from mechcna.engine.projection import linear_part
    from mechcna.models.view import architecture

    arch = architecture(model)
    texts = set(concept_tokens(model, concepts).values())
    out = {}
    for i in neuron_layers:
        for j in range(model.cfg.d_mlp):
            best = 0
            for l in readers:
                if l <= i:
                    continue
                row = arch.W_out(i)[j : j + 1].double()
                ids = linear_part(arch, vo_transform(model, row, l))[0].topk(top).indices
                best = max(best, sum(model.tokenizer.decode([int(t)]) in texts for t in ids))
            out[(i, j)] = best
    return out


def test_pruned_and_default_lists_in_one_pass_equal_separate_searches(shipped):
    """Table 8 with and without common English words: one shared pass gives each list's
    counts exactly as a separate search does, and a slow per-neuron reference agrees."""
    from mechcna.analyses.shallow import (
        COMMON_WORDS,
        DEFAULT_CONCEPTS,
        PRUNED_CONCEPTS,
        concept_tokens,
        hidden_interpretable_neurons,
        hidden_interpretable_searches,
    )

    assert set(PRUNED_CONCEPTS) == {c for c in DEFAULT_CONCEPTS if c.lower() not in COMMON_WORDS}
    assert {"one", "second", "times", "product", "-"} <= COMMON_WORDS
    assert {"three", "3", "plus", "twenty"} <= set(PRUNED_CONCEPTS)
    pruned_texts = {t.strip() for t in concept_tokens(shipped, PRUNED_CONCEPTS).values()}
    assert "one" not in pruned_texts and "three" in pruned_texts
    both = hidden_interpretable_searches(
        shipped, {"all": None, "pruned": PRUNED_CONCEPTS}, neuron_layers=[0, 1],
        attention_layers=[1, 2], top=10, thresholds=(3,),
    )  # fmt: skip
    for name, concepts in (("all", None), ("pruned", PRUNED_CONCEPTS)):
        alone = hidden_interpretable_neurons(
            shipped, neuron_layers=[0, 1], attention_layers=[1, 2], top=10, thresholds=(3,),
            concepts=concepts,
        )  # fmt: skip
        assert torch.equal(both[name].counts, alone.counts)
        assert torch.equal(both[name].best_layer, alone.best_layer)
        assert both[name].concept_ids == alone.concept_ids
    assert len(both["pruned"].concept_ids) < len(both["all"].concept_ids)
    assert (both["pruned"].counts <= both["all"].counts).all()
    assert (both["pruned"].counts < both["all"].counts).any()
    slow = _slow_counts(shipped, PRUNED_CONCEPTS, [1], [1, 2], 10)
    for (i, j), n in list(slow.items())[:64]:
        assert int(both["pruned"].counts[i, j]) == n


def test_a_search_that_selects_everything_warns_and_selective_thresholds_select(shipped, caplog):
    """The shipped model's old settings (top 50, M = 2, 4, 6) keep all 768 neurons: the search
    warns and the summary says so; selective() picks M whose sets are a few percent."""
    from mechcna.analyses.shallow import hidden_interpretable_neurons, mask_experiment

    with caplog.at_level("WARNING", logger="mechcna.analyses.shallow"):
        old = hidden_interpretable_neurons(shipped, top=50, thresholds=(2, 4, 6))
    assert "selects every one of the 768" in caplog.text
    summary = old.summary()
    assert summary["selects everything"].all() and (summary["share of searched %"] == 100).all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mechcna.analyses.shallow"):
        new = hidden_interpretable_neurons(shipped, top=10, thresholds=()).selective(share=0.05)
    assert "selects every" not in caplog.text
    counts = new.counts[new.counts >= 0]
    m0 = new.thresholds[0]
    assert (counts >= m0).sum() <= 0.05 * 768 and (m0 == 1 or (counts >= m0 - 1).sum() > 38)
    assert not new.summary()["selects everything"].any()
    res = mask_experiment(shipped, old, lambda m, iv: 1.0).to_frame()
    assert res["selects everything"].all()


def test_zero_shot_cli_default_selects(shipped, tmp_path, capsys):
    """`mechcna zero-shot` without --thresholds on the shipped model: M chosen so the sets
    select (the old default 0-3 of the top 50 kept every neuron)."""
    from mechcna.cli import main

    out = tmp_path / "zs"
    argv = ["zero-shot", "--model", "mechcna/arith-small", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    frames = [pd.read_csv(p) for p in out.glob("table-*.csv")]
    summary = next(f for f in frames if "share of searched %" in f.columns)
    assert len(summary) and not summary["selects everything"].any()
    assert (summary["share of searched %"] <= 5).all()


# ------------------------------------------------------------------------------ prompt forms
def test_both_prompt_forms_run_side_by_side(shipped, tmp_path):
    """prompt_form="both": one arithmetic chain per form, stages and claims labelled; each
    chain equals a run in that form alone; the page keeps the paper references."""
    from dataclasses import replace

    from mechcna.reproduce import expected_times, reproduce, to_markdown
    from mechcna.reproduce.page import _ref

    quick = ReproduceSettings.quick()
    both = reproduce(shipped, "arithmetic", settings=replace(quick, prompt_form="both"),
                     progress=False, checkpoint=tmp_path)  # fmt: skip
    names = [s.name for s in both.stages]
    assert names == [f"{n}@{f}" for f in ("zero-shot", "few-shot")
                     for n in ("arithmetic_data", "heads", "cna", "shallow", "pe_graph", "trace",
                               "cells")]  # fmt: skip
    few = both.stage("arithmetic_data@few-shot").data["dataset"]
    assert all(p.count("=") == 3 for p in few.prompts)  # two solved examples, then the case
    zero = both.stage("arithmetic_data@zero-shot").data["dataset"]
    assert all(p.count("=") == 1 for p in zero.prompts)
    for form in ("zero-shot", "few-shot"):
        alone = reproduce(shipped, "arithmetic", settings=replace(quick, prompt_form=form),
                          progress=False)  # fmt: skip
        mine = both.claims[both.claims["claim"].str.startswith(f"[{form} prompts] ")]
        assert len(mine) == len(alone.claims)
        stripped = mine.assign(claim=mine["claim"].str.removeprefix(f"[{form} prompts] "))
        pd.testing.assert_frame_equal(stripped.reset_index(drop=True), alone.claims)
    assert _ref("heads@few-shot", "table1") == "ARITH Table 1"
    page = to_markdown(both)
    assert "(few-shot prompts)" in page and "(zero-shot prompts)" in page
    again = reproduce(shipped, "arithmetic", settings=replace(quick, prompt_form="both"),
                      progress=False, checkpoint=tmp_path)  # fmt: skip
    pd.testing.assert_frame_equal(again.claims, both.claims)  # resumed from the checkpoint
    t_both = expected_times(shipped, replace(quick, prompt_form="both"), "arithmetic")
    t_zero = expected_times(shipped, quick, "arithmetic")
    assert t_both["expected seconds"].iloc[-1] > 2 * t_zero["expected seconds"].iloc[-1]


# ------------------------------------------------------------------------------ applications
@pytest.mark.parametrize("k,n", [(0, 20), (23, 77), (22, 77), (77, 77), (855, 1176)])
def test_wilson_equals_scipy(k, n):
    from scipy import stats as sps

    from mechcna.reproduce.application_claims import wilson

    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_newcombe_difference_against_a_grid_reference():
    """Newcombe's method 10 from Wilson intervals found by scanning p on a fine grid (the
    interval is every p whose score statistic is within z), and its coverage."""
    import numpy as np

    from mechcna.reproduce.application_claims import newcombe_difference

    z = 1.959963984540054
    grid = np.linspace(0, 1, 400001)

    def scan(k, n):
        ok = np.abs(k / n - grid) <= z * np.sqrt(grid * (1 - grid) / n)
        return grid[ok].min(), grid[ok].max()

    for k1, k2, n in ((23, 22, 77), (9, 1, 77), (855, 896, 1176), (0, 5, 30)):
        (l1, u1), (l2, u2) = scan(k1, n), scan(k2, n)
        p1, p2 = k1 / n, k2 / n
        d, lo, hi = newcombe_difference(k1, n, k2, n)
        assert d == pytest.approx(p1 - p2)
        assert lo == pytest.approx(d - np.hypot(p1 - l1, u2 - p2), abs=2e-5)
        assert hi == pytest.approx(d + np.hypot(u1 - p1, p2 - l2), abs=2e-5)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        a, b = rng.binomial(80, 0.3), rng.binomial(80, 0.25)
        _, lo, hi = newcombe_difference(int(a), 80, int(b), 80)
        hits += lo <= 0.05 <= hi
    assert 0.93 <= hits / 2000 <= 0.975


def test_application_verdicts_from_recorded_runs():
    """The docs' LoRA rows computed by code: SmolLM2's Table 11 after LoRA (0.299 vs 0.286 on
    77 cases) does not hold against the 20-point margin; the recorded runs lack per-case
    Table 10 increases, so that row is not measured rather than read off the means."""
    import json
    from pathlib import Path

    from mechcna.reproduce.application_claims import application_claims, verdict_table

    docs = Path(__file__).resolve().parent.parent / "docs" / "applications"
    smol = json.loads((docs / "smollm2" / "results.json").read_text())
    rows = {c.claim.split(" (")[0]: c for c in application_claims(smol)}
    t11 = next(c for k, c in rows.items() if k.startswith("After a fresh LoRA"))
    assert t11.test is not None and t11.test.n == 77 and t11.verdict == "does not hold"
    assert t11.test.estimate == pytest.approx((23 - 22) / 77)
    t10 = next(c for k, c in rows.items() if k.startswith("LoRA on shallow layers"))
    assert t10.verdict == "not measured"
    fig2 = next(c for k, c in rows.items() if k.startswith("LoRA on one attention layer"))
    assert fig2.test is not None and fig2.verdict == "holds" and fig2.test.n == 77
    table = verdict_table([docs / r / "results.json" for r in ("shipped", "smollm2")])
    assert set(table["run"]) == {"shipped", "smollm2"} and {"n", "lo", "hi"} <= set(table)


def test_layer_pattern_test_is_a_paired_bootstrap_and_can_fail():
    """Table 10's layer pattern: shallow-layer LoRAs amplify more (holds) or the reverse, as
    SmolLM2's layer-24 LoRA (does not hold); fewer than 10 cases stay inconclusive."""
    import numpy as np

    from mechcna.reproduce import stats
    from mechcna.reproduce.application_claims import _groups, layer_pattern_test

    rng = np.random.default_rng(0)
    paperlike = {1: 42 + rng.normal(size=24), 5: 45 + rng.normal(size=24),
                 20: 2 + rng.normal(size=24)}  # fmt: skip
    t = layer_pattern_test(paperlike, [1, 5], [20])
    assert t.verdict == "holds" and t.estimate == pytest.approx(
        np.mean([paperlike[1], paperlike[5]]) - paperlike[20].mean()
    )
    ref = stats.bootstrap_test(
        lambda a, b: float(a.mean() - b.mean()),
        np.stack([paperlike[1], paperlike[5]], 1), paperlike[20][:, None], threshold=0.0,
    )  # fmt: skip
    assert (t.lo, t.hi) == (ref.lo, ref.hi)
    reversed_ = {1: 5 + rng.normal(size=24), 24: 30 + rng.normal(size=24)}
    assert layer_pattern_test(reversed_, [1], [24]).verdict == "does not hold"
    few = {1: 5 + rng.normal(size=4), 24: 30 + rng.normal(size=4)}
    assert layer_pattern_test(few, [1], [24]).verdict == "inconclusive"
    assert _groups(32) == (range(1, 10), range(17, 32))
    assert _groups(30) == (range(1, 10), range(15, 30)) and _groups(4) == (range(1, 2), range(2, 4))


def test_per_case_coefficient_increase_averages_to_table10():
    import torch as t

    from mechcna.analyses.comparative import NeuronComparison
    from mechcna.applications.lora_analysis import (
        LoraComparison,
        coefficient_increase,
        coefficient_increase_per_case,
    )

    g = t.Generator().manual_seed(0)
    m, m_o = t.randn(5, 3, 8, generator=g), t.randn(5, 3, 8, generator=g)
    scores = t.randn(5, 3, 8, generator=g)
    cna = NeuronComparison.__new__(NeuronComparison)
    object.__setattr__(cna, "scores", scores)
    object.__setattr__(cna, "extras", {"coefficient": m, "coefficient_other": m_o})
    comp = LoraComparison(cna, "lora_minus_original")
    per = coefficient_increase_per_case(comp, ks=(4,))["top4"]
    for i in range(5):  # slow reference: each case's top-4 neurons by score, by hand
        flat = scores[i].flatten()
        idx = sorted(range(len(flat)), key=lambda j: -float(flat[j]))[:4]
        before = sum(abs(float(m_o[i].flatten()[j])) for j in idx)
        after = sum(abs(float(m[i].flatten()[j])) for j in idx)
        assert float(per[i]) == pytest.approx(100 * (after - before) / before, rel=1e-9)
    assert coefficient_increase(comp, ks=(4,))["top4"] == pytest.approx(float(per.mean()))


def test_table11_uses_a_paired_interval_when_cases_are_recorded():
    """With each case's correctness (table11.correct) the difference gets a paired bootstrap
    interval, narrower than the unpaired Newcombe one for positively correlated models."""
    import numpy as np

    from mechcna.reproduce import stats
    from mechcna.reproduce.application_claims import application_claims

    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.6
    cna = base.copy()
    rand = base & (rng.random(300) < 0.9)  # mostly the same cases, a few more wrong
    acc = {"pruned_cna": 0.5, "pruned_random": 0.4, "lora_pruned_cna": cna.mean(),
           "lora_pruned_random": rand.mean()}  # fmt: skip
    unpaired = {"data": {"test_cases": 300}, "table11": {"accuracy": acc}}
    per = {"lora_pruned_cna": cna.astype(int).tolist(),
           "lora_pruned_random": rand.astype(int).tolist()}  # fmt: skip
    paired = {"data": {"test_cases": 300}, "table11": {"accuracy": acc, "correct": per}}
    (u,) = application_claims(unpaired)
    (p,) = application_claims(paired)
    assert u.test is not None and p.test is not None
    assert u.test.method == "Newcombe (unpaired)" and p.test.method == "paired bootstrap"
    assert p.test.estimate == pytest.approx(u.test.estimate, abs=1e-12)
    assert p.test.hi - p.test.lo < u.test.hi - u.test.lo
    ref = stats.bootstrap_test(lambda x, y: float(x.mean() - y.mean()), cna.astype(float),
                               rand.astype(float), threshold=0.2)  # fmt: skip
    assert (p.test.lo, p.test.hi) == (ref.lo, ref.hi) and p.verdict == "does not hold"
    (cli,) = application_claims({"accuracy": acc, "correct": per})
    assert cli.test is not None and cli.test.n == 300  # a `mechcna prune` results.json
