"""Range bounds kept per weights for the streaming engine (mechcna/engine/widths.py)."""

import numpy as np
import pytest
import torch

import mechcna.engine.blocks as blocks
from mechcna import neuron_importance
from mechcna.engine.blocks import BlockCache, LayerRows, Projector
from mechcna.engine.expansion import increase_from_rows
from mechcna.engine.rows import RowStore
from mechcna.engine.widths import load_widths, row_widths, widths_path
from tests.helpers import PROMPTS, build


def _exact_range(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The range of each row of ``W @ M64`` (the engine's exact rows), in float64."""
    M64 = Projector(M, "k").exact()[0]
    U = W.to(torch.float64) @ M64
    return U.amax(1) - U.amin(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_row_widths_bound_the_exact_range_tightly(dtype, offset):
    """An upper bound on every exact row's range (also with a large vocabulary-common part of
    the projector, rows of very different scales and a zero row), and within a hair of it."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(24, 5000, generator=g, dtype=torch.float64) + offset
    W = torch.randn(70, 24, generator=g, dtype=torch.float64)
    W = W * torch.logspace(-6, 3, 70, dtype=torch.float64)[:, None]
    W[5] = 0
    M, W = M.to(dtype), W.to(dtype)
    got = row_widths(W, M)
    want = _exact_range(W, M)
    assert got.dtype == torch.float64 and got.shape == (70,)
    assert bool((got >= want).all())
    assert float(got[5]) == 0.0
    slack = 1e-3 if dtype == torch.float32 and offset else 1e-4
    assert bool((got <= want * (1 + slack) + 1e-300).all())


def test_a_product_rounded_on_purpose_would_be_caught():
    """The bound's rounding term is what keeps it above the exact range: without it, rows
    computed in float32 fall below the float64 range for some rows."""
    g = torch.Generator().manual_seed(1)
    M = torch.randn(64, 4000, generator=g) + 50.0
    W = torch.randn(200, 64, generator=g)
    U = W @ M
    spread = U.amax(1).double() - U.amin(1).double()
    assert bool((spread < _exact_range(W, M)).any())  # the float32 spread alone is not a bound
    assert bool((row_widths(W, M) >= _exact_range(W, M)).all())


def test_widths_are_kept_on_disk_and_a_damaged_file_is_recomputed(tmp_path, monkeypatch, caplog):
    model = build("llama")
    monkeypatch.setenv("MECHCNA_DISK_CACHE_BYTES", "1")  # rows do not fit: streaming
    cache = BlockCache(budget=0, disk=tmp_path)
    want = neuron_importance(model, PROMPTS[:1], cache=cache).scores
    files = sorted(tmp_path.glob("*.widths.npz"))
    assert len(files) == model.cfg.n_layers  # one per streamed layer
    key = files[0].name.removesuffix(".widths.npz")
    stored = load_widths(tmp_path, key, model.cfg.d_mlp)
    assert stored is not None and bool((stored > 0).all())

    # a new session reads them: nothing is recomputed
    def boom(*a, **k):
        raise AssertionError("recomputed")

    with monkeypatch.context() as mp:
        mp.setattr(blocks, "row_widths", boom)
        again = neuron_importance(model, PROMPTS[:1], cache=BlockCache(budget=0, disk=tmp_path))
    torch.testing.assert_close(again.scores, want, atol=0, rtol=0)

    # damaged: one bound shrunk (the digest no longer matches) -> ignored and rewritten
    with np.load(files[0]) as f:
        widths, digest = f["widths"].copy(), f["digest"].copy()
    widths[3] *= 0.5
    np.savez(files[0], widths=widths, digest=digest)
    assert load_widths(tmp_path, key, model.cfg.d_mlp) is None
    files[1].write_bytes(b"not a file of bounds")
    assert load_widths(tmp_path, files[1].name.removesuffix(".widths.npz"), 1) is None
    with caplog.at_level("WARNING"):
        fixed = neuron_importance(model, PROMPTS[:1], cache=BlockCache(budget=0, disk=tmp_path))
    assert "do not match" in caplog.text and "unreadable" in caplog.text
    torch.testing.assert_close(fixed.scores, want, atol=0, rtol=0)
    restored = load_widths(tmp_path, key, model.cfg.d_mlp)
    assert restored is not None and torch.equal(restored, stored)
    assert widths_path(tmp_path, key).exists()


def test_streaming_with_widths_certifies_more_and_stays_exact(monkeypatch):
    """The kept range bounds are what certify: with them the streaming engine forms fewer
    rows than with the ellipsoid bound alone, and both stay within tol of the literal."""
    g = torch.Generator().manual_seed(3)
    d, V, n = 64, 3000, 80
    M = torch.randn(d, V, generator=g, dtype=torch.float64)
    M[:, :40] *= 6  # a few far tokens: the ellipsoid bound is loose for most rows
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = torch.randn(2, V, generator=g, dtype=torch.float64) * 2
    a = torch.randn(2, 1, n, generator=g, dtype=torch.float64)
    a = a * torch.logspace(-6, -2, n, dtype=torch.float64)
    target = torch.tensor([4, 900])
    U = W @ (M - M.mean(1, keepdim=True))
    lp = [z[b].log_softmax(-1)[target[b]] for b in range(2)]
    shifted = [(z[b] + a[b, 0, :, None] * U).log_softmax(-1)[:, target[b]] for b in range(2)]
    want = torch.stack([shifted[b] - lp[b] for b in range(2)])[:, None]
    import mechcna.engine.expansion as expansion

    real, formed = expansion._exact_rows64, []

    def counting(rows, idx, chunk=256):
        formed.append(len(idx))
        return real(rows, idx, chunk)

    monkeypatch.setattr(expansion, "_exact_rows64", counting)
    counts = {}
    for name, widths in (("kept", None), ("ellipsoid", torch.full((n,), float("inf")))):
        cache = BlockCache(disk=False)
        if widths is not None:
            monkeypatch.setattr(cache, "widths", lambda rows, w=widths: w)
        rows = LayerRows(W, RowStore(n, V, torch.float64, torch.float64),
                         Projector(M, "k"), cache, "key")  # fmt: skip
        formed.clear()
        got = increase_from_rows(z, rows, a, target, tol=1e-9, fill=False)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
        counts[name] = sum(formed)
    assert 0 < counts["kept"] < counts["ellipsoid"], counts


@pytest.mark.parametrize("d", [7, 12])
def test_streaming_covariance_matches_the_literal_variance(d, monkeypatch):
    """``k2 = w C w`` from the blocked, lower-triangle covariance equals each row's variance
    under ``p`` (formed from the row itself) within the returned rounding bound, with blocks
    that do not divide the vocabulary and an odd ``d_model``."""
    import mechcna.engine.expansion as expansion

    monkeypatch.setattr(expansion, "COVARIANCE_ELEMENTS", 5 * d)
    g = torch.Generator().manual_seed(d)
    V = 203
    M = torch.randn(d, V, generator=g, dtype=torch.float64) + 3.0
    M = M - M.mean(1, keepdim=True)
    W = torch.randn(9, d, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(2, V, generator=g, dtype=torch.float64) * 3, -1)
    k2, err = expansion._covariance_k2(p, M, M.abs().amax(1), W)
    U = W @ M
    want = (p[:, None] * U[None] ** 2).sum(-1) - (p @ U.T) ** 2
    assert bool(((k2 - want).abs() <= err + 1e-15).all())
    torch.testing.assert_close(k2, want, atol=1e-12, rtol=1e-12)
