import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mechcna import (
    ModelNotFoundError,
    ModelProvenance,
    UnsupportedArchitectureError,
    WeightProcessing,
    get_processing,
    get_provenance,
    load_model,
    save_checkpoint,
)
from mechcna.models.tokenizer import tokenizer_adds_bos
from tests.helpers import build, gpt2_cfg, tokenizer


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


def _bos_adding_tokenizer():
    """A word-level tokenizer whose post-processor puts <bos> first (as Llama-2's adds <s>)."""
    from tokenizers.processors import TemplateProcessing

    tok = tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(  # type: ignore[assignment]
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return tok


def test_config_source_and_seed():
    a = load_model(gpt2_cfg(), device="cpu", seed=3)
    b = load_model(gpt2_cfg(), device="cpu", seed=3)
    torch.testing.assert_close(a.W_E, b.W_E, atol=0, rtol=0)
    assert a.cfg.default_prepend_bos is False  # no tokenizer: nothing to prepend
    assert get_provenance(a) == ModelProvenance("config", "config", False, "no tokenizer")


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_bos_follows_the_tokenizer(arch):
    cfg = gpt2_cfg(original_architecture=arch)
    plain = load_model(cfg, device="cpu", tokenizer=tokenizer())
    assert not tokenizer_adds_bos(tokenizer())
    assert plain.cfg.default_prepend_bos is False
    assert plain.to_str_tokens("12+7=") == ["1", "2", "+", "7", "="]
    adds = load_model(cfg, device="cpu", tokenizer=_bos_adding_tokenizer())
    assert tokenizer_adds_bos(_bos_adding_tokenizer())
    assert adds.cfg.default_prepend_bos is True
    assert adds.to_str_tokens("12+7=") == ["<bos>", "1", "2", "+", "7", "="]
    record = get_provenance(adds)
    assert record is not None
    assert (record.prepend_bos, record.bos_policy) == (True, "tokenizer")


def test_prepend_bos_argument_overrides_and_changes_are_seen():
    model = load_model(gpt2_cfg(), device="cpu", tokenizer=tokenizer(), prepend_bos=True)
    assert model.to_str_tokens("12")[0] == "<bos>"
    record = get_provenance(model)
    assert record is not None
    assert (record.prepend_bos, record.bos_policy) == (True, "argument")
    model.cfg.default_prepend_bos = False
    record = get_provenance(model)
    assert record is not None
    assert (record.prepend_bos, record.bos_policy) == (False, "changed after loading")


def test_hf_checkpoint_bos_follows_its_tokenizer(tmp_path):
    hf = _hf_llama()
    hf.save_pretrained(tmp_path / "plain")
    hf.save_pretrained(tmp_path / "bos")
    tokenizer().save_pretrained(tmp_path / "plain")
    _bos_adding_tokenizer().save_pretrained(tmp_path / "bos")
    plain = load_model(tmp_path / "plain", device="cpu")
    bos = load_model(tmp_path / "bos", device="cpu")
    assert (plain.cfg.default_prepend_bos, bos.cfg.default_prepend_bos) == (False, True)
    assert bos.to_tokens("12")[0, 0] == bos.tokenizer.bos_token_id  # type: ignore[union-attr]
    record = get_provenance(bos)
    assert record is not None and record.format == "huggingface"
    assert record.bos_policy == "tokenizer" and not record.dequantized


def test_shipped_model_keeps_bos_from_its_checkpoint():
    model = load_model("mechcna/arith-small", device="cpu")
    assert model.cfg.default_prepend_bos is True
    assert model.to_str_tokens("3+5=")[0] == "<bos>"
    record = get_provenance(model)
    assert record == ModelProvenance("mechcna/arith-small", "mechcna", True, "checkpoint")
    assert "BOS: checkpoint" in record.describe()


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
    with pytest.raises(ModelNotFoundError, match="unknown model") as err:
        load_model("not-a-real-model-name-xyz", device="cpu")
    assert len(str(err.value)) < 300 and "load offline: mechcna/arith-small" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="did you mean 'gpt2-small'"):
        load_model("gpt3-small", device="cpu")


def test_unsupported_hf_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights present: the family is refused
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        load_model(tmp_path, device="cpu")


def test_processing_on_random_config_rejected():
    with pytest.raises(UnsupportedArchitectureError):
        load_model(gpt2_cfg(), device="cpu", processing=WeightProcessing(fold_ln=True))


def test_loading_prints_no_device_moves(tmp_path, capfd):
    """TransformerLens prints "Moving model to device" on every load; load_model drops those
    lines (and only those) from standard output."""
    import sys

    from mechcna.models.quiet import no_device_prints

    path = save_checkpoint(build("llama"), tmp_path / "tiny")
    capfd.readouterr()
    load_model(path, device="cpu")
    load_model("mechcna/arith-small", device="cpu")
    out = capfd.readouterr().out
    assert "Moving model" not in out and "Changing model dtype" not in out
    with no_device_prints():
        print("Moving model to device: ", "cpu")
        print("kept", "line")
        sys.stdout.write("tail without newline")
    assert capfd.readouterr().out == "kept line\ntail without newline"
