"""The exact path's log-sum-exp from a stored row plus a few exact entries (issue 20, speed).

When the expansion cannot certify a (prompt, neuron) pair, the engine needs
``L = logsumexp(z + x u)`` on the neuron's exact float64 row ``u`` (centred,
``u = w M - centre``). Computing ``u`` is a ``d_model x d_vocab`` float64 product per row
(for SmolLM2 about 40 ms for a layer's thirty such rows, most of a warm call's exact path).
But the row is already stored as ``y`` with ``|y_j - u_j| <= eta`` (:func:`row_eta` of
:mod:`mechcna.engine.expansion`), and the tilted distribution ``q ~ exp(z + x y)`` of a deep
layer's uncertified neuron sits on a handful of tokens. With ``d = u - y``:

    ``L = L_y + log A``,   ``L_y = logsumexp(z + x y)``,   ``A = sum_j q_j exp(x d_j)``.

On a set ``S`` (the ``K`` most probable tokens under ``q``) ``d`` is computed exactly (one
``|S|``-column product), and off ``S`` only ``|d_j| <= eta`` is used:

    ``A~ = 1 + sum_{j in S} q_j expm1(x d_j)``,   ``|A - A~| <= T expm1(|x| eta) =: e``,

``T = 1 - sum_{j in S} q_j`` the tail mass (computed, plus a bound on its rounding), so
``|log A - log A~| <= e / (A~ - e)``. An item whose bound is within ``budget`` gets
``L_y + log A~``; the others are left to the dense exact row (the caller's fallback). The
target's entry ``u_w`` is always computed exactly. So the speed depends on how concentrated
the tilted distributions are (on SmolLM2 the deep layers' uncertified items need five tokens
at the median, the first layers' nearly the whole vocabulary: those take the dense row), the
correctness never does.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechcna._types import Bool, Float, Int, Tensor
from mechcna.engine import moments, native
from mechcna.engine.moments import U64, gamma, shifted_logsumexp
from mechcna.engine.rows import FINE, RowStore

if TYPE_CHECKING:
    from mechcna.engine.blocks import LayerRows

#: tokens of each item's tilted distribution whose entries are computed exactly
SPARSE_TOKENS = 256

#: the most distinct vocabulary columns one chunk may need before the chunk is left to the
#: dense rows (a product that wide costs about what the rows cost)
SPARSE_COLUMNS_SHARE = 0.25


def _tilted_kernel(z: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(logsumexp(z + scale_i y_i), that sum's terms in float32)`` for each row ``y_i`` of
    stored values (exact in float32 and float64) and one prompt's base logits ``z``."""
    s = z[None] + scale[:, None] * y.to(torch.float64)
    return torch.logsumexp(s, -1), s.to(torch.float32)


def _tilted(z: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_tilted_kernel`, compiled on the CPU (one pass over float32 copies of the rows,
    nothing in float64 stored) where :func:`mechcna.engine.moments.fused_available`."""
    y = y.to(torch.float32) if y.dtype != torch.float32 else y
    if y.numel() >= moments.FUSED_MIN_LSE and moments.fused_available(z[None], 2**62):
        if "tilted" not in moments._fused:
            moments._fused["tilted"] = torch.compile(_tilted_kernel, dynamic=True)
        try:
            return moments._fused["tilted"](z, y, scale)
        except Exception as err:  # as in moments.fused_moments
            moments._fused["broken"] = True
            moments._log.warning("fused tilted log-sum-exp unavailable (%s); using eager", err)
    return _tilted_kernel(z, y, scale)


def corrected_logsumexp(
    z: Float[Tensor, "batch d_vocab"],
    p: Float[Tensor, "batch d_vocab"],
    levels: Tensor,
    where: Int[Tensor, " n"],
    step: Float[Tensor, " n"],
    radius: Float[Tensor, " n"],
    W: Float[Tensor, "n d_model"],
    M: Float[Tensor, "d_model d_vocab"],
    centre: Float[Tensor, " n"],
    eta: Float[Tensor, " n"],
    x: Float[Tensor, " k"],
    b: Int[Tensor, " k"],
    r: Int[Tensor, " k"],
    target: Int[Tensor, " batch"],
    budget: float,
    tokens: int = SPARSE_TOKENS,
    chunk: int = 128,
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"], Tensor]:
    """``(lse, own, ok)`` per item ``i``: ``lse ~ logsumexp(z[b_i] + x_i u_{r_i})`` within
    ``budget`` where ``ok``, ``own = u_{r_i}[target[b_i]]`` exactly, ``u = W M - centre``
    (float64), the stored rows ``Y = levels[where] * step`` (``|Y| <= radius``) with
    ``|Y - u| <= eta`` entrywise (``levels`` a store's whole tensor: rows are gathered a chunk
    at a time) and
    ``p = softmax(z)``.

    An item is tried only when it can succeed: ``q_j >= p_j exp(-|x| range(Y))``, so the
    tail of ``q`` beyond any ``K`` tokens is at least ``exp(-|x| range)`` times ``p``'s tail
    beyond its own top ``K``."""
    V = z.shape[1]
    K = max(1, min(tokens, V // 4))
    k = len(x)
    lse = z.new_zeros(k)
    own = z.new_zeros(k)
    ok = torch.zeros(k, dtype=torch.bool, device=z.device)
    p_tail = (1 - p.topk(K, -1).values.sum(-1)).clamp_min(0)
    y_max = radius * (1 + 2.0**-20)  # also for rows stored in float32
    e_all = eta[r]
    lost = torch.expm1(x.abs() * e_all) * torch.exp(-x.abs() * e_all)
    hopeless = p_tail[b] * torch.exp(-2 * x.abs() * (y_max[r] + e_all)) * lost > 2 * budget
    z_abs = z.abs().amax(-1)
    groups = [
        part
        for prompt in b[~hopeless].unique().tolist()
        for part in ((b == prompt) & ~hopeless).nonzero().flatten().split(chunk)
    ]
    for items in groups:
        bc, rc, xc = b[items], r[items], x[items]
        tc = target[bc]
        zp, scale = z[bc[0]], xc * step[rc]
        # the log-sum-exp over every token in float64, and the tokens ranked in float32 (any
        # set of tokens is valid below: the ranking only decides how few are needed)
        lv = levels[where[rc]]
        ly, s32 = _tilted(zp, lv, scale)
        S = s32.topk(K, -1).indices
        top = zp[S] + scale[:, None] * lv.gather(1, S).to(torch.float64)
        q = torch.exp(top - ly[:, None])
        # rounding of q (each relative u (|s - ly| + 2), ly's own within gamma(V)) and its sum
        s_abs = z_abs[bc] + xc.abs() * y_max[rc]
        err = gamma(V) + U64 * (4 * s_abs + K + 8)
        e = eta[rc]
        grow = torch.expm1(xc.abs() * e)
        # tail beyond each item's first k tokens; A >= exp(-|x| eta), so an item can meet the
        # budget with k tokens only where this holds (non-increasing in k): take the fewest
        spills = ((1 - q.cumsum(-1)).clamp_min(0) + 2 * err[:, None]) * grow[:, None]
        enough = spills * (1 + budget) <= (budget * torch.exp(-xc.abs() * e))[:, None]
        keep = enough.any(-1).nonzero().flatten()
        if len(keep) == 0:
            continue
        first = enough[keep].to(torch.int8).argmax(-1)
        items, bc, rc, xc, tc = items[keep], bc[keep], rc[keep], xc[keep], tc[keep]
        ly, S, e = ly[keep], S[keep], e[keep]
        spill = spills[keep].gather(1, first[:, None]).squeeze(1)
        used = torch.arange(K, device=z.device)[None, :] <= first[:, None]
        q = q[keep] * used
        S = torch.where(used, S, tc[:, None])  # unused slots point at the target (weight 0)
        cols = torch.unique(torch.cat([S.flatten(), tc]))
        if len(cols) > SPARSE_COLUMNS_SHARE * V:
            continue
        E = W[rc] @ M[:, cols] - centre[rc][:, None]  # exact entries, [chunk, cols]
        Ys = lv[keep].gather(1, S).to(torch.float64) * step[rc][:, None]
        d = E.gather(1, torch.searchsorted(cols, S)) - Ys
        A = 1 + (q * torch.expm1(xc[:, None] * d)).sum(-1)
        low = A - spill
        bound = spill / low.clamp_min(torch.finfo(torch.float64).tiny) + 4 * (K + 2) * U64
        good = (low > 0) & (bound <= budget) & (d.abs() <= e[:, None] * (1 + 1e-9)).all(-1)
        lse[items] = ly + torch.log(A.clamp_min(torch.finfo(torch.float64).tiny))
        own[items] = E.gather(1, torch.searchsorted(cols, tc)[:, None]).squeeze(1)
        ok[items] = good
    return lse, own, ok


def fine_scores(
    z: Float[Tensor, "batch d_vocab"],
    log_norm: Float[Tensor, " batch"],
    store: RowStore,
    rows: Int[Tensor, " n"],
    eta: Float[Tensor, " n"],
    W: Float[Tensor, "n d_model"],
    M: Float[Tensor, "d_model d_vocab"],
    x: Float[Tensor, " k"],
    b: Int[Tensor, " k"],
    r: Int[Tensor, " k"],
    target: Int[Tensor, " batch"],
    budget: float,
) -> tuple[Float[Tensor, " k"], Bool[Tensor, " k"]]:
    """``(score, ok)`` per item ``i`` from the store's rows refined by their residual word
    (:meth:`mechcna.engine.rows.RowStore.fine_levels`): ``score = x_i u_w - (L - log_norm)``
    with ``L = logsumexp(z[b_i] + x_i Y)``, ``Y = fine_levels * step / FINE`` the refined row of
    store row ``rows[r_i]``, within ``budget`` of the exact score where ``ok``.

    ``|Y_j - u_j| <= eta`` (the residual's rounding plus the float64 computation of the row,
    ``eta`` per row) moves ``L`` by at most ``|x| eta``, and the float64 product that forms
    ``u_w`` errs by at most the part of ``eta`` beyond the residual's rounding; the float64
    evaluation adds at most
    ``gamma(V) + u (8 (max|z| + |x| R) + 8)`` (the scaled products, the sums with ``z`` and the
    log-sum-exp), plus :func:`mechcna.engine.native.lse_error` for the C kernel's own ``exp``
    and ``log`` (charged on every path: a few units of roundoff). The target's entry
    ``u_w = w . M_w - centre`` is formed from ``w``, not from the stored row."""
    V = z.shape[1]
    step = store.step(rows).to(z.device)
    R = store.radius_of(rows).to(z.device) * (1 + 2.0**-20)
    ax = x.abs()
    # the row's entries in L (eta), and the target's entry u_w, formed by the same float64
    # product as the row (the part of eta beyond the residual's rounding covers it)
    comp = (eta - store.eta_fine(rows).to(eta)).clamp_min(0)
    err = ax * (eta[r] + comp[r]) + gamma(V) + U64 * (8 * (z.abs().amax(-1)[b] + ax * R[r]) + 8)
    err = err + native.lse_error(V)  # the C kernel's own exp and log (charged on every path)
    ok = err <= budget
    score = z.new_zeros(len(x))
    if not bool(ok.any()):
        return score, ok
    sel = ok.nonzero().flatten()
    bs, xs, rs = b[sel], x[sel], r[sel]
    Y, F = store.stored(slice(None)), store.fine_all()  # read in place, rows rows[rs]
    lse = moments.fine_logsumexp(z, Y, F, FINE, xs * (step[rs] / FINE), bs, rows[rs])
    own = (W[rs] * M[:, target[bs]].T).sum(-1) - store.centre[rows[rs].cpu()].to(z.device)
    score[sel] = xs * own - (lse - log_norm[bs])
    return score, ok


def row_eta(
    rows: "LayerRows", store: RowStore, W64: Tensor, sel: Int[Tensor, " n"], fine: bool = False
) -> Tensor:
    """Per-entry bound on ``|stored row - exact centred row|`` for rows of ``store``: the
    storage rounding (:meth:`RowStore.eta`, or with ``fine`` :meth:`RowStore.eta_fine` of the
    rows refined by their residual word) plus the float64 rounding of ``w . M64_j``
    (``<= gamma_d |w| max_j |M64_j|``) and of the centring."""
    _, _, col_norm = rows.projector.exact()
    d = W64.shape[1]
    sel = sel.to(W64.device)
    norms = store.w_norms  # the store is keyed by the weights: its vectors' norms are fixed
    if norms is None or len(norms) != len(W64) or norms.device != W64.device:
        norms = store.w_norms = W64.norm(dim=1)
    norms = norms[sel]
    comp = gamma(d) * norms * col_norm + 4 * U64 * store.radius_of(sel)
    return (store.eta_fine(sel) if fine else store.eta(sel)).to(torch.float64) + comp


def sparse_items(
    out: Tensor, idx: Tensor, a: Tensor, z: Tensor, log_norm: Tensor, p: Tensor, tgt: Tensor,
    rows: "LayerRows", store: RowStore, W: Tensor, fresh: dict[int, Tensor], tol: float,
    stats: Any,  # an EngineStats or None
) -> Tensor:  # fmt: skip
    """Scores the exact path's items whose rows are stored rounded (and not fresh) from the
    stored row plus the exact entries on a few tokens (:mod:`mechcna.engine.correction`,
    within ``tol / 2``) into ``out``; returns the items left to the dense exact rows."""
    host = idx[:, 2].cpu()
    # not conditioned on rows kept exactly: an item's route (so its rounding) must not depend
    # on what earlier calls left in the cache (comparing a model with itself gives 0)
    cand = store.known[host].clone()
    if fresh:
        mine = [int(r) not in fresh for r in host.tolist()]
        cand &= torch.tensor(mine, dtype=torch.bool, device=host.device)
    if not bool(cand.any()):
        return idx
    items = idx[cand.to(idx.device)]
    uniq, inverse = torch.unique(items[:, 2], return_inverse=True)
    M = rows.projector.exact()[0]
    b, e, r = items.unbind(1)
    x = a[b, e, r]
    # first the rows refined by their residual word (file-backed int16 stores), then the
    # stored row plus a few exact entries
    done = store.fine_usable(uniq)[inverse.cpu()].to(x.device)
    if bool(done.any()):
        f = done.nonzero().flatten()
        eta = row_eta(rows, store, W, uniq, fine=True)
        val, ok = fine_scores(z, log_norm, store, uniq, eta, W[uniq.to(W.device)], M, x[f],
                              b[f], inverse[f], tgt, tol / 2)  # fmt: skip
        f, val = f[ok], val[ok]
        out[b[f], e[f], r[f]] = val
        if stats is not None:
            stats.fine += len(f)
        done = torch.zeros_like(done)
        done[f] = True
    rest = (~done).nonzero().flatten()
    if len(rest):
        uniq, inverse = torch.unique(r[rest], return_inverse=True)
        eta = row_eta(rows, store, W, uniq)
        br, xr = b[rest], x[rest]
        lse, own, ok = corrected_logsumexp(
            z, p, store.stored(slice(None)), uniq.to(z.device), store.step(uniq).to(z.device),
            store.radius_of(uniq).to(z.device), W[uniq.to(W.device)], M,
            store.centre[uniq.cpu()].to(z.device), eta, xr, br, inverse, tgt, tol / 2,
        )  # fmt: skip
        g = ok.nonzero().flatten()
        out[br[g], e[rest[g]], r[rest[g]]] = xr[g] * own[g] - (lse[g] - log_norm[br[g]])
        done[rest[g]] = True
    if stats is not None:
        stats.sparse += int(done.sum())
    left = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    left[cand.nonzero().flatten().to(idx.device)[done.to(idx.device)]] = False
    return idx[left]


@dataclass
class Deferred:
    """Exact-path items of one layer whose exact rows are left for one product over all layers
    (:func:`settle_deferred`): every layer's rows project through the same ``M``, so a call's
    few dense rows per layer (the first layers' flat distributions) then read ``M`` once
    instead of once per layer."""

    tag: Any  # the caller's key (e.g. the layer and its prompts)
    items: Int[Tensor, "k 3"]  # (prompt, extra, row) in the layer's coefficients
    x: Float[Tensor, " k"]
    zi: Int[Tensor, " k"]  # item -> row of z
    inverse: Int[Tensor, " k"]  # item -> row of W
    W: Float[Tensor, "n d_model"]  # float64 vectors of the rows needed
    rows: Int[Tensor, " n"]  # their indices in the store (for put_exact)
    store: Any  # the layer's RowStore to keep the rows in (None: do not keep them)
    M: Float[Tensor, "d_model d_vocab"]  # the float64 projector
    z: Float[Tensor, "m d_vocab"]
    log_norm: Float[Tensor, " m"]
    target: Int[Tensor, " m"]


def defer_items(
    defer: list[Deferred], tag: Any, idx: Tensor, a: Tensor, z: Tensor, log_norm: Tensor,
    tgt: Tensor, rows: Any, store: Any, W: Tensor, M: Tensor,
    fresh: dict[int, Tensor],
) -> Tensor:  # fmt: skip
    """Moves the items ``idx`` (``[k, 3]``: prompt, extra, row) whose exact rows are not in
    ``fresh`` to ``defer`` (also those whose rows ``store`` keeps: settling them with the rows
    of the same chunks, whatever earlier calls kept, makes their rounding independent of the
    cache's history) as one :class:`Deferred` (``a`` the
    coefficients, ``z``, ``log_norm`` and ``tgt`` per prompt, ``W`` and ``M`` float64);
    returns the others. ``rows`` is the layer's :class:`~mechcna.engine.blocks.LayerRows`."""
    host = idx[:, 2].cpu()
    need = torch.ones(len(host), dtype=torch.bool, device=host.device)
    if fresh:
        need &= torch.tensor([int(r) not in fresh for r in host.tolist()], dtype=torch.bool,
                             device=host.device)  # fmt: skip
    if not bool(need.any()):
        return idx
    items = idx[need.to(idx.device)]
    uniq, inverse = torch.unique(items[:, 2], return_inverse=True)
    prompts, zi = torch.unique(items[:, 0], return_inverse=True)
    b, e, r = items.unbind(1)
    keep = store if store is rows.store else None  # not a streaming call's scratch store
    defer.append(Deferred(tag, items, a[b, e, r], zi, inverse, W[uniq.to(W.device)], uniq,
                          keep, M, z[prompts], log_norm[prompts], tgt[prompts]))  # fmt: skip
    return idx[~need.to(idx.device)]


def _kept(p: Deferred) -> Tensor:
    """Which of a record's rows its store keeps exactly (none without a store)."""
    if p.store is None:
        return torch.zeros(len(p.rows), dtype=torch.bool)
    return p.store.exact_known[p.rows.cpu()]


#: float64 entries of the exact rows :func:`settle_deferred` forms at a time (128 MB: 64 rows
#: of Gemma 3's 262,144-token vocabulary, at most 256 rows)
SETTLE_ELEMENTS = 2**24


def settle_deferred(
    pending: list[Deferred], chunk: int | None = None
) -> list[tuple[Any, Tensor, Tensor]]:
    """``[(tag, items, scores)]``: the exact scores of every deferred item. The rows of all
    layers sharing a projector are formed ``chunk`` at a time in float64 products (so memory
    holds at most ``chunk`` rows; by default as many as :data:`SETTLE_ELEMENTS` allows), each
    layer's items scored from the rows of its chunk, and the rows kept in their layer's store
    (not in a streaming call's scratch store)."""
    out = []
    for M in {id(p.M): p.M for p in pending}.values():
        if chunk is None:
            chunk = max(1, min(256, SETTLE_ELEMENTS // M.shape[1]))
        group = [p for p in pending if p.M is M]
        starts = torch.tensor([0] + [len(p.W) for p in group]).cumsum(0).tolist()
        W = torch.cat([p.W for p in group])
        scores = [torch.empty_like(p.x) for p in group]
        kept = torch.cat([_kept(p) for p in group])
        for i in range(0, len(W), chunk):
            # rows i .. i + chunk of every layer's rows in turn; rows a store keeps are read,
            # only the others are formed
            part = W[i : i + chunk]
            new = (~kept[i : i + chunk]).nonzero().flatten()
            U = None
            if len(new) == len(part):
                U = part @ M
            elif len(new):
                U = M.new_empty(len(part), M.shape[1])
                U[new.to(U.device)] = part[new.to(W.device)] @ M
            for j, p in enumerate(group):
                lo, hi = max(starts[j], i) - starts[j], min(starts[j + 1], i + chunk) - starts[j]
                if lo >= hi:
                    continue
                k = kept[starts[j] + lo : starts[j] + hi]
                if U is None:
                    rows = M.new_empty(hi - lo, M.shape[1])
                else:
                    rows = U[starts[j] + lo - i : starts[j] + hi - i]
                if bool(k.any()):  # the kept values, not this product's (equal up to rounding)
                    rows[k.to(rows.device)] = p.store.get_exact(p.rows[lo:hi][k]).to(rows)
                if p.store is not None and not bool(k.all()):
                    p.store.put_exact(p.rows[lo:hi][~k], rows[(~k).to(rows.device)])
                mine = ((p.inverse >= lo) & (p.inverse < hi)).nonzero().flatten()
                if len(mine):
                    zi, r = p.zi[mine], p.inverse[mine] - lo
                    lse = shifted_logsumexp(p.z, rows, p.x[mine], zi, r)
                    own = rows[r, p.target[zi]]
                    scores[j][mine] = p.x[mine] * own - (lse - p.log_norm[zi])
        out += [(p.tag, p.items, scores[j]) for j, p in enumerate(group)]
    return out
