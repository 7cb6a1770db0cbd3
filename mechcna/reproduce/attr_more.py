"""The attribution paper's interpolation, layer-heatmap, probability-histogram and shared-neuron
stages (ATTR Figures 2-5 and section 5.5; issue 22).

1. :func:`interpolation_stage` (Figures 3 / 10): the log-probability and probability of the
   answer along the path from the input embedding to the final residual, both layer by layer
   (the residual after each attention and FFN block) and along the straight line between the
   two; every point projected through the final norm (scale frozen from the real pass) and
   the unembedding.
2. :func:`value_layer_stage` (Figures 4 / 5): per knowledge type, the layers of each
   sentence's top-10 FFN and attention value neurons, as heatmaps.
3. :func:`prob_histogram_stage` (Figure 2, both halves): the layers of the top FFN neurons by
   log-probability increase beside those by probability increase, and a test that tells
   "medium-deep layers" from "the last layers".
4. :func:`shared_neuron_stage` (section 5.5): the share of each sentence's top value and query
   neurons that more than half the sentences of its type share.
"""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Int, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.attribution import (
    NeuronImportance,
    layer_importance,
)
from mechcna.analyses.capture import capture
from mechcna.analyses.query import QueryNeurons
from mechcna.engine.projection import project_to_vocab
from mechcna.models.backend import Model
from mechcna.reproduce import paper, stats
from mechcna.reproduce.attribution import (
    PAPER,
    ValueRun,
    _skip,
    _type_rows,
    _types,
    top_layer_counts,
    value_stage,
)
from mechcna.reproduce.core import ReproduceSettings, StageBuilder, StageResult, stage
from mechcna.tasks.knowledge import KnowledgeDataset

#: Points of the straight-line interpolation (0, 0.05, ..., 1).
ALPHAS = torch.linspace(0.0, 1.0, 21)
#: The last fifth of a path: where the papers' probability curve rises.
LATE = 0.8
#: Top value neurons per sentence in the per-type heatmaps (the paper's top-10).
HEATMAP_K = 10


# ------------------------------------------------------------------ 1. Figures 3 / 10
def answer_logprob(
    model: Model,
    points: Float[Tensor, "prompt point d_model"],
    scale: Float[Tensor, " prompt"],
    target: Int[Tensor, " prompt"],
) -> Float[Tensor, "prompt point"]:
    """``log p(answer | point)``: each point through the final norm with the prompt's frozen
    scale and the unembedding (with the final norm's bias and ``b_U``: the real projection)."""
    logits = project_to_vocab(model, points, scale[:, None]).double()
    lp = logits.log_softmax(-1)
    index = target.to(lp.device)[:, None, None].expand(-1, lp.shape[1], 1)
    return lp.gather(-1, index)[..., 0].cpu()


def interpolation_paths(
    model: Model, data: KnowledgeDataset
) -> tuple[Float[Tensor, "prompt point"], Float[Tensor, "prompt alpha"]]:
    """The answer's log-probability along the layer path (points: the embedding, then the
    residual after attention ``l`` and after FFN ``l`` for every layer; labels ``-0.5``,
    ``l``, ``l + 0.5``) and along ``embedding + alpha * (final - embedding)`` for
    :data:`ALPHAS`."""
    cap = capture(model, data.prompts, data.answers, need=())
    pre, mid = cap.resid_pre, cap.resid_mid  # prompt layer d_model
    post = torch.cat([pre[:, 1:], cap.resid_final[:, None]], 1)
    steps = torch.stack([mid, post], 2).flatten(1, 2)  # after A0, F0, A1, F1, ...
    layer_path = torch.cat([pre[:, :1], steps], 1)
    e, f = pre[:, 0], cap.resid_final
    a = ALPHAS.to(e)[None, :, None]
    line = e[:, None] + a * (f - e)[:, None]
    with torch.no_grad():
        return (
            answer_logprob(model, layer_path, cap.scale, cap.target),
            answer_logprob(model, line, cap.scale, cap.target),
        )


def path_labels(n_layers: int) -> list[float]:
    """``[-0.5, 0, 0.5, 1, ...]``: embedding, after attention ``l``, after FFN ``l``."""
    return [-0.5] + [l + half for l in range(n_layers) for half in (0.0, 0.5)]


def late_share_gap(lp: np.ndarray) -> float:
    """How much more of the total rise of the probability than of the log-probability
    happens in the last fifth of a path (``lp[prompt, point]``; ratios of sums over
    prompts): above 0 when probability jumps late while log-probability rises steadily."""
    n = lp.shape[1]
    cut = round(LATE * (n - 1))

    def share(v: np.ndarray) -> float:
        total = float((v[:, -1] - v[:, 0]).sum())
        return float((v[:, -1] - v[:, cut]).sum()) / total if total else float("nan")

    return share(np.exp(lp)) - share(lp)


def interpolation_stage(
    model: Model, data: KnowledgeDataset, settings: ReproduceSettings
) -> StageResult:
    """ATTR Figures 3 / 10: log-probability and probability of the answer from the input
    embedding to the final residual."""
    title = "Log-probability and probability along the residual stream (Figures 3 / 10)"
    if not len(data):
        return _skip("interpolation", title, "no prompt survived the filter")
    with stage("interpolation", title, PAPER) as st:
        layer_lp, line_lp = interpolation_paths(model, data)
        labels = path_labels(int(model.cfg.n_layers))
        layer_x = "position (l: after attention l, l.5: after FFN l)"
        paths = (("layer_path", layer_lp, labels, layer_x),
                 ("interpolation", line_lp, ALPHAS.tolist(), "alpha"))  # fmt: skip
        for key, lp, x, x_name in paths:
            frame = pd.DataFrame({x_name: x})
            for name, mask in _type_rows(data).items():
                m = torch.from_numpy(mask)
                frame[f"{name} log p"] = lp[m].mean(0).numpy()
                frame[f"{name} p"] = lp[m].exp().mean(0).numpy()
            st.tables[key] = frame
            fig = go.Figure()
            fig.add_scatter(x=x, y=frame["all log p"], name="log p (mean)", mode="lines")
            fig.add_scatter(x=x, y=frame["all p"], name="p (mean)", mode="lines", yaxis="y2")
            fig.update_layout(
                title=f"answer's log p and p along the {key.replace('_', ' ')}",
                xaxis_title=x_name, yaxis={"title": "log p"},
                yaxis2={"title": "p", "overlaying": "y", "side": "right"},
            )  # fmt: skip
            st.figures[key] = fig
        st.data |= {"layer_path": layer_lp, "interpolation": line_lp}
        for name, lp in (("straight-line interpolation", line_lp), ("layer path", layer_lp)):
            arr = lp.double().numpy()
            test = stats.bootstrap_test(late_share_gap, arr, threshold=0.0, seed=settings.seed)
            st.claim(
                "Probability rises late and sharply while log-probability rises steadily, so "
                f"log-probability is the better additive measure (test, {name}: the share of "
                "the total rise in the last fifth of the path is larger for probability than "
                "for log-probability; estimate = the difference; bootstrap over sentences)",
                "Figures 3 / 10: probability near 0 until the end of the path, log-probability "
                "rising throughout (read from the figures) (secondary source)",
                f"difference {test.estimate:+.2f} (final mean p "
                f"{float(lp[:, -1].exp().mean()):.3f})",
                test,
            )
        st.notes.append(
            "Every point is projected through the final norm with the scale of the real final "
            "residual (frozen) and the unembedding; the last point is the model's own output. "
            "The paper's path is the interpolation from the input embedding to the final "
            "vector; both the straight line and the layer-by-layer residual are shown."
        )
    return st.result()


# ------------------------------------------------------------------ 2. Figures 4 / 5
def type_layer_shares(
    scores: Tensor, data: KnowledgeDataset, k: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per type (rows), the % of its sentences' top-``k`` entries of ``scores[prompt, layer,
    ...]`` in each layer (columns), and the per-prompt layer counts ``[prompt, layer]``."""
    per = np.stack([top_layer_counts(scores[i : i + 1], k) for i in range(len(data))])
    rows = {}
    for name, mask in _type_rows(data).items():
        c = per[mask].sum(0)
        rows[name] = 100 * c / max(int(c.sum()), 1)
    return pd.DataFrame(rows).T, per


def min_upper_share(per: np.ndarray, codes: np.ndarray) -> float:
    """The smallest, over types (``codes[prompt]``), of the share of the type's top neurons
    in the upper half of the layers (``per[prompt, layer]`` counts)."""
    half = per.shape[1] // 2
    shares = [per[codes == c][:, half:].sum() / max(per[codes == c].sum(), 1)
              for c in np.unique(codes)]  # fmt: skip
    return float(min(shares)) if shares else float("nan")


@value_stage("value_layers", "Layers of the top value neurons per knowledge type (Figures 4 / 5)")
def value_layer_stage(st: StageBuilder, run: ValueRun) -> None:
    """ATTR Figures 4 / 5: per-type heatmaps of the layers of the top-10 value neurons."""
    model, data, ffn, att, settings = run
    codes = np.unique(np.array(data.types), return_inverse=True)[1].astype(np.float64)
    for kind, scores in (("FFN", ffn.scores), ("attention", att.scores)):
        shares, per = type_layer_shares(scores, data, HEATMAP_K)
        _heatmap(st, f"{kind}_layers", shares, f"top-{HEATMAP_K} {kind} value neurons")
        test = stats.bootstrap_test(min_upper_share, per, codes, threshold=0.5,
                                    seed=settings.seed)  # fmt: skip
        st.claim(
            f"In every knowledge type the top {kind} value neurons sit in medium-deep "
            f"layers (test: for each type over half of its sentences' top-{HEATMAP_K} "
            f"{kind} value neurons are in the upper half of the layers; estimate = the "
            "smallest type's share; bootstrap over sentences)",
            "Figures 4 / 5: per-type heatmaps, top value layers medium-deep in every type "
            "(read from the figures) (secondary source)",
            f"smallest type share {100 * test.estimate:.0f}% ({len(_types(data))} types)",
            test,
        )
    layers = layer_importance(model, data.prompts, data.answers).scores  # prompt layer comp
    n_top = min(HEATMAP_K, layers.shape[1])
    for c, kind in enumerate(("attention", "FFN")):
        shares, _ = type_layer_shares(layers[:, :, c : c + 1], data, n_top)
        _heatmap(st, f"{kind}_top_layers", shares, f"top-{n_top} {kind} layers")
    st.notes.append(
        f"Each sentence's top-{HEATMAP_K} FFN value neurons (of every FFN neuron) and "
        f"top-{HEATMAP_K} attention value neurons (of every layer, head, dimension and "
        "source position) by log-probability increase; % of them per layer, over the "
        "sentences of each type (the 'all' row: every sentence). The *_top_layers tables "
        f"read the figures' 'top-{HEATMAP_K} value layers' as whole layers instead: each "
        f"sentence's top-{HEATMAP_K} attention and FFN layers by layer-level importance "
        "(docs/methods.md 4.1), % per layer."
    )


def _heatmap(st: StageBuilder, key: str, shares: pd.DataFrame, what: str) -> None:
    """A per-type layer table and its heatmap under ``key``."""
    shares.columns = [str(c) for c in shares.columns]
    st.tables[key] = shares.rename_axis("type")
    fig = go.Figure(go.Heatmap(z=shares.to_numpy(), x=list(range(shares.shape[1])),
                               y=list(shares.index), colorscale="Viridis",
                               colorbar={"title": "% of top"}))  # fmt: skip
    fig.update_layout(title=f"layers of each sentence's {what}, per type", xaxis_title="layer",
                      yaxis_title="type")  # fmt: skip
    st.figures[key.replace("layers", "heatmap")] = plotting.integer_axis(fig, "x", shares.shape[1])


# ------------------------------------------------------------------ 3. Figure 2 (both halves)
def probability_increase(
    model: Model, data: KnowledgeDataset, ffn: NeuronImportance
) -> Float[Tensor, "prompt layer neuron"]:
    """``p(w | resid_mid + v) - p(w | resid_mid)`` of every FFN neuron, from its
    log-probability increase ``Imp``: ``p(w | resid_mid) * (exp(Imp) - 1)`` (exact: both
    terms share the frozen final scale)."""
    cap = capture(model, data.prompts, data.answers, need=())
    with torch.no_grad():
        base = answer_logprob(model, cap.resid_mid, cap.scale, cap.target)  # prompt layer
    return base.exp()[..., None] * torch.expm1(ffn.scores.double())


def mean_top_layer(scores: Tensor, k: int) -> np.ndarray:
    """Per prompt, the mean layer of its top-``k`` entries of ``scores[prompt, layer, ...]``."""
    flat = scores.reshape(scores.shape[0], -1)
    idx = flat.topk(min(k, flat.shape[1]), dim=1).indices // (flat.shape[1] // scores.shape[1])
    return idx.double().mean(1).numpy()


def region_gap(per: np.ndarray) -> float:
    """Share of top neurons in medium-deep layers ``[L/2, L-3)`` minus share in the last
    three layers (``per[prompt, layer]`` counts, ratio of sums)."""
    n = per.shape[1]
    total = max(float(per.sum()), 1.0)
    return float(per[:, n // 2 : n - 3].sum() / total - per[:, n - 3 :].sum() / total)


def prob_histogram_stage(
    model: Model,
    data: KnowledgeDataset,
    ffn: NeuronImportance | None,
    settings: ReproduceSettings,
) -> StageResult:
    """ATTR Figure 2 (both halves): layers of the top FFN neurons by log-probability increase
    and by probability increase, and "medium-deep" vs "last layers"."""
    title = "Top FFN neurons by log-probability vs probability increase (Figure 2)"
    if not len(data) or ffn is None:
        return _skip("prob_histogram", title, "no prompt survived the filter")
    with stage("prob_histogram", title, PAPER) as st:
        k = settings.histogram_k
        prob = probability_increase(model, data, ffn)
        st.data["prob_increase"] = prob
        n_layers = ffn.scores.shape[1]
        per_lp = np.stack([top_layer_counts(ffn.scores[i : i + 1], k) for i in range(len(data))])
        per_p = np.stack([top_layer_counts(prob[i : i + 1], k) for i in range(len(data))])
        lp_c, p_c = per_lp.sum(0), per_p.sum(0)
        hist = pd.DataFrame({
            "layer": range(n_layers),
            "log-prob increase %": 100 * lp_c / max(int(lp_c.sum()), 1),
            "prob increase %": 100 * p_c / max(int(p_c.sum()), 1),
        })  # fmt: skip
        st.tables["histograms"] = hist
        fig = go.Figure()
        fig.add_bar(x=hist["layer"], y=hist["log-prob increase %"], name="log-prob increase",
                    marker_color=plotting.FFN_COLOUR)  # fmt: skip
        fig.add_bar(x=hist["layer"], y=hist["prob increase %"], name="prob increase",
                    marker_color=plotting.ATTN_COLOUR)  # fmt: skip
        fig.update_layout(title=f"layers of each sentence's top-{k} FFN neurons (Figure 2)",
                          xaxis_title="layer", yaxis_title="% of top neurons",
                          barmode="group")  # fmt: skip
        st.figures["histograms"] = plotting.integer_axis(fig, "x", n_layers)
        deeper = mean_top_layer(prob, k) - mean_top_layer(ffn.scores, k)
        test = stats.bootstrap_test(np.mean, deeper, threshold=0.0, seed=settings.seed)
        st.claim(
            "Ranked by probability increase, top FFN neurons crowd deeper layers than ranked "
            f"by log-probability increase (test: mean layer of each sentence's top-{k} by "
            "probability minus by log-probability is above 0; bootstrap over sentences)",
            "Figure 2: log-prob increase spreads top neurons over medium-deep layers, prob "
            "increase concentrates them in the last layers (read from the figure) "
            "(secondary source)",
            f"mean layer {float(np.mean(mean_top_layer(prob, k))):.1f} (prob) vs "
            f"{float(np.mean(mean_top_layer(ffn.scores, k))):.1f} (log-prob) of {n_layers}",
            test,
        )
        last = float(lp_c[n_layers - 3 :].sum() / max(int(lp_c.sum()), 1))
        mid = float(lp_c[n_layers // 2 : n_layers - 3].sum() / max(int(lp_c.sum()), 1))
        test = (stats.bootstrap_test(region_gap, per_lp, threshold=0.0, seed=settings.seed)
                if n_layers >= 8 else None)  # fmt: skip
        st.claim(
            "The top FFN value neurons sit in medium-deep layers, not in the last layers "
            f"(test: the share of each sentence's top-{k} FFN neurons in layers L/2 to L-4 "
            f"({n_layers // 2}-{n_layers - 4} here) exceeds the share in the last three layers; "
            "estimate = the difference; bootstrap over sentences)",
            "Figure 2: most top FFN value neurons in medium-deep layers (Llama-7B, GPT-2) "
            "(secondary source)",
            f"medium-deep {100 * mid:.0f}% vs last three layers {100 * last:.0f}%"
            + ("" if test else f" (not tested: {n_layers} layers, fewer than 8)"),
            test,
        )
        st.notes.append(
            "Probability increase of an FFN neuron = p(w | resid_mid + v) - p(w | resid_mid), "
            "computed exactly from its log-probability increase and the base probability "
            "(frozen final scale, docs/methods.md 4.6 (c))."
        )
    return st.result()


# ------------------------------------------------------------------ 4. shared neurons
def top_sets(scores: Tensor, k: int, nonzero: bool = False) -> list[set[int]]:
    """Each prompt's top-``k`` flat indices of ``scores[prompt, ...]`` (``nonzero``: only
    entries that are not exactly 0)."""
    flat = scores.reshape(scores.shape[0], -1)
    top = flat.topk(min(k, flat.shape[1]), dim=1)
    out = []
    for idx, val in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        out.append({i for i, v in zip(idx, val, strict=True) if not nonzero or v != 0})
    return out


def shared_shares(sets: list[set[int]], types: list[str], min_n: int = 3) -> np.ndarray:
    """Per prompt, the share of its set held by more than half the prompts of its type (NaN
    for types with fewer than ``min_n`` prompts or an empty set)."""
    out = np.full(len(sets), np.nan)
    for t in dict.fromkeys(types):
        idx = [i for i, x in enumerate(types) if x == t]
        if len(idx) < min_n:
            continue
        counts: dict[int, int] = {}
        for i in idx:
            for n in sets[i]:
                counts[n] = counts.get(n, 0) + 1
        shared = {n for n, c in counts.items() if c > len(idx) / 2}
        for i in idx:
            if sets[i]:
                out[i] = len(sets[i] & shared) / len(sets[i])
    return out


def shared_neuron_stage(
    data: KnowledgeDataset,
    ffn: NeuronImportance | None,
    queries: QueryNeurons | None,
    settings: ReproduceSettings,
) -> StageResult:
    """ATTR 5.5: the share of top value and query neurons shared by more than half the
    sentences of a type."""
    title = "Neurons shared within a knowledge type (section 5.5)"
    if not len(data) or ffn is None or queries is None:
        return _skip("shared_neurons", title, "no prompt survived the filter")
    with stage("shared_neurons", title, PAPER) as st:
        k = settings.query_value_k
        value = shared_shares(top_sets(ffn.scores, k), data.types)
        query = shared_shares(top_sets(queries.scores, k, nonzero=True), data.types)
        rows = []
        for name, mask in _type_rows(data).items():
            ok = mask & ~np.isnan(value) & ~np.isnan(query)
            rows.append({"type": name, "n": int(mask.sum()), "n used": int(ok.sum()),
                         "value shared %": 100 * float(np.mean(value[ok])) if ok.any()
                         else float("nan"),
                         "query shared %": 100 * float(np.mean(query[ok])) if ok.any()
                         else float("nan")})  # fmt: skip
        table = pd.DataFrame(rows)
        for label, pair in paper.SHARED_NEURONS.items():
            table[f"{label} value / query shared % (all types)"] = [
                f"{pair[0]:g} / {pair[1]:g}" if r == "all" else "" for r in table["type"]
            ]
        st.tables["shared"] = table
        ok = ~np.isnan(value) & ~np.isnan(query)
        test = (stats.bootstrap_test(lambda v, q: float(100 * (v.mean() - q.mean())),
                                     value[ok], query[ok], threshold=0.0, seed=settings.seed)
                if ok.any() else None)  # fmt: skip
        st.claim(
            "Value neurons are shared by the sentences of a type more than query neurons "
            f"(test: the share of each sentence's top-{k} value neurons held by over half its "
            "type exceeds that of its top query neurons; estimate = the difference, points; "
            "bootstrap over sentences)",
            f"{paper.GPT2} {paper.SHARED_NEURONS[paper.GPT2][0]} vs "
            f"{paper.SHARED_NEURONS[paper.GPT2][1]}%, {paper.LLAMA} "
            f"{paper.SHARED_NEURONS[paper.LLAMA][0]} vs {paper.SHARED_NEURONS[paper.LLAMA][1]}% "
            "(secondary source)",
            f"value {table.iloc[0]['value shared %']:.1f}% vs query "
            f"{table.iloc[0]['query shared %']:.1f}% over {int(ok.sum())} sentences"
            if ok.any()
            else "no type has 3 or more sentences",
            test,
        )
        st.notes.append(
            f"Per type (at least 3 sentences), the neurons in more than half of its sentences' "
            f"top-{k} sets are 'shared'; each sentence's share of its set that is shared, "
            "averaged. Query neurons: FFN query neurons of the top attention value neurons "
            "(docs/methods.md 5.3; neurons no attention neuron reads left out)."
        )
    return st.result()
