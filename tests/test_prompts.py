import pytest
import torch

from mechcna import MechcnaError, TokenizationError
from mechcna.interventions.prompts import prepare_prompts, single_token_id, single_token_ids
from tests.helpers import build


def test_right_padding_keeps_activations(kind):
    model = build(kind)
    batch = prepare_prompts(model, ["12+7=", "the sum of 3 and 5 is"])
    assert batch.tokens.shape[0] == 2
    assert batch.positions.tolist() == [int(batch.lengths[0]) - 1, int(batch.lengths[1]) - 1]
    with torch.no_grad():
        padded = model(batch.tokens)
        alone = model(model.to_tokens("12+7="))
    n = int(batch.lengths[0])
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=0)


def test_positions_and_tokens_input():
    model = build("gpt2")
    batch = prepare_prompts(model, torch.tensor([[1, 2, 3, 4]]), position=1)
    assert batch.positions.tolist() == [1]
    assert batch.strings is None
    with pytest.raises(MechcnaError, match="outside a prompt"):
        prepare_prompts(model, "12+7=", position=9)
    with pytest.raises(MechcnaError, match="no prompts"):
        prepare_prompts(model, [])


def test_single_token_targets():
    model = build("gpt2")
    assert model.to_single_str_token(single_token_id(model, "8")) == "8"
    with pytest.raises(TokenizationError, match="not a single token"):
        single_token_id(model, "12")
    with pytest.raises(
        TokenizationError, match=r"not in the model.s vocabulary \(it maps to unk\)"
    ):
        single_token_id(model, "zebra")
    with pytest.raises(TokenizationError, match="outside the vocabulary"):
        single_token_id(model, 10_000)
    assert single_token_ids(model, "8", n=3).tolist() == [single_token_id(model, "8")] * 3
    with pytest.raises(MechcnaError, match="2 targets for 3 prompts"):
        single_token_ids(model, ["8", "9"], n=3)


def test_vocabulary_entry_that_tokenises_apart_is_one_token():
    # Like Llama's "8" (tokenised alone as ["▁", "8"]): the exact vocabulary entry wins.
    from mechcna import load_model, word_level_tokenizer
    from tests.helpers import WORDS, gpt2_cfg

    tok = word_level_tokenizer([*WORDS, "12"])
    model = load_model(gpt2_cfg(d_vocab=len(WORDS) + 5), device="cpu", tokenizer=tok)
    assert len(model.to_tokens("12", prepend_bos=False)[0]) == 2
    assert single_token_id(model, "12") == tok.get_vocab()["12"]
