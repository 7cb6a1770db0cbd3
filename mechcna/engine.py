"""The fused, certified evaluator of log-probability increases (METHODS.md sections 4 and 10).

For a base residual with frozen-scale logits ``z`` (one row per prompt) and a neuron whose
projected direction is the row ``u`` of a :class:`~mechcna.projection.DirectionBlock`, adding
the neuron's contribution with coefficient ``a = c / s`` changes the target's log-probability by

    ``Imp = a * u_w - K(a)``,   ``K(a) = log sum_j p_j exp(a * u_j)``,   ``p = softmax(z)``.

``K`` is the cumulant generating function of ``u`` under the base distribution ``p``. The exact
value costs one exponential per (neuron, vocabulary token) pair; that is the floor of any
brute-force exact method. This module goes below it without giving up exactness:

1. **Third-order expansion.** ``K(a) = a k1 + a^2 k2 / 2 + a^3 k3 / 6 + R``, where the
   cumulants ``k1..k3`` come from the raw moments ``p @ u``, ``p @ u^2``, ``p @ u^3``: three
   matrix products shared by all neurons of a layer and all prompts of a batch.
2. **A rigorous remainder bound.** Every tilted distribution of ``u`` is supported in an
   interval of width ``r = max(u) - min(u)``, so its fourth cumulant lies in
   ``[-r^4/8, r^4/4]`` and ``|R| <= (|a| r)^4 / 96``. Rows are stored centred on their
   midrange (``|u_j| <= r/2``) so the moments are well conditioned.
3. **Exact fallback.** Every (prompt, neuron) whose bound exceeds ``tol`` is recomputed with
   the full log-sum-exp, in fused chunks that never hold a whole layer's ``neurons x vocab``
   block of logits.

So every returned score is within ``tol`` of the exact value (plus floating-point rounding).
``method="exact"`` skips the expansion and evaluates everything exactly (still chunked).

Example:
    >>> imp = logprob_increase(z, block, a, target)        # doctest: +SKIP
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mechcna._types import Float, Int, Tensor
from mechcna.projection import DirectionBlock

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
    tol = default_tol(dtype) if tol is None else tol
    U = block.U
    log_norm = torch.logsumexp(base_logits, -1)
    u_target = U[:, target].T  # [batch, row]
    if method == "exact":
        out = torch.zeros_like(coef)
        todo = coef != 0
    else:
        probs = torch.exp(base_logits - log_norm[:, None])
        k1, k2, k3 = cumulants(probs, U, chunk)
        a = coef
        out = a * (u_target - k1)[:, None] - a * a * (k2 / 2)[:, None] - a**3 * (k3 / 6)[:, None]
        bound = (a.abs() * (2 * block.radius)) ** 4 / 96
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
