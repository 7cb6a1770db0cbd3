import pytest
import torch

from mechcna import ModelCheckError, check_model, hook_name
from tests.helpers import build


def test_check_passes(kind):
    report = check_model(build(kind))
    assert report.max_error < 1e-5


def test_check_passes_fp64(kind):
    report = check_model(build(kind, dtype=torch.float64))
    assert report.max_error < 1e-12


@pytest.mark.parametrize(
    "hook,expect",
    [
        ("attn_out", "layer 1: per-head outputs"),
        ("mlp_out", "layer 1: per-neuron contributions"),
    ],
)
def test_check_fails_on_broken_hook(kind, hook, expect):
    model = build(kind)

    def corrupt(act, hook):
        return act + 0.5

    model.add_hook(hook_name(hook, 1), corrupt)
    try:
        with pytest.raises(ModelCheckError, match=expect):
            check_model(model)
    finally:
        model.reset_hooks()
    check_model(model)


def test_check_fails_on_broken_residual(kind):
    model = build(kind)
    model.add_hook(hook_name("resid_mid", 0), lambda act, hook: act * 1.1)
    try:
        with pytest.raises(ModelCheckError, match="layer 1: embedding plus earlier"):
            check_model(model)
    finally:
        model.reset_hooks()
