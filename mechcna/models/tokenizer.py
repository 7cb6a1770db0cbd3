"""Offline tokenizers: a small word-level tokenizer and loading of ``tokenizer.json`` files.

TransformerLens re-loads tokenizers by ``name_or_path`` to get a BOS-prepending copy, which
fails offline for in-memory tokenizers. :func:`prepare_tokenizer` records a name and marks the
tokenizer so TransformerLens uses it as it is (it prepends BOS itself when asked to).

Example:
    >>> tok = word_level_tokenizer(["the", "sum", "of", "and", "is", "+", "="] + list("0123456789"))
    >>> tok.convert_ids_to_tokens(tok("12+3=")["input_ids"])
    ['1', '2', '+', '3', '=']
"""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mechcna.errors import ModelNotFoundError

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}

# Digits and operator symbols are always split into single tokens (as Llama does for digits).
_ISOLATED = r"\d|[+\-*/=?:.,']"


def word_level_tokenizer(
    words: Sequence[str], name: str = "mechcna-word-level"
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer: whitespace-separated words, digits and operators split.

    Args:
        words: the vocabulary (special tokens ``<pad> <bos> <eos> <unk>`` are added first).
        name: recorded as the tokenizer's ``name_or_path``.

    Returns:
        A fast tokenizer that does not add BOS itself (TransformerLens prepends it).
    """
    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS.values(), *words]:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[assignment]
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_ISOLATED), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # type: ignore[assignment]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    prepare_tokenizer(fast, name)
    return fast


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Make an offline tokenizer usable by TransformerLens (records a name, no hub reload)."""
    tokenizer.init_kwargs.update(name_or_path=name, add_bos_token=True)
    return tokenizer


def load_tokenizer(path: str | Path, name: str | None = None) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` file (or a folder containing one) offline.

    Raises:
        ModelNotFoundError: when no ``tokenizer.json`` is found.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ModelNotFoundError(f"no tokenizer.json at {p}")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(p), **SPECIAL_TOKENS)
    prepare_tokenizer(fast, name or p.parent.name)
    return fast


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding text with ``tokenizer`` itself puts its BOS token first.

    This is what the model's Hugging Face tokenizer does (``add_bos_token`` and its
    post-processor): Llama-2 adds ``<s>``, GPT-2 and SmolLM2 add nothing. Checked by encoding,
    not by reading flags, so tokenizers whose flags and behaviour disagree are judged by what
    they do.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos
