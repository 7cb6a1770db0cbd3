"""The C kernel for the raw moments of int16 rows (:mod:`mechcna.engine.native`, issue 20).

References are exact: rational sums of the float64 probabilities times integer powers
(:class:`fractions.Fraction`), or float64 sums with the same rigorous bound. Every test that
expects the kernel asserts that it ran (a silent fallback could not fail the test)."""

import logging
from fractions import Fraction

import pytest
import torch

from mechcna.engine import moments, native
from mechcna.engine.rows import RowStore
from tests.test_engine_speed import _reference_moments


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state with no library loaded yet and an empty build directory."""
    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MECHCNA_COMPILE", raising=False)
    monkeypatch.delenv("MECHCNA_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    return tmp_path


def _inputs(B, V, n, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * 5, -1)
    y = torch.randint(-32768, 32768, (n, V), generator=g, dtype=torch.int32).to(torch.int16)
    y[0, : min(V, 3)] = torch.tensor([32767, -32768, 0][: min(V, 3)], dtype=torch.int16)
    return p, y


def test_kernel_is_built_here():
    """CI machines have the C compiler that torch.compile needs too: the kernel must build
    (otherwise every other test here would test the fallback only)."""
    assert native.library() is not None


@pytest.mark.parametrize("third", [False, True])
def test_moments_within_the_rounding_bound_of_exact_rational_sums(third):
    p, y = _inputs(3, 37, 5, 0)
    got = native.moments_int16(p, y, third)
    assert got is not None
    g = moments.gamma(37)
    for n in range(1, 4 if third else 3):
        m = got[n - 1]
        assert m is not None
        for b in range(3):
            pb = [Fraction(float(x)) for x in p[b]]
            for r in range(5):
                ys = [int(v) for v in y[r]]
                exact = sum(q * v**n for q, v in zip(pb, ys, strict=True))
                scale = sum(q * abs(v) ** n for q, v in zip(pb, ys, strict=True))
                assert abs(Fraction(float(m[b, r])) - exact) <= Fraction(g) * scale
    assert (got[2] is not None) == third


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 9, 64])
@pytest.mark.parametrize("V", [1, 3, 4, 5, 1029])
def test_moments_for_every_batch_and_width(B, V):
    """Batches split into blocks of four prompts and widths not a multiple of the vector
    length (the scalar tail) give the float64 sums within the bound."""
    p, y = _inputs(B, V, 7, B * 10_000 + V)
    got = native.moments_int16(p, y, True)
    assert got is not None
    yd = y.double()
    for n, m in enumerate(got, start=1):
        assert m is not None and m.shape == (B, 7)
        ref = p @ (yd**n).T
        scale = p @ (yd.abs() ** n).T
        assert bool(((m - ref).abs() <= 2 * moments.gamma(V) * scale).all())


def test_threads_split_rows_without_changing_a_value():
    p, y = _inputs(2, 4099, 101, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.moments_int16(p, y, True)
        torch.set_num_threads(2)
        two = native.moments_int16(p, y, True)
    finally:
        torch.set_num_threads(before)
    assert one is not None and two is not None
    for a, b in zip(one, two, strict=True):
        assert a is not None and b is not None
        assert torch.equal(a, b)  # each row is summed by one thread in the same order


def test_inputs_it_does_not_serve_return_none(monkeypatch):
    p, y = _inputs(2, 64, 3, 4)
    assert native.moments_int16(p.float(), y, True) is None  # not float64
    assert native.moments_int16(p, y.to(torch.int32), True) is None  # not int16
    big = torch.softmax(torch.zeros(native.MAX_BATCH + 1, 64, dtype=torch.float64), -1)
    assert native.moments_int16(big, y, True) is None
    monkeypatch.setenv("MECHCNA_NATIVE", "0")
    assert native.moments_int16(p, y, True) is None
    monkeypatch.setenv("MECHCNA_NATIVE", "1")
    monkeypatch.setenv("MECHCNA_COMPILE", "0")
    assert native.moments_int16(p, y, True) is None


def test_the_build_is_kept_and_reused(fresh, monkeypatch):
    assert native.library() is not None
    built = list((fresh / "native").glob("moments-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_state", {})

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert native.library() is not None


def test_no_compiler_or_a_failed_build_falls_back(fresh, monkeypatch, caplog):
    """Without a compiler, or with one that fails, the kernel is unavailable (one warning for
    a failed build) and the moments come from the compiled torch loop: same sums."""
    p, y = _inputs(2, 3000, 9, 5)
    ref = native.moments_int16(p, y, True)
    assert ref is not None
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.moments_int16(p, y, True) is None
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: "false")  # exits 1: a failed build
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.native"):
        assert native.moments_int16(p, y, True) is None
        assert native.moments_int16(p, y, True) is None  # remembered: no second build
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1
    got = moments.fused_moments(p, y, True)
    assert got is not None and "packed" in moments._fused  # the torch.compile loop ran
    for a, b in zip(got, ref, strict=True):
        assert a is not None and b is not None
        scale = b.abs().clamp_min(1.0)
        assert float(((a - b).abs() / scale).max()) <= 1e-9


def test_batches_up_to_64_prompts_of_int16_rows_take_the_kernel(monkeypatch):
    """Past the compiled loop's 32 prompts, int16 rows still take the kernel (other storage
    formats the chunked products); the central moments stay within their bounds."""
    monkeypatch.setattr(moments, "FUSED_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(7)
    V, n, B = 1500, 12, 40
    p = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * 3, -1)
    assert moments.fused_available(p, n * V, int16=True)
    assert not moments.fused_available(p, n * V, int16=False)
    assert not moments.fused_available(torch.ones(65, V, dtype=torch.float64), n * V, True)
    rows = torch.randn(n, V, generator=g, dtype=torch.float64) * 2 + 9
    store = RowStore(n, V, torch.int16, torch.float32)
    store.fill(torch.arange(n), rows)
    calls = []
    real = native.moments_int16
    monkeypatch.setattr(native, "moments_int16", lambda *a: calls.append(1) or real(*a))
    sel = torch.arange(n)
    k2, dk2, k3, dk3 = moments.central_moments(p, store, sel, True)
    assert calls
    exact = store.stored(sel).double() * store.step(sel)[:, None]
    ref2, ref3 = _reference_moments(p, exact)
    assert dk3 is not None and k3 is not None
    assert bool(((k2 - ref2).abs() <= dk2).all())
    assert bool(((k3 - ref3).abs() <= dk3).all())


@pytest.mark.parametrize("B", [1, 3, 6])
def test_a_subset_of_rows_read_in_place_equals_the_gathered_rows(B, monkeypatch):
    """With an index list the kernel reads the rows where they lie (no gathered copy): the
    same sums, bit for bit, as on the gathered rows, in any order and with repeats; an index
    out of range is refused (``None``), not read."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    p, y = _inputs(B, 1003, 40, 5)
    idx = torch.tensor([39, 0, 7, 7, 12, 3, 38, 21])
    got = native.moments_int16(p, y, True, idx)
    want = native.moments_int16(p, y[idx].contiguous(), True)
    assert got is not None and want is not None
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)
    assert native.moments_int16(p, y, True, torch.tensor([3, 40])) is None
    empty = native.moments_int16(p, y, False, torch.tensor([], dtype=torch.long))
    assert empty is not None and empty[0].shape == (B, 0)
