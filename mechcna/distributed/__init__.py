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
* :func:`mask_keep_table`: the neuron sets drawn once on the caller, the cases sharded, the
  per-case correctness concatenated before the table is formed.

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

May import: :mod:`mechcna.analyses`, :mod:`mechcna.tasks`, :mod:`mechcna.engine`,
:mod:`mechcna.interventions`, :mod:`mechcna.models` and the bottom layer (it sits beside
:mod:`mechcna.applications`; the CLI above uses it).

Example:
    >>> from mechcna import distributed                                         # doctest: +SKIP
    >>> sweep = distributed.head_sweep("smollm2-135m", dataset, workers=8)       # doctest: +SKIP
    >>> res = distributed.neuron_importance("mechcna/arith-small", prompts)      # doctest: +SKIP
"""

from mechcna.distributed.cluster import LAST_RUN, connect, run_shards, worker_model
from mechcna.distributed.merge import merge_head_sweeps, merge_scores
from mechcna.distributed.sharded import (
    attention_neuron_importance,
    compare_neurons,
    comparison_scores,
    head_importance,
    head_sweep,
    layer_importance,
    mask_keep_table,
    neuron_importance,
)

__all__ = [
    "LAST_RUN",
    "attention_neuron_importance",
    "compare_neurons",
    "comparison_scores",
    "connect",
    "head_importance",
    "head_sweep",
    "layer_importance",
    "mask_keep_table",
    "merge_head_sweeps",
    "merge_scores",
    "neuron_importance",
    "run_shards",
    "worker_model",
]
