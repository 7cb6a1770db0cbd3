"""Writing a reproduction: the HTML report page (:mod:`mechcna.report.page`) and the markdown
record.

``mechcna reproduce --out DIR`` writes ``DIR/index.html`` (every table and figure with its
caption and paper reference, offline), one CSV per table, ``report.txt``, ``provenance.json``
and ``DIR/reproduce.md`` (claims, wall times, settings and every table as markdown, the form
committed under ``docs/reproduce/``).
"""

from pathlib import Path

import pandas as pd

from mechcna.report.page import Provenance, Report
from mechcna.reproduce.core import PAPER_TITLES, Reproduction, markdown_table

#: The paper table or figure each stage table / figure corresponds to.
PAPER_REFS: dict[tuple[str, str], str] = {
    ("knowledge", "survivors"): "ATTR section 4.1 (data filter)",
    ("value_neurons", "layer_histogram"): "ATTR Figure 2",
    ("value_neurons", "attention_vs_ffn"): "ATTR Table 3",
    ("methods", "methods"): "ATTR Table 2",
    ("zeroing", "zeroing"): "ATTR Table 7 / appendix",
    ("query", "query_layers"): "ATTR Figures 6-7",
    ("query", "query_heatmap"): "ATTR Figures 6-7",
    ("query", "query_value"): "ATTR query-only vs query-value curves",
    ("walkthrough", "layers"): "knowledge notebook cell 5",
    ("walkthrough", "heads"): "knowledge notebook cell 6",
    ("walkthrough", "head_positions"): "knowledge notebook cell 7",
    ("walkthrough", "ffn_neurons"): "knowledge notebook cell 9",
    ("walkthrough", "attention_neurons"): "knowledge notebook cell 11",
    ("query_zeroing", "table7"): "ATTR Table 7 (top-1000 query neurons)",
    ("interpolation", "layer_path"): "ATTR Figures 3 / 10 (layer by layer)",
    ("interpolation", "interpolation"): "ATTR Figures 3 / 10",
    ("value_layers", "FFN_layers"): "ATTR Figures 4 / 5 (FFN)",
    ("value_layers", "FFN_heatmap"): "ATTR Figures 4 / 5 (FFN)",
    ("value_layers", "attention_layers"): "ATTR Figures 4 / 5 (attention)",
    ("value_layers", "attention_heatmap"): "ATTR Figures 4 / 5 (attention)",
    ("value_layers", "attention_top_layers"): "ATTR Figures 4 / 5 (whole layers)",
    ("value_layers", "attention_top_heatmap"): "ATTR Figures 4 / 5 (whole layers)",
    ("value_layers", "FFN_top_layers"): "ATTR Figures 4 / 5 (whole layers)",
    ("value_layers", "FFN_top_heatmap"): "ATTR Figures 4 / 5 (whole layers)",
    ("prob_histogram", "histograms"): "ATTR Figure 2 (log-prob vs prob increase)",
    ("head_types", "head_attribution"): "ATTR head attribution",
    ("head_types", "head_heatmap"): "ATTR head attribution (knowledge cell 6)",
    ("head_types", "head_intervention"): "ATTR top-1% head intervention",
    ("shared_neurons", "shared"): "ATTR section 5.5 (shared neurons)",
    ("query_tokens", "query_neurons"): "ATTR Table 9 (hidden-interpretable query neuron)",
    ("query_tokens", "tokens"): "ATTR Table 9 / knowledge notebook cell 19",
    ("arithmetic_data", "baseline"): "ARITH section 3 (Tables 24-27 'ori')",
    ("heads", "table1"): "ARITH Table 1",
    ("heads", "table2"): "ARITH Table 2",
    ("heads", "table3"): "ARITH Table 3",
    ("heads", "tables24_27"): "ARITH Tables 24-27",
    ("heads", "heatmap"): "ARITH Tables 1-2 (layer x head)",
    ("cna", "table4"): "ARITH Table 4",
    ("cna", "table5"): "ARITH Table 5",
    ("cna", "table6"): "ARITH Table 6",
    ("shallow", "table7"): "ARITH Table 7 (operand rows)",
    ("shallow", "table7_neurons"): "ARITH Table 7 (neuron rows)",
    ("shallow", "table8"): "ARITH Table 8",
    ("shallow", "table8_pruned"): "ARITH Table 8 (concepts without common English words)",
    ("shallow", "table7_neurons_pruned"): "ARITH Table 7 (neuron rows, pruned concepts)",
    ("shallow", "zero_shot"): "ARITH Table 8",
    ("shallow", "zero_shot_pruned"): "ARITH Table 8 (pruned concepts)",
    ("pe_graph", "pe_alignment"): "ARITH section 4.2 step 3 (prediction-enhancing graph)",
    ("pe_graph", "pe_edges"): "ARITH section 4.2 step 3 (value-key products)",
    ("pe_graph", "pe_graph"): "ARITH section 4.2 step 3 (prediction-enhancing graph)",
    ("trace", "trace_cases"): "ARITH section 4.2 step 2 (feature transfer, per case)",
    ("trace", "trace_positions"): "ARITH 4.2 step 2 / CNA notebook cell 8",
    ("trace", "trace_heads"): "ARITH 4.2 step 2 / CNA notebook cell 9",
    ("trace", "trace_components"): "ARITH 4.2 step 2 / CNA notebook cell 10",
    ("trace", "trace_sources"): "ARITH 4.2 step 2 / CNA notebook cell 11",
    ("trace", "trace_two_hop"): "ARITH 4.2 step 2 / CNA notebook cell 12",
    ("trace", "trace_neurons"): "ARITH 4.2 step 2 / CNA notebook cell 13",
    ("cells", "templates"): "ARITH Table 1 (templates 1-3)",
    ("cells", "cells_top_heads"): "ARITH Tables 24-27 (3-digit cells, other templates)",
    ("division", "table15"): "ARITH Table 15 (appendix B)",
    ("division", "table16"): "ARITH Table 16 (appendix B)",
    ("division", "table17"): "ARITH Table 17 (appendix B)",
    ("division", "division_cna"): "ARITH appendix B (CNA against the division head)",
}


def _ref(stage: str, key: str) -> str | None:
    """The paper reference of a stage's table or figure (a ``prompt_form="both"`` stage such
    as ``heads@few-shot`` has its base stage's)."""
    return PAPER_REFS.get((stage.split("@")[0], key))


VERDICT_NOTE = (
    "Each claim is a number (`estimate`, over `n` prompts, cases, heads or operands) with its "
    "95% interval `lo`-`hi` (exact Clopper-Pearson for rates, paired bootstrap over prompts or "
    "cases, 2,000 resamples with a fixed seed, for decreases, MRR, probability and coefficient "
    "changes) and a threshold (`test`). **holds**: the whole interval is on the claim's side "
    "of the threshold; **does not hold**: the whole interval is on the other side; "
    "**inconclusive**: the interval straddles the threshold, or a bootstrap has fewer than 10 "
    "cases. Random baselines are the mean of at least 5 draws, their range in `ours`."
)


def verdict_counts(rep: Reproduction) -> str:
    """``"3 holds, 1 does not hold, 8 inconclusive"`` for the run's claims."""
    counts = rep.claims["verdict"].value_counts()
    return ", ".join(f"{int(n)} {v}" for v, n in counts.items())


def to_markdown(rep: Reproduction) -> str:
    """The whole run as one markdown page: claims first, then timings, then every stage."""
    lines = [
        f"# Reproducing the papers on `{rep.model_name}`",
        "",
        f"Run {rep.date} on {rep.machine} (at the start; at the end: "
        f"{rep.load_end or 'not recorded'}). Generated by `{rep.command or 'mechcna reproduce'}`; "
        "every number below is measured on this model, and every verdict is computed from "
        "those numbers.",
        "",
        "## Claims",
        "",
        VERDICT_NOTE,
        "",
        f"Preset `{rep.settings.get('preset', 'custom')}`: {verdict_counts(rep)}."
        + (
            " The quick preset is for trying the command out: with so few prompts and cases "
            "most verdicts are inconclusive."
            if rep.settings.get("preset") == "quick"
            else ""
        ),
        "",
        markdown_table(rep.claims),
        "",
        "## Wall time per stage",
        "",
        markdown_table(rep.timings().round(1)),
        "",
        "## Settings",
        "",
        ", ".join(f"`{k}={v}`" for k, v in rep.settings.items()),
        "",
    ]
    current = None
    for st in rep.stages:
        if st.paper != current:
            current = st.paper
            lines += [f"## {PAPER_TITLES[st.paper]}", ""]
        lines += [f"### {st.title} ({st.seconds:.1f} s)", ""]
        lines += [n + "\n" for n in st.notes]
        for key, table in st.tables.items():
            ref = _ref(st.name, key)
            index = not isinstance(table.index, pd.RangeIndex)
            lines += [f"**{key}**" + (f" ({ref})" if ref else ""), ""]
            lines += [markdown_table(table, index), ""]
    return "\n".join(lines) + "\n"


def write_markdown(rep: Reproduction, path: str | Path) -> Path:
    """Write :func:`to_markdown` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(rep), encoding="utf-8")
    return path


def build_report(rep: Reproduction, provenance: Provenance | None = None) -> Report:
    """The run as a :class:`~mechcna.report.page.Report`: claims, wall times, then each stage's
    notes, tables and figures with captions and paper references."""
    prov = provenance or Provenance(model=rep.model_name)
    prov.extra.setdefault("machine", rep.machine)
    prov.extra.setdefault("settings", ", ".join(f"{k}={v}" for k, v in rep.settings.items()))
    report = Report(
        f"Reproducing the papers on {rep.model_name}",
        prov,
        intro="Every number is measured on this model; every verdict is computed from those "
        "numbers. Paper columns are the papers' Llama-7B / GPT-2 results.",
    )
    report.section(
        "Claims",
        "Each paper's qualitative claims, the test applied, and the verdict. " + VERDICT_NOTE
        + f" This run: {verdict_counts(rep) if rep.stages else 'no claims'}.",
    )  # fmt: skip
    report.table(rep.claims, "claims: n, estimate, 95% interval, test and verdict", name="claims")
    report.table(rep.timings().round(2), "wall time per stage (s)", name="timings")
    for st in rep.stages:
        report.section(f"{st.title} ({st.seconds:.1f} s)", "\n\n".join(st.notes))
        for key, table in st.tables.items():
            index = not isinstance(table.index, pd.RangeIndex)
            report.table(table, f"{st.name}: {key}", _ref(st.name, key),
                         name=f"{st.name}-{key}", index=index)  # fmt: skip
        for key, fig in st.figures.items():
            report.figure(fig, f"{st.name}: {key}", _ref(st.name, key))
    return report


def write_report(
    rep: Reproduction, out_dir: str | Path, provenance: Provenance | None = None
) -> Path:
    """Write the HTML page (and CSVs, report.txt, provenance.json) and ``reproduce.md`` into
    ``out_dir``; returns the page's path."""
    page = build_report(rep, provenance).write(out_dir)
    write_markdown(rep, Path(out_dir) / "reproduce.md")
    return page
