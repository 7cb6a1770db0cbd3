"""Regression tests for floating-point errors of the certified engine (issue 20, items 1-2).

Each test failed before the fix: on confident models (scaled-up unembedding) the variance
``E[y^2] - E[y]^2`` rounded to 0, the remainder bounds vanished and first-order values were
returned as certified (errors of tens to hundreds of nats); on the int16 path the bound missed
the rounding of ``E[y^2]``, the cancellation in ``d1`` and the float32 rounding of rows whose
centre is far from their range.
"""

import pytest
import torch

from mechcna import neuron_importance
from mechcna.engine.blocks import BlockCache
from mechcna.engine.expansion import default_tol, increase_from_rows
from tests.engine_literal import U32, U64, engine_literal, layer_rows, literal64_ffn
from tests.helpers import PROMPTS, build


def _confident(kind, dtype, scale):
    model = build(kind, dtype=dtype)
    with torch.no_grad():
        model.W_U.mul_(scale)
        model.blocks[1].mlp.W_out.mul_(3)
    return model


@pytest.mark.parametrize("scale", [100, 300])
def test_confident_float64_model_matches_literal(kind, scale):
    model = _confident(kind, torch.float64, scale)
    res = neuron_importance(model, PROMPTS, cache=BlockCache(disk=False))
    for i, prompt in enumerate(PROMPTS):
        ref, big = literal64_ffn(model, prompt)
        err = float((res.scores[i] - ref).abs().max())
        assert err <= default_tol(torch.float64) + 64 * U64 * big, (i, err, big)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("scale", [100, 300])
def test_confident_float32_model_matches_float64_literal(kind, scale, half):
    """The float32 inputs (activations, logits) carry rounding of order ``u32 * big``; the
    engine must add no more than a small multiple of it."""
    model = _confident(kind, torch.float32, scale)
    res = neuron_importance(model, PROMPTS, cache=BlockCache(disk=False, half=half))
    for i, prompt in enumerate(PROMPTS):
        ref, big = literal64_ffn(model, prompt)
        err = float((res.scores[i].double() - ref).abs().max())
        assert err <= default_tol(torch.float32) + 64 * U32 * big, (i, err, big)


# ------------------------------------------------------------------ engine-level, int16 rows
def _check_engine(z, M, W, a, target, storage):
    rows = layer_rows(M, W, storage)
    got = increase_from_rows(z, rows, a, target)
    ref = engine_literal(z, M, W, a, target)
    tol = default_tol(z.dtype)
    u = U32 if z.dtype == torch.float32 else U64
    err = (got.double() - ref).abs()
    # tol for the expansion, plus the final rounding of the returned value to the dtype
    allowed = tol + 2 * u * ref.abs() + 1e-12
    worst = float((err / allowed).max())
    assert worst <= 1, (worst, float(err.max()))
    return worst


def _setup(seed, V=300, d=16, R=64, B=2):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, V, generator=g, dtype=torch.float64)
    W = torch.randn(R, d, generator=g, dtype=torch.float64) * 0.3
    z = torch.randn(B, V, generator=g, dtype=torch.float64)
    a = torch.randn(B, 1, R, generator=g, dtype=torch.float64) * torch.logspace(-4, 0, R)
    return g, M, W, z, a


@pytest.mark.parametrize("storage", [torch.int16, torch.float32])
def test_rows_with_large_common_part(storage):
    """Rows whose centre is 1e4 times their half-range (a large vocabulary-common part of
    ``M``), and a confident base distribution on the target: ``d1`` cancels and the float32
    rows lose their low bits."""
    g, M, W, z, a = _setup(1)
    common = torch.randn(M.shape[0], 1, generator=g, dtype=torch.float64)
    M = (1e-4 * M + common).float()
    W = W.float()
    target = torch.tensor([3, 7])
    z[0, 3] += 30
    z[1, 7] += 12
    z = z.float()
    a = (a * 1e4).float()
    _check_engine(z, M, W, a, target, storage)


@pytest.mark.parametrize("storage", [torch.int16, torch.float32])
def test_confident_rows_far_from_mid_range(storage):
    """A confident base distribution whose probable tokens sit at the end of each row's
    range: the raw second moment is ~radius^2 while the variance is tiny."""
    _, M, W, z, a = _setup(2)
    M, W = M.float(), W.float()
    U = W.double() @ M.double()
    target = torch.tensor([int(U[0].argmax()), int(U[0].argmin())])
    z[0, target[0]] += 25
    z[1, target[1]] += 40
    z = z.float()
    a = (a * 50).float()
    _check_engine(z, M, W, a, target, storage)


def test_float64_confident_engine():
    _, M, W, z, a = _setup(3)
    U = W @ M
    target = torch.tensor([int(U[5].argmax()), 11])
    z[0, target[0]] += 35
    z[1, 11] += 60
    _check_engine(z, M * 30, W, a * 10, target, torch.float64)
