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
#: Seconds per unit on SmolLM2-135M, 2 CPU cores (from the full-preset record at 3a06ee7).
_UNIT = {
    "knowledge": 0.034,  # per written prompt through the filter
    "methods_fixed": 80.0,  # every FFN neuron's vocabulary row, once
    "methods": 5.0,  # per prompt (9 scorings, each a forward pass)
    "value_neurons": 4.0,  # per prompt
    "zeroing": 0.47,  # per prompt and forward pass
    "query": 0.25,  # per prompt
    "walkthrough": 4.0,  # once
    # issue 22 (ATTR), not yet measured on SmolLM2: the forward passes at the zeroing stage's
    # unit, the vocabulary projections from their FLOP count at ~90 GFLOP/s
    "query_zeroing": 0.47,  # per prompt and forward pass (3 + random draws passes)
    "interpolation": 0.1,  # per prompt (one capture, 82 projected points)
    "value_layers": 0.05,  # per prompt
    "prob_histogram": 0.1,  # per prompt (one capture, 30 projected points)
    "head_types": 0.2,  # per prompt (head importance) + forward passes below
    "shared_neurons": 0.05,  # per prompt
    "query_tokens": 0.2,  # per prompt
    "arithmetic_data": 0.05,  # per case
    "heads": 0.016,  # per case and head (zero-shot prompts; few-shot about twice)
    "cna": 0.35,  # per case and forward pass
    "shallow": 0.7,  # per (neuron layer, reader layer) pair
    "pe_graph": 1.0,  # per CNA case (7.9 s before one call per case instead of six: guess)
    "trace": 1.5,  # per traced case (five captures; SmolLM2 quick, load ~2)
    "cells": 0.016,  # per extra case and ablated head (as the head sweep)
}


def _params(model: Model) -> float:
    c = model.cfg
    d_mlp = int(c.d_mlp or 4 * c.d_model)
    return float(c.n_layers * (4 * c.d_model**2 + 3 * c.d_model * d_mlp) + c.d_vocab * c.d_model)


def expected_times(model: Model, settings: ReproduceSettings, paper: str = "both") -> pd.DataFrame:
    """A rough wall time (seconds) per stage on a 2-core CPU for ``model`` and ``settings``
    (sizes that depend on the model's answers, e.g. filter survivors, are guessed: 40% of
    the written prompts survive, the top head is at 60% depth, 80% of CNA cases are right).
    Meant for models of SmolLM2's size and up: on tiny models Python overhead dominates and the
    estimate is far too low."""
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
            ("attribution", "knowledge", u["knowledge"] * len(written)),
            ("attribution", "methods", u["methods_fixed"] + u["methods"] * m),
            ("attribution", "value_neurons", u["value_neurons"] * n),
            ("attribution", "zeroing", u["zeroing"] * n * (2 + s.random_draws)),
            ("attribution", "query", u["query"] * n),
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
        heads = model.cfg.n_layers * model.cfg.n_heads
        cna = 0.8 * (100 if s.cna_split == "all" else cases / max(len(s.digits), 1) / 2)
        cna = cna if s.cna_cases is None else min(cna, s.cna_cases)
        passes = 3 * len(s.cna_ks) + 3 + s.random_draws + 2 * len(s.cna_ks)
        layer = max(1, int(0.6 * model.cfg.n_layers))
        readers = layer + 1 if s.zero_shot_readers is None else s.zero_shot_readers
        rows += [
            ("arithmetic", "arithmetic_data", u["arithmetic_data"] * cases * few),
            ("arithmetic", "heads", u["heads"] * sweep * heads * few),
            ("arithmetic", "cna", u["cna"] * cna * passes * few),
            ("arithmetic", "shallow", chains * u["shallow"] * layer * readers / 2),
        ]
        rows += _more_arithmetic(model, s, float(cna), float(passes * few), layer * readers / 2.0)
    frame = pd.DataFrame(rows, columns=["paper", "stage", "expected seconds"])
    frame["expected seconds"] *= scale
    total = pd.DataFrame([{"paper": "", "stage": "total",
                           "expected seconds": frame["expected seconds"].sum()}])  # fmt: skip
    return pd.concat([frame, total], ignore_index=True)


def _more_arithmetic(
    model: Model, s: ReproduceSettings, cna: float, passes: float, pairs: float
) -> list[tuple[str, str, float]]:
    """Expected seconds of the stages of :mod:`~mechcna.reproduce.arith_graph` and
    :mod:`~mechcna.reproduce.arith_cells` (``cna`` cases, ``passes`` forward passes per CNA
    case, ``pairs`` (neuron layer, reader layer) pairs of a zero-shot search)."""
    from mechcna.reproduce.arith_cells import extra_cells
    from mechcna.tasks.arithmetic import arithmetic_dataset

    u = _UNIT
    traced = cna if s.trace_cases is None else min(cna, s.trace_cases)
    extra = len(extra_cells(model, s, "zero-shot"))
    heads = 1 + s.cell_heads * len(s.operations)
    rows = [
        ("arithmetic", "pe_graph", u["pe_graph"] * cna),
        ("arithmetic", "trace", u["trace"] * traced),
        ("arithmetic", "cells", u["cells"] * extra * (1 + heads)),
    ]
    if s.division and "/" in s.operations:
        every = arithmetic_dataset("/", min(s.digits), s.templates, None, split="all")
        n = 0.6 * len(every)
        n = n if s.division_cases is None else min(n, s.division_cases)
        zero_shot = u["shallow"] * pairs if s.division_zero_shot else 0.0
        rows.append(("arithmetic", "division", u["cna"] * n * passes + zero_shot))
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
