"""Hidden-interpretable shallow FFN neurons: the zero-shot search and its masking test.

Yu & Ananiadou, *Interpreting Arithmetic Mechanism in Large Language Models through
Comparative Neuron Analysis* (EMNLP 2024), section 4.4 and Table 8; docs/methods.md section 8.3.
A shallow FFN neuron is *hidden-interpretable* when its value vector, moved by a later
attention layer (:func:`mechcna.analyses.transfer.vo_transform`, full-layer ``VO`` with the norm
scale
set to 1 and biases excluded), has at least ``M`` number or operation tokens among its top
tokens. :func:`concept_tokens` lists those tokens, :func:`hidden_interpretable_neurons` runs
the search for several ``M`` at once, and :func:`mask_experiment` zeroes each found set and an
equally large random set drawn from the same layers and compares accuracy.

Example:
    >>> search = hidden_interpretable_neurons(model, thresholds=()).selective()  # doctest: +SKIP
    >>> evaluate = lambda m, interventions: accuracy_under(m, interventions)  # doctest: +SKIP
    >>> mask_experiment(model, search, evaluate).to_frame()                # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH Table 8 (zero-shot hidden-interpretable shallow FFN
neurons and their masking test).
"""

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mechcna._types import Int, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.transfer import vo_transform
from mechcna.engine.projection import compute_dtype, linear_part
from mechcna.errors import InvalidOptionError, MechcnaError
from mechcna.interventions.edits import Intervention, NeuronEdit
from mechcna.models.backend import Model
from mechcna.models.inputs import positive_int
from mechcna.models.processing import WeightProcessing, get_processing, refuses_processing
from mechcna.models.view import architecture, per_call

_log = logging.getLogger(__name__)

DIGITS = tuple("0123456789")
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
    "ninety hundred thousand "
    "first second third fourth fifth sixth seventh eighth ninth tenth "
    "once twice triple double half quarter "
    "zéro deux trois quatre cinq sept huit neuf dix "
    "eins zwei drei vier fünf sechs sieben acht neun zehn "
    "uno tre quattro cinque sei sette otto nove dieci "
    "cero dos tres cuatro cinco seis siete ocho nueve diez "
    "〇 零 一 二 三 四 五 六 七 八 九 十 百 千"
).split()
# Not "I", "V", "X" (the pronoun and letters), nor "un", "due", "null" (common words in
# English or French text): on real vocabularies they would inflate every count.
ROMAN = tuple("II III IV VI VII VIII IX XI XII XV XX".split())
SCRIPTS = tuple("⁰¹²³⁴⁵⁶⁷⁸⁹₀₁₂₃₄₅₆₇₈₉½⅓¼⅔¾")
OPERATORS = tuple("+ - * / = × ÷ − ± %".split()) + tuple(
    "plus minus times sum difference product ratio divide divided divides multiply "
    "multiplied add added subtract subtracted equal equals total quotient".split()
)
#: The default concept list of :func:`concept_tokens` (our assumption: the paper gives none).
DEFAULT_CONCEPTS: tuple[str, ...] = DIGITS + tuple(NUMBER_WORDS) + ROMAN + SCRIPTS + OPERATORS
#: Concepts that are also common English words, frequent subword pieces or punctuation in a
#: sense that is not a number or an operation ("one" the pronoun, "second" the ordinal and the
#: unit, "times" as in "at times", "product", "total", "add"; "dos", "tre", "sei", "uno",
#: "dix", "sept", "otto" as English words, names and subwords; "-", "/", "*", "%" as prose
#: and code punctuation). A random direction's top tokens hold these by chance far more often
#: than number words, which inflates the zero-shot counts (issue 21).
COMMON_WORDS: frozenset[str] = frozenset(
    "one first second once double half quarter times total product difference ratio sum add "
    "added equal equals dos tre sei uno dix sept otto - / * %".split()
)
#: :data:`DEFAULT_CONCEPTS` without :data:`COMMON_WORDS`.
PRUNED_CONCEPTS: tuple[str, ...] = tuple(
    c for c in DEFAULT_CONCEPTS if c.lower() not in COMMON_WORDS
)


@per_call
def concept_tokens(model: Model, concepts: Iterable[str] | None = None) -> dict[int, str]:
    """Token ids whose text is a number or operation concept.

    A token matches when its decoded text, stripped of surrounding whitespace (and of the
    ``▁``/``Ġ`` word markers), equals a concept **case-insensitively** (``" Three"`` matches
    ``three``), except concepts written in capitals of two or more letters (Roman numerals),
    which match exactly (``"IV"`` matches ``" IV"`` but not ``"iv"``). Concepts absent from
    the vocabulary are simply skipped.

    Args:
        concepts: the concept strings; default :data:`DEFAULT_CONCEPTS`: digits 0-9, number
            words and ordinals (English, French, German, Italian, Spanish, Chinese), Roman
            numerals, super/subscript digits and vulgar fractions, operator symbols and words
            (plus, minus, times, sum, difference, product, ratio, ...).

    Returns:
        ``{token_id: token_text}``.
    """
    if model.tokenizer is None:
        raise MechcnaError("concept_tokens needs a model with a tokenizer")
    given = [c.strip() for c in (DEFAULT_CONCEPTS if concepts is None else concepts)]
    exact = {c for c in given if len(c) > 1 and c.isalpha() and c.isupper()}
    folded = {c.lower() for c in given if c and c not in exact}
    ids = list(range(model.cfg.d_vocab_out))
    texts = model.tokenizer.batch_decode([[i] for i in ids])
    found = {}
    for i, text in zip(ids, texts):
        key = text.strip().strip("▁Ġ").strip()
        if key in exact or key.lower() in folded:
            found[i] = text
    return found


@dataclass(frozen=True)
class ZeroShotSearch:
    """Concept counts of shallow FFN neurons after attention transforms (docs/methods.md 8.3).

    Attributes:
        counts: ``[layer, neuron]`` concept tokens among the top-``top`` tokens of the neuron's
            transformed value vector (aggregated over attention layers); -1 where not searched.
        best_layer: ``[layer, neuron]`` the attention layer with the most concepts (-1 if none).
        neuron_layers, attention_layers: the layers searched and the transforming layers.
        concept_ids: the concept token ids.
        top: how many top tokens were inspected.
        thresholds: the values of ``M`` reported.
        aggregate: ``"max"`` or ``"union"`` over attention layers.
    """

    counts: Int[Tensor, "layer neuron"]
    best_layer: Int[Tensor, "layer neuron"]
    neuron_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    concept_ids: tuple[int, ...]
    top: int
    thresholds: tuple[int, ...]
    aggregate: str
    processing: WeightProcessing | None = None

    def neurons(self, m: int) -> list[tuple[int, int]]:
        """Searched neurons with at least ``m`` concepts (``m = 0``: every searched neuron)."""
        idx = torch.nonzero(self.counts >= m).tolist()
        return [(int(l), int(j)) for l, j in idx]

    @property
    def sets(self) -> dict[int, list[tuple[int, int]]]:
        """``{M: neurons}`` for every threshold."""
        return {m: self.neurons(m) for m in self.thresholds}

    @property
    def n_searched(self) -> int:
        """How many neurons were searched (the pool of the sets)."""
        return int((self.counts >= 0).sum())

    def selective(self, share: float = 0.05, extra: int = 2) -> "ZeroShotSearch":
        """The search with thresholds that select: the smallest ``M >= 1`` whose set is at most
        ``share`` of the searched neurons and the ``extra`` next ones (at most ``top``), by
        :func:`selective_thresholds`. On a small vocabulary the paper's M = 0-3 of the top
        50 select every neuron (no finding, and no random baseline)."""
        searched = self.counts[self.counts >= 0].numpy()
        ms = selective_thresholds(searched, self.n_searched, share, extra, self.top)
        out = replace(self, thresholds=ms)
        _warn_if_everything(out)
        return out

    def summary(self) -> pd.DataFrame:
        """One row per threshold: ``M``, the number of neurons, their share of the searched
        pool (%) and whether the set is the whole pool (then zeroing it and zeroing an equally
        large random set of the same layers are the same experiment)."""
        sizes = [len(self.neurons(m)) for m in self.thresholds]
        pool = self.n_searched
        return pd.DataFrame(
            {
                "M": list(self.thresholds),
                "n_neurons": sizes,
                "share of searched %": [100 * n / max(pool, 1) for n in sizes],
                "selects everything": [n == pool for n in sizes],
            }
        )

    def top_neurons(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` searched neurons with the most concepts."""
        frame = self.to_frame()
        return frame.sort_values("count", ascending=False, kind="stable").head(positive_int(k, "k"))

    def to_frame(self) -> pd.DataFrame:
        idx = torch.nonzero(self.counts >= 0)
        l, j = idx[:, 0], idx[:, 1]
        return pd.DataFrame(
            {
                "layer": l.tolist(),
                "neuron": j.tolist(),
                "count": self.counts[l, j].tolist(),
                "best_attention_layer": self.best_layer[l, j].tolist(),
            }
        )

    def plot(self) -> go.Figure:
        return plotting.zero_shot_lines(self)


def selective_thresholds(
    counts: Int[np.ndarray, " neuron"],
    pool: int,
    share: float = 0.05,
    extra: int = 2,
    top: int | None = None,
) -> tuple[int, ...]:
    """Thresholds ``M`` for the zero-shot search: the smallest ``M >= 1`` whose set
    (count ``>= M``) is at most ``share`` of the ``pool``, and the ``extra`` next ones (so
    both readings ``>= M`` and ``> M`` = ``>= M+1`` are shown), at most ``top``. Falls back
    to the largest count when no ``M`` is that selective."""
    counts = np.asarray(counts)
    most = max(int(counts.max()) if counts.size else 1, 1)
    m0 = next((m for m in range(1, most + 1) if (counts >= m).sum() <= share * pool), most)
    last = m0 + extra if top is None else min(m0 + extra, top)
    return tuple(range(m0, last + 1))


def _default_split(n_layers: int) -> tuple[list[int], list[int]]:
    half = max(n_layers // 2, 1)
    return list(range(half)), list(range(min(half + 1, n_layers)))


@per_call
@refuses_processing()
def hidden_interpretable_neurons(
    model: Model,
    *,
    neuron_layers: Iterable[int] | None = None,
    attention_layers: Iterable[int] | None = None,
    concepts: Iterable[str] | None = None,
    top: int = 50,
    thresholds: Sequence[int] = (0, 1, 2, 3),
    aggregate: Literal["max", "union"] = "max",
    chunk: int = 2048,
    progress: bool = False,
) -> ZeroShotSearch:
    """Zero-shot search for hidden-interpretable shallow FFN neurons (docs/methods.md 8.3).

    For every FFN neuron ``j`` of a layer ``i`` in ``neuron_layers`` and every attention layer
    ``l`` in ``attention_layers`` with ``l > i`` (only later layers can read what neuron ``j``
    writes), the neuron's raw value vector ``W_out[i][j]`` is sent through the full-layer
    ``VO_l(nrm_l(.))`` of docs/methods.md 8.1 (all heads, no attention weights, no biases) and
    projected with the final norm (no biases). The norm scales are positive scalars and do not
    change any ranking, so no prompt is needed (scale 1). Under sandwich norms (Gemma 2 and 3)
    the value vector and ``W_O`` carry the post-norm weights and the post-norm scales are
    left at 1 (positive scalars again); a final logit soft cap is monotone and changes no
    ranking either. The neuron's count is the number of
    concept tokens among the ``top`` tokens, aggregated over its attention layers by
    ``aggregate``: ``"max"`` (the best single layer, default) or ``"union"`` (distinct concept
    tokens over all layers).

    Defaults follow the paper's Llama-7B choice (neurons of layers 0-15, attention layers
    0-16 of 32): ``neuron_layers = 0 .. L/2 - 1``, ``attention_layers = 0 .. L/2``.

    ``M = 0`` keeps every searched neuron; the paper's Table 8 reports 51,980 of 176,128 for
    M = 0, which no reading we know reproduces (if the paper meant "more than M", our ``M+1``
    is its ``M``).

    Args:
        concepts: concept strings for :func:`concept_tokens` (default: its documented list).
        top: how many top tokens are inspected (50 in the paper).
        thresholds: the values of ``M`` to report.
        chunk: neurons per projection batch (memory: ``chunk x d_vocab`` floats).
        progress: show a progress bar over neuron layers.
    """
    return hidden_interpretable_searches(
        model, {"": concepts}, neuron_layers=neuron_layers, attention_layers=attention_layers,
        top=top, thresholds=thresholds, aggregate=aggregate, chunk=chunk, progress=progress,
    )[""]  # fmt: skip


@per_call
@refuses_processing()
def hidden_interpretable_searches(
    model: Model,
    concept_lists: Mapping[str, Iterable[str] | None],
    *,
    neuron_layers: Iterable[int] | None = None,
    attention_layers: Iterable[int] | None = None,
    top: int = 50,
    thresholds: Sequence[int] = (0, 1, 2, 3),
    aggregate: Literal["max", "union"] = "max",
    chunk: int = 2048,
    progress: bool = False,
) -> dict[str, ZeroShotSearch]:
    """:func:`hidden_interpretable_neurons` for several concept lists in one pass: each
    neuron's transformed vector is projected and ranked once, and its top tokens counted
    against every list (e.g. ``{"all": None, "pruned": PRUNED_CONCEPTS}``: the default list
    with and without :data:`COMMON_WORDS`). Returns one search per list, each equal to
    :func:`hidden_interpretable_neurons` with that list."""
    arch = architecture(model)
    default_n, default_a = _default_split(arch.n_layers)
    n_layers = sorted({arch.check_layer(l) for l in (neuron_layers or default_n)})
    a_layers = sorted({arch.check_layer(l) for l in (attention_layers or default_a)})
    if aggregate not in ("max", "union"):
        raise MechcnaError(f"aggregate must be 'max' or 'union', not {aggregate!r}")
    for m in thresholds:
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise InvalidOptionError(f"thresholds M are counts of tokens (0 or more), not {m!r}")
    if not 0 < top <= arch.d_vocab:
        raise MechcnaError(f"top must be in 1..{arch.d_vocab}, got {top}")
    if not concept_lists:
        raise MechcnaError("concept_lists is empty")
    names = list(concept_lists)
    ids = {k: sorted(concept_tokens(model, c)) for k, c in concept_lists.items()}
    is_concept = torch.zeros(len(names), arch.d_vocab, dtype=torch.bool, device=arch.device)
    for i, k in enumerate(names):
        is_concept[i, ids[k]] = True
    counts = torch.full((len(names), arch.n_layers, arch.d_mlp), -1, dtype=torch.long)
    best = torch.full((len(names), arch.n_layers, arch.d_mlp), -1, dtype=torch.long)
    dtype = compute_dtype(arch.dtype)
    with torch.no_grad():
        for i in tqdm(n_layers, desc="neuron layers", disable=not progress):
            readers = [l for l in a_layers if l > i]
            W_out = arch.W_out(i).detach().to(dtype)
            for start in range(0, arch.d_mlp, chunk):
                rows = W_out[start : start + chunk]
                stop = start + rows.shape[0]
                per_layer = torch.zeros(len(names), len(readers), rows.shape[0], dtype=torch.long)
                per_layer = per_layer.to(arch.device)
                union = None
                if aggregate == "union":
                    union = torch.zeros(len(names), rows.shape[0], arch.d_vocab, dtype=torch.bool)
                    union = union.to(arch.device)
                for r, l in enumerate(readers):
                    logits = linear_part(arch, vo_transform(model, rows, l))
                    top_ids = logits.topk(top, -1).indices
                    for c in range(len(names)):
                        hit = is_concept[c][top_ids]
                        per_layer[c, r] = hit.sum(-1)
                        if union is not None:
                            union[c].scatter_(1, top_ids, hit)
                for c in range(len(names)):
                    if not readers:
                        n = torch.zeros(rows.shape[0], dtype=torch.long)
                        b = torch.full_like(n, -1)
                    else:
                        best_count, arg = per_layer[c].max(0)
                        n = best_count if union is None else union[c].sum(-1)
                        b = torch.tensor(readers, device=arg.device)[arg]
                        b = torch.where(n > 0, b, -1)
                    counts[c, i, start:stop] = n.cpu()
                    best[c, i, start:stop] = b.cpu()
    out = {}
    for c, k in enumerate(names):
        out[k] = ZeroShotSearch(
            counts=counts[c].clone(),
            best_layer=best[c].clone(),
            neuron_layers=tuple(n_layers),
            attention_layers=tuple(a_layers),
            concept_ids=tuple(ids[k]),
            top=top,
            thresholds=tuple(int(m) for m in thresholds),
            aggregate=aggregate,
            processing=get_processing(model),
        )
        _warn_if_everything(out[k])
    return out


def _warn_if_everything(search: ZeroShotSearch) -> None:
    every = [m for m in search.thresholds if len(search.neurons(m)) == search.n_searched]
    if every and search.n_searched:
        _log.warning(
            "the zero-shot search selects every one of the %d searched neurons for M in %s "
            "(top-%d tokens, %d concept tokens): those sets are no finding, and a random set "
            "of the same size is the same set; use a larger M or fewer top tokens",
            search.n_searched, every, search.top, len(search.concept_ids),
        )  # fmt: skip


@dataclass(frozen=True)
class MaskExperiment:
    """Accuracy after zeroing each neuron set, with same-size random baselines (Table 8).

    ``decrease`` is in accuracy points (``base - masked``, accuracy as returned by
    ``evaluate``); ``relative_decrease`` is ``100 * decrease / base`` (the paper's
    "accuracy decrease" in %, our reading).
    """

    base_accuracy: float
    rows: tuple[dict, ...]
    processing: WeightProcessing | None = None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows))

    def top(self, k: int = 10) -> pd.DataFrame:
        k = positive_int(k, "k")
        return self.to_frame().sort_values("relative_decrease", ascending=False).head(k)

    def plot(self) -> go.Figure:
        return plotting.mask_bars(self)


Evaluate = Callable[[Model, list[Intervention]], float]


@per_call
def mask_experiment(
    model: Model,
    neuron_sets: "ZeroShotSearch | Mapping[int | str, Sequence[tuple[int, int]]]",
    evaluate: Evaluate,
    *,
    random_baseline: bool = True,
    pool_layers: Iterable[int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> MaskExperiment:
    """Zero each neuron set at every position and measure the accuracy drop (Table 8).

    Args:
        neuron_sets: a :class:`ZeroShotSearch` (its sets per ``M``) or ``{name: neurons}``.
        evaluate: ``(model, interventions) -> accuracy``; called once unmasked, once per set
            and once per random baseline (e.g. an arithmetic accuracy under the interventions).
        random_baseline: also zero a random set of the same size drawn from ``pool_layers``.
        pool_layers: layers of the random pool (default: the search's neuron layers, or every
            layer appearing in the sets).
        seed: seed of the random baselines.
    """
    arch = architecture(model)
    if isinstance(neuron_sets, ZeroShotSearch):
        sets = neuron_sets.sets
        default_pool = list(neuron_sets.neuron_layers)
    else:
        sets = {k: [tuple(n) for n in v] for k, v in neuron_sets.items()}
        default_pool = sorted({int(n[0]) for v in sets.values() for n in v})
    pool_l = sorted({arch.check_layer(l) for l in (pool_layers or default_pool)})
    pool = [(l, j) for l in pool_l for j in range(arch.d_mlp)]
    rng = random.Random(seed)
    base = float(evaluate(model, []))
    rows = []
    for name, neurons in tqdm(sets.items(), desc="neuron sets", disable=not progress):
        neurons = [arch.check_neuron(int(l), int(j)) for l, j in neurons]
        acc = float(evaluate(model, [NeuronEdit(neurons)])) if neurons else base
        row = {
            "set": name,
            "n_neurons": len(neurons),
            "accuracy": acc,
            "decrease": base - acc,
            "relative_decrease": 100 * (base - acc) / base if base else float("nan"),
        }
        if random_baseline:
            if len(neurons) > len(pool):
                raise MechcnaError(f"set {name!r} is larger than the random pool")
            drawn = rng.sample(pool, len(neurons))
            racc = float(evaluate(model, [NeuronEdit(drawn)])) if drawn else base
            everything = bool(neurons) and len(neurons) == len(pool)
            if everything:
                _log.warning("set %r is every neuron of the random pool: found and random are "
                             "the same set", name)  # fmt: skip
            row |= {
                "random_accuracy": racc,
                "random_decrease": base - racc,
                "random_relative_decrease": 100 * (base - racc) / base if base else float("nan"),
                "selects everything": everything,
            }
        rows.append(row)
    return MaskExperiment(base, tuple(rows), get_processing(model))
