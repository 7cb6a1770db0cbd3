"""The arithmetic paper's section 4.2 steps 2 and 3 as reproduction stages (docs/methods.md
7.3, 8.2).

1. :func:`pe_graph_stage`: the prediction-enhancing graph. For each CNA case, the value-key
   products ``<m_i W_out[i], key_j>`` between its top CNA neurons
   (:func:`~mechcna.analyses.comparative.value_key_products`; the paper: 19_5769's value feeds
   the keys of 25_7164 and 28_3696 on "3+5="), drawn as a layered graph, and a test that the
   lower top neurons' values point at the upper top neurons' keys more than the values of
   random neurons of the same layers do (cosines, so a neuron's size cannot decide it).
2. :func:`trace_stage`: the feature-transfer trace into each case's top CNA neuron
   (:mod:`mechcna.analyses.key_scores`): the source position of the ablated head's layer, the
   head that carries it, the earlier components read through that head, the source positions
   of the top attention component (two hops back) and the two-hop transform of the
   components and neurons there; the claims test that the ablated head is the carrier and
   that the two-hop trace lands on an operand.
"""

from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna.analyses.comparative import NeuronComparison, value_key_products
from mechcna.analyses.key_scores import (
    KeyScores,
    component_scores,
    head_scores,
    neuron_scores,
    source_position_scores,
)
from mechcna.analyses.transfer import ffn_keys
from mechcna.errors import UnsupportedArchitectureError
from mechcna.interventions.prompts import prepare_prompts
from mechcna.models.backend import Model
from mechcna.models.view import architecture
from mechcna.reproduce import paper, stats
from mechcna.reproduce.arithmetic import PAPER
from mechcna.reproduce.core import ReproduceSettings, StageBuilder, StageResult, stage
from mechcna.tasks.arithmetic import ArithmeticDataset


# --------------------------------------------------------------------------- PE graph
def unsupported(model: Model) -> str:
    """Why the key-based analyses refuse ``model`` (post-norms, a logit soft cap), or ``""``."""
    try:
        ffn_keys(model, 0, 0)
    except UnsupportedArchitectureError as e:
        return str(e)
    return ""


def _key_name(model: Model) -> Literal["in", "both"]:
    return "both" if architecture(model).gated else "in"


def pair_cosines(
    model: Model, lower: list[tuple[int, int]], upper: list[tuple[int, int]]
) -> np.ndarray:
    """``cos(W_out[i], key_j)`` for ``i`` in ``lower`` and ``j`` in ``upper`` with
    ``layer_i < layer_j`` (NaN otherwise); keys as :func:`value_key_products` ``key="in"``
    (the up projection of gated MLPs times ``ln2.w``)."""
    arch = architecture(model)
    neurons = list(lower) + list(upper)
    raw = value_key_products(model, neurons, key="in").products.double()
    n = len(lower)
    values = torch.stack([arch.W_out(l)[k].detach().double() for l, k in lower]).norm(dim=-1)
    keys = torch.stack(
        [(arch.W_in(l)[:, k] * arch.ln2_w(l)).detach().double() for l, k in upper]
    ).norm(dim=-1)
    return (raw[:n, n:] / (values[:, None] * keys[None, :]).clamp_min(1e-30)).numpy()


def alignment(
    model: Model,
    top: list[tuple[int, int]],
    random_lower: list[list[tuple[int, int]]],
) -> tuple[float, float, int]:
    """Mean ``|cos|`` between the values of a case's top neurons and the keys of the top
    neurons above them, and the same with each lower neuron replaced by a random neuron of its
    layer (mean over draws; ``random_lower[d][i]`` replaces ``top[i]``). Returns
    ``(top, random, pairs)``; NaN with 0 pairs when no two top neurons are in different
    layers."""
    n = len(top)
    every = np.abs(pair_cosines(model, top + [x for d in random_lower for x in d], top))
    own = every[:n]
    valid = ~np.isnan(own)
    if not valid.any():
        return float("nan"), float("nan"), 0
    rand = [every[n * (d + 1) : n * (d + 2)][valid].mean() for d in range(len(random_lower))]
    return float(own[valid].mean()), float(np.mean(rand)), int(valid.sum())


def _random_lower(
    top: list[tuple[int, int]], d_mlp: int, draws: int, gen: np.random.Generator
) -> list[list[tuple[int, int]]]:
    """Per draw, each top neuron replaced by a random other neuron of its layer."""
    taken = set(top)
    out = []
    for _ in range(draws):
        draw = []
        for l, _k in top:
            while (l, j := int(gen.integers(d_mlp))) in taken:
                pass
            draw.append((l, j))
        out.append(draw)
    return out


def graph_figure(products: pd.DataFrame, neurons: list[tuple[int, int]], title: str) -> go.Figure:
    """A layered graph: neurons at (layer, rank within the layer), one line per value-key
    product (width by ``|product|``, blue positive, red negative)."""
    pos: dict[str, tuple[float, float]] = {}
    for l, k in neurons:
        pos[f"{l}_{k}"] = (l, sum(1 for p in pos.values() if p[0] == l))
    fig = go.Figure()
    values = products["product"].to_numpy(dtype=float)
    biggest = float(np.abs(values).max()) if len(values) else 1.0
    sources, dests = products["value_of"].tolist(), products["key_of"].tolist()
    for a, b, v in zip(sources, dests, values.tolist(), strict=True):
        (x0, y0), (x1, y1) = pos[a], pos[b]
        width = 1 + 6 * abs(v) / max(biggest, 1e-30)
        color = "steelblue" if v > 0 else "indianred"
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                hoverinfo="text",
                text=f"{a} -> {b}: {v:.3g}",
                line={"width": width, "color": color},
                showlegend=False,
            )
        )
    xs, ys = zip(*pos.values(), strict=True) if pos else ((), ())
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers+text",
            text=list(pos),
            textposition="top center",
            marker={"size": 12, "color": "black"},
            showlegend=False,
        )
    )
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="rank within layer")
    return fig


def pe_graph_stage(
    model: Model,
    cases: ArithmeticDataset | None,
    cna: NeuronComparison | None,
    settings: ReproduceSettings,
) -> StageResult:
    """The prediction-enhancing graph between each CNA case's top neurons (ARITH 4.2 step 3).

    Tables: ``pe_edges`` (the first case's value-key products, ``m``-scaled as in the paper,
    and their cosines), ``pe_alignment`` (per case: top pairs' mean ``|cos|`` against random
    lower neurons of the same layers). Figure ``pe_graph``: the first case's graph.
    """
    with stage("pe_graph", "Prediction-enhancing graph (ARITH 4.2 step 3)", PAPER) as st:
        why = unsupported(model) or ("" if cases and cna is not None else "no CNA case")
        if why or cases is None or cna is None:
            st.notes.append(f"Skipped: {why}")
            st.claim(*_PE_CLAIM, why, None)
            return st.result()
        k = min(settings.cna_ks)
        d_mlp = int(model.cfg.d_mlp or 0)
        gen = np.random.default_rng(settings.seed + 7)
        coef = cna.extras["coefficient"]
        rows, tops, rands = [], [], []
        for i, top in enumerate(cna.top_sets(k)):
            own, rand, pairs = alignment(
                model, top, _random_lower(top, d_mlp, settings.random_draws, gen)
            )
            rows.append({"case": cases.prompts[i], "pairs": pairs, "mean |cos| top": own,
                         "mean |cos| random lower": rand,
                         "ratio": own / rand if pairs else float("nan")})  # fmt: skip
            if pairs:
                tops.append(own)
                rands.append(rand)
        st.tables["pe_alignment"] = pd.DataFrame(rows)
        top0 = cna.top_sets(k)[0]
        m0 = torch.stack([coef[0, l, j] for l, j in top0])
        vkp = value_key_products(model, top0, key=_key_name(model), coefficients=m0)
        edges = vkp.to_frame()
        cos = pair_cosines(model, top0, top0)
        label = [f"{l}_{j}" for l, j in top0]
        edges["cosine (up key)"] = [
            cos[label.index(a), label.index(b)]
            for a, b in zip(edges["value_of"], edges["key_of"], strict=True)
        ]
        order = np.argsort(-np.abs(edges["product"].to_numpy(dtype=float)), kind="stable")
        edges = edges.iloc[order].reset_index(drop=True)
        edges[f"{paper.LLAMA} ('3+5=')"] = [
            paper.PE_EDGES if i == 0 else "" for i in range(len(edges))
        ]
        st.tables["pe_edges"] = edges
        st.figures["pe_graph"] = graph_figure(
            edges.head(3 * k), top0, f"prediction-enhancing graph, top-{k} CNA neurons of "
            f"{cases.prompts[0]!r} (value of lower x key of upper, m-scaled)",
        )  # fmt: skip
        st.data["alignment"] = (np.array(tops), np.array(rands))
        _pe_claim(st, np.array(tops), np.array(rands), k, len(cases), settings)
        st.notes.append(
            f"Top-{k} CNA neurons per case; products use key '{_key_name(model)}' "
            "(W_in + W_gate columns times ln2.w for gated MLPs) and the value m * W_out row in M. "
            f"The test compares cosines of W_out rows with up keys (no m), each lower top "
            f"neuron against {settings.random_draws} random neurons of its own layer; cases "
            "whose top neurons all sit in one layer have no pair and are left out."
        )
    return st.result()


_PE_CLAIM = (
    "Lower top CNA neurons feed the keys of upper top CNA neurons (the prediction-enhancing "
    "graph; test: the mean |cos| between a lower top neuron's value and an upper top neuron's "
    "key, over the ratio with random neurons of the same lower layers, is above 1; bootstrap "
    "over cases)",
    "'3+5=': 19_5769's value has large products with the keys of 25_7164 and 28_3696, and "
    "25_7164's with 28_3696's (section 4.2; no number given)",
)


def _ratio(top: np.ndarray, rand: np.ndarray) -> float:
    return float(np.mean(top) / np.mean(rand))


def _pe_claim(
    st: StageBuilder, tops: np.ndarray, rands: np.ndarray, k: int, n: int, s: ReproduceSettings
) -> None:
    if not len(tops):
        st.claim(*_PE_CLAIM, f"no case has top-{k} neurons in two layers (of {n})", None)
        return
    test = stats.bootstrap_test(_ratio, tops, rands, threshold=1.0, seed=s.seed)
    st.claim(
        *_PE_CLAIM,
        f"mean |cos| {tops.mean():.4f} for top pairs vs {rands.mean():.4f} for random lower "
        f"neurons: ratio {test.estimate:.2f} over {len(tops)} of {n} cases (top-{k})",
        test,
    )


# --------------------------------------------------------------------------- trace
def _argmax(scores: KeyScores) -> int:
    return int(scores.total().abs().argmax())


def _is_operand(token: str) -> bool:
    return token.strip().lstrip("\u2581\u0120").isdigit()


def trace_case(
    model: Model, prompt: str, neuron: tuple[int, int], head: tuple[int, int]
) -> tuple[dict, dict[str, KeyScores]]:
    """The feature-transfer trace of one case into ``neuron`` (docs/methods.md 8.2 steps 1-6).

    Rankings use ``|up + gate|`` (``|in|`` for non-gated MLPs). Returns a summary row and the
    :class:`KeyScores` of each step (``positions``, ``heads``, ``components``, ``sources``,
    ``two_hop``, ``neurons``; the last three only when an attention layer lies below the
    head)."""
    hl, h = head
    ids = prepare_prompts(model, prompt).tokens[0]
    tok = model.tokenizer
    strs = [str(tok.decode([int(i)])) if tok is not None else str(int(i)) for i in ids]
    keys = ffn_keys(model, *neuron)
    steps: dict[str, KeyScores] = {}
    steps["positions"] = source_position_scores(model, ids, hl, keys)
    p = _argmax(steps["positions"])
    steps["heads"] = head_scores(model, ids, hl, keys, source_position=p)
    order = steps["heads"].total().abs().argsort(descending=True).tolist()
    row = {"case": prompt, "neuron": f"{neuron[0]}_{neuron[1]}", "source position": p,
           "source token": strs[p], "top head": f"{hl}_{order[0]}",
           "ablated head rank": order.index(h) + 1}  # fmt: skip
    hop = (hl, h, p)
    steps["components"] = component_scores(model, ids, keys, position=p, path=[hop])
    comps = steps["components"]
    attn = [i for i, r in enumerate(comps.rows) if r.startswith("A")]
    row |= {"top component": comps.rows[_argmax(comps)], "top attention component": None,
            "its source position": None, "its source token": None, "operand": None,
            "operand positions": sum(_is_operand(t) for t in strs[: p + 1]),
            "positions": p + 1}  # fmt: skip
    if not attn:
        return row, steps
    j_row = max(attn, key=lambda i: float(comps.total()[i].abs()))
    j = int(comps.rows[j_row][1:])
    steps["sources"] = source_position_scores(model, ids, j, keys, query_position=p, path=[hop])
    p2 = _argmax(steps["sources"])
    two = [(j, None, p2), hop]
    steps["two_hop"] = component_scores(model, ids, keys, position=p2, path=two)
    ffn = [i for i, r in enumerate(steps["two_hop"].rows) if r.startswith("F")]
    if ffn:
        f_row = max(ffn, key=lambda i: float(steps["two_hop"].total()[i].abs()))
        layer = int(steps["two_hop"].rows[f_row][1:])
        steps["neurons"] = neuron_scores(model, ids, keys, layer=layer, position=p2, path=two)
    row |= {"top attention component": f"A{j}", "its source position": p2,
            "its source token": strs[p2], "operand": _is_operand(strs[p2])}  # fmt: skip
    return row, steps


def _ranked(scores: KeyScores, k: int) -> pd.DataFrame:
    frame = scores.to_frame()
    order = np.argsort(-np.abs(frame["total"].to_numpy(dtype=float)), kind="stable")
    return frame.iloc[order[:k]]


_TRACE_PAPER = {
    "trace_positions": "layer 17 at '=': position 5 ('=') up 0.545, gate 0.085",
    "trace_heads": "head 22: up 0.4484, gate 0.2736; the next head under 0.01",
    "trace_components": "A15 0.121, A13 0.095, A14 0.053 (up)",
    "trace_sources": "layer 15 -> '=': p=2 ('3') up 0.063 gate 0.098; p=4 ('5') 0.070 / 0.006",
    "trace_two_hop": "F12 0.034 / 0.075, then F10, F14, F6",
    "trace_neurons": "12_4072: up 0.0236, gate 0.0550",
}


def trace_stage(
    model: Model,
    cases: ArithmeticDataset | None,
    cna: NeuronComparison | None,
    head: tuple[int, int],
    settings: ReproduceSettings,
) -> StageResult:
    """The feature-transfer trace (ARITH 4.2 step 2) into each case's top CNA neuron, for at
    most ``settings.trace_cases`` cases; the first case's steps as tables."""
    with stage("trace", f"Feature-transfer trace through head {head[0]}_{head[1]}", PAPER) as st:
        n_cases = len(cases) if cases is not None and cna is not None else 0
        n = n_cases if settings.trace_cases is None else min(n_cases, settings.trace_cases)
        why = unsupported(model) or ("" if n_cases else "no CNA case")
        if why or cases is None or cna is None:
            n = 0
            st.notes.append(f"Skipped: {why}")
        prompts = list(cases.prompts) if cases is not None else []
        rows, first = [], {}
        for i in range(n):
            assert cna is not None
            neuron = cna.top_sets(1)[i][0]
            row, steps = trace_case(model, prompts[i], neuron, head)
            rows.append(row)
            first = first or steps
        summary = pd.DataFrame(rows)
        st.tables["trace_cases"] = summary
        for name, scores in first.items():
            key = f"trace_{name}"
            table = _ranked(scores, 8)
            table[f"{paper.LLAMA} ('3+5=', 19_5769)"] = [
                _TRACE_PAPER[key] if r == 0 else "" for r in range(len(table))
            ]
            st.tables[key] = table
        if "positions" in first:
            st.figures["trace_heads"] = first["heads"].plot()
        _trace_claims(st, summary, model.cfg.n_heads, head, settings, why)
        st.notes.append(
            f"{n} cases, each traced into its top CNA neuron (descending CNA), ranking by "
            "|up + gate| (|in| without a gate). Steps: attention layer "
            f"{head[0]}'s output at the last position split by source position; the heads at "
            "the top source position; the components there read through the ablated head "
            "(residual-RMS scale at that position); the top attention component's source "
            "positions read through the same head; the two-hop transform of the components and "
            "of the neurons of the top FFN there. Tables: the first case "
            f"({prompts[0]!r})." if n else "No case traced."
        )  # fmt: skip
    return st.result()


def _trace_claims(
    st: StageBuilder, summary: pd.DataFrame, n_heads: int, head: tuple[int, int],
    s: ReproduceSettings, why: str = "",
) -> None:  # fmt: skip
    label = f"{head[0]}_{head[1]}"
    claim = (
        f"The ablated head carries the feature into the top CNA neuron's keys (test: {label} "
        f"ranks first among its layer's {n_heads} heads at the top source position in more "
        "than half of the cases; chance 1 in the number of heads)",
        "head 22 of layer 17: up 0.4484, gate 0.2736; every other head under 0.01 ('3+5=')",
    )
    if not len(summary):
        st.claim(*claim, why or "no CNA case", None)
    else:
        first = int((summary["ablated head rank"].to_numpy() == 1).sum())
        test = stats.binomial_test(first, len(summary), 0.5)
        st.claim(*claim, f"{label} first in {first} of {len(summary)} cases", test)
    claim2 = (
        "Two hops back, the feature comes from an operand (test: the top source position of "
        "the top attention component below the head, read through the head, is an operand "
        "token in more than half of the cases)",
        "layer 15 -> '=': the operands '3' (p=2) and '5' (p=4) ('3+5=')",
    )
    operand = summary["operand"].tolist() if len(summary) else []
    traced = np.array([o is not None for o in operand], dtype=bool)
    if not traced.any():
        st.claim(*claim2, why or "no attention layer below the head (or no case)", None)
        return
    hits = int(sum(bool(o) for o in operand if o is not None))
    share = summary["operand positions"].to_numpy(float) / summary["positions"].to_numpy(float)
    chance = float(share[traced].mean())
    test = stats.binomial_test(hits, int(traced.sum()), 0.5)
    st.claim(*claim2, f"an operand in {hits} of {int(traced.sum())} cases (chance about "
             f"{100 * chance:.0f}%: operand positions among those at or before the source)",
             test)  # fmt: skip
