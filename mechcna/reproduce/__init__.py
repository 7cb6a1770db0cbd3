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
from mechcna.reproduce import arith_cells, arith_graph, attr_more, attr_stages, shallow_stage
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce import attribution as attr
from mechcna.reproduce import query_stages as query
from mechcna.reproduce.compare import ClaimComparison, compare_claims, read_claims
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
from mechcna.reproduce.scale import (
    RayRun,
    check_workers,
    memo,
    on_ray,
    refuse_without_ray_extra,
)

_log = logging.getLogger(__name__)

Which = Literal["attribution", "arithmetic", "both"]

__all__ = [
    "Claim",
    "ClaimComparison",
    "RayRun",
    "ReproduceSettings",
    "Reproduction",
    "StageResult",
    "build_report",
    "compare_claims",
    "expected_times",
    "read_claims",
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
    ray: RayRun | None = None,
) -> Reproduction:
    """Run the papers' stages on ``model`` and collect tables, figures, claims and timings.

    Args:
        paper: ``"attribution"``, ``"arithmetic"`` or ``"both"``.
        quick: use :meth:`ReproduceSettings.quick` (ignored when ``settings`` is given).
        settings: sizes and policies, or a preset name (``"quick"``, ``"standard"``,
            ``"paper"``, ``"full"``; default :meth:`ReproduceSettings.standard`).
        progress: a progress bar over stages.
        lock: a file to ``flock`` during each stage, released between stages (for machines
            shared with other heavy jobs; stage wall times then exclude the waits).
        checkpoint: a folder where each finished stage is saved (:class:`plan.Checkpoint`),
            and the attribution calls of unfinished ones shard by shard
            (:func:`mechcna.reproduce.scale.memo`);
            a rerun with the same model, paper and settings loads those and continues.
        ray: run the dataset-level work (head sweep, dataset CNA, mask / keep, value neurons,
            the method comparison) on a Ray cluster (:class:`mechcna.reproduce.scale.RayRun`:
            the model's name or path, loaded on each worker); the workers' weights are
            checked against ``model`` first. Results equal one process (see
            :mod:`mechcna.reproduce.scale`).

    The expected time per stage (:func:`plan.expected_times`) is logged before the start.

    Raises:
        MechcnaError: an unknown ``paper`` or preset.
    """
    if paper not in ("attribution", "arithmetic", "both"):
        raise MechcnaError(f"paper must be attribution, arithmetic or both, not {paper!r}")
    if isinstance(settings, str):
        settings = ReproduceSettings.named(settings)
    s = settings or (ReproduceSettings.quick() if quick else ReproduceSettings.standard())
    _log.info(
        "expected stage times (s, rough, 2-core CPU):\n%s",
        expected_times(model, s, paper).round(0).to_string(index=False),
    )
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
        # stages a preset may leave to `paper` (see ReproduceSettings.standard)
        off = {"query_zeroing": not s.query_zeroing, "head_types": not s.head_types}
        stages = [st for st in stages if not off.get(st[0], False)]
    for x, f in arith.prompt_forms(s) if paper in ("arithmetic", "both") else []:
        # one chain per prompt form; with prompt_form="both" stage names end in @<form>

        def form(fn: Callable[[], StageResult], x: str = x) -> Callable[[], StageResult]:
            return lambda: arith.with_form(fn(), x)

        cases, head = (f"arithmetic_data{x}", "dataset"), (f"heads{x}", "head")
        stages += [
            keep(cases[0], form(lambda f=f: arith.arithmetic_stage(model, f))),
            keep(head[0], form(lambda f=f, c=cases: arith.head_stage(model, get(*c), f))),
            keep(f"cna{x}", form(lambda f=f, c=cases, h=head: arith.cna_stage(
                model, get(*c), get(*h), f))),
            keep(f"shallow{x}", form(lambda f=f, x=x: shallow_stage.shallow_stage(
                model, get(f"cna{x}", "cases"), get(f"heads{x}", "shallow_head"), f))),
            keep(f"pe_graph{x}", form(lambda f=f, x=x: arith_graph.pe_graph_stage(
                model, get(f"cna{x}", "cases"), get(f"cna{x}", "cna"), f))),
            keep(f"trace{x}", form(lambda f=f, x=x, h=head: arith_graph.trace_stage(
                model, get(f"cna{x}", "cases"), get(f"cna{x}", "cna"), get(*h), f))),
            keep(f"cells{x}", form(lambda f=f, x=x, c=cases, h=head: arith_cells.cells_stage(
                model, get(*c), get(f"heads{x}", "sweep"), get(*h), f))),
        ]  # fmt: skip
        if f.division and "/" in f.operations:
            sweep, held = (f"heads{x}", "sweep"), (f"heads{x}", "held")
            stages.append(keep(f"division{x}", form(lambda f=f, c=cases, w=sweep, e=held: (
                arith_cells.division_stage(model, get(*c), get(*w), get(*e), f)))))  # fmt: skip
    refuse_without_ray_extra(ray)
    if ray is not None:
        check_workers(model, ray)
    with on_ray(ray), memo(saved.folder / "calls" if saved else None):
        results = run_stages(stages, progress, lock)
    settings_dict = {k: v for k, v in vars(s).items()}
    return Reproduction(
        str(model.cfg.model_name), settings_dict, tuple(results),
        stamp.get("machine", machine()), stamp.get("date", now()),
        load_end=load_average(),
    )  # fmt: skip
