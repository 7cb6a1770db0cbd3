"""Query side of neuron attribution: which lower components and neurons activate value neurons.

Yu & Ananiadou, *Neuron-Level Knowledge Attribution in Large Language Models* (EMNLP 2024),
the query-neuron analysis; docs/methods.md section 5. A value neuron is activated through the inner
product of its input with its **key**; with the pre-norm weight folded in (``key' = key *
gamma``) and the norm scale and nonlinearity ignored, the input splits into residual
components ``c`` whose shares ``r_c / S`` (``r_c = <c, key'>``, ``S = sum_c r_c``) of the
activation are credited with the neuron's importance ``Imp``:

* :func:`ffn_query_layers` (5.1): components ``[embedding, A0, F0, ..., A_l]`` at the scored
  position, for the top-K FFN value neurons.
* :func:`attention_query_layers` (5.2): components ``[embedding, A0, F0, ..., F_{l-1}]`` at the
  attention neuron's source position, key ``W_V[l][h][:, k] * ln1.w``.
* :func:`query_neurons` (5.3): FFN neurons of lower layers, ``Q(i, j) += <m[i][p, j] *
  W_out[i][j], key'> / <x_in[l][p], key'> * Imp`` over the top-K attention value neurons.
* :func:`attention_neuron_queries` (5.4): the same for one attention neuron.
* ``query_value_overlap`` (5.5, in :mod:`mechcna.analyses.query_overlap`): query-only vs
  query-value neurons per layer.
* ``query_neuron_tokens`` (5.6, same module): a hidden-interpretable query neuron made
  readable through the attention neuron's head.

Each analysis is one or two forward passes plus einsum contractions; the only Python loops
run over layers.

**Sandwich norms** (Gemma 2 and 3): a lower FFN neuron's ``m * W_out`` is its exact share of
the residual, with the post-feedforward norm's scale frozen at its position (coefficients
divided by it, ``W_out`` times its weight; :class:`~mechcna.models.architecture.Architecture`);
the residual components are the post-normed layer outputs, which sum to the residual. On the
input side the pre-norm's scale at the position is frozen (left out, as in the notebooks):
every score here is a ratio ``<c, key'> / <x, key'>`` of two reads through the same norm, so
the frozen scale cancels and there is no alternative to choose. The keys are value or FFN
weights, never ``W_Q``/``W_K``, so Gemma 3's QK-norm does not enter (the attention pattern is
the model's own, from the forward pass).

Example:
    >>> q = query_neurons(model, ["Tim Duncan plays the sport of"], k=30)   # doctest: +SKIP
    >>> q.top(10, prompt=0)                                                  # doctest: +SKIP
    >>> ffn_query_layers(model, prompts).plot()                              # doctest: +SKIP

Paper items (README, "Paper to code"): ATTR Figures 6 / 7 (query layers), query neurons, the
query-only vs query-value curves and Table 9's readable query neurons.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mechcna._types import Float, Int, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.attribution import (
    AttentionNeuronImportance,
    NeuronImportance,
    attention_neuron_importance,
    neuron_importance_from_capture,
)
from mechcna.analyses.capture import Targets, capture
from mechcna.analyses.results import Aggregate, Scores
from mechcna.analyses.transfer import (
    PositionCapture,
    capture_positions,
    component_labels,
)
from mechcna.engine.projection import compute_dtype
from mechcna.errors import InvalidOptionError, MechcnaError
from mechcna.interventions.edits import Intervention
from mechcna.interventions.prompts import Prompts
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.inputs import positive_int
from mechcna.models.processing import refuses_processing
from mechcna.models.view import architecture, per_call

FFNKey = Literal["up", "gate", "mean"]


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class QueryLayers(Scores):
    """``scores[prompt, component]``: the value neurons' importance credited to each residual
    component (0 the embedding, ``2l + 1`` attention ``l``, ``2l + 2`` FFN ``l``; the notebook's
    label is ``c / 2 - 0.5``). For each prompt the scores sum to the total importance of its
    top-K neurons.

    For gated MLPs with ``key="mean"``, ``extras["up"]`` and ``extras["gate"]`` hold the
    attribution through each key alone.

    Attributes:
        kind: ``"FFN"`` or ``"attention"``: which value neurons were attributed.
        neurons: ``[prompt, K, ...]`` the value neurons (``(layer, neuron)`` or ``(layer, pos,
            head, d_head)``).
        importance: ``[prompt, K]`` their importance.
        mean_layer: ``[prompt]`` the average layer of the K neurons (printed in 5.2).
    """

    kind: str = "FFN"
    neurons: Tensor | None = None
    importance: Tensor | None = None
    mean_layer: Tensor | None = None

    def top(
        self,
        k: int = 10,
        prompt: int | None = None,
        aggregate: Aggregate = "mean",
        largest: bool = True,
    ) -> pd.DataFrame:
        frame = super().top(k, prompt=prompt, aggregate=aggregate, largest=largest)
        frame["label"] = [c / 2 - 0.5 for c in frame["component"]]
        frame["name"] = [component_labels(self.scores.shape[1])[c] for c in frame["component"]]
        return frame

    def plot(self, prompt: int | None = None) -> go.Figure:
        return plotting.query_layer_bars(self, prompt)


@dataclass(frozen=True)
class QueryNeurons(Scores):
    """``scores[prompt, layer, neuron]``: query scores of FFN neurons (docs/methods.md 5.3, 5.4).

    Attributes:
        sources: ``[prompt, K, 4]`` the attention neurons ``(layer, pos, head, d_head)`` read.
        source_importance: ``[prompt, K]`` their importance (the weights of the sum).
    """

    sources: Tensor | None = None
    source_importance: Tensor | None = None

    def plot(
        self, prompt: int | None = None, k: int = 300, model: Model | None = None
    ) -> go.Figure:
        """Layers of the top-``k`` query neurons; with ``model``, hover shows top tokens."""
        return plotting.neuron_layer_counts(self, k, prompt, name="query FFN", model=model)


# ---------------------------------------------------------------------------- helpers
def _valid_positions(scores: Tensor, positions: Tensor) -> Tensor:
    """Attention-neuron scores with positions after each prompt's scored one set to -inf."""
    pos = torch.arange(scores.shape[2])
    valid = pos[None, :] <= positions.cpu()[:, None]  # prompt pos
    return scores.masked_fill(~valid[:, None, :, None, None], float("-inf"))


def _top_attention(
    att: AttentionNeuronImportance, positions: Tensor, k: int
) -> tuple[Int[Tensor, "prompt attn 4"], Float[Tensor, "prompt attn"]]:
    scores = _valid_positions(att.scores, positions)
    flat = einops.rearrange(
        scores, "prompt layer pos head d_head -> prompt (layer pos head d_head)"
    )
    k = min(k, flat.shape[1])
    top = flat.topk(k, dim=1)
    coords = torch.stack(torch.unravel_index(top.indices, scores.shape[1:]), -1)
    imp = top.values.masked_fill(~torch.isfinite(top.values), 0.0)
    return coords, imp


def _attention_keys(
    arch: Architecture, neurons: Int[Tensor, "prompt attn 4"], dtype: torch.dtype
) -> Float[Tensor, "prompt attn d_model"]:
    """``W_V[l][h][:, k] * ln1.w[l]`` for each attention neuron (one gather per layer)."""
    layer, head, dim = neurons[..., 0], neurons[..., 2], neurons[..., 3]
    keys = torch.zeros(*neurons.shape[:2], arch.d_model, dtype=dtype, device=arch.device)
    for l in layer.unique().tolist():
        mask = (layer == l).to(arch.device)
        h, d = head.to(arch.device)[mask], dim.to(arch.device)[mask]
        keys[mask] = (arch.W_V(l)[h, :, d] * arch.ln1_w(l)).to(dtype)
    return keys


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


def _top_attention_neurons(
    model: Model,
    prompts: Prompts,
    targets: Targets,
    attention: AttentionNeuronImportance | None,
    k: int,
    position: int | None,
    paper_compat: bool,
    interventions: Iterable[Intervention],
) -> tuple[
    PositionCapture,
    AttentionNeuronImportance,
    Int[Tensor, "prompt attn 4"],
    Float[Tensor, "prompt attn"],
]:
    """The capture, the attention importance (``attention`` when given, checked against the
    prompts) and each prompt's top-``k`` attention neurons with their importance."""
    k = positive_int(k, "k")
    cap = capture_positions(
        model, prompts, position=position, attention=False, interventions=interventions
    )
    if attention is None:
        attention = attention_neuron_importance(
            model, prompts, targets, position=position, paper_compat=paper_compat,
            interventions=interventions,
        )  # fmt: skip
    elif attention.scores.shape[0] != len(cap.batch):
        raise MechcnaError(
            f"attention importance has {attention.scores.shape[0]} prompts, not {len(cap.batch)}"
        )
    neurons, imp = _top_attention(attention, cap.batch.positions, k)
    return cap, attention, neurons, imp


def _query_scores(
    arch: Architecture,
    cap: PositionCapture,
    neurons: Int[Tensor, "prompt attn 4"],
    weights: Float[Tensor, "prompt attn"],
    progress: bool,
) -> Float[Tensor, "prompt layer neuron"]:
    """``Q[i, j] = sum_n w_n <m[i][p_n, j] W_out[i][j], key'_n> / <x_in[l_n][p_n], key'_n>``
    over the attention neurons ``n`` of layers ``l_n > i``."""
    dtype = compute_dtype(arch.dtype)
    dev = arch.device
    neurons = neurons.to(dev)
    keys = _attention_keys(arch, neurons, dtype)
    n = neurons.shape[0]
    rows = torch.arange(n, device=dev)[:, None]
    layer, pos = neurons[..., 0], neurons[..., 1]
    x_in = cap.resid_pre[rows, layer, pos].to(dtype)  # prompt attn d_model
    denom = einops.einsum(x_in, keys, "prompt attn d_model, prompt attn d_model -> prompt attn")
    weight = _safe_ratio(weights.to(dev, dtype), denom)
    scores = torch.zeros(n, arch.n_layers, arch.d_mlp, dtype=dtype)
    for i in tqdm(range(arch.n_layers - 1), desc="query layers", disable=not progress):
        w = torch.where(layer > i, weight, 0)
        if not (w != 0).any():
            continue
        coef = cap.post[rows, i, pos].to(dtype)  # prompt attn neuron
        wk = einops.einsum(
            arch.W_out(i).to(dtype), keys,
            "neuron d_model, prompt attn d_model -> prompt attn neuron",
        )  # fmt: skip
        scores[:, i] = einops.einsum(
            w, coef * wk, "prompt attn, prompt attn neuron -> prompt neuron"
        ).cpu()
    return scores


# ---------------------------------------------------------------------------- 5.3 / 5.4
@per_call
@refuses_processing()
def query_neurons(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    k: int = 30,
    attention: AttentionNeuronImportance | None = None,
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
    progress: bool = False,
) -> QueryNeurons:
    """Query FFN neurons of the top-``k`` attention value neurons (docs/methods.md 5.3).

    For each prompt, the ``k`` attention neurons ``(l, p, h, d)`` with the highest importance
    ``Imp_a`` (source positions up to the scored one) each credit every FFN neuron ``j`` of
    every lower layer ``i < l`` with

        ``<m[i][p, j] * W_out[i][j], key'> / <x_in[l][p], key'> * Imp_a``,

    ``key' = W_V[l][h][:, d] * ln1.w[l]`` (raw, no norm scale or centring), summed over the
    attention neurons (so a neuron accumulates over their source positions). A zero
    denominator contributes nothing.

    Args:
        k: how many attention neurons (30 in both notebooks).
        attention: precomputed :func:`~mechcna.analyses.attribution.attention_neuron_importance` of
            the same prompts (computed otherwise).
        paper_compat: passed to the importance scores (drop the final norm's bias and b_U).

    Returns:
        :class:`QueryNeurons` ``scores[prompt, layer, neuron]`` (log-probability units).
    """
    arch = architecture(model)
    cap, att, neurons, imp = _top_attention_neurons(
        model, prompts, targets, attention, k, position, paper_compat, interventions
    )
    with torch.no_grad():
        scores = _query_scores(arch, cap, neurons, imp, progress)
    return QueryNeurons(
        scores=scores,
        dims=("prompt", "layer", "neuron"),
        **att.provenance(),
        sources=neurons.cpu(),
        source_importance=imp.cpu(),
    )


@per_call
@refuses_processing()
def attention_neuron_queries(
    model: Model,
    prompts: Prompts,
    neuron: tuple[int, int, int, int],
    targets: Targets = None,
    *,
    scale_by_importance: bool = True,
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
) -> QueryNeurons:
    """Query FFN neurons of one attention neuron (docs/methods.md 5.4).

    The formula of :func:`query_neurons` for a single attention neuron. Magnitudes are scaled
    by **that neuron's own importance** in each prompt (the notebook instead multiplies by a
    stale value left from another cell; rankings agree whenever the importance is positive;
    a negative importance reverses the ranking). ``scale_by_importance=False`` gives the bare
    fractions ``<u, key'> / <x_in, key'>``.

    Args:
        neuron: ``(layer, pos, head, d_head)`` as in
            :class:`~mechcna.analyses.attribution.AttentionNeuronImportance` (the notebook's id
            string
            is ``layer_head_dim_pos``); ``pos`` indexes each prompt's real tokens, negative
            allowed.
    """
    arch = architecture(model)
    layer, pos, head, dim = (int(x) for x in neuron)
    layer, head = arch.check_head(layer, head)
    if not 0 <= dim < arch.d_head:
        raise MechcnaError(f"dimension {dim} out of range: heads have {arch.d_head} dimensions")
    cap = capture_positions(
        model, prompts, position=position, attention=False, interventions=interventions
    )
    lengths = cap.batch.lengths.cpu()
    if ((pos >= lengths) | (pos < -lengths)).any():
        raise MechcnaError(f"position {pos} out of range for a prompt of {int(lengths.min())}")
    p = torch.where(torch.tensor(pos < 0), lengths + pos, torch.full_like(lengths, pos))
    if (p > cap.batch.positions.cpu()).any():
        raise MechcnaError(f"position {pos} is after a prompt's scored position")
    att = attention_neuron_importance(
        model, prompts, targets, layers=[layer], position=position,
        paper_compat=paper_compat, interventions=interventions,
    )  # fmt: skip
    n = len(cap.batch)
    rows = torch.arange(n)
    imp = att.scores[rows, layer, p, head, dim]
    weights = imp if scale_by_importance else torch.ones_like(imp)
    coords = torch.tensor([layer, 0, head, dim]).repeat(n, 1)
    coords[:, 1] = p
    with torch.no_grad():
        scores = _query_scores(arch, cap, coords[:, None], weights[:, None], False)
    return QueryNeurons(
        scores=scores,
        dims=("prompt", "layer", "neuron"),
        **att.provenance(),
        sources=coords[:, None],
        source_importance=imp[:, None],
    )


# ---------------------------------------------------------------------------- 5.1 / 5.2
def _ffn_key_vectors(
    arch: Architecture,
    neurons: Int[Tensor, "prompt value 2"],
    which: Literal["up", "gate", "value"],
    dtype: torch.dtype,
) -> Float[Tensor, "prompt value d_model"]:
    layer, idx = neurons[..., 0], neurons[..., 1]
    keys = torch.zeros(*neurons.shape[:2], arch.d_model, dtype=dtype, device=arch.device)
    for l in layer.unique().tolist():
        mask = layer == l
        j = idx[mask]
        if which == "value":
            W = arch.W_out(l)[j]
        elif which == "gate":
            gate = arch.W_gate(l)
            assert gate is not None
            W = gate[:, j].T
        else:
            W = arch.W_in(l)[:, j].T
        keys[mask.to(arch.device)] = (W * arch.ln2_w(l)).to(dtype)
    return keys


def _shares(
    comps: Float[Tensor, "prompt value component d_model"],
    keys: Float[Tensor, "prompt value d_model"],
    last: Int[Tensor, "prompt value"],
    imp: Float[Tensor, "prompt value"],
) -> Float[Tensor, "prompt component"]:
    """``sum_n Imp_n * r_c / S`` with components after ``last`` excluded."""
    r = einops.einsum(
        comps,
        keys,
        "prompt value component d_model, prompt value d_model -> prompt value component",
    )
    c = torch.arange(comps.shape[2], device=r.device)
    r = torch.where(c[None, None] <= last[..., None], r, 0)
    weight = _safe_ratio(imp.to(r), r.sum(-1))
    return einops.einsum(weight, r, "prompt value, prompt value component -> prompt component")


@per_call
@refuses_processing()
def ffn_query_layers(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    k: int = 30,
    values: NeuronImportance | None = None,
    key: FFNKey = "mean",
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
) -> QueryLayers:
    """Query-layer attribution of the top-``k`` FFN value neurons (docs/methods.md 5.1).

    For neuron ``(l, j)`` with importance ``Imp`` and key ``key'``, every component ``c`` of
    ``[embedding, A0, F0, ..., A_{l-1}, F_{l-1}, A_l]`` at the scored position gets
    ``Imp * r_c / S`` with ``r_c = <c, key'>`` and ``S = <resid_mid[l], key'>``.

    Keys (``* ln2.w``): ``W_in`` for non-gated MLPs; for gated MLPs ``key="up"`` (``W_in``),
    ``"gate"`` (``W_gate``) or ``"mean"`` (default: the average of the two attributions,
    which still sums to ``Imp``; each is kept in ``extras``). ``paper_compat=True`` reproduces
    the notebooks: for gated models the neuron's **value vector** ``W_out[l][j] * ln2.w`` (the
    Llama notebook's choice), for non-gated models ``W_in`` (the GPT-2 notebook), and the
    importance scores drop the final norm's bias and ``b_U``.

    Args:
        k: how many value neurons (30 in the Llama notebook, 100 in the GPT-2 one).
        values: precomputed :func:`~mechcna.analyses.attribution.neuron_importance` of these
        prompts.
    """
    arch = architecture(model)
    k = positive_int(k, "k")
    if key not in ("up", "gate", "mean"):
        raise InvalidOptionError(f"key must be 'up', 'gate' or 'mean', not {key!r}")
    cap = capture(model, prompts, targets, position=position, interventions=interventions,
                  need=() if values is not None else ("post",))  # fmt: skip
    if values is None:
        values = neuron_importance_from_capture(model, cap, paper_compat=paper_compat, arch=arch)
    elif values.scores.shape[0] != len(cap.batch):
        raise MechcnaError("values were computed for a different number of prompts")
    dtype = compute_dtype(arch.dtype)
    flat = einops.rearrange(values.scores, "prompt layer neuron -> prompt (layer neuron)")
    top = flat.topk(min(k, flat.shape[1]), dim=1)
    neurons = torch.stack(torch.unravel_index(top.indices, values.scores.shape[1:]), -1)
    imp = top.values.to(arch.device, dtype)
    pairs = torch.stack([cap.attn_out, cap.mlp_out], 2)
    rest = einops.rearrange(pairs, "prompt layer two d_model -> prompt (layer two) d_model")
    comps = torch.cat([cap.resid_pre[:, :1], rest], 1).to(dtype)  # prompt component d
    comps = comps[:, None].expand(-1, neurons.shape[1], -1, -1)
    last = (2 * neurons[..., 0] + 1).to(arch.device)
    neurons_d = neurons.to(arch.device)
    if paper_compat and arch.gated:
        names: list[Literal["up", "gate", "value"]] = ["value"]
    elif not arch.gated or key == "up":
        names = ["up"]
    elif key == "gate":
        names = ["gate"]
    else:
        names = ["up", "gate"]
    with torch.no_grad():
        parts = {
            n: _shares(comps, _ffn_key_vectors(arch, neurons_d, n, dtype), last, imp).cpu()
            for n in names
        }
    scores = torch.stack(list(parts.values())).mean(0)
    extras = parts if len(parts) > 1 else {}
    return QueryLayers(
        scores=scores,
        dims=("prompt", "component"),
        **values.provenance(paper_compat=paper_compat),
        extras=extras,
        kind="FFN",
        neurons=neurons,
        importance=top.values,
        mean_layer=neurons[..., 0].double().mean(1),
    )


@per_call
@refuses_processing()
def attention_query_layers(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    k: int = 30,
    attention: AttentionNeuronImportance | None = None,
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
) -> QueryLayers:
    """Query-layer attribution of the top-``k`` attention value neurons (docs/methods.md 5.2).

    For attention neuron ``(l, p, h, d)`` the components are ``[embedding, A0, F0, ...,
    A_{l-1}, F_{l-1}]`` at its **source position** ``p``, the key ``W_V[l][h][:, d] *
    ln1.w[l]`` (value bias and norm centring ignored, as in the notebooks), and each component
    gets ``Imp * r_c / S`` with ``S = <resid_pre[l][p], key'>``.
    """
    arch = architecture(model)
    cap, att, neurons, imp = _top_attention_neurons(
        model, prompts, targets, attention, k, position, paper_compat, interventions
    )
    dtype = compute_dtype(arch.dtype)
    dev = arch.device
    nd = neurons.to(dev)
    rows = torch.arange(nd.shape[0], device=dev)[:, None]
    comps = cap.components()[rows, nd[..., 1]].to(dtype)  # prompt attn component d
    with torch.no_grad():
        keys = _attention_keys(arch, nd, dtype)
        scores = _shares(comps, keys, 2 * nd[..., 0], imp.to(dev, dtype)).cpu()
    return QueryLayers(
        scores=scores,
        dims=("prompt", "component"),
        **att.provenance(),
        kind="attention",
        neurons=neurons,
        importance=imp,
        mean_layer=neurons[..., 0].double().mean(1),
    )
