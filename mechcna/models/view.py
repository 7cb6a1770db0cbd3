"""One model view per analysis call: the architecture facts and the weight processing of a
model are computed once per call and shared by every helper it reaches.

Every public analysis runs inside :func:`one_view` (its decorator form is :func:`per_call`):
within it, :func:`architecture` returns the same :class:`Architecture` for the same model and
:func:`processing_of` the same :class:`WeightProcessing`, and every weight tensor is
fingerprinted once (:func:`~mechcna.models.fingerprint.tensor_state`). Outside a call they
compute afresh, so nothing is ever stale between calls: a model edited between two calls
(weights, norms, configuration) is read anew by the second. Calls nest: an analysis calling
another reuses the outer call's view.

Only read-only analyses open a view; code that changes weights during a call (LoRA training,
:func:`~mechcna.interventions.apply_to_weights` on the copy it makes) must not run inside one
over the model it changes.
"""

from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.processing import WeightProcessing, get_processing
from mechcna.models.scope import memo, one_view, per_call

__all__ = ["architecture", "one_view", "per_call", "processing_of"]


def architecture(model: Model) -> Architecture:
    """The :class:`Architecture` of ``model`` (built once per analysis call)."""
    return memo("architecture", model, lambda: Architecture(model))


def processing_of(model: Model) -> WeightProcessing:
    """:func:`~mechcna.models.processing.get_processing` of ``model``, once per call."""
    return memo("processing", model, lambda: get_processing(model))
