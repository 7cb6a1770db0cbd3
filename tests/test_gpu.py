"""The analyses on a CUDA device equal the literal references (and the CPU results).

Marked ``gpu``: they run on ``MECHCNA_TEST_DEVICE`` (default ``cuda``) and skip when CUDA is
not available. ``benchmarks/gpu.sh`` runs them on the GPU; its ``--cpu-dry-run`` runs them on
the CPU (``MECHCNA_TEST_DEVICE=cpu``) so that they are exercised in CI too.
"""

import os

import pytest
import torch

import mechcna
from tests import reference
from tests.helpers import PROMPTS, build

DEVICE = os.environ.get("MECHCNA_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device"
    ),
]


@pytest.fixture
def model(kind):
    return build(kind).to(DEVICE)


def _tokens(model, prompt):
    return model.to_tokens(prompt)[0]


def test_model_is_on_the_device(model):
    assert model.W_U.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("method", ["certified", "exact"])
def test_ffn_neurons_equal_literal(model, method):
    res = mechcna.neuron_importance(model, PROMPTS, method=method)
    for i, prompt in enumerate(PROMPTS):
        ref, w = reference.literal_ffn_scores(model, _tokens(model, prompt))
        assert int(res.target_ids[i]) == w
        torch.testing.assert_close(res.scores[i], ref.cpu(), rtol=0, atol=1e-4)


def test_attention_neurons_equal_literal(model):
    res = mechcna.attention_neuron_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tokens = _tokens(model, prompt)
        ref, _ = reference.literal_attention_scores(model, tokens)
        got = res.scores[i, :, : len(tokens)]
        torch.testing.assert_close(got, ref.cpu(), rtol=0, atol=1e-4)


STORAGES = [torch.int16, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("storage", STORAGES)
def test_ffn_and_attention_neurons_with_16_bit_rows_on_the_device(model, storage, monkeypatch):
    """The certified engine with rows stored on the device in each 16-bit format: every FFN
    and attention neuron score within the tolerance of the literal, a second call (warm rows)
    equal to the first, and the rows in device memory. The tiny vocabulary is given small
    heads so that the truncated moments (one prompt) run on the device too."""
    from mechcna.engine import moments
    from mechcna.engine.blocks import BlockCache, layer_rows

    monkeypatch.setattr(moments, "HEADS", (2, 4, 8))

    cache = BlockCache(disk=False, storage=storage)
    for prompt in PROMPTS:
        tokens = _tokens(model, prompt)
        ffn = mechcna.neuron_importance(model, [prompt], cache=cache)
        again = mechcna.neuron_importance(model, [prompt], cache=cache)
        ref, _ = reference.literal_ffn_scores(model, tokens)
        torch.testing.assert_close(ffn.scores[0], ref.cpu(), rtol=0, atol=1e-4)
        torch.testing.assert_close(again.scores, ffn.scores, rtol=0, atol=2e-6)
        att = mechcna.attention_neuron_importance(model, [prompt], cache=cache)
        ref_a, _ = reference.literal_attention_scores(model, tokens)
        torch.testing.assert_close(att.scores[0, :, : len(tokens)], ref_a.cpu(), rtol=0, atol=1e-4)
    for kind in ("ffn", "attn"):
        store = layer_rows(model, kind, 0, cache).store
        assert store.storage == storage
        assert store.stored(torch.arange(2)).device.type == torch.device(DEVICE).type


def test_layers_and_heads_equal_literal(model):
    layers = mechcna.layer_importance(model, PROMPTS)
    heads = mechcna.head_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tokens = _tokens(model, prompt)
        ref_l, _ = reference.literal_layer_scores(model, tokens)
        ref_h, _ = reference.literal_head_scores(model, tokens)
        torch.testing.assert_close(layers.scores[i], ref_l.cpu(), rtol=0, atol=1e-4)
        torch.testing.assert_close(heads.scores[i], ref_h.cpu(), rtol=0, atol=1e-4)


def test_head_sweep_on_device_equals_cpu(kind):
    cpu = build(kind)
    dev = build(kind).to(DEVICE)
    prompts = [*PROMPTS, "7-4=", "the product of 2 and 3 is"]
    want = mechcna.head_sweep(cpu, prompts, batch_size=2, heads_per_pass=3, progress=False)
    got = mechcna.head_sweep(dev, prompts, batch_size=2, heads_per_pass=3, progress=False)
    assert torch.equal(got.targets, want.targets)
    assert torch.equal(got.prediction, want.prediction)
    torch.testing.assert_close(got.logprob, want.logprob, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.base_logprob, want.base_logprob, rtol=0, atol=1e-4)


def test_half_precision_model_ranks_like_float32(kind):
    """A bfloat16 copy of the model: each prompt's top FFN neurons are among the float32
    model's top ten."""
    full = build(kind).to(DEVICE)
    half = build(kind).to(DEVICE).to(torch.bfloat16)
    assert half.W_U.dtype == torch.bfloat16
    a = mechcna.neuron_importance(full, PROMPTS, targets=["8", "1", "basketball"])
    b = mechcna.neuron_importance(half, PROMPTS, targets=["8", "1", "basketball"])
    for i in range(len(PROMPTS)):
        top_a = set(a.top(3, prompt=i)["label"])
        top_b = set(b.top(10, prompt=i)["label"])
        assert top_a <= top_b, (i, top_a, top_b)
