"""Where a reproduction's dataset-level work runs: in this process (the default) or on a Ray
cluster (``mechcna reproduce --ray [ADDRESS] --workers N``; ``reproduce(..., ray=RayRun(...))``).

The stages call the functions of this module instead of the library's: the head sweep, dataset
CNA, the mask / keep table, FFN and attention value-neuron importance and the eight-method
comparison. Outside :func:`on_ray` they are the library functions; inside, they are the
:mod:`mechcna.distributed` versions, whose workers load the model by name or path
(:attr:`RayRun.model`) and whose merged results equal the single-process ones (bit for bit for
the head sweep and the mask / keep table; float rounding for attribution, whose shards pad
their prompts differently). Before the first stage, :func:`check_workers` loads the model on one
worker and refuses a run whose worker weights differ from the caller's model.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from mechcna.errors import MechcnaError
from mechcna.models.backend import Model
from mechcna.models.fingerprint import content_key


@dataclass(frozen=True)
class RayRun:
    """A Ray cluster for a reproduction.

    Attributes:
        model: the model's name or path, loaded on every worker by :func:`mechcna.load_model`.
        load: :func:`mechcna.load_model`'s keyword arguments on the workers.
        workers: shards in flight at once (default: the cluster's CPUs / ``threads``).
        address: the cluster to join (default ``RAY_ADDRESS``, else a new local cluster).
        threads: CPUs and torch threads per task.
    """

    model: str
    load: Mapping[str, Any] = field(default_factory=dict)
    workers: int | None = None
    address: str | None = None
    threads: int = 1

    def options(self) -> dict[str, Any]:
        return {"load": dict(self.load), "workers": self.workers, "address": self.address,
                "threads": self.threads, "progress": False}  # fmt: skip


_ACTIVE: ContextVar[RayRun | None] = ContextVar("mechcna_reproduce_ray", default=None)


@contextmanager
def on_ray(run: RayRun | None) -> Iterator[None]:
    """Route the stages' dataset-level work to ``run`` (``None``: this process) inside."""
    token = _ACTIVE.set(run)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def weights_key(model: Any) -> str:
    """One hash over the model's parameters (names, shapes, dtypes and bytes)."""
    named = sorted(model.named_parameters(), key=lambda kv: kv[0])
    return content_key(*[x for name, p in named for x in (name, p.detach())])


def _worker_key(model: Any) -> str:
    return weights_key(model)


def check_workers(model: Model, run: RayRun) -> None:
    """Load the model on one worker and refuse the run unless its weights are the caller's."""
    from mechcna import distributed

    opts = run.options()
    (theirs,) = distributed.run_shards(
        run.model, _worker_key, [{}], load=opts["load"], address=run.address,
        threads=run.threads, progress=False,
    )  # fmt: skip
    if theirs != weights_key(model):
        raise MechcnaError(
            f"the Ray workers' model {run.model!r} (loaded with {dict(run.load)}) has other "
            "weights than the model given to reproduce(): pass the name or path it was loaded "
            "from, with the same load options"
        )


def head_sweep(model: Model, data: Any, **kwargs: Any) -> Any:
    """:func:`mechcna.head_sweep`, or its :mod:`mechcna.distributed` version on a Ray run."""
    run = _ACTIVE.get()
    if run is None:
        from mechcna.analyses.heads import head_sweep as local

        return local(model, data, **kwargs)
    from mechcna import distributed

    return distributed.head_sweep(run.model, data, **{**run.options(), **kwargs})


def compare_neurons(model: Model, prompts: Any, other: Any, targets: Any = None,
                    **kwargs: Any) -> Any:  # fmt: skip
    """Dataset CNA (:func:`mechcna.compare_neurons`), on the Ray run when one is active."""
    run = _ACTIVE.get()
    if run is None:
        from mechcna.analyses.comparative import compare_neurons as local

        return local(model, prompts, other, targets, **kwargs)
    from mechcna import distributed

    return distributed.compare_neurons(run.model, prompts, other, targets,
                                       **{**run.options(), **kwargs})  # fmt: skip


def mask_keep_table(model: Model, prompts: Any, comparison: Any, **kwargs: Any) -> Any:
    """:func:`mechcna.mask_keep_table`, on the Ray run when one is active."""
    run = _ACTIVE.get()
    if run is None:
        from mechcna.analyses.case_ablation import mask_keep_table as local

        return local(model, prompts, comparison, **kwargs)
    from mechcna import distributed

    return distributed.mask_keep_table(run.model, prompts, comparison,
                                       **{**run.options(), **kwargs})  # fmt: skip


def _attribution(name: str, model: Model, prompts: Any, targets: Any, **kwargs: Any) -> Any:
    run = _ACTIVE.get()
    if run is None:
        if name == "comparison_scores":
            from mechcna.analyses.methods import comparison_scores as local
        else:
            from mechcna.analyses import attribution

            local = getattr(attribution, name)
        return local(model, prompts, targets, **kwargs)
    from mechcna import distributed

    return getattr(distributed, name)(run.model, prompts, targets, **{**run.options(), **kwargs})


def neuron_importance(model: Model, prompts: Any, targets: Any = None, **kwargs: Any) -> Any:
    """:func:`mechcna.neuron_importance`, on the Ray run when one is active."""
    return _attribution("neuron_importance", model, prompts, targets, **kwargs)


def attention_neuron_importance(model: Model, prompts: Any, targets: Any = None,
                                **kwargs: Any) -> Any:  # fmt: skip
    """:func:`mechcna.attention_neuron_importance`, on the Ray run when one is active."""
    return _attribution("attention_neuron_importance", model, prompts, targets, **kwargs)


def comparison_scores(model: Model, prompts: Any, targets: Any = None, **kwargs: Any) -> Any:
    """The eight-method comparison (:func:`mechcna.analyses.methods.comparison_scores`), on the
    Ray run when one is active."""
    return _attribution("comparison_scores", model, prompts, targets, **kwargs)


def active() -> RayRun | None:
    """The Ray run in force, if any."""
    return _ACTIVE.get()


def refuse_without_ray_extra(run: RayRun | None) -> None:
    """A clear error when a Ray run is asked for and Ray is not installed."""
    if run is None:
        return
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise MechcnaError(
            "a Ray run needs the distributed extra: pip install 'mechcna[distributed]'"
        ) from e
