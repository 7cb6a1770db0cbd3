"""Items that need no moments (issue 20, speed): by Hoeffding's lemma
``0 <= K(a) - a k1 <= a^2 r^2 / 8`` for a row of range ``r``, so an item with a small ``|a| r``
is scored ``a d1 - a^2 r^2 / 16`` within ``tol``, and a row all of whose items are such is not
read. These tests check the scores against the float64 literal, that such rows are skipped,
and that an item's value does not depend on the other prompts of its batch."""

import pytest
import torch

from mechcna.engine import expansion
from mechcna.engine.expansion import default_tol, increase_from_rows
from tests.engine_literal import engine_literal, error_ratio, layer_rows

F64 = torch.float64


def _inputs(dtype, seed=0, V=1500, n=40, d=10):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, V, generator=g, dtype=F64)
    W = torch.randn(n, d, generator=g, dtype=F64)
    z = torch.randn(2, V, generator=g, dtype=F64) * 2
    target = torch.tensor([5, 17])
    a = torch.randn(2, 1, n, generator=g, dtype=F64)
    a[0] *= 1e-6  # the first prompt: tiny coefficients on every row
    a[1, :, : n // 2] *= 1e-6  # the second: on half the rows, large ones elsewhere
    a[1, :, n // 2 :] *= 3
    return z.to(dtype), M.to(dtype), W.to(dtype), a.to(dtype), target


@pytest.mark.parametrize("storage", [torch.int16, torch.float32, torch.float64])
def test_rows_whose_items_all_meet_the_bound_are_not_read(monkeypatch, storage):
    dtype = F64 if storage == torch.float64 else torch.float32
    z, M, W, a, target = _inputs(dtype)
    seen: list[int] = []
    real = expansion.central_moments

    def counted(p, store, sel, *args, **kwargs):
        seen.extend(sel.tolist())
        return real(p, store, sel, *args, **kwargs)

    monkeypatch.setattr(expansion, "central_moments", counted)
    got = increase_from_rows(z, layer_rows(M, W, storage), a, target)
    assert error_ratio(got, engine_literal(z, M, W, a, target), z, M, W, a, None) <= 1
    n = W.shape[0]
    assert seen  # the other rows' moments were taken
    if storage != torch.float64:  # (tol 1e-12 there: |a| r must be below about 4e-6)
        assert min(seen) >= n // 2  # the tiny rows were never read


def test_an_items_value_does_not_depend_on_its_batch():
    """The first prompt (tiny coefficients) alone and beside a prompt with large coefficients on
    half the rows, which are then read: its items get the same values, bit for bit."""
    z, M, W, a, target = _inputs(torch.float32)
    both = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target)
    one = increase_from_rows(z[:1], layer_rows(M, W, torch.int16), a[:1], target[:1])
    assert torch.equal(both[0], one[0])
    ref = engine_literal(z, M, W, a, target)
    assert error_ratio(both, ref, z, M, W, a, None) <= 1
    assert float((both[0] - ref[0]).abs().max()) <= default_tol(torch.float32) + 1e-7


@pytest.mark.parametrize("kernel", [True, False])
def test_pairs_whose_items_all_meet_the_bound_are_not_summed(monkeypatch, kernel):
    """A row read for one prompt is not summed for a prompt all of whose items on it take
    Hoeffding's route (the C kernel skips the pair; every path returns it as NaN, never used):
    the scores stay within tol of the literal and the first prompt's are what it gets alone."""
    from mechcna.engine import moments, native

    monkeypatch.setattr(moments, "FUSED_MIN_ELEMENTS", 0 if kernel else 2**62)
    z, M, W, a, target = _inputs(torch.float32)
    wanted: list[torch.Tensor] = []
    summed: list[int] = []
    real_central, real_native = expansion.central_moments, native.moments_int16

    def central(p, store, sel, third, reach=None, tol=0.0, want=None):
        assert want is not None
        wanted.append(want.clone())
        return real_central(p, store, sel, third, reach, tol, want)

    def counted(p, y, third, rows=None, want=None):
        summed.append(1)
        return real_native(p, y, third, rows, want)

    monkeypatch.setattr(expansion, "central_moments", central)
    monkeypatch.setattr(native, "moments_int16", counted)
    got = increase_from_rows(z, layer_rows(M, W, torch.int16), a, target)
    n = W.shape[0]
    assert wanted and not bool(wanted[0][0].any()) and bool(wanted[0][1].all())
    assert bool(summed) == kernel
    assert not bool(got.isnan().any())
    assert error_ratio(got, engine_literal(z, M, W, a, target), z, M, W, a, None) <= 1
    one = increase_from_rows(z[:1], layer_rows(M, W, torch.int16), a[:1], target[:1])
    assert torch.equal(got[0], one[0])
    assert len(wanted[0][0]) == n - n // 2
