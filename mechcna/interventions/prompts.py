"""Turning prompts and targets into tokens: padding, scored positions, single-token targets.

Every analysis takes prompts as strings or tokens. Batches are **right-padded**: with causal
attention, padding after a prompt never changes the activations of its real tokens, so each
prompt is scored at its own last real position (or a chosen one) with no attention mask.

Example:
    >>> batch = prepare_prompts(model, ["3+5=", "12+7="])      # doctest: +SKIP
    >>> batch.positions                                          # last real token per prompt
    >>> single_token_ids(model, ["8", "1"])                      # doctest: +SKIP
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechcna._types import Int, Tensor
from mechcna.errors import (
    EmptyPromptError,
    MechcnaError,
    PromptTypeError,
    TokenIdError,
    TokenizationError,
    UnknownTokenError,
)
from mechcna.models.backend import Model
from mechcna.models.inputs import check_prompt_list

Prompts = str | Sequence[str] | Tensor


@dataclass(frozen=True)
class PromptBatch:
    """Right-padded tokens and the position scored in each prompt.

    Attributes:
        tokens: ``[batch, pos]`` token ids, right-padded.
        lengths: number of real tokens per prompt.
        positions: the scored position per prompt (default: the last real token).
        strings: the prompts as given, when they were strings.
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"]
    strings: tuple[str, ...] | None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def batch_index(self) -> Int[Tensor, " batch"]:
        return torch.arange(len(self), device=self.tokens.device)


def prepare_prompts(
    model: Model,
    prompts: Prompts,
    position: int | None = None,
    prepend_bos: bool | None = None,
) -> PromptBatch:
    """Tokenise (or take) prompts, right-padded, and find the scored position in each.

    Args:
        model: the model whose tokenizer to use.
        prompts: a string, a list of strings, or ``[batch, pos]`` / ``[pos]`` token ids (token
            ids are taken as they are, unpadded).
        position: the position to score, indexing each prompt's real tokens (``-1``, the
            default, is the last one; ``0`` the first).
        prepend_bos: overrides the model's default BOS policy for strings.

    Raises:
        MechcnaError: empty prompts, or a position outside a prompt.
    """
    device = model.W_U.device
    if isinstance(prompts, Tensor):
        tokens = prompts.to(device)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise MechcnaError(f"token prompts must be [batch, pos], got {tuple(prompts.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise PromptTypeError("token prompts must be integer ids")
        check_token_ids(model, tokens)
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=device)
        strings = None
    else:
        strings = check_prompt_list(prompts)
        if model.tokenizer is None:
            raise TokenizationError("the model has no tokenizer: pass token ids instead")
        for i, s in enumerate(strings):
            if not s.strip():
                raise EmptyPromptError(f"prompt {i} is empty ({s!r})")
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        rows = [model.to_tokens(s, prepend_bos=bos, truncate=False)[0] for s in strings]
        if any(len(r) == 0 for r in rows):
            raise EmptyPromptError("a prompt tokenises to no tokens")
        for s, r in zip(strings, rows, strict=True):
            _refuse_unknown(model, s, r)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        pad = int(model.tokenizer.pad_token_id or 0)  # type: ignore[arg-type]
        tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    if tokens.shape[1] > model.cfg.n_ctx:
        raise MechcnaError(f"prompts of {tokens.shape[1]} tokens exceed n_ctx {model.cfg.n_ctx}")
    pos = -1 if position is None else int(position)
    positions = torch.where(torch.tensor(pos < 0, device=device), lengths + pos, pos + 0 * lengths)
    if (positions < 0).any() or (positions >= lengths).any():
        raise MechcnaError(f"position {pos} is outside a prompt of {int(lengths.min())} tokens")
    return PromptBatch(tokens, lengths, positions, strings)


def check_token_ids(model: Model, tokens: Tensor) -> None:
    """Raise :class:`TokenIdError` for ids outside ``0 .. d_vocab - 1``."""
    d_vocab = model.cfg.d_vocab
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        raise TokenIdError(
            f"token id {int(tokens[bad][0])} is outside the vocabulary of {d_vocab} tokens"
        )


def prompt_is_readable(model: Model, prompt: str) -> bool:
    """Whether every word of ``prompt`` is in the vocabulary (no unknown token appears unless the
    prompt spells it): datasets written for many models use this to drop, not score, prompts a
    word-level model cannot read."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if tok is None or unk is None:
        return True
    if tok.unk_token and str(tok.unk_token) in prompt:
        return True
    return unk not in tok(prompt, add_special_tokens=False)["input_ids"]


def _refuse_unknown(model: Model, prompt: str, row: Tensor) -> None:
    """A word the vocabulary lacks becomes the unknown token and would be scored silently."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or tok is None or not bool((row == unk).any()):
        return
    if tok.unk_token and str(tok.unk_token) in prompt:
        return  # the prompt spells the unknown token itself
    ids = [int(i) for i in row if int(i) != unk]
    words = [w for w in prompt.split() if unk in tok(w, add_special_tokens=False)["input_ids"]]
    named = f"{', '.join(map(repr, words))} " if words else ""
    raise UnknownTokenError(
        f"prompt {prompt!r} has words outside the vocabulary: {named}(they map to "
        f"{tok.unk_token!r}); known tokens were {model.to_str_tokens(torch.tensor(ids))}"
    )


def single_token_id(model: Model, target: str | int, what: str = "target") -> int:
    """The id of a target given as one token's string or id.

    ``what`` names the argument in errors (``"target"``, ``"token"``, ``"profession"``).

    Raises:
        TokenizationError: the string is not exactly one token, or the id is out of range.
    """
    d_vocab = model.cfg.d_vocab_out
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (str, int, np.integer)):
        raise TokenizationError(
            f"a {what} is a token string or an integer token id, not {target!r} "
            f"({type(target).__name__})"
        )
    if isinstance(target, (int, np.integer)):
        target = int(target)
        if not 0 <= target < d_vocab:
            raise TokenizationError(f"{what} id {target} outside the vocabulary of {d_vocab}")
        return target
    if model.tokenizer is None:
        raise TokenizationError(f"the model has no tokenizer: give the {what} as a token id")
    ids = model.to_tokens(target, prepend_bos=False, truncate=False)[0]
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if len(ids) == 1 and (int(ids[0]) != unk or target == model.tokenizer.unk_token):
        return int(ids[0])
    # A string that is itself a vocabulary entry (e.g. Llama's "8", which tokenises on its
    # own as ["▁", "8"]) is that token.
    vocab_id = model.tokenizer.get_vocab().get(target)
    if vocab_id is not None:
        return int(vocab_id)
    if len(ids) == 1:
        raise TokenizationError(
            f"{what} {target!r} is not in the model's vocabulary (it maps to unk)"
        )
    # the ids, not the string: TransformerLens 3's to_str_tokens(str) fails on Gemma tokenizers
    pieces = model.to_str_tokens(ids)
    raise TokenizationError(f"{what} {target!r} is {len(ids)} tokens {pieces}, not a single token")


def single_token_ids(
    model: Model,
    targets: str | int | Sequence[str | int] | Tensor,
    n: int | None = None,
) -> Int[Tensor, " batch"]:
    """Target ids for a batch: one target for all prompts, or one per prompt.

    Args:
        targets: a token string or id, or a sequence of them.
        n: the batch size a single target is broadcast to (and a sequence must match).
    """
    if isinstance(targets, Tensor):
        if targets.dtype.is_floating_point or targets.ndim > 1:
            raise MechcnaError("target ids must be a 1-d integer tensor")
        targets = [int(t) for t in targets.reshape(-1)]
    if isinstance(targets, (str, int, float, np.generic)):  # one target (checked there)
        ids = [single_token_id(model, targets)] * (n or 1)  # type: ignore[arg-type]
    else:
        seen: dict[str | int, int] = {}
        ids = []
        for t in targets:  # each distinct target is tokenised once
            if t not in seen:
                seen[t] = single_token_id(model, t)
            ids.append(seen[t])
        if n is not None and len(ids) != n:
            raise MechcnaError(f"{len(ids)} targets for {n} prompts")
    return torch.tensor(ids, device=model.W_U.device)
