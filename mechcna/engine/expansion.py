"""The fused, certified evaluator of log-probability increases (METHODS.md sections 4 and 10).

For a base residual with frozen-scale logits ``z`` (one row per prompt) and a neuron whose
projected direction is the row ``u`` of a :class:`~mechcna.engine.projection.DirectionBlock`, adding
the neuron's contribution with coefficient ``a = c / s`` changes the target's log-probability by

    ``Imp = a * u_w - K(a)``,   ``K(a) = log sum_j p_j exp(a * u_j)``,   ``p = softmax(z)``.

``K`` is the cumulant generating function of ``u`` under the base distribution ``p``. The exact
value costs one exponential per (neuron, vocabulary token) pair; that is the floor of any
brute-force exact method. This module goes below it without giving up exactness.

**Expansion.** ``K(a) = a k1 + a^2 k2 / 2 + a^3 k3 / 6 + R4`` (or stopped after ``k2`` with
remainder ``R3``), ``k1..k3`` the cumulants of ``u`` under ``p``.

**Remainder bounds** (``r = max(u) - min(u)``, the row's range over the vocabulary). By
Taylor's theorem ``R3 = a^3 K3(t) / 6`` and ``R4 = a^4 K4(t) / 24`` for some ``t`` between
0 and ``a``, where ``Kn(t)``, the n-th derivative of ``K`` at ``t``, is the n-th cumulant of
the tilted distribution ``p_t ~ p exp(t u)``, supported on the same values. For any such
distribution with mean ``m_t`` and variance ``v_t``: ``|u - m_t| <= r``, so
``|K3(t)| <= E|u - m_t|^3 <= r v_t`` and ``-3 v_t^2 <= K4(t) = E(u - m_t)^4 - 3 v_t^2 <=
r^2 v_t``; with ``v_t <= r^2 / 4`` (Popoviciu), ``|K4(t)| <= r^2 v_t`` and also
``|K4(t)| <= r^4 / 4``. Finally ``v_t <= E_t (u - m_0)^2 = E[(u - m_0)^2 e^{t u}] /
E[e^{t u}] <= k2 e^{|t| r}``: the numerator is at most ``k2 e^{|t| max|u - m_0|} e^{t m_0}``
and the denominator at least ``e^{t m_0}`` (Jensen). Hence

    ``|R3| <= |a|^3 r k2 e^{|a| r} / 6``,
    ``|R4| <= a^4 min(r^4 / 96, r^2 k2 e^{|a| r} / 24)``.

**Stored rows in 16 bits.** When a row is known only as ``y = u + e`` with
``|e_j| <= eta`` (16-bit storage, :mod:`mechcna.engine.rows`), the cumulants of ``y`` are used for
``k2`` and ``k3`` and the bound adds their error: with centred ``c = u - E u``,
``f = e - E e`` (``|f| <= 2 eta``) and ``S = sd(y) + 2 eta >= sd(u)``:
``|Var y - Var u| <= 4 eta sd(y) + 12 eta^2`` and
``|k3(y) - k3(u)| <= 3 E[c^2 |f|] + 3 E[|c| f^2] + E|f|^3 <= 6 eta S^2 + 12 eta^2 S + 8 eta^3``.
``k1`` and the target's entry never use stored rows: ``u_w - k1 = w . (M_target - M p)`` is
computed from the neuron's residual-space vector ``w`` and the projector ``M``
(:class:`mechcna.engine.blocks.Projector`). The bound then also uses ``k2 <= S^2``.

**Rows only where needed** (:func:`increase_from_rows` when the layer's rows are not all
stored and the cache cannot hold them, e.g. streaming): ``k1`` as above and ``k2 = w C w``
with ``C = sum_j p_j (M_j - M p)(M_j - M p)^T`` (a ``d_model x d_model`` covariance per
prompt and layer) are exact without the row; ``r`` is bounded from above by
:meth:`mechcna.engine.blocks.Projector.range_bound`. Only neurons whose ``R3`` bound exceeds
``tol`` need their rows; they then get the third-order value with the ``R4`` bound, or the
exact sum.

**Exact fallback.** Every (prompt, neuron) whose bound exceeds ``tol`` is recomputed with
the full log-sum-exp on the exact row (recomputed from ``w`` when stored rows are rounded),
in fused chunks. So every returned score is within ``tol`` of the exact value (plus
floating-point rounding). ``method="exact"`` evaluates everything exactly.

Example:
    >>> imp = logprob_increase(z, block, a, target)        # doctest: +SKIP
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mechcna._types import Float, Int, Tensor
from mechcna.engine.projection import DirectionBlock
from mechcna.models.inputs import tolerance

if TYPE_CHECKING:
    from mechcna.engine.blocks import LayerRows
    from mechcna.engine.rows import RowStore

Method = Literal["certified", "exact"]


@dataclass
class EngineStats:
    """Counters filled by :func:`logprob_increase` (for benchmarks and diagnostics)."""

    scored: int = 0
    exact: int = 0

    @property
    def certified_fraction(self) -> float:
        return 1.0 - self.exact / self.scored if self.scored else 0.0


def default_tol(dtype: torch.dtype) -> float:
    """Certification tolerance: 1e-12 in float64, 1e-6 otherwise."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def cumulants(
    probs: Float[Tensor, "batch d_vocab"], U: Float[Tensor, "row d_vocab"], chunk: int = 1024
) -> tuple[Float[Tensor, "batch row"], Float[Tensor, "batch row"], Float[Tensor, "batch row"]]:
    """First three cumulants of each row of ``U`` under each distribution in ``probs``."""
    m1, m2, m3 = [], [], []
    for i in range(0, U.shape[0], chunk):
        rows = U[i : i + chunk]
        sq = rows * rows
        m1.append(probs @ rows.T)
        m2.append(probs @ sq.T)
        sq.mul_(rows)
        m3.append(probs @ sq.T)
    r1, r2, r3 = torch.cat(m1, 1), torch.cat(m2, 1), torch.cat(m3, 1)
    k2 = r2 - r1 * r1
    k3 = r3 - 3 * r1 * r2 + 2 * r1**3
    return r1, k2, k3


def logprob_increase(
    base_logits: Float[Tensor, "batch d_vocab"],
    block: DirectionBlock,
    coef: Float[Tensor, "batch extra row"],
    target: Int[Tensor, " batch"],
    *,
    method: Method = "certified",
    tol: float | None = None,
    chunk: int = 1024,
    exact_chunk: int = 128,
    stats: EngineStats | None = None,
) -> Float[Tensor, "batch extra row"]:
    """``log p(w | base + a u) - log p(w | base)`` for every prompt, extra index and row.

    Args:
        base_logits: ``[batch, d_vocab]`` frozen-scale logits of the base residual per prompt.
        block: the static directions (rows centred, with radii).
        coef: ``[batch, extra, row]`` coefficients divided by the frozen scale; ``extra``
            indexes e.g. source positions of attention neurons (size 1 for FFN neurons).
        target: ``[batch]`` target token per prompt.
        method: ``"certified"`` (expansion with a rigorous bound, exact where needed) or
            ``"exact"``.
        tol: the largest expansion error accepted (default :func:`default_tol`).
        chunk: rows per matrix product when forming moments.
        exact_chunk: (prompt, row) pairs per fused log-sum-exp in the exact path.
        stats: optional counters to update.

    Returns:
        ``[batch, extra, row]`` log-probability increases (natural log).
    """
    dtype = base_logits.dtype
    tol = default_tol(dtype) if tol is None else tolerance(tol)
    U = block.U
    log_norm = torch.logsumexp(base_logits, -1)
    u_target = U[:, target].T  # [batch, row]
    if method == "exact":
        out = torch.zeros_like(coef)
        todo = coef != 0
    else:
        probs = torch.exp(base_logits - log_norm[:, None])
        k1, k2, k3 = cumulants(probs, U, chunk)
        k2 = k2.clamp_min(0)
        a = coef
        out = a * (u_target - k1)[:, None] - a * a * (k2 / 2)[:, None] - a**3 * (k3 / 6)[:, None]
        r = 2 * block.radius
        aa = a.abs()
        bound = aa**4 * torch.minimum(r**4 / 96, r**2 * k2[:, None] * torch.exp(aa * r) / 24)
        todo = bound > tol
    idx = todo.nonzero()
    if stats is not None:
        stats.scored += coef.numel()
        stats.exact += idx.shape[0]
    for i in range(0, idx.shape[0], exact_chunk):
        b, e, r = idx[i : i + exact_chunk].unbind(1)
        a = coef[b, e, r]
        shifted = torch.addcmul(base_logits[b], a[:, None], U[r])
        out[b, e, r] = a * u_target[b, r] - (torch.logsumexp(shifted, -1) - log_norm[b])
    return out


def exact_rows_logprob(
    logits: Float[Tensor, "... d_vocab"], target: Int[Tensor, "..."]
) -> Float[Tensor, "..."]:
    """``log_softmax(logits)[target]`` along the last axis (broadcasting ``target``)."""
    return torch.gather(logits, -1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def expansion_radius(tol: float) -> float:
    """The largest ``|a| * range`` the expansion certifies at ``tol``."""
    return math.pow(96 * tol, 0.25)


def _central_moments(
    probs: Float[Tensor, "batch d_vocab"], store: "RowStore", sel: Int[Tensor, " n"], third: bool
) -> tuple[Float[Tensor, "batch n"], Float[Tensor, "batch n"] | None]:
    """Variance and (with ``third``) third central moment of the stored rows ``sel`` under
    each distribution.

    One pass over the stored rows: ``chunk`` rows at a time are converted to the compute dtype
    and their raw moments formed while they are in cache (a few MB), so each stored byte is
    read from memory once (measured on SmolLM2: 8 rows per chunk for one prompt is about 8x
    faster than 1024; a batch of prompts wants larger chunks for its matrix product). Rounded
    rows are used as stored and the moments rescaled by ``radius / levels`` afterwards."""
    chunk = 8 if probs.shape[0] <= 2 else 64
    k2s, k3s = [], []
    whole = len(sel) == store.n_rows  # sel is then arange: read contiguous slices
    for i in range(0, len(sel), chunk):
        part = slice(i, i + chunk) if whole else sel[i : i + chunk]
        y = store.stored(part).to(probs.dtype)
        sq = y * y
        m1 = probs @ y.T
        m2 = probs @ sq.T
        k2s.append(m2 - m1 * m1)
        if third:
            m3 = probs @ sq.mul_(y).T
            k3s.append(m3 - 3 * m1 * m2 + 2 * m1**3)
    k2 = torch.cat(k2s, 1) if k2s else probs.new_zeros(probs.shape[0], 0)
    k3 = (torch.cat(k3s, 1) if k3s else torch.zeros_like(k2)) if third else None
    if store.normalised:
        r = store.step(sel).to(probs.dtype)
        k2 = k2 * r**2
        k3 = k3 * r**3 if k3 is not None else None
    return k2.clamp_min(0), k3


def _exact_rows(rows: "LayerRows", idx: Int[Tensor, " n"], chunk: int = 256) -> Tensor:
    """Exact (uncentred) rows ``W[idx] @ M`` in the compute dtype."""
    M = rows.projector.M
    out = [rows.W[idx[i : i + chunk]] @ M for i in range(0, len(idx), chunk)]
    if len(out) == 1:
        return out[0]
    return torch.cat(out) if out else M.new_zeros(0, M.shape[1])


def _covariance_k2(
    probs: Float[Tensor, "batch d_vocab"],
    mean: Float[Tensor, "batch d_model"],
    M: Float[Tensor, "d_model d_vocab"],
    W: Float[Tensor, "row d_model"],
) -> Float[Tensor, "batch row"]:
    """Exact ``k2 = w C w`` per prompt and row, ``C`` the covariance of ``M``'s columns."""
    out = []
    for b in range(probs.shape[0]):
        X = M - mean[b][:, None]
        C = (X * probs[b]) @ X.T
        out.append(((W @ C) * W).sum(-1))
    return torch.stack(out).clamp_min(0)


def increase_from_rows(
    base_logits: Float[Tensor, "batch d_vocab"],
    rows: "LayerRows",
    coef: Float[Tensor, "batch extra row"],
    target: Int[Tensor, " batch"],
    *,
    method: Method = "certified",
    tol: float | None = None,
    fill: bool = True,
    chunk: int = 1024,
    exact_chunk: int = 128,
    stats: EngineStats | None = None,
) -> Float[Tensor, "batch extra row"]:
    """:func:`logprob_increase` for one layer's neurons given as :class:`LayerRows`.

    Args:
        rows: the neurons' residual-space vectors ``W``, the projector ``M`` and the
            layer's row store (rows at half or full precision, some or all computed).
        fill: compute and store every missing row first (the cache can hold the layer);
            otherwise rows are computed only for the neurons the second-order expansion
            cannot certify (see the module docstring).

    Returns:
        ``[batch, extra, row]`` log-probability increases (natural log).
    """
    tol = default_tol(base_logits.dtype) if tol is None else tolerance(tol)
    M, W, store = rows.projector.M, rows.W, rows.store
    n_rows = W.shape[0]
    log_norm = torch.logsumexp(base_logits, -1)
    probs = torch.exp(base_logits - log_norm[:, None])
    mean = probs @ M.T  # [batch, d_model]
    d1 = (M[:, target].T - mean) @ W.T  # u_w - k1, exact
    a, aa = coef, coef.abs()
    fresh: dict[int, Tensor] = {}
    out = torch.zeros_like(coef)
    if method == "exact":
        fail = coef != 0
    else:
        if fill and not bool(store.known.all()):
            missing = (~store.known).nonzero().flatten()
            for i in range(0, len(missing), 128):  # 25 MB of float32 rows: stays in cache
                store.fill(missing[i : i + 128], _exact_rows(rows, missing[i : i + 128]))
        if bool(store.known.all()):
            sel = torch.arange(n_rows)
            k2 = None
        else:
            k2 = _covariance_k2(probs, mean, M, W)
            width = torch.where(store.known, 2 * store.radius, rows.projector.range_bound(W))
            out = a * d1[:, None] - a * a * (k2 / 2)[:, None]
            bound3 = aa**3 * width * k2[:, None] * torch.exp(aa * width) / 6
            sel = (bound3 > tol).any(0).any(0).nonzero().flatten()
            missing = sel[~store.known[sel]]
            for i in range(0, len(missing), chunk):
                part = missing[i : i + chunk]
                exact = _exact_rows(rows, part)
                store.fill(part, exact)
                fresh.update(zip(part.tolist(), exact, strict=True))
        fail = torch.zeros_like(coef, dtype=torch.bool)
        if len(sel):
            fail[:, :, sel] = _third_order(out, a, d1, probs, store, sel, k2, tol, chunk)
    idx = fail.nonzero()
    if stats is not None:
        stats.scored += coef.numel()
        stats.exact += idx.shape[0]
    if len(idx):
        uniq, inverse = torch.unique(idx[:, 2], return_inverse=True)
        if not store.normalised and bool(store.known[uniq].all()):
            U = store.get(uniq)
        else:
            kept = store.exact_known[uniq]
            todo = uniq[[int(r) not in fresh and not bool(k) for r, k in zip(uniq, kept)]]
            fresh.update(zip(todo.tolist(), _exact_rows(rows, todo), strict=True))
            new = uniq[~kept]
            if len(new):
                store.put_exact(new, torch.stack([fresh[int(r)] for r in new.tolist()]))
            U = (
                store.get_exact(uniq)
                if store.normalised
                else torch.stack([fresh[int(r)] for r in uniq.tolist()])
            )
        for i in range(0, idx.shape[0], exact_chunk):
            b, e, r = idx[i : i + exact_chunk].unbind(1)
            u = U[inverse[i : i + exact_chunk]]
            x = coef[b, e, r]
            shifted = torch.addcmul(base_logits[b], x[:, None], u)
            own = u.gather(1, target[b][:, None]).squeeze(1)
            out[b, e, r] = x * own - (torch.logsumexp(shifted, -1) - log_norm[b])
    return out


def _third_order(
    out: Tensor,
    a: Tensor,
    d1: Tensor,
    probs: Tensor,
    store: "RowStore",
    sel: Tensor,
    k2_exact: Tensor | None,
    tol: float,
    chunk: int,
) -> Tensor:
    """Third-order values (in place in ``out``) for rows ``sel`` from stored rows; returns
    the ``[batch, extra, len(sel)]`` mask of items the bound does not certify."""
    eta = store.eta(sel).to(probs.dtype)[None]
    k2y, _ = _central_moments(probs, store, sel, third=False)
    S = k2y.sqrt() + 2 * eta
    if k2_exact is None:  # k2 from the stored rows: its error enters the bound
        k2, dk2 = k2y, 4 * eta * k2y.sqrt() + 12 * eta**2
        k2_max = S**2
    else:
        k2, dk2 = k2_exact[:, sel], torch.zeros_like(k2y)
        k2_max = k2
    dk3 = 6 * eta * S**2 + 12 * eta**2 * S + 8 * eta**3
    r = 2 * store.radius[sel].to(probs.dtype)
    x, ax = a[:, :, sel], a[:, :, sel].abs()
    grow = torch.exp(ax * r)
    bound3 = ax**3 * r * k2_max[:, None] * grow / 6 + ax**2 * dk2[:, None] / 2
    second = x * d1[:, None, sel] - x * x * (k2 / 2)[:, None]
    # third order only for rows with an item the second-order bound does not certify (a
    # second pass over those rows; typically 1% to 40% of a layer's rows on SmolLM2)
    need = (bound3 > tol).flatten(0, 1).any(0)
    k3 = torch.zeros_like(k2y)
    if bool(need.any()):
        k3[:, need] = _central_moments(probs, store, sel[need], third=True)[1]  # type: ignore[index]
    bound4 = ax**4 * torch.minimum(r**4 / 96, r**2 * k2_max[:, None] * grow / 24)
    bound4 = bound4 + ax**2 * dk2[:, None] / 2 + ax**3 * dk3[:, None] / 6
    third = second - x**3 * (k3 / 6)[:, None]
    out[:, :, sel] = torch.where(bound3 <= tol, second, third)
    return (bound3 > tol) & (bound4 > tol)
