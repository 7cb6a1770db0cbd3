"""Moments of stored rows under base distributions, with certified bounds on their error.

The certified engine (:mod:`mechcna.engine.expansion`) needs, per prompt and neuron, the
variance ``k2`` (and for some neurons the third central moment ``k3``) of the neuron's stored
vocabulary row ``y`` under the base distribution ``p``. This module forms them in float64 and
bounds their error, which the engine adds to its certificate:

* **Rounding** (issue 20): raw moments ``m_n = p . y^n`` of values whose powers are exact in
  float64 (int16 levels, float16/bfloat16/float32 values) are within ``g p . |y|^n`` of the
  exact sums, ``g = gamma(V) + 4 u`` (:func:`gamma`), so ``|dk2| <= 6 g m2`` and
  ``|dk3| <= 16 g R m2`` for ``|y| <= R`` (:func:`moment_errors`; ``(p . |y|)^2 <= m2`` by
  Jensen, also for a sub-probability ``p``).
* **Truncation to the probable tokens** (issue 20, speed): for one prompt (or a few) the sums
  run over the union ``H`` of each prompt's ``K`` most probable tokens only, ``K`` chosen per
  neuron from :data:`HEADS`. With ``delta >= sum_{j not in H} p_j`` (each prompt's tail mass
  beyond its own top ``K``) and ``|y| <= R``, the omitted parts of the raw moments satisfy
  ``|t1| <= delta R``, ``0 <= t2 <= delta R^2`` and ``|t3| <= delta R^3``; with the head sums
  ``S1, S2, S3`` (``|S1| <= R``, ``S2 <= R^2``):

  ``|(m2 - m1^2) - (S2 - S1^2)| = |t2 - t1 (m1 + S1)| <= (3 + delta) delta R^2``,
  ``|k3 - (S3 - 3 S1 S2 + 2 S1^3)| <= (13 + 15 delta + 6 delta^2) delta R^3``

  (``|m1 m2 - S1 S2| <= (2 + delta) delta R^3``, ``|m1^3 - S1^3| <= 3 (1 + delta)^2 delta R^3``).
  Neurons whose coefficient times range is large take a larger ``K`` or every token: the
  choice only affects how many scores the expansion certifies, never their correctness.

* **Fused reductions** (issue 20, speed): on the CPU, for up to :data:`MAX_FUSED_BATCH`
  prompts, the raw moments of a whole layer's rows are one compiled reduction
  (``torch.compile``, inductor): each stored entry is read once, converted, multiplied and
  summed in registers, instead of chunks converted to float64 in memory and multiplied by the
  BLAS. For int16 rows a small C kernel (:mod:`mechcna.engine.native`, built on first use)
  does the same sums with the conversion shared by up to four prompts and one fused
  multiply-add per term. Each term still takes one rounded product (``p_j * y_j^n``, the
  power exact as above; a fused multiply-add rounds once) and the sum at most ``V - 1``
  roundings in some order, so the bounds above hold unchanged. Without a working compiler
  (or with ``MECHCNA_COMPILE=0``) the eager chunks are used; the values agree to rounding.

Every tensor follows the device of ``p`` (the model's device); stored rows are moved there
chunk by chunk when the store lives elsewhere.
"""

import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from mechcna._types import Bool, Float, Int, Tensor
from mechcna.engine import native

if TYPE_CHECKING:
    from mechcna.engine.rows import RowStore

#: unit roundoff of float64
U64 = 2.0**-53

#: token counts tried for the truncated sums (each prompt's most probable tokens)
HEADS = (256, 1024, 4096, 16384)

#: the most prompts for which truncated sums are used (a larger batch reads every token
#: once for all prompts in one matrix product, which is cheaper per prompt)
MAX_HEAD_BATCH = 4

#: the most prompts for which the fused reduction is used: it costs about one pass over the
#: rows per prompt (12 ms per SmolLM2 layer and prompt), the chunked matrix products about 0.6 s
#: per layer for any batch up to 16, so the two cross near 50 prompts (int16 rows with the C
#: kernel of :mod:`mechcna.engine.native`: up to its ``MAX_BATCH``, 64 prompts, where it took
#: 2.3 s per SmolLM2 layer against 3.0 s for the chunked products, one thread)
MAX_FUSED_BATCH = 32

#: the share of ``tol`` a row's planned truncation error may take (:func:`head_plan`; a
#: choice of speed against certification rate, never of correctness)
PLAN_SHARE = 1 / 8

#: elements of float64 rows converted per chunk (4 MB: the conversion stays in cache)
CHUNK_ELEMENTS = 2**19

#: the fewest stored entries (rows x tokens) a :func:`central_moments` call must read to use
#: the fused reduction (smaller calls run eagerly: a compilation costs seconds once per
#: process and shape family, cached on disk by torch)
FUSED_MIN_ELEMENTS = 2**23

#: the fewest vocabulary entries an exact log-sum-exp call must read to use the fused one
FUSED_MIN_LSE = 2**20

_log = logging.getLogger(__name__)
_fused: dict[str, Any] = {}


def _moment_kernel(p: Tensor, y: Tensor, third: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Raw moments ``p . y^n`` (n = 1, 2 and with ``third`` 3) of the dense rows ``y`` in
    float64, each term one rounded product of an exact power (a dense operand lets the
    compiled loop vectorise and run on every thread)."""
    y = y.to(torch.float64)
    sq = y * y
    pp = p[:, None, :]
    m1 = (pp * y[None]).sum(-1)
    m2 = (pp * sq[None]).sum(-1)
    m3 = (pp * (sq * y)[None]).sum(-1) if third else None
    return m1, m2, m3


def _indexed_lse_kernel(z: Tensor, U: Tensor, r: Tensor, x: Tensor) -> Tensor:
    """``logsumexp(z + x_i U[r_i])`` along the vocabulary for each item ``i`` (``z`` one
    prompt's base logits; float64), the gather inside the compiled loop (the rows are read
    where they lie, not copied per item)."""
    return torch.logsumexp(z[None] + x[:, None] * U[r], -1)


def shifted_logsumexp(
    z: Float[Tensor, "batch d_vocab"],
    U: Float[Tensor, "n d_vocab"],
    x: Float[Tensor, " k"],
    b: Int[Tensor, " k"],
    r: Int[Tensor, " k"],
    chunk: int = 128,
) -> Float[Tensor, " k"]:
    """``logsumexp(z[b_i] + x_i U[r_i])`` for every item ``i`` (the exact path's log-sum-exp
    of a shifted base), float64: per prompt one fused reduction where
    :func:`fused_available` (for at least :data:`FUSED_MIN_LSE` entries), else eager chunks of
    ``chunk`` items."""
    return _per_prompt(
        "lse", _indexed_lse_kernel, z, b, chunk, lambda i, it: (z[i], U, r[it], x[it])
    )


def _per_prompt(key: str, kernel: Any, z: Tensor, b: Tensor, chunk: int, args: Any) -> Tensor:
    """``kernel(*args(prompt, items))`` for each prompt's items ``b == prompt``: compiled once
    per process (``_fused[key]``) and run on all of a prompt's items at once where
    :func:`fused_available` (for at least :data:`FUSED_MIN_LSE` entries), else eagerly on
    chunks of ``chunk`` items (the same sums)."""
    out = z.new_zeros(len(b))
    fused = len(b) * z.shape[1] >= FUSED_MIN_LSE and fused_available(z[:1], FUSED_MIN_ELEMENTS)
    for prompt in b.unique().tolist():
        items = (b == prompt).nonzero().flatten()
        if fused:
            if key not in _fused:
                _fused[key] = torch.compile(kernel, dynamic=True)
            try:
                out[items] = _fused[key](*args(prompt, items))
                continue
            except Exception as err:  # as in fused_moments
                _fused["broken"], fused = True, False
                _log.warning("fused log-sum-exp unavailable (%s); using eager chunks", err)
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            out[part] = kernel(*args(prompt, part))
    return out


def _fine_lse_kernel(z: Tensor, Y: Tensor, F: Tensor, r: Tensor, x: Tensor, fine: int) -> Tensor:
    """``logsumexp(z + x_i (fine Y[r_i] + F[r_i]))`` for int16 rows ``Y`` and their int8
    residuals ``F`` (the refined rows of :meth:`mechcna.engine.rows.RowStore.fine_levels`, exact
    in float32), read where they lie."""
    v = Y[r].to(torch.float32) * fine + F[r].to(torch.float32)
    return torch.logsumexp(z[None] + x[:, None] * v, -1)


def fine_logsumexp(
    z: Float[Tensor, "batch d_vocab"],
    Y: Tensor,
    F: Tensor,
    fine: int,
    x: Float[Tensor, " k"],
    b: Int[Tensor, " k"],
    r: Int[Tensor, " k"],
    chunk: int = 128,
) -> Float[Tensor, " k"]:
    """``logsumexp(z[b_i] + x_i (fine Y[r_i] + F[r_i]))`` for every item (float64): per prompt
    one compiled loop that reads the stored rows in place where :func:`fused_available`, else
    eager chunks of ``chunk`` items (the same sums). The C kernel of
    :mod:`mechcna.engine.native` serves every item in one call where it builds (its own
    ``exp``: :func:`mechcna.engine.native.lse_error` bounds what it adds)."""
    got = native.fine_logsumexp(z, Y, F, fine, x, b, r)
    if got is not None:
        return got
    return _per_prompt(
        "fine", _fine_lse_kernel, z, b, chunk, lambda i, it: (z[i], Y, F, r[it], x[it], fine)
    )


def fused_available(p: Tensor, elements: int, int16: bool = False) -> bool:
    """Whether :func:`central_moments` uses the fused reduction for ``p`` (a CPU batch of at
    most :data:`MAX_FUSED_BATCH` prompts; for ``int16`` rows with the C kernel built, at most
    :data:`mechcna.engine.native.MAX_BATCH`) and ``elements`` stored entries."""
    if os.environ.get("MECHCNA_COMPILE", "1") == "0":
        return False
    if int16 and p.shape[0] <= native.MAX_BATCH and native.library() is not None:
        limit = native.MAX_BATCH
    elif _fused.get("broken"):
        return False
    else:
        limit = MAX_FUSED_BATCH
    return p.device.type == "cpu" and p.shape[0] <= limit and elements >= FUSED_MIN_ELEMENTS


def _packed_kernel(
    pe: Tensor, po: Tensor, w: Tensor, third: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_moment_kernel` for int16 rows read as int32 pairs ``w`` (little-endian: the
    even column in the low half), ``pe`` and ``po`` the even and odd columns of ``p``: loads
    of int16 do not vectorise in the compiled loop, loads of int32 do."""
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(w, 16), 16).to(torch.float64)
    hi = torch.bitwise_right_shift(w, 16).to(torch.float64)
    a, b = pe[:, None, :], po[:, None, :]
    lo2, hi2 = lo * lo, hi * hi
    m1 = (a * lo[None] + b * hi[None]).sum(-1)
    m2 = (a * lo2[None] + b * hi2[None]).sum(-1)
    m3 = (a * (lo2 * lo)[None] + b * (hi2 * hi)[None]).sum(-1) if third else None
    return m1, m2, m3


def fused_moments(
    p: Float[Tensor, "batch k"],
    y: Tensor,
    third: bool,
    rows: Tensor | None = None,
    want: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """:func:`_moment_kernel` (int16 rows of even width: :func:`_packed_kernel`) compiled once
    per process with dynamic shapes, or ``None`` when compilation fails (then every later call
    returns ``None`` at once: the caller runs the eager chunks). With ``rows``, the moments of
    ``y[rows]`` (read in place by the C kernel, else gathered). ``want`` (``[batch, rows]``)
    lets the C kernel skip the pairs it does not mark (their values are then meaningless; the
    other paths sum every pair)."""
    if y.dtype == torch.int16:  # the C kernel where it builds (about 2-3x faster)
        got = native.moments_int16(p, y, third, rows, want)
        if got is not None:
            return got
    if rows is not None:
        y = y[rows.to(y.device)]
    packed = y.dtype == torch.int16 and y.shape[1] % 2 == 0 and sys.byteorder == "little"
    key = "packed" if packed else "dense"
    if key not in _fused:
        _fused[key] = torch.compile(_packed_kernel if packed else _moment_kernel, dynamic=True)
    try:
        if packed:
            w = y.contiguous().view(torch.int32)
            return _fused[key](p[:, 0::2].contiguous(), p[:, 1::2].contiguous(), w, third)
        return _fused[key](p, y, third)
    except Exception as err:  # no C++ compiler, an unsupported platform: run eagerly
        _fused["broken"] = True
        _log.warning("fused moment reduction unavailable (%s); using eager chunks", err)
        return None


def gamma(n: int) -> float:
    """Bound on the relative rounding error of a float64 sum or dot product of ``n`` terms
    (``n u / (1 - n u)``), plus ``1100 u`` for the rounding of the probabilities
    ``exp(z - log_norm)`` (relative ``u |z_j - log_norm|``; tokens further than 1000 nats
    below the top have a probability below ``e^-1000``, zero in any float format)."""
    return 1.01 * (n + 1100) * U64


def raw_moments(
    p: Float[Tensor, "batch d_vocab"], y: Tensor, third: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(m1, m2, k2, k3)`` of the rows ``y`` (any dtype, converted to float64 on ``p``'s
    device) under ``p`` (float64; a sub-probability for truncated sums)."""
    y = y.to(device=p.device, dtype=torch.float64)
    sq = y * y
    m1 = p @ y.T
    m2 = p @ sq.T
    k2 = m2 - m1 * m1
    k3 = None
    if third:
        m3 = p @ sq.mul_(y).T
        k3 = m3 - 3 * m1 * m2 + 2 * m1**3
    return m1, m2, k2, k3


def moment_errors(m2: Tensor, R: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """Bounds on the float64 rounding of ``k2`` and ``k3`` from raw moments of rows with
    ``|y| <= R`` over ``V`` tokens: ``|dk2| <= 6 g m2`` and ``|dk3| <= 16 g R m2``."""
    g = gamma(V) + 4 * U64
    return 6 * g * m2, 16 * g * R * m2


def _bounds_of(store: "RowStore", sel: Int[Tensor, " n"], dev: torch.device) -> Tensor:
    """``R`` with ``|stored value| <= R`` per row: the levels (rounded formats) or the radius
    (rounded to the storage dtype), float64 on ``dev``."""
    if store.normalised:
        return torch.full((len(sel),), store.levels, dtype=torch.float64, device=dev)
    return store.radius_of(sel).to(dev) * (1 + 2.0**-20)


def head_plan(
    p: Float[Tensor, "batch d_vocab"], reach: Float[Tensor, "batch n"] | None, tol: float, n: int
) -> list[tuple[Tensor, Tensor | None, Tensor]]:
    """``[(rows, cols, delta)]``: the rows (a mask over the ``n`` rows) whose moments are
    summed over the token columns ``cols`` (``None``: every token), and ``delta[batch]``, an
    upper bound on each prompt's probability mass outside ``cols``.

    ``reach[b, k]`` is ``|a| R`` (coefficient times the row's bound in real units) for prompt
    ``b`` and row ``k``; a row takes the smallest head whose truncation error adds at most
    ``PLAN_SHARE * tol`` to the bound for every prompt."""
    B, V = p.shape
    every = torch.zeros(B, dtype=torch.float64, device=p.device)
    tiers = [K for K in HEADS if 2 * K <= V]
    if reach is None or B > MAX_HEAD_BATCH or not tiers or n == 0:
        return [(torch.ones(n, dtype=torch.bool, device=p.device), None, every)]
    ps, order = p.sort(-1, descending=True)
    tail = ps.flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = mass beyond the top k (all >= 0)
    x = reach.to(torch.float64)
    assigned = torch.full((n,), len(tiers), dtype=torch.long, device=p.device)
    deltas = []
    for t, K in enumerate(tiers):
        d = (tail[:, K] * (1 + 1e-9))[:, None]  # covers the cumsum's rounding
        deltas.append(d[:, 0])
        cost = d * ((3 + d) * x**2 / 2 + (13 + 15 * d + 6 * d * d) * x**3 / 6)
        ok = (cost <= tol * PLAN_SHARE).all(0) & (assigned == len(tiers))
        assigned[ok] = t
    plan = []
    for t, K in enumerate(tiers):
        mask = assigned == t
        if bool(mask.any()):
            cols = torch.unique(order[:, :K])  # sorted: reads each row front to back
            plan.append((mask, cols, deltas[t]))
    mask = assigned == len(tiers)
    if bool(mask.any()):
        plan.append((mask, None, every))
    return plan


def _raw_parts(
    pk: Tensor,
    store: "RowStore",
    rows: Tensor,
    cols: Tensor | None,
    third: bool,
    want: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(m2, k2, k3)`` of the stored rows ``rows`` (columns ``cols``) under ``pk``: one fused
    reduction when :func:`fused_available`, else eager chunks (``want``: as in
    :func:`fused_moments`)."""
    B, width = pk.shape
    # a full layer read in row order is a run of contiguous slices
    whole = cols is None and len(rows) == store.n_rows
    int16 = store.storage == torch.int16
    if store.device == pk.device and fused_available(pk, len(rows) * width, int16):
        if int16 and cols is None:  # the C kernel reads a subset of rows in place
            y = store.stored(slice(None))
            got = fused_moments(pk, y, third, None if whole else rows, want)
        else:
            y = store.stored(slice(None) if whole else rows, cols)  # a gathered copy unless whole
            got = fused_moments(pk, y, third)
        if got is not None:
            m1, m2, m3 = got
            k3 = None if m3 is None else m3 - 3 * m1 * m2 + 2 * m1**3
            return m2, m2 - m1 * m1, k3
    chunk = max(16, CHUNK_ELEMENTS // width) if B <= 2 else max(32, CHUNK_ELEMENTS // width)
    parts: list[list[Tensor]] = [[], [], []]
    for i in range(0, len(rows), chunk):
        idx = slice(i, i + chunk) if whole else rows[i : i + chunk]
        _, m2, c2, c3 = raw_moments(pk, store.stored(idx, cols), third)
        parts[0].append(m2)
        parts[1].append(c2)
        if c3 is not None:
            parts[2].append(c3)
    return (
        torch.cat(parts[0], 1),
        torch.cat(parts[1], 1),
        (torch.cat(parts[2], 1) if third else None),
    )


def central_moments(
    p: Float[Tensor, "batch d_vocab"],
    store: "RowStore",
    sel: Int[Tensor, " n"],
    third: bool,
    reach: Float[Tensor, "batch n"] | None = None,
    tol: float = 0.0,
    want: Bool[Tensor, "batch n"] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(k2, dk2, k3, dk3)``: variance and (with ``third``) third central moment of the
    stored rows ``sel`` under each distribution (float64 ``p``), in the rows' real units,
    with bounds on their error (rounding and truncation, see the module docstring).

    ``reach`` (``|a| R`` per prompt and row) lets rows of neurons with small coefficients be
    summed over each prompt's most probable tokens only (:func:`head_plan`); without it every
    token is read. With ``want``, the pairs (prompt, row) it does not mark are not wanted: they
    may be skipped, and are returned as NaN whichever path runs (so a caller that used one
    could not miss it)."""
    dev = p.device
    B, V = p.shape
    n = len(sel)
    k2 = torch.zeros(B, n, dtype=torch.float64, device=dev)
    if n == 0:
        return k2, k2.clone(), (k2.clone() if third else None), (k2.clone() if third else None)
    dk2 = torch.zeros_like(k2)
    k3 = torch.zeros_like(k2) if third else None
    dk3 = torch.zeros_like(k2) if third else None
    R_all = _bounds_of(store, sel, dev)
    # the fused reduction reads a whole row about as fast as a gathered head of it
    fused = fused_available(p, n * V, store.storage == torch.int16)
    for mask, cols, delta in head_plan(p, None if fused else reach, tol, n):
        rows = sel[mask.to(sel.device)]
        width = V if cols is None else len(cols)
        pk = p if cols is None else p[:, cols]
        m2, c2, c3 = _raw_parts(
            pk, store, rows, cols, third, None if want is None else want[:, mask]
        )
        R = R_all[mask]
        e2, e3 = moment_errors(m2, R, width)
        d = delta[:, None]
        e2 = e2 + (3 + d) * d * R**2
        k2[:, mask], dk2[:, mask] = c2, e2
        if third:
            assert k3 is not None and dk3 is not None and c3 is not None
            e3 = e3 + (13 + 15 * d + 6 * d * d) * d * R**3
            k3[:, mask], dk3[:, mask] = c3, e3
    step = store.step(sel).to(dev)
    slack = 1 + 16 * U64  # rescaling by the step
    k2, dk2 = k2 * step**2, dk2 * step**2 * slack
    if third:
        assert k3 is not None and dk3 is not None
        k3, dk3 = k3 * step**3, dk3 * step**3 * slack + k3.abs() * step**3 * 8 * U64
    if want is not None:
        drop = ~want.to(dev)
        k2, dk2 = k2.masked_fill(drop, math.nan), dk2.masked_fill(drop, math.nan)
        if k3 is not None and dk3 is not None:
            k3, dk3 = k3.masked_fill(drop, math.nan), dk3.masked_fill(drop, math.nan)
    return k2, dk2, k3, dk3
