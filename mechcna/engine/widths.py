"""Exact upper bounds on the range of every row of a layer, kept per weights (issue 25).

When a layer's rows cannot be kept (streaming: Gemma 3's 262,144-token vocabulary), the
engine certifies most neurons from ``k1`` and ``k2`` alone, and its remainder bounds are
proportional to the row's range ``r = max_j u_j - min_j u_j`` over the vocabulary
(:mod:`mechcna.engine.expansion`). Without the row, ``r`` was bounded by
:meth:`mechcna.engine.blocks.Projector.range_bound` (Cauchy-Schwarz in an ellipsoid), about
11 times the true range on Gemma 3 270M, so about a quarter of each call's rows had to be
formed again for the third order. The range depends on the weights only, so it is computed
once per weights (one product of every row, in the projector's dtype) and kept in memory and,
with a disk cache, in a small file ``<key>.widths.npz`` next to the row files.

**Rounding.** The columns are centred first (``x_j = M_j - mean``, in float64, then
rounded to ``M``'s dtype: within ``(u + u64) |x_j|``), so a vocabulary-common part of ``M``
costs no bits. A computed entry ``~u_j = fl(w . x_j)`` is within ``gamma_d |w| |x_j|`` of
the product of the rounded column (``gamma_d = d u / (1 - d u)``, ``u`` the unit roundoff of
the product's dtype, any summation order), and the engine's exact rows use the
vocabulary-centred float64 projector (:meth:`mechcna.engine.blocks.Projector.exact`), whose
columns are ``M_j`` minus a common vector (which shifts a row by a constant: the range does
not change) plus at most ``u64 |x_j|`` of rounding. So with ``c = max_j |x_j|``

    ``r <= (max_j ~u_j - min_j ~u_j) (1 + 4 u64) + 2 (gamma_d + u + 4 u64) |w| c``,

which :func:`row_widths` returns.

**Trust.** A file stores the bounds with a BLAKE2b digest of their bytes and of the key; a
file that does not match (damaged, truncated, another store's) is ignored and rewritten.
"""

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from mechcna._types import Float, Tensor
from mechcna.engine.moments import U64
from mechcna.engine.rows import unit_roundoff

_log = logging.getLogger(__name__)

#: entries of the rows formed at a time (64 MB in float32)
WIDTH_ELEMENTS = 2**24


def row_widths(
    W: Float[Tensor, "row d_model"], M: Float[Tensor, "d_model d_vocab"]
) -> Float[Tensor, " row"]:
    """Upper bounds (float64, on the host) on the range over the vocabulary of each exact row
    ``W[k] @ M64`` (see the module docstring), from products in ``M``'s dtype over blocks of
    vocabulary-centred columns."""
    d, V = M.shape
    u = unit_roundoff(M.dtype)
    gam = d * u / (1 - d * u)
    with torch.no_grad():
        Wc = W.detach().to(M.dtype)
        mean = M.mean(1, dtype=torch.float64)
        hi = torch.full((W.shape[0],), -torch.inf, dtype=M.dtype, device=M.device)
        lo = torch.full((W.shape[0],), torch.inf, dtype=M.dtype, device=M.device)
        col = 0.0
        step = max(1, WIDTH_ELEMENTS // max(1, W.shape[0]))
        for j in range(0, V, step):
            X = M[:, j : j + step].to(torch.float64) - mean[:, None]
            col = max(col, float(torch.linalg.vector_norm(X, dim=0).max()))
            part_lo, part_hi = torch.aminmax(Wc @ X.to(M.dtype), dim=1)
            hi, lo = torch.maximum(hi, part_hi), torch.minimum(lo, part_lo)
        spread = (hi.to(torch.float64) - lo.to(torch.float64)).cpu()
        wn = torch.linalg.vector_norm(W.detach(), dim=1, dtype=torch.float64).cpu()
        margin = 2 * (gam + u + 4 * U64) * wn * col * (1 + 1e-6)
        return spread * (1 + 4 * U64) + margin


def _digest(widths: np.ndarray, key: str) -> np.ndarray:
    h = hashlib.blake2b(widths.tobytes(), digest_size=16)
    h.update(key.encode())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def widths_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.widths.npz"


def load_widths(directory: Path, key: str, n_rows: int) -> Tensor | None:
    """The bounds stored for ``key``, or ``None`` when there are none or they do not check."""
    path = widths_path(directory, key)
    try:
        with np.load(path) as f:
            widths, digest = f["widths"], f["digest"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:  # damaged or foreign: recompute
        _log.warning("ignoring unreadable range bounds %s (%s)", path, err)
        return None
    if (
        widths.dtype != np.float64
        or widths.shape != (n_rows,)
        or not np.array_equal(digest, _digest(widths, key))
    ):
        _log.warning("ignoring range bounds %s: they do not match their digest", path)
        return None
    return torch.from_numpy(widths.copy())


def save_widths(directory: Path, key: str, widths: Tensor) -> None:
    """Writes the bounds atomically (a temporary file renamed over the old one); a directory
    that cannot be written is skipped (the bounds are then recomputed in a later session)."""
    arr = widths.to(torch.float64).cpu().numpy()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, widths=arr, digest=_digest(arr, key))
        os.replace(tmp, widths_path(directory, key))
    except OSError as err:
        _log.warning("could not keep range bounds in %s (%s)", directory, err)
