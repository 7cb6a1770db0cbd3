"""Figures for results: every function takes a result and returns a ``plotly`` figure.

The library never calls ``fig.show()``. Signed scores use a diverging scale centred on zero.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
import torch

if TYPE_CHECKING:
    import pandas as pd

    from mechcna.attribution import (
        HeadImportance,
        LayerImportance,
    )
    from mechcna.results import Scores

ATTN_COLOUR = "darksalmon"
FFN_COLOUR = "lightseagreen"


def _title(base: str, prompt: int | None, prompts: tuple[str, ...] | None) -> str:
    if prompt is None:
        return f"{base} (mean over prompts)"
    text = prompts[prompt] if prompts is not None else f"prompt {prompt}"
    return f"{base}: {text!r}"


def layer_bars(result: "LayerImportance", prompt: int | None = None) -> go.Figure:
    """Attention (at ``l``) and FFN (at ``l + 0.5``) log-probability increase per layer."""
    values = result.select(prompt)
    layers = list(range(values.shape[0]))
    fig = go.Figure()
    fig.add_bar(x=layers, y=values[:, 0].tolist(), name="attention", marker_color=ATTN_COLOUR)
    fig.add_bar(
        x=[l + 0.5 for l in layers], y=values[:, 1].tolist(), name="FFN", marker_color=FFN_COLOUR
    )
    fig.update_layout(
        title=_title("log-probability increase by layer", prompt, result.prompts),
        xaxis_title="layer",
        yaxis_title="log-probability increase",
        barmode="overlay",
    )
    return fig


def head_heatmap(result: "HeadImportance", prompt: int | None = None) -> go.Figure:
    """Layer x head heatmap of head importance (summed over source positions if present)."""
    values = result.select(prompt)
    if values.ndim == 3:  # layer head pos
        values = values.sum(-1)
    return signed_heatmap(
        values,
        x_title="head",
        y_title="layer",
        title=_title("head log-probability increase", prompt, result.prompts),
    )


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
    return fig


def neuron_layer_counts(
    result: "Scores",
    k: int = 300,
    prompt: int | None = None,
    name: str = "FFN",
) -> go.Figure:
    """How many of the top-``k`` entries of a ``[prompt, layer, ...]`` result sit in each layer."""
    top = result.top(k, prompt=prompt)
    n_layers = result.scores.shape[1]
    counts = top["layer"].value_counts().reindex(range(n_layers), fill_value=0)
    fig = go.Figure(
        go.Scatter(x=list(range(n_layers)), y=counts.tolist(), mode="lines+markers", name=name)
    )
    fig.update_layout(
        title=_title(f"layers of the top-{k} {name} neurons", prompt, result.prompts),
        xaxis_title="layer",
        yaxis_title="count",
    )
    return fig


# ---------------------------------------------------------------------------- query / transfer
# (query neurons, METHODS 5; feature transfer and hidden-interpretable neurons, METHODS 8)
QUERY_ONLY_COLOUR = "green"
QUERY_VALUE_COLOUR = "red"


def query_layer_bars(result, prompt: int | None = None) -> go.Figure:
    """Query-layer attribution: embedding at -0.5, attention ``l`` at ``l``, FFN at ``l + .5``."""
    values = result.select(prompt)
    labels = [c / 2 - 0.5 for c in range(values.shape[0])]
    colours = [FFN_COLOUR if c % 2 == 0 else ATTN_COLOUR for c in range(values.shape[0])]
    fig = go.Figure(go.Bar(x=labels, y=values.tolist(), marker_color=colours))
    fig.update_layout(
        title=_title(
            f"query layers of the top {result.kind} value neurons", prompt, result.prompts
        ),
        xaxis_title="component (-0.5 embedding, l attention, l+0.5 FFN)",
        yaxis_title="importance share",
    )
    return fig


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
    fig.update_layout(title=result.title, xaxis_title="", yaxis_title="inner product")
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
        yaxis_title="neurons",
    )
    return fig


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
        xaxis_title="set (M)",
        yaxis_title="accuracy decrease (%)",
        barmode="group",
    )
    return fig


def experiment_bars(
    table: "pd.DataFrame", title: str = "accuracy decrease (%)", y_title: str = "%"
) -> go.Figure:
    """Grouped bars for an experiment table (rows = experiments, columns = settings), e.g.
    :func:`mechcna.comparative.mask_keep_table` or ``lowest_neuron_table``."""
    fig = go.Figure()
    for name, row in table.iterrows():
        fig.add_bar(x=[str(c) for c in table.columns], y=row.tolist(), name=str(name))
    fig.update_layout(title=title, yaxis_title=y_title, barmode="group")
    return fig
