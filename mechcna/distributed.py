"""Dataset-level analyses on a Ray cluster: sharded work, a model replica per worker, exact merges.

A paper-scale run (1,600 arithmetic cases x 1,024 heads, thousands of attribution prompts) does
not fit one process. This module runs the dataset-level analyses as `Ray <https://ray.io>`_
tasks (the optional extra ``pip install mechcna[distributed]``; Ray is imported only here and
only when used):

* :func:`head_sweep`: sharded by heads and by cases; each shard is a
  :func:`mechcna.head_sweep` on the worker, and the shards' per-head per-case results are
  concatenated back into one :class:`~mechcna.HeadSweep`.
* :func:`neuron_importance`, :func:`attention_neuron_importance`, :func:`layer_importance`,
  :func:`head_importance`, the method comparison (:func:`comparison_scores`) and dataset CNA
  (:func:`compare_neurons`): sharded by prompts and concatenated along the prompt axis.

Each worker holds its own model replica, loaded **on the worker** by name or path with
:func:`mechcna.load_model` (``load=`` gives its keyword arguments: ``dtype``, ``device``,
``processing``, ...) and kept for the following tasks of that worker process; a model object
is never pickled. Static row caches (:class:`~mechcna.BlockCache`) stay per worker, or on a
shared disk when ``MECHCNA_CACHE_DIR`` names one.

Shards are cut where the single-process code cuts its own work: case shards follow
:func:`mechcna.head_sweep`'s length-sorted batches (whole batches of ``batch_size``) and head
shards its passes (whole groups of ``heads_per_pass`` heads of one layer), so every forward
pass of a shard is the very pass the single process runs and the merged sweep equals the
single-process one. Attribution shards run fewer prompts per forward pass than one process
does (different padding), which changes results only by float rounding (``1e-12`` in float64).

Ray: :func:`connect` starts a local cluster (``ray.init(num_cpus=...)``) unless one is already
initialised; ``address=`` (or the ``RAY_ADDRESS`` environment variable) joins an existing one.
Each task uses ``threads`` CPUs and as many torch threads. A worker process that dies has its
shard retried (``max_retries``) and the merged result is unchanged. Progress is one bar over
all workers, advanced as shards finish (``progress=False`` turns it off).

Example:
    >>> from mechcna import distributed                                         # doctest: +SKIP
    >>> sweep = distributed.head_sweep("smollm2-135m", dataset, workers=8)       # doctest: +SKIP
    >>> res = distributed.neuron_importance("mechcna/arith-small", prompts)      # doctest: +SKIP
"""

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

import mechcna
from mechcna._types import Tensor
from mechcna.errors import MechcnaError

Head = tuple[int, int]
ModelSource = Any  # a name or path (str or os.PathLike); checked by _check_source

# ------------------------------------------------------------------------------- the cluster
_REMOTE: dict[str, Any] = {}
_MODELS: dict[str, Any] = {}  # worker side: replicas by (source, load arguments)
#: Timings of the latest :func:`run_shards` call in this process: ``tasks``, ``wall_s`` (first
#: submission to last result), ``task_s`` (the shards' own run time on the workers, model
#: loading excluded, summed), ``workers``. For benchmarks: ``wall_s * workers - task_s`` is
#: what scheduling, transfers and loading cost.
LAST_RUN: dict[str, float] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise MechcnaError(
            "the distributed analyses need Ray: pip install 'mechcna[distributed]'"
        ) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None, **init: Any) -> Any:
    """Connect to Ray: join ``address`` (or ``RAY_ADDRESS``) or start a local cluster.

    Does nothing when Ray is already initialised in this process.

    Args:
        address: a cluster address (``"ray://host:10001"``, ``"host:6379"``, ``"auto"``);
            default ``RAY_ADDRESS`` when set, else a new local cluster.
        num_cpus: CPUs of a new local cluster (default: all of this machine's).
        init: further keyword arguments of ``ray.init``.

    Workers import the ``mechcna`` installed where they run (local workers start in this
    process's working directory, so a source checkout run from its root is the one they
    import); a ``runtime_env`` in ``init`` can ship a different one.

    Returns:
        The ``ray`` module.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": False, **init}
    if address is None:  # a new local cluster (a running one is joined as it is)
        address = "local"  # not one found in /tmp/ray (ray.init's default)
        kwargs.setdefault("num_cpus", num_cpus)
        kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, **kwargs)
    return ray


def _load_key(source: ModelSource, load: Mapping[str, Any]) -> str:
    return repr((str(source), sorted((k, repr(v)) for k, v in load.items())))


def worker_model(source: ModelSource, load: Mapping[str, Any] | None = None) -> Any:
    """The model replica of this process, loaded on first use with :func:`mechcna.load_model`."""
    load = dict(load or {})
    key = _load_key(source, load)
    if key not in _MODELS:
        _MODELS[key] = mechcna.load_model(source, **load)
    return _MODELS[key]


def _run_shard(
    source: ModelSource,
    load: Mapping[str, Any],
    threads: int,
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
) -> Any:
    """A task: ``fn(model, **kwargs)`` on this worker's replica, with ``threads`` torch
    threads."""
    torch.set_num_threads(threads)
    model = worker_model(source, load)
    start = time.perf_counter()
    out = fn(model, **kwargs)
    return out, time.perf_counter() - start


def _remote(ray: Any) -> Any:
    if "run" not in _REMOTE:
        _REMOTE["run"] = ray.remote(_run_shard)
    return _REMOTE["run"]


def _check_source(model: Any) -> ModelSource:
    if isinstance(model, (str, os.PathLike)):
        return model
    raise MechcnaError(
        "pass the model's name or path (and load= for mechcna.load_model's options): each Ray "
        f"worker loads its own replica; got a {type(model).__name__}"
    )


def run_shards(
    model: ModelSource,
    fn: Callable[..., Any],
    shards: Sequence[Mapping[str, Any]],
    *,
    load: Mapping[str, Any] | None = None,
    weights: Sequence[int] | None = None,
    workers: int | None = None,
    address: str | None = None,
    threads: int = 1,
    gpus: float = 0.0,
    max_retries: int = 3,
    progress: bool = True,
    desc: str = "shards",
) -> list[Any]:
    """Run ``fn(model, **shard)`` for every shard on the cluster; results in shard order.

    Args:
        model: a name or path that :func:`mechcna.load_model` resolves on every worker.
        fn: a picklable function of the model and the shard's keyword arguments (a
            module-level function such as :func:`mechcna.head_sweep`).
        shards: the keyword arguments of each call.
        load: keyword arguments of :func:`mechcna.load_model` (``dtype``, ``device``, ...).
        weights: units of work per shard, for the progress bar (default 1 each).
        workers: shards in flight at once (default: the cluster's CPUs / ``threads``).
        address: the cluster to join (see :func:`connect`).
        threads: CPUs (and torch threads) per task.
        gpus: GPUs per task (e.g. ``1`` or ``0.5``; the model goes to CUDA by default there).
        max_retries: times a shard is rerun after its worker process died.
        progress: show one progress bar over all workers.
        desc: the bar's label.
    """
    source = _check_source(model)
    if threads < 1 or max_retries < 0:
        raise MechcnaError("threads must be positive and max_retries not negative")
    ray = connect(address)
    task = _remote(ray).options(num_cpus=threads, num_gpus=gpus, max_retries=max_retries)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    if workers < 1:
        raise MechcnaError(f"workers must be positive, not {workers}")
    weights = list(weights) if weights is not None else [1] * len(shards)
    load_args = dict(load or {})
    fn_ref = ray.put(fn)
    results: list[Any] = [None] * len(shards)
    pending: dict[Any, int] = {}
    queue = list(range(len(shards)))
    bar = tqdm(total=sum(weights), desc=desc, disable=not progress)
    start, task_s = time.perf_counter(), 0.0
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                i = queue.pop(0)
                ref = task.remote(source, load_args, threads, fn_ref, dict(shards[i]))
                pending[ref] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i], seconds = ray.get(ref)
                task_s += seconds
                bar.update(weights[i])
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    LAST_RUN.clear()
    LAST_RUN.update(tasks=len(shards), wall_s=time.perf_counter() - start, task_s=task_s,
                    workers=min(workers, len(shards)))  # fmt: skip
    return results


# ------------------------------------------------------------------------------ merging
def _pad_to(t: Tensor, dims: tuple[str, ...], sizes: Mapping[str, int]) -> Tensor:
    """Zero-pad the ``pos`` axes of one shard's tensor to the longest shard's."""
    if "pos" not in dims:
        return t
    axis = dims.index("pos")
    extra = sizes["pos"] - t.shape[axis]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[axis] = extra
    return torch.cat([t, t.new_zeros(shape)], axis)


def merge_scores(parts: Sequence[Any]) -> Any:
    """Concatenate prompt-sharded :class:`~mechcna.analyses.results.Scores` results (same class, same
    model) along the prompt axis into one result of that class.

    Score tensors and per-prompt extras are concatenated; ``pos`` axes (attention neurons,
    by-position heads) are zero-padded to the longest shard (positions past a prompt's scored
    position score 0); :class:`~mechcna.engine.expansion.EngineStats` counters are summed.
    """
    if not parts:
        raise MechcnaError("nothing to merge")
    first = parts[0]
    if any(type(p) is not type(first) or p.dims != first.dims for p in parts):
        raise MechcnaError("only results of one kind and shape can be merged")
    sizes = (
        {"pos": max(p.scores.shape[p.dims.index("pos")] for p in parts)}
        if ("pos" in first.dims)
        else {}
    )
    out: dict[str, Any] = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        v0 = values[0]
        if f.name in ("scores",):
            out[f.name] = torch.cat([_pad_to(v, first.dims, sizes) for v in values])
        elif f.name == "extras":
            out[f.name] = {
                k: torch.cat([_pad_to(v[k], first.dims, sizes) for v in values]) for k in v0
            }
        elif f.name in ("targets",):
            out[f.name] = tuple(x for v in values for x in v)
        elif f.name == "prompts":
            out[f.name] = (
                None if any(v is None for v in values) else tuple(x for v in values for x in v)
            )
        elif isinstance(v0, Tensor):
            out[f.name] = torch.cat(values)
        elif v0 is not None and type(v0).__name__ == "EngineStats":
            out[f.name] = replace(
                v0, **{g.name: sum(getattr(v, g.name) for v in values) for g in fields(v0)}
            )
        else:
            out[f.name] = v0
    return type(first)(**out)


def merge_head_sweeps(grid: Sequence[Sequence[Any]], labels: pd.DataFrame | None = None) -> Any:
    """One :class:`~mechcna.HeadSweep` from ``grid[case_shard][head_shard]`` sweeps.

    Head shards of one case shard are stacked along the ablation axis; case shards are then
    concatenated along the case axis (the baseline comes from each case shard's first sweep).

    Args:
        labels: the labels of all cases in order (default: the shards' labels concatenated).
    """
    if not grid or not all(grid):
        raise MechcnaError("nothing to merge")
    rows = []
    for sweeps in grid:
        rows.append(
            {
                "correct": torch.cat([s.correct for s in sweeps]),
                "logprob": torch.cat([s.logprob for s in sweeps]),
                "prediction": torch.cat([s.prediction for s in sweeps]),
            }
        )
    firsts = [sweeps[0] for sweeps in grid]
    heads = tuple(h for s in grid[0] for h in s.heads)
    means = None
    if firsts[0].means is not None:
        means = {hd: m for s in grid[0] for hd, m in (s.means or {}).items()}
    if labels is None:
        labels = pd.concat([s.labels for s in firsts], ignore_index=True)
    prompts = None
    if all(s.prompts is not None for s in firsts):
        prompts = tuple(p for s in firsts for p in s.prompts)
    return replace(
        firsts[0],
        heads=heads,
        correct=torch.cat([r["correct"] for r in rows], 1),
        logprob=torch.cat([r["logprob"] for r in rows], 1),
        prediction=torch.cat([r["prediction"] for r in rows], 1),
        base_correct=torch.cat([s.base_correct for s in firsts]),
        base_logprob=torch.cat([s.base_logprob for s in firsts]),
        base_prediction=torch.cat([s.base_prediction for s in firsts]),
        targets=torch.cat([s.targets for s in firsts]),
        labels=labels.reset_index(drop=True),
        prompts=prompts,
        means=means,
    )


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

    if mode == "mean" and not isinstance(reference, mechcna.HeadAblation):
        ref = prompts if reference is None else reference
        (means,) = run_shards(
            source, _sweep_means,
            [{"heads": heads_t, "reference": ref,
              "position": position if reference is None else None, "batch_size": batch_size}],
            progress=False, **common,
        )  # fmt: skip
        reference = mechcna.HeadAblation(heads_t, mode="mean", means=means)

    ray = connect(address)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)

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
        source, mechcna.head_sweep, shards, weights=weights, workers=workers,
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
    *,
    shards: int | None,
    load: Mapping[str, Any] | None,
    workers: int | None,
    address: str | None,
    threads: int,
    gpus: float,
    max_retries: int,
    progress: bool,
    options: Mapping[str, Any],
) -> Any:
    source = _check_source(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor) and prompts.ndim == 1:
        prompts = prompts[None]
    n = _n_prompts(prompts)
    ray = connect(address)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
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
        source, fn, jobs, load=load, weights=[len(g) for g in groups],
        workers=workers, address=address, threads=threads, gpus=gpus, max_retries=max_retries,
        progress=progress, desc=f"{name} (prompts)",
    )  # fmt: skip
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
    task: Callable[..., Any] = fn if fn is not None else getattr(mechcna, name)

    def run(
        model: ModelSource,
        prompts: Any,
        targets: Any = None,
        *,
        shards: int | None = None,
        load: Mapping[str, Any] | None = None,
        workers: int | None = None,
        address: str | None = None,
        threads: int = 1,
        gpus: float = 0.0,
        max_retries: int = 3,
        progress: bool = True,
        **options: Any,
    ) -> Any:
        if "cache" in options:
            raise MechcnaError("a BlockCache stays in its process: each worker keeps its own")
        return _attribute(
            name, task, model, prompts, targets, shards=shards, load=load, workers=workers,
            address=address, threads=threads, gpus=gpus, max_retries=max_retries,
            progress=progress, options=options,
        )  # fmt: skip

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

    ``other`` is an intervention or a list of them (e.g. a :class:`~mechcna.HeadAblation`),
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

__all__ = [
    "LAST_RUN",
    "attention_neuron_importance",
    "compare_neurons",
    "comparison_scores",
    "connect",
    "head_importance",
    "head_sweep",
    "layer_importance",
    "merge_head_sweeps",
    "merge_scores",
    "neuron_importance",
    "run_shards",
    "worker_model",
]
