"""The claim tables of several reproduce records side by side (two models, two families: which
claims hold on both).

A record is a :class:`~mechcna.reproduce.core.Reproduction`, its claims frame, a run folder
written by ``mechcna reproduce --out DIR`` (its ``table-01-claims.csv``), that CSV itself, or a
markdown record (``reproduce.md``, e.g. the ones in ``docs/reproduce/``: the table under
``## Claims``). Claims are matched by paper and title, the claim's text before ``" (test"``
(the test's wording names model-specific layers and thresholds), and by order among claims of
the same title (a claim tested on two metrics or paths appears twice, in the same order in every
record; the division head that appendix B's claims name, which each model chooses, is left out
of the title). Nothing is recomputed: each cell is the record's own estimate, interval, ``n`` and
verdict.

Example:
    >>> cmp = compare_claims(["docs/reproduce/smollm2-135m-quick.md",
    ...                       "docs/reproduce/gemma-3-270m-quick.md"],
    ...                      names=["SmolLM2-135M", "Gemma 3 270M"])   # doctest: +SKIP
    >>> cmp.summary()                                                 # doctest: +SKIP
    >>> cmp.plot()                                                    # doctest: +SKIP
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mechcna.errors import MechcnaError
from mechcna.reproduce.core import Reproduction, markdown_table

#: verdicts in the order of the figure's colour scale
VERDICTS = ("holds", "inconclusive", "not measured", "does not hold")


class RecordError(MechcnaError):
    """A record that cannot be read as a claim table."""


Record = Reproduction | pd.DataFrame | str | Path


def _unescape(cell: str) -> str:
    return cell.strip().replace("\\|", "|")


def _markdown_claims(text: str, where: str) -> pd.DataFrame:
    lines = text.splitlines()
    try:
        start = next(i for i, s in enumerate(lines) if s.strip() == "## Claims")
    except StopIteration:
        raise RecordError(f"{where} has no '## Claims' section: not a reproduce record") from None
    head = next((i for i in range(start, len(lines)) if lines[i].startswith("| paper |")), None)
    if head is None:
        raise RecordError(f"{where}: no claim table under '## Claims'")
    columns = [_unescape(c) for c in re.split(r"(?<!\\)\|", lines[head].strip())[1:-1]]
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = [_unescape(c) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != len(columns):
            raise RecordError(f"{where}: a claim row has {len(cells)} cells, not {len(columns)}")
        rows.append(cells)
    frame = pd.DataFrame(rows, columns=columns)
    for c in ("n", "estimate", "lo", "hi"):
        if c in frame:
            frame[c] = pd.to_numeric(frame[c].replace("", None), errors="coerce")
    return frame


def read_claims(record: Record) -> pd.DataFrame:
    """The claims frame of one record (see the module docstring for what a record is).

    Raises:
        RecordError: a path that does not exist or holds no claim table, or a frame without
            the claim columns.
    """
    if isinstance(record, Reproduction):
        frame = record.claims_frame()
    elif isinstance(record, pd.DataFrame):
        frame = record
    else:
        path = Path(record).expanduser()
        if path.is_dir():
            path = path / "table-01-claims.csv"
        if not path.is_file():
            raise RecordError(f"{record}: no such record (a run folder, a claims CSV or a .md)")
        if path.suffix == ".md":
            frame = _markdown_claims(path.read_text(encoding="utf-8"), str(path))
        else:
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in ("paper", "claim", "verdict") if c not in frame.columns]
    if missing:
        raise RecordError(f"{record}: the claim table has no column {', '.join(missing)}")
    return frame


Key = tuple[str, str, int]

#: the model's own division head in a claim's title (``Division head 7_1 (appendix B): ...``)
_DIVISION_HEAD = re.compile(r"^(Division head) \d+_\d+ (\(appendix B\))")


def _entries(frame: pd.DataFrame, form: str | None) -> dict[Key, tuple[str, str]]:
    """``(paper, title, k) -> (cell, verdict)`` in the record's order (see the module
    docstring for the title and ``k``)."""
    out: dict[Key, tuple[str, str]] = {}
    seen: dict[tuple[str, str], int] = {}
    for row in frame.to_dict("records"):
        title = re.split(r" \(test[:,]", str(row["claim"]), maxsplit=1)[0].strip()
        if form is not None:  # a run of both prompt forms tags each arithmetic claim
            title = title.replace(f"[{form} prompts] ", "")
        # appendix B's claims name the division head each model chose
        title = _DIVISION_HEAD.sub(r"\1 \2", title)
        paper = str(row["paper"])
        k = seen.get((paper, title), 0)
        seen[(paper, title)] = k + 1
        out[(paper, title, k)] = (_cell(row), str(row["verdict"]))
    return out


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


def _cell(row: dict[str, Any]) -> str:
    n, est = _number(row.get("n")), _number(row.get("estimate"))
    lo, hi = _number(row.get("lo")), _number(row.get("hi"))
    count = 0 if n is None else int(n)
    if est is None:
        return f"(n={count}): {row['verdict']}"
    interval = "" if lo is None or hi is None else f" [{lo:.4g}, {hi:.4g}]"
    return f"{est:.4g}{interval} (n={count}): {row['verdict']}"


@dataclass(frozen=True)
class ClaimComparison:
    """Claims matched across records: ``frame`` has one row per claim found in every record
    (``paper``, ``claim``, then per record its cell, then per record its verdict, then
    ``same verdict``); ``unmatched`` lists the claims some record lacks and which have it."""

    names: tuple[str, ...]
    frame: pd.DataFrame
    unmatched: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def _verdicts(self) -> list[list[str]]:
        cols = [f"{n} verdict" for n in self.names]
        return [[str(r[c]) for c in cols] for r in self.frame.to_dict("records")]

    def summary(self) -> pd.DataFrame:
        """Counts: claims compared, with the same verdict, holding in every record, failing in
        every record, holding in one but failing in another, missing from some record, and
        per record its verdicts over the compared claims."""
        vs = self._verdicts()
        counts = [
            ("claims in every record", len(vs)),
            ("same verdict in every record", sum(len(set(v)) == 1 for v in vs)),
            ("holds in every record", sum(all(x == "holds" for x in v) for v in vs)),
            ("does not hold in every record",
             sum(all(x == "does not hold" for x in v) for v in vs)),
            ("holds in one, does not hold in another",
             sum("holds" in v and "does not hold" in v for v in vs)),
            ("claims missing from some record", len(self.unmatched)),
        ]  # fmt: skip
        for i, n in enumerate(self.names):
            counts += [(f"{n}: {w}", sum(v[i] == w for v in vs)) for w in VERDICTS]
        return pd.DataFrame(counts, columns=["what", "count"])

    def to_markdown(self) -> str:
        """The side-by-side table (cells: estimate [interval] (n): verdict)."""
        rows = [[r["paper"], r["claim"], *[r[n] for n in self.names],
                 "yes" if r["same verdict"] else "**no**"]
                for r in self.frame.to_dict("records")]  # fmt: skip
        return markdown_table(pd.DataFrame(rows, columns=["paper", "claim", *self.names,
                                                          "same verdict"]))  # fmt: skip

    def plot(self) -> go.Figure:
        """A verdict map: one row per compared claim, one column per record."""
        code = {v: i for i, v in enumerate(VERDICTS)}
        vs = self._verdicts()
        z = [[code.get(x, 2) for x in v] for v in vs]
        records = self.frame.to_dict("records")
        labels = [
            f"{i + 1}. {r['paper'][:5]}. {str(r['claim'])[:70]}" for i, r in enumerate(records)
        ]
        colours = ["#2ca02c", "#bbbbbb", "#eeeeee", "#d62728"]
        scale = [[i / 3, c] for i, c in enumerate(colours)]
        fig = go.Figure(go.Heatmap(z=z, x=list(self.names), y=labels, text=vs,
                                   texttemplate="%{text}", zmin=0, zmax=3, colorscale=scale,
                                   showscale=False))  # fmt: skip
        fig.update_layout(title="Claim verdicts side by side", height=max(300, 22 * len(z) + 120),
                          yaxis={"autorange": "reversed"}, margin={"l": 420})  # fmt: skip
        return fig


def compare_claims(
    records: Sequence[Record], names: Sequence[str] | None = None, form: str | None = "zero-shot"
) -> ClaimComparison:
    """Match the claims of ``records`` (two or more) by paper, title and order; see the module
    docstring.

    Args:
        records: the records, each a run folder, claims CSV, markdown record, claims frame or
            :class:`~mechcna.reproduce.core.Reproduction`.
        names: a column name per record (default: the records as text).
        form: in a record of both arithmetic prompt forms (``--prompt-form both``), the claims
            of this form (``"[zero-shot prompts] ..."``) match the untagged claims of a record
            of one form (the presets' form is zero-shot); ``None`` matches tags as written.

    Raises:
        RecordError: fewer than two records, names that do not match them one to one, or a
            record that cannot be read.
    """
    if len(records) < 2:
        raise RecordError(f"compare at least two records, got {len(records)}")
    names = tuple(str(r) for r in records) if names is None else tuple(names)
    if len(names) != len(records) or len(set(names)) != len(names):
        raise RecordError(f"{len(names)} names for {len(records)} records (one distinct name each)")
    entries = [_entries(read_claims(r), form) for r in records]
    order = list(dict.fromkeys(k for e in entries for k in e))  # the first record's order first
    rows, missing = [], []
    for key in order:
        got = [e.get(key) for e in entries]
        paper, title, _ = key
        if all(g is not None for g in got):
            cells = [g[0] for g in got if g is not None]
            verdicts = [g[1] for g in got if g is not None]
            rows.append([paper, title, *cells, *verdicts, len(set(verdicts)) == 1])
        else:
            have = ", ".join(n for n, g in zip(names, got) if g is not None)
            missing.append([paper, title, have])
    columns = ["paper", "claim", *names, *[f"{n} verdict" for n in names], "same verdict"]
    return ClaimComparison(
        names,
        pd.DataFrame(rows, columns=columns),
        pd.DataFrame(missing, columns=["paper", "claim", "in"]),
    )
