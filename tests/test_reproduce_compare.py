"""Claim tables of several reproduce records side by side (mechcna.reproduce.compare)."""

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from mechcna.reproduce.compare import RecordError, compare_claims, read_claims
from mechcna.reproduce.core import CLAIM_COLUMNS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / "docs" / "reproduce").glob("*.md"))
RECORDS = [p for p in RECORDS if p.name != "README.md"]


def frame(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    """Claims (paper, claim, estimate, verdict) with n = 10 and the interval estimate +- 1."""
    return pd.DataFrame(
        [{"paper": p, "claim": c, "paper's figure": "", "ours": "", "n": 10, "estimate": e,
          "lo": e - 1, "hi": e + 1, "test": "> 0", "interval": "paired bootstrap", "verdict": v}
         for p, c, e, v in rows],
        columns=CLAIM_COLUMNS,
    )  # fmt: skip


def as_record(f: pd.DataFrame) -> str:
    return "# Reproducing\n\n## Claims\n\nintro\n\n" + markdown_table(f) + "\n\n## Wall time\n"


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_a_record_compared_with_itself_agrees_on_every_claim(path):
    claims = read_claims(path)
    assert len(claims) >= 10 and set(claims["verdict"]) <= {
        "holds", "does not hold", "inconclusive", "not measured"}  # fmt: skip
    cmp = compare_claims([path, path], names=["a", "b"])
    assert len(cmp.frame) == len(claims) and len(cmp.unmatched) == 0
    assert bool(cmp.frame["same verdict"].all())
    counts = dict(zip(cmp.summary()["what"], cmp.summary()["count"], strict=True))
    assert counts["a: holds"] == counts["b: holds"] == list(claims["verdict"]).count("holds")


def test_claims_match_by_title_and_order_whatever_their_test_text(tmp_path):
    a = frame([("attribution", "Value neurons are deep (test: layers >= 15 of 30)", 0.9, "holds"),
               ("attribution", "Log-prob is best (test: MRR margin)", 1.0, "holds"),
               ("attribution", "Log-prob is best (test: probability margin)", 2.0, "inconclusive"),
               ("arithmetic", "Only in a", 3.0, "holds")])  # fmt: skip
    b = frame([("attribution", "Log-prob is best (test: MRR margin)", -1.0, "does not hold"),
               ("attribution", "Value neurons are deep (test: layers >= 9 of 18)", 0.7, "holds"),
               ("attribution", "Log-prob is best (test, probability)", 5.0, "holds")])  # fmt: skip
    (tmp_path / "b.md").write_text(as_record(b))
    cmp = compare_claims([a, tmp_path / "b.md"], names=["A", "B"])
    f = cmp.frame
    assert list(f["claim"]) == ["Value neurons are deep", "Log-prob is best", "Log-prob is best"]
    assert list(f["A verdict"]) == ["holds", "holds", "inconclusive"]
    assert list(f["B verdict"]) == ["holds", "does not hold", "holds"]
    assert list(f["same verdict"]) == [True, False, False]
    assert f.loc[0, "B"] == "0.7 [-0.3, 1.7] (n=10): holds"
    assert list(cmp.unmatched["claim"]) == ["Only in a"] and list(cmp.unmatched["in"]) == ["A"]
    counts = dict(zip(cmp.summary()["what"], cmp.summary()["count"], strict=True))
    assert counts["holds in one, does not hold in another"] == 1
    assert counts["holds in every record"] == 1 and counts["claims missing from some record"] == 1
    assert "| Log-prob is best |" in cmp.to_markdown() and "**no**" in cmp.to_markdown()
    fig = cmp.plot()
    assert isinstance(fig, go.Figure) and len(fig.to_dict()["data"][0]["z"]) == 3


def test_appendix_b_claims_match_whichever_division_head_each_model_chose():
    a = frame([("arithmetic", "Division head 1_4 (appendix B): Masking hurts (test: x)", 1.0,
                "holds")])  # fmt: skip
    b = frame([("arithmetic", "Division head 7_1 (appendix B): Masking hurts (test: y)", 2.0,
                "inconclusive")])  # fmt: skip
    cmp = compare_claims([a, b], names=["A", "B"])
    assert list(cmp.frame["claim"]) == ["Division head (appendix B): Masking hurts"]
    assert len(cmp.unmatched) == 0 and list(cmp.frame["same verdict"]) == [False]


def test_markdown_records_keep_escaped_pipes_and_blank_numbers(tmp_path):
    f = frame([("arithmetic", "mean |cos| of pairs is above 1", 1.45, "holds")])
    f.loc[1] = ["arithmetic", "A claim not measured", "", "", 0, float("nan"), float("nan"),
                float("nan"), "", "", "not measured"]  # fmt: skip
    path = tmp_path / "r.md"
    path.write_text(as_record(f))
    back = read_claims(path)
    assert list(back["claim"]) == list(f["claim"])
    assert back.loc[0, "estimate"] == pytest.approx(1.45) and pd.isna(back.loc[1, "estimate"])
    cmp = compare_claims([f, path], names=["frame", "markdown"])
    assert bool(cmp.frame["same verdict"].all())
    assert cmp.frame.loc[1, "markdown"] == "(n=0): not measured"


def test_a_run_of_both_prompt_forms_matches_the_chosen_form():
    zero, few = "[zero-shot prompts] Heads matter (test: x)", "[few-shot prompts] Heads matter"
    both = frame([("arithmetic", zero, 1.0, "holds"), ("arithmetic", few, 1.0, "does not hold")])
    one = frame([("arithmetic", "Heads matter (test: y)", 1.0, "holds")])
    assert list(compare_claims([both, one], ["2", "1"]).frame["same verdict"]) == [True]
    few = compare_claims([both, one], ["2", "1"], form="few-shot").frame
    assert list(few["2 verdict"]) == ["does not hold"]
    tagged = compare_claims([both, one], ["2", "1"], form=None)
    assert len(tagged.frame) == 0 and len(tagged.unmatched) == 3


def test_bad_records_are_clear_errors(tmp_path):
    one = frame([("attribution", "x", 1.0, "holds")])
    with pytest.raises(RecordError, match="at least two"):
        compare_claims([one])
    with pytest.raises(RecordError, match="names"):
        compare_claims([one, one], names=["a"])
    with pytest.raises(RecordError, match="names"):
        compare_claims([one, one], names=["a", "a"])
    with pytest.raises(RecordError, match="no such record"):
        compare_claims([one, tmp_path / "missing"])
    (tmp_path / "notes.md").write_text("# Notes\n\nno claims here\n")
    with pytest.raises(RecordError, match="no '## Claims' section"):
        compare_claims([one, tmp_path / "notes.md"])
    with pytest.raises(RecordError, match="no column verdict"):
        compare_claims([one, one.drop(columns="verdict")])
    run = tmp_path / "run"
    run.mkdir()
    one.to_csv(run / "table-01-claims.csv", index=False)  # a run folder: its claims CSV
    assert bool(compare_claims([one, run], ["f", "run"]).frame["same verdict"].all())
