"""The report page: every figure inline, plotly.js once, no external URL, one CSV per table."""

import json
import re

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from jaxtyping import TypeCheckError
from plotly.offline import get_plotlyjs

from mechcna.errors import MechcnaError
from mechcna.report.page import OutputPathError, Provenance, Report, check_out_dir
from tests.helpers import build


def _report() -> Report:
    report = Report("A <run>", Provenance(model="toy", extra={"seed": 3}), intro="First words.")
    report.section("Accuracy", "Held-out accuracy.\n\nSecond paragraph.")
    report.table(
        pd.DataFrame({"cell": ["+", "-"], "accuracy": [1.0, 0.5]}),
        "accuracy per cell",
        paper_ref="ARITH Table 1",
    )
    report.figure(go.Figure(go.Bar(x=[0, 1], y=[3, 4])), "bars </script> tricky", "ARITH Fig. 2")
    report.section("CNA")
    report.figure(go.Figure(go.Heatmap(z=[[1, -1]])), "a heatmap")
    report.table(pd.DataFrame({"k": [5]}, index=["mask"]), "mask table", index=True)
    report.preformatted("col  col\n1    2", caption="printed")
    return report


def assert_self_contained(page: str, n_figures: int) -> None:
    """plotly.js exactly once (none without figures), one drawn div per figure, and no URL
    outside plotly.js."""
    bundle = get_plotlyjs()
    assert page.count(bundle) == (1 if n_figures else 0)
    rest = page.replace(bundle, "")
    assert "http://" not in rest and "https://" not in rest
    assert not re.search(r"\b(src|href)\s*=", rest)
    assert "@import" not in rest
    divs = re.findall(r'<div id="(figure-\d+)"', rest)
    assert divs == [f"figure-{i}" for i in range(1, n_figures + 1)]
    for div in divs:
        assert rest.count(f'Plotly.newPlot("{div}"') == 1
    # nothing in a figure's JSON closes the script early
    scripts = re.findall(r"<script>(.*?)</script>", rest, flags=re.S)
    # the emptied bundle's tag and one per figure
    assert len(scripts) == (n_figures + 1 if n_figures else 0)


def test_page_holds_every_figure_and_no_external_url(tmp_path):
    report = _report()
    page_path = report.write(tmp_path / "out")
    page = page_path.read_text()
    assert page_path.name == "index.html"
    assert_self_contained(page, n_figures=2)
    assert "A &lt;run&gt;" in page and "Second paragraph." in page
    assert "Figure 1.</b> bars &lt;/script&gt; tricky" in page
    assert "Paper: ARITH Table 1." in page and "Paper: ARITH Fig. 2." in page
    for field in ("weight processing", "dequantisation", "BOS", "wall time", "versions"):
        assert f"<th>{field}</th>" in page
    # one CSV per table, in page order, equal to the frames
    csvs = sorted(p.name for p in page_path.parent.glob("*.csv"))
    assert csvs == ["table-01-accuracy-per-cell.csv", "table-02-mask-table.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(page_path.parent / csvs[0]), report.tables[0])
    assert report.tables[0]["accuracy %"].tolist() == [100.0, 50.0]  # percent on every page
    assert list(pd.read_csv(page_path.parent / csvs[1]).columns) == ["index", "k"]
    text = (page_path.parent / "report.txt").read_text()
    assert "== Accuracy" in text and "accuracy per cell [paper: ARITH Table 1]" in text
    prov = json.loads((page_path.parent / "provenance.json").read_text())
    assert prov["model"] == "toy" and prov["extra"] == {"seed": 3}
    assert prov["wall_time_s"] >= 0 and "plotly" in prov["versions"]


def test_provenance_from_model():
    model = build("llama")
    prov = Provenance.from_model(model)
    assert prov.weight_processing.startswith("none")
    expect = "prepended" if model.cfg.default_prepend_bos else "not prepended"
    assert prov.bos.startswith(expect + " (policy: ") and prov.dequantisation.startswith("none")


def test_bad_inputs_and_out_dirs(tmp_path):
    report = Report("x")
    # a MechcnaError at run time; under pytest the runtime type checker may raise first
    with pytest.raises((MechcnaError, TypeCheckError), match="Figure"):
        report.figure({"data": []}, "not a figure")  # type: ignore[arg-type]
    with pytest.raises((MechcnaError, TypeCheckError), match="DataFrame"):
        report.table([[1]], "not a frame")  # type: ignore[arg-type]
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_out_dir(file)
    with pytest.raises(OutputPathError, match="cannot create"):
        check_out_dir(file / "below")
    assert check_out_dir(tmp_path / "a" / "b").is_dir()


def test_a_non_empty_folder_is_refused_and_overwrite_clears_only_mechcna_files(tmp_path):
    def page(n_tables: int) -> Report:
        report = Report("x", Provenance(model="toy"))
        for i in range(n_tables):
            report.table(pd.DataFrame({"a": [i]}), f"table {i}")
        report.attach("results.json", "{}")
        return report

    out = tmp_path / "out"
    page(3).write(out)
    assert (out / "table-03-table-2.csv").exists() and (out / "results.json").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"not empty.*overwrite"):
        page(1).write(out)
    with pytest.raises(OutputPathError, match="not empty"):
        check_out_dir(out)
    assert (out / "table-03-table-2.csv").exists()  # nothing deleted by a refusal
    page(1).write(out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".mechcna-files", "index.html", "notes.txt", "provenance.json", "report.txt",
        "results.json", "table-01-table-0.csv",
    ]  # fmt: skip
    # a folder written before the manifest existed: mechcna's file names are cleared
    (out / ".mechcna-files").unlink()
    (out / "table-07-old.csv").write_text("a\n1\n")
    check_out_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(MechcnaError, match="file name"):
        page(0).attach("../x", "")


def test_png_export_without_kaleido_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    from mechcna.analyses.plotting import ExportError, save_png

    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    with pytest.raises(ExportError, match=r"kaleido 0\.2\.1.*mechcna\[png\]"):
        save_png(go.Figure(go.Bar(x=[0], y=[1])), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_figures_use_integer_ticks_and_side_by_side_bars():
    from mechcna.analyses.attribution import layer_importance
    from mechcna.analyses.plotting import experiment_bars

    model = build("llama")
    fig = layer_importance(model, ["3+5="]).plot(0)
    assert fig.layout.barmode == "group" and fig.layout.xaxis.dtick == 1
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text
    assert list(fig.data[0].x) == list(fig.data[1].x) == list(range(model.cfg.n_layers))
    table = pd.DataFrame({"top5": [1.0, 2.0, 0.0, 30.0]}, index=["mask", "keep", "random", "coef"])
    bars = experiment_bars(table)
    coef = next(t for t in bars.data if t.name == "coef")
    assert coef.yaxis == "y2" and all(t.yaxis == "y" for t in bars.data if t.name != "coef")


def test_neuron_count_hover_names_neurons_and_their_top_tokens():
    from mechcna import neuron_importance, top_tokens

    model = build("llama")
    result = neuron_importance(model, ["3+5="])
    top = result.top(12, prompt=0)
    fig = result.plot(0, k=12, model=model)
    hover = list(fig.data[0].hovertext)
    assert len(hover) == model.cfg.n_layers
    counts = top["layer"].value_counts()
    for layer, text in enumerate(hover):
        assert text.startswith(f"layer {layer}: {int(counts.get(layer, 0))} of the top-12")
    best = top.iloc[0]
    # sign-aware: the tokens of coefficient * value vector, as on every other page
    neuron, m = (int(best.layer), int(best.neuron)), float(best.coefficient)
    words = ", ".join(t for t, _ in top_tokens(model, neuron, 10, coefficient=m).top)
    assert f"{best.label}: {best.score:.4f} ({words})" in hover[int(best.layer)]
    assert "(" not in result.plot(0, k=12).data[0].hovertext[int(best.layer)]  # no model: no tokens


def test_provenance_records_a_command_that_runs_and_describes_user_built_models(tmp_path):
    import shlex

    from transformer_lens import HookedTransformer

    import mechcna
    from mechcna.cli import main
    from mechcna.report import demo
    from tests.helpers import gpt2_cfg

    # the command line as typed, shell-quoted: splitting it gives back the arguments
    argv = ["top-tokens", "--neuron", "3.266", "--k", "3", "--quiet", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert shlex.split(prov["extra"]["command"]) == ["mechcna", *argv]
    # the demo's default command names the model as it loads, not cfg.model_name
    shipped = mechcna.load_model("mechcna/arith-small", device="cpu")
    assert shipped.cfg.model_name != "mechcna/arith-small"
    page = demo.build(shipped, progress=False, n_pairs=1)
    prov_demo = page.provenance
    assert prov_demo is not None
    # the demo and `mechcna attribute` show the same sign-aware tokens for the same neuron
    ffn_table = next(b.payload for b in page._blocks if b.name == "top-ffn-neurons")
    out = tmp_path / "attr"
    assert (
        main(["attribute", "--prompt", "3+5=", "--level", "ffn", "--quiet", "--out", str(out)]) == 0
    )
    attr_table = pd.read_csv(out / "table-01-ffn-0.csv").head(len(ffn_table))
    assert attr_table["label"].tolist() == ffn_table["label"].tolist()
    assert attr_table["top_tokens"].tolist() == ffn_table["top_tokens"].tolist()
    row = ffn_table.iloc[0]
    neuron = (int(row["layer"]), int(row["neuron"]))
    words = mechcna.top_tokens(shipped, neuron, 10, coefficient=float(row["coefficient"]))
    assert row["top_tokens"] == ", ".join(words.top()["token"])
    # accuracy on the demo page: percent, once (not a percent multiplied again)
    for table in page.tables:
        cols = [c for c in table.columns if "accuracy" in str(c)]
        assert all(str(c).endswith("%") for c in cols), cols
        assert ((table[cols].abs() <= 100) & table[cols].notna()).all().all(), cols
    # every figure and table of the demo names the paper item it shows
    shown = [b for b in page._blocks if b.kind in ("figure", "table")]
    assert len(shown) >= 15 and [b.caption for b in shown if not b.paper_ref] == []
    command = shlex.split(prov_demo.extra["command"])
    assert command[:2] == ["mechcna", "demo"]
    reloaded = mechcna.load_model(command[command.index("--model") + 1], device="cpu")
    assert torch.equal(reloaded.W_U, shipped.W_U)
    # a model the user built without load_model is described, not None
    user = HookedTransformer(gpt2_cfg())
    source = mechcna.get_provenance(user)
    assert source.format == "user-built" and source.source == user.cfg.model_name
    assert source.describe().startswith(f"{user.cfg.model_name} (user-built")
    assert "user-built" in Provenance.from_model(user).extra["source"]


def test_a_page_without_figures_does_not_embed_plotly(tmp_path):
    report = Report("tables only", Provenance(model="toy"))
    report.table(pd.DataFrame({"a": [1]}), "one table")
    page = report.write(tmp_path / "out").read_text()
    assert_self_contained(page, n_figures=0)
    assert len(page) < 50_000 and "Plotly" not in page


def test_accuracy_is_in_percent_on_every_page(tmp_path):
    """Accuracy columns are fractions in the library and percent on a page (one unit)."""
    from mechcna.cli import main
    from mechcna.report.page import percent_accuracy

    frame = pd.DataFrame(
        {
            "head": ["0.0", "1.1"],
            "accuracy": [0.25, 1.0],
            "base_accuracy": [0.5, 0.5],
            "delta_accuracy": [-0.25, 0.5],
            "gain": [0.1, 0.2],
            "accuracy %": [25.0, 100.0],
            "relative_decrease %": [50.0, -100.0],
            "n": [4, 4],
        }
    )
    shown = percent_accuracy(frame)
    assert list(shown.columns) == [
        "head", "accuracy %", "base_accuracy %", "delta_accuracy %", "gain %",
        "accuracy %", "relative_decrease %", "n",
    ]  # fmt: skip
    assert shown.iloc[:, 1].tolist() == [25.0, 100.0] and shown.iloc[:, 3].tolist() == [-25, 50]
    assert shown.iloc[:, 4].tolist() == pytest.approx([10.0, 20.0])
    assert shown.iloc[:, 5].tolist() == [25.0, 100.0] and shown["n"].tolist() == [4, 4]
    assert frame["accuracy"].tolist() == [0.25, 1.0]  # the caller's frame is untouched

    out = tmp_path / "acc"
    args = ["accuracy", "--operations", "+", "--digits", "1", "--pairs", "3", "--quiet"]
    assert main([*args, "--ablate-head", "0.0", "--out", str(out)]) == 0
    import mechcna

    model = mechcna.load_model("mechcna/arith-small")
    data = mechcna.arithmetic_dataset(operations="+", digits=1, n_pairs=3, tokenizer=model)
    base = mechcna.evaluate_accuracy(model, data, progress=False)
    per_cell = pd.read_csv(out / "table-01-accuracy-per-cell.csv")
    assert per_cell["accuracy %"].tolist() == pytest.approx(
        (100 * base.to_frame(("operation", "digits"))["accuracy"]).tolist()
    )
    for csv in out.glob("*.csv"):
        table = pd.read_csv(csv)
        cols = [c for c in table.columns if "accuracy" in c]
        assert cols and all(c.endswith("%") for c in cols), (csv.name, cols)
        assert ((table[cols] >= 0) & (table[cols] <= 100)).all().all(), csv.name
    assert f"overall accuracy {100 * base.accuracy:.1f}%" in (out / "report.txt").read_text()
