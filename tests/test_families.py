"""Architecture coverage: tiny random-init Hugging Face checkpoints of each family, saved and
loaded offline; logits equal the Hugging Face model's, and the residual decomposition holds
(or the family is refused with a clear error)."""

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mechcna import (
    Architecture,
    UnsupportedArchitectureError,
    check_model,
    layer_importance,
    load_model,
    neuron_importance,
)
from mechcna.models.hf_convert import hf_config_to_tl
from tests.reference import literal_ffn_scores

V = 60
SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=64,
)


def _perturb(model, seed=0):
    """Random init leaves norms at 1 (or 0) and biases at 0: perturb them so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def llama_tied():
    torch.manual_seed(0)
    return _perturb(LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)))


def qwen2():
    torch.manual_seed(0)
    return _perturb(Qwen2ForCausalLM(Qwen2Config(**SMALL)))


def mistral():
    torch.manual_seed(0)
    return _perturb(MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4)))


def gemma2():
    torch.manual_seed(0)
    cfg = Gemma2Config(**SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    return _perturb(Gemma2ForCausalLM(cfg))


def neox(parallel: bool):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
        rotary_pct=0.5,
        use_parallel_residual=parallel,
    )
    return _perturb(GPTNeoXForCausalLM(cfg))


FAMILIES = {
    "llama-tied": llama_tied,
    "qwen2": qwen2,
    "mistral": mistral,
    "gemma2": gemma2,
    "neox-sequential": lambda: neox(False),
    "neox-parallel": lambda: neox(True),
}
ANALYSED = ["llama-tied", "qwen2", "mistral", "neox-sequential"]
# Gemma 2 (and Gemma 3) are analysed: see tests/test_gemma.py (sandwich norms, soft caps)
REFUSED = {"neox-parallel": "parallel attention"}


def _load(tmp_path, family):
    hf = FAMILIES[family]()
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_parity(tmp_path, family):
    hf, model = _load(tmp_path, family)
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ANALYSED)
def test_analysed_families_decompose(tmp_path, family):
    _, model = _load(tmp_path, family)
    check_model(model, seq_len=9)
    tokens = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(2))
    res = layer_importance(model, tokens[None])
    assert res.final_logprob is not None and res.embedding_logprob is not None
    total = res.scores.sum((1, 2))
    torch.testing.assert_close(total, res.final_logprob - res.embedding_logprob, atol=1e-4, rtol=0)
    fast = neuron_importance(model, tokens[None]).scores[0]
    literal, _ = literal_ffn_scores(model, tokens)
    torch.testing.assert_close(fast, literal, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_families_say_why(tmp_path, family):
    _, model = _load(tmp_path, family)
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[family]):
        Architecture(model)
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[family]):
        check_model(model)
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[family]):
        layer_importance(model, torch.zeros(1, 4, dtype=torch.long))


def test_tied_embeddings_stay_tied_in_values(tmp_path):
    _, model = _load(tmp_path, "llama-tied")
    torch.testing.assert_close(model.W_U, model.W_E.T, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
        (Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4), "sliding"),
        (LlamaConfig(**SMALL, attention_bias=True), "biases"),
    ],
)
def test_options_transformerlens_cannot_reproduce_are_refused(config, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        hf_config_to_tl(config)
