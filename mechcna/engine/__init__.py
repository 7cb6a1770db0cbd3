"""Engine: the certified fast path behind every log-probability-increase score.

Owns the projection of vectors through the frozen final norm and the unembedding
(:mod:`~mechcna.engine.projection`), the per-layer vocabulary rows of every neuron and their
stores (:mod:`~mechcna.engine.rows`: int16 fixed point or full precision, in memory or
memory-mapped on disk), the block cache keyed by weight content
(:mod:`~mechcna.engine.blocks`), the moments of stored rows with bounds on their rounding and
truncation (:mod:`~mechcna.engine.moments`), and the third-order cumulant expansion with its
rigorous remainder bound and exact log-sum-exp fallback (:mod:`~mechcna.engine.expansion`).
Every tensor follows the device of the model (row stores live in its memory).

May import: :mod:`mechcna.interventions`, :mod:`mechcna.models` and the bottom layer.
"""

from mechcna.engine.blocks import BlockCache

__all__ = ["BlockCache"]
