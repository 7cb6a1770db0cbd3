"""Results of a reproduction: claims with verdicts, stages with tables, figures and wall times.

Every stage of :mod:`mechcna.reproduce` returns a :class:`StageResult`: its tables (pandas,
with the paper's numbers in columns labelled ``"paper (Llama-7B)"`` / ``"paper (GPT-2)"`` where
the paper gives one), its figures (plotly), the claims it measured (:class:`Claim`, each with
the paper's figure beside ours and a verdict computed from our numbers), and its wall time. A
:class:`Reproduction` collects the stages of one run and writes them as markdown (and HTML
figures).
"""

import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna.errors import MechcnaError
from mechcna.reproduce.stats import FAILS, HOLDS, NOT_MEASURED, Test

Paper = Literal["attribution", "arithmetic"]
PAPER_TITLES = {
    "attribution": "Neuron-Level Knowledge Attribution in Large Language Models (ATTR)",
    "arithmetic": "Interpreting Arithmetic Mechanism in LLMs through CNA (ARITH)",
}


@dataclass(frozen=True)
class Claim:
    """One qualitative claim of a paper and its verdict on this model.

    Attributes:
        paper: ``"attribution"`` or ``"arithmetic"``.
        claim: the claim, with the test we apply to our numbers.
        paper_figure: the paper's number(s) behind the claim.
        ours: our measured number(s), in words.
        test: the number tested, its sample size, 95% interval, threshold and side
            (:class:`~mechcna.reproduce.stats.Test`); ``None`` when it could not be measured
            here (e.g. no prompt survived a filter), with the reason in ``ours``.
    """

    paper: Paper
    claim: str
    paper_figure: str
    ours: str
    test: Test | None = None

    @property
    def verdict(self) -> str:
        """holds / does not hold / inconclusive (the interval straddles the threshold) / not
        measured."""
        return NOT_MEASURED if self.test is None else self.test.verdict

    @property
    def holds(self) -> bool | None:
        """``True`` / ``False`` for a decided verdict, ``None`` when inconclusive or not
        measured."""
        return {HOLDS: True, FAILS: False}.get(self.verdict)


@dataclass(frozen=True)
class StageResult:
    """One stage: tables, figures, claims, notes and the wall time it took.

    ``data`` carries objects later stages reuse (not written out).
    """

    name: str
    title: str
    paper: Paper
    seconds: float
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, go.Figure] = field(default_factory=dict, repr=False)
    claims: tuple[Claim, ...] = ()
    notes: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The first ``k`` rows of the stage's first table."""
        return next(iter(self.tables.values()), pd.DataFrame()).head(k)

    def to_frame(self) -> pd.DataFrame:
        """The stage's claims, one row each."""
        return claims_frame(self.claims)

    def plot(self) -> go.Figure:
        """The stage's first figure (an empty one when it has none)."""
        return next(iter(self.figures.values()), go.Figure())


class StageBuilder:
    """Collects a stage's outputs while it runs; :func:`stage` times it."""

    def __init__(self, name: str, title: str, paper: Paper):
        self.paper: Paper = paper
        self.name, self.title = name, title
        self.tables: dict[str, pd.DataFrame] = {}
        self.figures: dict[str, go.Figure] = {}
        self.claims: list[Claim] = []
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        self.seconds = 0.0

    def claim(self, claim: str, paper_figure: str, ours: str, test: Test | None) -> None:
        self.claims.append(Claim(self.paper, claim, paper_figure, ours, test))

    def result(self) -> StageResult:
        tables = {k: _widen(t) for k, t in self.tables.items()}
        return StageResult(
            self.name, self.title, self.paper, self.seconds, tables,
            dict(self.figures), tuple(self.claims), tuple(self.notes), dict(self.data),
        )  # fmt: skip


def _widen(frame: pd.DataFrame) -> pd.DataFrame:
    """float32 columns (from torch) as float64, so every float is a Python ``float``."""
    narrow = [c for c in frame.columns if frame[c].dtype == "float32"]
    return frame.astype({c: "float64" for c in narrow}) if narrow else frame


@contextmanager
def stage(name: str, title: str, paper: Paper) -> Iterator[StageBuilder]:
    """Run a stage body with gradients off, timing it into the builder."""
    builder = StageBuilder(name, title, paper)
    start = time.perf_counter()
    with torch.no_grad():
        yield builder
    builder.seconds = time.perf_counter() - start


CLAIM_COLUMNS = [
    "paper", "claim", "paper's figure", "ours", "n", "estimate", "lo", "hi", "test",
    "interval", "verdict",
]  # fmt: skip


def claims_frame(claims: tuple[Claim, ...] | list[Claim]) -> pd.DataFrame:
    """One row per claim: the paper, the claim, the paper's figure, ours in words, then the
    tested number (``n``, ``estimate``, its 95% interval ``lo``-``hi``), the test (side and
    threshold), how the interval was computed and the verdict."""
    nan = float("nan")
    rows = []
    for c in claims:
        t = c.test
        rows.append(
            {"paper": c.paper, "claim": c.claim, "paper's figure": c.paper_figure,
             "ours": c.ours, "n": t.n if t else 0, "estimate": t.estimate if t else nan,
             "lo": t.lo if t else nan, "hi": t.hi if t else nan, "test": t.test if t else "",
             "interval": t.method if t else "", "verdict": c.verdict}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table (floats to 4 significant digits, NaN left blank)."""
    if index:
        frame = frame.reset_index()
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``"unknown"`` where the OS has none)."""
    try:
        return ", ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "unknown"


def machine() -> str:
    """A one-line description of this machine (CPU count, torch threads, load)."""
    load = load_average()
    cpus = __import__("os").cpu_count()
    return (
        f"{platform.machine()} {platform.processor() or platform.system()}, {cpus} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average {load}"
    )


@dataclass(frozen=True)
class Reproduction:
    """Every stage of one ``mechcna reproduce`` run, with its settings and machine."""

    model_name: str
    settings: dict[str, Any]
    stages: tuple[StageResult, ...]
    machine: str
    date: str
    load_end: str = ""
    command: str = ""
    load_seconds: float | None = None

    @property
    def claim_list(self) -> tuple[Claim, ...]:
        """Every stage's claims, in order."""
        return tuple(c for s in self.stages for c in s.claims)

    @property
    def claims(self) -> pd.DataFrame:
        """The claims as a table (:func:`claims_frame`): n, estimate, 95% interval, test and
        verdict per row."""
        return claims_frame(self.claim_list)

    def claims_frame(self) -> pd.DataFrame:
        return self.claims

    def timings(self) -> pd.DataFrame:
        """Wall time per stage (seconds) and the total (with the model load when recorded)."""
        rows = [{"paper": s.paper, "stage": s.name, "seconds": s.seconds} for s in self.stages]
        if self.load_seconds is not None:
            rows.insert(0, {"paper": "", "stage": "load model", "seconds": self.load_seconds})
        rows.append({"paper": "", "stage": "total", "seconds": sum(r["seconds"] for r in rows)})
        return pd.DataFrame(rows)

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.claims_frame().head(k)

    def to_frame(self) -> pd.DataFrame:
        return self.claims_frame()

    def plot(self) -> go.Figure:
        """Wall time per stage as a bar chart."""
        t = self.timings().iloc[:-1]
        fig = go.Figure(go.Bar(x=t["stage"], y=t["seconds"]))
        fig.update_layout(title=f"wall time per stage ({self.model_name})",
                          xaxis_title="stage", yaxis_title="seconds")  # fmt: skip
        return fig


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


class StageLock:
    """An exclusive ``flock`` on a file, taken before a stage and released between stages once
    it has been held for ``hold`` seconds (``path=None``: no lock). On a shared machine other
    heavy jobs then run between groups of stages, and every stage's wall time is measured
    while holding the lock."""

    def __init__(self, path: str | Path | None, hold: float = 480.0):
        self.path, self.hold = path, hold
        self._file: Any = None
        self._since = 0.0

    def acquire(self) -> None:
        if self.path is None or self._file is not None:
            return
        import fcntl

        self._file = open(self.path, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._since = time.perf_counter()

    def release(self, force: bool = False) -> None:
        if self._file is None or (not force and time.perf_counter() - self._since < self.hold):
            return
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def run_stages(
    stages: list[tuple[str, Callable[[], StageResult]]],
    progress: bool,
    lock: str | Path | None = None,
    hold: float = 480.0,
) -> list[StageResult]:
    """Run stage thunks in order under one progress bar (a later thunk may read earlier
    results through the list it is given). With ``lock``, stages run holding an exclusive
    ``flock`` on that file, released between stages once held for ``hold`` seconds
    (:class:`StageLock`) and at the end."""
    from tqdm.auto import tqdm

    out: list[StageResult] = []
    bar = tqdm(stages, desc="reproduce", disable=not progress)
    guard = StageLock(lock, hold)
    try:
        for name, thunk in bar:
            bar.set_postfix_str(name)
            guard.acquire()
            out.append(thunk())
            guard.release()
    finally:
        guard.release(force=True)
    return out


@dataclass(frozen=True)
class ReproduceSettings:
    """Sizes and policies of a reproduction run (presets ``quick()``, ``standard()``, the
    default of :func:`mechcna.reproduce.reproduce` and the command line, ``paper()`` and
    ``full()``; the field defaults are ``full()``'s, the earlier and smaller sizes).

    Attribution paper:
        knowledge_top_k: the filter's rank threshold: 10 (the paper's: the gold answer is among
            the top-10 next tokens) or 1 (the answer is the model's top-1 token; the original
            MRR is then 1.0).
        knowledge_per_type: written prompts per type run through the filter (``None``: all).
        prompts_per_type: knowledge prompts per type used for neuron-level attribution.
        max_prompts: at most this many of those in all, taken in turn from each type
            (``None``: no cap).
        method_prompts: prompts in the 8-method comparison (Table 2), taken in turn from each
            type (it scores every FFN neuron eight ways and ranks each in the vocabulary).
        method_k: neurons zeroed per prompt and method (10 in the paper).
        ffn_k, attention_k: value neurons zeroed per prompt (100 FFN + 200 attention).
        histogram_k: top neurons per prompt in the layer histograms (300 in the notebooks).
        query_k: value neurons whose queries are traced (30 in the Llama notebook).
        query_value_k: top value / query neurons compared (300 in the notebooks).
        query_zero_k: query FFN neurons zeroed per sentence in ATTR Table 7 (1000 in the paper).
        arithmetic_fallback: when no knowledge prompt survives, run the attribution stages on
            the model's correct arithmetic cases instead (types ``arith +`` ...), stated so.
        query_zeroing: run ATTR Table 7 (the top-``query_zero_k`` query neurons zeroed per
            sentence vs random; stage ``query_zeroing``).
        head_types: run the head attribution and top-1% head intervention per knowledge type
            (stage ``head_types``).
    Arithmetic paper:
        operations, digits, templates: the dataset cells (1,600 sentences in the paper).
        n_pairs: operand pairs per (operation, digits) cell.
        prompt_form: ``"zero-shot"`` (the paper's), ``"few-shot"`` (``shots`` solved examples
            of the same operation, digits and template before each prompt, one per line),
            ``"auto"`` (few-shot when the tokenizer has a newline token, else zero-shot) or
            ``"both"``: every arithmetic stage runs once per form (stages ``heads@zero-shot``,
            ``heads@few-shot``, ...; each claim labelled with its form), side by side. Zeroing
            neurons at every position also hits the solved examples of a few-shot prefix, so
            the two forms can disagree.
        sweep_cases: at most this many cases in the head sweep (``None``: all); they are split
            into a selection half (the top head is chosen there) and an evaluation half (its
            claim is scored there).
        cna_cases: at most this many correct 1-digit + and - cases for CNA (``None``: all).
        cna_split: ``"heldout"`` (the sweep's cases) or ``"all"`` (every 1-digit + and - pair,
            as the paper's CNA used; the held-out split keeps only 34 + and 12 - pairs).
        cna_ks: the K of Tables 5 and 6.
        zero_shot_top: tokens read in Table 8 (``None``: the paper's 50 when the vocabulary
            has at least 1,000 tokens, else 10).
        thresholds: the M of Table 8 (``None``: the smallest M whose set is at most
            ``zero_shot_share`` of the searched pool, and the next two).
        zero_shot_share: see ``thresholds`` (the paper's sets are 0.3-5.9% of its pool).
        zero_shot_concepts: the concept list of Table 8: ``"all"`` (the default list of
            :mod:`mechcna.analyses.shallow`), ``"pruned"`` (without its common English words,
            ``COMMON_WORDS``) or ``"both"`` (one table and claim each, from one search pass).
        zero_shot_layers: attention layers that transform shallow neurons (``None``: the
            ``zero_shot_readers`` layers up to and including the head's layer; the paper used
            all of 0-16 for head 17_22, each reader costs a vocabulary projection of every
            shallow neuron).
        zero_shot_readers: how many attention layers (ending at the head's layer) read the
            shallow neurons by default (``None``: every layer up to the head's).
        random_draws: random baselines per comparison (at least 5; their spread is reported).
        trace_cases: CNA cases traced back to the operands (ARITH 4.2 step 2; ``None``: all).
        cell_templates, cell_digits: the extra dataset cells (Table 1's templates 1-3 and the
            3-digit cells of Tables 24-27) evaluated with the top heads of the sweep ablated.
        cell_pairs: operand pairs per extra (operation, digits, template) cell.
        cell_heads: top heads per operation (from the sweep) ablated on the extra cells.
        division: run appendix B (the division head's Tables 15-17) when ``/`` is among the
            operations.
        division_zero_shot: also Table 17 (the zero-shot search below the division head).
        division_cases: at most this many correct 1-digit divisions for its CNA (``None``: all).
        seed: seed of every random draw and of the bootstrap.
    """

    knowledge_top_k: int = 10
    knowledge_per_type: int | None = None
    prompts_per_type: int | None = 4
    max_prompts: int | None = 12
    method_prompts: int = 6
    method_k: int = 10
    ffn_k: int = 100
    attention_k: int = 200
    histogram_k: int = 300
    query_k: int = 30
    query_value_k: int = 300
    query_zero_k: int = 1000
    arithmetic_fallback: bool = True
    query_zeroing: bool = True
    head_types: bool = True
    operations: tuple[str, ...] = ("+", "-", "*", "/")
    digits: tuple[int, ...] = (1, 2)
    templates: tuple[int, ...] = (4,)
    n_pairs: int = 10
    prompt_form: Literal["auto", "zero-shot", "few-shot", "both"] = "auto"
    shots: int = 2
    sweep_cases: int | None = 16
    cna_cases: int | None = 6
    cna_split: Literal["heldout", "all"] = "heldout"
    cna_ks: tuple[int, ...] = (100, 50, 30, 20, 10)
    zero_shot_top: int | None = None
    thresholds: tuple[int, ...] | None = None
    zero_shot_layers: tuple[int, ...] | None = None
    zero_shot_readers: int | None = 2
    zero_shot_share: float = 0.05
    zero_shot_concepts: Literal["all", "pruned", "both"] = "both"
    random_draws: int = 5
    trace_cases: int | None = 8
    cell_templates: tuple[int, ...] = (1, 2, 3)
    cell_digits: tuple[int, ...] = (3,)
    cell_pairs: int = 10
    cell_heads: int = 5
    division: bool = True
    division_zero_shot: bool = False
    division_cases: int | None = 12
    seed: int = 0
    preset: str = "custom"

    def __post_init__(self) -> None:
        if self.zero_shot_readers is not None and self.zero_shot_readers < 1:
            raise MechcnaError(f"zero_shot_readers must be >= 1, got {self.zero_shot_readers}")
        if self.random_draws < 5:
            raise MechcnaError(f"random_draws must be >= 5, got {self.random_draws}")

    @classmethod
    def quick(cls) -> "ReproduceSettings":
        """The smallest sizes that still run every stage (zero-shot arithmetic prompts), a few
        minutes of stage time on SmolLM2-135M on 2 cores. For trying it out: with so few
        prompts and cases most verdicts are **inconclusive** (the intervals are wide)."""
        return cls(
            knowledge_per_type=10, prompts_per_type=1, max_prompts=2, method_prompts=2,
            query_value_k=100, operations=("+", "-"), digits=(1,), n_pairs=8,
            prompt_form="zero-shot", sweep_cases=16, cna_cases=8, cna_ks=(50, 10),
            zero_shot_readers=1, trace_cases=4, cell_pairs=3, preset="quick",
        )  # fmt: skip

    @classmethod
    def standard(cls) -> "ReproduceSettings":
        """Sized by power within an hour of stage time for SmolLM2-135M on 2 cores with nothing
        else running (about 30 minutes by :func:`mechcna.reproduce.plan.expected_times`; the
        record of 2026-12-04 measured its stages): every written knowledge prompt through the
        paper's filter (gold answer in the top 10), 40 of the survivors for the neuron-level
        stages and 24 for the method comparison; 400 zero-shot held-out arithmetic cases
        (+, -, *, /; 1 and 2 digits; drawn at random from up to 100 pairs per cell) split into a
        selection half (every head swept) and an evaluation half (the chosen heads only); every
        correct 1-digit + and - case (drawn from all pairs) for CNA; the shallow neurons read
        through every attention layer up to the head's; 12 cases traced (ARITH 4.2 step 2),
        3 pairs per cell of templates 1-3 and 3 digits with the top heads ablated, ATTR Table 7
        (``query_zeroing``), the per-type head intervention (``head_types``) and appendix B
        (``division``, 10 correct 1-digit divisions; Table 17 only in :meth:`paper`)."""
        return cls(
            prompts_per_type=None, max_prompts=40, method_prompts=24, n_pairs=100,
            prompt_form="zero-shot", sweep_cases=400, cna_cases=None, cna_split="all",
            zero_shot_readers=None, trace_cases=12, cell_pairs=3, division_cases=10,
            preset="standard",
        )  # fmt: skip

    @classmethod
    def paper(cls) -> "ReproduceSettings":
        """The papers' sample sizes where our data allow (every surviving prompt, every
        arithmetic case of 1-3 digits, every correct 1-digit case for CNA) and every stage
        (ATTR Table 7, the head intervention and appendix B included): hours on a CPU.
        Run it with ``checkpoint=`` (``--out`` on the command line): each finished stage is
        saved and a rerun continues where it stopped."""
        return cls(
            prompts_per_type=None, max_prompts=None, method_prompts=200, digits=(1, 2, 3),
            n_pairs=100, prompt_form="zero-shot", sweep_cases=None, cna_cases=None,
            cna_split="all", zero_shot_readers=None, trace_cases=None, cell_pairs=100,
            division_zero_shot=True, division_cases=None, preset="paper",
        )  # fmt: skip

    @classmethod
    def full(cls) -> "ReproduceSettings":
        """The earlier default sizes (about 10 minutes of stage time for SmolLM2-135M before
        the stages of issue 22; with those at the field defaults, 10 pairs per extra cell and
        12 divisions, :func:`~mechcna.reproduce.plan.expected_times` gives about 45 minutes at
        load ~3.5; too small to decide most claims: see :meth:`standard`, the default now).
        Kept for comparison with the records made with it."""
        return cls(preset="full")

    @classmethod
    def named(cls, name: str) -> "ReproduceSettings":
        """A preset by name: ``quick``, ``standard``, ``paper`` or ``full``."""
        presets = {"quick": cls.quick, "standard": cls.standard, "paper": cls.paper,
                   "full": cls.full}  # fmt: skip
        if name not in presets:
            raise MechcnaError(f"preset must be one of {sorted(presets)}, not {name!r}")
        return presets[name]()
