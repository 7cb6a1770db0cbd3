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

A run with a checkpoint folder (``reproduce(..., checkpoint=DIR)``, ``--resume``) also keeps the
attribution calls of unfinished stages (:func:`memo`): FFN and attention neuron importance,
dataset CNA and the eight-method comparison (whole: :data:`WHOLE_CALLS`) run on shards of
:data:`MEMO_PROMPTS` prompts, each
shard's result saved under ``DIR/.../calls/`` as soon as it is computed and read back on a rerun
(keyed by the model's weights, the shard's prompts and targets, and every other argument), and
the shards merged as a Ray run merges them (:func:`mechcna.distributed.merge_scores`). So a run
stopped in the middle of a long stage loses at most one shard.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechcna.errors import MechcnaError
from mechcna.models.backend import Model
from mechcna.models.fingerprint import content_key, tensor_hash

#: prompts per saved shard of a memoised call (:func:`memo`)
MEMO_PROMPTS = 16
#: calls kept whole (one shard): the eight-method comparison forms every FFN neuron's exact
#: float64 row once per call, its cost nearly independent of the prompts (on Gemma 3 270M,
#: 18 x 2048 rows over 262,144 tokens, most of the stage), so shards would repeat it
WHOLE_CALLS = frozenset({"comparison_scores"})


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

        return _memoised("compare_neurons", lambda p, t: local(model, p, other, t, **kwargs),
                         model, prompts, targets, (other, kwargs))  # fmt: skip
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
        return _memoised(name, lambda p, t: local(model, p, t, **kwargs), model, prompts,
                         targets, kwargs)  # fmt: skip
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


_MEMO: ContextVar[Path | None] = ContextVar("mechcna_reproduce_memo", default=None)


@contextmanager
def memo(folder: str | Path | None) -> Iterator[None]:
    """Keep the attribution calls made inside in ``folder`` (``None``: keep nothing); see the
    module docstring."""
    token = _MEMO.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _MEMO.reset(token)


def _digest(h: Any, obj: Any) -> bool:
    """Feed ``obj`` to the hash ``h`` by content; ``False`` for a value it cannot key safely
    (then the call is not kept)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
        return True
    if isinstance(obj, torch.Tensor):
        h.update(f"tensor:{tensor_hash(obj)}|".encode())
        return True
    if isinstance(obj, np.ndarray):
        h.update(f"array:{obj.dtype}:{obj.shape}|".encode() + obj.tobytes())
        return True
    if isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}|".encode())
        return all(_digest(h, x) for x in obj)
    if isinstance(obj, dict):
        h.update(f"dict[{len(obj)}|".encode())
        return all(_digest(h, k) and _digest(h, obj[k]) for k in sorted(obj, key=repr))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"{type(obj).__module__}.{type(obj).__qualname__}|".encode())
        return all(_digest(h, f.name) and _digest(h, getattr(obj, f.name))
                   for f in dataclasses.fields(obj))  # fmt: skip
    return False


def _memoised(
    name: str, call: Callable[[Any, Any], Any], model: Any, prompts: Any, targets: Any, rest: Any
) -> Any:
    """``call(prompts, targets)``, in shards kept on disk inside :func:`memo` (see the module
    docstring); outside it, or for arguments it cannot key, one plain call."""
    folder = _MEMO.get()
    if folder is None or isinstance(prompts, (str, torch.Tensor)):
        return call(prompts, targets)
    items = list(prompts)
    per_prompt = not (targets is None or isinstance(targets, (str, int)))
    many: Any = targets
    if not items or not all(isinstance(x, str) for x in items):
        return call(prompts, targets)  # only text prompts are kept (a shard is a list of them)
    if per_prompt and len(many) != len(items):
        return call(prompts, targets)  # the analysis gives the error
    base = hashlib.blake2b(digest_size=16)
    base.update(f"{name}|{weights_key(model)}|".encode())
    if not (_digest(base, rest) and _digest(base, None if per_prompt else targets)):
        return call(prompts, targets)
    from mechcna.distributed.merge import merge_scores

    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    size = len(items) if name in WHOLE_CALLS else MEMO_PROMPTS
    for i in range(0, len(items), size):
        h = base.copy()
        shard = items[i : i + size]
        shard_targets = many[i : i + size] if per_prompt else targets
        if not (_digest(h, shard) and _digest(h, shard_targets if per_prompt else None)):
            return call(prompts, targets)
        path = folder / f"{name}-{h.hexdigest()}.pt"
        if path.is_file():
            parts.append(torch.load(path, weights_only=False))
            continue
        part = call(shard, shard_targets)
        tmp = path.with_suffix(".tmp")
        torch.save(part, tmp)
        tmp.replace(path)  # a shard is saved whole or not at all
        parts.append(part)
    return parts[0] if len(parts) == 1 else merge_scores(parts)
