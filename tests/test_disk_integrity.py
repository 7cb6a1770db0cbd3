"""A damaged or concurrently pruned disk cache is never trusted (issue 20, items 3-4).

Before the fix a row file of the wrong size was truncated or zero-extended to fit while its
metadata still marked the rows computed, any same-size damage (zeroed, rescaled, swapped
files) was read as valid, and a prune in one process deleted the files of a store another
process was filling (whose later rows then went to a deleted file). Every test here failed
on that code.
"""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mechcna import neuron_importance
from mechcna.engine.blocks import BlockCache
from mechcna.engine.rows import RowStore, prune
from tests.helpers import PROMPTS, build


def _model(dtype):
    model = build("llama", dtype=dtype)
    with torch.no_grad():  # a confident model: damaged rows give visibly wrong scores
        model.W_U.mul_(20)
    return model


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.rows"), key=lambda f: f.stat().st_mtime_ns)


def _truncate(files):
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size // 2)


def _extend(files):
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size + 4096)


def _zero(files):
    size = files[0].stat().st_size
    files[0].write_bytes(bytes(size))


def _scale(files):
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        dtype = np.int16 if raw.size % 8 else np.float64  # the tests' two storages
        data = raw.view(dtype)
        (data // 2 if dtype == np.int16 else data * 0.5).astype(dtype).tofile(f)


def _swap(files):
    a, b = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(b)
    files[1].write_bytes(a)


def _swap_with_metadata(files):
    _swap(files)
    metas = [f.with_suffix(".meta.npz") for f in files[:2]]
    a, b = metas[0].read_bytes(), metas[1].read_bytes()
    metas[0].write_bytes(b)
    metas[1].write_bytes(a)


DAMAGE = [_truncate, _extend, _zero, _scale, _swap, _swap_with_metadata]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_cache_is_rebuilt(tmp_path, caplog, dtype, damage):
    model = _model(dtype)
    want = neuron_importance(model, PROMPTS, cache=BlockCache(disk=False)).scores
    first = BlockCache(disk=tmp_path)
    neuron_importance(model, PROMPTS, cache=first)
    first.clear()
    files = _files(tmp_path)
    assert len(files) == model.cfg.n_layers
    damage(files)
    again = BlockCache(disk=tmp_path)  # a new session on the damaged directory
    with caplog.at_level(logging.WARNING, logger="mechcna.engine.rows"):
        got = neuron_importance(model, PROMPTS, cache=again).scores
    assert any(r.name == "mechcna.engine.rows" for r in caplog.records)  # the damage is reported
    torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    d_mlp, d_vocab = model.cfg.d_mlp, model.cfg.d_vocab
    assert d_mlp is not None
    expected = d_mlp * d_vocab * (2 if dtype == torch.float32 else 8)
    assert all(f.stat().st_size == expected for f in tmp_path.glob("*.rows"))
    again.clear()


def _prune_elsewhere(directory: Path) -> None:
    """``prune(directory, limit=0)`` in a child process (forked: no second import)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            prune(directory, limit=0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("storage", [torch.int16, torch.float32])
def test_prune_in_another_process_spares_a_store_in_use(tmp_path, storage):
    n, V = 30, 200
    rows = torch.randn(n, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    store = RowStore(n, V, storage, torch.float32, tmp_path / "k")
    store.fill(torch.arange(10), rows[:10])
    _prune_elsewhere(tmp_path)  # the directory is over its limit (0 bytes)
    assert (tmp_path / "k.rows").exists() and (tmp_path / "k.meta.npz").exists()
    store.fill(torch.arange(10, n), rows[10:])
    fresh = RowStore(n, V, storage, torch.float32, tmp_path / "k")  # a later session
    assert bool(fresh.known.all())
    centred = rows - (rows.amax(1) + rows.amin(1))[:, None] / 2
    err = (fresh.get(torch.arange(n)).double() - centred).abs().amax(1)
    assert bool((err <= fresh.eta(torch.arange(n)) * 1.01).all())
    store.release()
    fresh.release()
    _prune_elsewhere(tmp_path)  # no longer in use: deleted
    assert not (tmp_path / "k.rows").exists()


def test_rows_are_checked_when_first_read(tmp_path):
    """A row damaged after it was written (same size, metadata intact) is found by its
    checksum in the next process and recomputed, not used."""
    n, V = 8, 100
    rows = torch.randn(n, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    store = RowStore(n, V, torch.int16, torch.float32, tmp_path / "k")
    store.fill(torch.arange(n), rows)
    store.release()
    data = np.memmap(tmp_path / "k.rows", dtype=np.int16, mode="r+", shape=(n, V))
    data[3, 5] += 1
    data.flush()
    del data
    fresh = RowStore(n, V, torch.int16, torch.float32, tmp_path / "k")
    assert bool(fresh.known.all())
    assert fresh.verify() == 1 and not bool(fresh.known[3]) and bool(fresh.known.sum() == n - 1)
