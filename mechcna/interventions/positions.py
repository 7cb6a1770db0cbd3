"""Which positions an intervention touches: each prompt's real (unpadded) length during a padded
batch, and the masks that turn per-prompt positions into ``[row, pos]`` masks, so a padded batch
equals prompt by prompt.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from mechcna._types import Tensor
from mechcna.errors import (
    MechcnaError,
    PositionError,
)

#: each prompt's real length during a padded batch (set by :func:`prompt_lengths`)
_LENGTHS: ContextVar[Tensor | None] = ContextVar("mechcna_prompt_lengths", default=None)


@contextmanager
def prompt_lengths(lengths: Tensor) -> Iterator[None]:
    """Tell intervention hooks how many real tokens each row of the running batch has.

    Inside the block, intervention ``positions`` index each prompt's own real tokens of a
    right-padded batch (``-1`` is each prompt's last real token, not the last pad column).
    Every analysis that runs padded batches wraps its forward passes in this.
    """
    token = _LENGTHS.set(lengths.detach().reshape(-1).long().cpu())
    try:
        yield
    finally:
        _LENGTHS.reset(token)


def row_lengths(n_rows: int, n_pos: int) -> Tensor:
    """``[batch]`` real lengths of the running batch's prompts (``n_pos`` each when none were
    announced with :func:`prompt_lengths`)."""
    lengths = _LENGTHS.get()
    if lengths is None:
        return torch.full((n_rows,), n_pos, dtype=torch.long)
    if len(lengths) != n_rows:
        raise MechcnaError(
            f"intervention hook saw {n_rows} rows but the batch has {len(lengths)} prompts"
        )
    return lengths


def position_mask(positions: Sequence[int], n_rows: int, n_pos: int, device) -> Tensor:
    """``[batch, pos]`` True at each row's ``positions`` (relative to its real length).

    Raises:
        MechcnaError: a position outside some prompt's real tokens, or a batch that does not
            match the lengths announced with :func:`prompt_lengths`.
    """
    lengths = row_lengths(n_rows, n_pos)
    pos = torch.tensor(positions, dtype=torch.long)
    absolute = torch.where(pos[None] < 0, lengths[:, None] + pos[None], pos[None])
    bad = (absolute < 0) | (absolute >= lengths[:, None])
    if bad.any():
        short = int(lengths[bad.any(1)].min())
        raise PositionError(f"positions {tuple(positions)} fall outside a prompt of {short} tokens")
    mask = torch.zeros(n_rows, n_pos, dtype=torch.bool)
    mask.scatter_(1, absolute.clamp_max(n_pos - 1), True)
    return mask.to(device)
