"""Arithmetic datasets: answers, teacher forcing, labels, tokenizer styles, policies."""

import dataclasses
from collections import defaultdict
from functools import cache

import pytest
from jaxtyping import TypeCheckError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import mechcna
from mechcna.errors import MechcnaError, TokenizationError
from mechcna.models.tokenizer import prepare_tokenizer
from mechcna.tasks.arithmetic import (
    TEMPLATES,
    ArithmeticCase,
    ArithmeticDataset,
    ArithmeticProblem,
    arithmetic_dataset,
    arithmetic_problems,
    default_tokenizer,
    expand_problem,
    operand_pairs,
)


@cache
def gpt2_like_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on arithmetic text: multi-digit tokens like ' 12'."""
    texts = [p.text + p.separator + p.answer for p in arithmetic_problems(n_pairs=50)] * 3
    texts += [f"{a} {b} {a + b}" for a in range(100) for b in range(0, 100, 7)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tok.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(  # type: ignore[call-arg]
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    prepare_tokenizer(fast, "gpt2-like-test")
    return fast


def _evaluate(op: str, n1: int, n2: int) -> int:
    if op == "/":
        return n1 // n2
    return {"+": n1 + n2, "-": n1 - n2, "*": n1 * n2}[op]


@pytest.fixture(scope="module", params=["word-level", "gpt2-like"])
def tokenizer(request):
    return default_tokenizer() if request.param == "word-level" else gpt2_like_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer) -> ArithmeticDataset:
    return arithmetic_dataset(n_pairs=6, seed=3, tokenizer=tokenizer)


def _groups(ds: ArithmeticDataset) -> dict[tuple, list[ArithmeticCase]]:
    groups = defaultdict(list)
    for c in ds:
        groups[(c.operation, c.digits, c.template, c.n1, c.n2, c.answer)].append(c)
    return groups


def test_answers_are_correct_for_every_operation_and_template(dataset):
    seen = set()
    for (op, digits, template, n1, n2, answer), cases in _groups(dataset).items():
        assert int(answer) == _evaluate(op, n1, n2)
        assert op != "/" or n1 % n2 == 0  # exact division by default
        assert op != "-" or n1 >= n2  # non-negative subtraction by default
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        assert lo <= n1 < 10**digits and lo <= n2 < 10**digits
        expected = TEMPLATES[op][template - 1].format(n1=n1, n2=n2)
        assert cases[0].prompt.rstrip() == expected
        seen.add((op, digits, template))
    assert len(seen) == 4 * 3 * 4


def test_teacher_forced_cases_reconstruct_the_answer(dataset, tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for cases in _groups(dataset).values():
        assert [c.step for c in cases] == list(range(len(cases)))
        assert "".join(c.target for c in cases).strip() == cases[0].answer
        targets = [ids(c.target)[0] for c in cases]
        for k, c in enumerate(cases):
            assert len(ids(c.target)) == 1
            # the prompt is the first prompt plus the answer tokens so far, token for token
            assert ids(c.prompt) == ids(cases[0].prompt) + targets[:k]
        last = cases[-1]
        sep = "" if last.template == 4 else " "
        full = TEMPLATES[last.operation][last.template - 1].format(n1=last.n1, n2=last.n2)
        assert ids(last.prompt) + targets[-1:] == ids(full + sep + last.answer)


def test_gpt2_like_tokenizer_gives_multi_digit_targets():
    tok = gpt2_like_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" 12", add_special_tokens=False)["input_ids"]) == ["Ġ12"]
    ds = arithmetic_dataset("+", 2, n_pairs=20, tokenizer=tok)
    assert any(len(c.target.strip()) > 1 for c in ds)
    assert any(c.target.startswith(" ") for c in ds.filter(template=1, step=0))
    word = arithmetic_dataset("+", 2, n_pairs=20)
    assert all(len(c.target) == 1 for c in word)  # digits split, as in Llama
    assert len(word) > len(ds)


def _kinds(op: str, n1: int, n2: int, tokenizer=None) -> list[str]:
    answer = str(_evaluate(op, n1, n2))
    problem = ArithmeticProblem(op, len(str(n1)), 4, n1, n2, f"{n1}{op}{n2}=", "", answer)
    return [c.kind for c in expand_problem(problem, tokenizer or default_tokenizer())]


@pytest.mark.parametrize(
    ("op", "n1", "n2", "kinds"),
    [
        ("+", 15, 32, ["memorize", "memorize"]),  # 47: 1+3, 5+2
        ("+", 15, 37, ["change-one", "memorize"]),  # 52: 1+3+1 needs the carry
        ("+", 95, 17, ["change-one", "change-one", "memorize"]),  # 112
        ("+", 3, 5, ["memorize"]),
        ("+", 7, 8, ["change-one", "memorize"]),  # 15: the 1 is the carry
        ("-", 47, 15, ["memorize", "memorize"]),  # 32
        ("-", 52, 17, ["change-one", "memorize"]),  # 35: tens borrowed from
        ("-", 305, 264, ["memorize", "memorize"]),  # 41 (hundreds 3-2-1=0 dropped)
        ("-", 402, 157, ["change-one", "change-one", "memorize"]),  # 245
        ("*", 12, 34, ["change-one", "change-one", "memorize"]),  # last token memorize
        ("/", 96, 12, ["memorize"]),
        ("/", 84, 4, ["change-one", "memorize"]),
    ],
)
def test_memorize_and_change_one_labels(op, n1, n2, kinds):
    assert _kinds(op, n1, n2) == kinds


def test_labels_with_multi_digit_tokens():
    tok = gpt2_like_tokenizer()
    # '15+37=52': one token '52' covering a carried column -> change-one.
    assert _kinds("+", 15, 37, tok) == ["change-one"]
    # '17+84=101' splits as '10', '1': both the tens and hundreds columns get a carry.
    assert _kinds("+", 17, 84, tok) == ["change-one", "memorize"]


def test_determinism_under_seed():
    a = arithmetic_dataset(n_pairs=5, seed=11, word_prob=0.5)
    b = arithmetic_dataset(n_pairs=5, seed=11, word_prob=0.5)
    c = arithmetic_dataset(n_pairs=5, seed=12, word_prob=0.5)
    assert a == b and a.prompts == b.prompts
    assert a.prompts != c.prompts


def test_dataset_interface():
    ds = arithmetic_dataset(["+", "*"], [1, 2], n_pairs=4)
    assert isinstance(ds[0], ArithmeticCase)
    assert len(ds.prompts) == len(ds.targets) == len(ds)
    frame = ds.to_frame()
    assert list(frame.columns) == [f.name for f in dataclasses.fields(ArithmeticCase)]
    assert len(frame) == len(ds)
    sub = ds.filter(operation="+", digits=1)
    assert len(sub) and all(c.operation == "+" and c.digits == 1 for c in sub)
    assert len(ds.filter(template=[1, 2])) == len(ds.filter(template=1)) + len(
        ds.filter(template=2)
    )
    assert isinstance(ds[1:3], ArithmeticDataset) and len(ds[1:3]) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.cases = ()  # type: ignore[misc]
    with pytest.raises(MechcnaError, match="unknown labels"):
        ds.filter(colour="red")
    assert mechcna.arithmetic_dataset is arithmetic_dataset


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"operations": "%"}, "unknown operation"),
        ({"digits": 4}, "digits must be"),
        ({"digits": 0}, "digits must be"),
        ({"templates": 5}, "template must be"),
        ({"word_prob": 2.0}, "word_prob"),
        ({"leading_space": "maybe"}, "leading_space"),
        ({"split": "test"}, "split"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    # Literal-typed options are rejected by the runtime type checker under pytest first.
    with pytest.raises((MechcnaError, TypeCheckError), match=match):
        arithmetic_dataset(**{"n_pairs": 2, **kwargs})


def test_number_words():
    ds = arithmetic_dataset("+", 1, 4, n_pairs=None, word_prob=1.0, word_slots="both")
    for c in ds.filter(step=0):
        assert str(c.n1) not in c.prompt.split("=")[0].split()
        assert c.target.isdigit()
    assert (
        "The sum of three and five is" in ds.prompts
        or "three+five=" in {p for p in ds.prompts}
        or any("five" in p for p in ds.prompts)
    )
    either = arithmetic_dataset("+", 1, 4, n_pairs=None, word_prob=1.0, seed=1)
    for c in either.filter(step=0):
        has1 = not c.prompt.startswith(str(c.n1))
        has2 = not c.prompt.split("+")[1].startswith(str(c.n2))
        assert has1 != has2
    two = arithmetic_dataset("+", 2, 4, n_pairs=5, word_prob=1.0, word_slots="both")
    assert all(p.startswith(str(c.n1)) for p, c in zip(two.prompts, two))  # > 20: digits


def test_policies_negative_subtraction_and_floor_division():
    neg = arithmetic_dataset("-", 2, 4, n_pairs=40, nonnegative_subtraction=False)
    negatives = [c for c in neg if c.answer.startswith("-")]
    assert negatives
    first = [c for c in negatives if c.step == 0]
    assert all(c.target == "-" and c.kind == "change-one" for c in first)
    div = arithmetic_dataset("/", 2, 4, n_pairs=40, exact_division=False)
    assert any(c.n1 % c.n2 for c in div)
    assert all(int(c.answer) == c.n1 // c.n2 for c in div)


def test_leading_space_policies():
    tok = gpt2_like_tokenizer()
    auto = arithmetic_dataset("+", 1, 1, n_pairs=3, tokenizer=tok)
    assert all(c.target.startswith(" ") for c in auto.filter(step=0))
    inside = arithmetic_dataset("+", 2, 1, n_pairs=3, leading_space="in_prompt")
    auto_word = arithmetic_dataset("+", 2, 1, n_pairs=3)
    assert inside.targets == auto_word.targets  # word-level: the space is not a token
    # GPT-2 merges the space into the digits: "in_prompt" prompts cannot be re-tokenised
    with pytest.raises(TokenizationError):
        arithmetic_dataset("+", 2, 1, n_pairs=3, tokenizer=tok, leading_space="in_prompt")
    none = arithmetic_dataset("+", 1, 1, n_pairs=3, leading_space="none")
    assert all(c.prompt.endswith("is") for c in none.filter(step=0))


def test_heldout_split_is_disjoint_and_complete():
    kw = {"holdout_fraction": 0.3, "holdout_seed": 5}
    train = set(operand_pairs("+", 1, None, split="train", **kw))
    held = set(operand_pairs("+", 1, None, split="heldout", **kw))
    every = set(operand_pairs("+", 1, None))
    assert train.isdisjoint(held) and train | held == every == {
        (a, b) for a in range(10) for b in range(10)
    }
    assert 10 <= len(held) <= 50
    big = operand_pairs("*", 3, 30, split="heldout", **kw)
    assert len(set(big)) == 30
    assert not set(big) & set(operand_pairs("*", 3, 200, split="train", **kw))


def test_non_single_token_targets_raise():
    # a word-level tokenizer without digit tokens cannot give single-token digit cases
    tok = mechcna.word_level_tokenizer(["The", "sum", "of", "and", "is", "+", "=", "1"])
    with pytest.raises(TokenizationError):
        arithmetic_dataset("+", 1, 4, n_pairs=2, tokenizer=tok)
