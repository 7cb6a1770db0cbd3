"""The project's method references point at its own ``docs/methods.md``, at sections it has.

Every docstring, page caption, notebook and document cites methods as ``docs/methods.md N.M``
(or ``[methods.md](methods.md) section N`` inside ``docs/``); no file may cite a document the
repository does not contain, and every cited section must be a heading of ``docs/methods.md``.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "methods.md"
MISSING = "METHODS" + ".md"  # the old, absent reference file (split so this file is clean)
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[.\s]", re.M)
NUMBER = r"\d+(?:\.\d+)?"
CITE = re.compile(
    rf"methods\.md\)?\s+(?:sections?\s+)?({NUMBER}(?:(?:\s*(?:-|,|and)\s*){NUMBER})*)"
)


def project_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    keep = (".py", ".md", ".ipynb", ".html", ".toml", ".txt", ".cfg")
    return [ROOT / f for f in out if f.endswith(keep) and (ROOT / f).is_file()]


def sections() -> set[str]:
    return set(HEADING.findall(METHODS.read_text(encoding="utf-8")))


def cited(text: str) -> list[str]:
    """Every section number cited after ``methods.md``; a range ``a-b`` cites a, b and,
    for whole sections, everything between."""
    out: list[str] = []
    for m in CITE.finditer(text):
        for part in re.split(r"\s*(?:,|and)\s*", m.group(1)):
            ends = [e.strip() for e in part.split("-")]
            out += ends
            if len(ends) == 2 and "." not in ends[0] + ends[1]:
                out += [str(i) for i in range(int(ends[0]), int(ends[1]) + 1)]
    return out


def test_cited_parses_ranges_lists_and_sections():
    text = "docs/methods.md sections 3-5; [methods.md](methods.md) section 9 and "
    text += "docs/methods.md 8.1-8.2, 4.6 and 11."
    assert cited(text) == ["3", "5", "3", "4", "5", "9", "8.1", "8.2", "4.6", "11"]


def test_methods_page_has_numbered_sections():
    have = sections()
    assert {"3", "4", "4.4", "7.1", "9.3", "12"} <= have
    assert "4.7" not in have


def test_no_file_cites_the_missing_methods_file():
    offenders = [
        str(f.relative_to(ROOT)) for f in project_files() if MISSING in f.read_text("utf-8")
    ]
    assert offenders == []


def test_every_cited_section_exists():
    have = sections()
    missing = []
    n_cites = 0
    for f in project_files():
        for number in cited(f.read_text("utf-8")):
            n_cites += 1
            if number not in have:
                missing.append(f"{f.relative_to(ROOT)}: {number}")
    assert missing == []
    assert n_cites >= 50  # the docstrings, README, notebooks and docs all cite it
