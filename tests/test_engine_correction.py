"""The exact path from a stored row plus a few exact entries (:mod:`mechcna.engine.correction`,
issue 20 speed): every item it accepts is within its budget of the float64 log-sum-exp on the
exact row, items whose tilted distribution is too flat are left to the dense row, and the
engine's scores through it stay within tol of the float64 literal."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechcna.engine.correction import corrected_logsumexp, row_eta
from mechcna.engine.expansion import EngineStats, increase_from_rows
from mechcna.engine.rows import RowStore
from tests.engine_literal import engine_literal, error_ratio, layer_rows
from tests.test_engine_speed import _draw_engine_inputs

F64 = torch.float64


def _case(seed: int, V: int = 3000, n: int = 20, d: int = 12):
    """Two prompts (one confident, one flat), ``n`` int16-stored rows, items of both."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, V, generator=g, dtype=F64)
    W = torch.randn(n, d, generator=g, dtype=F64) * 0.3
    z = torch.randn(2, V, generator=g, dtype=F64)
    target = torch.tensor([7, 11])
    z[0, :8] += torch.linspace(14, 6, 8, dtype=F64)  # prompt 0: mass on a few tokens
    U = W @ M
    store = RowStore(n, V, torch.int16, torch.float32)
    store.fill(torch.arange(n), U)
    rows = layer_rows(M, W, torch.int16)
    rows.store = store
    b = torch.arange(2).repeat_interleave(n)
    r = torch.arange(n).repeat(2)
    x = torch.randn(2 * n, generator=g, dtype=F64) * 2
    x[n:] = torch.linspace(0.1, 0.5, n, dtype=F64) / (2 * store.radius)  # mild tilts
    return M, W, z, target, U, store, rows, b, r, x


def _corrected(M, W, z, target, store, rows, b, r, x, budget, tokens):
    idx = torch.arange(store.n_rows)
    eta = row_eta(rows, store, W, idx)
    p = torch.softmax(z, -1)
    return corrected_logsumexp(
        z, p, store.stored(idx), idx, store.step(idx), store.radius_of(idx), W, M,
        store.centre.clone(), eta, x, b, r, target, budget, tokens=tokens,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tokens", [2, 16, 256])
def test_accepted_items_are_within_their_budget(seed, tokens):
    """Against ``logsumexp(z + x u)`` in float64 on the exact centred row: every accepted
    item within the budget, the target's entry exact; the flat prompt's items are refused and
    most of the confident prompt's accepted with 256 tokens (so both branches are exercised)."""
    M, W, z, target, U, store, rows, b, r, x = _case(seed)
    budget = 5e-7
    lse, own, ok = _corrected(M, W, z, target, store, rows, b, r, x, budget, tokens)
    u = U - store.centre[:, None]
    ref = torch.logsumexp(z[b] + x[:, None] * u[r], -1)
    err = (lse - ref).abs()
    assert bool(ok.any()) or tokens < 16, "no item took the sparse path"
    assert float(torch.cat([err[ok], err.new_zeros(1)]).max()) <= budget
    n = store.n_rows
    # the flat prompt keeps over 80% of its mass beyond any 256 tokens: items whose tilt is
    # mild and whose |x| eta is not tiny cannot be summed on a few tokens
    eta = row_eta(rows, store, W, torch.arange(n))
    mild = x[n:].abs() * 2 * store.radius[r[n:]] <= 1  # q within e^1 of p: still flat
    big = mild & (x[n:].abs() * eta[r[n:]] * 0.3 > budget)
    assert bool(big.any()) and not bool(ok[n:][big].any())
    assert int(ok[:n].sum()) >= n // 2 or tokens < 256
    assert torch.allclose(own[ok], u[r, target[b]][ok], rtol=0, atol=1e-12)


def test_the_tail_term_is_what_keeps_it_correct():
    """Summing the correction on a single token and ignoring the tail (a budget made huge)
    gives errors far above the budget on the confident prompt: the tail term is needed."""
    M, W, z, target, U, store, rows, b, r, x = _case(0)
    x = x * 20
    lse, _, ok = _corrected(M, W, z, target, store, rows, b, r, x, 1e9, 1)
    u = U - store.centre[:, None]
    ref = torch.logsumexp(z[b] + x[:, None] * u[r], -1)
    assert float((lse - ref)[ok].abs().max()) > 5e-7
    _, _, strict = _corrected(M, W, z, target, store, rows, b, r, x, 5e-7, 1)
    assert int(strict.sum()) < int(ok.sum())


def test_a_row_that_differs_from_its_stored_copy_by_more_than_eta_is_refused():
    """The exact entries are checked against the stored ones: a claimed ``eta`` too small
    (a stored row that is not the row) sends every item to the dense path."""
    M, W, z, target, _, store, rows, b, r, x = _case(1)
    idx = torch.arange(store.n_rows)
    eta = row_eta(rows, store, W, idx) * 1e-3
    p = torch.softmax(z, -1)
    _, _, ok = corrected_logsumexp(
        z, p, store.stored(idx), idx, store.step(idx), store.radius_of(idx), W, M,
        store.centre.clone(), eta, x, b, r, target, 5e-7,
    )  # fmt: skip
    assert not bool(ok.any())


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(1100, 4000),
    B=st.integers(1, 3),
    confidence=st.floats(0.0, 30.0),
    a_scale=st.floats(0.3, 6.0),
    extreme_tail=st.booleans(),
    fill=st.booleans(),
)
def test_engine_through_the_sparse_path_within_tolerance(
    seed, V, B, confidence, a_scale, extreme_tail, fill
):
    """:func:`increase_from_rows` on int16 rows (the default storage) with coefficients large
    enough that the expansion leaves items to the exact path, against the float64 literal."""
    z, M, W, a, target = _draw_engine_inputs(
        seed, V, 30, B, torch.int16, confidence, a_scale, extreme_tail
    )
    stats = EngineStats()
    got = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target, fill=fill, stats=stats)
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(got, ref, z, M, W, a, None) <= 1
    assert stats.sparse <= stats.exact


def test_the_engine_takes_the_sparse_path_on_a_confident_model():
    """A confident model with large coefficients: most exact-path items are scored sparsely,
    and the scores equal the literal within tol (fails if the path is never taken)."""
    z, M, W, a, target = _draw_engine_inputs(3, 3000, 30, 2, torch.int16, 25.0, 6.0, False)
    stats = EngineStats()
    got = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target, stats=stats)
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(got, ref, z, M, W, a, None) <= 1
    assert stats.exact > 0 and stats.sparse > stats.exact // 2


@pytest.mark.parametrize("sparse", [True, False])
def test_deferred_and_sparse_rows_through_the_analyses_match_the_literal(monkeypatch, sparse):
    """``neuron_importance`` and ``attention_neuron_importance`` on a confident tiny model
    (unembedding scaled up: many exact-path items), int16 rows: the items scored from a few
    exact entries and those whose exact rows are formed for all layers in one product
    (:func:`settle_deferred`) equal the literal method. Without the sparse path every such item
    is deferred (counted, so the test fails if nothing is)."""
    from mechcna import attention_neuron_importance, neuron_importance
    from mechcna.analyses import attribution
    from mechcna.engine import correction
    from mechcna.engine.blocks import BlockCache
    from tests import reference
    from tests.helpers import PROMPTS, build

    model = build("llama", dtype=torch.float32)
    with torch.no_grad():
        model.unembed.W_U.mul_(40)
    if not sparse:
        monkeypatch.setattr(correction, "SPARSE_COLUMNS_SHARE", -1.0)
    seen = {"items": 0}
    real = attribution.settle_deferred

    def counted(pending, *args, **kwargs):
        out = real(pending, *args, **kwargs)
        seen["items"] += sum(len(items) for _, items, _ in out)
        return out

    monkeypatch.setattr(attribution, "settle_deferred", counted)
    cache = BlockCache(disk=False)
    ffn = neuron_importance(model, PROMPTS, cache=cache)
    att = attention_neuron_importance(model, PROMPTS, cache=cache)
    assert cache.half and ffn.stats is not None and ffn.stats.exact > 0
    for i, prompt in enumerate(PROMPTS):
        tokens = model.to_tokens(prompt)[0]
        ref, _ = reference.literal_ffn_scores(model, tokens)
        torch.testing.assert_close(ffn.scores[i].to(ref), ref, atol=1e-4, rtol=0)
        ref, _ = reference.literal_attention_scores(model, tokens)
        got = att.scores[i, :, : len(tokens)].to(ref)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    if not sparse:
        assert seen["items"] > 0


def test_the_compiled_tilted_sum_gives_what_the_eager_one_gives(monkeypatch):
    """The compiled log-sum-exp and float32 ranking (:func:`_tilted`, taken for every size
    here) against the eager kernel; then the accepted items within budget through it."""
    from mechcna.engine import correction, moments

    monkeypatch.setattr(moments, "FUSED_MIN_LSE", 0)
    monkeypatch.delenv("MECHCNA_COMPILE", raising=False)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2000, generator=g, dtype=F64) * 3
    y = torch.randint(-32767, 32768, (7, 2000), generator=g).to(torch.int16)
    scale = torch.randn(7, generator=g, dtype=F64) * 1e-4
    ly, s32 = correction._tilted(z, y, scale)
    assert "tilted" in moments._fused and not moments._fused.get("broken")
    ly0, s0 = correction._tilted_kernel(z, y.to(torch.float32), scale)
    assert float((ly - ly0).abs().max()) <= 1e-12 * float(ly0.abs().max())
    assert torch.equal(s32, s0)
    M, W, z2, target, U, store, rows, b, r, x = _case(2)
    lse, _, ok = _corrected(M, W, z2, target, store, rows, b, r, x, 5e-7, 256)
    ref = torch.logsumexp(z2[b] + x[:, None] * (U - store.centre[:, None])[r], -1)
    assert bool(ok.any()) and float((lse - ref)[ok].abs().max()) <= 5e-7


@pytest.mark.parametrize("chunk", [1, 3, 256])
@pytest.mark.parametrize("fill", [True, False])
def test_deferred_rows_of_several_layers_settle_in_chunks_to_the_direct_scores(
    monkeypatch, chunk, fill
):
    """Two layers sharing a projector defer their exact-path items (sparse path off); settled
    ``chunk`` rows at a time across the layers' boundary they equal the scores computed
    without deferring. A streaming call's scratch store is not kept by a deferred record."""
    from mechcna.engine import correction, expansion
    from mechcna.engine.correction import settle_deferred

    monkeypatch.setattr(correction, "SPARSE_COLUMNS_SHARE", -1.0)
    monkeypatch.setattr(expansion, "FRESH_BYTES", 0)  # streaming keeps no float64 rows
    z, M, W, a, target = _draw_engine_inputs(7, 2500, 30, 2, torch.int16, 20.0, 4.0, False)
    pending: list = []
    got = []
    first = layer_rows(M, W, torch.int16)
    for tag, Wl in enumerate((W, W.flip(0) * 1.3)):
        rows = layer_rows(M, Wl, torch.int16)
        rows.projector = first.projector  # one projector for both layers, as in a model
        mine = increase_from_rows(z, rows, a, target, fill=fill, defer=pending, tag=tag)
        direct = increase_from_rows(z, layer_rows(M, Wl, torch.int16), a, target, fill=fill)
        got.append((mine, direct))
    assert sum(len(p.items) for p in pending) > 0 and len(pending) == 2
    assert all(p.store is None for p in pending) or fill
    for tag, items, val in settle_deferred(pending, chunk=chunk):
        b, e, r = items.unbind(1)
        got[tag][0][b, e, r] = val.to(got[tag][0].dtype)
    for mine, direct in got:
        assert float((mine.double() - direct.double()).abs().max()) <= 1e-6


def test_scores_do_not_depend_on_what_earlier_calls_left_in_the_cache():
    """A confident tiny model (many exact-path items, some sparse, some deferred): a prompt's
    scores are bit-identical on a fresh cache and after other prompts filled and kept rows;
    CNA of the model against an identical copy is exactly 0 (an item's route, and so its
    rounding, never depends on rows kept by earlier calls)."""
    import copy

    from mechcna import compare_neurons, neuron_importance
    from mechcna.engine.blocks import BlockCache
    from tests.helpers import PROMPTS, build

    model = build("llama", dtype=torch.float32)
    with torch.no_grad():
        model.unembed.W_U.mul_(40)
    fresh = neuron_importance(model, PROMPTS[2], cache=BlockCache(disk=False))
    used = BlockCache(disk=False)
    neuron_importance(model, PROMPTS, cache=used)
    neuron_importance(model, PROMPTS[:2], cache=used)
    again = neuron_importance(model, PROMPTS[2], cache=used)
    assert again.stats is not None and again.stats.exact > 0
    assert torch.equal(fresh.scores, again.scores)
    twin = copy.deepcopy(model)  # its own default cache, empty
    neuron_importance(model, PROMPTS)  # fills and keeps rows in the model's default cache
    assert float(compare_neurons(model, PROMPTS, twin).delta.abs().max()) == 0.0


@pytest.mark.parametrize("defer", [False, True])
def test_an_items_route_does_not_depend_on_rows_kept_exactly(defer):
    """The same layer scored twice, the second time after every row was kept exactly (as
    earlier calls on other prompts leave them): bit-identical scores. Items taken by the sparse
    path keep it, deferred items settle with the kept values (were the route to change with
    the cache, the scores would differ by rounding and a model compared with an identical copy
    holding another cache would not give 0)."""
    from mechcna.engine.correction import settle_deferred

    z, M, W, a, target = _draw_engine_inputs(3, 3000, 30, 2, torch.int16, 25.0, 6.0, False)
    rows = layer_rows(M, W, torch.int16)

    def run():
        pending: list | None = [] if defer else None
        stats = EngineStats()
        out = increase_from_rows(z, rows, a, target, defer=pending, tag=0, stats=stats)
        for _, items, val in settle_deferred(pending or []):
            b, e, r = items.unbind(1)
            out[b, e, r] = val.to(out.dtype)
        return out, stats

    first, stats = run()
    assert stats.sparse > 0
    everyone = torch.arange(W.shape[0])
    rows.store.put_exact(everyone, W.double() @ rows.projector.exact()[0])
    assert bool(rows.store.exact_known.all())
    again, _ = run()
    assert torch.equal(first, again)


def test_a_chunk_with_some_rows_kept_forms_only_the_others(monkeypatch):
    """Deferred items whose chunk mixes rows the store keeps exactly with new ones: the new
    rows are formed (and kept), the kept ones read, and every score equals the direct
    one."""
    from mechcna.engine import correction
    from mechcna.engine.correction import settle_deferred

    monkeypatch.setattr(correction, "SPARSE_COLUMNS_SHARE", -1.0)
    z, M, W, a, target = _draw_engine_inputs(7, 2500, 30, 2, torch.int16, 20.0, 4.0, False)
    rows = layer_rows(M, W, torch.int16)
    M64 = rows.projector.exact()[0]
    pending: list = []
    mine = increase_from_rows(z, rows, a, target, fill=True, defer=pending, tag=0)
    direct = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target, fill=True)
    assert len(pending) == 1 and len(pending[0].rows) >= 2
    half = pending[0].rows[::2]
    rows.store.put_exact(half, W[half].double() @ M64)
    shapes = []
    real = torch.Tensor.__matmul__

    def spy(x, y):
        if y is M64:
            shapes.append(x.shape[0])
        return real(x, y)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    out = settle_deferred(pending, chunk=256)
    monkeypatch.undo()
    assert shapes == [len(pending[0].rows) - len(half)]  # the kept rows were not formed
    for _, items, val in out:
        b, e, r = items.unbind(1)
        mine[b, e, r] = val.to(mine.dtype)
    assert float((mine.double() - direct.double()).abs().max()) <= 1e-6
    assert bool(rows.store.exact_known[pending[0].rows].all())
