"""The Ray side of :mod:`mechcna.distributed`: connecting to a cluster, a model replica per
worker loaded by name or path, and running shards with retries and one progress bar.
"""

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from mechcna.errors import MechcnaError
from mechcna.models.loading import load_model

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


class Cluster(TypedDict, total=False):
    """:func:`run_shards`'s keyword arguments that the distributed analyses pass on unchanged
    (each described, with its default, there)."""

    load: Mapping[str, Any] | None
    workers: int | None
    address: str | None
    threads: int
    gpus: float
    max_retries: int
    progress: bool


#: The keys of :class:`Cluster`.
CLUSTER_KEYS = frozenset(Cluster.__annotations__)


def default_workers(ray: Any, workers: int | None, threads: int) -> int:
    """``workers``, or by default the cluster's CPUs / ``threads`` (at least one)."""
    if workers is not None:
        return workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)


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
        _MODELS[key] = load_model(source, **load)
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
    workers = default_workers(ray, workers, threads)
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
