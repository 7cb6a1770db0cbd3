"""The engine's fused reductions (issue 20, speed): the raw moments of stored rows and the exact
path's shifted log-sum-exp as compiled loops (``torch.compile``), int16 rows read as int32
pairs.

The fixture ``fused`` lowers the size thresholds so that these small inputs take the compiled
path, and every test asserts that it did (a test that silently ran the eager chunks could not
fail). References are float64 sums over every token.
"""

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechcna.engine import moments
from mechcna.engine.expansion import default_tol, increase_from_rows
from mechcna.engine.rows import RowStore
from tests.engine_literal import U32, engine_literal, error_ratio, layer_rows
from tests.test_engine_speed import _draw_engine_inputs, _reference_moments

STORAGES = [torch.int16, torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def fused(monkeypatch):
    """The compiled path for every size; counts the compiled calls."""
    monkeypatch.setattr(moments, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(moments, "FUSED_MIN_LSE", 0)
    monkeypatch.delenv("MECHCNA_COMPILE", raising=False)
    assert not moments._fused.get("broken"), "an earlier test broke the compiled path"
    calls = {"moments": 0}
    real = moments.fused_moments

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["moments"] += out is not None
        return out

    monkeypatch.setattr(moments, "fused_moments", counted)
    yield calls
    assert not moments._fused.get("broken"), "the compiled path failed and fell back"


def _store(storage, rows):
    dtype = torch.float64 if storage == torch.float64 else torch.float32
    store = RowStore(rows.shape[0], rows.shape[1], storage, dtype)
    store.fill(torch.arange(rows.shape[0]), rows)
    return store


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("V", [3000, 3001])  # odd widths cannot be read as int32 pairs
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("third", [False, True])
def test_fused_raw_moments_equal_float64_sums(fused, storage, V, B, third):
    g = torch.Generator().manual_seed(V + B)
    p = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * 4, -1)
    rows = torch.randn(17, V, generator=g, dtype=torch.float64) * 3
    store = _store(storage, rows)
    y = store.stored(slice(None))
    got = moments.fused_moments(p, y, third)
    assert got is not None
    yd = y.double()
    for n, m in enumerate(got[: 3 if third else 2], start=1):
        ref = p @ (yd**n).T
        scale = p @ (yd.abs() ** n).T
        # any order of summation: within gamma(V) of the sum of magnitudes
        assert float(((m - ref).abs() / scale).max()) <= moments.gamma(V)
    assert got[2] is None or third


@pytest.mark.parametrize("storage", STORAGES)
def test_fused_central_moments_within_their_bounds(fused, storage):
    """``k2`` and ``k3`` of a layer read by the compiled loop (whole, and a subset of rows)
    are within their stated error bounds of two-pass float64 moments, as the eager ones are."""
    g = torch.Generator().manual_seed(1)
    V, n = 2048, 24
    p = torch.softmax(torch.randn(2, V, generator=g, dtype=torch.float64) * 6, -1)
    rows = torch.randn(n, V, generator=g, dtype=torch.float64) + 50  # a large common offset
    store = _store(storage, rows)
    for sel in (torch.arange(n), torch.tensor([3, 7, 8, 20])):
        exact = store.stored(sel).double() * store.step(sel)[:, None]
        ref2, ref3 = _reference_moments(p, exact)
        before = fused["moments"]
        k2, dk2, k3, dk3 = moments.central_moments(p, store, sel, True)
        assert fused["moments"] == before + 1
        assert bool(((k2 - ref2).abs() <= dk2).all())
        assert bool(((k3 - ref3).abs() <= dk3).all())


def test_fused_shifted_logsumexp_equals_float64(fused):
    g = torch.Generator().manual_seed(2)
    V = 5000
    z = torch.randn(3, V, generator=g, dtype=torch.float64) * 5
    U = torch.randn(40, V, generator=g, dtype=torch.float64)
    b = torch.tensor([0, 2, 2, 1, 0, 2])
    r = torch.tensor([5, 0, 39, 7, 5, 12])
    x = torch.tensor([0.3, -2.0, 1e-3, 4.0, -0.5, 0.0], dtype=torch.float64)
    got = moments.shifted_logsumexp(z, U, x, b, r)
    ref = torch.stack([torch.logsumexp(z[i] + s * U[j], -1) for i, j, s in zip(b, r, x)])
    assert float((got - ref).abs().max()) <= 1e-12
    assert "lse" in moments._fused  # the compiled loop ran


_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
@given(
    seed=st.integers(0, 2**31 - 1),
    storage=st.sampled_from(STORAGES),
    V=st.integers(1100, 4000),
    B=st.integers(1, 4),
    confidence=st.floats(0.0, 30.0),
    a_scale=st.floats(0.01, 3.0),
    extreme_tail=st.booleans(),
    tol=st.sampled_from([1e-3, 1e-5, None]),
)
def test_engine_with_fused_reductions_within_tolerance(
    fused, seed, storage, V, B, confidence, a_scale, extreme_tail, tol
):
    """:func:`increase_from_rows` with every reduction compiled, against the float64 literal
    (the property suite's drawn confident and unconfident models)."""
    z, M, W, a, target = _draw_engine_inputs(
        seed, V, 30, B, storage, confidence, a_scale, extreme_tail
    )
    rows = layer_rows(M, W, storage)
    before = fused["moments"]
    got = increase_from_rows(z, rows, a, target, tol=tol)
    assert fused["moments"] > before
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(got, ref, z, M, W, a, tol) <= 1


def test_fused_equals_eager_on_a_layer(fused, monkeypatch):
    """The same layer scored with the compiled loops and with ``MECHCNA_COMPILE=0``: equal
    to rounding (both are within tol of the exact value; here they also agree closely)."""
    z, M, W, a, target = _draw_engine_inputs(5, 3000, 30, 2, torch.int16, 8.0, 1.0, True)
    got = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target, tol=1e-6)
    assert fused["moments"] > 0
    monkeypatch.setenv("MECHCNA_COMPILE", "0")
    eager = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target, tol=1e-6)
    assert float((got.double() - eager.double()).abs().max()) <= 2e-6


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    """Without a working compiler the engine logs one warning and runs the eager chunks; the
    scores stay within tol of the exact ones (the eager run may truncate differently)."""
    z, M, W, a, target = _draw_engine_inputs(6, 2000, 20, 1, torch.int16, 3.0, 0.5, False)
    monkeypatch.setenv("MECHCNA_COMPILE", "0")
    eager = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target)
    monkeypatch.delenv("MECHCNA_COMPILE")
    monkeypatch.setattr(moments, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(moments, "FUSED_MIN_LSE", 0)
    monkeypatch.setattr(moments, "_fused", {})

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(moments.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.moments"):
        got = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target)
    assert moments._fused.get("broken") is True
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    ref = engine_literal(z, M, W, a, target)
    tol = default_tol(z.dtype)
    for scores in (got, eager):
        assert float((scores.double() - ref).abs().max()) <= tol + 4 * U32 * float(ref.abs().max())
