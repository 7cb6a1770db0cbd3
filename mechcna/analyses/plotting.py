"""Figures for results: every function takes a result and returns a ``plotly`` figure.

The library never calls ``fig.show()``. Conventions, so every figure is fit for a paper:
layers and heads get integer ticks; every axis has a title; titles are words (never a raw
``dict``); attention and FFN bars stand side by side; one quantity per axis (two quantities get
two panels); signed scores use a diverging scale centred on zero; neurons' hover text names
the neuron and, where known, its top tokens. :func:`save_png` exports a static image offline
(plotly + kaleido 0.2.1, the ``png`` extra).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mechcna.errors import MechcnaError

if TYPE_CHECKING:
    import pandas as pd

    from mechcna.analyses.results import Scores

ATTN_COLOUR = "darksalmon"
FFN_COLOUR = "lightseagreen"
EMBED_COLOUR = "slategray"


class ExportError(MechcnaError):
    """A static image cannot be written (kaleido missing or failing)."""


def integer_axis(fig: go.Figure, axis: str = "x", n: int | None = None, **kw: Any) -> go.Figure:
    """Ticks at whole numbers only (layers, heads), every one when there are at most 40."""
    step = 1 if n is None or n <= 40 else int(np.ceil(n / 20))
    update = {"tickmode": "linear", "tick0": 0, "dtick": step, **kw}
    (fig.update_xaxes if axis == "x" else fig.update_yaxes)(**update)
    return fig


def cell_words(cell: Any) -> str:
    """A cell filter in words: ``{"operation": "+", "digits": 2}`` -> ``operation +, 2 digits``."""
    if cell is None:
        return "all cases"
    if isinstance(cell, str):
        return cell
    parts = []
    for key, value in dict(cell).items():
        parts.append(f"{value} digits" if key == "digits" else f"{key} {value}")
    return ", ".join(parts)


def save_png(fig: go.Figure, path: str | Path, *, scale: float = 2.0, width: int = 900,
             height: int = 500) -> Path:  # fmt: skip
    """Write ``fig`` as a PNG offline with kaleido 0.2.1 (``pip install 'mechcna[png]'``).

    Raises:
        ExportError: kaleido is not installed, or the export failed.
    """
    try:
        import kaleido  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError as err:
        raise ExportError(
            "PNG export needs kaleido 0.2.1 (it bundles its own Chromium and works offline): "
            "pip install 'mechcna[png]'; HTML export needs nothing (Report.write, write_html)"
        ) from err
    path = Path(path)
    try:
        fig.write_image(str(path), format="png", scale=scale, width=width, height=height)
    except Exception as err:  # kaleido reports failures as assorted exception types
        raise ExportError(f"PNG export to {path} failed: {err}") from err
    return path


def _title(base: str, prompt: int | None, prompts: tuple[str, ...] | None) -> str:
    if prompt is None:
        return f"{base} (mean over prompts)"
    text = prompts[prompt] if prompts is not None else f"prompt {prompt}"
    return f"{base}: {text!r}"


def layer_bars(result: "Scores", prompt: int | None = None) -> go.Figure:
    """Attention and FFN log-probability increase per layer, side by side."""
    values = result.select(prompt)
    layers = list(range(values.shape[0]))
    fig = go.Figure()
    for c, (name, colour) in enumerate([("attention", ATTN_COLOUR), ("FFN", FFN_COLOUR)]):
        fig.add_bar(
            x=layers, y=values[:, c].tolist(), name=name, marker_color=colour,
            hovertemplate=f"layer %{{x}} {name}: %{{y:.4f}}<extra></extra>",
        )  # fmt: skip
    fig.update_layout(
        title=_title("log-probability increase by layer", prompt, result.prompts),
        xaxis_title="layer",
        yaxis_title="log-probability increase (nats)",
        barmode="group",
    )
    return integer_axis(fig, "x", len(layers))


def head_heatmap(result: "Scores", prompt: int | None = None) -> go.Figure:
    """Layer x head heatmap of head importance (summed over source positions if present)."""
    values = result.select(prompt)
    if values.ndim == 3:  # layer head pos
        values = values.sum(-1)
    n_layers, n_heads = values.shape
    return layer_head_heatmap(
        values.double().numpy(), n_layers, n_heads,
        _title("log-probability increase of each head", prompt, result.prompts),
        signed=True, colorbar="log-prob increase",
    )  # fmt: skip


def signed_heatmap(
    values: torch.Tensor, x_title: str, y_title: str, title: str, colorbar: str = "score"
) -> go.Figure:
    """A heatmap with a diverging colour scale centred on zero."""
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(),
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": colorbar},
        )
    )
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def layer_head_heatmap(
    z: np.ndarray, n_layers: int, n_heads: int, title: str, signed: bool, colorbar: str
) -> go.Figure:
    """A layer x head heatmap of ``z[layer, head]`` (diverging around 0 when ``signed``)."""
    scale: dict[str, Any] = (
        {"colorscale": "RdBu", "zmid": 0.0} if signed else {"colorscale": "Viridis"}
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            colorbar={"title": colorbar},
            hovertemplate="layer %{y}, head %{x}: %{z:.4g}<extra></extra>",
            **scale,
        )
    )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    integer_axis(fig, "x", n_heads)
    return integer_axis(fig, "y", n_layers)


def neuron_layer_counts(
    result: "Scores",
    k: int = 300,
    prompt: int | None = None,
    name: str = "FFN",
    model: Any = None,
    per_layer: int = 3,
) -> go.Figure:
    """How many of the top-``k`` entries of a ``[prompt, layer, ...]`` result sit in each layer.

    Hovering a layer names its ``per_layer`` best neurons among the top-``k`` with their
    scores and, for FFN neurons when ``model`` is given, the tokens each one promotes.
    """
    top = result.top(k, prompt=prompt)
    n_layers = result.scores.shape[1]
    counts = top["layer"].value_counts().reindex(range(n_layers), fill_value=0)
    best = top.sort_values("score", ascending=False).groupby("layer").head(per_layer)
    ffn = "neuron" in top.columns
    tokens = {}
    if model is not None and ffn:
        from mechcna.analyses.tokens import coefficients_at

        coef = result.extras.get("coefficient")
        labels = list(best["label"])
        tokens = neuron_top_tokens(
            model, labels, None if coef is None else coefficients_at(coef, labels, prompt)
        )
    hover = []
    for layer, count in enumerate(counts.tolist()):
        lines = [f"layer {layer}: {count} of the top-{k} {name} neurons"]
        rows = best[best["layer"] == layer]
        for label, score in zip(rows["label"].tolist(), rows["score"].tolist(), strict=True):
            lines.append(
                f"{label}: {score:.4f}" + (f" ({tokens[label]})" if label in tokens else "")
            )
        hover.append("<br>".join(lines))
    fig = go.Figure(
        go.Scatter(
            x=list(range(n_layers)),
            y=counts.tolist(),
            mode="lines+markers",
            name=name,
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
        )
    )
    fig.update_layout(
        title=_title(f"layers of the top-{k} {name} neurons", prompt, result.prompts),
        xaxis_title="layer",
        yaxis_title=f"number of top-{k} neurons",
    )
    return integer_axis(fig, "x", n_layers)


# ---------------------------------------------------------------------------- query / transfer
# (query neurons, docs/methods.md 5; feature transfer and hidden-interpretable neurons,
# docs/methods.md 8)
QUERY_ONLY_COLOUR = "green"
QUERY_VALUE_COLOUR = "red"


def query_layer_bars(result, prompt: int | None = None) -> go.Figure:
    """Query-layer attribution: the embedding, then attention and FFN side by side per layer."""
    values = result.select(prompt).tolist()  # [embedding, attn 0, FFN 0, attn 1, ...]
    n_layers = (len(values) - 1) // 2
    layers = list(range(n_layers))
    fig = go.Figure()
    fig.add_bar(x=[-1], y=values[:1], name="embedding", marker_color=EMBED_COLOUR)
    fig.add_bar(x=layers, y=values[1::2], name="attention", marker_color=ATTN_COLOUR)
    fig.add_bar(x=layers, y=values[2::2], name="FFN", marker_color=FFN_COLOUR)
    fig.update_layout(
        title=_title(
            f"query layers of the top {result.kind} value neurons", prompt, result.prompts
        ),
        xaxis_title="layer (-1: embedding)",
        yaxis_title="importance credited (nats)",
        barmode="group",
    )
    return integer_axis(fig, "x", n_layers + 1, tick0=-1)


def query_value_lines(result, prompt: int | None = None) -> go.Figure:
    """Query-only (green) vs query-value (red) neurons per layer, both axes in %."""
    values = result.select(prompt, "sum" if prompt is None else "mean")
    n_prompts = 1 if prompt is not None else result.n_prompts
    n_layers = values.shape[0]
    x = [100 * l / max(n_layers - 1, 1) for l in range(n_layers)]
    fig = go.Figure()
    for i, (name, colour) in enumerate(
        [("query-only", QUERY_ONLY_COLOUR), ("query-value", QUERY_VALUE_COLOUR)]
    ):
        y = (100 * values[:, i] / (result.k * n_prompts)).tolist()
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, line_color=colour)
    fig.update_layout(
        title=_title(f"query-only vs query-value neurons (top {result.k})", prompt, result.prompts),
        xaxis_title="layer (% of depth)",
        yaxis_title="count (% of top neurons)",
    )
    return fig


def key_score_bars(result) -> go.Figure:
    """Grouped bars of inner products with each key, one group per row."""
    fig = go.Figure()
    for i, name in enumerate(result.keys):
        fig.add_bar(x=list(result.rows), y=result.scores[:, i].tolist(), name=name)
    fig.update_layout(
        title=result.title, xaxis_title="component", yaxis_title="inner product", barmode="group"
    )
    return fig


def token_table(result) -> go.Figure:
    """A table of top and bottom tokens per column (original vs transformed)."""
    header = []
    cells = []
    for column, tt in zip(result.columns, result.tokens):
        header += [f"{column} (top)", f"{column} (bottom)"]
        cells += [[t for t, _ in tt.top], [t for t, _ in tt.bottom]]
    fig = go.Figure(go.Table(header={"values": header}, cells={"values": cells}))
    fig.update_layout(title=f"tokens of {result.label}")
    return fig


def zero_shot_lines(result) -> go.Figure:
    """Neurons with at least ``M`` concepts, per layer, one line per ``M``."""
    fig = go.Figure()
    layers = list(result.neuron_layers)
    for m in result.thresholds:
        per_layer = (result.counts[layers] >= m).sum(-1).tolist()
        fig.add_scatter(x=layers, y=per_layer, mode="lines+markers", name=f"M={m}")
    fig.update_layout(
        title=f"hidden-interpretable neurons (concepts in the top-{result.top} tokens)",
        xaxis_title="layer",
        yaxis_title="neurons with at least M concept tokens",
        legend_title="M",
    )
    return integer_axis(fig, "x", len(layers))


def mask_bars(result) -> go.Figure:
    """Relative accuracy decrease per neuron set, with the random baseline if present."""
    frame = result.to_frame()
    names = [str(s) for s in frame["set"]]
    fig = go.Figure()
    fig.add_bar(x=names, y=frame["relative_decrease"].tolist(), name="masked set")
    if "random_relative_decrease" in frame:
        fig.add_bar(x=names, y=frame["random_relative_decrease"].tolist(), name="random, same size")
    fig.update_layout(
        title="accuracy decrease after zeroing neurons",
        xaxis_title="neuron set (M)",
        yaxis_title="relative accuracy decrease (%)",
        barmode="group",
    )
    return fig


def experiment_bars(
    table: "pd.DataFrame", title: str = "accuracy decrease (%)", y_title: str = "%"
) -> go.Figure:
    """Grouped bars for an experiment table (rows = experiments, columns = settings), e.g.
    :func:`mechcna.analyses.comparative.mask_keep_table` or ``lowest_neuron_table``.

    A ``coef`` row (a coefficient decrease, not an accuracy decrease) goes to its own panel
    on the right, so each axis holds one quantity.
    """
    settings = [str(c) for c in table.columns]
    has_coef = "coef" in table.index and len(table.index) > 1
    fig = make_subplots(
        rows=1, cols=2 if has_coef else 1, column_widths=[0.7, 0.3] if has_coef else None,
        subplot_titles=["accuracy", "coefficients"] if has_coef else None,
    )  # fmt: skip
    for name, row in table.iterrows():
        col = 2 if has_coef and name == "coef" else 1
        fig.add_bar(x=settings, y=row.tolist(), name=str(name), row=1, col=col)
    fig.update_layout(title=title, barmode="group")
    fig.update_yaxes(title_text=y_title if not has_coef else "accuracy decrease (%)", col=1)
    fig.update_xaxes(title_text="neurons per case (top K)")
    if has_coef:
        fig.update_yaxes(title_text="coefficient decrease (%)", row=1, col=2)
    return fig


def neuron_top_tokens(
    model: Any, labels: Sequence[str], coefficients: Sequence[float] | None = None
) -> dict[str, str]:
    """``{"layer_neuron": "tok, tok, ..."}``: the tokens each FFN neuron promotes, sign-aware
    (see :func:`mechcna.analyses.tokens.neuron_tokens`, which this calls)."""
    from mechcna.analyses.tokens import neuron_tokens

    return neuron_tokens(model, labels, coefficients)


def neuron_hover(labels: Sequence[str], tokens: Mapping[str, str] | None) -> list[str]:
    """Hover lines naming each neuron ``layer_index`` and, if known, its top tokens."""
    tokens = tokens or {}
    out = []
    for label in labels:
        layer, _, index = label.partition("_")
        text = f"layer {layer}, neuron {index}"
        if label in tokens:
            text += f"<br>top tokens: {tokens[label]}"
        out.append(text)
    return out


def cna_bars(
    labels: Sequence[str],
    imp_m: Sequence[float],
    imp_other: Sequence[float],
    delta: Sequence[float],
    title: str,
    tokens: Mapping[str, str] | None = None,
    names: tuple[str, str] = ("M", "M'"),
) -> go.Figure:
    """Importance in ``M`` and ``M'`` side by side per neuron, with the CNA delta as markers
    (all three in nats on one axis); hover names the neuron and its top tokens. ``names``
    names the two states (e.g. the two inputs of :func:`mechcna.compare_inputs`)."""
    hover = neuron_hover(labels, tokens)
    fig = go.Figure()
    for name, y in ((f"importance in {names[0]}", imp_m), (f"importance in {names[1]}", imp_other)):
        template = "%{hovertext}<br>" + name + ": %{y:.4f}<extra></extra>"
        fig.add_bar(x=list(labels), y=list(y), name=name, hovertext=hover, hovertemplate=template)
    fig.add_scatter(
        x=list(labels), y=list(delta), mode="markers",
        name=f"CNA delta ({names[0]} - {names[1]})",
        marker={"symbol": "diamond", "size": 9, "color": "black"}, hovertext=hover,
        hovertemplate="%{hovertext}<br>delta: %{y:.4f}<extra></extra>",
    )  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis_title="neuron (layer_index)",
        yaxis_title="log-probability increase (nats)",
        barmode="group",
    )
    return fig
