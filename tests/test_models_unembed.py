"""logits_at: the next-token logits of chosen positions equal model(tokens)[rows, positions]."""

import pytest
import torch

from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.interventions.edits import HeadAblation, intervene
from mechcna.interventions.prompts import prepare_prompts
from mechcna.models.loading import load_model
from mechcna.models.unembed import logits_at
from mechcna.tasks.arithmetic import arithmetic_dataset
from tests.helpers import PROMPTS, build, llama_cfg, tokenizer
from tests.test_gemma import build_gemma

MODELS = {
    "llama (RMSNorm)": lambda dt: build("llama", dtype=dt),
    "gpt2 (LayerNorm, biases)": lambda dt: build("gpt2", dtype=dt),
    "gemma2 (output soft cap)": lambda dt: build_gemma("gemma2", dtype=dt),
    "gemma3": lambda dt: build_gemma("gemma3", dtype=dt),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_at_equal_the_full_forward_on_a_padded_batch(name, dtype, tol):
    model = MODELS[name](dtype)
    batch = prepare_prompts(model, PROMPTS)
    with torch.no_grad():
        full = model(batch.tokens)[batch.batch_index, batch.positions]
        got = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
    assert got.shape == full.shape == (len(PROMPTS), model.cfg.d_vocab)
    torch.testing.assert_close(got, full, rtol=tol, atol=tol)
    if name.startswith("gemma2"):  # the cap bends every logit: it must be applied
        assert float(full.abs().max()) < model.cfg.output_logits_soft_cap


def test_logits_at_see_the_interventions_on_the_model():
    model = build("llama", dtype=torch.float64)
    batch = prepare_prompts(model, PROMPTS)
    with torch.no_grad():
        clean = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
        with intervene(model, HeadAblation([(1, 0), (0, 1)])):
            full = model(batch.tokens)[batch.batch_index, batch.positions]
            got = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    assert float((got - clean).abs().max()) > 1e-6  # the ablation changed them


def test_logits_at_on_a_model_without_a_final_norm_and_one_with_ln_folded():
    bare = load_model(llama_cfg(normalization_type=None), device="cpu", dtype=torch.float64,
                      tokenizer=tokenizer())  # fmt: skip
    folded = build("gpt2", dtype=torch.float64)  # processed by the user, as TransformerLens does
    folded.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert folded.cfg.normalization_type == "LNPre" and bare.cfg.normalization_type is None
    for model in (bare, folded):
        batch = prepare_prompts(model, PROMPTS)
        with torch.no_grad():
            full = model(batch.tokens)[batch.batch_index, batch.positions]
            got = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)


def test_accuracy_on_a_batch_equals_prompt_by_prompt():
    model = build("llama", dtype=torch.float64)
    data = arithmetic_dataset(["+"], [1], 4, n_pairs=6, tokenizer=model.tokenizer, seed=0)
    heads = [HeadAblation([(1, 0)])]
    together = evaluate_accuracy(model, data, heads, batch_size=64, progress=False)
    alone = evaluate_accuracy(model, data, heads, batch_size=1, progress=False)
    torch.testing.assert_close(together.logprob, alone.logprob, rtol=1e-12, atol=1e-12)
    assert torch.equal(together.correct, alone.correct)
