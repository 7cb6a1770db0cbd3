"""The C kernel for the raw moments of int16 rows (:mod:`mechcna.engine.native`, issue 20).

References are exact: rational sums of the float64 probabilities times integer powers
(:class:`fractions.Fraction`), or float64 sums with the same rigorous bound. Every test that
expects the kernel asserts that it ran (a silent fallback could not fail the test)."""

import decimal
import logging
import math
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


def test_the_kernels_exp_is_within_its_stated_error():
    """The log-sum-exp kernel's own ``exp`` against 40-digit decimal exponentials: the
    relative error stays within :data:`native.EXP_ULPS` units of roundoff over the whole
    range it serves (reduction boundaries, tiny arguments, the clamp at -700)."""
    lib = native.library()
    assert lib is not None
    g = torch.Generator().manual_seed(11)
    ln2 = 0.6931471805599453
    points = torch.cat([
        -torch.rand(3000, generator=g, dtype=torch.float64) * 720,
        -torch.rand(3000, generator=g, dtype=torch.float64) * 2,
        -torch.rand(500, generator=g, dtype=torch.float64) * 1e-6,
        -(torch.arange(1, 400, dtype=torch.float64) + 0.5) * ln2,  # |r| at its largest
        torch.tensor([0.0, -700.0, -700.5, -1e-300, -745.0]),
    ])  # fmt: skip
    ctx = decimal.Context(prec=40)
    worst = 0.0
    for t in points.tolist():
        exact = ctx.exp(decimal.Decimal(max(t, -700.0)))
        got = decimal.Decimal(lib.exp_check(t))
        worst = max(worst, float(abs(got - exact) / exact) / 2.0**-53)
    assert worst <= native.EXP_ULPS
    assert worst > 0.1  # the comparison sees rounding at all
    # the vector exp the kernel uses gives the scalar one's values, bit for bit
    t = points.contiguous()
    out = torch.empty_like(t)
    lib.exp_check_v(t.data_ptr(), len(t), out.data_ptr())
    scalar = torch.tensor([lib.exp_check(v) for v in t.tolist()], dtype=torch.float64)
    assert torch.equal(out, scalar)


def _lse_inputs(V, n, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randint(-32767, 32768, (9, V), generator=g, dtype=torch.int32).to(torch.int16)
    F = torch.randint(-127, 128, (9, V), generator=g, dtype=torch.int32).to(torch.int8)
    z = torch.randn(3, V, generator=g, dtype=torch.float64) * 6
    x = torch.randn(n, generator=g, dtype=torch.float64) * spread * 1e-6
    b = torch.randint(0, 3, (n,), generator=g)
    r = torch.randint(0, 9, (n,), generator=g)
    return z, Y, F, x, b, r


@pytest.mark.parametrize("V", [1, 3, 7, 8, 1029])
@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_fine_logsumexp_within_its_bound_of_a_40_digit_reference(V, spread):
    """Every item against a 40-digit decimal log-sum-exp of the same exact entries, within the
    bound :func:`mechcna.engine.correction.fine_scores` charges for it (``spread`` 1e3 sends
    most terms below ``exp(-700)``); widths that are not multiples of the vector width take
    the scalar tail."""
    z, Y, F, x, b, r = _lse_inputs(V, 12, V, spread)
    got = native.fine_logsumexp(z, Y, F, 254.0, x, b, r)
    assert got is not None and got.dtype == torch.float64
    ctx = decimal.Context(prec=40)
    D = decimal.Decimal
    for i in range(len(x)):
        v = Y[r[i]].double() * 254 + F[r[i]].double()  # exact
        s = [
            D(float(zj)) + D(float(x[i])) * D(float(vj)) for zj, vj in zip(z[b[i]], v, strict=True)
        ]
        m = max(s)
        exact = m + ctx.ln(sum((ctx.exp(sj - m) for sj in s), D(0)))
        big = float(z[b[i]].abs().max()) + abs(float(x[i])) * float(v.abs().max())
        bound = moments.gamma(V) + moments.U64 * (8 * big + 8) + native.lse_error(V)
        assert abs(float(D(float(got[i])) - exact)) <= bound


def test_fine_logsumexp_threads_and_refusals(monkeypatch):
    """Items split among threads give the same values bit for bit; inputs the kernel does not
    serve (wrong dtypes, a row or prompt out of range) return ``None``, never a read."""
    z, Y, F, x, b, r = _lse_inputs(1029, 31, 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = native.fine_logsumexp(z, Y, F, 254.0, x, b, r)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    three = native.fine_logsumexp(z, Y, F, 254.0, x, b, r)
    assert one is not None and three is not None and torch.equal(one, three)
    eager = moments._fine_lse_kernel(z[0], Y, F, r[b == 0], x[b == 0], 254)
    assert float((one[b == 0] - eager).abs().max()) <= 1e-12
    assert native.fine_logsumexp(z.float(), Y, F, 254.0, x, b, r) is None
    assert native.fine_logsumexp(z, Y.int(), F, 254.0, x, b, r) is None
    assert native.fine_logsumexp(z, Y, F, 254.0, x, b, r + 9) is None
    assert native.fine_logsumexp(z, Y, F, 254.0, x, b + 3, r) is None
    for bad in (math.nan, math.inf):  # never a finite number from a NaN or infinite input
        xb, zb = x.clone(), z.clone()
        xb[0], zb[1, 5] = bad, bad
        assert native.fine_logsumexp(z, Y, F, 254.0, xb, b, r) is None
        assert native.fine_logsumexp(zb, Y, F, 254.0, x, b, r) is None
    empty = native.fine_logsumexp(z, Y, F, 254.0, x[:0], b[:0], r[:0])
    assert empty is not None and empty.shape == (0,)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pairs_left_out_are_zero_and_the_others_unchanged(monkeypatch, threads):
    """With ``want``, the marked (prompt, row) pairs get the sums they get without it, bit for
    bit (also with the rows split among threads by the pairs they sum); the others are 0; a
    mask of the wrong shape is refused."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    p, y = _inputs(6, 1003, 40, 8)
    idx = torch.tensor([39, 0, 7, 7, 12, 3, 38, 21, 5])
    g = torch.Generator().manual_seed(3)
    want = torch.rand(6, len(idx), generator=g) < 0.4
    want[:, 0] = False  # a row no prompt wants
    want[:, 1] = True
    full = native.moments_int16(p, y, True, idx)
    part = native.moments_int16(p, y, True, idx, want)
    assert full is not None and part is not None
    for a, b in zip(part, full, strict=True):
        assert a is not None and b is not None
        assert torch.equal(a[want], b[want])
        assert bool((a[~want] == 0).all())
    assert native.moments_int16(p, y, True, None, want[:, :-1]) is None  # 40 rows, 8 marks
