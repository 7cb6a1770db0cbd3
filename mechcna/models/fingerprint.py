"""Content fingerprints of weight tensors: what identifies a tensor's current values.

Caches keyed by weights (the engine's row blocks, the processing inference) ask these, so an
edit of a weight, also through ``.data`` (which bypasses the version counter), is never
served a stale result.
"""

import hashlib

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mechcna._types import Tensor
from mechcna.models.scope import memo

_HASHES = WeakIdKeyDictionary()


_PROBES: dict[tuple[int, str], Tensor] = {}


def _probe_vector(n: int, device: torch.device) -> Tensor:
    """A fixed pseudo-random vector of length ``n`` (float64), memoised per length."""
    key = (n, str(device))
    if key not in _PROBES:
        gen = torch.Generator().manual_seed(n)
        _PROBES[key] = torch.rand(n, generator=gen, dtype=torch.float64).add_(0.5).to(device)
    return _PROBES[key]


def checksum(t: Tensor) -> float:
    """``u^T X v`` for ``X``, the tensor as a ``[shape[0], -1]`` matrix, and fixed random
    ``u, v``: one pass over every entry, so any edit (also through ``.data``, which bypasses
    the version counter, or a swap of two entries) changes it, barring an exact coincidence."""
    x = t.detach()
    if x.numel() == 0:
        return 0.0
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    u = _probe_vector(x.shape[0], x.device)
    v = _probe_vector(x.shape[1], x.device)
    if x.shape[1] >= 4096:
        return float(u @ (x @ v.to(x.dtype)).double())
    # narrow matrices (an embedding, W_out) in float64, 2 MB of rows at a time: the
    # conversion stays in cache (8x faster than converting the whole matrix at once)
    step = max(1, 2**18 // x.shape[1])
    parts = [u[i : i + step] @ (x[i : i + step].double() @ v) for i in range(0, len(x), step)]
    return float(torch.stack(parts).sum())


def tensor_state(t: Tensor) -> tuple:
    """What identifies a tensor's current values (computed once per analysis call: see
    :mod:`mechcna.models.scope`)."""
    return memo("tensor_state", t, lambda: _tensor_state(t))


def _tensor_state(t: Tensor) -> tuple:
    """What identifies a tensor's current values: address, version counter, layout and a
    checksum over every entry (:func:`checksum`, which catches writes that bypass the
    counter)."""
    return (
        t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, str(t.device), checksum(t)
    )  # fmt: skip


def tensor_hash(t: Tensor) -> str:
    """BLAKE2b hash of a tensor's shape, dtype and bytes (memoised per object and version)."""
    state = tensor_state(t)
    memo = _HASHES.get(t)
    if memo is not None and memo[0] == state:
        return memo[1]
    data = t.detach().contiguous().cpu().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    if data.numel():
        h.update(data.view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    _HASHES[t] = (state, digest)
    return digest


def content_key(*parts: object) -> str:
    """One hash over tensors (by content) and plain values."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update((tensor_hash(p) if isinstance(p, Tensor) else repr(p)).encode())
        h.update(b"|")
    return h.hexdigest()
