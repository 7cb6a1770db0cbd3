import torch

from mechcna.engine.expansion import EngineStats, logprob_increase
from mechcna.engine.projection import DirectionBlock


def _block(U):
    hi, lo = U.max(-1).values, U.min(-1).values
    c = (hi + lo) / 2
    return DirectionBlock(U - c[:, None], c, (hi - lo) / 2)


def _exact(z, U, a, w):
    out = torch.empty_like(a)
    for b in range(a.shape[0]):
        for e in range(a.shape[1]):
            for r in range(a.shape[2]):
                logits = z[b] + a[b, e, r] * U[r]
                out[b, e, r] = logits.log_softmax(-1)[w[b]] - z[b].log_softmax(-1)[w[b]]
    return out


def test_certified_error_within_bound_and_exact_fallback():
    g = torch.Generator().manual_seed(0)
    B, R, V = 3, 40, 200
    z = torch.randn(B, V, generator=g, dtype=torch.float64) * 2
    U = torch.randn(R, V, generator=g, dtype=torch.float64) + 0.5
    a = torch.randn(B, 2, R, generator=g, dtype=torch.float64) * torch.logspace(
        -3, 0, R, dtype=torch.float64
    )
    w = torch.tensor([1, 7, 42])
    exact = _exact(z, U, a, w)
    for tol in (1e-3, 1e-6, 1e-9):
        stats = EngineStats()
        got = logprob_increase(z, _block(U), a, w, tol=tol, stats=stats)
        assert 0 < stats.exact < stats.scored  # both paths are exercised
        err = (got - exact).abs().max()
        assert err <= tol + 1e-12, (tol, float(err))
    exact_path = logprob_increase(z, _block(U), a, w, method="exact")
    torch.testing.assert_close(exact_path, exact, atol=1e-12, rtol=0)


def test_zero_coefficient_scores_zero():
    z = torch.randn(2, 50, dtype=torch.float64)
    U = torch.randn(5, 50, dtype=torch.float64)
    a = torch.zeros(2, 1, 5, dtype=torch.float64)
    for method in ("certified", "exact"):
        out = logprob_increase(z, _block(U), a, torch.tensor([0, 1]), method=method)
        assert torch.all(out == 0)
