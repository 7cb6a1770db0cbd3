"""Regression tests for results that used to be silently wrong (issue 13).

Each test failed on the code before its fix: NaN models passing ``check_model``, NaN scores
returned, the mask/keep table using every layer, a final RMSNorm read as the blocks'
LayerNorm, attention-neuron labels in the wrong order, by-position head scores summed in the
heatmap, and letters and common words counted as number concepts.
"""

import pytest
import torch

import mechcna
from mechcna import HeadAblation, check_model
from mechcna.analyses.case_ablation import mask_keep_table
from mechcna.analyses.comparative import compare_neurons
from mechcna.engine.projection import project_to_vocab
from mechcna.errors import NonFiniteError
from tests.helpers import PROMPTS, build, gpt2_cfg, randomize_biases_and_norms


# ------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("where", ["all_embedding", "one_embedding_row", "W_out_inf"])
def test_check_model_fails_on_non_finite(where):
    model = build("gpt2", dtype=torch.float64)
    with torch.no_grad():
        if where == "all_embedding":
            model.W_E.fill_(float("nan"))
        elif where == "one_embedding_row":
            model.W_E[5] = float("nan")
        else:
            model.blocks[1].mlp.W_out[3, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        check_model(model)


@pytest.mark.parametrize(
    "analysis", ["layer_importance", "neuron_importance", "head_importance", "query_neurons"]
)
def test_analyses_refuse_non_finite_naming_the_layer(analysis):
    model = build("llama", dtype=torch.float64)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[:, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 1"):
        getattr(mechcna, analysis)(model, PROMPTS)


def test_accuracy_refuses_non_finite():
    from tests.test_padding import _arith_model

    model = _arith_model("gpt2")
    with torch.no_grad():
        model.blocks[0].attn.W_O[1] = float("nan")
    ds = mechcna.arithmetic_dataset(n_pairs=1, digits=[1], operations=["+"])
    with pytest.raises(NonFiniteError, match=r"blocks\.0"):
        mechcna.evaluate_accuracy(model, ds, progress=False)


# ------------------------------------------------------------------ mask / keep table
def test_mask_keep_default_layers_start_at_the_ablated_head():
    model = build("gpt2", dtype=torch.float64, n_layers=3)
    res = compare_neurons(model, PROMPTS, HeadAblation([(1, 2)]))
    assert res.layers_from == 1 and list(res.changed_layers) == [1, 2]
    assert res.scores[:, 0].abs().max() == 0
    default = mask_keep_table(model, PROMPTS, res, ks=(5,), progress=False)
    explicit = mask_keep_table(model, PROMPTS, res, ks=(5,), deep_layers=[1, 2], progress=False)
    assert default.equals(explicit)


# ------------------------------------------------------------------ final norm kind
def test_final_rms_after_layernorm_blocks():
    model = mechcna.load_model(
        gpt2_cfg(final_rms=True), device="cpu", dtype=torch.float64, seed=0,
        tokenizer=build("gpt2").tokenizer,
    )  # fmt: skip
    model = randomize_biases_and_norms(model)
    assert type(model.ln_final).__name__ == "RMSNorm"
    assert mechcna.Architecture(model).final_norm == "RMS"
    res = mechcna.layer_importance(model, PROMPTS)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            logits, cache = model.run_with_cache(prompt)
            real = logits[0, -1].log_softmax(-1)[res.target_ids[i]]
            torch.testing.assert_close(res.final_logprob[i], real, atol=1e-10, rtol=0)
            resid = cache["blocks.1.hook_resid_post"][0, -1]
            scale = cache["ln_final.hook_scale"][0, -1, 0]
            torch.testing.assert_close(
                project_to_vocab(model, resid, scale), logits[0, -1], atol=1e-10, rtol=0
            )


# ------------------------------------------------------------------ smaller defects
def test_attention_neuron_labels_are_layer_head_dim_pos():
    model = build("gpt2", dtype=torch.float64)
    res = mechcna.attention_neuron_importance(model, PROMPTS[:1])
    top = res.top(5, prompt=0)
    for _, row in top.iterrows():
        assert row["label"] == f"{row['layer']}_{row['head']}_{row['d_head']}_{row['pos']}"


def test_by_position_head_heatmap_is_not_summed():
    model = build("llama", dtype=torch.float64)
    res = mechcna.head_importance(model, PROMPTS[:1], by_position=True)
    fig = res.plot(0)
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)  # type: ignore[attr-defined]
    n_layers, n_heads, n_pos = res.scores.shape[1:]
    assert z.shape == (n_layers * n_heads, n_pos)
    torch.testing.assert_close(z, res.scores[0].reshape(-1, n_pos), atol=0, rtol=0)


def test_concepts_skip_letters_and_common_words():
    words = ["I", "V", "X", "un", "due", "IV", "iv", "three", "Three", "plus", "7", "cat"]
    tok = mechcna.word_level_tokenizer(words)
    model = mechcna.load_model(gpt2_cfg(d_vocab=len(tok)), device="cpu", tokenizer=tok, seed=0)
    found = set(mechcna.concept_tokens(model).values())
    assert found == {"IV", "three", "Three", "plus", "7"}
