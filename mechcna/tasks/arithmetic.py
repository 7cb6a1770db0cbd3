"""Arithmetic prompts and teacher-forced next-token cases (ARITH section 3, Table 14).

The arithmetic-heads paper evaluates a model on 1-, 2- and 3-digit additions, subtractions,
multiplications and divisions, each written in four prompt templates (docs/methods.md 6.2):

* ``+``: ``The sum of n1 and n2 is`` | ``Q: What is n1 plus n2? A:`` | ``n1 plus n2 is`` |
  ``n1+n2=``
* ``-``: ``The difference between n1 and n2 is`` | ``Q: What is n1 minus n2? A:`` |
  ``n1 minus n2 is`` | ``n1-n2=``
* ``*``: ``The product of n1 and n2 is`` | ``Q: What is n1 times n2? A:`` | ``n1 times n2 is`` |
  ``n1*n2=``
* ``/``: ``The ratio of n1 and n2 is`` | ``Q: What is n1 divides n2? A:`` | ``n1 divides n2 is`` |
  ``n1/n2=``

Accuracy is greedy next-token accuracy with teacher forcing: the full answer (most significant
digit first) is tokenised, and each answer token becomes one case, "prompt + answer tokens so
far -> next answer token" (``15+32=`` -> ``4`` and ``15+32=4`` -> ``7`` are two cases).

Cases are labelled *memorize* or *change-one* (ARITH Table 3). For ``+`` and ``-`` an answer
token is *change-one* when one of the answer columns it writes receives a carry (``+``) or a
borrow (``-``) from the column below, i.e. it needs "one more step" than a one-digit fact
(``15+37=52``: the ``5`` is ``1+3+1``, change-one; the ``2`` is the fact ``5+7``, memorize); a
leading minus sign is change-one. For ``*`` and ``/`` the paper's rule is used: the last
answer token is memorize, all others change-one.

Policies the paper leaves open are keyword arguments of :func:`arithmetic_dataset` (defaults
in brackets): non-negative subtraction [yes, ``n1 >= n2``], exact division [yes, integer
quotient, ``n1`` a multiple of ``n2``; otherwise the floor quotient], operands written as
English words [never; ``word_prob`` and ``word_slots``; only operands up to twenty have
words], both operands have ``digits`` digits (1-digit operands are 0..9, divisors are never
0), and the space before the answer in templates 1 to 3 [``"auto"``, see
:data:`LeadingSpace`].

Example:
    >>> ds = arithmetic_dataset(operations="+", digits=2, n_pairs=3, seed=0)
    >>> case = ds.filter(template=4)[0]
    >>> case.prompt, case.target, case.kind                       # doctest: +SKIP
    ('57+38=', '9', 'change-one')
    >>> ds.to_frame().groupby("template").size().tolist()          # doctest: +SKIP
    [6, 6, 6, 6]
"""

import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from mechcna.errors import MechcnaError, TokenizationError
from mechcna.models.backend import Model, is_model
from mechcna.models.tokenizer import word_level_tokenizer
from mechcna.tasks.cases import ArithmeticCase, ArithmeticDataset, ArithmeticProblem

Operation = Literal["+", "-", "*", "/"]
Kind = Literal["memorize", "change-one"]
#: How the space between "... is" / "... A:" and the answer is handled (templates 1 to 3):
#: ``"auto"``: the answer text is ``" " + answer`` and tokenised as the tokenizer does it
#: (word-level: the space vanishes; GPT-2: it merges into the first answer token, ``" 12"``);
#: a bare-space first token (Llama's ``"▁"``) is teacher-forced into the prompt, not scored.
#: ``"in_prompt"``: the prompt ends with the space and the answer tokens follow it (for
#: tokenizers that keep the space apart, e.g. word-level or Llama; a GPT-2 tokenizer merges
#: it into the digits, so its prompts cannot be re-tokenised and a TokenizationError results).
#: ``"none"``: no space at all (``"... is12"``).
LeadingSpace = Literal["auto", "in_prompt", "none"]
WordSlots = Literal["n1", "n2", "both", "either"]

OPERATIONS: tuple[str, ...] = ("+", "-", "*", "/")
DIGITS: tuple[int, ...] = (1, 2, 3)
TEMPLATE_IDS: tuple[int, ...] = (1, 2, 3, 4)
#: The paper's four templates per operation (Table 14), in its order; ``{n1}``/``{n2}`` slots.
TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "+": (
        "The sum of {n1} and {n2} is",
        "Q: What is {n1} plus {n2}? A:",
        "{n1} plus {n2} is",
        "{n1}+{n2}=",
    ),
    "-": (
        "The difference between {n1} and {n2} is",
        "Q: What is {n1} minus {n2}? A:",
        "{n1} minus {n2} is",
        "{n1}-{n2}=",
    ),
    "*": (
        "The product of {n1} and {n2} is",
        "Q: What is {n1} times {n2}? A:",
        "{n1} times {n2} is",
        "{n1}*{n2}=",
    ),
    "/": (
        "The ratio of {n1} and {n2} is",
        "Q: What is {n1} divides {n2}? A:",
        "{n1} divides {n2} is",
        "{n1}/{n2}=",
    ),
}
#: English words for the operands that may be written as words.
NUMBER_WORDS: tuple[str, ...] = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split()
)
# Enumerate a cell's operand pairs when there are at most this many candidates.
_ENUMERATE_LIMIT = 20_000


def arithmetic_words() -> list[str]:
    """Every word, digit and symbol the templates and number words use (for a vocabulary)."""
    words: list[str] = []
    for templates in TEMPLATES.values():
        for t in templates:
            text = t.replace("{n1}", " ").replace("{n2}", " ")
            for ch in "+-*/=?:":
                text = text.replace(ch, f" {ch} ")
            words += text.split()
    words += list("0123456789") + list("+-*/=?:") + list(NUMBER_WORDS)
    return list(dict.fromkeys(words))


def _stable_unit(*parts: object) -> float:
    """A deterministic pseudo-random number in [0, 1) from the parts (no Python ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_held_out(
    operation: str, digits: int, n1: int, n2: int, fraction: float, seed: int = 0
) -> bool:
    """Whether an operand pair belongs to the held-out split of its (operation, digits) cell.

    The split is a stable hash of ``(seed, operation, digits, n1, n2)``, so it needs no
    enumeration and is the same for every template and on every machine.
    """
    return _stable_unit("holdout", seed, operation, digits, n1, n2) < fraction


def compute_answer(operation: str, n1: int, n2: int, exact_division: bool = True) -> str:
    """The answer string (``"-3"`` for negatives; floor quotient for division).

    Raises:
        MechcnaError: unknown operation, division by zero, or an inexact division when
            ``exact_division`` is set.
    """
    _check_operation(operation)
    if operation == "+":
        return str(n1 + n2)
    if operation == "-":
        return str(n1 - n2)
    if operation == "*":
        return str(n1 * n2)
    if n2 == 0:
        raise MechcnaError("division by zero")
    if exact_division and n1 % n2:
        raise MechcnaError(f"{n1}/{n2} is not exact")
    return str(n1 // n2)


def _check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise MechcnaError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")


def _operand_range(digits: int) -> range:
    return range(0, 10) if digits == 1 else range(10 ** (digits - 1), 10**digits)


def _valid(op: str, n1: int, n2: int, nonneg: bool, exact: bool) -> bool:
    if op == "-" and nonneg and n1 < n2:
        return False
    if op == "/" and (n2 == 0 or (exact and n1 % n2)):
        return False
    return True


def operand_pairs(
    operation: str,
    digits: int,
    n_pairs: int | None,
    *,
    seed: int = 0,
    split: Literal["all", "train", "heldout"] = "all",
    holdout_fraction: float = 0.2,
    holdout_seed: int = 0,
    nonnegative_subtraction: bool = True,
    exact_division: bool = True,
) -> list[tuple[int, int]]:
    """Sample distinct operand pairs of one (operation, digits) cell, deterministically.

    Args:
        n_pairs: how many pairs; ``None`` or more than exist gives every valid pair (only
            for cells small enough to enumerate).
        split: ``"train"``/``"heldout"`` keep only pairs outside / inside the held-out set
            (:func:`is_held_out`); ``"all"`` keeps every pair.

    Raises:
        MechcnaError: unknown operation, digits outside 1..3, or an enumeration too large.
    """
    _check_operation(operation)
    if digits not in DIGITS:
        raise MechcnaError(f"digits must be one of {DIGITS}, not {digits!r}")
    if split not in ("all", "train", "heldout"):
        raise MechcnaError(f"split must be 'all', 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"{seed}|{operation}|{digits}")
    r = _operand_range(digits)

    def keep(n1: int, n2: int) -> bool:
        if not _valid(operation, n1, n2, nonnegative_subtraction, exact_division):
            return False
        if split == "all":
            return True
        held = is_held_out(operation, digits, n1, n2, holdout_fraction, holdout_seed)
        return held == (split == "heldout")

    if len(r) ** 2 <= _ENUMERATE_LIMIT or (operation == "/" and exact_division):
        if operation == "/" and exact_division:
            candidates = [(q * b, b) for b in r if b for q in range(r.stop // b + 1) if q * b in r]
        else:
            candidates = [(a, b) for a in r for b in r]
        population = sorted({p for p in candidates if keep(*p)})
        if n_pairs is None or n_pairs >= len(population):
            return population
        return sorted(rng.sample(population, n_pairs))
    if n_pairs is None:
        raise MechcnaError(f"{digits}-digit {operation!r} has too many pairs to enumerate")
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < n_pairs:
        n1, n2 = rng.choice(r), rng.choice(r)
        if operation == "-" and nonnegative_subtraction and n1 < n2:
            n1, n2 = n2, n1
        if keep(n1, n2):
            chosen.add((n1, n2))
    return sorted(chosen)


def render(
    operation: str,
    template: int,
    n1: int | str,
    n2: int | str,
) -> str:
    """Fill in a template (1..4) with operands (numbers or words).

    Raises:
        MechcnaError: unknown operation or template.
    """
    _check_operation(operation)
    if template not in TEMPLATE_IDS:
        raise MechcnaError(f"template must be one of {TEMPLATE_IDS}, not {template!r}")
    return TEMPLATES[operation][template - 1].format(n1=n1, n2=n2)


def arithmetic_problems(
    operations: str | Iterable[str] = OPERATIONS,
    digits: int | Iterable[int] = DIGITS,
    templates: int | Iterable[int] = TEMPLATE_IDS,
    n_pairs: int | None = 100,
    *,
    seed: int = 0,
    split: Literal["all", "train", "heldout"] = "all",
    holdout_fraction: float = 0.2,
    holdout_seed: int = 0,
    nonnegative_subtraction: bool = True,
    exact_division: bool = True,
    word_prob: float = 0.0,
    word_slots: WordSlots = "either",
    leading_space: LeadingSpace = "auto",
) -> list[ArithmeticProblem]:
    """Full prompts and answers; every sampled operand pair is written in every template.

    Arguments are those of :func:`arithmetic_dataset`.
    """
    ops = (operations,) if isinstance(operations, str) else tuple(operations)
    digs = (digits,) if isinstance(digits, int) else tuple(digits)
    tpls = (templates,) if isinstance(templates, int) else tuple(templates)
    for t in tpls:
        if t not in TEMPLATE_IDS:
            raise MechcnaError(f"template must be one of {TEMPLATE_IDS}, not {t!r}")
    if not 0.0 <= word_prob <= 1.0:
        raise MechcnaError(f"word_prob must be in [0, 1], not {word_prob}")
    if word_slots not in ("n1", "n2", "both", "either"):
        raise MechcnaError(f"word_slots must be n1, n2, both or either, not {word_slots!r}")
    if leading_space not in ("auto", "in_prompt", "none"):
        raise MechcnaError(f"leading_space must be auto, in_prompt or none: {leading_space!r}")
    problems = []
    for op in ops:
        for d in digs:
            pairs = operand_pairs(
                op,
                d,
                n_pairs,
                seed=seed,
                split=split,
                holdout_fraction=holdout_fraction,
                holdout_seed=holdout_seed,
                nonnegative_subtraction=nonnegative_subtraction,
                exact_division=exact_division,
            )
            rng = random.Random(f"words|{seed}|{op}|{d}")
            for n1, n2 in pairs:
                answer = compute_answer(op, n1, n2, exact_division)
                for t in tpls:
                    w1, w2 = _word_choice(rng, word_prob, word_slots)
                    text = render(op, t, _as_word(n1) if w1 else n1, _as_word(n2) if w2 else n2)
                    sep = " " if t != 4 and leading_space != "none" else ""
                    if sep and leading_space == "in_prompt":
                        text, sep = text + sep, ""
                    problems.append(ArithmeticProblem(op, d, t, n1, n2, text, sep, answer))
    return problems


def _word_choice(rng: random.Random, prob: float, slots: str) -> tuple[bool, bool]:
    if prob <= 0.0 or rng.random() >= prob:
        return False, False
    if slots == "either":
        first = rng.random() < 0.5
        return first, not first
    return slots in ("n1", "both"), slots in ("n2", "both")


def _as_word(n: int) -> str | int:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else n


def _columns_with_carry(operation: str, n1: int, n2: int) -> set[int]:
    """Answer columns (0 = units) that receive a carry (``+``) or borrow (``-``)."""
    out: set[int] = set()
    if operation == "-":
        n1, n2 = max(n1, n2), min(n1, n2)
    carry, col = 0, 0
    while n1 or n2 or carry:
        a, b = n1 % 10, n2 % 10
        if carry:
            out.add(col)
        if operation == "+":
            carry = (a + b + carry) >= 10
        else:
            carry = (a - b - carry) < 0
        n1, n2, col = n1 // 10, n2 // 10, col + 1
    return out


def case_kinds(
    operation: str, n1: int, n2: int, spans: Sequence[tuple[int, int]], answer: str
) -> list[str]:
    """Memorize / change-one label for each answer token, given its character span in ``answer``.

    ``+``/``-``: change-one when a column the token writes receives a carry or borrow (a
    minus sign is change-one); ``*``/``/``: the last token is memorize, the others change-one.
    """
    if operation in ("*", "/"):
        return ["change-one"] * (len(spans) - 1) + ["memorize"]
    carried = _columns_with_carry(operation, n1, n2)
    kinds = []
    for start, end in spans:
        chars = answer[start:end]
        cols = {len(answer) - 1 - i for i in range(start, end) if answer[i].isdigit()}
        change = "-" in chars or bool(cols & carried)
        kinds.append("change-one" if change else "memorize")
    return kinds


TokenizerLike = PreTrainedTokenizerBase | Model | None


def default_tokenizer() -> PreTrainedTokenizerBase:
    """A word-level tokenizer (digits split, as in Llama) over :func:`arithmetic_words`."""
    return word_level_tokenizer(arithmetic_words(), name="mechcna-arithmetic")


def _resolve_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        return default_tokenizer()
    if is_model(tokenizer):
        if tokenizer.tokenizer is None:
            raise TokenizationError("the model has no tokenizer")
        return tokenizer.tokenizer
    return tokenizer


def _encode(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]


def expand_problem(
    problem: ArithmeticProblem, tokenizer: PreTrainedTokenizerBase
) -> list[ArithmeticCase]:
    """Teacher-forced single-token cases of one problem, split as the tokenizer splits it.

    Raises:
        TokenizationError: a token straddles the prompt/answer boundary, the tokenizer is
            not prefix-stable on the text, or an answer token is not a single token alone.
    """
    full = problem.text + problem.separator + problem.answer
    ids, offsets = _encode(tokenizer, full)
    boundary = len(problem.text)
    answer_start = boundary + len(problem.separator)
    first = next((i for i, (s, _) in enumerate(offsets) if s >= boundary), len(ids))
    if any(s < boundary < e for s, e in offsets):
        raise TokenizationError(
            f"a token of {full!r} straddles the prompt/answer boundary; try another "
            "leading_space policy"
        )
    steps = [
        i
        for i in range(first, len(ids))
        if full[offsets[i][0] : offsets[i][1]].strip() not in ("", "▁", "Ġ")
    ]
    spans = [
        (max(offsets[i][0], answer_start) - answer_start, offsets[i][1] - answer_start)
        for i in steps
    ]
    if not steps or "".join(problem.answer[s:e] for s, e in spans) != problem.answer:
        raise TokenizationError(f"the answer tokens of {full!r} do not spell {problem.answer!r}")
    kinds = case_kinds(problem.operation, problem.n1, problem.n2, spans, problem.answer)
    cases = []
    for step, (i, kind) in enumerate(zip(steps, kinds)):
        start, end = offsets[i]
        target = full[start:end]
        prompt = _stable_prefix(tokenizer, full, start, ids[:i])
        if ids[i] == tokenizer.unk_token_id and tokenizer.unk_token_id is not None:
            raise TokenizationError(f"answer token {target!r} of {full!r} is unknown (unk)")
        if _encode(tokenizer, target)[0] != [ids[i]]:
            raise TokenizationError(
                f"answer token {target!r} of {full!r} is not a single token on its own; "
                "try another leading_space policy"
            )
        cases.append(
            ArithmeticCase(
                prompt=prompt,
                target=target,
                operation=problem.operation,
                digits=problem.digits,
                template=problem.template,
                kind=kind,
                n1=problem.n1,
                n2=problem.n2,
                answer=problem.answer,
                step=step,
            )
        )
    return cases


def _stable_prefix(tok: PreTrainedTokenizerBase, full: str, end: int, ids: list[int]) -> str:
    """``full[:end]`` (trailing whitespace dropped when that tokenises the same) as a prompt."""
    for candidate in (full[:end].rstrip(), full[:end]):
        if _encode(tok, candidate)[0] == ids:
            return candidate
    raise TokenizationError(f"the tokenizer does not split {full[:end]!r} as a prefix of {full!r}")


def arithmetic_dataset(
    operations: str | Iterable[str] = OPERATIONS,
    digits: int | Iterable[int] = DIGITS,
    templates: int | Iterable[int] = TEMPLATE_IDS,
    n_pairs: int | None = 100,
    *,
    tokenizer: TokenizerLike = None,
    seed: int = 0,
    split: Literal["all", "train", "heldout"] = "all",
    holdout_fraction: float = 0.2,
    holdout_seed: int = 0,
    nonnegative_subtraction: bool = True,
    exact_division: bool = True,
    word_prob: float = 0.0,
    word_slots: WordSlots = "either",
    leading_space: LeadingSpace = "auto",
) -> ArithmeticDataset:
    """Arithmetic teacher-forced cases for the given operations, digit counts and templates.

    Args:
        operations: any of ``"+" "-" "*" "/"`` (a string is one operation).
        digits: digits per operand, any of 1, 2, 3.
        templates: template numbers 1..4 (the paper's order).
        n_pairs: operand pairs sampled per (operation, digits); each pair is written in every
            template. ``None``: every valid pair (1- and 2-digit cells, exact division).
        tokenizer: a tokenizer or a model whose tokenizer splits the answers; default the
            word-level digit-splitting tokenizer of :func:`default_tokenizer`.
        seed: seed of the operand sampling and the number-word choices.
        split: ``"all"``, or only pairs outside (``"train"``) / inside (``"heldout"``) the
            held-out set of :func:`is_held_out`.
        holdout_fraction: share of each cell's pairs in the held-out set (default 0.2).
        holdout_seed: seed of the held-out set.
        nonnegative_subtraction: only ``n1 >= n2`` for ``-`` (default); otherwise answers
            may be negative, written ``"-3"``.
        exact_division: only pairs with ``n1`` a multiple of ``n2`` (default); otherwise the
            answer is the floor quotient. Divisors are never 0.
        word_prob: probability that a prompt writes operands as English words (default 0).
            Only operands 0..20 have words; larger ones stay digits.
        word_slots: which operand(s) a word prompt writes as words: ``"n1"``, ``"n2"``,
            ``"both"`` or ``"either"`` (one of the two at random, the default).
        leading_space: handling of the space before the answer, see :data:`LeadingSpace`.

    Returns:
        The cases, ordered by operation, digits, pair, template and step.

    Raises:
        MechcnaError: an unknown operation, digits outside 1..3, a template outside 1..4,
            or a bad policy value.
        TokenizationError: the tokenizer cannot split an answer into single-token cases.
    """
    problems = arithmetic_problems(
        operations,
        digits,
        templates,
        n_pairs,
        seed=seed,
        split=split,
        holdout_fraction=holdout_fraction,
        holdout_seed=holdout_seed,
        nonnegative_subtraction=nonnegative_subtraction,
        exact_division=exact_division,
        word_prob=word_prob,
        word_slots=word_slots,
        leading_space=leading_space,
    )
    tok = _resolve_tokenizer(tokenizer)
    cases = tuple(c for p in problems for c in expand_problem(p, tok))
    policies = {
        "operations": sorted({p.operation for p in problems}, key=OPERATIONS.index),
        "digits": sorted({p.digits for p in problems}),
        "templates": sorted({p.template for p in problems}),
        "n_pairs": n_pairs,
        "seed": seed,
        "split": split,
        "holdout_fraction": holdout_fraction,
        "holdout_seed": holdout_seed,
        "nonnegative_subtraction": nonnegative_subtraction,
        "exact_division": exact_division,
        "word_prob": word_prob,
        "word_slots": word_slots,
        "leading_space": leading_space,
        "tokenizer": getattr(tok, "name_or_path", type(tok).__name__),
    }
    return ArithmeticDataset(cases, policies)
