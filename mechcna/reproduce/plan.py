"""Planning a reproduction: expected stage times before it starts, and resumable checkpoints.

* :func:`expected_times`: a rough wall time per stage for a model and settings, from unit costs
  measured on SmolLM2-135M on the 2-core CPU machine (docs/reproduce/smollm2-135m.md), scaled
  by the model's parameter count. An estimate to decide whether to start, not a measurement.
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
#: The helper check of 2026-12-04 18:28 UTC (the arithmetic stages on SmolLM2-135M, split-then-
#: sweep head stage, 40 sweep cases of + - * / with 1 and 2 digits, 6 CNA cases with the five K,
#: warm row cache, 1 torch thread, load 1.3-2.0) ran the head stage at 0.0159 s per (case,
#: forward pass), the quick record's 0.0376 / 2.36: its figures below are scaled by this factor
#: to the quick record's load.
_CHECK_TO_QUICK = 0.0376 / 0.0159
#: Seconds per unit on SmolLM2-135M, 2 CPU cores. "quick": the quick record
#: (docs/reproduce/smollm2-135m-quick.md, 9ff6632, load 3.2-3.7, zero-shot, 2 torch threads);
#: "full": the full record (docs/reproduce/smollm2-135m.md, 3a06ee7, load ~1); "check": the
#: check above, scaled by ``_CHECK_TO_QUICK``. Where two exist, a fixed cost and a unit are
#: fitted through them, else the quick (loaded) figure is kept: the estimate is for a machine as
#: busy as the quick run's, and an unloaded one runs about 2-2.5x faster (the check's ratio).
_UNIT = {
    # knowledge: quick 12.8 s for 60 written prompts, full 13.3 s for 395: mostly fixed
    "knowledge_fixed": 12.7,
    "knowledge": 0.0015,  # per written prompt through the filter
    # methods: quick 73.7 s for 2 prompts, full 110 s for 6: the old units fit both
    "methods_fixed": 80.0,  # every FFN neuron's vocabulary row, once
    "methods": 5.0,  # per prompt (9 scorings)
    # value neurons: quick 29.8 s for 2 prompts, full 47.3 s for 12
    "value_neurons_fixed": 26.3,
    "value_neurons": 1.75,  # per prompt
    "zeroing": 0.47,  # per prompt and forward pass (quick 0.36, full 0.20: kept)
    "query_fixed": 12.0,  # quick 12.6 s for 2 prompts (full 2.7 s for 12: warm rows)
    "query": 0.25,  # per prompt
    "walkthrough": 18.0,  # once (quick 18 s; full 3.9 s with warm rows)
    # issue 22 (ATTR), not yet measured on SmolLM2: the forward passes at the zeroing stage's
    # unit, the vocabulary projections from their FLOP count at ~90 GFLOP/s
    "query_zeroing": 0.47,  # per prompt and forward pass (3 + random draws passes)
    "interpolation": 0.1,  # per prompt (one capture, 82 projected points)
    "value_layers": 0.05,  # per prompt
    "prob_histogram": 0.1,  # per prompt (one capture, 30 projected points)
    "head_types": 0.2,  # per prompt (head importance) + forward passes below
    "shared_neurons": 0.05,  # per prompt
    "query_tokens": 0.2,  # per prompt
    # arithmetic data: check 29.4 s for 957 cases (quick 0.9 s for 19)
    "arithmetic_data": 29.4 / 957 * _CHECK_TO_QUICK,  # per case
    # heads: quick 163.2 s for 16 cases x 271 passes (270 heads + the unablated one); the full
    # record's few-shot sweep with prefix sharing at load ~1: 0.032
    "heads": 0.0376,  # per (case, forward pass): a head ablated, or none
    # cna: quick 88.7 s for 5 cases x 18 passes (K in 50, 10); check 52.2 s for 6 cases x 33
    # passes (x 2.36 = 123 s): per case 14.4 s (its CNA, the certified importances) + 0.184 s
    # per pass (mask / keep / random / lowest-neuron forward passes)
    "cna_case": 14.4,
    "cna": 0.184,  # per case and forward pass
    # shallow: quick 52.1 s with the shallow head in layer 1 and one reader (half a pair);
    # check 19.0 s (x 2.36 = 44.8 s) with two readers
    "shallow_fixed": 51.8,  # Table 7 and the random sets of Table 8
    "shallow": 0.7,  # per (neuron layer, reader layer) pair
    "pe_graph": 0.28 / 6 * _CHECK_TO_QUICK,  # per CNA case (check: 0.28 s for 6)
    "trace": 3.03 / 3 * _CHECK_TO_QUICK,  # per traced case (check: 3.0 s for 3)
    # cells: check 39.0 s for 55 extra cases x 16 passes (longer prompts of templates 1-3 and
    # 3 digits, and small batches)
    "cells": 39.0 / (55 * 16) * _CHECK_TO_QUICK,  # per (extra case, forward pass)
}


def _params(model: Model) -> float:
    c = model.cfg
    d_mlp = int(c.d_mlp or 4 * c.d_model)
    return float(c.n_layers * (4 * c.d_model**2 + 3 * c.d_model * d_mlp) + c.d_vocab * c.d_model)


def expected_times(model: Model, settings: ReproduceSettings, paper: str = "both") -> pd.DataFrame:
    """A rough wall time (seconds) per stage on a 2-core CPU for ``model`` and ``settings``
    (sizes that depend on the model's answers, e.g. filter survivors, are guessed: 40% of
    the written prompts survive, the top head is at 60% depth, 30% of 1-digit cases are right
    zero-shot and 70% few-shot). The unit costs were measured under load (other jobs on the
    machine), so an unloaded machine runs faster. The head stage sweeps every head on the
    selection half of the cases and the handful of chosen heads on the evaluation half
    (:func:`head_passes`). Meant for models of SmolLM2's size and up: on tiny models Python
    overhead dominates and the estimate is far too low."""
    from mechcna.tasks.arithmetic import arithmetic_dataset
    from mechcna.tasks.knowledge import knowledge_prompts

    s, u = settings, _UNIT
    scale = _params(model) / _REFERENCE_PARAMS
    rows: list[tuple[str, str, float]] = []
    if paper in ("attribution", "both"):
        written = knowledge_prompts()
        if s.knowledge_per_type is not None:
            written = written.head(s.knowledge_per_type)
        survivors = 0.4 * len(written)
        n = survivors if s.max_prompts is None else min(survivors, s.max_prompts)
        if s.prompts_per_type is not None:
            n = min(n, 6 * s.prompts_per_type)
        m = min(survivors, s.method_prompts)
        rows += [
            ("attribution", "knowledge", u["knowledge_fixed"] + u["knowledge"] * len(written)),
            ("attribution", "methods", u["methods_fixed"] + u["methods"] * m),
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
        cna = _right(s) * len(cna_pool(s))
        cna = cna if s.cna_cases is None else min(cna, s.cna_cases)
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
    total = pd.DataFrame([{"paper": "", "stage": "total",
                           "expected seconds": frame["expected seconds"].sum()}])  # fmt: skip
    return pd.concat([frame, total], ignore_index=True)


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
    from mechcna.tasks.arithmetic import arithmetic_dataset

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
        every = arithmetic_dataset("/", min(s.digits), s.templates, None, split="all")
        n = _right(s) * len(every)
        n = n if s.division_cases is None else min(n, s.division_cases)
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
