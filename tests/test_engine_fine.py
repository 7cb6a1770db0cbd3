"""The residual word of int16 rows (issue 20, speed): a file-backed store keeps, beside each
16-bit row, one byte per entry ``f = round(FINE (U / step - y))``, so the exact path can take
the log-sum-exp of a row known to ``eta / FINE`` instead of forming the float64 row. These
tests check the stored residual against the exact row, the path's scores against the float64
literal, that it is taken, and that a damaged or missing residual file is never trusted."""

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechcna.engine.correction import fine_scores, row_eta
from mechcna.engine.expansion import EngineStats, increase_from_rows
from mechcna.engine.rows import FINE, RowStore
from tests.engine_literal import engine_literal, error_ratio, layer_rows
from tests.test_engine_speed import _draw_engine_inputs

F64 = torch.float64


def _rows(n=12, V=700, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, V, generator=g, dtype=F64) * torch.logspace(-3, 2, n, dtype=F64)[:, None]
        + offset
    )


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_the_residual_refines_each_row_within_eta_fine(tmp_path, offset):
    """``|fine_levels * step / FINE - centred row| <= eta_fine`` for every entry, filled in
    one run and scattered; the refinement is at least 100x finer than the int16 rows alone;
    a new session reads the same residuals."""
    U = _rows(offset=offset)
    n = U.shape[0]
    store = RowStore(n, U.shape[1], torch.int16, torch.float32, tmp_path / "k")
    store.fill(torch.arange(0, n // 2), U[: n // 2])
    store.fill(torch.tensor([n - 1, n // 2 + 1, n // 2]), U[[n - 1, n // 2 + 1, n // 2]])
    store.fill(torch.arange(n // 2 + 2, n - 1), U[n // 2 + 2 : n - 1])
    idx = torch.arange(n)
    centred = U - store.centre[:, None]
    for s in (store, RowStore(n, U.shape[1], torch.int16, torch.float32, tmp_path / "k")):
        assert bool(s.fine_usable(idx).all())
        fine = s.fine_levels(idx).double() * (s.step(idx) / FINE)[:, None]
        err = (fine - centred).abs().amax(1)
        assert bool((err <= s.eta_fine(idx)).all())
        coarse = (s.get(idx).double() - centred).abs().amax(1)
        assert bool((err * 100 <= coarse).all())


def test_a_store_in_memory_or_of_another_storage_has_no_residual(tmp_path):
    U = _rows()
    for store in (
        RowStore(12, 700, torch.int16, torch.float32),
        RowStore(12, 700, torch.float32, torch.float32, tmp_path / "f32"),
    ):
        store.fill(torch.arange(12), U)
        assert not store.has_fine and not bool(store.fine_usable(torch.arange(12)).any())
    assert not (tmp_path / "f32.fine").exists()


def _case(tmp_path, seed=0, V=2500, n=16, d=10):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, V, generator=g, dtype=F64)
    W = torch.randn(n, d, generator=g, dtype=F64) * 0.3
    z = torch.randn(2, V, generator=g, dtype=F64) * 2
    z[0, :6] += torch.linspace(12, 5, 6, dtype=F64)
    rows = layer_rows(M, W, torch.int16, tmp_path / "k")
    rows.store.fill(torch.arange(n), W @ M)
    b = torch.arange(2).repeat_interleave(n)
    r = torch.arange(n).repeat(2)
    x = torch.randn(2 * n, generator=g, dtype=F64) * 3 / rows.store.radius[r]
    x[-3:] *= 1e7  # |x| eta beyond any budget: refused
    return M, W, z, rows, b, r, x, torch.tensor([3, 9])


def test_fine_scores_are_within_their_budget_and_refuse_what_they_cannot_certify(tmp_path):
    M, W, z, rows, b, r, x, target = _case(tmp_path)
    store, idx = rows.store, torch.arange(rows.store.n_rows)
    eta = row_eta(rows, store, W, idx, fine=True)
    log_norm = torch.logsumexp(z, -1)
    budget = 5e-7
    got, ok = fine_scores(z, log_norm, store, idx, eta, W, M, x, b, r, target, budget)
    u = W @ M - store.centre[:, None]
    lp = torch.log_softmax(z[b] + x[:, None] * u[r], -1).gather(1, target[b][:, None])[:, 0]
    ref = lp - torch.log_softmax(z, -1)[b, target[b]]
    assert int(ok.sum()) == len(x) - 3 and not bool(ok[-3:].any())
    assert float((got - ref)[ok].abs().max()) <= budget
    # the int16 rows alone would be off by far more than the budget on these items
    coarse = x.abs() * store.eta(idx)[r]
    assert float(coarse[ok].max()) > 10 * budget


_SLOW = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=_SLOW)
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(1100, 4000),
    B=st.integers(1, 3),
    confidence=st.floats(0.0, 30.0),
    a_scale=st.floats(0.3, 6.0),
    extreme_tail=st.booleans(),
)
def test_engine_through_the_refined_rows_within_tolerance(
    tmp_path_factory, seed, V, B, confidence, a_scale, extreme_tail
):
    """:func:`increase_from_rows` on a file-backed int16 store (the default on the CPU) with
    coefficients large enough to leave items to the exact path, against the float64 literal;
    items the refined rows score are counted within the sparse ones."""
    z, M, W, a, target = _draw_engine_inputs(
        seed, V, 30, B, torch.int16, confidence, a_scale, extreme_tail
    )
    stats = EngineStats()
    rows = layer_rows(M, W, torch.int16, tmp_path_factory.mktemp("rows") / "k")
    got = increase_from_rows(z, rows, a, target, stats=stats)
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(got, ref, z, M, W, a, None) <= 1
    assert stats.fine <= stats.sparse <= stats.exact
    rows.store.release()


def test_the_engine_takes_the_refined_rows_on_a_confident_model(tmp_path):
    """Most exact-path items of a confident model with large coefficients are scored from the
    refined rows when the store keeps them (and none in memory), within tol of the literal."""
    z, M, W, a, target = _draw_engine_inputs(3, 3000, 30, 2, torch.int16, 25.0, 1.0, False)
    ref = engine_literal(z, M, W, a, target)
    for path in (tmp_path / "k", None):
        stats = EngineStats()
        got = increase_from_rows(z, layer_rows(M, W, torch.int16, path), a, target, stats=stats)
        assert error_ratio(got, ref, z, M, W, a, None) <= 1
        if path is None:
            assert stats.fine == 0
        else:
            assert stats.exact > 0 and stats.fine > stats.exact // 2


def test_a_damaged_residual_is_not_used(tmp_path, caplog):
    """A residual row changed after it was written fails its checksum: it is reported and
    dropped, and the engine's scores still match the literal (through the other paths)."""
    z, M, W, a, target = _draw_engine_inputs(3, 3000, 30, 2, torch.int16, 25.0, 6.0, False)
    rows = layer_rows(M, W, torch.int16, tmp_path / "k")
    rows.store.fill(torch.arange(30), W.double() @ M.double())
    rows.store.release()
    data = np.memmap(tmp_path / "k.fine", dtype=np.int8, mode="r+", shape=(30, 3000))
    data[:] = 0
    data.flush()
    del data
    rows = layer_rows(M, W, torch.int16, tmp_path / "k")
    assert bool(rows.store.known.all())
    stats = EngineStats()
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.rows"):
        got = increase_from_rows(z, rows, a, target, stats=stats)
    assert any("residual rows" in r.message for r in caplog.records)
    assert stats.exact > 0 and stats.fine == 0
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(got, ref, z, M, W, a, None) <= 1


def test_a_residual_file_of_the_wrong_size_discards_the_store(tmp_path, caplog):
    U = _rows()
    store = RowStore(12, 700, torch.int16, torch.float32, tmp_path / "k")
    store.fill(torch.arange(12), U)
    store.release()
    with open(tmp_path / "k.fine", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.rows"):
        again = RowStore(12, 700, torch.int16, torch.float32, tmp_path / "k")
    assert any("damaged row cache" in r.message for r in caplog.records)
    assert not bool(again.known.any()) and (tmp_path / "k.fine").stat().st_size == 12 * 700


def test_metadata_written_before_the_residual_file_marks_no_residual(tmp_path):
    """A cache filled by an earlier version (no residual file, no residual metadata) is read
    as it was: its rows are known, their residuals are not (the engine takes the other exact
    paths), and rows filled now get theirs."""
    U = _rows()
    store = RowStore(12, 700, torch.int16, torch.float32, tmp_path / "k")
    store.fill(torch.arange(6), U[:6])
    store.release()
    meta = tmp_path / "k.meta.npz"
    with np.load(meta) as z:
        old = {k: z[k] for k in z.files if not k.startswith("fine")}
    np.savez(meta, **old)
    (tmp_path / "k.fine").unlink()
    again = RowStore(12, 700, torch.int16, torch.float32, tmp_path / "k")
    assert bool(again.known[:6].all()) and not bool(again.fine_usable(torch.arange(6)).any())
    again.fill(torch.arange(6, 12), U[6:])
    assert bool(again.fine_usable(torch.arange(6, 12)).all())


def test_zeroed_residual_files_through_the_analysis(tmp_path, caplog):
    """``neuron_importance`` on a confident tiny model with a disk cache whose residual files
    were zeroed after a first session: the damage is reported and the scores equal those of a
    cache in memory (within tol)."""
    from mechcna import neuron_importance
    from mechcna.engine.blocks import BlockCache
    from tests.helpers import PROMPTS, build

    model = build("llama", dtype=torch.float32)
    with torch.no_grad():
        model.unembed.W_U.mul_(40)
    want = neuron_importance(model, PROMPTS, cache=BlockCache(disk=False)).scores
    first = BlockCache(disk=tmp_path)
    res = neuron_importance(model, PROMPTS, cache=first)
    assert res.stats is not None and res.stats.fine > 0
    torch.testing.assert_close(res.scores, want, atol=2e-6, rtol=0)
    first.clear()
    for f in tmp_path.glob("*.fine"):
        f.write_bytes(bytes(f.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.rows"):
        got = neuron_importance(model, PROMPTS, cache=BlockCache(disk=tmp_path))
    assert any("residual rows" in r.message for r in caplog.records)
    assert got.stats is not None and got.stats.fine == 0
    torch.testing.assert_close(got.scores, want, atol=2e-6, rtol=0)


def test_the_compiled_refined_log_sum_exp_gives_what_the_eager_one_gives(monkeypatch):
    """The compiled loop that reads int16 rows and their residuals in place (taken for every
    size here) and the C kernel against the eager chunks, on repeated and unordered rows."""
    from mechcna.engine import moments, native

    g = torch.Generator().manual_seed(6)
    V = 2000
    z = torch.randn(2, V, generator=g, dtype=F64) * 3
    Y = torch.randint(-32767, 32768, (9, V), generator=g).to(torch.int16)
    F = torch.randint(-127, 128, (9, V), generator=g).to(torch.int8)
    b = torch.tensor([0, 1, 1, 0, 1])
    r = torch.tensor([8, 0, 8, 3, 5])
    x = torch.randn(5, generator=g, dtype=F64) * 1e-7
    monkeypatch.setenv("MECHCNA_NATIVE", "0")  # the torch loops (the C kernel: below)
    eager = moments.fine_logsumexp(z, Y, F, FINE, x, b, r)
    monkeypatch.setattr(moments, "FUSED_MIN_LSE", 0)
    monkeypatch.setattr(moments, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.delenv("MECHCNA_COMPILE", raising=False)
    got = moments.fine_logsumexp(z, Y, F, FINE, x, b, r)
    assert "fine" in moments._fused and not moments._fused.get("broken")
    ref = torch.logsumexp(z[b] + x[:, None] * (Y[r].double() * FINE + F[r].double()), -1)
    assert float((got - ref).abs().max()) <= 1e-12 and float((eager - ref).abs().max()) <= 1e-12
    monkeypatch.delenv("MECHCNA_NATIVE")
    calls = []
    real = native.fine_logsumexp
    monkeypatch.setattr(native, "fine_logsumexp", lambda *a: calls.append(1) or real(*a))
    kernel = moments.fine_logsumexp(z, Y, F, FINE, x, b, r)
    assert calls and float((kernel - ref).abs().max()) <= 1e-12
