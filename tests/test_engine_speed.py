"""The engine's fast paths (issue 20, speed; issue 24, device): truncated moments over each
prompt's most probable tokens, 16-bit row formats, and tensors that follow the inputs' device.

Every check is against a slow float64 reference: moments summed over every token of the
stored rows, or the float64 literal log-softmax of :func:`tests.engine_literal.engine_literal`.
"""

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from mechcna.engine import moments
from mechcna.engine.blocks import BlockCache
from mechcna.engine.expansion import EngineStats, increase_from_rows
from mechcna.engine.rows import RowStore
from tests.engine_literal import U32, engine_literal, error_ratio, layer_rows

STORAGES = [torch.int16, torch.float16, torch.bfloat16, torch.float32]


def _reference_moments(p, y):
    """Central moments of the float64 rows ``y`` under ``p``, every token, two passes."""
    mean = p @ y.T
    c = y[None] - mean[:, :, None]  # [batch, row, vocab]
    return (p[:, None] * c**2).sum(-1), (p[:, None] * c**3).sum(-1)


def _store(storage, rows):
    dtype = torch.float64 if storage == torch.float64 else torch.float32
    store = RowStore(rows.shape[0], rows.shape[1], storage, dtype)
    store.fill(torch.arange(rows.shape[0]), rows)
    return store


@pytest.mark.parametrize("storage", [*STORAGES, torch.float64])
def test_truncated_moments_bound_the_full_moments(storage):
    """Rows whose extreme values sit on improbable tokens (the worst case for truncation):
    the truncated ``k2`` and ``k3`` are within their stated bounds of the moments over every
    token, and the truncation error is large enough that the bound is what keeps them there."""
    g = torch.Generator().manual_seed(0)
    V, n = 6000, 12
    z = torch.randn(2, V, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(z, -1)
    rows = torch.randn(n, V, generator=g, dtype=torch.float64)
    tail = p.sum(0).argsort()[:50]  # the least probable tokens carry the extremes
    rows[:, tail] = 40 * torch.sign(torch.randn(n, 50, generator=g, dtype=torch.float64))
    store = _store(storage, rows)
    sel = torch.arange(n)
    exact = store.stored(sel).double() * store.step(sel)[:, None]  # the values summed
    ref2, ref3 = _reference_moments(p, exact)
    reach = torch.logspace(-6, 0, n, dtype=torch.float64).expand(2, n)
    plan = moments.head_plan(p, reach, 1e-3, n)
    assert any(cols is not None for _, cols, _ in plan)  # truncation is exercised
    assert any(cols is None for _, cols, _ in plan)  # and the full sum for large reach
    k2, dk2, k3, dk3 = moments.central_moments(p, store, sel, True, reach, 1e-3)
    assert k3 is not None and dk3 is not None
    assert bool(((k2 - ref2).abs() <= dk2).all())
    assert bool(((k3 - ref3).abs() <= dk3).all())
    full2, fdk2, _, _ = moments.central_moments(p, store, sel, False)
    assert bool(((full2 - ref2).abs() <= fdk2).all())
    # the truncated estimate is off by far more than rounding: the bound's truncation term
    # is what certifies it
    assert float(((k2 - ref2).abs() / fdk2).max()) > 1e3


def test_head_plan_keeps_every_token_for_batches_and_small_vocabularies():
    p = torch.softmax(torch.randn(8, 5000, dtype=torch.float64), -1)
    reach = torch.full((8, 3), 1e-9, dtype=torch.float64)
    assert [c for _, c, _ in moments.head_plan(p, reach, 1e-6, 3)] == [None]
    p = torch.softmax(torch.randn(1, 500, dtype=torch.float64), -1)  # < 2 x 256 tokens
    assert [c for _, c, _ in moments.head_plan(p, reach[:1], 1e-6, 3)] == [None]


def _draw_engine_inputs(seed, V, R, B, storage, confidence, a_scale, extreme_tail):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    d = 12
    M = torch.randn(d, V, generator=g, dtype=f64)
    if extreme_tail:  # improbable tokens with extreme row values
        M[:, :40] *= 30
    W = torch.randn(R, d, generator=g, dtype=f64)
    z = torch.randn(B, V, generator=g, dtype=f64) * 2
    if extreme_tail:
        z[:, :40] -= 12
    target = torch.randint(40, V, (B,), generator=g)
    z[torch.arange(B), target] += confidence
    a = torch.randn(B, 2, R, generator=g, dtype=f64) * a_scale
    a = a * torch.logspace(-4, 0, R, dtype=f64)
    dtype = f64 if storage == torch.float64 else torch.float32
    return z.to(dtype), M.to(dtype), W.to(dtype), a.to(dtype), target


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    seed=st.integers(0, 2**31 - 1),
    storage=st.sampled_from([*STORAGES, torch.float64]),
    V=st.integers(1100, 4000),
    B=st.integers(1, 3),
    confidence=st.floats(0.0, 30.0),
    a_scale=st.floats(0.01, 3.0),
    extreme_tail=st.booleans(),
    tol=st.sampled_from([1e-3, 1e-5, None]),
    fill=st.booleans(),
    share=st.sampled_from([1 / 8, 1e3]),
)
def test_engine_with_truncated_moments_within_tolerance(
    seed, storage, V, B, confidence, a_scale, extreme_tail, tol, fill, share
):
    """:func:`increase_from_rows` with each prompt's moments truncated (the default for one
    to four prompts once the vocabulary holds 512 tokens) against the float64 literal. With
    ``share`` 1000 the plan truncates rows whose truncation error exceeds ``tol``: only the
    bound's truncation terms then send them to the exact sum."""
    z, M, W, a, target = _draw_engine_inputs(
        seed, V, 30, B, storage, confidence, a_scale, extreme_tail
    )
    rows = layer_rows(M, W, storage)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moments, "PLAN_SHARE", share)
        got = increase_from_rows(z, rows, a, target, tol=tol, fill=fill)
    ref = engine_literal(z, M, W, a, target)
    ratio = error_ratio(got, ref, z, M, W, a, tol)
    assert ratio <= 1, ratio


@pytest.mark.parametrize("storage", STORAGES)
def test_each_row_format_certifies_most_scores(storage):
    """16-bit rows (int16, float16, bfloat16) and float32 rows: within tol of the literal,
    and the certified share stays high (the bound covers each format's rounding without
    sending everything to the exact sum)."""
    z, M, W, a, target = _draw_engine_inputs(3, 3000, 40, 1, storage, 5.0, 0.05, False)
    rows = layer_rows(M, W, storage)
    stats = EngineStats()
    got = increase_from_rows(z, rows, a, target, tol=1e-5, stats=stats)
    ref = engine_literal(z, M, W, a, target)
    assert float((got.double() - ref).abs().max()) <= 1e-5 + 4 * U32 * float(ref.abs().max())
    assert stats.certified_fraction > 0.5, stats.certified_fraction
    assert rows.store.storage == storage


def test_block_cache_storage_option():
    cache = BlockCache(disk=False, storage=torch.bfloat16)
    assert cache.storage == torch.bfloat16
    with pytest.raises(Exception, match="storage must be one of"):
        BlockCache(disk=False, storage=torch.int8)


# ------------------------------------------------------------------ device discipline
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "eye", "tensor", "as_tensor",
             "linspace", "logspace", "rand", "randn", "randint"}  # fmt: skip
ENGINE_FILES = ("engine/expansion.py", "engine/moments.py")


class _Factories(TorchFunctionMode):
    """Records tensor factories called from the engine's math without ``device=``."""

    def __init__(self):
        super().__init__()
        self.bare: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and "device" not in kwargs:
            for frame in inspect.stack()[1:8]:  # the first caller outside torch itself
                path = frame.filename.replace("\\", "/")
                if "/torch/" in path:
                    continue
                if path.endswith(ENGINE_FILES):
                    self.bare.append(f"{path}:{frame.lineno} {name}")
                break
        return func(*args, **kwargs)


@pytest.mark.parametrize("fill", [True, False])
def test_engine_creates_every_tensor_on_the_inputs_device(fill):
    """No tensor of the engine's math is created on the default (CPU) device regardless of
    the inputs' device: that is what broke on CUDA (issue 24). Run on the CPU, where a
    factory without ``device=`` is otherwise invisible."""
    z, M, W, a, target = _draw_engine_inputs(1, 2000, 25, 2, torch.int16, 3.0, 1.0, True)
    rows = layer_rows(M, W, torch.int16)
    with _Factories() as mode:
        increase_from_rows(z, rows, a, target, fill=fill)
        increase_from_rows(z[:1], rows, a[:1], target[:1], fill=fill)  # truncated moments
    assert mode.bare == [], mode.bare


def test_rows_follow_the_store_device_and_exact_rows_are_compact():
    store = RowStore(6, 50, torch.int16, torch.float32, device="cpu")
    rows = torch.randn(6, 50, dtype=torch.float64)
    store.fill(torch.tensor([4, 1]), rows[[4, 1]])
    assert store.stored(torch.tensor([1, 4])).device == store.device
    store.put_exact(torch.tensor([4]), rows[[4]])
    store.put_exact(torch.tensor([1, 4]), rows[[1, 4]])  # 4 again: kept once
    assert int(store.exact_known.sum()) == 2
    torch.testing.assert_close(store.get_exact(torch.tensor([1, 4])), rows[[1, 4]])
    assert store._exact is not None and store._exact.shape[0] < 6 * 8  # no n_rows x V block
    assert math.isclose(float(store.radius_of(torch.tensor([4]))[0]),
                        float(rows[4].max() - rows[4].min()) / 2)  # fmt: skip


# ------------------------------------------------------------------ weight fingerprints
def test_checksum_sees_one_ulp_and_swaps_past_the_first_chunk():
    """The per-call weight checksum (chunked for narrow matrices) changes on a one-ulp edit
    through ``.data`` (which bypasses the version counter) and on a swap of two entries, in
    any chunk."""
    from mechcna.models.fingerprint import checksum

    W = torch.nn.Parameter(torch.randn(20000, 48))
    c0 = checksum(W)
    old = W.data[15000, 7].clone()
    W.data[15000, 7] = torch.nextafter(old, torch.tensor(float("inf")))
    assert W._version == 0 and checksum(W) != c0
    W.data[15000, 7] = old
    assert checksum(W) == c0
    W.data[[3, 19000], 5] = W.data[[19000, 3], 5].clone()
    assert checksum(W) != c0


def test_in_place_edit_through_param_data_gives_fresh_rows():
    from mechcna import neuron_importance
    from mechcna.engine.blocks import layer_rows
    from tests import reference
    from tests.helpers import PROMPTS, build

    model = build("llama", dtype=torch.float64)
    cache = BlockCache(disk=False)
    neuron_importance(model, PROMPTS[:1], cache=cache)
    before = layer_rows(model, "ffn", 1, cache).store
    W = model.blocks[1].mlp.W_out
    W.data[-1, -1] = torch.nextafter(W.data[-1, -1], torch.tensor(float("inf"), dtype=W.dtype))
    W.data[2] += 0.5  # large enough to see in the scores
    res = neuron_importance(model, PROMPTS[:1], cache=cache)
    assert layer_rows(model, "ffn", 1, cache).store is not before
    ref, _ = reference.literal_ffn_scores(model, model.to_tokens(PROMPTS[0])[0])
    torch.testing.assert_close(res.scores[0], ref, rtol=0, atol=1e-9)
