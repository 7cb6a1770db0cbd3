"""The records of the arithmetic task: a problem (operands, operation, template, answer), a
teacher-forced case (a prompt and its next answer token, with its labels) and a dataset of
cases that filters by label and converts to pandas (built by
:func:`mechcna.tasks.arithmetic.arithmetic_dataset`).
"""

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, overload

import pandas as pd

from mechcna.errors import MechcnaError


@dataclass(frozen=True)
class ArithmeticProblem:
    """One full arithmetic prompt and its answer, before teacher-forced expansion.

    Attributes:
        text: the template with operands filled in (``"12+7="``).
        separator: what goes between ``text`` and ``answer`` (``" "`` or ``""``).
        answer: the full answer, digits most significant first (``"-3"`` when negative).
    """

    operation: str
    digits: int
    template: int
    n1: int
    n2: int
    text: str
    separator: str
    answer: str


@dataclass(frozen=True)
class ArithmeticCase:
    """One teacher-forced next-token case.

    Attributes:
        prompt: text fed to the model: the template plus the answer prefix predicted so far.
        target: the expected next token, exactly one token for the tokenizer.
        operation: ``"+"``, ``"-"``, ``"*"`` or ``"/"``.
        digits: digits per operand (1, 2 or 3).
        template: 1..4 in the paper's order.
        kind: ``"memorize"`` or ``"change-one"``.
        n1: first operand.
        n2: second operand.
        answer: the full answer string.
        step: index of the answer token predicted (0 = first answer token).
    """

    prompt: str
    target: str
    operation: str
    digits: int
    template: int
    kind: str
    n1: int
    n2: int
    answer: str
    step: int


_LABELS = tuple(f.name for f in fields(ArithmeticCase))


@dataclass(frozen=True)
class ArithmeticDataset(Sequence[ArithmeticCase]):
    """An immutable sequence of :class:`ArithmeticCase` with the policies that made it.

    Attributes:
        cases: the cases, ordered by operation, digits, operand pair, template and step.
        policies: the generation settings (seed, sizes and every policy), for records.
    """

    cases: tuple[ArithmeticCase, ...]
    policies: dict[str, Any] = field(default_factory=dict, compare=False)

    @overload
    def __getitem__(self, index: int) -> ArithmeticCase: ...
    @overload
    def __getitem__(self, index: slice) -> "ArithmeticDataset": ...
    def __getitem__(self, index: int | slice) -> "ArithmeticCase | ArithmeticDataset":
        if isinstance(index, slice):
            return ArithmeticDataset(self.cases[index], self.policies)
        return self.cases[index]

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[ArithmeticCase]:
        return iter(self.cases)

    @property
    def prompts(self) -> list[str]:
        """The prompt of every case."""
        return [c.prompt for c in self.cases]

    @property
    def targets(self) -> list[str]:
        """The target token of every case."""
        return [c.target for c in self.cases]

    def to_frame(self) -> pd.DataFrame:
        """One row per case, every field of :class:`ArithmeticCase` as a column."""
        return pd.DataFrame([asdict(c) for c in self.cases], columns=list(_LABELS))

    def filter(self, **labels: Any) -> "ArithmeticDataset":
        """The cases whose labels match, e.g. ``filter(operation="+", digits=1)``.

        A value that is a list, tuple or set matches any of its elements.

        Raises:
            MechcnaError: an unknown label.
        """
        unknown = set(labels) - set(_LABELS)
        if unknown:
            raise MechcnaError(f"unknown labels {sorted(unknown)}; known: {list(_LABELS)}")
        wanted = {
            k: set(v) if isinstance(v, (list, tuple, set, frozenset)) else {v}
            for k, v in labels.items()
        }
        kept = tuple(c for c in self.cases if all(getattr(c, k) in v for k, v in wanted.items()))
        return ArithmeticDataset(kept, self.policies)
