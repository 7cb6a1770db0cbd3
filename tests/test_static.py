"""Block cache: content keys (issue 13 item 2), budget, eviction, half precision, disk cache.

Wall time about 15 s on 2 cores.
"""

import copy
import threading

import pytest
import torch

from mechcna.analyses.attribution import attention_neuron_importance, neuron_importance
from mechcna.engine.blocks import (
    BlockCache,
    LayerRows,
    default_budget,
    ffn_block,
    layer_rows,
    make_projector,
)
from mechcna.engine.expansion import EngineStats, increase_from_rows
from mechcna.engine.projection import linear_part
from mechcna.engine.rows import RowStore, parse_bytes, prune
from mechcna.errors import MechcnaError
from mechcna.models.architecture import Architecture
from mechcna.models.fingerprint import tensor_hash
from tests import reference
from tests.helpers import PROMPTS, build

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _literal(model, prompt):
    return reference.literal_ffn_scores(model, model.to_tokens(prompt)[0])[0]


def _check(model, cache, prompt=PROMPTS[0]):
    res = neuron_importance(model, [prompt], cache=cache)
    ref = _literal(model, prompt)
    tol = TOL[model.cfg.dtype]
    torch.testing.assert_close(res.scores[0].to(ref), ref, atol=tol, rtol=0)


# ---------------------------------------------------------------------------- content keys
def test_parameter_replacement_is_never_stale(tmp_path):
    model = build("llama", dtype=torch.float64)
    cache = BlockCache(disk=tmp_path)
    for trial in range(6):  # a replaced Parameter may reuse the old one's address
        _check(model, cache)
        old = model.blocks[0].mlp.W_out
        model.blocks[0].mlp.W_out = torch.nn.Parameter(torch.randn_like(old) * (1 + trial))
        del old
    _check(model, cache)


def test_in_place_edit_data_assignment_and_undo(tmp_path):
    model = build("gpt2", dtype=torch.float64)
    cache = BlockCache(disk=False)
    W = model.blocks[1].mlp.W_out
    h0 = tensor_hash(W)
    _check(model, cache)
    with torch.no_grad():
        W.mul_(2.0)
    assert tensor_hash(W) != h0
    _check(model, cache)
    with torch.no_grad():
        W.div_(2.0)
    assert tensor_hash(W) == h0  # an undone edit finds the old rows again
    W.data = torch.randn_like(W)
    assert tensor_hash(W) != h0
    _check(model, cache)
    with torch.no_grad():
        model.W_U.mul_(1.5)  # the unembedding is part of every key
    _check(model, cache)


@pytest.mark.parametrize("where", ["W_U", "ln_final", "W_out", "W_O"])
def test_single_entry_edits_through_data_are_never_stale(where):
    """``.data`` writes bypass the version counter: one entry changed (or two swapped)
    anywhere in a keyed weight still gives fresh rows."""
    model = build("gpt2", dtype=torch.float64)
    cache = BlockCache(disk=False)
    _check(model, cache)
    weight = {
        "W_U": model.W_U,
        "ln_final": model.ln_final.w,
        "W_out": model.blocks[1].mlp.W_out,
        "W_O": model.blocks[1].attn.W_O,
    }[where]
    flat = weight.data.view(-1)
    target = int(neuron_importance(model, [PROMPTS[0]]).target_ids[0])
    i = target if where == "W_U" else flat.numel() // 2 + 1  # off any sampling grid
    flat[i] += 3.0
    _check(model, cache)
    flat[[0, i]] = flat[[i, 0]].clone()  # a swap keeps every sum
    _check(model, cache)


def test_load_state_dict_and_second_model_with_equal_shapes(tmp_path):
    a = build("llama", dtype=torch.float64, seed=0)
    b = build("llama", dtype=torch.float64, seed=1)
    cache = BlockCache(disk=tmp_path)  # one cache (and one directory) for both models
    _check(a, cache)
    _check(b, cache)
    _check(a, cache)
    a.load_state_dict(b.state_dict())
    _check(a, cache)
    torch.testing.assert_close(
        neuron_importance(a, PROMPTS[:1], cache=cache).scores,
        neuron_importance(b, PROMPTS[:1], cache=cache).scores,
        atol=0,
        rtol=0,
    )


def test_full_block_keys_follow_content():
    model = build("gpt2", dtype=torch.float64)
    cache = BlockCache(disk=False)
    before = ffn_block(model, 0, cache).U.clone()
    model.blocks[0].mlp.W_out = torch.nn.Parameter(model.blocks[0].mlp.W_out.detach() * 3)
    after = ffn_block(model, 0, cache).U
    torch.testing.assert_close(after, before * 3)


# ---------------------------------------------------------------------------- budget, eviction
def test_budget_parsing_and_environment(monkeypatch):
    assert parse_bytes("4G") == 4 * 2**30 and parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(MechcnaError, match="byte size"):
        parse_bytes("lots")
    monkeypatch.setenv("MECHCNA_BLOCK_BUDGET", "3M")
    assert default_budget() == 3 * 2**20 and BlockCache().budget == 3 * 2**20
    monkeypatch.delenv("MECHCNA_BLOCK_BUDGET")
    assert default_budget() >= 256 * 2**20
    with pytest.raises(MechcnaError, match="budget"):
        BlockCache(budget=-1)


def test_a_budget_that_cannot_hold_every_layer_keeps_no_rows(monkeypatch, tmp_path):
    """A call visits every layer in turn: a budget that holds only some layers' rows would
    evict, on each call, the layers the next call needs first and recompute every row
    (Gemma 3's 19 GB of rows in a ~10 GB budget did, at 20 s a layer). Such a cache keeps no
    rows (the engine streams) and gives the same scores as one that holds everything."""
    model = build("llama")
    full = BlockCache(disk=False)
    want = neuron_importance(model, PROMPTS[:2], cache=full).scores
    stores = [e for e in full._entries.values() if isinstance(e, RowStore)]
    assert len(stores) == model.cfg.n_layers and all(bool(s.known.all()) for s in stores)
    layer_rows_bytes = stores[0].n_rows * stores[0].d_vocab * stores[0].storage.itemsize
    assert full.can_hold(stores[0], model.cfg.n_layers)
    cache = BlockCache(budget=int((model.cfg.n_layers - 0.5) * layer_rows_bytes), disk=False)
    assert not cache.can_hold(stores[0], model.cfg.n_layers) and cache.can_hold(stores[0])
    for prompts in (PROMPTS[:2], PROMPTS[:2]):
        got = neuron_importance(model, prompts, cache=cache)
        torch.testing.assert_close(got.scores, want, atol=2e-6, rtol=0)
        kept = [e for e in cache._entries.values() if isinstance(e, RowStore)]
        assert not any(bool(s.known.any()) for s in kept)  # nothing filled, nothing thrashed
        assert got.stats is not None and 0 < got.stats.certified_fraction < 1
    # on disk the budget is the disk cache's limit
    disk = BlockCache(disk=False)
    monkeypatch.setenv("MECHCNA_DISK_CACHE_BYTES", str(int(1.5 * layer_rows_bytes)))
    filed = RowStore(
        stores[0].n_rows, stores[0].d_vocab, torch.int16, torch.float32, tmp_path / "s"
    )
    assert disk.can_hold(filed, 1) and not disk.can_hold(filed, model.cfg.n_layers)
    filed.release()
    # streaming through a file-backed cache writes nothing and keeps no exact rows either:
    # the rows a call computes serve that call only (memory stays bounded by one layer)
    on_disk = BlockCache(disk=tmp_path / "cache")
    got = neuron_importance(model, PROMPTS[:2], cache=on_disk)
    torch.testing.assert_close(got.scores, want, atol=2e-6, rtol=0)
    kept = [e for e in on_disk._entries.values() if isinstance(e, RowStore)]
    assert kept and all(s.path is not None for s in kept)
    assert not any(bool(s.known.any() or s.exact_known.any()) for s in kept)
    stats = neuron_importance(model, PROMPTS[1:2], cache=BlockCache(budget=0, disk=False)).stats
    assert stats is not None and stats.scored > 0


# ---------------------------------------------------------------------------- half precision
def _rows(dtype, n_rows=60, d=12, V=300, seed=0, half=True, scale=1.0, storage=torch.int16):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, V, generator=g, dtype=torch.float64)
    W = torch.randn(n_rows, d, generator=g, dtype=torch.float64) * scale
    model_like = type("P", (), {})()
    del model_like
    store = RowStore(n_rows, V, storage if half else dtype, dtype)
    from mechcna.engine.blocks import Projector

    proj = Projector(M.to(dtype), "k")
    return LayerRows(W.to(dtype), store, proj, BlockCache(disk=False)), M, W


def _exact(z, M, W, a, w):
    U = W @ M
    out = torch.empty(a.shape, dtype=torch.float64)
    for b in range(a.shape[0]):
        lp0 = z[b].log_softmax(-1)[w[b]]
        for e in range(a.shape[1]):
            out[b, e] = (z[b] + a[b, e, :, None] * U).log_softmax(-1)[:, w[b]] - lp0
    return out


@pytest.mark.parametrize("storage", [torch.int16, torch.float16])
@pytest.mark.parametrize("fill", [True, False])
def test_half_precision_rows_stay_within_tol(fill, storage):
    """float32 compute with 16-bit rows: every score within tol of the exact value."""
    rows, M, W = _rows(torch.float32, storage=storage)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, M.shape[1], generator=g, dtype=torch.float64) * 2
    a = torch.randn(3, 2, W.shape[0], generator=g, dtype=torch.float64)
    a = a * torch.logspace(-4, 0, W.shape[0], dtype=torch.float64)
    w = torch.tensor([3, 50, 299])
    exact = _exact(z, M, W, a, w)
    for tol in (1e-3, 1e-4):
        stats = EngineStats()
        rows.store.release()
        got = increase_from_rows(z.float(), rows, a.float(), w, tol=tol, fill=fill, stats=stats)
        assert 0 < stats.exact < stats.scored
        assert float((got.double() - exact).abs().max()) <= tol + 2e-5
        assert bool(rows.store.known.all()) == fill  # without fill only needed rows are made
    assert rows.store.normalised and rows.store.storage == storage


@pytest.mark.parametrize("storage", [torch.int16, torch.float16])
def test_stored_rows_within_eta(storage):
    """Every stored entry is within the store's eta of the exact centred row (the bound the
    engine adds), for rows of very different scales and with constant rows."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(40, 3000, generator=g) * torch.logspace(-6, 3, 40)[:, None]
    rows[3] = 2.5  # zero radius
    store = RowStore(40, 3000, storage, torch.float32)
    store.fill(torch.arange(15), rows[:15])  # a contiguous run is written as a slice
    idx = torch.randperm(25, generator=g) + 15
    store.fill(idx, rows[idx])
    exact = rows.double() - (rows.double().amax(1) + rows.double().amin(1))[:, None] / 2
    err = (store.get(torch.arange(40)).double() - exact).abs().amax(1)
    assert bool((err <= store.eta(torch.arange(40)).double()).all())
    assert float(err[3]) == 0.0


@pytest.mark.parametrize("fill", [True, False])
def test_rows_engine_float64_matches_exact(fill):
    rows, M, W = _rows(torch.float64, half=False)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, M.shape[1], generator=g, dtype=torch.float64)
    a = torch.randn(2, 3, W.shape[0], generator=g, dtype=torch.float64)
    a = a * torch.logspace(-5, -1, W.shape[0], dtype=torch.float64)
    w = torch.tensor([0, 7])
    got = increase_from_rows(z, rows, a, w, tol=1e-12, fill=fill)
    torch.testing.assert_close(got, _exact(z, M, W, a, w), atol=1e-11, rtol=0)
    exact = increase_from_rows(z, rows, a, w, method="exact")
    torch.testing.assert_close(exact, _exact(z, M, W, a, w), atol=1e-12, rtol=0)


def test_remainder_bounds_hold():
    """The proven bounds on R3 and R4 hold on random rows, weights and coefficients."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        V = int(torch.randint(2, 40, (1,), generator=g))
        u = torch.randn(V, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g)) * 4
        p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 3, 0)
        a = float(torch.randn(1, generator=g, dtype=torch.float64))
        k1 = p @ u
        k2 = p @ (u - k1) ** 2
        k3 = p @ (u - k1) ** 3
        K = torch.logsumexp(torch.log(p) + a * u, 0)
        r = float(u.max() - u.min())
        grow = torch.exp(torch.tensor(abs(a) * r, dtype=torch.float64))
        R3 = K - a * k1 - a * a * k2 / 2
        R4 = R3 - a**3 * k3 / 6
        assert abs(R3) <= abs(a) ** 3 * r * k2 * grow / 6 * (1 + 1e-9) + 1e-14
        bound4 = a**4 * torch.minimum(torch.tensor(r**4 / 96), r**2 * k2 * grow / 24)
        assert abs(R4) <= bound4 * (1 + 1e-9) + 1e-14


def test_range_bound_is_an_upper_bound():
    model = build("gpt2")
    proj = make_projector(model, "k")
    eye = torch.eye(model.cfg.d_model)
    torch.testing.assert_close(proj.M, linear_part(Architecture(model), eye), atol=1e-5, rtol=0)
    W = model.blocks[0].mlp.W_out.detach()
    U = W @ proj.M
    assert torch.all(proj.range_bound(W) >= U.max(1).values - U.min(1).values)


def test_float32_models_match_literal_with_half_rows(kind, tmp_path):
    model = build(kind)
    cache = BlockCache(disk=tmp_path)
    _check(model, cache)
    _check(model, cache, PROMPTS[2])  # second call reads the stored rows
    att = attention_neuron_importance(model, PROMPTS[:1], cache=cache)
    ref, _ = reference.literal_attention_scores(model, model.to_tokens(PROMPTS[0])[0])
    torch.testing.assert_close(att.scores[0, :, : ref.shape[1]].to(ref), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- disk cache
def test_disk_cache_starts_warm_and_is_bounded(tmp_path):
    model = build("llama", dtype=torch.float64)
    first = BlockCache(disk=tmp_path)
    _check(model, first)
    files = sorted(tmp_path.glob("*.rows"))
    assert len(files) == model.cfg.n_layers
    again = BlockCache(disk=tmp_path)  # a new session
    rows = layer_rows(model, "ffn", 0, again)
    assert bool(rows.store.known.all())
    _check(model, again)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].mlp.W_out.add_(1.0)
    assert not layer_rows(other, "ffn", 0, again).store.known.any()  # new content, new file
    n_files = len(list(tmp_path.glob("*.rows")))
    prune(tmp_path, limit=0)  # stores in use are never deleted
    assert len(list(tmp_path.glob("*.rows"))) == n_files
    first.clear()
    again.clear()
    prune(tmp_path, limit=0)  # only the empty (sparse, zero-block) file may stay
    assert all(f.stat().st_blocks == 0 for f in tmp_path.glob("*.rows"))
    assert len(list(tmp_path.glob("*.rows"))) <= 1


def test_disk_cache_opt_out(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHCNA_DISK_CACHE", "0")
    assert BlockCache().disk is None
    monkeypatch.setenv("MECHCNA_DISK_CACHE", "1")
    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(tmp_path / "c"))
    assert BlockCache().disk == tmp_path / "c"
    assert BlockCache(disk=False).disk is None


@pytest.mark.parametrize("storage", [torch.int16, torch.float16])
def test_concurrent_writers_merge(tmp_path, storage):
    V, n = 50, 40
    stores = [RowStore(n, V, storage, torch.float32, tmp_path / "k") for _ in range(2)]
    rows = torch.randn(n, V)

    def write(store, part):
        for i in part:
            store.fill(torch.tensor([i]), rows[i : i + 1])

    threads = [
        threading.Thread(target=write, args=(stores[0], range(0, n, 2))),
        threading.Thread(target=write, args=(stores[1], range(1, n, 2))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = RowStore(n, V, storage, torch.float32, tmp_path / "k")
    assert bool(fresh.known.all())
    centred = rows - (rows.max(1).values + rows.min(1).values)[:, None] / 2
    got = fresh.get(torch.arange(n))
    assert float((got - centred).abs().max()) <= float(fresh.eta(torch.arange(n)).max()) * 1.01
