"""Static vocabulary directions of FFN value vectors and ``W_O`` rows, cached per model.

A neuron's projection is ``(coefficient / scale) * U[row]`` where ``U`` depends only on the
weights (:class:`~mechcna.projection.DirectionBlock`). Blocks are computed once per layer and
kept in a :class:`BlockCache` (in memory, within a byte budget) keyed by the weights they were
computed from: an in-place edit of those weights (``tensor._version``) or another tensor
invalidates the entry, so a cached block is never stale. A model and an intervened copy whose
``W_out``/``W_O`` are the same tensors share blocks.
"""

import weakref
from collections import OrderedDict

import einops

from mechcna._types import Tensor
from mechcna.architecture import Architecture
from mechcna.backend import Model
from mechcna.projection import DirectionBlock, direction_block

DEFAULT_BUDGET = 2 * 2**30


def _fingerprint(*tensors: Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


class BlockCache:
    """Least-recently-used cache of :class:`DirectionBlock` objects within a byte budget.

    Args:
        budget: the most bytes of blocks kept (0 disables caching; blocks are then
            recomputed per call, which keeps memory bounded on large models).
    """

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self._blocks: OrderedDict[tuple, DirectionBlock] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def get(self, key: tuple, compute) -> DirectionBlock:
        block = self._blocks.get(key)
        if block is not None:
            self.hits += 1
            self._blocks.move_to_end(key)
            return block
        self.misses += 1
        block = compute()
        if block.nbytes <= self.budget:
            self._blocks[key] = block
            while self.nbytes > self.budget:
                self._blocks.popitem(last=False)
        return block

    def clear(self) -> None:
        self._blocks.clear()


_CACHES: "weakref.WeakKeyDictionary[Model, BlockCache]" = weakref.WeakKeyDictionary()


def model_cache(model: Model) -> BlockCache:
    """The default cache attached to ``model`` (freed with it)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = BlockCache()
    return cache


def _norm_weights(arch: Architecture) -> tuple[Tensor, ...]:
    return (arch.W_U, arch.ln_final_w)


def ffn_block(model: Model, layer: int, cache: BlockCache | None = None) -> DirectionBlock:
    """Directions of layer ``layer``'s FFN value vectors (rows of ``W_out``)."""
    arch = Architecture(model)
    W_out = arch.W_out(layer)
    key = ("ffn", arch.final_norm, *_fingerprint(W_out, *_norm_weights(arch)))
    cache = model_cache(model) if cache is None else cache
    return cache.get(key, lambda: direction_block(model, W_out.detach()))


def attention_block(model: Model, layer: int, cache: BlockCache | None = None) -> DirectionBlock:
    """Directions of the rows of ``W_O[layer]`` (row ``head * d_head + dim``)."""
    arch = Architecture(model)
    W_O = arch.W_O(layer)
    key = ("attn", arch.final_norm, *_fingerprint(W_O, *_norm_weights(arch)))
    cache = model_cache(model) if cache is None else cache
    rows = einops.rearrange(W_O.detach(), "head d_head d_model -> (head d_head) d_model")
    return cache.get(key, lambda: direction_block(model, rows))
