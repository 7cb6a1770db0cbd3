"""The fused, certified evaluator of log-probability increases (docs/methods.md sections 4 and 10).

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

**No moments** (issue 20, speed; :func:`_hoeffding`). Hoeffding's lemma bounds
``0 <= K(a) - a k1 <= a^2 r^2 / 8``, so an item whose ``a^2 r^2 / 16`` (plus the rounding of
``d1``) is within ``tol`` is scored ``a (u_w - k1) - a^2 r^2 / 16`` from ``d1`` alone, and a layer's
row none of whose items needs more is not read.

**Stored rows.** When a row is known only as ``y = u + e`` with ``|e_j| <= eta`` (16-bit or
float32 storage, :mod:`mechcna.engine.rows`; ``eta`` also covers the float64 computation of the row,
:func:`row_eta`), the cumulants of ``y`` are used for
``k2`` and ``k3`` and the bound adds their error: with centred ``c = u - E u``,
``f = e - E e`` (``|f| <= 2 eta``) and ``S = sd(y) + 2 eta >= sd(u)``:
``|Var y - Var u| <= 4 eta sd(y) + 12 eta^2`` and
``|k3(y) - k3(u)| <= 3 E[c^2 |f|] + 3 E[|c| f^2] + E|f|^3 <= 6 eta S^2 + 12 eta^2 S + 8 eta^3``.
``k1`` and the target's entry never use stored rows: ``u_w - k1 = w . (M_target - M p)`` is
computed from the neuron's residual-space vector ``w`` and the projector ``M``
(:class:`mechcna.engine.blocks.Projector`). The bound then also uses ``k2 <= S^2`` and the range
``r <= 2 (radius + eta)``.

**Rows only where needed** (:func:`increase_from_rows` when the layer's rows are not all
stored and the cache cannot hold them, e.g. streaming): ``k1`` as above and ``k2 = w C w``
with ``C = sum_j p_j (M_j - M p)(M_j - M p)^T`` (a ``d_model x d_model`` covariance per
prompt and layer) are exact without the row; ``r`` is bounded from above by
:meth:`mechcna.engine.blocks.Projector.range_bound` and by the exact range (plus its
rounding) computed once per weights (:mod:`mechcna.engine.widths`). Only neurons whose
``R3`` bound exceeds ``tol`` need their rows; they then get the third-order value with the
``R4`` bound, or the exact sum.

**Floating point** (issue 20). The remainder bounds need an upper bound on the *true*
``k2``, and the expansion's value is only as good as the computed ``k2``, ``k3`` and
``u_w - k1``; formed naively (``E[y^2] - E[y]^2`` in the compute dtype) the variance of a
confident distribution rounds to 0, the bounds vanish and a wrong first-order value is
certified. So everything after the inputs (base logits ``z``, coefficients, ``W`` and ``M``)
is evaluated in float64, and the rounding is bounded and added to the certificate:

* ``p = exp(z - log_norm)`` normalised to sum 1 (a common factor is a shift of ``z``);
  each ``p_j`` has relative error at most ``u (|z_j - log_norm| + 2)``, folded into
  ``g = 1.01 (V + 1100) u``, ``u = 2^-53`` (tokens over 1000 nats below the top are 0 in any
  format);
* raw moments ``m_n = p . y^n`` of stored rows (int16 levels and float32 values, whose powers
  are exact in float64) are within ``g p . |y|^n <= g R^(n-2) m2`` (``|y| <= R``), so
  ``|dk2| <= 6 g m2`` and ``|dk3| <= 16 g R m2`` (:func:`_moment_errors`); ``k2 + dk2`` is used
  in the remainders and ``a^2 dk2 / 2 + |a|^3 dk3 / 6`` is added to the bound;
* ``u_w - k1 = w . x`` with ``x = sum_j q_j (M_w - M_j) = s M_w - M q``, ``q`` = ``p`` with the
  target's entry zeroed and ``s = sum q``: its rounding is at most
  ``g_d |x|.|w| + 2 g s |w|.max_j|M_j|``, proportional to the mass off the target, where
  ``1 - p_w`` computed directly would cancel; ``|a|`` times it is added to the bound;
* ``M`` is used minus its vocabulary mean (a constant per row, which changes no
  log-probability): each row's centre is then at most its radius, and a large vocabulary-common
  part of ``M`` neither cancels in ``x`` nor costs float32/16-bit rows their low bits;
* the streaming ``k2 = w C w`` carries ``(g + 2 g_d) |w|^2 tr C + |w|^2 |g max|M||^2``;
* ``4 u`` times the magnitudes of the expansion's terms covers their evaluation.

**Truncated moments.** For one to four prompts the moments of a row with a small
coefficient are summed over each prompt's most probable tokens only, with the omitted tail's
effect bounded and added to ``dk2`` and ``dk3`` (:mod:`mechcna.engine.moments`).

**Exact fallback.** Every (prompt, neuron) whose bound exceeds ``tol`` is recomputed with
the full log-sum-exp in float64: on the stored row refined by its residual word (file-backed
int16 stores, within ``tol / 2``: :func:`mechcna.engine.correction.fine_scores`), else on the
stored row plus a few exact entries (:func:`mechcna.engine.correction.corrected_logsumexp`),
else on the exact float64 row (kept per store, or recomputed from ``w``), in fused chunks.
So every returned score is within ``tol`` of the exact value on the
engine's inputs, apart from the final rounding of the float64 result to the compute dtype
(and float64 rounding of a log-sum-exp, about ``u`` times the largest logit).
``method="exact"`` evaluates everything exactly. ``tests/test_engine_properties.py`` checks
this against float64 literals on drawn confident and unconfident models.

Example:
    >>> imp = logprob_increase(z, block, a, target)        # doctest: +SKIP
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from mechcna._types import Float, Int, Tensor
from mechcna.engine.correction import Deferred, defer_items, row_eta, sparse_items
from mechcna.engine.moments import (
    U64,
    central_moments,
    fused_available,
    moment_errors,
    raw_moments,
    shifted_logsumexp,
)
from mechcna.engine.moments import gamma as _gamma
from mechcna.engine.projection import DirectionBlock
from mechcna.engine.rows import RowStore
from mechcna.models.inputs import tolerance

if TYPE_CHECKING:
    from mechcna.engine.blocks import LayerRows

Method = Literal["certified", "exact"]

#: float64 entries of the vocabulary block per product when forming the streaming
#: covariance (8 MB: the block stays in cache between its centring and its products, and
#: memory stays bounded whatever the vocabulary)
COVARIANCE_ELEMENTS = 2**20

#: the most bytes of float64 rows a streaming call keeps for its exact sums
FRESH_BYTES = 2**29


@dataclass
class EngineStats:
    """Counters filled by :func:`logprob_increase` (for benchmarks and diagnostics)."""

    scored: int = 0
    exact: int = 0
    #: of ``exact``, the items scored from the stored row plus a few exact entries or from the
    #: row refined by its residual word
    sparse: int = 0
    #: of ``sparse``, the items scored from the refined row
    fine: int = 0

    @property
    def certified_fraction(self) -> float:
        return 1.0 - self.exact / self.scored if self.scored else 0.0


def default_tol(dtype: torch.dtype) -> float:
    """Certification tolerance: 1e-12 in float64, 1e-6 otherwise."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def _probs(base_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z, log_norm, p)`` in float64, ``p`` normalised to sum 1 (a common factor of ``p``
    is a shift of ``z``, which changes no log-probability)."""
    z = base_logits.to(torch.float64)
    log_norm = torch.logsumexp(z, -1)
    p = torch.exp(z - log_norm[:, None])
    return z, log_norm, p / p.sum(-1, keepdim=True)


def cumulants(
    probs: Float[Tensor, "batch d_vocab"], U: Float[Tensor, "row d_vocab"], chunk: int = 1024
) -> tuple[Float[Tensor, "batch row"], Float[Tensor, "batch row"], Float[Tensor, "batch row"]]:
    """First three cumulants of each row of ``U`` under each distribution in ``probs``
    (formed in float64; returned in float64)."""
    p = probs.to(torch.float64)
    p = p / p.sum(-1, keepdim=True)
    m1, k2, k3 = [], [], []
    for i in range(0, U.shape[0], chunk):
        r1, _, c2, c3 = raw_moments(p, U[i : i + chunk], third=True)
        m1.append(r1)
        k2.append(c2)
        k3.append(c3)
    return torch.cat(m1, 1), torch.cat(k2, 1), torch.cat(k3, 1)


def _off_target(
    p: Float[Tensor, "batch d_vocab"], target: Int[Tensor, " batch"]
) -> tuple[Float[Tensor, "batch d_vocab"], Float[Tensor, " batch"]]:
    """``(q, s)``: ``p`` with the target's entry zeroed and its sum ``1 - p_w`` (formed as a
    sum of the other entries, so that it keeps its relative accuracy when ``p_w`` is near 1).
    ``u_w - k1 = sum_j q_j (u_w - u_j) = s u_w - q . u`` has rounding error at most
    ``2 g s max|u|``: proportional to the small mass off the target."""
    q = p.clone()
    q[torch.arange(len(target), device=p.device), target.to(p.device)] = 0
    return q, q.sum(-1)


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
        ``[batch, extra, row]`` log-probability increases (natural log), evaluated in float64
        and returned in ``coef``'s dtype.
    """
    tol = default_tol(base_logits.dtype) if tol is None else tolerance(tol)
    U = block.U
    z, log_norm, p = _probs(base_logits)
    a = coef.to(torch.float64)
    tgt = target.to(U.device)
    if method == "exact":
        out = torch.zeros_like(a)
        todo = coef != 0
    else:
        V = U.shape[1]
        g = _gamma(V) + 4 * U64
        R = block.radius.to(torch.float64) * (1 + 2.0**-20)  # |U| <= R despite rounding
        q, s = _off_target(p, tgt)
        k1s, k2s, k3s, dk2s, dk3s = [], [], [], [], []
        for i in range(0, U.shape[0], chunk):
            m1, m2, c2, c3 = raw_moments(q, U[i : i + chunk], third=False)
            del m2, c2, c3
            k1s.append(m1)  # q . u
            _, m2, c2, c3 = raw_moments(p, U[i : i + chunk], third=True)
            dk2, dk3 = moment_errors(m2, R[i : i + chunk], V)
            k2s.append(c2)
            k3s.append(c3)
            dk2s.append(dk2)
            dk3s.append(dk3)
        u_target = U[:, tgt].T.to(torch.float64)  # [batch, row]
        d1 = s[:, None] * u_target - torch.cat(k1s, 1)
        dd1 = 2.02 * g * s[:, None] * R[None]
        k2, k3 = torch.cat(k2s, 1), torch.cat(k3s, 1)
        dk2, dk3 = torch.cat(dk2s, 1), torch.cat(dk3s, 1)
        k2_hi = k2 + dk2
        k2 = k2.clamp_min(0)
        first = a * d1[:, None]
        second = a * a * (k2 / 2)[:, None]
        third = a**3 * (k3 / 6)[:, None]
        out = first - second - third
        r = 2 * R
        aa = a.abs()
        bound = aa**4 * torch.minimum(r**4 / 96, r**2 * k2_hi[:, None] * torch.exp(aa * r) / 24)
        bound = bound + aa * dd1[:, None] + aa**2 * (dk2 / 2)[:, None]
        bound = bound + aa**3 * (dk3 / 6)[:, None]
        bound = bound + 4 * U64 * (first.abs() + second + third.abs())
        todo = bound > tol
    idx = todo.nonzero()
    if stats is not None:
        stats.scored += coef.numel()
        stats.exact += idx.shape[0]
    for i in range(0, idx.shape[0], exact_chunk):
        b, e, r = idx[i : i + exact_chunk].unbind(1)
        x = a[b, e, r]
        u = U[r].to(torch.float64)
        shifted = torch.addcmul(z[b], x[:, None], u)
        own = u.gather(1, tgt[b][:, None]).squeeze(1)
        out[b, e, r] = x * own - (torch.logsumexp(shifted, -1) - log_norm[b])
    return out.to(coef.dtype)


def exact_rows_logprob(
    logits: Float[Tensor, "... d_vocab"], target: Int[Tensor, "..."]
) -> Float[Tensor, "..."]:
    """``log_softmax(logits)[target]`` along the last axis (broadcasting ``target``)."""
    return torch.gather(logits, -1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def expansion_radius(tol: float) -> float:
    """The largest ``|a| * range`` the expansion certifies at ``tol``."""
    return math.pow(96 * tol, 0.25)


def _exact_rows64(rows: "LayerRows", idx: Int[Tensor, " n"], chunk: int = 256) -> Tensor:
    """Exact rows ``W[idx] @ M64`` in float64 (``M64``: :meth:`Projector.exact`, the
    vocabulary-centred projector; rows differ from ``W @ M`` by a constant per row)."""
    M = rows.projector.exact()[0]
    W = rows.W
    idx = idx.to(W.device)
    out = [W[idx[i : i + chunk]].to(torch.float64) @ M for i in range(0, len(idx), chunk)]
    if len(out) == 1:
        return out[0]
    return torch.cat(out) if out else M.new_zeros(0, M.shape[1])


def _exact_rows(rows: "LayerRows", idx: Int[Tensor, " n"], chunk: int = 256) -> Tensor:
    """Exact rows (:func:`_exact_rows64`) in the compute dtype."""
    return _exact_rows64(rows, idx, chunk).to(rows.projector.M.dtype)


def _covariance_k2(
    p: Float[Tensor, "batch d_vocab"], M: Float[Tensor, "d_model d_vocab"],
    col_max: Float[Tensor, " d_model"], W: Float[Tensor, "row d_model"],
) -> tuple[Float[Tensor, "batch row"], Float[Tensor, "batch row"]]:  # fmt: skip
    """Exact ``k2 = w C w`` per prompt and row, ``C`` the covariance of ``M``'s columns
    (float64), and a bound on its rounding: ``(g + 2 g_d) |w|^2 tr C`` for the products and
    ``|w|^2 |g col_max|^2`` for the rounding of the mean (a common shift ``delta`` of the
    columns adds ``(w . delta)^2``)."""
    V, d = M.shape[1], M.shape[0]
    g, gd = _gamma(V), _gamma(d)
    mean = p @ M.T
    w2 = (W * W).sum(-1)
    shift = float((g * col_max).norm()) ** 2
    out, err = [], []
    step = max(1, COVARIANCE_ELEMENTS // d)
    root = p.sqrt()  # C = Y Y^T, Y = sqrt(p) X: one product, 2 u relative more per term
    h = d // 2
    for b in range(p.shape[0]):
        C = M.new_zeros(d, d)
        for j in range(0, V, step):  # a sum over the vocabulary in blocks (any order: g)
            Y = torch.sub(M[:, j : j + step], mean[b][:, None]).mul_(root[b, j : j + step])
            # the lower blocks only (C is symmetric): 3/4 of the products
            C[:h, :h].addmm_(Y[:h], Y[:h].T)
            C[h:, :h].addmm_(Y[h:], Y[:h].T)
            C[h:, h:].addmm_(Y[h:], Y[h:].T)
        C[:h, h:] = C[h:, :h].T
        out.append(((W @ C) * W).sum(-1))
        err.append(2 * (g + 4 * U64 + 2 * gd) * w2 * C.diagonal().sum() + 2 * w2 * shift)
    return torch.stack(out), torch.stack(err)


def target_offsets(
    base_logits: Float[Tensor, "n d_vocab"],
    target: Int[Tensor, " n"],
    M: Float[Tensor, "d_model d_vocab"],
    budget: int = 2**26,
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, " n"]]:
    """``(x, s)`` per row of ``base_logits``: ``x = sum_j q_j (M_w - M_j)`` and ``s = 1 - p_w``
    (:func:`_off_target`; ``M`` the float64 projector of :meth:`Projector.exact`), so that
    ``u_w - k1 = w . x`` for every neuron ``w``. Many rows (e.g. every layer of a prompt) are
    done in one matrix product per ``budget`` bytes, which reads ``M`` once instead of once
    per layer."""
    V = base_logits.shape[-1]
    step = max(1, budget // (24 * V))
    xs, ss = [], []
    for i in range(0, base_logits.shape[0], step):
        _, _, p = _probs(base_logits[i : i + step])
        tgt = target[i : i + step].to(M.device)
        q, s = _off_target(p, tgt)
        xs.append(s[:, None] * M[:, tgt].T - q @ M.T)
        ss.append(s)
    return torch.cat(xs), torch.cat(ss)


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
    offsets: tuple[Tensor, Tensor] | None = None,
    defer: list[Deferred] | None = None,
    tag: Any = None,
) -> Float[Tensor, "batch extra row"]:
    """:func:`logprob_increase` for one layer's neurons given as :class:`LayerRows`.

    Args:
        rows: the neurons' residual-space vectors ``W``, the projector ``M`` and the
            layer's row store (rows at half or full precision, some or all computed).
        fill: compute and store every missing row first (the cache can hold the layer);
            otherwise rows are computed only for the neurons the second-order expansion
            cannot certify (see the module docstring).
        offsets: ``(x, s)`` of :func:`target_offsets` for these base logits and targets,
            when computed beforehand for many layers at once.
        defer: a list to which the exact-path items needing new exact rows are appended
            (:class:`~mechcna.engine.correction.Deferred`, tagged ``tag``) instead of being
            scored: their entries of the result are then placeholders until the caller
            applies :func:`~mechcna.engine.correction.settle_deferred`.

    Returns:
        ``[batch, extra, row]`` log-probability increases (natural log), evaluated in float64
        and returned in ``coef``'s dtype.
    """
    tol = default_tol(base_logits.dtype) if tol is None else tolerance(tol)
    store = rows.store
    if not fill and method != "exact" and not bool(store.known.all()):
        # streaming: the rows computed here serve this call only (a scratch store in memory,
        # freed on return, in the compute dtype: no 16-bit rounding to pay for), so memory
        # stays bounded by one layer whatever the cache holds
        store = RowStore(store.n_rows, store.d_vocab, store.dtype, store.dtype,
                         device=store.device)  # fmt: skip
    M, col_max, _ = rows.projector.exact()
    W = rows.W.to(torch.float64)
    n_rows, d, V = W.shape[0], W.shape[1], M.shape[1]
    z, log_norm, p = _probs(base_logits)
    tgt = target.to(M.device)
    # u_w - k1 = w . sum_j q_j (M_w - M_j), formed without cancellation (see _off_target)
    x, s = target_offsets(base_logits, tgt, M) if offsets is None else offsets
    x, s = x.to(torch.float64), s.to(torch.float64)
    d1 = x @ W.T
    Wabs = W.abs()
    dd1 = _gamma(d) * (x.abs() @ Wabs.T) + 2.02 * _gamma(V) * s[:, None] * (Wabs @ col_max)
    a = coef.to(torch.float64)
    aa = a.abs()
    fresh: dict[int, Tensor] = {}
    out = torch.zeros_like(a)
    if method == "exact":
        fail = coef != 0
    else:
        store.verify()  # rows read from disk for the first time are checked first
        dev = p.device
        if fill and not bool(store.known.all()):
            missing = (~store.known).nonzero().flatten()
            for i in range(0, len(missing), 128):  # 50 MB of float64 rows: stays in cache
                store.fill(missing[i : i + 128], _exact_rows64(rows, missing[i : i + 128]))
        k2 = dk2 = None
        store.verify()  # rows another process added meanwhile
        easy = eta_all = None
        if bool(store.known.all()):
            sel = torch.arange(n_rows, device=dev)
            eta_all = row_eta(rows, store, W, sel)
            easy, hoeffding = _hoeffding(a, d1, dd1, 2 * (store.radius_of(sel) + eta_all), tol)
            sel = (~easy).flatten(0, 1).any(0).nonzero().flatten()  # rows not read at all
            out = hoeffding.clone()
        else:
            k2, dk2 = _covariance_k2(p, M, col_max, W)
            everyone = torch.arange(n_rows, device=dev)
            eta = row_eta(rows, store, W, everyone)
            known_width = 2 * (store.radius_of(everyone) + eta)
            bound_width = rows.projector.range_bound(rows.W).to(torch.float64) * (1 + 1e-6)
            bound_width = torch.minimum(bound_width, rows.cache.widths(rows).to(dev))
            width = torch.where(store.known.to(dev), known_width, bound_width)
            out = a * d1[:, None] - a * a * (k2.clamp_min(0) / 2)[:, None]
            bound3 = aa**3 * width * (k2 + dk2)[:, None] * torch.exp(aa * width) / 6
            bound3 = bound3 + aa * dd1[:, None] + aa**2 * (dk2 / 2)[:, None]
            bound3 = bound3 + 4 * U64 * (a * d1[:, None]).abs() + 4 * U64 * out.abs()
            sel = (bound3 > tol).any(0).any(0).nonzero().flatten()
            missing = sel[~store.known.to(dev)[sel]]
            # kept for the exact sums below unless that would take more than FRESH_BYTES
            # (then the few rows the exact sum needs are computed again)
            keep = len(missing) * V * 8 <= FRESH_BYTES
            for i in range(0, len(missing), 128):  # 128 float64 rows at a time
                part = missing[i : i + 128]
                exact = _exact_rows64(rows, part)
                store.fill(part, exact)
                if keep:
                    fresh.update(zip(part.tolist(), exact, strict=True))
        fail = torch.zeros_like(coef, dtype=torch.bool)
        if len(sel):
            eta = row_eta(rows, store, W, sel) if eta_all is None else eta_all[sel]
            # a (prompt, row) pair all of whose items take Hoeffding's route is not summed
            want = None if easy is None else ~easy[:, :, sel].all(1)
            fail[:, :, sel] = _third_order(out, a, d1, dd1, p, store, sel, eta, k2, dk2, tol, want)
        if easy is not None:  # an item's route never depends on the other items of its row
            out = torch.where(easy, hoeffding, out)
            fail &= ~easy
    idx = fail.nonzero()
    if stats is not None:
        stats.scored += coef.numel()
        stats.exact += idx.shape[0]
    if len(idx) and method != "exact" and store.rounded:
        idx = sparse_items(out, idx, a, z, log_norm, p, tgt, rows, store, W, fresh, tol, stats)
        if defer is not None and len(idx):
            idx = defer_items(defer, tag, idx, a, z, log_norm, tgt, rows, store, W, M, fresh)
    if len(idx):
        uniq, inverse = torch.unique(idx[:, 2], return_inverse=True)
        store.verify()
        host = uniq.cpu()  # bookkeeping masks live on the host
        if not store.rounded and bool(store.known[host].all()):
            U = store.get(uniq)  # float64 rows as computed (centred: a shift per row)
        else:
            kept = store.exact_known[host]
            todo = host[[int(r) not in fresh and not bool(k) for r, k in zip(host, kept)]]
            fresh.update(zip(todo.tolist(), _exact_rows64(rows, todo), strict=True))
            new = host[~kept]
            if len(new):
                store.put_exact(new, torch.stack([fresh[int(r)] for r in new.tolist()]))
            U = (
                store.get_exact(host).to(z.device)
                if store.rounded
                else torch.stack([fresh[int(r)] for r in host.tolist()])
            )
        b, e, r = idx.unbind(1)
        xb = a[b, e, r]
        lse = shifted_logsumexp(z, U, xb, b, inverse, exact_chunk)
        own = U[inverse, tgt[b]]
        out[b, e, r] = xb * own - (lse - log_norm[b])
    return out.to(coef.dtype)


def _hoeffding(
    a: Tensor, d1: Tensor, dd1: Tensor, width: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """``(easy, value)`` per item: Hoeffding's lemma gives ``0 <= K(a) - a k1 <= a^2 r^2 / 8``
    for a row of range ``r <= width``, so ``a d1 - a^2 r^2 / 16`` is within ``a^2 r^2 / 16``
    (plus ``|a| dd1`` for ``d1`` and ``4 u`` of the terms for their evaluation) of the score.
    Items where that is within ``tol`` (``|a| r`` below about ``4 sqrt(tol)``) need no moments;
    a row all of whose items are such is not read."""
    first = a * d1[:, None]
    half = (a * width) ** 2 / 16
    bound = half + a.abs() * dd1[:, None] + 4 * U64 * (first.abs() + half)
    return bound <= tol, first - half


def _third_order(
    out: Tensor,
    a: Tensor,
    d1: Tensor,
    dd1: Tensor,
    p: Tensor,
    store: "RowStore",
    sel: Tensor,
    eta: Tensor,
    k2_exact: Tensor | None,
    dk2_exact: Tensor | None,
    tol: float,
    want: Tensor | None = None,
) -> Tensor:
    """Third-order values (in place in ``out``, float64) for rows ``sel`` from stored rows;
    returns the ``[batch, extra, len(sel)]`` mask of items the bound does not certify. Pairs
    (prompt, row) not in ``want`` (``[batch, len(sel)]``) are not summed: their values are NaN
    and their items are not marked (the caller scores them another way)."""
    eta = eta[None]
    radius = store.radius_of(sel).to(p.device)
    # |a| R per prompt and row: how far each row's moments may be truncated (moments.py)
    reach = a[:, :, sel].abs().amax(1) * radius * (1 + 2.0**-20)
    # with the fused loop the third moment costs one more product in registers: take it in
    # the same pass instead of a second pass over the rows that need it (taking it only for
    # the rows that may need it saved nothing measurable on SmolLM2: the loads dominate)
    both = fused_available(p, len(sel) * p.shape[1], store.storage == torch.int16)
    k2y, dk2y, k3all, dk3all = central_moments(p, store, sel, both, reach, tol, want)
    sdy = (k2y + dk2y).clamp_min(0).sqrt()  # >= sd(y) despite rounding
    S = sdy + 2 * eta  # >= sd(u)
    if k2_exact is None or dk2_exact is None:  # k2 from the stored rows: its error enters
        k2, dk2 = k2y.clamp_min(0), 4 * eta * sdy + 12 * eta**2 + dk2y
        k2_max = S**2
    else:
        k2, dk2 = k2_exact[:, sel].clamp_min(0), dk2_exact[:, sel]
        k2_max = k2_exact[:, sel] + dk2
    r = 2 * (radius + eta)  # >= the exact row's range
    x, ax = a[:, :, sel], a[:, :, sel].abs()
    grow = torch.exp(ax * r)
    first = x * d1[:, None, sel]
    second = first - x * x * (k2 / 2)[:, None]
    shared = ax * dd1[:, None, sel] + ax**2 * dk2[:, None] / 2
    rounding = 4 * U64 * (first.abs() + x * x * k2_max[:, None] / 2)  # of the evaluation
    bound3 = ax**3 * r * k2_max[:, None] * grow / 6 + shared + rounding
    # third order only for rows with an item the second-order bound does not certify (a
    # second pass over those rows; typically 1% to 40% of a layer's rows on SmolLM2)
    need = (bound3 > tol).flatten(0, 1).any(0)
    k3 = torch.zeros_like(k2y)
    dk3y = torch.zeros_like(k2y)
    if bool(need.any()):
        if k3all is not None and dk3all is not None:
            k3n, dk3n = k3all[:, need], dk3all[:, need]
        else:
            sub = None if want is None else want[:, need]
            _, _, k3n, dk3n = central_moments(p, store, sel[need], True, reach[:, need], tol, sub)
        k3[:, need], dk3y[:, need] = k3n, dk3n  # type: ignore[assignment]
    dk3 = 6 * eta * S**2 + 12 * eta**2 * S + 8 * eta**3 + dk3y
    third = second - x**3 * (k3 / 6)[:, None]
    bound4 = ax**4 * torch.minimum(r**4 / 96, r**2 * k2_max[:, None] * grow / 24)
    bound4 = bound4 + shared + ax**3 * dk3[:, None] / 6 + rounding
    bound4 = bound4 + 4 * U64 * (ax**3 * (k3.abs() / 6)[:, None])
    out[:, :, sel] = torch.where(bound3 <= tol, second, third)
    return (bound3 > tol) & (bound4 > tol)
