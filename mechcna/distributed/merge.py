"""Exact merges of sharded results: prompt-sharded :class:`~mechcna.analyses.results.Scores`
concatenated along the prompt axis, and head sweeps reassembled from shards of heads and
cases.
"""

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import pandas as pd
import torch

from mechcna._types import Tensor
from mechcna.errors import MechcnaError


# ------------------------------------------------------------------------------ merging
def _pad_to(t: Tensor, dims: tuple[str, ...], sizes: Mapping[str, int]) -> Tensor:
    """Zero-pad the ``pos`` axes of one shard's tensor to the longest shard's."""
    if "pos" not in dims:
        return t
    axis = dims.index("pos")
    extra = sizes["pos"] - t.shape[axis]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[axis] = extra
    return torch.cat([t, t.new_zeros(shape)], axis)


def merge_scores(parts: Sequence[Any]) -> Any:
    """Concatenate prompt-sharded :class:`~mechcna.analyses.results.Scores` results (same
    class, same model) along the prompt axis into one result of that class.

    Score tensors and per-prompt extras are concatenated; ``pos`` axes (attention neurons,
    by-position heads) are zero-padded to the longest shard (positions past a prompt's scored
    position score 0); :class:`~mechcna.engine.expansion.EngineStats` counters are summed.
    """
    if not parts:
        raise MechcnaError("nothing to merge")
    first = parts[0]
    if any(type(p) is not type(first) or p.dims != first.dims for p in parts):
        raise MechcnaError("only results of one kind and shape can be merged")
    sizes = (
        {"pos": max(p.scores.shape[p.dims.index("pos")] for p in parts)}
        if ("pos" in first.dims)
        else {}
    )
    out: dict[str, Any] = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        v0 = values[0]
        if f.name in ("scores",):
            out[f.name] = torch.cat([_pad_to(v, first.dims, sizes) for v in values])
        elif f.name == "extras":
            out[f.name] = {
                k: torch.cat([_pad_to(v[k], first.dims, sizes) for v in values]) for k in v0
            }
        elif f.name in ("targets",):
            out[f.name] = tuple(x for v in values for x in v)
        elif f.name == "prompts":
            out[f.name] = (
                None if any(v is None for v in values) else tuple(x for v in values for x in v)
            )
        elif isinstance(v0, Tensor):
            out[f.name] = torch.cat(values)
        elif v0 is not None and type(v0).__name__ == "EngineStats":
            out[f.name] = replace(
                v0, **{g.name: sum(getattr(v, g.name) for v in values) for g in fields(v0)}
            )
        else:
            out[f.name] = v0
    return type(first)(**out)


def merge_head_sweeps(grid: Sequence[Sequence[Any]], labels: pd.DataFrame | None = None) -> Any:
    """One :class:`~mechcna.HeadSweep` from ``grid[case_shard][head_shard]`` sweeps.

    Head shards of one case shard are stacked along the ablation axis; case shards are then
    concatenated along the case axis (the baseline comes from each case shard's first sweep).

    Args:
        labels: the labels of all cases in order (default: the shards' labels concatenated).
    """
    if not grid or not all(grid):
        raise MechcnaError("nothing to merge")
    rows = []
    for sweeps in grid:
        rows.append(
            {
                "correct": torch.cat([s.correct for s in sweeps]),
                "logprob": torch.cat([s.logprob for s in sweeps]),
                "prediction": torch.cat([s.prediction for s in sweeps]),
            }
        )
    firsts = [sweeps[0] for sweeps in grid]
    heads = tuple(h for s in grid[0] for h in s.heads)
    means = None
    if firsts[0].means is not None:
        means = {hd: m for s in grid[0] for hd, m in (s.means or {}).items()}
    if labels is None:
        labels = pd.concat([s.labels for s in firsts], ignore_index=True)
    prompts = None
    if all(s.prompts is not None for s in firsts):
        prompts = tuple(p for s in firsts for p in s.prompts)
    return replace(
        firsts[0],
        heads=heads,
        correct=torch.cat([r["correct"] for r in rows], 1),
        logprob=torch.cat([r["logprob"] for r in rows], 1),
        prediction=torch.cat([r["prediction"] for r in rows], 1),
        base_correct=torch.cat([s.base_correct for s in firsts]),
        base_logprob=torch.cat([s.base_logprob for s in firsts]),
        base_prediction=torch.cat([s.base_prediction for s in firsts]),
        targets=torch.cat([s.targets for s in firsts]),
        labels=labels.reset_index(drop=True),
        prompts=prompts,
        means=means,
    )
