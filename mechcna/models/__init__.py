"""Models: loading, backends, weight processing and the architecture facts every analysis reads.

Owns everything about a model before any analysis runs: :func:`load_model` (TransformerLens
names, GGUF files, local Hugging Face checkpoints, mechcna checkpoints), the
HookedTransformer / TransformerBridge seam (:mod:`~mechcna.models.backend`,
:mod:`~mechcna.models.bridge`), weight processing (:mod:`~mechcna.models.processing`),
tokenizers, weight fingerprints, input validation, hook names, the read-only
:class:`~mechcna.models.architecture.Architecture` view (one per analysis call, through
:mod:`~mechcna.models.view`) and :func:`check_model`.

May import: :mod:`mechcna.errors` and :mod:`mechcna._types` only (the bottom layer).
"""

from mechcna.models.architecture import Architecture
from mechcna.models.check import CheckReport, check_model
from mechcna.models.loading import load_model, save_checkpoint
from mechcna.models.processing import NO_PROCESSING, WeightProcessing, get_processing
from mechcna.models.provenance import ModelProvenance, get_provenance

__all__ = [
    "NO_PROCESSING",
    "Architecture",
    "CheckReport",
    "ModelProvenance",
    "WeightProcessing",
    "check_model",
    "get_processing",
    "get_provenance",
    "load_model",
    "save_checkpoint",
]
