"""The attribution paper's query-side stages and one-prompt walk-through (docs/methods.md 5, 11).

* :func:`query_stage`: query layers of the top FFN and attention value neurons per knowledge
  type (Figures 6-7) and query-only vs query-value neurons per layer (section 5.5).
* :func:`walkthrough_stage`: one prompt through layers, heads, head x source position and the
  top FFN and attention neurons with their tokens (the knowledge notebooks, items 13-24).
"""

import numpy as np
import pandas as pd
import torch

from mechcna.analyses import plotting
from mechcna.analyses.attribution import (
    AttentionNeuronImportance,
    NeuronImportance,
    attention_neuron_importance,
    head_importance,
    layer_importance,
    neuron_importance,
)
from mechcna.analyses.query import attention_query_layers, ffn_query_layers, query_neurons
from mechcna.analyses.query_overlap import query_value_overlap
from mechcna.engine.projection import top_tokens
from mechcna.models.backend import Model
from mechcna.reproduce import paper, stats
from mechcna.reproduce.attribution import PAPER, ValueRun, _skip, _type_rows, value_stage
from mechcna.reproduce.core import StageBuilder, StageResult, stage
from mechcna.tasks.knowledge import KnowledgeDataset


def component_label(c: int) -> float:
    """Query-layer component index -> the paper's label (embedding -0.5, attention ``l`` at
    ``l``, FFN ``l`` at ``l + 0.5``)."""
    return c / 2 - 0.5


def component_name(c: int) -> str:
    """Query-layer component index -> a word label: ``embedding``, ``L0 attention``,
    ``L0 FFN``, ``L1 attention``, ... (the heatmap's category axis)."""
    if c == 0:
        return "embedding"
    return f"L{(c - 1) // 2} " + ("attention" if c % 2 else "FFN")


def mean_query_layer(shares: torch.Tensor) -> float:
    """The mean component label weighted by positive shares (``[component]``)."""
    w = shares.double().clamp_min(0)
    labels = torch.tensor([component_label(c) for c in range(len(w))], dtype=torch.float64)
    return float((w * labels).sum() / w.sum()) if w.sum() > 0 else float("nan")


@value_stage("query", "Query layers and query neurons (Figures 6-7, section 5.5)")
def query_stage(st: StageBuilder, run: ValueRun) -> None:
    """Query layers per type (Figures 6-7) and query-only vs query-value curves."""
    model, data, ffn, att, settings = run
    k = settings.query_k
    fq = ffn_query_layers(model, data.prompts, data.answers, k=k, values=ffn)
    aq = attention_query_layers(model, data.prompts, data.answers, k=k, attention=att)
    assert fq.mean_layer is not None and aq.mean_layer is not None
    rows, heat = [], {}
    for name, mask in _type_rows(data).items():
        m = torch.from_numpy(mask)
        f_share, a_share = fq.scores[m].mean(0), aq.scores[m].mean(0)
        heat[name] = a_share.double().numpy()
        rows.append(
            {
                "type": name, "n": int(mask.sum()),
                "FFN value mean layer": float(fq.mean_layer[m].mean()),
                "FFN query mean layer": mean_query_layer(f_share),
                "FFN top query layers": _top_labels(f_share),
                "attention value mean layer": float(aq.mean_layer[m].mean()),
                "attention query mean layer": mean_query_layer(a_share),
                "attention top query layers": _top_labels(a_share),
            }
        )  # fmt: skip
    table = pd.DataFrame(rows)
    printout = f"{paper.LLAMA} notebook printout, one prompt"
    table[f"{printout}: attention value mean layer"] = paper.ATTENTION_VALUE_MEAN_LAYER[paper.LLAMA]
    table[f"{printout}: attention top query layers"] = paper.ATTENTION_QUERY_TOP[paper.LLAMA]
    st.tables["query_layers"] = table
    st.figures["ffn_query_layers"] = fq.plot()
    st.figures["attention_query_layers"] = aq.plot()
    names = [component_name(c) for c in range(aq.scores.shape[1])]
    z = np.stack([heat[t] for t in heat])
    fig = plotting.signed_heatmap(
        torch.from_numpy(z), x_title="query component",
        y_title="knowledge type", title="query-layer shares of attention value neurons",
    )  # fmt: skip
    fig.update_traces(x=names, y=list(heat), hovertemplate="%{y}, %{x}: %{z:.4g}<extra></extra>")
    fig.update_xaxes(type="category", tickangle=-45)
    fig.update_yaxes(type="category")
    st.figures["query_heatmap"] = fig
    overall = rows[0]
    n_layers = int(model.cfg.n_layers)
    upper = np.array([component_label(c) >= n_layers / 2 for c in range(aq.scores.shape[1])])
    shares = aq.scores.double().clamp_min(0).numpy()  # prompt component

    def upper_share(w: np.ndarray) -> float:
        return float(w[:, upper].sum() / max(w.sum(), 1e-300))

    test = stats.bootstrap_test(upper_share, shares, threshold=0.5, seed=settings.seed)
    st.claim(
        "The top query components of the attention value neurons sit in medium-deep "
        "layers, just below the value neurons (test: over half of the positive query "
        "weight comes from components in the upper half of the layers; bootstrap over "
        "prompts. 'Query layers lie below the value neurons' is true by construction)",
        f"{paper.LLAMA} notebook printout for one prompt: value neurons' mean layer "
        f"{paper.ATTENTION_VALUE_MEAN_LAYER[paper.LLAMA]}, top query components "
        f"{paper.ATTENTION_QUERY_TOP[paper.LLAMA]} ({paper.GPT2}: "
        f"{paper.ATTENTION_QUERY_TOP[paper.GPT2]}, of 36)",
        f"upper-half share {100 * test.estimate:.0f}%; top components "
        f"{overall['attention top query layers']} (value mean layer "
        f"{overall['attention value mean layer']:.2f} of {n_layers})",
        test,
    )
    queries = query_neurons(model, data.prompts, data.answers, k=k, attention=att)
    overlap = query_value_overlap(ffn, queries, k=settings.query_value_k)
    st.data["queries"] = queries
    counts = overlap.scores.sum(0).double()  # layer kind
    curve = pd.DataFrame(
        {
            "layer": range(n_layers),
            "query-only": counts[:, 0].numpy(),
            "query-value": counts[:, 1].numpy(),
        }
    )
    st.tables["query_value"] = curve
    st.figures["query_value"] = overlap.plot()
    cut = int(np.ceil(0.6 * n_layers))
    total = counts.sum(1)
    low = float(counts[:cut, 0].sum() / max(float(total[:cut].sum()), 1e-12))
    high = float(counts[cut:, 0].sum() / max(float(total[cut:].sum()), 1e-12))
    per = overlap.scores.double().numpy()  # prompt layer kind

    def drop(p: np.ndarray) -> float:
        c = p.sum(0)
        lo_share = c[:cut, 0].sum() / max(c[:cut].sum(), 1e-12)
        hi_share = c[cut:, 0].sum() / max(c[cut:].sum(), 1e-12)
        return float(lo_share - hi_share)

    test = stats.bootstrap_test(drop, per, threshold=0.0, seed=settings.seed)
    st.claim(
        "The share of query-only neurons drops after about 60% depth (test: query-only "
        f"share of query neurons in layers < {cut} minus that in layers >= {cut} is above "
        "0; bootstrap over prompts)",
        "section 5.5: query-only share drops after ~60% depth (secondary source)",
        f"query-only share {100 * low:.0f}% below vs {100 * high:.0f}% above",
        test,
    )
    st.notes.append(
        f"Top-{k} value neurons per prompt; FFN keys are the mean of the up and gate keys "
        "for gated MLPs (the Llama notebook used the value vector). Query neurons: top-"
        f"{settings.query_value_k} per prompt, compared with the top-"
        f"{settings.query_value_k} FFN value neurons."
    )


def _top_labels(shares: torch.Tensor, k: int = 5) -> str:
    idx = shares.double().topk(min(k, len(shares))).indices.tolist()
    return ", ".join(f"{component_label(c):g}" for c in idx)


def walkthrough_stage(
    model: Model,
    data: KnowledgeDataset,
    ffn: NeuronImportance | None = None,
    att: AttentionNeuronImportance | None = None,
) -> StageResult:
    """One prompt (the first of ``data``): layers, heads, head x position, top neurons.

    ``ffn`` / ``att``: value-neuron scores of ``data`` already computed (prompt 0 is read;
    batched scores equal one-prompt scores), to save a pass over the static blocks.
    """
    title = "One-prompt walk-through"
    if not len(data):
        return _skip("walkthrough", title, "no prompt survived the filter")
    with stage("walkthrough", title, PAPER) as st:
        item = data[0]
        prompt, answer = [item.prompt], [item.answer]
        layers = layer_importance(model, prompt, answer)
        st.tables["layers"] = pd.DataFrame(
            {
                "layer": range(layers.scores.shape[1]),
                "attention": layers.scores[0, :, 0].numpy(),
                "FFN": layers.scores[0, :, 1].numpy(),
            }
        )
        st.figures["layers"] = layers.plot(0)
        heads = head_importance(model, prompt, answer)
        st.tables["heads"] = heads.top(10, prompt=0)
        st.figures["heads"] = heads.plot(0)
        best = heads.top(1, prompt=0).iloc[0]
        l, h = int(best["layer"]), int(best["head"])
        by_pos = head_importance(model, prompt, answer, by_position=True, layers=[l])
        tokens = model.to_str_tokens(model.to_tokens(item.prompt)[0])  # ids: see single_token_id
        st.tables["head_positions"] = pd.DataFrame(
            {"position": range(len(tokens)), "token": tokens,
             "increase": by_pos.scores[0, l, h, : len(tokens)].numpy()}
        )  # fmt: skip
        ffn = ffn if ffn is not None else neuron_importance(model, prompt, answer)
        top = ffn.top(10, prompt=0)
        top["tokens"] = [
            ", ".join(
                t for t, _ in top_tokens(model, (int(a), int(b)), 8, coefficient=float(c)).top
            )
            for a, b, c in zip(top["layer"], top["neuron"], top["coefficient"], strict=True)
        ]
        st.tables["ffn_neurons"] = top
        att = att if att is not None else attention_neuron_importance(model, prompt, answer)
        atop = att.top(10, prompt=0)
        W_O = model.W_O.detach()
        atop["tokens"] = [
            ", ".join(
                t for t, _ in top_tokens(model, W_O[int(a), int(hd), int(d)] * float(c), 8).top
            )
            for a, hd, d, c in zip(
                atop["layer"], atop["head"], atop["d_head"], atop["coefficient"], strict=True
            )
        ]
        st.tables["attention_neurons"] = atop
        st.notes.append(
            f"Prompt {item.prompt!r} -> {item.answer!r}; top head {l}_{h}; "
            f"p = {float(layers.final_logprob.exp()[0]):.3f}."  # type: ignore[union-attr]
        )
    return st.result()
