import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mechcna import (
    ModelNotFoundError,
    UnsupportedArchitectureError,
    WeightProcessing,
    get_processing,
    load_model,
    save_checkpoint,
)
from tests.helpers import build, gpt2_cfg


def _hf_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=60)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=60,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("make", [_hf_gpt2, _hf_llama], ids=["gpt2", "llama"])
def test_local_hf_checkpoint_logit_parity(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    tokens = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert get_processing(model) == WeightProcessing()


def test_local_hf_checkpoint_with_processing_keeps_log_probs(tmp_path):
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path)
    processing = WeightProcessing(True, True, True, True)
    model = load_model(tmp_path, device="cpu", processing=processing)
    assert get_processing(model) == processing
    assert model.cfg.normalization_type == "LNPre"
    tokens = torch.randint(0, 60, (1, 7))
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_mechcna_checkpoint_round_trip(tmp_path):
    model = build("llama")
    save_checkpoint(model, tmp_path / "ck", card={"note": "test"})
    again = load_model(tmp_path / "ck", device="cpu")
    tokens = model.to_tokens(["the sum of 3 and 5 is"])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), atol=0, rtol=0)
    assert again.to_str_tokens("12+7=") == model.to_str_tokens("12+7=")
    assert (tmp_path / "ck" / "card.json").is_file()


def test_config_source_and_seed():
    a = load_model(gpt2_cfg(), device="cpu", seed=3)
    b = load_model(gpt2_cfg(), device="cpu", seed=3)
    torch.testing.assert_close(a.W_E, b.W_E, atol=0, rtol=0)
    assert a.cfg.default_prepend_bos is False  # GPT-2 family: no BOS, as in the papers
    c = load_model(gpt2_cfg(original_architecture="LlamaForCausalLM"), device="cpu")
    assert c.cfg.default_prepend_bos is True


def test_dtype_argument():
    model = load_model(gpt2_cfg(), device="cpu", dtype=torch.float64)
    assert model.W_U.dtype == torch.float64


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_model(tmp_path / "nothing-here", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither"):
        load_model(tmp_path / "empty", device="cpu")


def test_unknown_pretrained_name_is_clear():
    with pytest.raises(ModelNotFoundError, match="could not load"):
        load_model("not-a-real-model-name-xyz", device="cpu")


def test_unsupported_hf_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights present: the family is refused
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        load_model(tmp_path, device="cpu")


def test_processing_on_random_config_rejected():
    with pytest.raises(UnsupportedArchitectureError):
        load_model(gpt2_cfg(), device="cpu", processing=WeightProcessing(fold_ln=True))
