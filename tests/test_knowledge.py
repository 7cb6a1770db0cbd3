"""The knowledge prompts and the attribution paper's filter, against a slow reference."""

import pytest
import torch

from mechcna.errors import MechcnaError
from mechcna.tasks.knowledge import (
    KNOWLEDGE_TYPES,
    KnowledgeDataset,
    KnowledgePrompt,
    filter_knowledge,
    knowledge_prompts,
)
from tests.helpers import build


def test_prompts_cover_six_types_with_tens_each():
    data = knowledge_prompts()
    counts = {t: data.types.count(t) for t in KNOWLEDGE_TYPES}
    assert set(counts) == set(KNOWLEDGE_TYPES)
    assert all(n >= 30 for n in counts.values()), counts
    assert all(a.startswith(" ") and a.strip() for a in data.answers)
    assert len(set(data.prompts)) == len(data)  # no duplicate prompt
    assert knowledge_prompts("month").types == ["month"] * counts["month"]
    assert data.head(2).types.count("capital") == 2
    with pytest.raises(MechcnaError, match="unknown knowledge types"):
        knowledge_prompts(["colour"])


def _reference(model, data: KnowledgeDataset, top_k: int) -> list[bool]:
    """One prompt at a time: rank of the answer and whether it beats its type's answers."""
    vocab = model.tokenizer.get_vocab()
    out = []
    for item in data:
        answer = vocab.get(item.answer.strip())
        if answer is None:
            out.append(False)
            continue
        logits = model(model.to_tokens(item.prompt))[0, -1]
        rivals = {vocab[p.answer.strip()] for p in data if p.type == item.type} - {answer}
        rank = int((logits > logits[answer]).sum()) + 1
        out.append(rank <= top_k and all(logits[answer] > logits[r] for r in rivals))
    return out


@pytest.mark.parametrize("top_k", [1, 3, 200])
def test_filter_matches_reference(kind, top_k):
    model = build(kind)
    words = ["basketball", "nurse", "driver", "man", "woman", "sport", "3", "5", "8"]
    prompts = ["Tim Duncan plays the sport of", "a man works as a", "the sum of 3 and 5 is"]
    items = [
        KnowledgePrompt(p, " " + w, "color" if i % 2 else "number")
        for i, (p, w) in enumerate((p, w) for p in prompts for w in words)
    ]
    items.append(KnowledgePrompt("the sum of", " zebra", "month"))  # not in the vocabulary
    data = KnowledgeDataset(tuple(items))
    with torch.no_grad():
        result = filter_knowledge(model, data, top_k=top_k, batch_size=5)
        expected = _reference(model, data, top_k)
    assert result.frame["kept"].tolist() == expected
    assert [p.prompt for p in result.kept] == [p.prompt for p, k in zip(data, expected) if k]
    frame = result.frame
    assert frame.iloc[-1]["reason"] == "answer is not a single token"
    if top_k == 1:  # top-1 answers are kept, and they beat their type by definition
        assert (frame[frame["kept"]]["rank"] == 1).all()
        top1 = frame[frame["rank"] == 1]
        assert top1["kept"].all()
    if top_k == 200:  # any rank passes: only the type rule decides
        assert frame["kept"].tolist() == frame["beats_type"].tolist()
    table = result.survivors()
    assert table["kept"].sum() == len(result.kept)
    assert table.set_index("type").loc["month", "single_token"] == 0


def test_filter_rejects_bad_arguments():
    model = build("gpt2")
    with pytest.raises(MechcnaError, match="positive"):
        filter_knowledge(model, knowledge_prompts("month"), top_k=0)


def test_filter_on_real_vocabulary_keeps_none_for_word_model():
    """The shipped word-level model has no capitals or languages in its vocabulary."""
    import mechcna

    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    with torch.no_grad():
        result = filter_knowledge(model, knowledge_prompts(["capital", "language"]))
    table = result.survivors()
    assert table["kept"].sum() == 0 and table["single_token"].sum() == 0
    assert len(result.kept) == 0
