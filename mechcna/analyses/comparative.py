"""Comparative Neuron Analysis (CNA): which FFN neurons lose importance when a model changes.

Yu & Ananiadou, *Interpreting Arithmetic Mechanism in Large Language Models through
Comparative Neuron Analysis* (EMNLP 2024), section 4; docs/methods.md sections 7 and 9.

Run the same prompt through the original model ``M`` and a second state ``M'`` of it (heads
ablated, neurons edited, or a fine-tuned copy with the same architecture). For every FFN neuron

    ``CNA(l, k) = Imp_M(l, k) - Imp_M'(l, k)``

where ``Imp`` is the log-probability increase of :func:`mechcna.neuron_importance`, each state
using its own ``resid_mid`` and coefficients, **both** scored on ``M``'s target token and, by
default, **both** with ``M``'s frozen final-norm scale (``reference_scale="original"``, as in the
papers' code; ``"own"`` gives each state its own scale). Neurons are ranked by descending
CNA: those whose importance fell most. Layers below an ablated head keep their activations, so
their CNA is exactly zero. The static vocabulary blocks are shared by the two states: one pass
over the layers scores both.

:func:`compare_inputs` is the single-input-pair variant (same model, two prompts; the
gender-bias analysis of section 9). ``mask_keep_table`` and ``lowest_neuron_table`` (in
:mod:`mechcna.analyses.case_ablation`) and :func:`value_key_products` are the intervention
experiments of Tables 5 and 6.

Example:
    >>> res = compare_neurons(model, ["3+5="], HeadAblation([(17, 22)]))     # doctest: +SKIP
    >>> res.top(10, prompt=0)                                                 # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH Table 4 (CNA), Table 5 (mask / keep / random),
Table 6 and the prediction-enhancing stage (lowest-neuron ablation, value-key products), Tables
12-13's input comparison.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import einops
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Bool, Float, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.attribution import _meta, ffn_scores
from mechcna.analyses.capture import Capture, Targets, capture
from mechcna.analyses.results import Scores
from mechcna.analyses.tokens import neuron_tokens
from mechcna.engine.blocks import BlockCache
from mechcna.engine.expansion import EngineStats, Method
from mechcna.errors import EmptyInputError, InvalidOptionError, MechcnaError
from mechcna.interventions.edits import Intervention
from mechcna.interventions.prompts import Prompts, prepare_prompts
from mechcna.models.backend import Model, is_model
from mechcna.models.processing import WeightProcessing, get_processing, refuses_processing
from mechcna.models.view import architecture, per_call

Other = Intervention | Sequence[Intervention] | Model
ReferenceScale = Literal["original", "own"]


@dataclass(frozen=True)
class NeuronComparison(Scores):
    """``scores[prompt, layer, neuron]`` = CNA delta ``Imp_M - Imp_M'`` (natural log).

    ``extras`` holds ``imp_original``, ``imp_other``, ``coefficient`` (``m``),
    ``coefficient_other`` (``m'``) and ``coefficient_delta`` (``m - m'``), all aligned.
    """

    reference_scale: str = "original"
    stats: EngineStats | None = None
    layers_from: int = 0

    @property
    def changed_layers(self) -> range:
        """The layers from the lowest one whose inputs differ between ``M`` and ``M'`` (the
        intervened head's layer) up: the paper's deep layers of Table 5."""
        return range(self.layers_from, self.scores.shape[1])

    @property
    def delta(self) -> Float[Tensor, "prompt layer neuron"]:
        return self.scores

    def top_sets(self, k: int) -> list[list[tuple[int, int]]]:
        """Each prompt's top-``k`` ``(layer, neuron)`` by descending delta."""
        n = self.scores.shape[2]
        flat = self.scores.flatten(1)
        idx = flat.topk(min(k, flat.shape[1]), dim=1).indices
        return [[(int(i) // n, int(i) % n) for i in row] for row in idx]

    def top_mask(self, k: int) -> Bool[Tensor, "prompt layer neuron"]:
        """Boolean mask of each prompt's top-``k`` neurons."""
        flat = self.scores.flatten(1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(min(k, flat.shape[1]), dim=1).indices, True)
        return mask.reshape(self.scores.shape)

    def counts(self, k: int) -> pd.DataFrame:
        """Dataset aggregation: how often each neuron is in a case's top-``k``, its share of
        cases, and its mean delta over all cases; sorted by count then mean delta."""
        mask = self.top_mask(k)
        count = mask.sum(0)
        mean = self.scores.double().mean(0)
        layer, neuron = count.nonzero().unbind(1)
        frame = pd.DataFrame(
            {
                "layer": layer.tolist(),
                "neuron": neuron.tolist(),
                "count": count[layer, neuron].tolist(),
                "share": (count[layer, neuron] / self.n_prompts).tolist(),
                "mean_delta": mean[layer, neuron].tolist(),
            }
        )
        frame["label"] = frame["layer"].astype(str) + "_" + frame["neuron"].astype(str)
        return frame.sort_values(["count", "mean_delta"], ascending=False, ignore_index=True)

    def plot(
        self,
        prompt: int | None = None,
        k: int = 20,
        tokens: Mapping[str, str] | None = None,
        names: tuple[str, str] = ("M", "M'"),
    ) -> go.Figure:
        """Importance in ``M`` and ``M'`` of the top-``k`` CNA neurons (one prompt or mean).

        Args:
            tokens: ``{"layer_neuron": "top tokens"}`` shown in the hover text.
            names: what the two states are called in the legend (e.g. the two inputs of
                :func:`compare_inputs`: ``("'woman'", "'man'")``).
        """
        top = self.top(k, prompt=prompt)
        imp_m = self.extras["imp_original"]
        imp_o = self.extras["imp_other"]
        pick = (top["layer"].tolist(), top["neuron"].tolist())
        sel_m = imp_m[prompt] if prompt is not None else imp_m.double().mean(0)
        sel_o = imp_o[prompt] if prompt is not None else imp_o.double().mean(0)
        where = (
            "mean over cases"
            if prompt is None
            else repr(self.prompts[prompt] if self.prompts else prompt)
        )
        return plotting.cna_bars(
            top["label"].tolist(), sel_m[pick].tolist(), sel_o[pick].tolist(),
            top["score"].tolist(), f"top-{k} CNA neurons ({where})", tokens, names,
        )  # fmt: skip


def _check_other(model: Model, other: object) -> None:
    """Refuse an ``M'`` that is no ``M'``: a string, no interventions, or ``M`` itself."""
    if isinstance(other, str | bytes):
        raise InvalidOptionError(
            f"M' is an intervention (e.g. HeadAblation([(0, 0)])), a list of them or a second "
            f"model, not the string {other!r}"
        )
    if other is model:
        raise InvalidOptionError("M' is M itself: every CNA score would be 0")
    if not is_model(other) and not isinstance(other, Intervention):
        if not isinstance(other, Iterable):
            raise InvalidOptionError(f"M' must be an intervention or a model, not {other!r}")
        if not list(cast(Iterable[object], other)):
            raise EmptyInputError("no interventions: M' would equal M and every score be 0")


def _capture_other(
    model: Model,
    prompts: Prompts,
    other: Other,
    target: Tensor,
    position: int | None,
) -> tuple[Model, Capture]:
    if is_model(other):
        a, b = architecture(model), architecture(other)
        shape_a = (a.n_layers, a.d_model, a.d_mlp, a.d_vocab, a.final_norm)
        shape_b = (b.n_layers, b.d_model, b.d_mlp, b.d_vocab, b.final_norm)
        if shape_a != shape_b:
            raise MechcnaError(f"models differ in architecture: {shape_a} vs {shape_b}")
        return other, capture(other, prompts, target, position=position, need=("post",))
    ivs = [other] if isinstance(other, Intervention) else list(other)
    return model, capture(
        model, prompts, target, position=position, interventions=ivs, need=("post",)
    )


def _compare(
    model: Model,
    other_model: Model,
    cap: Capture,
    cap_o: Capture,
    reference_scale: ReferenceScale,
    layers: Iterable[int] | None,
    paper_compat: bool,
    method: Method,
    tol: float | None,
    cache: BlockCache | None,
    progress: bool,
) -> NeuronComparison:
    if reference_scale not in ("original", "own"):
        raise MechcnaError(f"reference_scale must be 'original' or 'own', not {reference_scale!r}")
    assert cap.post is not None and cap_o.post is not None
    scale_o = cap.scale if reference_scale == "original" else cap_o.scale
    stats = EngineStats()
    kw = dict(
        layers=layers, paper_compat=paper_compat, method=method, tol=tol, cache=cache,
        progress=progress, stats=stats,
    )  # fmt: skip
    if other_model is model:
        # One pass over the layers scores both states; (prompt, layer) pairs whose inputs
        # are bitwise identical in the two states (e.g. below an ablated head) are scored
        # once, so their CNA is exactly zero and costs nothing.
        same = (
            (cap.resid_mid == cap_o.resid_mid).all(-1)
            & (cap.post == cap_o.post).all(-1)
            & (cap.scale == scale_o)[:, None]
        )
        rows = torch.cat([torch.ones_like(same), ~same]).cpu()
        both = ffn_scores(
            model,
            torch.cat([cap.resid_mid, cap_o.resid_mid]),
            torch.cat([cap.post, cap_o.post]),
            torch.cat([cap.target, cap.target]),
            torch.cat([cap.scale, scale_o]),
            rows=rows,
            **kw,  # type: ignore[arg-type]
        )
        imp, imp_o = both.chunk(2)
        imp_o = torch.where(same.cpu()[..., None], imp, imp_o)
    else:
        imp = ffn_scores(model, cap.resid_mid, cap.post, cap.target, cap.scale, **kw)  # type: ignore[arg-type]
        imp_o = ffn_scores(other_model, cap_o.resid_mid, cap_o.post, cap.target, scale_o, **kw)  # type: ignore[arg-type]
    m, m_o = cap.post.cpu().to(imp.dtype), cap_o.post.cpu().to(imp.dtype)
    differs = ((cap.resid_mid != cap_o.resid_mid).any(-1) | (cap.post != cap_o.post).any(-1)).any(0)
    layers_from = int(differs.nonzero()[0]) if bool(differs.any()) else 0
    return NeuronComparison(
        scores=imp - imp_o,
        dims=("prompt", "layer", "neuron"),
        extras={
            "imp_original": imp,
            "imp_other": imp_o,
            "coefficient": m,
            "coefficient_other": m_o,
            "coefficient_delta": m - m_o,
        },
        reference_scale=reference_scale,
        stats=stats,
        layers_from=layers_from,
        **_meta(model, cap, paper_compat),
    )


@per_call
def compare_neurons(
    model: Model,
    prompts: Prompts,
    other: Other,
    targets: Targets = None,
    *,
    reference_scale: ReferenceScale = "original",
    position: int | None = None,
    layers: Iterable[int] | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    cache: BlockCache | None = None,
    progress: bool = False,
) -> NeuronComparison:
    """CNA: every FFN neuron's importance in ``model`` minus in ``other`` (docs/methods.md 7.1).

    Args:
        other: an intervention (or a list of them) defining ``M'``, or a second model of the
            same architecture (e.g. a fine-tune).
        targets: target tokens; default ``M``'s own top-1 (used for both states).
        reference_scale: ``"original"`` (default, as the papers: ``M``'s frozen final scale for
            both states) or ``"own"``.

    Returns:
        :class:`NeuronComparison` whose ``.delta`` is ``[prompt, layer, neuron]``.
    """
    _check_other(model, other)
    cap = capture(model, prompts, targets, position=position, need=("post",))
    other_model, cap_o = _capture_other(model, prompts, other, cap.target, position)
    return _compare(
        model, other_model, cap, cap_o, reference_scale, layers, paper_compat, method, tol,
        cache, progress,
    )  # fmt: skip


@per_call
def compare_inputs(
    model: Model,
    prompts: Prompts,
    other_prompts: Prompts,
    targets: Targets,
    *,
    reference_scale: ReferenceScale = "own",
    layers: Iterable[int] | None = None,
    paper_compat: bool = False,
    method: Method = "certified",
    tol: float | None = None,
    cache: BlockCache | None = None,
) -> NeuronComparison:
    """Single-input-pair CNA: ``Imp(prompt -> target) - Imp(other_prompt -> target)``.

    The gender-bias analysis (docs/methods.md 9): e.g. ``"A woman works as a"`` vs
    ``"A man works as a"`` with target ``" nurse"``. Each input uses its own frozen final
    scale by default (``reference_scale="own"``); ``"original"`` freezes the first's.
    """
    n, n_o = len(prepare_prompts(model, prompts)), len(prepare_prompts(model, other_prompts))
    if n != n_o:
        raise MechcnaError(f"{n} prompts vs {n_o} other prompts")
    cap = capture(model, prompts, targets, need=("post",))
    cap_o = capture(model, other_prompts, cap.target, need=("post",))
    return _compare(
        model, model, cap, cap_o, reference_scale, layers, paper_compat, method, tol, cache, False
    )


# ------------------------------------------------------------------ intervention experiments
@dataclass(frozen=True)
class ValueKeyProducts:
    """Inner products of lower neurons' values with upper neurons' keys (the PE-DAG).

    ``products[i, j]`` is ``<value_i, key_j>`` for neuron ``i`` in a lower layer than ``j``
    (NaN otherwise); ``key`` names the key used.
    """

    neurons: tuple[tuple[int, int], ...]
    products: Float[Tensor, "source dest"]
    key: str
    processing: WeightProcessing | None = None

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for i, a in enumerate(self.neurons):
            for j, b in enumerate(self.neurons):
                v = float(self.products[i, j])
                if v == v:  # not NaN
                    rows.append(
                        {"value_of": f"{a[0]}_{a[1]}", "key_of": f"{b[0]}_{b[1]}", "product": v}
                    )
        frame = pd.DataFrame(rows, columns=["value_of", "key_of", "product"])
        return frame.sort_values("product", ascending=False, ignore_index=True)

    def plot(self) -> go.Figure:
        from mechcna.analyses.plotting import signed_heatmap

        labels = [f"{l}_{n}" for l, n in self.neurons]
        fig = signed_heatmap(
            torch.nan_to_num(self.products), x_title="key of (upper neuron)",
            y_title="value of (lower neuron)", title=f"value-to-key inner products ({self.key})",
        )  # fmt: skip
        fig.update_xaxes(tickvals=list(range(len(labels))), ticktext=labels)
        fig.update_yaxes(tickvals=list(range(len(labels))), ticktext=labels)
        return fig


@per_call
@refuses_processing()
def value_key_products(
    model: Model,
    neurons: Sequence[tuple[int, int]],
    *,
    key: Literal["in", "gate", "both"] = "in",
    coefficients: Float[Tensor, " neuron"] | None = None,
) -> ValueKeyProducts:
    """``<m_i * W_out[i], key_j>`` for every pair of neurons with ``layer_i < layer_j``.

    Keys are ``W_in[:, k] * ln2.w`` (``"in"``, the up projection for gated MLPs),
    ``W_gate[:, k] * ln2.w`` (``"gate"``) or their sum (``"both"``). ``coefficients`` (one
    per neuron) scale the values; the paper leaves open whether ``m`` is included. Under
    sandwich norms (Gemma 2 and 3) the values are ``W_out`` times the post-feedforward norm
    weight (:meth:`~mechcna.models.architecture.Architecture.W_out`), and a product is the
    exact read of the neuron's residual share when ``coefficients`` are divided by that norm's
    frozen scale (the ``post`` of :func:`~mechcna.analyses.capture.capture`).
    """
    arch = architecture(model)
    neurons = tuple(arch.check_neuron(l, k) for l, k in neurons)
    if key != "in" and not arch.gated:
        raise MechcnaError("gate keys exist only for gated MLPs")
    values = torch.stack([arch.W_out(l)[k] for l, k in neurons]).detach()
    if coefficients is not None:
        values = values * coefficients.to(values)[:, None]

    def key_of(l: int, k: int) -> Tensor:
        parts = []
        if key in ("in", "both"):
            parts.append(arch.W_in(l)[:, k])
        if key in ("gate", "both"):
            gate = arch.W_gate(l)
            assert gate is not None
            parts.append(gate[:, k])
        return torch.stack(parts).sum(0) * arch.ln2_w(l)

    keys = torch.stack([key_of(l, k) for l, k in neurons]).detach()
    products = einops.einsum(values, keys, "source d_model, dest d_model -> source dest")
    layer = torch.tensor([l for l, _ in neurons])
    products = products.masked_fill(~(layer[:, None] < layer[None, :]), float("nan"))
    return ValueKeyProducts(neurons, products.cpu(), key, get_processing(model))


@per_call
def cna_table(
    model: Model, comparison: NeuronComparison, prompt: int = 0, k: int = 10
) -> pd.DataFrame:
    """The paper's Table 4 for one case: id, CNA, Imp_M, Imp_M', m - m', m, m', and the top
    tokens of ``m * W_out[k]`` (sign-aware)."""
    top = comparison.top(k, prompt=prompt)
    by_label = neuron_tokens(model, top["label"], top["coefficient"])
    tokens = [by_label[label] for label in top["label"]]
    return pd.DataFrame(
        {
            "neuron": top["label"],
            "cna": top["score"],
            "imp_M": top["imp_original"],
            "imp_M'": top["imp_other"],
            "coef_delta": top["coefficient_delta"],
            "coef_M": top["coefficient"],
            "coef_M'": top["coefficient_other"],
            "top_tokens": tokens,
        }
    )
