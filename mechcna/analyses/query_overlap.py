"""Query-only vs query-value neurons, and the tokens of query neurons (the attribution
paper's query-side sections, after :mod:`mechcna.analyses.query`).

:func:`query_value_overlap` counts, per layer, the top query neurons that are also top value
neurons (query-value) or not (query-only); :func:`query_neuron_tokens` lists the tokens a
query neuron's value vector promotes, directly or through an attention transform.

Paper items (README, "Paper to code"): the query-only vs query-value curves and Table 9's
readable query neurons.
"""

from dataclasses import dataclass

import einops
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.attribution import NeuronImportance
from mechcna.analyses.query import QueryNeurons
from mechcna.analyses.results import Scores
from mechcna.analyses.transfer import (
    TokenComparison,
)
from mechcna.engine.projection import top_tokens
from mechcna.errors import MechcnaError
from mechcna.models.backend import Model
from mechcna.models.processing import get_processing, refuses_processing
from mechcna.models.view import architecture, per_call


@dataclass(frozen=True)
class QueryValueOverlap(Scores):
    """``scores[prompt, layer, kind]``: raw counts per layer of query-only (kind 0) and
    query-value (kind 1) neurons among the top-``k`` query neurons (docs/methods.md 5.5)."""

    k: int = 300

    def to_frame(self) -> pd.DataFrame:
        frame = super().to_frame().rename(columns={"score": "count"})
        frame["kind"] = frame["kind"].map(lambda c: ("query-only", "query-value")[c])
        frame["percent"] = 100 * frame["count"] / self.k
        n_layers = self.scores.shape[1]
        frame["layer_percent"] = 100 * frame["layer"] / max(n_layers - 1, 1)
        return frame

    def plot(self, prompt: int | None = None) -> go.Figure:
        return plotting.query_value_lines(self, prompt)


# ---------------------------------------------------------------------------- 5.5 / 5.6
def query_value_overlap(
    values: NeuronImportance, queries: QueryNeurons, k: int = 300
) -> QueryValueOverlap:
    """Query-only and query-value neurons per layer (docs/methods.md 5.5).

    With ``V`` the top-``k`` FFN value neurons and ``Q`` the top-``k`` query neurons of a
    prompt, query-value neurons are ``Q & V`` and query-only neurons ``Q - V``; their raw
    counts per layer are the scores. Query neurons with a score of exactly 0 (read by no
    selected attention neuron) are left out, so a prompt may count fewer than ``k``.
    :meth:`QueryValueOverlap.plot` shows both axes in % (layer as % of depth, count as % of
    ``k``), as the paper's figure presumably does; the notebook plots raw numbers.
    """
    if values.scores.shape != queries.scores.shape:
        raise MechcnaError("values and queries must cover the same prompts, layers and neurons")
    _, n_layers, n_neurons = values.scores.shape
    k = min(k, n_layers * n_neurons)
    flat_v = einops.rearrange(values.scores, "prompt layer neuron -> prompt (layer neuron)")
    flat_q = einops.rearrange(queries.scores, "prompt layer neuron -> prompt (layer neuron)")
    in_v = torch.zeros_like(flat_v, dtype=torch.bool).scatter_(1, flat_v.topk(k, 1).indices, True)
    in_q = torch.zeros_like(flat_q, dtype=torch.bool).scatter_(1, flat_q.topk(k, 1).indices, True)
    in_q &= flat_q != 0  # neurons no attention neuron reads are not query neurons
    kinds = torch.stack([in_q & ~in_v, in_q & in_v], -1).double()  # prompt (layer neuron) kind
    counts = einops.reduce(
        kinds, "prompt (layer neuron) kind -> prompt layer kind", "sum", layer=n_layers
    )
    return QueryValueOverlap(
        scores=counts,
        dims=("prompt", "layer", "kind"),
        **queries.provenance(),
        k=k,
    )


@per_call
@refuses_processing()
def query_neuron_vectors(
    model: Model, neuron: tuple[int, int], head: tuple[int, int]
) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"]]:
    """The raw value vector ``W_out[i][j]`` of a query neuron and the vector the head
    ``(l, h)`` makes of it (docs/methods.md 5.6): the head layer's real pre-attention norm
    applied to the vector alone, the head's V projection with ``b_V``, then ``W_O`` (and, on
    sandwich-norm models, the real post-attention norm on this output alone). Read by
    :func:`query_neuron_tokens`.

    Returns:
        ``(raw, transformed)``, both ``[d_model]`` (residual-space directions, detached).
    """
    arch = architecture(model)
    i, j = arch.check_neuron(*neuron)
    l, h = arch.check_head(*head)
    with torch.no_grad():
        vector = arch.W_out(i)[j].detach()
        normed = model.blocks[l].ln1(vector[None, None])[0, 0]
        z = einops.einsum(normed, arch.W_V(l)[h], "d_model, d_model d_head -> d_head")
        z = z + arch.b_V(l)[h]
        out = einops.einsum(z, arch.W_O_raw(l)[h], "d_head, d_head d_model -> d_model")
        if arch.post_norms:  # the real post-attention norm, on this output alone
            out = model.blocks[l].ln1_post(out[None, None])[0, 0]
    return vector, out.detach()


@per_call
@refuses_processing()
def query_neuron_tokens(
    model: Model,
    neuron: tuple[int, int],
    head: tuple[int, int],
    k: int = 10,
    *,
    paper_compat: bool = True,
) -> TokenComparison:
    """Make a hidden-interpretable query neuron readable through a head (docs/methods.md 5.6).

    The raw value vector ``W_out[i][j]`` (not scaled by a coefficient) goes through the **real
    pre-attention norm of the head's layer applied to the vector alone** (its own RMS/std;
    LayerNorm centring and bias included), the head's V projection with ``b_V``, and ``W_O``;
    then the top and bottom tokens of the result are compared with those of the raw vector.
    Under sandwich norms the vector is ``W_out[i][j]`` times the post-feedforward norm weight,
    and the head's output also goes through the real post-attention norm applied to it alone.
    The final-norm scale is a positive scalar and is left at 1 (rankings are unaffected).
    Contrast :func:`mechcna.analyses.transfer.transform_through_attention`, which scales by the
    *residual's* norm and excludes biases (the arithmetic paper's variant).

    Args:
        neuron: the query neuron ``(layer, neuron)``.
        head: ``(layer, head)`` of the attention neuron it feeds.
    """
    i, j = architecture(model).check_neuron(*neuron)
    l, h = architecture(model).check_head(*head)
    vector, out = query_neuron_vectors(model, neuron, head)
    pair = (
        top_tokens(model, vector, k, paper_compat=paper_compat),
        top_tokens(model, out, k, paper_compat=paper_compat),
    )
    columns = ("original", f"through head {l}_{h}")
    return TokenComparison(f"{i}_{j}", columns, pair, get_processing(model))
