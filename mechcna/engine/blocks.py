"""Static vocabulary directions of FFN value vectors and ``W_O`` rows, cached per model.

A neuron's projection is ``(coefficient / scale) * U[row]`` where ``U`` depends only on the
weights (:class:`~mechcna.engine.projection.DirectionBlock`). This module keeps what depends only on
the weights, keyed by the weights' **content** (a BLAKE2b hash of their bytes, memoised per
tensor object and version), so a cached result can never be stale: an in-place edit, a
replaced ``Parameter``, ``load_state_dict`` or another model with equal shapes all give a new
key, and an edit that is undone gives the old key back.

* :class:`Projector`: the map ``M`` (``[d_model, d_vocab]``, the final norm's linear part
  times ``W_U``) and the static data of the range bound used by :mod:`mechcna.engine.expansion`.
* :class:`~mechcna.engine.rows.RowStore`: the rows of one layer's block, computed on demand
  (only the neurons the engine cannot certify from the first two cumulants need them),
  stored in 16 bits for float32 models and, optionally, in a memory-mapped file.
* :class:`BlockCache`: the in-memory cache, within a byte budget sized from the machine's
  free memory (:func:`default_budget`), with a scan-resistant eviction order.

Cache policy (``docs/benchmarks.md`` has the measured effect):

* **Budget**: ``MECHCNA_BLOCK_BUDGET`` (bytes; suffixes K, M, G) if set, else half of the
  memory available when the cache is created (``MemAvailable``), at least 256 MiB.
* **Eviction**: rows of weights no longer in use (a slot whose weights changed) go first,
  then the **most** recently used entry. A sequential layer scan with a budget smaller than
  the model then keeps its first layers and reuses them on every call, where least-recently-
  used order would evict each block just before it is needed again.
* **Disk**: see :mod:`mechcna.engine.rows` (on by default under the user cache directory;
  ``MECHCNA_DISK_CACHE=0`` or ``BlockCache(disk=False)`` turns it off).
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import einops
import torch
from torch.utils.weak import WeakIdKeyDictionary

from mechcna._types import Float, Tensor
from mechcna.engine.projection import DirectionBlock, compute_dtype, direction_block
from mechcna.engine.rows import (
    DISK_FORMATS,
    LEVELS,
    RowStore,
    default_disk_dir,
    disk_limit,
    open_row_store,
    parse_bytes,
)
from mechcna.engine.widths import load_widths, row_widths, save_widths
from mechcna.errors import MechcnaError
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.fingerprint import content_key
from mechcna.models.view import architecture

MIN_BUDGET = 256 * 2**20
#: the part of a row store's key naming its 16-bit format (int16 keeps the historical tag)
_STORAGE_TAG = {torch.int16: "16", torch.float16: "-f16", torch.bfloat16: "-bf16"}
FORMAT = "mechcna-rows-3"


def available_memory() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (8 GiB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_budget() -> int:
    """``MECHCNA_BLOCK_BUDGET`` if set, else half the available memory (at least 256 MiB)."""
    env = os.environ.get("MECHCNA_BLOCK_BUDGET")
    if env:
        return parse_bytes(env)
    return max(MIN_BUDGET, available_memory() // 2)


class Projector:
    """The static map from residual space to centred vocabulary directions.

    ``U[row] = W[row] @ M`` for any residual-space vectors ``W``, with
    ``M = G - mean_i G[i]`` (LayerNorm) or ``M = G`` (RMSNorm, none), ``G = gamma[:, None] * W_U``.
    For the engine's range bound, every column ``x_j = M[:, j] - centre`` satisfies
    ``|w . x_j| <= sqrt(w A w) rho`` with ``A = chol @ chol.T`` (Cauchy-Schwarz in the metric
    of ``A``, any positive-definite ``A``) and ``|w . x_j| <= |w| max_norm``; so a row's range
    over the vocabulary is at most ``2 min(rho |chol.T w|, max_norm |w|)``
    (:meth:`range_bound`; its data are computed on first use).

    Attributes:
        M: ``[d_model, d_vocab]`` linear part of the final norm and unembedding.
        key: the content key of the weights it was made from.
    """

    def __init__(self, M: Float[Tensor, "d_model d_vocab"], key: str):
        self.M, self.key = M, key
        self._ellipsoid: tuple[Tensor, float, float] | None = None
        self._exact: tuple[Tensor, Tensor, float] | None = None

    def exact(self) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_model"], float]:
        """``(M64, col_max, col_norm)`` for the engine's float64 evaluation: ``M`` in float64
        with its vocabulary mean removed (a vocabulary-common part shifts every row by a
        constant, which changes no log-probability, but would cancel in ``d1`` and cost the
        rows their low bits), ``max_j |M64[i, j]|`` per coordinate and ``max_j |M64[:, j]|``.
        """
        if self._exact is None:
            with torch.no_grad():
                M64 = self.M.detach().to(torch.float64)
                M64 = M64 - M64.mean(1, keepdim=True)
                self._exact = (M64, M64.abs().amax(1), float(M64.norm(dim=0).max()))
        return self._exact

    def ellipsoid(self) -> tuple[Float[Tensor, "d_model d_model"], float, float]:
        """``(chol, rho, max_norm)``: the lower Cholesky factor of the vocabulary covariance
        of ``M``'s columns plus a ridge, ``max_j |chol^-1 x_j|`` and ``max_j |x_j|`` (both
        times a safety margin for rounding)."""
        if self._ellipsoid is None:
            self._ellipsoid = _ellipsoid(self.M)
        return self._ellipsoid

    def range_bound(self, W: Float[Tensor, "row d_model"]) -> Float[Tensor, " row"]:
        chol, rho, max_norm = self.ellipsoid()
        ell = (W @ chol).norm(dim=-1) * rho
        return 2 * torch.minimum(ell, W.norm(dim=-1) * max_norm)


SAFETY = 1.001


def _ellipsoid(M: Tensor) -> tuple[Tensor, float, float]:
    with torch.no_grad():
        X = (M - M.mean(1, keepdim=True)).double()
        cov = (X @ X.T) / X.shape[1]
        eye = torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
        ridge = 1e-6 * float(cov.diagonal().mean()) + 1e-30
        chol, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        while int(info) != 0:  # any positive-definite matrix gives a valid bound
            ridge *= 100
            chol, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        Y = torch.linalg.solve_triangular(chol, X, upper=False)
        rho = float(Y.norm(dim=0).max()) * SAFETY
        max_norm = float(X.norm(dim=0).max()) * SAFETY
    return chol.to(M.dtype), rho, max_norm


def make_projector(model: Model, key: str) -> Projector:
    arch = architecture(model)
    dtype = compute_dtype(arch.dtype)
    with torch.no_grad():
        G = arch.ln_final_w.detach().to(dtype)[:, None] * arch.W_U.detach().to(dtype)
        M = G - G.mean(0, keepdim=True) if arch.centres_final else G
    return Projector(M.contiguous(), key)


class BlockCache:
    """Static per-weights data (projector, row stores, full blocks) within a byte budget.

    Args:
        budget: the most bytes of rows and blocks kept in memory (default
            :func:`default_budget`; 0 keeps nothing: rows are recomputed per call and memory
            stays bounded, "streaming").
        half: store rows in 16 bits (fixed point, each row scaled by its radius, see
            :mod:`mechcna.engine.rows`) for float32 models; float64 models always keep full
            precision.
        disk: a directory for memory-mapped row files, ``False`` for none, ``None`` for the
            default (:func:`mechcna.engine.rows.default_disk_dir`; off when
            ``MECHCNA_DISK_CACHE=0``). Only models on the CPU use it: on another device
            (CUDA) the rows live in that device's memory.
        storage: the 16-bit format of ``half`` rows: ``torch.int16`` (default: fixed point,
            the finest), ``torch.float16`` or ``torch.bfloat16`` (memory only); the engine's
            bound covers the rounding of each (:meth:`mechcna.engine.rows.RowStore.eta`).
    """

    def __init__(
        self,
        budget: int | None = None,
        *,
        half: bool = True,
        disk: str | Path | bool | None = None,
        storage: torch.dtype = torch.int16,
    ):
        if storage not in LEVELS:
            raise MechcnaError(f"storage must be one of {list(LEVELS)}, got {storage}")
        self.storage = storage
        self.budget = default_budget() if budget is None else int(budget)
        if self.budget < 0:
            raise MechcnaError(f"budget must be >= 0 bytes, got {budget}")
        self.half = half
        self.disk: Path | None = default_disk_dir() if disk is None or disk is True else None
        if isinstance(disk, str | Path):
            self.disk = Path(disk)
        self._entries: OrderedDict[tuple, DirectionBlock | RowStore] = OrderedDict()
        self._slots: dict[tuple, tuple] = {}  # (kind, layer) -> latest key
        self._projector: Projector | None = None
        self._widths: dict[str, Tensor] = {}  # a few KB per layer: never evicted
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(self._bytes(e) for e in self._entries.values())

    @staticmethod
    def _bytes(entry: DirectionBlock | RowStore) -> int:
        return entry.memory_bytes if isinstance(entry, RowStore) else entry.nbytes

    def projector(self, model: Model) -> Projector:
        arch = architecture(model)
        key = content_key(FORMAT, arch.final_norm, compute_dtype(arch.dtype), arch.W_U,
                          arch.ln_final_w)  # fmt: skip
        if self._projector is None or self._projector.key != key:
            self._projector = make_projector(model, key)
        return self._projector

    def get(self, key: tuple, compute, slot: tuple | None = None) -> DirectionBlock:
        """A full block by key (computed on a miss and kept if it fits the budget)."""
        block = self._entries.get(key)
        if isinstance(block, DirectionBlock):
            self.hits += 1
            self._entries.move_to_end(key)
            return block
        self.misses += 1
        block = compute()
        self._admit(key, block, slot)
        return block

    def rows(
        self,
        key: tuple,
        slot: tuple,
        n_rows: int,
        d_vocab: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> RowStore:
        """The :class:`RowStore` for ``key`` (opened from disk or created empty), its rows on
        ``device`` (in memory when that is not the CPU)."""
        store = self._entries.get(key)
        if isinstance(store, RowStore):
            self.hits += 1
            self._entries.move_to_end(key)
            return store
        self.misses += 1
        half = self.half and dtype == torch.float32
        storage = self.storage if half else dtype
        device = torch.device(device)
        disk = self.disk if device.type == "cpu" and storage in DISK_FORMATS else None
        store = open_row_store(key[-1], n_rows, d_vocab, storage, dtype, disk, device)
        self._admit(key, store, slot)
        return store

    def widths(self, rows: "LayerRows") -> Float[Tensor, " row"]:
        """Upper bounds on the range of each of ``rows``' exact rows over the vocabulary
        (:mod:`mechcna.engine.widths`), computed once per weights (one product of every row)
        and kept in memory and, with a disk cache, on disk."""
        key = rows.key
        if key is None:
            return row_widths(rows.W, rows.projector.M)
        got = self._widths.get(key)
        if got is None:
            n = rows.W.shape[0]
            got = load_widths(self.disk, key, n) if self.disk is not None else None
            if got is None:
                got = row_widths(rows.W, rows.projector.M)
                if self.disk is not None:
                    save_widths(self.disk, key, got)
            self._widths[key] = got
        return got

    def can_hold(self, store: RowStore, layers: int = 1) -> bool:
        """Whether all of ``store``'s rows fit, and the rows of ``layers`` layers like it
        (a whole model's, which one call visits in turn) fit the budget: otherwise each call
        would evict the layers the next call needs first and recompute every row, so the
        rows are not kept at all (the engine computes only the rows the second-order
        expansion cannot certify). For a file-backed store the budget is the disk cache's
        (:func:`mechcna.engine.rows.disk_limit`; its pages are page cache), counting the
        residual file of int16 rows."""
        full = store.n_rows * store.d_vocab * store.storage.itemsize
        if store.path is not None:
            return layers * (full + store.n_rows * store.d_vocab * store.has_fine) <= disk_limit()
        if layers * full > self.budget:
            return False
        return self.nbytes - store.memory_bytes + full <= self.budget

    def settle(self) -> None:
        """Evict until within budget (call after rows were added)."""
        self._evict(None)

    def _admit(self, key: tuple, entry, slot: tuple | None) -> None:
        if slot is not None:
            self._slots[slot] = key
        self._entries[key] = entry
        self._evict(key)

    def _evict(self, keep: tuple | None) -> None:
        while self.nbytes > self.budget and self._entries:
            live = set(self._slots.values())
            stale = [k for k in self._entries if k not in live and k != keep]
            others = [k for k in self._entries if k != keep]
            victim = stale[0] if stale else (others[-1] if others else keep)
            entry = self._entries.pop(victim)  # type: ignore[arg-type]
            if isinstance(entry, RowStore):
                entry.release()

    def clear(self) -> None:
        for e in self._entries.values():
            if isinstance(e, RowStore):
                e.release()
        self._entries.clear()
        self._slots.clear()
        self._widths.clear()


_CACHES: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def model_cache(model: Model) -> BlockCache:
    """The default cache attached to ``model`` (freed with it)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = BlockCache()
    return cache


def _source(arch: Architecture, kind: str, layer: int) -> Tensor:
    """The weight itself (the same object call after call, so its hash is memoised)."""
    return arch.W_out(layer) if kind == "ffn" else arch.W_O(layer)


def _vectors(arch: Architecture, kind: str, layer: int) -> Tensor:
    if kind == "ffn":
        return arch.W_out(layer).detach()
    return einops.rearrange(
        arch.W_O(layer).detach(), "head d_head d_model -> (head d_head) d_model"
    )


def _key(arch: Architecture, kind: str, layer: int, extra: str) -> tuple:
    digest = content_key(FORMAT, extra, kind, arch.final_norm, compute_dtype(arch.dtype),
                         _source(arch, kind, layer), arch.W_U, arch.ln_final_w)  # fmt: skip
    return (kind, extra, layer, digest)


@dataclass
class LayerRows:
    """What the engine needs for one layer's neurons: the vectors, their row store, and the
    projector (``rows = W @ projector.M``)."""

    W: Float[Tensor, "row d_model"]
    store: RowStore
    projector: Projector
    cache: BlockCache
    #: the content key of the weights (names the range bounds kept by the cache; ``None``:
    #: computed per use)
    key: str | None = None


def layer_rows(model: Model, kind: str, layer: int, cache: BlockCache | None = None) -> LayerRows:
    """The :class:`LayerRows` of ``"ffn"`` (``W_out`` rows) or ``"attn"`` (``W_O`` rows)."""
    arch = architecture(model)
    cache = model_cache(model) if cache is None else cache
    dtype = compute_dtype(arch.dtype)
    W = _vectors(arch, kind, layer)
    kind_of_rows = "rows" + (_STORAGE_TAG[cache.storage] if cache.half else "")
    key = _key(arch, kind, layer, kind_of_rows)
    store = cache.rows(key, (kind, layer), W.shape[0], arch.d_vocab, dtype, W.device)
    return LayerRows(W.to(dtype), store, cache.projector(model), cache, key[-1])


def ffn_block(model: Model, layer: int, cache: BlockCache | None = None) -> DirectionBlock:
    """Directions of layer ``layer``'s FFN value vectors (rows of ``W_out``), full precision."""
    return _block(model, "ffn", layer, cache)


def attention_block(model: Model, layer: int, cache: BlockCache | None = None) -> DirectionBlock:
    """Directions of the rows of ``W_O[layer]`` (row ``head * d_head + dim``), full precision."""
    return _block(model, "attn", layer, cache)


def _block(model: Model, kind: str, layer: int, cache: BlockCache | None):
    arch = architecture(model)
    W = _vectors(arch, kind, layer)
    key = _key(arch, kind, layer, "block")
    cache = model_cache(model) if cache is None else cache
    return cache.get(key, lambda: direction_block(model, W), slot=(kind + "-block", layer))
