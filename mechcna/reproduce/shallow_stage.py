"""The arithmetic paper's shallow-neuron stage: operands read as number concepts after
attention (ARITH Table 7) and the zero-shot search for hidden-interpretable shallow FFN
neurons with its masking test against random sets (ARITH Table 8), with their claims.
"""

from dataclasses import replace

import numpy as np
import pandas as pd

from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.analyses.shallow import (
    PRUNED_CONCEPTS,
    ZeroShotSearch,
    hidden_interpretable_searches,
)
from mechcna.analyses.transfer import transform_through_attention
from mechcna.engine.projection import top_tokens
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import Intervention
from mechcna.models.backend import Model
from mechcna.reproduce import claim_tests as ct
from mechcna.reproduce import paper, stats
from mechcna.reproduce.arithmetic import PAPER
from mechcna.reproduce.core import ReproduceSettings, StageBuilder, StageResult, stage
from mechcna.tasks.arithmetic import ArithmeticDataset

# --------------------------------------------------------------------------- 4. shallow
OPERANDS = tuple("0123456789")


def operand_tokens_table(
    model: Model, head_layer: int, readers: list[int] | None = None
) -> tuple[pd.DataFrame, dict[int, dict[str, tuple[int, int]]]]:
    """Table 7: number concepts among the top-10 tokens of each one-token operand 0-9, directly
    and after each attention layer below the head (full-layer VO, scale 1).

    Counted: number words and numerals (:func:`claim_tests.number_concepts`) other than the
    operand's own token (with tied embeddings the operand is its own top token at every
    layer). Returns one row per reader layer (the operands "3" and "5" spelled out) and
    ``{layer: {operand: (before, after)}}``.
    """
    concepts = ct.number_concepts()
    readers = list(range(head_layer)) if readers is None else readers
    counts: dict[int, dict[str, tuple[int, int]]] = {l: {} for l in readers}
    words: dict[tuple[int, str], tuple[str, str]] = {}
    for tok in OPERANDS:
        for l in readers:
            try:
                comp = transform_through_attention(model, tok, path=[(l, None, None)]).tokens(10)
            except MechcnaError:
                break  # not a single token for this tokenizer
            orig = [x for x, _ in comp.tokens[0].top]
            moved = [x for x, _ in comp.tokens[1].top]
            counts[l][tok] = (ct.operand_concepts(orig, tok, concepts),
                              ct.operand_concepts(moved, tok, concepts))  # fmt: skip
            if tok in ("3", "5"):
                words[(l, tok)] = (", ".join(orig), ", ".join(moved))
    rows = []
    for l in readers:
        if not counts[l]:
            continue
        row: dict = {"reader layer": l, "operands": len(counts[l]),
                     "concepts before (sum)": sum(b for b, _ in counts[l].values()),
                     "concepts after (sum)": sum(a for _, a in counts[l].values())}  # fmt: skip
        for tok in ("3", "5"):
            if (l, tok) in words:
                row[f"'{tok}' original"], row[f"'{tok}' through"] = words[(l, tok)]
        row[f"{paper.LLAMA} ('3' through layer 15 for head 17_22)"] = (
            paper.OPERAND_TOKENS["3"] if l == readers[-1] else ""
        )
        rows.append(row)
    return pd.DataFrame(rows), counts


def _searches(
    model: Model, layer: int, settings: ReproduceSettings
) -> dict[str, tuple[ZeroShotSearch, int, tuple[int, ...]]]:
    """The zero-shot search below ``layer`` for each concept list of
    ``settings.zero_shot_concepts`` (``"all"``: the default list; ``"pruned"``: without common
    English words, :data:`~mechcna.analyses.shallow.COMMON_WORDS`), in one pass: ``{list:
    (search, pool size, thresholds)}``, the thresholds chosen per list unless set."""
    big = model.cfg.d_vocab >= 1000
    top = settings.zero_shot_top or (50 if big else 10)
    n_read = settings.zero_shot_readers
    first = 0 if n_read is None else max(0, layer + 1 - n_read)
    readers = settings.zero_shot_layers or tuple(range(first, layer + 1))
    which = settings.zero_shot_concepts
    lists = {"all": None, "pruned": PRUNED_CONCEPTS}
    names = ["all", "pruned"] if which == "both" else [which]
    if any(n not in lists for n in names):
        raise MechcnaError(f"zero_shot_concepts must be all, pruned or both, not {which!r}")
    found = hidden_interpretable_searches(
        model, {n: lists[n] for n in names}, neuron_layers=range(layer), attention_layers=readers,
        top=top, thresholds=settings.thresholds or (),
    )  # fmt: skip
    pool = len(range(layer)) * int(model.cfg.d_mlp or 0)
    out = {}
    for name, search in found.items():
        if settings.thresholds is None:
            searched = search.counts[search.counts >= 0].numpy()
            ms = ct.auto_thresholds(searched, pool, settings.zero_shot_share, top=top)
            search = replace(search, thresholds=ms)
        out[name] = (search, pool, search.thresholds)
    return out


def _search(
    model: Model, layer: int, settings: ReproduceSettings
) -> tuple[ZeroShotSearch, int, tuple[int, ...]]:
    """The first concept list's search of :func:`_searches`."""
    return next(iter(_searches(model, layer, settings).values()))


def zero_shot_table(
    model: Model,
    cases: ArithmeticDataset,
    layer: int,
    settings: ReproduceSettings,
    searched: tuple[ZeroShotSearch, int, tuple[int, ...]] | None = None,
) -> tuple[pd.DataFrame, ZeroShotSearch, dict]:
    """Table 8: the zero-shot search below ``layer`` (``searched``, or :func:`_search`) and its
    masking test on ``cases``.

    One row per ``M`` (``settings.thresholds``, or by default the smallest ``M`` whose set is
    at most ``zero_shot_share`` of the pool and the next two, so both readings ``>= M`` and
    ``> M`` appear): the set size and share of the pool, the chance rate of a random
    direction reaching ``M`` concepts, the accuracy decrease when the set is zeroed and the
    decrease of ``random_draws`` equally large random sets of the same layers (mean and
    range). The third value holds the per-case correctness (``base``, ``found[M]``,
    ``random[M]`` as ``[draw, case]``) for the claim.
    """
    import random as _random

    from mechcna.interventions.edits import NeuronEdit

    search, pool, thresholds = searched or _search(model, layer, settings)
    d_mlp = int(model.cfg.d_mlp or 0)
    pool_neurons = [(l, j) for l in search.neuron_layers for j in range(d_mlp)]
    n_readers = len(search.attention_layers)

    def correct(neurons: list[tuple[int, int]]) -> np.ndarray:
        ivs: list[Intervention] = [NeuronEdit(neurons)] if neurons else []
        return evaluate_accuracy(model, cases, ivs, progress=False).correct.double().numpy()

    base = correct([])
    per_case: dict = {"base": base, "found": {}, "random": {}}
    rows = []
    for m in thresholds:
        neurons = search.neurons(m)
        found = correct(neurons)
        draws = []
        for d in range(settings.random_draws):
            rng = _random.Random(settings.seed + 1000 * d + m)
            draws.append(correct(rng.sample(pool_neurons, len(neurons))))
        per_case["found"][m], per_case["random"][m] = found, np.array(draws)
        rand = [stats.relative_decrease(base, r) for r in draws]
        rows.append({
            "M (count >= M)": m, "same set read as count > M": m - 1,
            "n_neurons": len(neurons), "share of pool %": 100 * len(neurons) / max(pool, 1),
            "chance rate %": 100 * ct.chance_rate(int(model.cfg.d_vocab), len(search.concept_ids),
                                                  search.top, m, n_readers),
            "accuracy %": 100 * float(found.mean()),
            "relative_decrease": stats.relative_decrease(base, found),
            "random_relative_decrease": float(np.mean(rand)),
            "random min": float(np.min(rand)), "random max": float(np.max(rand)),
            "selects everything": len(neurons) == pool,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    table[f"{paper.LLAMA} neurons / decrease % (M as printed)"] = [
        "{} / {}".format(*paper.ZERO_SHOT[m]) if model.cfg.d_vocab >= 1000 and m in paper.ZERO_SHOT
        else "" for m in table["M (count >= M)"]
    ]  # fmt: skip
    return table, search, per_case


def hidden_neuron_rows(model: Model, search: ZeroShotSearch, k: int = 5) -> pd.DataFrame:
    """Table 7's neuron rows: the searched shallow neurons with the most concepts after their
    best attention layer whose direct projection (no attention) is not interpretable (at most
    one concept among its top-10 tokens), with both token lists."""
    concept_ids = set(search.concept_ids)
    ranked = search.top_neurons(max(50, k))
    rows = []
    cols = zip(ranked["layer"].tolist(), ranked["neuron"].tolist(),
               ranked["best_attention_layer"].tolist(), strict=True)  # fmt: skip
    for l, j, reader in cols:
        if reader < 0:
            continue
        direct = top_tokens(model, (l, j), 10).top
        n_direct = sum(model.to_single_token(t) in concept_ids for t, _ in direct)
        if n_direct > 1:
            continue
        comp = transform_through_attention(model, (l, j), path=[(reader, None, None)]).tokens(10)
        moved = comp.tokens[1].top
        rows.append({
            "neuron": f"{l}_{j}", "attention layer": reader,
            "concepts direct": n_direct,
            "concepts through attention": sum(
                model.to_single_token(t) in concept_ids for t, _ in moved),
            "direct top-10": ", ".join(t for t, _ in direct),
            "through attention top-10": ", ".join(t for t, _ in moved),
        })  # fmt: skip
        if len(rows) == k:
            break
    table = pd.DataFrame(rows)
    if len(table):
        table[f"{paper.LLAMA} (Table 7 neuron rows)"] = [
            "shallow neurons uninterpretable directly, number concepts through layer 15" if i == 0
            else "" for i in range(len(table))
        ]  # fmt: skip
    return table


def shallow_stage(
    model: Model,
    cases: ArithmeticDataset,
    head: tuple[int, int],
    settings: ReproduceSettings,
) -> StageResult:
    """Operand tokens through attention (Table 7) and the zero-shot search (Table 8) below
    ``head`` (the reproduction passes the top head above layer 0, as Table 8 needs layers
    below the head)."""
    layer = head[0]
    with stage("shallow", "Hidden-interpretable shallow neurons (Tables 7-8)", PAPER) as st:
        t7, counts = operand_tokens_table(model, layer)
        st.tables["table7"] = t7
        _operand_claim(st, layer, counts, settings)
        if layer > 0 and len(cases):
            for name, searched in _searches(model, layer, settings).items():
                _zero_shot_part(st, model, cases, layer, settings, name, searched)
        else:
            st.notes.append("Zero-shot search skipped: no layer below the head, or no case.")
    return st.result()


#: How each concept list is named in table keys, claims and notes.
_LISTS = {
    "all": ("", "the default concept list"),
    "pruned": ("_pruned", "the concept list without common English words (COMMON_WORDS)"),
}


def _zero_shot_part(
    st: StageBuilder,
    model: Model,
    cases: ArithmeticDataset,
    layer: int,
    settings: ReproduceSettings,
    name: str,
    searched: tuple[ZeroShotSearch, int, tuple[int, ...]],
) -> None:
    """Table 8, its neuron rows, figure, claim and note for one concept list."""
    suffix, words = _LISTS[name]
    t8, search, per_case = zero_shot_table(model, cases, layer, settings, searched)
    t8.insert(0, "concepts", f"{name} ({len(search.concept_ids)} tokens)")
    st.tables[f"table8{suffix}"] = t8
    st.tables[f"table7_neurons{suffix}"] = hidden_neuron_rows(model, search)
    st.figures[f"zero_shot{suffix}"] = search.plot()
    st.data[f"zero_shot{suffix}"] = per_case
    pool = searched[1]
    _zero_shot_claim(st, t8, per_case, pool, settings, "" if not suffix else words)
    everything = t8.loc[t8["selects everything"], "M (count >= M)"].tolist()
    st.notes.append(
        f"Table 8 with {words}: neurons of layers 0-{layer - 1} through attention layers "
        f"{list(search.attention_layers)} (full-layer VO, scale 1), top-{search.top} "
        f"tokens, {len(search.concept_ids)} concept tokens, M in "
        f"{list(search.thresholds)} (chosen so the sets are a few percent of the "
        f"{pool}-neuron pool unless set); accuracy over the {len(cases)} CNA cases; "
        f"{settings.random_draws} random sets per M. 'chance rate' is the probability "
        "that a random direction reaches M concepts through at least one reader."
        + (f" The search selects every neuron for M in {everything}: found and random "
           "are then the same set." if everything else "")
    )  # fmt: skip


def _operand_claim(st: StageBuilder, layer: int, counts: dict, settings: ReproduceSettings) -> None:
    measured = {l: c for l, c in counts.items() if c}
    if not measured:
        st.claim("Attention turns operand embeddings into number concepts",
                 "'3' -> three, Three, triple, 3 (Table 7)",
                 "no operand is a single token, or no layer below the head", None)  # fmt: skip
        return
    # the paper read head 17_22's operands through attention layer 15: two layers below
    reader = max(l for l in measured if l <= max(layer - 2, min(measured)))
    pairs = np.array(list(measured[reader].values()), dtype=np.float64)
    test = stats.bootstrap_test(np.mean, pairs[:, 1], threshold=1.0, seed=settings.seed)
    others = "; ".join(
        f"L{l}: {sum(b for b, _ in c.values())} -> {sum(a for _, a in c.values())}"
        for l, c in measured.items()
    )
    st.claim(
        "Attention turns operand embeddings into number concepts (test: on average more than "
        "one number word or numeral other than the operand itself among the top-10 tokens "
        f"after attention layer {reader}, over operands 0-9; the paper read head 17_22's "
        "operands through layer 15, two below it. The count before attention is shown but is "
        "no baseline with tied embeddings, where an operand's own top tokens are numerals)",
        "'3' -> three, Three, triple (3 besides '3'); '5' -> Fif, XV, fif (Table 7)",
        f"layer {reader}: {int(pairs[:, 1].sum())} concepts in {len(pairs)} operands' top-10 "
        f"after ({int(pairs[:, 0].sum())} before; every layer below the head, before -> after: "
        f"{others})",
        test,
    )


def _zero_shot_claim(
    st: StageBuilder,
    t8: pd.DataFrame,
    per_case: dict,
    pool: int,
    settings: ReproduceSettings,
    concepts: str = "",
) -> None:
    """The Table 8 claim; ``concepts`` names a concept list other than the default one."""
    which = f" (found with {concepts})" if concepts else ""
    tested = t8[(t8["n_neurons"] > 0) & (t8["n_neurons"] < pool)]
    if not len(tested):
        why = "every set is empty or selects every searched neuron"
        st.claim(f"Zeroing the hidden-interpretable shallow neurons{which} hurts more than "
                 "zeroing an equally large random set", f"M=2: 1,953 neurons -53.9% vs random "
                 f"-{paper.ZERO_SHOT_RANDOM}% (Table 8)", why, None)  # fmt: skip
        return
    row = tested.iloc[0]
    m = int(row["M (count >= M)"])
    base, found = per_case["base"], per_case["found"][m]
    rand = per_case["random"][m].mean(0)

    def margin(b: np.ndarray, f: np.ndarray, r: np.ndarray) -> float:
        return stats.relative_decrease(b, f) - stats.relative_decrease(b, r)

    test = stats.bootstrap_test(margin, base, found, rand, threshold=0.0, seed=settings.seed)
    ours = "; ".join(
        f"M={r['M (count >= M)']}: {r['n_neurons']} neurons ({r['share of pool %']:.1f}% of "
        f"the pool, chance {r['chance rate %']:.1f}%) {r['relative_decrease']:.1f}% vs random "
        f"{r['random_relative_decrease']:.1f}% ({r['random min']:.1f} to {r['random max']:.1f})"
        for _, r in tested.iterrows()
    )
    st.claim(
        f"Zeroing the hidden-interpretable shallow neurons{which} hurts more than zeroing an "
        f"equally large random set (test: M={m}, the first set at most a few percent of the pool; "
        "estimate = found minus mean random decrease, in points)",
        f"M=2: 1,953 neurons (1.1% of the pool) -53.9% vs random -{paper.ZERO_SHOT_RANDOM}% "
        "(Table 8)",
        ours,
        test,
    )
