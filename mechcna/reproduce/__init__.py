"""Reproduce both papers on a model: every stage a library call, the paper's numbers beside ours.

``mechcna reproduce --model M --out DIR [--paper attribution|arithmetic|both] [--quick]`` calls
:func:`reproduce` and :func:`write_report` (an HTML page with every table and figure, and
``reproduce.md``). Each stage (see
:mod:`mechcna.reproduce.attribution`, :mod:`mechcna.reproduce.query_stages`,
:mod:`mechcna.reproduce.attr_stages`, :mod:`mechcna.reproduce.attr_more` and
:mod:`mechcna.reproduce.arithmetic`) returns a :class:`StageResult` with tables (the papers'
Llama-7B / GPT-2 numbers in columns labelled ``"paper (Llama-7B)"`` / ``"paper (GPT-2)"``),
figures, the papers' qualitative claims with verdicts **measured on this model** and its wall
time. Every claim carries its sample size, a 95% interval (exact binomial or paired bootstrap,
:mod:`mechcna.reproduce.stats`), its threshold and a verdict among holds / does not hold /
inconclusive. Sizes are :class:`ReproduceSettings` (presets ``quick()``: minutes, mostly
inconclusive; ``standard()``: sized by power, about an hour for SmolLM2 on 2 cores;
``paper()``: the papers' sizes, resumable with ``checkpoint=``).

Example:
    >>> rep = reproduce(load_model("mechcna/arith-small"), quick=True)   # doctest: +SKIP
    >>> rep.claims_frame()                                               # doctest: +SKIP
    >>> write_report(rep, "runs/reproduce")                              # doctest: +SKIP
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mechcna.errors import MechcnaError
from mechcna.models.backend import Model
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce import attr_more, attr_stages, shallow_stage
from mechcna.reproduce import attribution as attr
from mechcna.reproduce import query_stages as query
from mechcna.reproduce.core import (
    Claim,
    ReproduceSettings,
    Reproduction,
    StageResult,
    load_average,
    machine,
    now,
    run_stages,
)
from mechcna.reproduce.page import build_report, to_markdown, write_markdown, write_report
from mechcna.reproduce.plan import Checkpoint, expected_times

_log = logging.getLogger(__name__)

Which = Literal["attribution", "arithmetic", "both"]

__all__ = [
    "Claim",
    "ReproduceSettings",
    "Reproduction",
    "StageResult",
    "build_report",
    "expected_times",
    "reproduce",
    "to_markdown",
    "write_markdown",
    "write_report",
]


def reproduce(
    model: Model,
    paper: Which = "both",
    *,
    quick: bool = False,
    settings: ReproduceSettings | str | None = None,
    progress: bool = True,
    lock: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> Reproduction:
    """Run the papers' stages on ``model`` and collect tables, figures, claims and timings.

    Args:
        paper: ``"attribution"``, ``"arithmetic"`` or ``"both"``.
        quick: use :meth:`ReproduceSettings.quick` (ignored when ``settings`` is given).
        settings: sizes and policies, or a preset name (``"quick"``, ``"standard"``,
            ``"paper"``, ``"full"``; default :meth:`ReproduceSettings.full`).
        progress: a progress bar over stages.
        lock: a file to ``flock`` during each stage, released between stages (for machines
            shared with other heavy jobs; stage wall times then exclude the waits).
        checkpoint: a folder where each finished stage is saved (:class:`plan.Checkpoint`);
            a rerun with the same model, paper and settings loads those and continues.

    The expected time per stage (:func:`plan.expected_times`) is logged before the start.

    Raises:
        MechcnaError: an unknown ``paper`` or preset.
    """
    if paper not in ("attribution", "arithmetic", "both"):
        raise MechcnaError(f"paper must be attribution, arithmetic or both, not {paper!r}")
    if isinstance(settings, str):
        settings = ReproduceSettings.named(settings)
    s = settings or (ReproduceSettings.quick() if quick else ReproduceSettings.full())
    _log.info("expected stage times (s):\n%s", expected_times(model, s, paper).round(0))
    saved = (
        Checkpoint(checkpoint, str(model.cfg.model_name), paper, vars(s)) if checkpoint else None
    )
    stamp: dict[str, str] = {}  # machine and date when the first stage starts (after any lock)
    done: dict[str, StageResult] = {}

    def get(name: str, key: str) -> Any:
        return done[name].data.get(key)

    def keep(name: str, fn: Callable[[], StageResult]) -> tuple[str, Callable[[], StageResult]]:
        def thunk() -> StageResult:
            stamp.setdefault("machine", machine())
            stamp.setdefault("date", now())
            loaded = saved.load(name) if saved else None
            done[name] = loaded or fn()
            if saved and loaded is None:
                saved.save(done[name])
            return done[name]

        return name, thunk

    data = "knowledge", "dataset"
    ffn, att = ("value_neurons", "ffn"), ("value_neurons", "attention")
    stages = []
    if paper in ("attribution", "both"):
        stages += [
            keep("knowledge", lambda: attr.knowledge_stage(model, s)),
            # methods first: its exact FFN rows fill the cache the value-neuron stage reads
            keep("methods", lambda: attr.method_stage(model, get(*data[:1], "method_dataset"), s)),
            keep("value_neurons", lambda: attr.value_neuron_stage(model, get(*data), s)),
            keep("zeroing", lambda: attr.intervention_stage(
                model, get(*data), get(*ffn), get(*att), s)),
            keep("query", lambda: query.query_stage(model, get(*data), get(*ffn), get(*att), s)),
            keep("walkthrough", lambda: query.walkthrough_stage(
                model, get(*data), get(*ffn), get(*att))),
            # issue 22: the rest of the attribution paper
            keep("query_zeroing", lambda: attr_stages.query_zeroing_stage(
                model, get(*data), get("query", "queries"), s)),
            keep("interpolation", lambda: attr_more.interpolation_stage(model, get(*data), s)),
            keep("value_layers", lambda: attr_more.value_layer_stage(
                model, get(*data), get(*ffn), get(*att), s)),
            keep("prob_histogram", lambda: attr_more.prob_histogram_stage(
                model, get(*data), get(*ffn), s)),
            keep("head_types", lambda: attr_stages.head_type_stage(model, get(*data), s)),
            keep("shared_neurons", lambda: attr_more.shared_neuron_stage(
                get(*data), get(*ffn), get("query", "queries"), s)),
            keep("query_tokens", lambda: attr_stages.query_token_stage(
                model, get(*data), get(*att), s)),
        ]  # fmt: skip
    if paper in ("arithmetic", "both"):
        cases, head = ("arithmetic_data", "dataset"), ("heads", "head")
        stages += [
            keep("arithmetic_data", lambda: arith.arithmetic_stage(model, s)),
            keep("heads", lambda: arith.head_stage(model, get(*cases), s)),
            keep("cna", lambda: arith.cna_stage(model, get(*cases), get(*head), s)),
            keep("shallow", lambda: shallow_stage.shallow_stage(
                model, get("cna", "cases"), get("heads", "shallow_head"), s)),
        ]  # fmt: skip
    results = run_stages(stages, progress, lock)
    settings_dict = {k: v for k, v in vars(s).items()}
    return Reproduction(
        str(model.cfg.model_name), settings_dict, tuple(results),
        stamp.get("machine", machine()), stamp.get("date", now()),
        load_end=load_average(),
    )  # fmt: skip
