"""Interventions: prompt batches and scoped edits of a running model through its hook points.

Owns how analyses drive a model: right-padded prompt batches with their scored positions and
single-token targets (:mod:`~mechcna.interventions.prompts`), and the interventions
(:class:`HeadAblation`, :class:`NeuronEdit`, :class:`AttentionNeuronEdit`,
:class:`KeepNeurons`, :class:`Patch`) applied as hooks by :func:`intervene` or written into a
copy of the weights by :func:`apply_to_weights` (:mod:`~mechcna.interventions.edits`).

May import: :mod:`mechcna.models` and the bottom layer (:mod:`mechcna.errors`,
:mod:`mechcna._types`).
"""

from mechcna.interventions.edits import (
    AttentionNeuronEdit,
    HeadAblation,
    Intervention,
    KeepNeurons,
    NeuronEdit,
    Patch,
    apply_to_weights,
    intervene,
)

__all__ = [
    "AttentionNeuronEdit",
    "HeadAblation",
    "Intervention",
    "KeepNeurons",
    "NeuronEdit",
    "Patch",
    "apply_to_weights",
    "intervene",
]
