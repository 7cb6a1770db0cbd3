"""Figures for results: every function takes a result and returns a ``plotly`` figure.

The library never calls ``fig.show()``. Signed scores use a diverging scale centred on zero.
"""

from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch

if TYPE_CHECKING:
    from mechcna.attribution import (
        AttentionNeuronImportance,
        HeadImportance,
        LayerImportance,
        NeuronImportance,
    )

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


def neuron_layer_counts(
    result: "NeuronImportance | AttentionNeuronImportance",
    k: int = 300,
    prompt: int | None = None,
    name: str = "FFN",
) -> go.Figure:
    """How many of the top-``k`` neurons sit in each layer."""
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
