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
