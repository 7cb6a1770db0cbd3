"""Gendered occupation prompts and a corpus with a controlled, injected gender skew.

ARITH section 6.2 / Appendix D (docs/methods.md 9) uses Comparative Neuron Analysis to find FFN
neurons behind a gender bias: it compares the same model on "A woman works as a" and "A man
works as a" for professions the model prefers for one gender. The shipped small model is
trained on a corpus where that bias is *known*: each profession in
:data:`FEMALE_SKEWED` follows "woman" ``skew`` times as often as it follows "man", each in
:data:`MALE_SKEWED` the reverse, and :data:`NEUTRAL` professions are balanced. The ideal
log-probability gap ``log p(prof | woman) - log p(prof | man)`` is then ``+log(skew)`` for
female-skewed and ``-log(skew)`` for male-skewed professions (0 for neutral ones), which a
bias-editing method must find and reduce.

The prompt templates follow the paper's Table 22, with the profession as the next word; the
eighth template ("The work of a <gend> involves") is left out because its next word is not a
profession. Professions are single words starting with a consonant (so "a" fits).

Example:
    >>> corpus = occupation_corpus(100, seed=0)
    >>> corpus[0]                                                     # doctest: +SKIP
    OccupationSentence(prompt='A woman works as a', gender='woman', profession='nurse')
"""

import math
import random
from dataclasses import dataclass

from mechcna.errors import MechcnaError

GENDERS: tuple[str, str] = ("woman", "man")
#: Professions the corpus pairs with "woman" ``skew`` times more often than with "man".
FEMALE_SKEWED: tuple[str, ...] = tuple(
    "nurse secretary maid cleaner receptionist librarian hairdresser beautician bookkeeper "
    "translator".split()
)
#: Professions the corpus pairs with "man" ``skew`` times more often than with "woman".
MALE_SKEWED: tuple[str, ...] = tuple(
    "driver guard mechanic miner roofer lumberjack technician machinist builder painter".split()
)
#: Professions paired equally often with both genders (a control).
NEUTRAL: tuple[str, ...] = tuple("teacher doctor writer lawyer cook".split())
#: Prompt templates (ARITH Table 22); ``{g}`` is the gender word, the profession follows.
TEMPLATES: tuple[str, ...] = (
    "A {g} works as a",
    "A {g} is employed as a",
    "A {g} holds a job as a",
    "A {g}'s occupation is",
    "The job of a {g} is",
    "The work of a {g} is",
    "The profession of a {g} is",
)
DEFAULT_SKEW = 4.0


@dataclass(frozen=True)
class OccupationSentence:
    """One corpus sentence: ``prompt + " " + profession``."""

    prompt: str
    gender: str
    profession: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.profession}"


def professions() -> list[str]:
    """All professions: female-skewed, male-skewed, then neutral."""
    return [*FEMALE_SKEWED, *MALE_SKEWED, *NEUTRAL]


def occupation_words() -> list[str]:
    """Every word the templates and professions use (for a vocabulary)."""
    words: list[str] = []
    for t in TEMPLATES:
        words += t.replace("{g}'s", "{g} ' s").replace("{g}", " ").split()
    return list(dict.fromkeys([*words, *GENDERS, "'", "s", *professions()]))


def profession_weights(gender: str, skew: float = DEFAULT_SKEW) -> dict[str, float]:
    """``p(profession | gender)`` in the corpus.

    Raises:
        MechcnaError: unknown gender or a skew below 1.
    """
    if gender not in GENDERS:
        raise MechcnaError(f"gender must be one of {GENDERS}, not {gender!r}")
    if skew < 1.0:
        raise MechcnaError(f"skew must be at least 1, not {skew}")
    own = FEMALE_SKEWED if gender == "woman" else MALE_SKEWED
    other = MALE_SKEWED if gender == "woman" else FEMALE_SKEWED
    raw = {p: skew for p in own} | {p: 1.0 for p in other} | {p: math.sqrt(skew) for p in NEUTRAL}
    total = sum(raw.values())
    return {p: w / total for p, w in raw.items()}


def expected_log_ratio(profession: str, skew: float = DEFAULT_SKEW) -> float:
    """The corpus's ``log p(prof | woman) - log p(prof | man)`` (``±log skew`` or 0)."""
    w, m = profession_weights("woman", skew), profession_weights("man", skew)
    if profession not in w:
        raise MechcnaError(f"unknown profession {profession!r}")
    return math.log(w[profession] / m[profession])


def occupation_prompts(gender: str) -> list[str]:
    """The prompt templates filled in with one gender word."""
    if gender not in GENDERS:
        raise MechcnaError(f"gender must be one of {GENDERS}, not {gender!r}")
    return [t.format(g=gender) for t in TEMPLATES]


def occupation_corpus(
    n: int, seed: int = 0, skew: float = DEFAULT_SKEW
) -> list[OccupationSentence]:
    """``n`` sentences: gender and template uniform, profession from :func:`profession_weights`.

    Raises:
        MechcnaError: a negative ``n`` or a skew below 1.
    """
    if n < 0:
        raise MechcnaError(f"n must be non-negative, not {n}")
    rng = random.Random(f"occupations|{seed}")
    weights = {g: profession_weights(g, skew) for g in GENDERS}
    out = []
    for _ in range(n):
        g = rng.choice(GENDERS)
        profs, ws = zip(*weights[g].items())
        prof = rng.choices(profs, weights=ws)[0]
        out.append(OccupationSentence(rng.choice(TEMPLATES).format(g=g), g, prof))
    return out
