"""Rows of a static direction block, computed on demand, optionally in a memory-mapped file.

A :class:`RowStore` holds, for one layer's neurons, the centred vocabulary directions
``U[k] = W[k] @ M - centre[k]`` of the rows computed so far, with each row's exact ``radius``
(half its range over the vocabulary) and ``centre``. Rows are stored

* in 16 bits for float32 models, scaled to ``[-1, 1]`` by the radius: as 16-bit fixed point
  (``int16``, the default: ``round(32767 * U[k] / radius[k])``, so a stored row differs from the
  exact one by at most ``eta[k] = 0.51 * radius[k] / 32767`` per entry; rows are centred and
  scaled in float64) or as ``float16(U[k] / radius[k])`` (``eta[k] = radius[k] * 2**-11``, 32
  times coarser) or ``bfloat16(U[k] / radius[k])`` (``eta[k] = radius[k] * 2**-8``, memory
  only); ``BlockCache(storage=...)`` chooses. The engine's bound adds the effect of this
  rounding (:meth:`RowStore.eta`, :mod:`mechcna.engine.expansion`);
* in the compute dtype otherwise: float32 rows (``BlockCache(half=False)``) are rounded
  (``eta = 1.01 * 2**-24 * radius``, :attr:`RowStore.rounded`); float64 rows are exact up to
  float64 rounding. Radii and centres are float64.

**Disk cache.** With a directory, the rows live in a sparse file ``<key>.rows`` mapped into
memory (``numpy.memmap``), and the radii, centres and the mask of computed rows in
``<key>.meta.npz``. For int16 rows a second sparse file ``<key>.fine`` holds one residual byte
per entry, ``f = round(FINE (U / step - y))`` with ``|f| <= 127``: ``(FINE y + f) step / FINE``
is within :meth:`RowStore.eta_fine` (``eta / 254``) of the row, which the engine's exact path
reads for the few rows it needs (:meth:`RowStore.fine_levels`) instead of forming their float64
rows. It costs half the int16 rows' disk and nothing in memory but the pages read. ``key`` is
the content hash of the weights (:mod:`mechcna.engine.blocks`), so a new session with the same
weights starts warm and other weights can never be read. Writers are safe against each other:
rows are written and flushed to the file before the metadata that marks them valid, metadata is
merged under an exclusive ``flock`` and replaced atomically (``os.replace``), and two writers
of the same row write the same values.

The cache is never trusted blindly (issue 20): the metadata names its store and holds a CRC-32
per row, checked when the row is first read in a process (:meth:`RowStore.verify`; a damaged
row is recomputed, with a warning; a damaged residual row is not used); a row or residual file
of the wrong size is deleted with its metadata and rebuilt, never truncated or extended to fit.

The directory is bounded: after a new file is created, the least recently used files are
deleted until the total allocated size is at most ``MECHCNA_DISK_CACHE_BYTES`` (default
16 GiB). A store in use holds a shared ``flock`` on its row file until released, and
:func:`prune` deletes only files it can lock exclusively without waiting, so a store that any
process has open is never deleted.

**Device.** A store's rows live on its ``device`` (the model's): in memory for CUDA, where the
disk cache is not used; radii, centres and the masks of computed rows stay on the host.

Location: ``MECHCNA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mechcna/blocks`` (default
``~/.cache/mechcna/blocks``). ``MECHCNA_DISK_CACHE=0`` turns the disk cache off.
"""

import contextlib
import fcntl
import logging
import os
import tempfile
import weakref
import zlib
from pathlib import Path

import numpy as np
import torch

from mechcna._types import Bool, Float, Int, Tensor
from mechcna.errors import MechcnaError

DEFAULT_DISK_BYTES = 16 * 2**30

#: fine steps per int16 level in a store's residual file (see :meth:`RowStore.fine_levels`):
#: ``254 y + f`` with ``|f| <= 127`` is exact in float32 (``|.| < 2**23``)
FINE = 254

#: the files of one file-backed store, by suffix (the lock file aside)
SUFFIXES = (".rows", ".fine", ".meta.npz")

logger = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1000000"`` -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError as err:
        raise MechcnaError(f"not a byte size: {text!r} (use e.g. 4G, 512M)") from err


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest error of rounding a value in ``[-1, 1]`` to ``dtype`` (round to nearest):
    half the machine epsilon (subnormals have a smaller absolute error)."""
    return torch.finfo(dtype).eps / 2


def default_disk_dir() -> Path | None:
    """The default directory of the disk cache, or ``None`` when it is turned off."""
    if os.environ.get("MECHCNA_DISK_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    env = os.environ.get("MECHCNA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechcna" / "blocks"


def disk_limit() -> int:
    env = os.environ.get("MECHCNA_DISK_CACHE_BYTES")
    return parse_bytes(env) if env else DEFAULT_DISK_BYTES


DISK_FORMATS = _NP = {torch.int16: np.int16, torch.float16: np.float16, torch.float32: np.float32,
       torch.float64: np.float64}  # fmt: skip
#: stored value per unit of ``U / radius`` for the rounded storage formats
LEVELS = {torch.int16: 32767.0, torch.float16: 1.0, torch.bfloat16: 1.0}


class RowStore:
    """Computed rows of one layer's block (see the module docstring)."""

    def __init__(
        self,
        n_rows: int,
        d_vocab: int,
        storage: torch.dtype,
        dtype: torch.dtype,
        path: Path | None = None,
        device: torch.device | str | None = None,
    ):
        self.device = torch.device("cpu" if device is None else device)
        if path is not None and (self.device.type != "cpu" or storage not in _NP):
            raise MechcnaError(f"a disk-backed row store needs CPU rows in {list(_NP)}")
        self.n_rows, self.d_vocab = n_rows, d_vocab
        self.storage, self.dtype = storage, dtype
        self.normalised = storage != dtype
        self.levels = LEVELS[storage] if self.normalised else 1.0
        self.path = path
        self.known: Bool[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.bool)
        # radii and centres in float64: the stored rows are scaled with them
        self.radius: Float[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.float64)
        self.centre: Float[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.float64)
        self._U: Tensor | None = None
        self._map: np.memmap | None = None
        # exact rows (float64, memory only, on the store's device) of neurons that needed the
        # exact sum, kept when rows are stored rounded so that the next prompt need not
        # recompute them: row k is self._exact[self._slot[k]]
        self._exact: Tensor | None = None
        self._slot = torch.full((n_rows,), -1, dtype=torch.long)
        self.exact_known: Bool[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.bool)
        # file-backed stores: a CRC-32 per row (in the metadata) and the rows whose content
        # this process has checked against it (or written itself)
        self.sums = np.zeros(n_rows, dtype=np.int64)
        self.verified: Bool[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.bool)
        self.rebuilt = 0  # rows found damaged on disk and recomputed
        # float64 norms of the layer's residual-space vectors (for the engine's rounding bounds;
        # set on first use: the store is keyed by the weights, so they never change)
        self.w_norms: Tensor | None = None
        # the residual word of int16 rows in a file-backed store (see fine_levels): which rows
        # have it, their CRC-32s and the rows checked in this process
        self.has_fine = path is not None and storage == torch.int16
        self._fine_map: np.memmap | None = None
        self.fine_known: Bool[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.bool)
        self.fine_sums = np.zeros(n_rows, dtype=np.int64)
        self.fine_verified: Bool[Tensor, " row"] = torch.zeros(n_rows, dtype=torch.bool)
        self._in_use = None
        if path is not None:
            self._open_file()

    # ------------------------------------------------------------------ storage
    def _open_file(self) -> None:
        """Open (or create) the row file and hold a shared ``flock`` on it while the store
        is in use: :func:`prune` never deletes a locked file. A file of the wrong size is
        never resized to fit: it and its metadata are deleted and the store starts empty."""
        assert self.path is not None
        rows = self.path.with_suffix(".rows")
        sizes = {rows: self.n_rows * self.d_vocab * self.storage.itemsize}
        if self.has_fine:
            sizes[self.path.with_suffix(".fine")] = self.n_rows * self.d_vocab
        for _ in range(100):
            with self._locked():  # creation and size checks are atomic between processes
                fresh = False
                actual = {}
                for file in sizes:
                    try:
                        actual[file] = file.stat().st_size
                    except FileNotFoundError:
                        actual[file] = None
                bad = [f for f, n in actual.items() if n is not None and n != sizes[f]]
                if bad:
                    logger.warning("discarding the damaged row cache %s: %d bytes, expected %d",
                                   bad[0], actual[bad[0]], sizes[bad[0]])  # fmt: skip
                    for suffix in SUFFIXES:
                        with contextlib.suppress(FileNotFoundError):
                            rows.with_suffix(suffix).unlink()
                    actual = dict.fromkeys(sizes)
                for file, size in sizes.items():
                    if actual[file] is None:
                        with open(file, "xb") as new:  # sparse: untouched rows take no disk
                            new.truncate(size)
                        fresh = fresh or file == rows
                f = open(rows, "r+b")
                fine = open(rows.with_suffix(".fine"), "r+b") if self.has_fine else None
            fcntl.flock(f, fcntl.LOCK_SH)  # waits only while a prune is deleting the file
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(rows).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # deleted (pruned) between open and lock: open the new file
            if fine is not None:
                fine.close()
        else:  # pragma: no cover - a directory under constant deletion
            raise OSError(f"could not open {rows}")
        if fine is not None:
            self._fine_map = np.memmap(fine, dtype=np.int8, mode="r+",
                                       shape=(self.n_rows, self.d_vocab))  # fmt: skip
            fine.close()  # the mapping keeps the file's pages
        self._in_use = f
        weakref.finalize(self, f.close)
        self._map = np.memmap(f, dtype=_NP[self.storage], mode="r+",
                              shape=(self.n_rows, self.d_vocab))  # fmt: skip
        self._U = torch.from_numpy(self._map)
        self._load_meta()
        if fresh:
            prune(self.path.parent, keep=self.path)

    def _tensor(self) -> Tensor:
        if self._U is None:  # lazily allocated: pages are touched only for computed rows
            self._U = torch.empty(self.n_rows, self.d_vocab, dtype=self.storage,
                                  device=self.device)  # fmt: skip
        return self._U

    @property
    def memory_bytes(self) -> int:
        """Anonymous memory held (0 for a file-backed store: its pages are page cache)."""
        exact = int(self.exact_known.sum()) * self.d_vocab * 8
        if self._map is not None:
            return exact
        return exact + int(self.known.sum()) * self.d_vocab * self.storage.itemsize

    def release(self) -> None:
        self._U, self._map, self._exact, self._fine_map = None, None, None, None
        self.fine_known = torch.zeros_like(self.fine_known)
        self.fine_verified = torch.zeros_like(self.fine_verified)
        self.known = torch.zeros_like(self.known)
        self.exact_known = torch.zeros_like(self.exact_known)
        self._slot = torch.full_like(self._slot, -1)
        self.verified = torch.zeros_like(self.verified)
        if self._in_use is not None:  # the file may now be pruned
            self._in_use.close()
            self._in_use = None

    def _crc(self, i: int) -> int:
        assert self._map is not None
        return zlib.crc32(memoryview(self._map[i]).cast("B"))

    def _fine_crc(self, i: int) -> int:
        assert self._fine_map is not None
        return zlib.crc32(memoryview(self._fine_map[i]).cast("B"))

    def verify(self) -> int:
        """Check every computed row not yet checked in this process against its CRC-32
        in the metadata; damaged rows are marked missing (so they are recomputed), with a
        warning. Returns the number of damaged rows. A no-op for a store in memory."""
        if self._map is None:
            return 0
        todo = (self.known & ~self.verified).nonzero().flatten().tolist()
        bad = [i for i in todo if self._crc(i) != int(self.sums[i])]
        self.verified[todo] = True
        if bad:
            logger.warning("%d rows of %s do not match their checksums; recomputing them",
                           len(bad), self.path)  # fmt: skip
            self.known[bad] = False
            self.verified[bad] = False
            self.fine_known[bad] = False
            self.rebuilt += len(bad)
        return len(bad)

    def fine_usable(self, idx: Int[Tensor, " n"]) -> Bool[Tensor, " n"]:
        """Which of rows ``idx`` have their residual word (:meth:`fine_levels`), each checked
        against its CRC-32 when first asked in this process (a damaged one is dropped, with a
        warning: the engine then takes another exact path)."""
        idx = idx.cpu()
        if self._fine_map is None:
            return torch.zeros(len(idx), dtype=torch.bool)
        todo = idx[self.fine_known[idx] & self.known[idx] & ~self.fine_verified[idx]]
        bad = [i for i in todo.tolist() if self._fine_crc(i) != int(self.fine_sums[i])]
        self.fine_verified[todo] = True
        if bad:
            logger.warning("%d residual rows of %s do not match their checksums; not using them",
                           len(bad), self.path)  # fmt: skip
            self.fine_known[bad] = False
        return self.fine_known[idx] & self.known[idx]

    def fine_levels(self, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d_vocab"]:
        """Rows ``idx`` (with :meth:`fine_usable`) to ``FINE`` times the resolution of the int16
        rows, as float32 values ``FINE * y + f`` (exact): ``|(FINE y + f) * step / FINE - U| <=``
        :meth:`eta_fine`. ``f`` is the stored residual ``round(FINE (U / step - y))``, written by
        :meth:`fill` into the store's ``.fine`` file (one byte per entry, read only for the
        rows the engine's exact path needs)."""
        assert self._fine_map is not None and self._U is not None
        host = idx.cpu()
        y = self._U[host].to(torch.float32)
        f = torch.from_numpy(self._fine_map[host.numpy()]).to(torch.float32)
        return y.mul_(FINE).add_(f)

    def fine_all(self) -> Tensor:
        """The whole residual file as an int8 tensor (no copy; rows with :meth:`fine_usable`
        are valid)."""
        assert self._fine_map is not None
        return torch.from_numpy(self._fine_map)

    def eta_fine(self, idx: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """Per-entry bound on ``|fine_levels * step / FINE - row given to fill|`` (float64)."""
        return self.radius_of(idx) * (0.51 / (self.levels * FINE))

    @property
    def rounded(self) -> bool:
        """Whether stored rows differ from the exact (float64) rows by more than float64
        rounding: every storage but float64."""
        return self.storage != torch.float64

    def put_exact(self, idx: Int[Tensor, " n"], rows: Float[Tensor, "n d_vocab"]) -> None:
        """Keep exact float64 rows (only for a store whose rows are rounded)."""
        if not self.rounded or len(idx) == 0:
            return
        idx = idx.cpu()
        new = idx[~self.exact_known[idx]]
        if len(new) < len(idx):  # rows already kept are equal: keep the first copy
            rows = rows[(~self.exact_known[idx]).to(rows.device)]
        if len(new) == 0:
            return
        rows = rows.to(device=self.device, dtype=torch.float64)
        used = int(self.exact_known.sum())
        if self._exact is None or self._exact.shape[0] < used + len(new):
            grown = torch.empty(max(2 * (used + len(new)), 16), self.d_vocab,
                                dtype=torch.float64, device=self.device)  # fmt: skip
            if self._exact is not None and used:
                grown[:used] = self._exact[:used]
            self._exact = grown
        self._exact[used : used + len(new)] = rows
        self._slot[new] = torch.arange(used, used + len(new))
        self.exact_known[new] = True

    def get_exact(self, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d_vocab"]:
        """Kept exact rows ``idx`` (float64, on the store's device)."""
        assert self._exact is not None
        return self._exact[self._slot[idx.cpu()].to(self.device)]

    # ------------------------------------------------------------------ rows
    def eta(self, idx: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """Per-entry bound on ``|stored row - row given to fill|`` for rows ``idx`` (float64;
        rows are centred and scaled in float64, so only the storage rounding counts)."""
        if self.storage == torch.int16:
            return self.radius_of(idx) * (0.51 / self.levels)
        return self.radius_of(idx) * (unit_roundoff(self.storage) * 1.01)

    def radius_of(self, idx: Int[Tensor, " n"] | slice) -> Float[Tensor, " n"]:
        """Radii of rows ``idx`` (float64, on the device of ``idx``; the store's device
        for a slice)."""
        if isinstance(idx, slice):
            return self.radius[idx].to(self.device)
        return self.radius[idx.cpu()].to(idx.device)

    def step(self, idx: Int[Tensor, " n"] | slice) -> Float[Tensor, " n"]:
        """Per-row factor (float64) from a stored value to the centred row
        (``radius / levels``), on the device of ``idx``."""
        radius = self.radius_of(idx)
        return torch.ones_like(radius) if not self.normalised else radius / self.levels

    def fill(
        self, idx: Int[Tensor, " n"], rows: Float[Tensor, "n d_vocab"], chunk: int = 64
    ) -> None:
        """Store exact rows ``rows`` (uncentred ``W @ M``) at indices ``idx``.

        Rows are centred and scaled in float64 (whatever their dtype), ``chunk`` rows at a
        time (a few MB, in cache); a contiguous run of indices is written as one slice. A
        file-backed store's rows go to a shared mapping, flushed to the file before the
        metadata that marks them valid is written."""
        if len(idx) == 0:
            return
        idx = idx.cpu()
        rows = rows.to(torch.float64)
        lo, hi = torch.aminmax(rows, dim=-1)
        centre, radius = (hi + lo) / 2, (hi - lo) / 2
        target = self._tensor()
        first = int(idx[0])
        run = bool((idx == torch.arange(first, first + len(idx))).all())
        div = radius.clamp_min(torch.finfo(torch.float64).tiny)[:, None] / self.levels
        for i in range(0, len(idx), chunk):
            U = rows[i : i + chunk] - centre[i : i + chunk, None]
            if self.normalised:
                U.div_(div[i : i + chunk]).clamp_(-self.levels, self.levels)
            fine = None
            if self.storage == torch.int16:
                if self._fine_map is not None:
                    fine = U.clone()
                U.round_()
                if fine is not None:  # |U - y| <= 1/2: the residual fits int8 (|f| <= 127)
                    fine = fine.sub_(U).mul_(FINE).round_().to(torch.int8).numpy()
            if run:
                target[first + i : first + i + len(U)].copy_(U)
            else:
                where = idx[i : i + chunk].to(target.device)
                target[where] = U.to(device=target.device, dtype=self.storage)
            if fine is not None and self._fine_map is not None:
                self._fine_map[idx[i : i + chunk].numpy()] = fine
        self.radius[idx], self.centre[idx] = radius.cpu(), centre.cpu()
        self.known[idx] = True
        if self._map is not None:
            for i in idx.tolist():
                self.sums[i] = self._crc(i)
            self.verified[idx] = True
            self._map.flush()  # the rows reach the file before the metadata names them
            if self._fine_map is not None:
                for i in idx.tolist():
                    self.fine_sums[i] = self._fine_crc(i)
                self.fine_known[idx] = True
                self.fine_verified[idx] = True
                self._fine_map.flush()
            self._save_meta()

    def stored(
        self, idx: Int[Tensor, " n"] | slice, cols: Int[Tensor, " k"] | None = None
    ) -> Tensor:
        """Rows ``idx`` as stored (divided by their radius when rounded), in the storage dtype
        on the store's device; with ``cols`` only those vocabulary columns (one gather)."""
        U = self._tensor()
        if cols is not None:
            cols = cols.to(U.device)
            if isinstance(idx, slice):
                return U[idx].index_select(1, cols)
            return U[idx.to(U.device)[:, None], cols[None, :]]
        return U[idx if isinstance(idx, slice) else idx.to(U.device)]

    def get(self, idx: Int[Tensor, " n"] | slice) -> Float[Tensor, "n d_vocab"]:
        """Centred rows ``idx`` (all must be known) in the compute dtype."""
        rows = self.stored(idx)
        if not self.normalised:
            return rows.to(self.dtype)
        step = self.step(idx if isinstance(idx, slice) else idx.to(rows.device))
        U = rows.to(torch.float64).mul_(step[:, None])
        return U.to(self.dtype)

    # ------------------------------------------------------------------ metadata on disk
    def _meta(self) -> Path:
        assert self.path is not None
        return self.path.with_suffix(".meta.npz")

    @contextlib.contextmanager
    def _locked(self):
        assert self.path is not None
        with open(self.path.with_suffix(".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _ident(self) -> str:
        assert self.path is not None
        return f"{self.path.name}|{self.n_rows}|{self.d_vocab}|{self.storage}"

    def _read_meta(self) -> tuple[Tensor, Tensor, Tensor, np.ndarray, Tensor, np.ndarray] | None:
        """The metadata on disk, or ``None`` when there is none or it is unreadable or
        belongs to another store (e.g. a file copied or swapped in). Metadata written before
        the residual file existed marks no residual rows."""
        try:
            with np.load(self._meta()) as z:
                ident = str(z["ident"])
                known = torch.from_numpy(z["known"].copy())
                radius = torch.from_numpy(z["radius"].copy()).to(torch.float64)
                centre = torch.from_numpy(z["centre"].copy()).to(torch.float64)
                sums = z["sums"].astype(np.int64)
                if "fine_known" in z.files:
                    fine_known = torch.from_numpy(z["fine_known"].copy())
                    fine_sums = z["fine_sums"].astype(np.int64)
                else:
                    fine_known = torch.zeros_like(known)
                    fine_sums = np.zeros_like(sums)
        except FileNotFoundError:
            return None
        except (OSError, KeyError, ValueError, EOFError) as err:
            logger.warning("ignoring unreadable row metadata %s (%s)", self._meta(), err)
            return None
        shapes = {known.shape, fine_known.shape, sums.shape, fine_sums.shape}
        if ident != self._ident() or shapes != {self.known.shape}:
            logger.warning("ignoring row metadata %s: it belongs to another store", self._meta())
            return None
        return known, radius, centre, sums, fine_known & known, fine_sums

    def _load_meta(self) -> None:
        with self._locked():
            meta = self._read_meta()
        if meta is not None:
            self.known, self.radius, self.centre, self.sums, fine_known, self.fine_sums = meta
            self.fine_known = fine_known if self.has_fine else torch.zeros_like(fine_known)
            self.verified = torch.zeros_like(self.known)
            self.fine_verified = torch.zeros_like(self.known)
            os.utime(self._meta())

    def _save_meta(self) -> None:
        with self._locked():
            meta = self._read_meta()
            if meta is not None:  # keep rows another writer added (checked when first read)
                known, radius, centre, sums, fine_known, fine_sums = meta
                new = known & ~self.known
                self.radius[new], self.centre[new] = radius[new], centre[new]
                self.sums[new.numpy()] = sums[new.numpy()]
                self.known |= known
                extra = new & fine_known & self.has_fine  # their residuals, when written
                self.fine_sums[extra.numpy()] = fine_sums[extra.numpy()]
                self.fine_known |= extra
            fd, tmp = tempfile.mkstemp(dir=self._meta().parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, known=self.known.numpy(), radius=self.radius.double().numpy(),
                         centre=self.centre.double().numpy(), sums=self.sums,
                         fine_known=self.fine_known.numpy(), fine_sums=self.fine_sums,
                         ident=np.array(self._ident()))  # fmt: skip
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._meta())


def open_row_store(
    key: str,
    n_rows: int,
    d_vocab: int,
    storage: torch.dtype,
    dtype: torch.dtype,
    directory: Path | None,
    device: torch.device | str = "cpu",
) -> RowStore:
    """A :class:`RowStore`, file-backed under ``directory`` when one is given and usable
    (CPU rows only), else in the memory of ``device``."""
    if directory is not None and torch.device(device).type == "cpu" and storage in _NP:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return RowStore(n_rows, d_vocab, storage, dtype, directory / key)
        except OSError:
            pass  # an unusable directory: fall back to memory
    return RowStore(n_rows, d_vocab, storage, dtype, device=device)


def prune(directory: Path, keep: Path | None = None, limit: int | None = None) -> None:
    """Delete the least recently used row files until the directory is within ``limit``.

    A store in use (by this or any other process) holds a shared ``flock`` on its row file
    and is never deleted: a file is deleted only under an exclusive lock taken without
    waiting."""
    limit = disk_limit() if limit is None else limit
    entries = []
    for meta in directory.glob("*.rows"):
        try:
            st = meta.stat()
        except OSError:
            continue
        side = meta.with_suffix(".meta.npz")
        used = side.stat().st_mtime if side.exists() else st.st_mtime
        blocks = st.st_blocks
        with contextlib.suppress(OSError):
            blocks += meta.with_suffix(".fine").stat().st_blocks
        entries.append((used, blocks * 512, meta))
    total = sum(e[1] for e in entries)
    for _, size, rows in sorted(entries):
        if total <= limit:
            break
        if keep is not None and rows.with_suffix("") == keep.with_suffix(""):
            continue
        try:
            f = open(rows, "rb")
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use
            for suffix in SUFFIXES:
                with contextlib.suppress(OSError):
                    rows.with_suffix(suffix).unlink()
        total -= size
