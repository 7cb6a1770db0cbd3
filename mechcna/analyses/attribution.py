"""Log-probability-increase attribution of layers, heads, FFN neurons and attention neurons.

Yu & Ananiadou, *Neuron-Level Knowledge Attribution in Large Language Models* (EMNLP 2024);
docs/methods.md sections 3, 4 and 10. A component that writes the vector ``v`` into the residual
stream at the scored position ``T`` is scored by how much it raises the target's
log-probability when added to the residual it reads from:

    ``Imp(v) = log p(w | base + v) - log p(w | base)``

with both terms projected through the final norm (its scale frozen from the real forward pass,
see :mod:`mechcna.engine.projection`) and the unembedding. ``base`` is ``resid_pre`` of the layer
for
attention components and ``resid_mid`` for FFN components. The target ``w`` defaults to the
model's own top-1 prediction, as in the papers' code.

* :func:`layer_importance`: each attention layer and FFN layer (section 4.1). The scores
  telescope: their sum is ``log p(w | final) - log p(w | embedding)``.
* :func:`head_importance`: each head's output ``z[T] @ W_O`` (4.2), optionally split by
  source position (4.3).
* :func:`neuron_importance`: every FFN neuron, ``coefficient * W_out[k]`` (4.4).
* :func:`attention_neuron_importance`: every attention neuron ``(layer, pos, head, dim)``,
  coefficient ``pattern[T, pos] * v[pos, dim]`` times row ``dim`` of ``W_O[head]`` (4.5).

Neuron scores use :mod:`mechcna.engine.expansion`: static per-layer vocabulary directions shared by
all
prompts, positions and models, a certified third-order expansion, and an exact fallback.

Example:
    >>> res = neuron_importance(model, ["Tim Duncan plays the sport of"])   # doctest: +SKIP
    >>> res.top(10, prompt=0)                                                # doctest: +SKIP
    >>> res.plot()                                                           # doctest: +SKIP

Paper items (README, "Paper to code"): ATTR's importance score (log-probability increase) of
layers, heads, FFN and attention neurons; ATTR Figures 2 / 9 and Table 3 (layers of the top
value neurons).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, get_args

import einops
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mechcna._types import Bool, Float, Int, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.capture import Capture, Targets, attention_coefficients, capture
from mechcna.analyses.results import Scores
from mechcna.engine.blocks import BlockCache, layer_rows, model_cache
from mechcna.engine.correction import Deferred, settle_deferred
from mechcna.engine.expansion import (
    EngineStats,
    Method,
    exact_rows_logprob,
    increase_from_rows,
    target_offsets,
)
from mechcna.engine.projection import (
    compute_dtype,
    linear_part,
    logit_offset,
    project_to_vocab,
    soft_cap,
)
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import Intervention
from mechcna.interventions.prompts import Prompts
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.inputs import choice
from mechcna.models.processing import VALUE_BIAS, get_processing, refuses_processing
from mechcna.models.provenance import get_provenance
from mechcna.models.view import architecture, per_call


# ---------------------------------------------------------------------------- helpers
def _logprob(
    model: Model,
    vectors: Float[Tensor, "prompt ... d_model"],
    cap: Capture,
    paper_compat: bool,
) -> Float[Tensor, "prompt ..."]:
    """``log p(w | vectors)`` with each prompt's frozen scale and target."""
    extra = vectors.ndim - 2
    scale = cap.scale.reshape(-1, *([1] * extra))
    logits = project_to_vocab(model, vectors, scale, paper_compat=paper_compat)
    target = cap.target.reshape(-1, *([1] * extra)).expand(logits.shape[:-1])
    return exact_rows_logprob(logits, target)


def _target_strings(model: Model, ids: Tensor) -> tuple[str, ...]:
    if model.tokenizer is None:
        return tuple(str(int(i)) for i in ids)
    return tuple(model.to_single_str_token(int(i)) for i in ids)


def _meta(model: Model, cap: Capture, paper_compat: bool) -> dict:
    return {
        "target_ids": cap.target.cpu(),
        "targets": _target_strings(model, cap.target),
        "prompts": cap.batch.strings,
        "model_name": model.cfg.model_name,
        "processing": get_processing(model),
        "paper_compat": paper_compat,
        "model_source": get_provenance(model),
    }


def _layers(arch: Architecture, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(arch.n_layers))
    return sorted({arch.check_layer(l) for l in layers})


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerImportance(Scores):
    """``scores[prompt, layer, component]``, component 0 = attention, 1 = FFN (tables name
    them: ``.top()`` and ``.to_frame()`` show ``attention`` / ``FFN``, labels ``23_FFN``).

    ``extras["final_logprob"]`` and ``extras["embedding_logprob"]`` hold the telescoping ends.
    """

    category_names: ClassVar[dict[str, tuple[str, ...]]] = {"component": ("attention", "FFN")}

    final_logprob: Tensor | None = None
    embedding_logprob: Tensor | None = None

    def plot(self, prompt: int | None = None) -> go.Figure:
        return plotting.layer_bars(self, prompt)


@dataclass(frozen=True)
class HeadImportance(Scores):
    """``scores[prompt, layer, head]`` or ``scores[prompt, layer, head, pos]``.

    A by-position score is the log-probability increase of one position's share of a head's
    output alone; shares do not add up to the head's score (the log-softmax is not linear),
    so by-position results plot as head x source position, never summed over positions.
    """

    def plot(self, prompt: int | None = None) -> go.Figure:
        if "pos" not in self.dims:
            return plotting.head_heatmap(self, prompt)
        values = self.select(prompt)  # layer head pos
        n_layers, n_heads, n_pos = values.shape
        fig = plotting.signed_heatmap(
            values.reshape(n_layers * n_heads, n_pos),
            x_title="source position",
            y_title="head (layer_head)",
            title=plotting._title(
                "log-probability increase by head and source position", prompt, self.prompts
            ),
        )
        fig.update_yaxes(
            tickvals=list(range(n_layers * n_heads)),
            ticktext=[f"{l}_{h}" for l in range(n_layers) for h in range(n_heads)],
        )
        fig.update_xaxes(tickvals=list(range(n_pos)), dtick=1)
        return fig


@dataclass(frozen=True)
class NeuronImportance(Scores):
    """``scores[prompt, layer, neuron]`` for FFN neurons; ``extras["coefficient"]`` too."""

    stats: EngineStats | None = None

    @property
    def coefficients(self) -> Tensor:
        return self.extras["coefficient"]

    def plot(
        self, prompt: int | None = None, k: int = 300, model: Model | None = None
    ) -> go.Figure:
        """Layers of the top-``k`` neurons; with ``model``, hover shows their top tokens."""
        return plotting.neuron_layer_counts(self, k, prompt, name="FFN", model=model)


@dataclass(frozen=True)
class AttentionNeuronImportance(Scores):
    """``scores[prompt, layer, pos, head, d_head]``; ``extras["coefficient"]`` too.

    A neuron ``(layer, pos, head, dim)`` is row ``dim`` of ``W_O[layer][head]`` read from
    source position ``pos``; positions past a prompt's scored position score 0. Labels follow
    the papers: ``layer_head_dim_pos``.
    """

    stats: EngineStats | None = None
    label_dims: ClassVar[tuple[str, ...] | None] = ("layer", "head", "d_head", "pos")

    @property
    def coefficients(self) -> Tensor:
        return self.extras["coefficient"]

    def plot(self, prompt: int | None = None, k: int = 300) -> go.Figure:
        return plotting.neuron_layer_counts(self, k, prompt, name="attention")


# ---------------------------------------------------------------------------- scores
@per_call
def layer_importance(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
) -> LayerImportance:
    """Log-probability increase of each attention layer and FFN layer (docs/methods.md 4.1).

    Returns:
        :class:`LayerImportance` with ``scores[prompt, layer, component]`` (0 = attention on
        ``resid_pre``, 1 = FFN on ``resid_mid``), natural-log units.
    """
    cap = capture(model, prompts, targets, position=position, interventions=interventions, need=())
    with torch.no_grad():
        pre = _logprob(model, cap.resid_pre, cap, paper_compat)  # [prompt layer]
        mid = _logprob(model, cap.resid_mid, cap, paper_compat)
        after_attn = _logprob(model, cap.resid_pre + cap.attn_out, cap, paper_compat)
        after_ffn = _logprob(model, cap.resid_mid + cap.mlp_out, cap, paper_compat)
        final = _logprob(model, cap.resid_final, cap, paper_compat)
    scores = torch.stack([after_attn - pre, after_ffn - mid], -1)
    return LayerImportance(
        scores=scores.cpu(),
        dims=("prompt", "layer", "component"),
        final_logprob=final.cpu(),
        embedding_logprob=pre[:, 0].cpu(),
        **_meta(model, cap, paper_compat),
    )


@per_call
@refuses_processing(VALUE_BIAS)
def head_importance(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    by_position: bool = False,
    layers: Iterable[int] | None = None,
    position: int | None = None,
    paper_compat: bool = False,
    interventions: Iterable[Intervention] = (),
) -> HeadImportance:
    """Log-probability increase of each head's output on ``resid_pre`` (docs/methods.md 4.2, 4.3).

    Args:
        by_position: split each head's output by source position (``pattern * v`` per
            position, through ``W_O``), giving ``scores[prompt, layer, head, pos]``.
        layers: restrict to these layers (others score 0).

    Returns:
        :class:`HeadImportance`; head outputs exclude ``b_O`` (it belongs to no head).
    """
    arch = architecture(model)
    need = ("attention",) if by_position else ("z",)
    cap = capture(
        model, prompts, targets, position=position, interventions=interventions, need=need
    )
    chosen = _layers(arch, layers)
    n = len(cap.batch)
    if by_position:
        coef = attention_coefficients(cap)  # prompt layer pos head d_head
        shape = (n, arch.n_layers, arch.n_heads, coef.shape[2])
    else:
        shape = (n, arch.n_layers, arch.n_heads)
    scores = torch.zeros(shape, dtype=compute_dtype(arch.dtype))
    with torch.no_grad():
        for l in chosen:
            base = _logprob(model, cap.resid_pre[:, l], cap, paper_compat)
            if by_position:
                vec = einops.einsum(
                    coef[:, l],
                    arch.W_O(l),
                    "prompt pos head d_head, head d_head d_model -> prompt head pos d_model",
                )
                lp = _logprob(model, cap.resid_pre[:, l, None, None] + vec, cap, paper_compat)
                scores[:, l] = (lp - base[:, None, None]).cpu()
            else:
                assert cap.z is not None
                vec = einops.einsum(
                    cap.z[:, l],
                    arch.W_O(l),
                    "prompt head d_head, head d_head d_model -> prompt head d_model",
                )
                lp = _logprob(model, cap.resid_pre[:, l, None] + vec, cap, paper_compat)
                scores[:, l] = (lp - base[:, None]).cpu()
    dims = ("prompt", "layer", "head", "pos") if by_position else ("prompt", "layer", "head")
    return HeadImportance(scores=scores, dims=dims, **_meta(model, cap, paper_compat))


@per_call
def neuron_importance(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    layers: Iterable[int] | None = None,
    position: int | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    interventions: Iterable[Intervention] = (),
    cache: BlockCache | None = None,
    progress: bool = False,
) -> NeuronImportance:
    """Log-probability increase of every FFN neuron on ``resid_mid`` (docs/methods.md 4.4).

    Neuron ``k`` of layer ``l`` writes ``post[T, k] * W_out[l][k]``; its score is
    ``log p(w | resid_mid + that) - log p(w | resid_mid)``.

    Args:
        layers: restrict to these layers (others score 0).
        method: ``"certified"`` (default; every score within ``tol`` of exact) or ``"exact"``.
        tol: certification tolerance (default 1e-6, 1e-12 in float64).
        cache: static direction blocks to reuse (default: the model's own cache).
        progress: show a progress bar over layers.

    Returns:
        :class:`NeuronImportance` with ``scores[prompt, layer, neuron]`` and coefficients.
    """
    choice(method, get_args(Method), "method")
    arch = architecture(model)
    cap = capture(
        model, prompts, targets, position=position, interventions=interventions, need=("post",)
    )
    assert cap.post is not None
    return neuron_importance_from_capture(
        model, cap, layers=layers, paper_compat=paper_compat, method=method, tol=tol,
        cache=cache, progress=progress, arch=arch,
    )  # fmt: skip


@per_call
def neuron_importance_from_capture(
    model: Model,
    cap: Capture,
    *,
    layers: Iterable[int] | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    cache: BlockCache | None = None,
    progress: bool = False,
    arch: Architecture | None = None,
    reference_scale: Tensor | None = None,
) -> NeuronImportance:
    """:func:`neuron_importance` on an existing :class:`Capture` (used by CNA).

    Args:
        reference_scale: a frozen final scale to use instead of the capture's own.
    """
    arch = arch or architecture(model)
    if cap.post is None:
        raise MechcnaError("this capture was made without FFN activations")
    scale = cap.scale if reference_scale is None else reference_scale
    stats = EngineStats()
    scores = ffn_scores(
        model, cap.resid_mid, cap.post, cap.target, scale, layers=layers,
        paper_compat=paper_compat, method=method, tol=tol, cache=cache, progress=progress,
        stats=stats,
    )  # fmt: skip
    return NeuronImportance(
        scores=scores,
        dims=("prompt", "layer", "neuron"),
        extras={"coefficient": cap.post.cpu()},
        stats=stats,
        **_meta(model, cap, paper_compat),
    )


@per_call
def ffn_scores(
    model: Model,
    resid_mid: Float[Tensor, "prompt layer d_model"],
    post: Float[Tensor, "prompt layer neuron"],
    target: Int[Tensor, " prompt"],
    scale: Float[Tensor, " prompt"],
    *,
    layers: Iterable[int] | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    cache: BlockCache | None = None,
    progress: bool = False,
    stats: EngineStats | None = None,
    rows: Bool[Tensor, "prompt layer"] | None = None,
) -> Float[Tensor, "prompt layer neuron"]:
    """FFN neuron log-probability increases from stacked activations (the core of
    :func:`neuron_importance`; rows may come from different runs, e.g. CNA's two states).

    Each layer's static block is fetched once and used for every row. ``rows`` restricts
    the work to the ``(prompt, layer)`` pairs marked True (others score 0).
    """
    arch = architecture(model)
    n = resid_mid.shape[0]
    scores = torch.zeros(n, arch.n_layers, arch.d_mlp, dtype=compute_dtype(arch.dtype))
    offset = logit_offset(arch, paper_compat)
    scale = scale.to(offset.dtype)
    chosen = _layers(arch, layers)
    with torch.no_grad():
        pre = None if rows is not None else _prepare(model, cache, resid_mid, scale, offset,
                                                     target, chosen, method)  # fmt: skip
        pending: list[Deferred] = []
        picked: dict[int, Tensor] = {}
        for i, l in enumerate(tqdm(chosen, desc="FFN layers", disable=not progress)):
            sel = torch.arange(n) if rows is None else rows[:, l].nonzero().flatten()
            if len(sel) == 0:
                continue
            s = scale[sel.to(scale.device)]
            base, offs = _base(arch, resid_mid, sel, l, s, offset, pre, i)
            coef = (post[sel, l].to(base.dtype) / s[:, None])[:, None]
            imp = _layer_increase(model, "ffn", l, cache, base, coef,
                                  target[sel.to(target.device)], method, tol, stats,
                                  offs, pending)  # fmt: skip
            scores[sel, l] = imp[:, 0].cpu()
            picked[l] = sel
        for l, items, val in settle_deferred(pending):  # one product for every layer's rows
            scores[picked[l][items[:, 0].cpu()], l, items[:, 2].cpu()] = val.cpu().to(scores.dtype)
    return scores


#: the most (prompt, layer) pairs whose base logits are formed before the layer loop
PREPARE_ROWS = 128


def _prepare(
    model: Model,
    cache: BlockCache | None,
    resid: Float[Tensor, "prompt layer d_model"],
    scale: Float[Tensor, " prompt"],
    offset: Float[Tensor, " d_vocab"],
    target: Int[Tensor, " prompt"],
    chosen: list[int],
    method: Method,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(bases, x, s)`` for every prompt and chosen layer at once (few prompts, certified
    path): the engine's target offsets (:func:`mechcna.engine.expansion.target_offsets`) read
    the float64 projector once for all layers instead of once per layer."""
    arch = architecture(model)
    n, L = resid.shape[0], len(chosen)
    if method != "certified" or arch.logit_soft_cap > 0 or L == 0 or n * L > PREPARE_ROWS:
        return None
    idx = torch.tensor(chosen, device=resid.device)
    bases = linear_part(arch, resid[:, idx]) / scale[:, None, None] + offset  # [n, L, V]
    M = (model_cache(model) if cache is None else cache).projector(model).exact()[0]
    tgt = target.to(bases.device).repeat_interleave(L)
    x, s = target_offsets(bases.flatten(0, 1), tgt, M)
    return bases, x.view(n, L, -1), s.view(n, L)


def _base(
    arch: Architecture,
    resid: Float[Tensor, "prompt layer d_model"],
    sel: Int[Tensor, " n"],
    layer: int,
    s: Float[Tensor, " n"],
    offset: Float[Tensor, " d_vocab"],
    pre: tuple[Tensor, Tensor, Tensor] | None,
    i: int,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Base logits of layer ``layer`` (the ``i``-th chosen) for prompts ``sel``, and their
    target offsets when :func:`_prepare` formed them."""
    if pre is None:
        return linear_part(arch, resid[sel, layer]) / s[:, None] + offset, None
    bases, x, so = pre
    return bases[:, i], (x[:, i], so[:, i])


def _layer_increase(
    model: Model,
    kind: str,
    layer: int,
    cache: BlockCache | None,
    base: Tensor,
    coef: Tensor,
    target: Tensor,
    method: Method,
    tol: float | None,
    stats: EngineStats | None,
    offsets: tuple[Tensor, Tensor] | None = None,
    defer: list[Deferred] | None = None,
) -> Tensor:
    """One layer's neuron scores through its :class:`~mechcna.engine.blocks.LayerRows`: the whole
    block is computed and kept when the cache can hold it, otherwise only the rows the
    second-order expansion cannot certify (:func:`mechcna.engine.expansion.increase_from_rows`)."""
    arch = architecture(model)
    if arch.logit_soft_cap > 0:  # the expansion assumes linear logits: exact instead
        return _capped_increase(arch, kind, layer, base, coef, target, stats)
    rows = layer_rows(model, kind, layer, cache)
    fill = rows.cache.can_hold(rows.store, arch.n_layers)
    imp = increase_from_rows(base, rows, coef, target, method=method, tol=tol, fill=fill,
                             stats=stats, offsets=offsets, defer=defer, tag=layer)  # fmt: skip
    rows.cache.settle()
    return imp


def _capped_increase(
    arch: Architecture,
    kind: str,
    layer: int,
    base: Float[Tensor, "prompt d_vocab"],
    coef: Float[Tensor, "prompt m row"],
    target: Int[Tensor, " prompt"],
    stats: EngineStats | None,
    budget: int = 2**24,
) -> Float[Tensor, "prompt m row"]:
    """Exact increases through a final logit soft cap: ``log p(w | cap(base + a U[k])) -
    log p(w | cap(base))`` for every ``(prompt, m, row)``, ``budget`` logits at a time."""
    if kind == "ffn":
        W = arch.W_out(layer).detach()
    else:
        W = einops.rearrange(arch.W_O(layer).detach(), "h d m -> (h d) m")
    n, m, n_rows = coef.shape
    target = target.to(base.device)
    before = exact_rows_logprob(soft_cap(arch, base), target)  # prompt
    out = torch.empty(n, m, n_rows, dtype=base.dtype, device=base.device)
    step = max(1, budget // max(1, n * m * arch.d_vocab))
    for i in range(0, n_rows, step):
        U = linear_part(arch, W[i : i + step])  # rows d_vocab
        logits = base[:, None, None] + coef[:, :, i : i + step, None] * U
        t = target[:, None, None].expand(logits.shape[:-1])
        out[:, :, i : i + step] = (
            exact_rows_logprob(soft_cap(arch, logits), t) - before[:, None, None]
        )
    if stats is not None:
        stats.scored += out.numel()
        stats.exact += out.numel()
    return out


@per_call
@refuses_processing(VALUE_BIAS)
def attention_neuron_importance(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    layers: Iterable[int] | None = None,
    position: int | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    interventions: Iterable[Intervention] = (),
    cache: BlockCache | None = None,
    progress: bool = False,
) -> AttentionNeuronImportance:
    """Log-probability increase of every attention neuron on ``resid_pre`` (docs/methods.md 4.5).

    Neuron ``(l, p, h, k)`` writes ``pattern[h, T, p] * v[p, h, k]`` times row ``k`` of
    ``W_O[l][h]``. All positions share the static direction of that row.

    Returns:
        :class:`AttentionNeuronImportance` with ``scores[prompt, layer, pos, head, d_head]``.
    """
    choice(method, get_args(Method), "method")
    arch = architecture(model)
    cap = capture(
        model, prompts, targets, position=position, interventions=interventions,
        need=("attention",),
    )  # fmt: skip
    coef = attention_coefficients(cap)
    n, _, n_pos = coef.shape[:3]
    scores = torch.zeros(
        n, arch.n_layers, n_pos, arch.n_heads, arch.d_head, dtype=compute_dtype(arch.dtype)
    )
    stats = EngineStats()
    offset = logit_offset(arch, paper_compat)
    chosen = _layers(arch, layers)
    every = torch.arange(n)
    pending: list[Deferred] = []
    with torch.no_grad():
        pre = _prepare(model, cache, cap.resid_pre, cap.scale, offset, cap.target, chosen, method)
        for i, l in enumerate(tqdm(chosen, desc="attention layers", disable=not progress)):
            base, offs = _base(arch, cap.resid_pre, every, l, cap.scale, offset, pre, i)
            a = einops.rearrange(coef[:, l], "prompt pos head d_head -> prompt pos (head d_head)")
            a = a.to(base.dtype) / cap.scale[:, None, None]
            imp = _layer_increase(model, "attn", l, cache, base, a, cap.target, method, tol,
                                  stats, offs, pending)  # fmt: skip
            scores[:, l] = einops.rearrange(
                imp, "prompt pos (head d_head) -> prompt pos head d_head", head=arch.n_heads
            ).cpu()
        flat = scores.view(n, arch.n_layers, n_pos, -1)
        for l, items, val in settle_deferred(pending):  # one product for every layer's rows
            b, e, r = items.cpu().unbind(1)
            flat[b, l, e, r] = val.cpu().to(scores.dtype)
    return AttentionNeuronImportance(
        scores=scores,
        dims=("prompt", "layer", "pos", "head", "d_head"),
        extras={"coefficient": coef.cpu()},
        stats=stats,
        **_meta(model, cap, paper_compat),
    )
