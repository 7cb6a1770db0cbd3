"""Planning a reproduction: expected stage times before it starts, and resumable checkpoints.

* :func:`expected_times`: a rough wall time per stage for a model and settings, from unit costs
  measured on SmolLM2-135M on the 2-core CPU machine (docs/reproduce/smollm2-135m.md), scaled
  by the model's parameter count (the method comparison's vocabulary rows by the row work
  ``n_layers x d_mlp x d_model x d_vocab``), plus the attribution calls of models whose rows the
  memory budget cannot keep, calibrated on Gemma 3 270M. An estimate to decide whether to
  start, not a measurement.
* :class:`Checkpoint`: each finished stage pickled under a folder keyed by the model and the
  settings; a rerun with the same model and settings loads the finished stages and continues.
"""

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pandas as pd

from mechcna.models.backend import Model
from mechcna.reproduce.core import ReproduceSettings, StageResult

#: SmolLM2-135M's parameter count as the unit costs below count it (blocks + embedding).
_REFERENCE_PARAMS = 147e6
#: The guessed share of 1-digit cases a model gets right, zero-shot and few-shot (:func:`_right`).
RIGHT_ZERO_SHOT, RIGHT_FEW_SHOT = 0.3, 0.7
#: Seconds per unit on SmolLM2-135M, 2 CPU cores, 2 torch threads, **nothing else running**
#: (load 1.6-2.1: the run's own threads): the standard record of 2026-12-04 18:48 UTC
#: (docs/reproduce/smollm2-135m.md, 1,200 s of stage time), each stage's unit set so that the
#: estimate equals that run's time. Stages that run was not sized to measure (left to
#: ``paper`` then) are scaled from their nearest measured stage, as said per line. Under load
#: the stages take longer: the quick record at load 3.2-3.7 ran the head sweep 5x and CNA 7x
#: slower per unit (two threads sharing a core with another job).
_UNIT = {
    "knowledge_fixed": 0.0,
    "knowledge": 172.3 / 4238,  # per written prompt through the filter (4,238 prompts)
    "methods_fixed": 80.0,  # every FFN neuron's vocabulary row, once
    "methods": (234.2 - 80.0) / 24,  # per prompt (9 scorings; 24 prompts)
    "value_neurons_fixed": 26.3,
    "value_neurons": (99.9 - 26.3) / 40,  # per prompt (40 prompts)
    "zeroing": 163.4 / (40 * 7),  # per prompt and forward pass
    "query_fixed": 2.0,
    "query": 2.1 / 40,  # per prompt
    "walkthrough": 2.8,  # once
    "query_zeroing": 163.4 / (40 * 7),  # per prompt and forward pass, as zeroing
    "interpolation": 5.6 / 40,  # per prompt
    "value_layers": 4.8 / 40,  # per prompt
    "prob_histogram": 2.2 / 40,  # per prompt
    "head_types": 0.05,  # per prompt (head importance, as query) + forward passes as zeroing
    "shared_neurons": 0.01,  # per prompt
    "query_tokens": 2.5 / 40,  # per prompt
    # arithmetic: zero-shot, 400 sweep cases (every head on the selection half), 14 CNA cases
    "arithmetic_data": 15.8 / 957,  # per held-out case generated (957)
    "heads": 399.9 / 56390,  # per (case, forward pass): a head ablated, or none
    "cna_case": 2.9 * 0.6,  # per case: its CNA (the certified importances) ...
    "cna": 2.9 * 0.4 / 33,  # ... and per forward pass (mask / keep / random / lowest-neuron)
    # shallow: 19.5 s with the head in layer 1 (one pair); the per-pair unit is the helper
    # check's 0.7 s at load ~3.5, kept (not measured quietly: heads deeper cost more pairs)
    "shallow_fixed": 18.8,  # Table 7 and the random sets of Table 8
    "shallow": 0.7,  # per (neuron layer, reader layer) pair
    "pe_graph": 1.2 / 14,  # per CNA case
    "trace": 11.1 / 12,  # per traced case
    "cells": 19.3 / (55 * 17),  # per (extra case, forward pass)
}


#: Seconds of one neuron-attribution call per (layer x d_model^2 x d_vocab) on a model whose
#: rows the default cache cannot keep, so that the engine streams (per prompt and layer a
#: d_model x d_model covariance over the vocabulary, plus the rows the second-order bound
#: leaves): Gemma 3 270M's all-FFN call, 74 s for 18 layers (warm: each layer's row ranges
#: kept), d_model 640 and 262,144 tokens, 2 threads on the 2-core machine
#: (docs/benchmarks.md, 2026-12-05; 132 s before the exact range bounds).
_STREAM_SECONDS = 74.0 / (18 * 640**2 * 262144)
#: Seconds per byte of int16 rows of one call whose rows are kept in the disk cache but not in
#: memory (``MECHCNA_DISK_CACHE_BYTES`` above the rows, the memory budget below them): Gemma 3
#: 270M's all-FFN call, 20.0-22.5 s for 19.3 GB of rows (docs/benchmarks.md, 2026-12-04).
_DISK_SECONDS = 21.0 / 19.3e9
#: Every FFN neuron's vocabulary row on SmolLM2-135M (the method comparison's fixed part):
#: ``n_layers x d_mlp x d_model x d_vocab`` multiply-adds. That part of the method stage scales
#: with this product, not with the parameter count (Gemma 3 270M: 4.7x SmolLM2's, against
#: 1.8x the parameters).
_REFERENCE_ROW_WORK = 30 * 1536 * 576 * 49152
#: Seconds per unit of that row work that the method comparison adds when the rows do not fit
#: the memory budget (float64 rows of 262,144 tokens that no cache holds, quantised and written
#: to the disk cache): the rest of Gemma 3 270M's measured 2,950 s (the standard record of
#: 2026-12-05, docs/reproduce/gemma-3-270m-attribution.md, with ``MECHCNA_DISK_CACHE_BYTES=40G``)
#: over what the row work and the streamed calls predict (1,165 s).
_UNKEPT_ROW_SECONDS = (2950.2 - 1165.2) / (18 * 2048 * 640 * 262144)
#: attribution calls (FFN or attention neurons, streamed) per prompt or case of each stage
_STREAM_CALLS = {"methods": 1, "value_neurons": 2, "cna": 2, "trace": 2, "division": 2}


def streamed_call_seconds(model: Model) -> float:
    """Expected seconds of one attribution call beyond what the model's size predicts: 0 when
    the memory budget keeps every layer's FFN rows as int16; their reading time when only the
    disk cache can keep them (its limit, ``MECHCNA_DISK_CACHE_BYTES``, above them); otherwise
    the streaming call's covariances (:meth:`mechcna.engine.blocks.BlockCache.can_hold`)."""
    from mechcna.engine.blocks import default_budget
    from mechcna.engine.rows import default_disk_dir, disk_limit

    c = model.cfg
    rows = c.n_layers * _d_mlp(model) * c.d_vocab * 2
    if rows <= default_budget():
        return 0.0
    # the disk cache keeps int16 rows with their residual bytes (BlockCache.can_hold)
    if default_disk_dir() is not None and rows * 3 // 2 <= disk_limit():
        return _DISK_SECONDS * rows
    return _STREAM_SECONDS * c.n_layers * c.d_model**2 * c.d_vocab


def _d_mlp(model: Model) -> int:
    return int(model.cfg.d_mlp or 4 * model.cfg.d_model)


def _row_work(model: Model) -> float:
    """``n_layers x d_mlp x d_model x d_vocab``: the multiply-adds of every FFN neuron's
    vocabulary row."""
    c = model.cfg
    return float(c.n_layers * _d_mlp(model) * c.d_model * c.d_vocab)


def _params(model: Model) -> float:
    c = model.cfg
    d_mlp = _d_mlp(model)
    return float(c.n_layers * (4 * c.d_model**2 + 3 * c.d_model * d_mlp) + c.d_vocab * c.d_model)


def expected_times(model: Model, settings: ReproduceSettings, paper: str = "both") -> pd.DataFrame:
    """A rough wall time (seconds) per stage on a 2-core CPU for ``model`` and ``settings``
    (sizes that depend on the model's answers, e.g. filter survivors, are guessed: 40% of
    the written prompts survive, the top head is at 60% depth, 30% of 1-digit cases are right
    zero-shot and 70% few-shot). The unit costs were measured with nothing else running; a
    loaded machine runs several times slower. The head stage sweeps every head on the
    selection half of the cases and the handful of chosen heads on the evaluation half
    (:func:`head_passes`). Meant for models of SmolLM2's size and up: on tiny models Python
    overhead dominates and the estimate is far too low."""
    from mechcna.tasks.arithmetic import arithmetic_dataset

    s, u = settings, _UNIT
    scale = _params(model) / _REFERENCE_PARAMS
    rows: list[tuple[str, str, float]] = []
    if paper in ("attribution", "both"):
        written, n, m = _prompt_sizes(s)
        rows += [
            ("attribution", "knowledge", u["knowledge_fixed"] + u["knowledge"] * written),
            # + the vocabulary rows, scaled by row work below
            ("attribution", "methods", u["methods"] * m),
            ("attribution", "value_neurons", u["value_neurons_fixed"] + u["value_neurons"] * n),
            ("attribution", "zeroing", u["zeroing"] * n * (2 + s.random_draws)),
            ("attribution", "query", u["query_fixed"] + u["query"] * n),
            ("attribution", "walkthrough", u["walkthrough"]),
            ("attribution", "query_zeroing", u["query_zeroing"] * n * (3 + s.random_draws)),
            ("attribution", "interpolation", u["interpolation"] * n),
            ("attribution", "value_layers", u["value_layers"] * n),
            ("attribution", "prob_histogram", u["prob_histogram"] * n),
            # half the prompts are evaluated, each with and without every type's heads
            ("attribution", "head_types", u["head_types"] * n + u["zeroing"] * n / 2 * 7),
            ("attribution", "shared_neurons", u["shared_neurons"] * n),
            ("attribution", "query_tokens", u["query_tokens"] * n),
        ]
        off = {"query_zeroing": not s.query_zeroing, "head_types": not s.head_types}
        rows = [r for r in rows if not off.get(r[1], False)]
    if paper in ("arithmetic", "both"):
        cases = len(
            arithmetic_dataset(
                s.operations,
                s.digits,
                s.templates,
                s.n_pairs,
                tokenizer=model,
                seed=s.seed,
                split="heldout",
            )
        )
        sweep = cases if s.sweep_cases is None else min(cases, s.sweep_cases)
        # few-shot prompts cost about twice as much; "both" runs a zero-shot and a few-shot chain
        few = {"zero-shot": 1.0, "both": 3.0}.get(s.prompt_form, 2.0)
        chains = 2 if s.prompt_form == "both" else 1
        cna = _cna_cases(s)
        passes = 3 * len(s.cna_ks) + 3 + s.random_draws + 2 * len(s.cna_ks)
        per_case = (u["cna_case"] + u["cna"] * passes) * few  # seconds per CNA case
        layer = max(1, int(0.6 * model.cfg.n_layers))
        readers = layer + 1 if s.zero_shot_readers is None else s.zero_shot_readers
        rows += [
            ("arithmetic", "arithmetic_data", u["arithmetic_data"] * cases * few),
            ("arithmetic", "heads", u["heads"] * head_passes(model, s, sweep) * few),
            ("arithmetic", "cna", per_case * cna),
            ("arithmetic", "shallow",
             chains * (u["shallow_fixed"] + u["shallow"] * layer * readers / 2)),
        ]  # fmt: skip
        rows += _more_arithmetic(model, s, float(cna), per_case, layer * readers / 2.0)
    frame = pd.DataFrame(rows, columns=["paper", "stage", "expected seconds"])
    frame["expected seconds"] *= scale
    methods = frame["stage"] == "methods"
    work = _row_work(model)
    # the method comparison's rows scale with the row work, not with the parameters
    frame.loc[methods, "expected seconds"] += u["methods_fixed"] * work / _REFERENCE_ROW_WORK
    call = streamed_call_seconds(model)
    if call > 0:  # rows the cache cannot keep: each attribution call streams
        counts = _stream_counts(s)
        extra = frame["stage"].map(lambda st: call * counts.get(st, 0.0))
        frame["expected seconds"] += extra
        frame.loc[methods, "expected seconds"] += _UNKEPT_ROW_SECONDS * work
    total = pd.DataFrame([{"paper": "", "stage": "total",
                           "expected seconds": frame["expected seconds"].sum()}])  # fmt: skip
    return pd.concat([frame, total], ignore_index=True)


def _prompt_sizes(s: ReproduceSettings) -> tuple[int, float, float]:
    """``(written, n, m)``: knowledge prompts written, prompts attributed (40% guessed to
    survive the filter) and method prompts."""
    from mechcna.tasks.knowledge import knowledge_prompts

    written = knowledge_prompts()
    if s.knowledge_per_type is not None:
        written = written.head(s.knowledge_per_type)
    survivors = 0.4 * len(written)
    n = survivors if s.max_prompts is None else min(survivors, s.max_prompts)
    if s.prompts_per_type is not None:
        n = min(n, 6 * s.prompts_per_type)
    return len(written), float(n), float(min(survivors, s.method_prompts))


def _cna_cases(s: ReproduceSettings) -> float:
    cna = _right(s) * len(cna_pool(s))
    return float(cna if s.cna_cases is None else min(cna, s.cna_cases))


def _division_cases(s: ReproduceSettings) -> float:
    from mechcna.tasks.arithmetic import arithmetic_dataset

    every = arithmetic_dataset("/", min(s.digits), s.templates, None, split="all")
    n = _right(s) * len(every)
    return float(n if s.division_cases is None else min(n, s.division_cases))


def _stream_counts(s: ReproduceSettings) -> dict[str, float]:
    """Streamed attribution calls per stage (:data:`_STREAM_CALLS` times its prompts or
    cases, sized as :func:`expected_times` sizes them)."""
    _, n, m = _prompt_sizes(s)
    cna = _cna_cases(s)
    traced = cna if s.trace_cases is None else min(cna, s.trace_cases)
    chains = 2 if s.prompt_form == "both" else 1
    division = _division_cases(s) if s.division and "/" in s.operations else 0.0
    sizes = {"methods": m, "value_neurons": n, "cna": cna * chains, "trace": traced,
             "division": division}  # fmt: skip
    return {k: _STREAM_CALLS[k] * v for k, v in sizes.items()}


def _right(s: ReproduceSettings) -> float:
    """The guessed share of 1-digit cases the model gets right (CNA and division keep those):
    SmolLM2-135M zero-shot 5 of 19 held-out 1-digit + / - cases (the quick record), few-shot
    about 0.7 (67% of 1-digit + with a two-line prefix, ENVIRONMENT.md)."""
    return RIGHT_ZERO_SHOT if s.prompt_form == "zero-shot" else RIGHT_FEW_SHOT


def head_passes(model: Model, s: ReproduceSettings, sweep: int) -> float:
    """(case, forward pass) pairs of the head stage for ``sweep`` cases: every head plus the
    unablated pass on the selection half (``ceil(sweep / 2)`` cases), the chosen heads plus the
    unablated pass on the evaluation half (the + / - head, the shallow head, the division head
    when ``/`` is swept and each operation's top head: at most ``2 + ops + 1``, fewer when
    one head has several roles)."""
    heads = int(model.cfg.n_layers * model.cfg.n_heads)
    select = (sweep + 1) // 2
    held = 2 + len(s.operations) + (1 if "/" in s.operations else 0)
    return float(select * (heads + 1) + (sweep - select) * (held + 1))


def cna_pool(s: ReproduceSettings) -> Any:
    """The + and - cases of the smallest digit count that CNA draws its correct cases from
    (every pair with ``cna_split="all"``, else the held-out ones)."""
    from mechcna.tasks.arithmetic import arithmetic_dataset

    ops = [o for o in ("+", "-") if o in s.operations] or list(s.operations)
    n_pairs = None if s.cna_split == "all" else s.n_pairs
    return arithmetic_dataset(ops, min(s.digits), s.templates, n_pairs, seed=s.seed,
                              split="all" if s.cna_split == "all" else "heldout")  # fmt: skip


def _more_arithmetic(
    model: Model, s: ReproduceSettings, cna: float, per_case: float, pairs: float
) -> list[tuple[str, str, float]]:
    """Expected seconds of the stages of :mod:`~mechcna.reproduce.arith_graph` and
    :mod:`~mechcna.reproduce.arith_cells` (``cna`` cases, ``per_case`` seconds of CNA per case,
    ``pairs`` (neuron layer, reader layer) pairs of a zero-shot search)."""
    from mechcna.reproduce.arith_cells import extra_cells

    u = _UNIT
    traced = cna if s.trace_cases is None else min(cna, s.trace_cases)
    extra = len(extra_cells(model, s, "zero-shot"))
    heads = 1 + s.cell_heads * len(s.operations)
    rows = [
        ("arithmetic", "pe_graph", u["pe_graph"] * cna),
        ("arithmetic", "trace", u["trace"] * traced),
        ("arithmetic", "cells", u["cells"] * extra * (1 + heads)),  # + the unablated pass
    ]
    if s.division and "/" in s.operations:
        n = _division_cases(s)
        zero_shot = u["shallow_fixed"] + u["shallow"] * pairs if s.division_zero_shot else 0.0
        rows.append(("arithmetic", "division", per_case * n + zero_shot))
    return rows


class Checkpoint:
    """Finished stages saved under ``folder/checkpoint-<key>/`` where ``key`` hashes the model
    name, the paper selection and the settings: a rerun with the same three loads them."""

    def __init__(self, folder: str | Path, model_name: str, paper: str, settings: dict[str, Any]):
        blob = json.dumps([model_name, paper, {k: repr(v) for k, v in settings.items()}],
                          sort_keys=True)  # fmt: skip
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        self.folder = Path(folder) / f"checkpoint-{key}"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pkl"

    def load(self, name: str) -> StageResult | None:
        """The saved stage ``name``, or ``None``."""
        p = self.path(name)
        if not p.is_file():
            return None
        with open(p, "rb") as f:
            return pickle.load(f)

    def save(self, result: StageResult) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(result.name).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(result, f)
        tmp.replace(self.path(result.name))  # a stage is saved whole or not at all

    def finished(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.pkl"))
