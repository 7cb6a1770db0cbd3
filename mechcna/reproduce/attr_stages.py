"""The attribution paper's query-neuron zeroing, head and query-token stages (ATTR; issue 22).

Each function is one stage of ``mechcna reproduce --paper attribution`` (after the stages of
:mod:`mechcna.reproduce.attribution` and :mod:`mechcna.reproduce.query_stages`, whose value
and query neurons it reuses):

1. :func:`query_zeroing_stage`: ATTR Table 7: zero each sentence's top-1000 **query** FFN
   neurons (:func:`~mechcna.analyses.query.query_neurons`) vs 1000 random FFN neurons, MRR and
   probability decrease per knowledge type.
2. :func:`head_type_stage`: head attribution per type and the top-1% head intervention: the
   heads chosen on one half of a type's sentences are zeroed on the other half (same type)
   and on the sentences of every other type.
3. :func:`query_token_stage`: Table 9's hidden-interpretable query neuron: the top query
   neuron of each sentence's top attention neuron, read directly and through that neuron's
   head (:func:`~mechcna.analyses.query_overlap.query_neuron_vectors`).
"""

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna.analyses import plotting
from mechcna.analyses.attribution import AttentionNeuronImportance, head_importance
from mechcna.analyses.query import QueryNeurons, query_neurons
from mechcna.analyses.query_overlap import query_neuron_tokens, query_neuron_vectors
from mechcna.engine.projection import project_to_vocab
from mechcna.interventions.edits import HeadAblation, Intervention, NeuronEdit
from mechcna.interventions.prompts import prepare_prompts, single_token_id
from mechcna.models.backend import Model
from mechcna.reproduce import paper, stats
from mechcna.reproduce.attribution import (
    PAPER,
    _skip,
    _type_rows,
    _types,
    random_means,
    target_stats,
)
from mechcna.reproduce.claim_tests import split_halves
from mechcna.reproduce.core import ReproduceSettings, StageResult, stage
from mechcna.tasks.knowledge import KnowledgeDataset

#: The paper's 1000 query neurons as a share of Llama-7B's 32 x 11008 FFN neurons.
LLAMA_QUERY_SHARE = 1000 / (32 * 11008)
#: Share of all heads zeroed per knowledge type (the paper's top 1%).
HEAD_SHARE = 0.01


def grouped_bars(
    table: pd.DataFrame, x: str, columns: list[str], title: str, y_title: str
) -> go.Figure:
    """One group of bars per row of ``table`` (labelled by column ``x``), one bar per column."""
    fig = go.Figure()
    for c in columns:
        fig.add_bar(x=table[x].tolist(), y=table[c].tolist(), name=c)
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_title, barmode="group")
    return fig


def _col(frame: pd.DataFrame | pd.Series, name: str) -> np.ndarray:
    return np.asarray(frame[name], dtype=np.float64)


def _pair(pair: tuple[float, float] | tuple[int, int] | None) -> str:
    return f"{pair[0]:g} / {pair[1]:g}" if pair else ""


def _both(b_rr, a_rr, b_p, a_p, fn=min) -> float:
    """``fn`` of the relative MRR and probability decreases (%)."""
    return fn(stats.relative_decrease(b_rr, a_rr), stats.relative_decrease(b_p, a_p))


# ------------------------------------------------------------------ 1. Table 7 (query zeroing)
def _neurons(flat_index: list[int], d_mlp: int) -> list[tuple[int, int]]:
    return [(j // d_mlp, j % d_mlp) for j in flat_index]


def _zeroed(neurons: list[tuple[int, int]]) -> list[Intervention]:
    return [NeuronEdit(neurons)] if neurons else []


def query_zeroing_effects(
    model: Model,
    data: KnowledgeDataset,
    queries: QueryNeurons,
    k: int,
    seed: int = 0,
    draws: int = 5,
    share_k: int | None = None,
) -> pd.DataFrame:
    """Per prompt: reciprocal rank and probability of the answer before (``rr``, ``prob``),
    after zeroing its top-``k`` query FFN neurons at every position (``rr_top``,
    ``prob_top``; ``queries.scores[prompt]`` ranked descending, positive scores only: column
    ``k`` is how many) and after zeroing as many distinct FFN neurons drawn uniformly from
    every layer, ``draws`` times (``rr_random_<d>``, ``prob_random_<d>``). With ``share_k``,
    also after zeroing only the top-``share_k`` of them (``rr_share``, ``prob_share``)."""
    batch = prepare_prompts(model, data.prompts)
    n_layers, d_mlp = queries.scores.shape[1:]
    pool = n_layers * d_mlp
    k = min(k, pool)
    rng = random.Random(seed)
    rows = []
    for i, item in enumerate(data):
        tokens = batch.tokens[i, : int(batch.lengths[i])]
        target = single_token_id(model, item.answer)
        best = queries.scores[i].flatten().topk(k)
        top = _neurons(best.indices[best.values > 0].tolist(), d_mlp)
        before = target_stats(model, tokens, target, [])
        after = target_stats(model, tokens, target, _zeroed(top))
        row = {"type": item.type, "prompt": item.prompt, "k": len(top), "rr": before[0],
               "prob": before[1], "rr_top": after[0], "prob_top": after[1]}  # fmt: skip
        if share_k is not None:
            few = target_stats(model, tokens, target, _zeroed(top[:share_k]))
            row |= {"rr_share": few[0], "prob_share": few[1]}
        for d in range(draws):
            rand = _neurons(rng.sample(range(pool), len(top)), d_mlp)
            r = target_stats(model, tokens, target, _zeroed(rand))
            row |= {f"rr_random_{d}": r[0], f"prob_random_{d}": r[1]}
        rows.append(row)
    return pd.DataFrame(rows)


def query_zeroing_stage(
    model: Model,
    data: KnowledgeDataset,
    queries: QueryNeurons | None,
    settings: ReproduceSettings,
) -> StageResult:
    """ATTR Table 7: the top-``query_zero_k`` query FFN neurons of each sentence zeroed vs as
    many random FFN neurons, MRR / probability decrease (%) per type, the paper beside ours."""
    title = "Zeroing the top-1000 query neurons vs random neurons (Table 7)"
    if not len(data) or queries is None:
        return _skip("query_zeroing", title, "no prompt survived the filter")
    with stage("query_zeroing", title, PAPER) as st:
        draws = settings.random_draws
        pool = int(queries.scores.shape[1] * queries.scores.shape[2])
        share_k = max(1, round(LLAMA_QUERY_SHARE * pool))
        per = query_zeroing_effects(
            model, data, queries, settings.query_zero_k, settings.seed, draws, share_k
        )
        rr_rand, p_rand = random_means(per, draws)
        rows = []
        for name, mask in _type_rows(data).items():
            f = per.loc[mask]
            col = {c: f[c].to_numpy() for c in f.columns if c not in ("type", "prompt")}
            row = {
                "type": name, "n": len(f),
                "MRR decrease %": stats.relative_decrease(col["rr"], col["rr_top"]),
                "prob decrease %": stats.relative_decrease(col["prob"], col["prob_top"]),
                f"MRR / prob decrease % at the paper's share (top {share_k})": (
                    f"{stats.relative_decrease(col['rr'], col['rr_share']):.1f} / "
                    f"{stats.relative_decrease(col['prob'], col['prob_share']):.1f}"
                ),
                "random MRR decrease %": stats.relative_decrease(col["rr"],
                                                                 col["rr_random_mean"]),
                "random prob decrease %": stats.relative_decrease(col["prob"],
                                                                  col["prob_random_mean"]),
            }  # fmt: skip
            for label, numbers in paper.QUERY_TABLE7.items():
                row[f"{label} MRR/prob decrease %"] = _pair(numbers.get(name))
            rows.append(row)
        st.tables["table7"] = pd.DataFrame(rows)
        ks = _col(per, "k")
        k = int(ks.max())
        fewer = int((ks < min(settings.query_zero_k, pool)).sum())
        if fewer:
            st.notes.append(
                f"{fewer} sentences have fewer than {settings.query_zero_k} FFN neurons with a "
                f"positive query score (at least {int(ks.min())}): only those are zeroed."
            )
        st.notes.append(
            f"Per sentence, its top-{k} query FFN neurons (positive query scores of its top-"
            f"{settings.query_k} attention value neurons, docs/methods.md 5.3) are zeroed at every "
            "position; the random rows zero as many distinct FFN neurons drawn from all layers, "
            f"{draws} draws (mean). {k} neurons are {100 * k / pool:.2f}% of this model's "
            f"{pool} FFN neurons (the paper's 1000 are 0.28% of Llama-7B's, 0.54% of GPT-2 "
            f"large's); the column at the paper's share zeroes only the top {share_k} (0.28% of "
            "this model's FFN neurons). Decreases are relative, of the means over sentences. "
            "The paper's "
            "per-type numbers are from a secondary source."
        )
        cols = [per[c].to_numpy() for c in ("rr", "rr_top", "prob", "prob_top")]
        test = stats.bootstrap_test(_both, *cols, threshold=50.0, seed=settings.seed)
        overall = rows[0]
        st.claim(
            f"Zeroing the top-{k} query neurons of each sentence removes most of the "
            "prediction (test: MRR and probability decrease over 50%; estimate = the smaller; "
            "bootstrap over sentences)",
            "MRR / prob decrease averages 87 / 95% (Llama-7B), 92 / 95% (GPT-2) (secondary source)",
            f"{overall['MRR decrease %']:.1f} / {overall['prob decrease %']:.1f}%",
            test,
        )
        cols = [per[c].to_numpy() for c in ("rr", "rr_random_mean", "prob", "prob_random_mean")]
        test = stats.bootstrap_test(lambda *a: _both(*a, fn=max), *cols, threshold=10.0,
                                    side="below", seed=settings.seed)  # fmt: skip
        mrr = [stats.relative_decrease(per["rr"].to_numpy(), per[c].to_numpy()) for c in rr_rand]
        prob = [stats.relative_decrease(per["prob"].to_numpy(), per[c].to_numpy())
                for c in p_rand]  # fmt: skip
        st.claim(
            f"{k} random FFN neurons barely change the prediction (test: MRR and probability "
            "decrease under 10%; estimate = the larger, mean over draws)",
            f"{paper.QUERY_RANDOM_DECREASE[0]} / {paper.QUERY_RANDOM_DECREASE[1]}% (secondary "
            "source)",
            f"MRR {stats.spread(mrr)}; prob {stats.spread(prob)}",
            test,
        )
        st.figures["table7"] = grouped_bars(
            st.tables["table7"], "type",
            ["MRR decrease %", "prob decrease %", "random MRR decrease %",
             "random prob decrease %"],
            "decrease after zeroing the top query neurons vs random ones (Table 7)", "decrease %",
        )  # fmt: skip
        st.data["per_prompt"] = per
    return st.result()


# ------------------------------------------------------------------ 2. heads per type
def top_heads(scores: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The ``n`` heads with the largest mean of ``scores[prompt, layer, head]`` over prompts."""
    mean = scores.double().mean(0)
    idx = mean.flatten().topk(min(n, mean.numel())).indices.tolist()
    return [(j // mean.shape[1], j % mean.shape[1]) for j in idx]


def head_type_effects(
    model: Model,
    data: KnowledgeDataset,
    heads: dict[str, list[tuple[int, int]]],
    evaluate: np.ndarray,
) -> pd.DataFrame:
    """One row per (evaluation prompt, head set): reciprocal rank and probability of the
    answer before and after zeroing (``z`` at every position) the heads chosen for type
    ``head_type``, with ``same`` = whether the prompt is of that type."""
    batch = prepare_prompts(model, data.prompts)
    rows = []
    for i in np.flatnonzero(evaluate):
        item = data[int(i)]
        tokens = batch.tokens[i, : int(batch.lengths[i])]
        target = single_token_id(model, item.answer)
        rr, prob = target_stats(model, tokens, target, [])
        for t, chosen in heads.items():
            edits: list[Intervention] = [HeadAblation(chosen)]
            a_rr, a_prob = target_stats(model, tokens, target, edits)
            rows.append({"prompt": int(i), "type": item.type, "head_type": t,
                         "same": t == item.type, "rr": rr, "prob": prob, "rr_after": a_rr,
                         "prob_after": a_prob})  # fmt: skip
    columns = ["prompt", "type", "head_type", "same", "rr", "prob", "rr_after", "prob_after"]
    return pd.DataFrame(rows, columns=columns)


def _split_by_type(data: KnowledgeDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per type, a selection half and an evaluation half of its prompts (boolean masks)."""
    types = np.array(data.types)
    select = np.zeros(len(data), dtype=bool)
    for t in _types(data):
        idx = np.flatnonzero(types == t)
        sel, _ = split_halves(len(idx), seed)
        select[idx[sel]] = True
    return select, ~select


def head_type_stage(
    model: Model, data: KnowledgeDataset, settings: ReproduceSettings
) -> StageResult:
    """Head attribution per type and the top-1% head intervention, same type vs other types."""
    title = "Heads per knowledge type and the top-1% head intervention"
    if len(set(data.types)) < 2:
        return _skip("head_types", title, "fewer than two knowledge types survived the filter")
    with stage("head_types", title, PAPER) as st:
        imp = head_importance(model, data.prompts, data.answers)
        n_layers, n_heads = imp.scores.shape[1:]
        n_top = max(1, round(HEAD_SHARE * n_layers * n_heads))
        select, evaluate = _split_by_type(data, settings.seed)
        types = np.array(data.types)
        chosen = {
            t: top_heads(imp.scores[torch.from_numpy(select & (types == t))], n_top)
            for t in _types(data)
        }
        rows = []
        for name, mask in _type_rows(data).items():
            mean = imp.scores[torch.from_numpy(mask)].double().mean(0)
            best = top_heads(imp.scores[torch.from_numpy(mask)], 5)
            rows.append({"type": name, "n": int(mask.sum()),
                         "top heads (mean log-prob increase)": ", ".join(
                             f"{l}_{h} ({float(mean[l, h]):.3f})" for l, h in best)})  # fmt: skip
        st.tables["head_attribution"] = pd.DataFrame(rows)
        mean_all = imp.scores.double().mean(0).numpy()
        st.figures["head_heatmap"] = plotting.layer_head_heatmap(
            mean_all, n_layers, n_heads, "mean log-probability increase of each head",
            signed=True, colorbar="log-prob increase",
        )  # fmt: skip
        per = head_type_effects(model, data, chosen, evaluate)
        st.data |= {"per_pair": per, "heads": chosen}
        table = []
        for t in chosen:
            of_t = (per["head_type"] == t).to_numpy(dtype=bool)
            is_same = per["same"].to_numpy(dtype=bool)
            same, other = per.loc[of_t & is_same], per.loc[of_t & ~is_same]
            row = {"heads of type": t, "heads": ", ".join(f"{l}_{h}" for l, h in chosen[t]),
                   "n same": len(same), "n other": len(other)}  # fmt: skip
            for label, f in (("same type", same), ("other types", other)):
                for metric, before, after in (("MRR", "rr", "rr_after"),
                                              ("prob", "prob", "prob_after")):  # fmt: skip
                    row[f"{label} {metric} decrease %"] = (
                        stats.relative_decrease(_col(f, before), _col(f, after))
                        if len(f)
                        else float("nan")
                    )
            for label in paper.HEAD_SAME_TYPE:
                row[f"{label} same / other MRR/prob decrease %"] = (
                    f"{_pair(paper.HEAD_SAME_TYPE[label])} vs {_pair(paper.HEAD_OTHER_TYPE[label])}"
                )
            table.append(row)
        st.tables["head_intervention"] = pd.DataFrame(table)
        st.notes.append(
            "Head importance: log-probability increase of each head's output "
            "(docs/methods.md 4.2). "
            f"Per type, the top {n_top} heads ({100 * HEAD_SHARE:g}% of {n_layers * n_heads}) "
            "by mean importance over a selection half of its sentences are zeroed at every "
            "position; their effect is measured on the other (evaluation) half of that type "
            "and on the evaluation sentences of every other type (no winner's curse). The "
            "paper's numbers (GPT-2 only) are from a secondary source."
        )
        # per evaluation prompt: same-type ablation vs the mean over the other types' heads
        is_same = per["same"].to_numpy(dtype=bool)
        same = per.loc[is_same].set_index("prompt")
        other = pd.DataFrame(per.loc[~is_same].groupby("prompt")[["rr_after", "prob_after"]].mean())
        other.columns = ["rr_after_other", "prob_after_other"]
        both = same.join(other, how="inner")
        cols = [_col(both, c) for c in ("rr", "rr_after", "rr_after_other", "prob",
                                             "prob_after", "prob_after_other")]  # fmt: skip

        def margin(rr, rr_s, rr_o, p, p_s, p_o) -> float:
            d = stats.relative_decrease
            return min(d(rr, rr_s) - d(rr, rr_o), d(p, p_s) - d(p, p_o))

        if len(both):
            test = stats.bootstrap_test(margin, *cols, threshold=0.0, seed=settings.seed)
            d = stats.relative_decrease
            ours = (
                f"same type {d(cols[0], cols[1]):.1f} / {d(cols[3], cols[4]):.1f}% vs other "
                f"types {d(cols[0], cols[2]):.1f} / {d(cols[3], cols[5]):.1f}% (MRR / prob)"
            )
        else:
            test, ours = None, "no type has an evaluation half (too few sentences per type)"
        st.claim(
            "The top-1% heads of a knowledge type matter for that type, not for the others "
            "(test: the MRR and probability decreases on the type's held-out sentences exceed "
            "those on other types' sentences; estimate = the smaller margin, points; bootstrap "
            "over sentences)",
            f"{paper.GPT2}: {_pair(paper.HEAD_SAME_TYPE[paper.GPT2])}% same type vs "
            f"{_pair(paper.HEAD_OTHER_TYPE[paper.GPT2])}% other types (secondary source)",
            ours,
            test,
        )
    return st.result()


# ------------------------------------------------------------------ 3. Table 9 query neuron
def target_rank(logits: torch.Tensor, target: int) -> int:
    """The best rank (1 = first) of ``target`` among the top or the bottom of ``logits``
    (``[d_vocab]``): a vector counts as reading a token whichever its sign."""
    top = int((logits > logits[target]).sum()) + 1
    bottom = int((logits < logits[target]).sum()) + 1
    return min(top, bottom)


def _without_layer0(att: AttentionNeuronImportance) -> AttentionNeuronImportance:
    """``att`` with layer 0 pushed below every other score (no FFN neuron lies below it)."""
    scores = att.scores.clone()
    scores[:, 0] = scores.min() - 1.0
    return replace(att, scores=scores)


def query_token_stage(
    model: Model,
    data: KnowledgeDataset,
    att: AttentionNeuronImportance | None,
    settings: ReproduceSettings,
) -> StageResult:
    """Table 9's hidden-interpretable query neuron: per sentence, the top query FFN neuron of
    its top attention value neuron (layer >= 1), the answer's rank in that neuron's value
    vector and in the vector the attention neuron's head makes of it."""
    title = "A hidden-interpretable query neuron (Table 9)"
    if not len(data) or att is None or att.scores.shape[1] < 2:
        return _skip("query_tokens", title, "no prompt survived the filter, or one layer")
    with stage("query_tokens", title, PAPER) as st:
        q = query_neurons(model, data.prompts, data.answers, k=1, attention=_without_layer0(att))
        assert q.sources is not None
        d_mlp = q.scores.shape[2]
        rows = []
        for i, item in enumerate(data):
            flat = q.scores[i].flatten()
            if not bool((flat != 0).any()):
                continue
            j = int(flat.argmax())
            neuron = (j // d_mlp, j % d_mlp)
            l, p, h, d = (int(x) for x in q.sources[i, 0])
            raw, out = query_neuron_vectors(model, neuron, (l, h))
            target = single_token_id(model, item.answer)
            with torch.no_grad():
                r_raw = target_rank(project_to_vocab(model, raw, paper_compat=True), target)
                r_out = target_rank(project_to_vocab(model, out, paper_compat=True), target)
            rows.append({"type": item.type, "prompt": item.prompt, "answer": item.answer,
                         "attention neuron": f"{l}_{h}_{d}_{p}",
                         "query neuron": f"{neuron[0]}_{neuron[1]}", "head": f"{l}_{h}",
                         "answer rank, value vector": r_raw,
                         "answer rank, through head": r_out})  # fmt: skip
        table = pd.DataFrame(rows)
        st.tables["query_neurons"] = table
        if len(table):
            first = rows[0]
            a, b = (int(x) for x in first["query neuron"].split("_"))
            hl, hh = (int(x) for x in first["head"].split("_"))
            comp = query_neuron_tokens(model, (a, b), (hl, hh), k=10)
            st.tables["tokens"] = pd.DataFrame(
                {f"{c} {side}": [t for t, _ in getattr(tt, side)]
                 for c, tt in zip(comp.columns, comp.tokens) for side in ("top", "bottom")}
            )  # fmt: skip
            st.notes.append(
                f"Tokens of query neuron {first['query neuron']} of {first['prompt']!r} -> "
                f"{first['answer']!r}, read directly and through head {first['head']}."
            )
        st.tables["paper"] = pd.DataFrame(
            {"model": list(paper.QUERY_NEURON_TOKENS),
             "paper's neuron and tokens": list(paper.QUERY_NEURON_TOKENS.values())}
        )  # fmt: skip
        st.notes.append(
            "Per sentence: its top attention value neuron in layers >= 1, that neuron's top "
            "query FFN neuron (docs/methods.md 5.4), and the neuron's raw value vector made "
            "readable through the head (its own norm, V with b_V, W_O; docs/methods.md 5.6). "
            "Ranks are the best "
            "of top and bottom (a vector may read a token with either sign)."
        )
        better = (
            int(
                np.sum(
                    _col(table, "answer rank, through head")
                    < _col(table, "answer rank, value vector")
                )
            )
            if len(table)
            else 0
        )
        test = stats.binomial_test(better, len(table), 0.5) if len(table) else None
        st.claim(
            "Query neurons are hidden-interpretable: the head turns a query neuron's value "
            "vector into one that reads the answer (test: in over half the sentences the "
            "answer ranks higher through the head than in the raw value vector; chance 50%; "
            "exact binomial)",
            f"{paper.LLAMA}: {paper.QUERY_NEURON_TOKENS[paper.LLAMA]}; {paper.GPT2}: "
            f"{paper.QUERY_NEURON_TOKENS[paper.GPT2]} (notebook printout for one prompt each)",
            f"{better} of {len(table)} sentences rank the answer higher through the head",
            test,
        )
    return st.result()
