"""The dataset-level analyses on a Ray cluster: each a drop-in for the library function of the
same name, with the model given by name or path (see :mod:`mechcna.distributed`).
"""

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

import pandas as pd
import torch
from typing_extensions import Unpack

from mechcna._types import Tensor
from mechcna.analyses import attribution as lib_attribution
from mechcna.analyses import heads as lib_heads
from mechcna.distributed.cluster import (
    CLUSTER_KEYS,
    Cluster,
    Head,
    ModelSource,
    _check_source,
    connect,
    default_workers,
    run_shards,
    worker_model,
)
from mechcna.distributed.merge import merge_head_sweeps, merge_scores
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import HeadAblation


# ------------------------------------------------------------------------------ inputs
def _unpack(data: Any, targets: Any, labels: pd.DataFrame | None) -> tuple[Any, Any, Any]:
    """(prompts, targets, labels) from a dataset object or plain prompts (as
    :func:`mechcna.head_sweep` reads them)."""
    if all(hasattr(data, a) for a in ("prompts", "targets", "to_frame")) and not isinstance(
        data, (str, Tensor)
    ):
        if targets is not None or labels is not None:
            raise MechcnaError("a dataset brings its own targets and labels: pass neither")
        return list(data.prompts), list(data.targets), data.to_frame()
    if isinstance(data, str):
        data = [data]
    return data, targets, labels


def _n_prompts(prompts: Any) -> int:
    if isinstance(prompts, str):
        return 1
    if isinstance(prompts, Tensor):
        return 1 if prompts.ndim == 1 else prompts.shape[0]
    return len(prompts)


def _take(items: Any, idx: Sequence[int]) -> Any:
    """Rows ``idx`` of prompts or per-prompt targets (a list, a tuple or a tensor)."""
    if isinstance(items, Tensor):
        return items[torch.as_tensor(list(idx), dtype=torch.long)]
    return [items[i] for i in idx]


def _per_prompt(targets: Any, n: int) -> bool:
    """Whether ``targets`` gives one target per prompt (else one for all, or none)."""
    if targets is None or isinstance(targets, (str, int)):
        return False
    if isinstance(targets, Tensor):
        return targets.numel() != 1 or n == 1
    return True


def _split(n: int, parts: int) -> list[list[int]]:
    size = math.ceil(n / max(1, min(parts, n)))
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _describe(
    model: Any, prompts: Any, position: int | None, heads: Sequence[Head] | None
) -> dict[str, Any]:
    """Worker side: the heads a sweep ablates and each case's scored position, as
    :func:`mechcna.head_sweep` computes them (so that shards follow its batches)."""
    from mechcna.analyses.heads import _check_heads, _tokenize  # the sweep's own input handling

    batch = _tokenize(model, prompts, position)
    return {"heads": _check_heads(model, heads), "positions": batch.positions.cpu().tolist()}


def _sweep_means(
    model: Any, heads: Sequence[Head], reference: Any, position: int | None, batch_size: int
) -> dict[Head, Tensor]:
    """Worker side: each head's mean ``z`` over ``reference`` exactly as the single-process
    sweep computes it (on the CPU, to travel)."""
    from mechcna.analyses.heads import _head_means, _tokenize

    means = _head_means(model, heads, _tokenize(model, reference, position), batch_size)
    return {hd: m.cpu() for hd, m in means.items()}


# ------------------------------------------------------------------------------ head sweep
def head_sweep(
    model: ModelSource,
    data: Any,
    targets: Any = None,
    *,
    labels: pd.DataFrame | None = None,
    heads: Sequence[Head] | None = None,
    mode: Literal["zero", "mean"] = "zero",
    reference: Any = None,
    position: int | None = None,
    batch_size: int = 64,
    heads_per_pass: int = 8,
    share_prefixes: bool = True,
    progress: bool = True,
    load: Mapping[str, Any] | None = None,
    workers: int | None = None,
    address: str | None = None,
    case_shards: int | None = None,
    head_shards: int | None = None,
    threads: int = 1,
    gpus: float = 0.0,
    max_retries: int = 3,
) -> Any:
    """:func:`mechcna.head_sweep` on a Ray cluster, sharded by cases and by heads.

    Arguments up to ``progress`` are :func:`mechcna.head_sweep`'s (``model`` is a name or path);
    the rest are :func:`run_shards`'s, plus:

    Args:
        case_shards: the number of case shards (default: enough for every worker); each holds
            whole length-sorted batches of ``batch_size`` cases, as the single process runs
            them.
        head_shards: the number of head shards (default: as many as the case shards leave
            workers idle); each holds whole passes of ``heads_per_pass`` heads of one layer.

    Returns:
        The :class:`~mechcna.HeadSweep` the single process returns, assembled from the shards.
    """
    if mode not in ("zero", "mean"):
        raise MechcnaError(f"mode must be 'zero' or 'mean', not {mode!r}")
    if batch_size < 1 or heads_per_pass < 1:
        raise MechcnaError("batch_size and heads_per_pass must be positive")
    source = _check_source(model)
    prompts, targets, labels = _unpack(data, targets, labels)
    n = _n_prompts(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    common = {"load": load, "address": address, "threads": threads, "gpus": gpus,
              "max_retries": max_retries}  # fmt: skip
    (info,) = run_shards(
        source, _describe, [{"prompts": prompts, "position": position, "heads": heads}],
        progress=False, **common,
    )  # fmt: skip
    heads_t: tuple[Head, ...] = info["heads"]
    positions: list[int] = info["positions"]
    if len(positions) != n:
        raise MechcnaError(f"{len(positions)} prompts read from {n}")
    if labels is not None and len(labels) != n:
        raise MechcnaError(f"{len(labels)} label rows for {n} prompts")

    if mode == "mean" and not isinstance(reference, HeadAblation):
        ref = prompts if reference is None else reference
        (means,) = run_shards(
            source, _sweep_means,
            [{"heads": heads_t, "reference": ref,
              "position": position if reference is None else None, "batch_size": batch_size}],
            progress=False, **common,
        )  # fmt: skip
        reference = HeadAblation(heads_t, mode="mean", means=means)

    workers = default_workers(connect(address), workers, threads)

    # case shards: whole batches in the sweep's own (length-sorted, stable) order
    order = sorted(range(n), key=lambda i: positions[i])
    n_batches = math.ceil(n / batch_size)
    batch_groups = _split(n_batches, case_shards or workers)
    case_groups = [
        sorted(i for b in group for i in order[b * batch_size : (b + 1) * batch_size])
        for group in batch_groups
    ]
    # head shards: whole passes (heads_per_pass heads of one layer, in the sweep's order)
    by_layer: dict[int, list[Head]] = {}
    for hd in heads_t:
        by_layer.setdefault(hd[0], []).append(hd)
    passes = [hs[i : i + heads_per_pass] for hs in by_layer.values()
              for i in range(0, len(hs), heads_per_pass)]  # fmt: skip
    if head_shards is None:
        head_shards = max(1, math.ceil(workers / len(case_groups)))
    head_groups = [[hd for p in group for hd in passes[p]]
                   for group in _split(len(passes), head_shards)]  # fmt: skip
    per_prompt = _per_prompt(targets, n)
    shards, weights = [], []
    for cases in case_groups:
        for hs in head_groups:
            shards.append(
                {
                    "data": _take(prompts, cases),
                    "targets": _take(targets, cases) if per_prompt else targets,
                    "labels": None if labels is None else labels.iloc[cases],
                    "heads": hs,
                    "mode": mode,
                    "reference": reference,
                    "position": position,
                    "batch_size": batch_size,
                    "heads_per_pass": heads_per_pass,
                    "share_prefixes": share_prefixes,
                    "progress": False,
                }
            )
            weights.append(len(cases) * len(hs))
    results = run_shards(
        source, lib_heads.head_sweep, shards, weights=weights, workers=workers,
        progress=progress, desc="head sweep (cases x heads)", **common,
    )  # fmt: skip
    k = len(head_groups)
    grid = [results[i * k : (i + 1) * k] for i in range(len(case_groups))]
    # the shards hold the cases in sorted-group order; put them back in the input order
    merged = merge_head_sweeps(grid)
    flat = [i for cases in case_groups for i in cases]
    back = torch.empty(n, dtype=torch.long)
    back[torch.tensor(flat)] = torch.arange(n)
    out_labels = (
        labels.reset_index(drop=True) if labels is not None else pd.DataFrame(index=range(n))
    )
    # and the heads back in the sweep's row order
    rows = torch.tensor([merged.heads.index(hd) for hd in heads_t], dtype=torch.long)
    return replace(
        merged,
        heads=heads_t,
        correct=merged.correct[rows][:, back],
        logprob=merged.logprob[rows][:, back],
        prediction=merged.prediction[rows][:, back],
        base_correct=merged.base_correct[back],
        base_logprob=merged.base_logprob[back],
        base_prediction=merged.base_prediction[back],
        targets=merged.targets[back],
        labels=out_labels,
        prompts=None if merged.prompts is None else tuple(merged.prompts[i] for i in back),
    )


# ------------------------------------------------------------------------------ attribution
def _attribute(
    name: str,
    fn: Callable[..., Any],
    model: ModelSource,
    prompts: Any,
    targets: Any,
    shards: int | None,
    options: Mapping[str, Any],
    cluster: Cluster,
) -> Any:
    source = _check_source(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor) and prompts.ndim == 1:
        prompts = prompts[None]
    n = _n_prompts(prompts)
    ray = connect(cluster.get("address"))
    workers = default_workers(ray, cluster.get("workers"), cluster.get("threads", 1))
    per_prompt = _per_prompt(targets, n)
    groups = _split(n, shards or workers)
    jobs = [
        {
            "prompts": _take(prompts, g),
            "targets": _take(targets, g) if per_prompt else targets,
            **options,
        }
        for g in groups
    ]
    parts = run_shards(
        source, fn, jobs, weights=[len(g) for g in groups], desc=f"{name} (prompts)", **cluster
    )
    return merge_scores(parts)


_RUN_DOC = """

    Distributed version of :func:`mechcna.{name}`: ``model`` is a name or path loaded on each
    worker (``load=``: :func:`mechcna.load_model`'s keyword arguments), the prompts are split
    into ``shards`` (default: one per worker) and the results concatenated along the prompt
    axis. ``options`` are :func:`mechcna.{name}`'s keyword arguments; ``workers``,
    ``address``, ``threads``, ``gpus``, ``max_retries`` and ``progress`` are
    :func:`run_shards`'s.
    """


def _make(name: str, fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
    task: Callable[..., Any] = fn if fn is not None else getattr(lib_attribution, name)

    def run(
        model: ModelSource,
        prompts: Any,
        targets: Any = None,
        *,
        shards: int | None = None,
        **options: Any,
    ) -> Any:
        if "cache" in options:
            raise MechcnaError("a BlockCache stays in its process: each worker keeps its own")
        cluster = cast(Cluster, {k: options.pop(k) for k in list(options) if k in CLUSTER_KEYS})
        return _attribute(name, task, model, prompts, targets, shards, options, cluster)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"{name} over a prompt set on a Ray cluster." + _RUN_DOC.format(name=name)
    return run


def _compare_shard(
    model: Any,
    prompts: Any,
    targets: Any = None,
    *,
    other: Any,
    other_load: Mapping[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Worker side of :func:`compare_neurons`: ``other`` is interventions, or the name or path
    of the second model, loaded here like the first."""
    from mechcna.analyses.comparative import compare_neurons as cna

    if isinstance(other, (str, os.PathLike)):
        other = worker_model(other, other_load)
    return cna(model, prompts, other, targets, **options)


def _comparison(model: Any, prompts: Any, targets: Any = None, **options: Any) -> Any:
    from mechcna.analyses.methods import comparison_scores

    return comparison_scores(model, prompts, targets, **options)


def compare_neurons(
    model: ModelSource,
    prompts: Any,
    other: Any,
    targets: Any = None,
    *,
    other_load: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Dataset CNA (:func:`mechcna.analyses.comparative.compare_neurons`) on a Ray cluster.

    ``other`` is an intervention or a list of them (e.g. a :class:`~HeadAblation`),
    or the name or path of a second model of the same architecture, loaded on each worker with
    ``other_load`` (default: ``load``). The other keyword arguments are those of the
    attribution functions of this module (``shards``, ``load``, ``workers``, ...) and of
    ``compare_neurons``. Returns the merged :class:`~mechcna.analyses.comparative.NeuronComparison`.
    """
    if other is not None and not isinstance(other, (str, os.PathLike)) and hasattr(other, "cfg"):
        _check_source(other)  # a model object: refused with the message for models
    load = kwargs.get("load")
    return _compare_run(
        model, prompts, targets, other=other, other_load=other_load or load, **kwargs
    )


_compare_run = _make("compare_neurons", _compare_shard)
#: Distributed :func:`mechcna.analyses.methods.comparison_scores` (the eight-method comparison).
comparison_scores = _make("comparison_scores", _comparison)
neuron_importance = _make("neuron_importance")
attention_neuron_importance = _make("attention_neuron_importance")
layer_importance = _make("layer_importance")
head_importance = _make("head_importance")


# ------------------------------------------------------------------------------ mask / keep
def _mask_keep_shard(
    model: Any, prompts: Any, targets: Any, plan: Any, batch_size: int
) -> dict[str, dict[int, Tensor]]:
    from mechcna.analyses.case_ablation import mask_keep_correct

    return mask_keep_correct(model, prompts, targets, plan, batch_size=batch_size, progress=False)


def mask_keep_table(
    model: ModelSource,
    prompts: Any,
    comparison: Any,
    *,
    ks: Sequence[int] = (100, 50, 30, 20, 10),
    deep_layers: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    shards: int | None = None,
    **cluster: Unpack[Cluster],
) -> pd.DataFrame:
    """The mask / keep / random table (:func:`mechcna.mask_keep_table`) on a Ray cluster.

    Every neuron set, the random ones included, is drawn here once
    (:func:`~mechcna.analyses.case_ablation.mask_keep_plan`); the cases are split into
    ``shards`` (default: one per worker), each worker scores its cases' correctness under every
    set, and the table is formed from the concatenated correctness: the same table as one
    process (each case's forward passes do not depend on the other cases of its batch).
    The other keyword arguments are :func:`run_shards`'s.
    """
    from mechcna.analyses.case_ablation import mask_keep_frame, mask_keep_plan

    source = _check_source(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    n = _n_prompts(prompts)
    if n != comparison.n_prompts:
        raise MechcnaError(f"{n} prompts for a comparison of {comparison.n_prompts}")
    plan = mask_keep_plan(comparison, ks=ks, deep_layers=deep_layers, seed=seed)
    ray = connect(cluster.get("address"))
    workers = default_workers(ray, cluster.get("workers"), cluster.get("threads", 1))
    groups = _split(n, shards or workers)
    targets = comparison.target_ids
    jobs = [
        {"prompts": _take(prompts, g), "targets": _take(targets, g), "plan": plan.take(g),
         "batch_size": batch_size}
        for g in groups
    ]  # fmt: skip
    parts = run_shards(
        source, _mask_keep_shard, jobs, weights=[len(g) for g in groups],
        desc="mask_keep_table (cases)", **cluster,
    )  # fmt: skip
    correct = {e: {k: torch.cat([p[e][k] for p in parts]) for k in parts[0][e]} for e in parts[0]}
    return mask_keep_frame(correct, plan)
