import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the block cache's disk files of the tests go to a fresh temporary directory, deleted when
# the test process exits (each run would otherwise leave up to a few GB in /tmp)
if "MECHCNA_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="mechcna-blocks-")
    os.environ["MECHCNA_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import pytest
import torch

from tests.helpers import build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["gpt2", "llama"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def model(kind):
    return build(kind)


@pytest.fixture
def model64(kind):
    return build(kind, dtype=torch.float64)
