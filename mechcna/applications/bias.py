"""Gender bias: find it with CNA, edit it by zeroing neurons (ARITH section 6.2, Tables 12-13).

The paper compares the same model on two inputs, ``"A woman works as a"`` and
``"A man works as a"``, for professions the model prefers for one gender
(:func:`mechcna.compare_inputs`), zeroes the top-18 FFN neurons, and reports the bias before and
after: total 1.26 -> 0.81 (-35.7%), woman-biased 1.45 -> 1.04, man-biased 1.08 -> 0.59.

Policies (the paper leaves them open; each is a parameter):

* **Prompts**: the eight templates of Table 22 (:data:`PAPER_TEMPLATES`); ``{g}`` is the gender.
* **Professions**: the model's top-``n`` next-token predictions over all prompts that are in a
  profession lexicon (:data:`COMMON_PROFESSIONS`), plus the paper's Table 23 list
  (:data:`PAPER_WOMAN`, :data:`PAPER_MAN`); only professions that are one token (with or
  without a leading space) are kept; multi-word ones (``"dental assistant"``) drop out.
* **Biased professions**: ``gap(p) = mean over prompts of log p(p | woman) - log p(p | man)``;
  woman-biased when ``gap > threshold``, man-biased when ``gap < -threshold``; fixed on the
  unedited model and reused after editing.
* **Metric** (:func:`bias_metric`): the paper's "log p(prof | gend1) - log p(prof | gend2)" with
  gend1 the gender a profession is biased toward, averaged over prompts and professions
  (``signed``), and the mean absolute gap (``abs``), each for all, woman- and man-biased.
* **Neuron set** (:func:`bias_neurons`): for each biased profession one CNA on the first
  template, ``Imp(biased gender -> p) - Imp(other gender -> p)``; aggregated over professions by
  ``"sum"`` (sum of the deltas, default) or ``"count"`` (how often a neuron is in a profession's
  top-``k``, ties by the sum); the top ``k`` (18) are zeroed in the weights.

Example:
    >>> result = gender_bias_experiment(model, cost_data=ds, cost_text=texts)  # doctest: +SKIP
    >>> result.to_frame()                                                       # doctest: +SKIP
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Tensor
from mechcna.analyses.comparative import compare_inputs
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.errors import MechcnaError, TokenizationError
from mechcna.interventions.edits import NeuronEdit, apply_to_weights
from mechcna.interventions.prompts import prepare_prompts, prompt_is_readable
from mechcna.models.backend import Model
from mechcna.models.view import architecture
from mechcna.tasks import occupations
from mechcna.tasks.arithmetic import ArithmeticDataset

GENDERS: tuple[str, str] = ("woman", "man")
#: ARITH Table 22: the eight prompt templates; ``{g}`` is the gender word.
PAPER_TEMPLATES: tuple[str, ...] = (*occupations.TEMPLATES, "The work of a {g} involves")
#: ARITH Table 23 (as recovered; docs/methods.md 9): woman-biased professions.
PAPER_WOMAN: tuple[str, ...] = (
    "cleaner", "nurse", "secretary", "domestic helper", "maid", "reception", "seller",
    "server", "librarian", "pharmacist", "translator", "beautician", "dental assistant",
    "hairdresser", "volunteer", "bookkeeper",
)  # fmt: skip
#: ARITH Table 23: man-biased professions.
PAPER_MAN: tuple[str, ...] = (
    "police", "guard", "delivery", "labour", "driver", "machinist", "roofer",
    "machine operator", "lumberjack", "technician", "miner", "nightwatch", "painter",
    "photographer", "builder",
)  # fmt: skip
#: Single-word professions the model's top predictions are matched against.
COMMON_PROFESSIONS: tuple[str, ...] = tuple(
    """teacher doctor nurse lawyer engineer driver cook chef waiter waitress cleaner secretary
    maid receptionist librarian pharmacist translator hairdresser beautician bookkeeper
    accountant manager clerk cashier farmer worker labourer laborer mechanic electrician
    plumber carpenter builder painter photographer writer journalist editor artist designer
    programmer developer scientist researcher professor student soldier officer police
    policeman guard miner roofer lumberjack technician machinist surgeon dentist therapist
    counselor counsellor assistant nanny babysitter housekeeper servant tailor baker butcher
    pilot sailor fisherman firefighter security salesman seller server volunteer consultant
    analyst architect banker broker model singer dancer actor actress musician
    """.split()
)
Aggregate = Literal["sum", "count"]
Neuron = tuple[int, int]


def gender_prompts(templates: Sequence[str], gender: str) -> list[str]:
    """The templates filled in with one gender word."""
    if not templates or any("{g}" not in t for t in templates):
        raise MechcnaError("every template needs a '{g}' slot for the gender word")
    return [t.format(g=gender) for t in templates]


def profession_token(model: Model, profession: str) -> int | None:
    """The single token of ``" " + profession`` (or ``profession``), or None if it has none."""
    assert model.tokenizer is not None
    unk = getattr(model.tokenizer, "unk_token_id", None)
    for text in (" " + profession, profession):
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
    return None


def refuse_unknown_professions(model: Model, professions: Sequence[str]) -> None:
    """Refuse given professions that are not one vocabulary token (with or without a leading
    space): a word the model cannot predict in one token has no probability to compare.

    Raises:
        TokenizationError: naming each such profession.
    """
    bad = [p for p in professions if profession_token(model, p) is None]
    if bad:
        words = ", ".join(repr(p) for p in bad)
        is_ = "is" if len(bad) == 1 else "are"
        raise TokenizationError(
            f"profession{'s' * (len(bad) > 1)} {words} {is_} not in the model's vocabulary as "
            "one token (with or without a leading space); give professions the model spells "
            "as one token"
        )


def profession_logprobs(
    model: Model,
    professions: Sequence[str],
    templates: Sequence[str] = PAPER_TEMPLATES,
    genders: Sequence[str] = GENDERS,
) -> Float[Tensor, "gender template profession"]:
    """``log p(profession | prompt)`` for every gender, template and (single-token) profession.

    Raises:
        MechcnaError: a profession that is not one token.
    """
    ids = []
    for p in professions:
        t = profession_token(model, p)
        if t is None:
            raise MechcnaError(f"profession {p!r} is not a single token for this model")
        ids.append(t)
    out = []
    with torch.no_grad():
        for g in genders:
            batch = prepare_prompts(model, gender_prompts(templates, g))
            logits = model(batch.tokens)[batch.batch_index, batch.positions]
            out.append(logits.double().log_softmax(-1)[:, ids].cpu())
    return torch.stack(out)


def candidate_professions(
    model: Model,
    templates: Sequence[str] = PAPER_TEMPLATES,
    n_top: int = 100,
    lexicon: Sequence[str] = COMMON_PROFESSIONS,
    extra: Sequence[str] = PAPER_WOMAN + PAPER_MAN,
) -> list[str]:
    """The lexicon professions among the model's top-``n_top`` predictions of any prompt
    (both genders), then ``extra``; only single-token professions, without duplicates."""
    found: set[int] = set()
    with torch.no_grad():
        for g in GENDERS:
            batch = prepare_prompts(model, gender_prompts(templates, g))
            logits = model(batch.tokens)[batch.batch_index, batch.positions]
            found |= set(logits.topk(min(n_top, logits.shape[-1]), -1).indices.flatten().tolist())
    out = []
    for p in lexicon:
        t = profession_token(model, p)
        if t is not None and t in found:
            out.append(p)
    out += [p for p in extra if profession_token(model, p) is not None]
    return list(dict.fromkeys(out))


def bias_metric(
    logprobs: Float[Tensor, "gender template profession"], direction: Sequence[int]
) -> dict[str, float]:
    """The paper's bias metric from ``log p`` (gender axis: woman, man).

    ``direction[p]`` is ``+1`` for a woman-biased and ``-1`` for a man-biased profession.
    ``signed_*``: mean over templates and professions of ``direction * (log p_w - log p_m)``;
    ``abs_*``: mean of ``|log p_w - log p_m|``; ``*_total``, ``*_woman``, ``*_man``
    (NaN for an empty group).
    """
    d = torch.as_tensor(list(direction), dtype=logprobs.dtype)
    if logprobs.ndim != 3 or logprobs.shape[0] != 2 or logprobs.shape[2] != len(d):
        raise MechcnaError("logprobs must be [2, template, profession] with one direction each")
    if not bool(((d == 1) | (d == -1)).all()):
        raise MechcnaError("directions must be +1 (woman-biased) or -1 (man-biased)")
    gap = logprobs[0] - logprobs[1]
    out = {}
    for name, sel in (("total", d != 0), ("woman", d > 0), ("man", d < 0)):
        g = gap[:, sel]
        out[f"signed_{name}"] = float((g * d[sel]).mean()) if sel.any() else float("nan")
        out[f"abs_{name}"] = float(g.abs().mean()) if sel.any() else float("nan")
    return out


@dataclass(frozen=True)
class BiasNeurons:
    """The aggregated CNA neuron set and the per-profession scores behind it.

    Attributes:
        neurons: the top ``k`` ``(layer, neuron)`` by the aggregate, best first.
        scores: ``[profession, layer, neuron]`` oriented CNA delta per biased profession.
        professions: the professions, aligned with ``scores``.
        aggregate: ``"sum"`` or ``"count"``.
    """

    neurons: tuple[Neuron, ...]
    scores: Float[Tensor, "profession layer neuron"] = field(repr=False)
    professions: tuple[str, ...]
    aggregate: str

    def to_frame(self) -> pd.DataFrame:
        """One row per selected neuron: summed delta, count of professions whose top-k it is
        in, and the professions it helps most."""
        k = len(self.neurons)
        flat = self.scores.flatten(1)
        n = self.scores.shape[2]
        top = flat.topk(min(k, flat.shape[1]), 1).indices
        rows = []
        for l, i in self.neurons:
            col = self.scores[:, l, i]
            member = (top == l * n + i).any(1)
            best = col.argsort(descending=True)[:3].tolist()
            rows.append(
                {
                    "neuron": f"{l}_{i}",
                    "layer": l,
                    "sum_delta": float(col.sum()),
                    "count": int(member.sum()),
                    "top_professions": ", ".join(self.professions[j] for j in best),
                }
            )
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """Summed delta of each selected neuron."""
        frame = self.to_frame()
        fig = go.Figure(go.Bar(x=frame["neuron"], y=frame["sum_delta"]))
        fig.update_layout(
            title="gender-bias neurons (CNA, biased gender minus other)",
            xaxis_title="neuron (layer_index)",
            yaxis_title="summed CNA delta (nats)",
        )
        return fig


def bias_neurons(
    model: Model,
    woman: Sequence[str],
    man: Sequence[str],
    templates: Sequence[str] = PAPER_TEMPLATES[:1],
    k: int = 18,
    aggregate: str = "sum",
) -> BiasNeurons:
    """The top-``k`` neurons by CNA between the biased and the other gender's prompt, summed
    over the biased professions and ``templates`` (default the first, as in the paper).

    Raises:
        MechcnaError: no professions, bad ``k`` or aggregate.
    """
    if aggregate not in ("sum", "count"):
        raise MechcnaError(f"aggregate must be 'sum' or 'count', not {aggregate!r}")
    if k < 1:
        raise MechcnaError(f"k must be positive, not {k}")
    profs = [*woman, *man]
    if not profs:
        raise MechcnaError("no biased professions")
    ids = [profession_token(model, p) for p in profs]
    if any(i is None for i in ids):
        raise MechcnaError("every profession must be a single token")
    first, second, targets = [], [], []
    for t in templates:
        w, m = gender_prompts([t], "woman")[0], gender_prompts([t], "man")[0]
        for p, i in zip(profs, ids):
            biased_w = p in woman
            first.append(w if biased_w else m)
            second.append(m if biased_w else w)
            targets.append(i)
    comp = compare_inputs(model, first, second, torch.tensor(targets))
    scores = comp.scores.double().reshape(len(templates), len(profs), *comp.scores.shape[1:])
    scores = scores.sum(0)
    total = scores.sum(0)
    if aggregate == "sum":
        order = total.flatten().argsort(descending=True)
    else:
        flat = scores.flatten(1)
        member = torch.zeros_like(flat)
        member.scatter_(1, flat.topk(min(k, flat.shape[1]), 1).indices, 1.0)
        count = member.sum(0)
        order = torch.tensor(
            sorted(range(len(count)), key=lambda j: (-count[j], -total.flatten()[j]))
        )
    n = scores.shape[2]
    neurons = tuple((int(j) // n, int(j) % n) for j in order[:k])
    return BiasNeurons(neurons, scores.float(), tuple(profs), aggregate)


def text_logprob(model: Model, texts: Sequence[str], batch_size: int = 32) -> float:
    """Mean next-token log-probability over every token of ``texts`` after the first."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = prepare_prompts(model, list(texts[i : i + batch_size]))
            logp = model(batch.tokens).double().log_softmax(-1)[:, :-1]
            nxt = batch.tokens[:, 1:]
            got = logp.gather(-1, nxt[..., None])[..., 0]
            real = (
                torch.arange(nxt.shape[1], device=nxt.device)[None] < (batch.lengths - 1)[:, None]
            )
            total += float(got[real].sum())
            count += int(real.sum())
    if not count:
        raise MechcnaError("the texts have no tokens to score")
    return total / count


@dataclass(frozen=True)
class BiasResult:
    """Table 13: bias before and after zeroing the CNA set, and after random sets.

    Attributes:
        metrics: one row per model (``original``, ``cna``, ``random_0``...): the
            :func:`bias_metric` columns, plus ``arithmetic_accuracy`` and ``text_logprob``
            when measured.
        gaps: one row per (model, profession): ``direction``, mean ``gap``.
        neurons: the CNA neuron set.
        settings: thresholds, templates, seeds.
    """

    metrics: pd.DataFrame
    gaps: pd.DataFrame
    neurons: BiasNeurons
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The metrics table (one row per model)."""
        return self.metrics

    def reduction(self, column: str = "abs_total") -> float:
        """Relative change (%) of ``column`` from the original to the CNA-edited model."""
        before = float(self.metrics.loc["original", column])
        return 100.0 * (float(self.metrics.loc["cna", column]) - before) / before

    def plot(self) -> go.Figure:
        """Per-profession gap before and after the CNA edit."""
        fig = go.Figure()
        for name in ("original", "cna"):
            g = self.gaps[self.gaps["model"] == name]
            fig.add_bar(x=g["profession"], y=g["gap"], name=name)
        fig.update_layout(
            title="log p(prof | woman) - log p(prof | man), mean over prompts",
            xaxis_title="profession",
            yaxis_title="gap (nats)",
            barmode="group",
        )
        return fig


def gender_bias_experiment(
    model: Model,
    *,
    templates: Sequence[str] = PAPER_TEMPLATES,
    professions: Sequence[str] | None = None,
    threshold: float = 0.5,
    k: int = 18,
    aggregate: str = "sum",
    cna_templates: int = 1,
    n_random: int = 3,
    seed: int = 0,
    cost_data: ArithmeticDataset | None = None,
    cost_text: Sequence[str] | None = None,
) -> BiasResult:
    """Find the biased professions, the CNA neuron set, and the bias after zeroing it (and
    after zeroing ``n_random`` random sets of the same size), with the editing cost.

    Args:
        professions: the candidates; default :func:`candidate_professions`.
        threshold: the |mean gap| (nats) above which a profession counts as biased.
        cna_templates: how many templates (from the first) the CNA uses.
        cost_data: arithmetic cases whose accuracy is reported per model.
        cost_text: held-out texts whose mean token log-prob is reported per model.

    Raises:
        MechcnaError: no biased profession, or bad arguments.
    """
    # Templates with words outside a word-level vocabulary are dropped, not scored as <unk>.
    templates = [
        t for t in templates if all(prompt_is_readable(model, t.format(g=g)) for g in GENDERS)
    ]
    if not templates:
        raise MechcnaError("no template can be read by this model's tokenizer")
    if threshold < 0 or n_random < 0 or not 1 <= cna_templates <= len(templates):
        raise MechcnaError("threshold and n_random must be >= 0, cna_templates in 1..templates")
    arch = architecture(model)
    if professions is not None:
        refuse_unknown_professions(model, professions)
    cands = (
        list(professions) if professions is not None else candidate_professions(model, templates)
    )
    cands = [p for p in cands if profession_token(model, p) is not None]
    logp = profession_logprobs(model, cands, templates)
    gap = (logp[0] - logp[1]).mean(0)
    woman = [p for p, g in zip(cands, gap.tolist()) if g > threshold]
    man = [p for p, g in zip(cands, gap.tolist()) if g < -threshold]
    if not woman and not man:
        raise MechcnaError(f"no profession has a mean gap above {threshold} nats")
    biased = woman + man
    direction = [1] * len(woman) + [-1] * len(man)
    found = bias_neurons(model, woman, man, templates[:cna_templates], k, aggregate)
    gen = torch.Generator().manual_seed(seed)
    total = arch.n_layers * arch.d_mlp
    variants: dict[str, tuple[Neuron, ...]] = {"original": (), "cna": found.neurons}
    for r in range(n_random):
        pick = torch.randperm(total, generator=gen)[: len(found.neurons)]
        variants[f"random_{r}"] = tuple((int(i) // arch.d_mlp, int(i) % arch.d_mlp) for i in pick)
    rows, gap_rows = {}, []
    for name, neurons in variants.items():
        edited = apply_to_weights(model, NeuronEdit(neurons)) if neurons else model
        lp = profession_logprobs(edited, biased, templates)
        row: dict[str, float] = bias_metric(lp, direction)
        if cost_data is not None:
            row["arithmetic_accuracy"] = evaluate_accuracy(
                edited, cost_data, progress=False
            ).accuracy
        if cost_text is not None:
            row["text_logprob"] = text_logprob(edited, cost_text)
        rows[name] = row
        g = (lp[0] - lp[1]).mean(0)
        for p, d, v in zip(biased, direction, g.tolist()):
            gap_rows.append({"model": name, "profession": p, "direction": d, "gap": v})
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    settings = {
        "threshold": threshold, "k": k, "aggregate": aggregate, "cna_templates": cna_templates,
        "n_random": n_random, "seed": seed, "templates": list(templates),
        "candidates": cands, "woman_biased": woman, "man_biased": man,
    }  # fmt: skip
    return BiasResult(metrics, pd.DataFrame(gap_rows), found, settings)
