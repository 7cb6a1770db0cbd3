"""Ablations scored case by case after a comparison (arithmetic paper, section 4.3): the mask /
keep / random table (Table 5) and the lowest-neuron ablation (Table 6).

:func:`mask_keep_table` runs in three steps that :mod:`mechcna.distributed` reuses to shard the
cases over workers: :func:`mask_keep_plan` draws every neuron set on the caller (the random sets
too, from one generator, so a sharded run draws the very same sets), :func:`mask_keep_correct`
scores each case under each set (independent per case), and :func:`mask_keep_frame` turns the
per-case correctness into the table.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechcna._types import Bool, Float, Int, Tensor
from mechcna.analyses.comparative import NeuronComparison
from mechcna.errors import EmptyInputError, InvalidOptionError, MechcnaError
from mechcna.interventions.edits import NeuronMask, intervene
from mechcna.interventions.positions import prompt_lengths
from mechcna.interventions.prompts import PromptBatch, Prompts, prepare_prompts
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name
from mechcna.models.inputs import index_in, positive_int
from mechcna.models.view import architecture, per_call


def _run_cases(
    model: Model,
    batch: PromptBatch,
    target: Int[Tensor, " prompt"],
    mask: Bool[Tensor, "prompt layer neuron"] | None = None,
    batch_size: int = 64,
    coefficients: bool = False,
) -> tuple[Bool[Tensor, " prompt"], Float[Tensor, "prompt layer neuron"] | None]:
    """Greedy correctness at the scored positions (and coefficients there), under a
    per-prompt neuron mask, in chunks."""
    arch = architecture(model)
    correct, posts = [], []
    for i in range(0, len(batch), batch_size):
        sl = slice(i, i + batch_size)
        tokens, pos = batch.tokens[sl], batch.positions[sl]
        rows = torch.arange(len(tokens), device=tokens.device)
        ivs = [] if mask is None else [NeuronMask(mask[sl].to(tokens.device))]
        store: dict[int, Tensor] = {}
        hooks = []
        if coefficients:
            for l in range(arch.n_layers):

                def keep(act: Tensor, hook, l=l, store=store, rows=rows, pos=pos) -> None:
                    store[l] = act[rows, pos].detach()

                hooks.append((hook_name("post", l), keep))
        with torch.no_grad(), intervene(model, *ivs), prompt_lengths(batch.lengths[sl]):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        correct.append((logits[rows, pos].argmax(-1) == target[sl].to(tokens.device)).cpu())
        if coefficients:
            posts.append(torch.stack([store[l] for l in range(arch.n_layers)], 1).cpu())
    return torch.cat(correct), (torch.cat(posts) if coefficients else None)


def _decrease(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before else float("nan")


def _batch(model: Model, prompts: Prompts, comparison: NeuronComparison) -> PromptBatch:
    batch = prepare_prompts(model, prompts)
    if len(batch) != comparison.n_prompts:
        raise MechcnaError(f"{len(batch)} prompts for a comparison of {comparison.n_prompts}")
    return batch


EXPERIMENTS = ("mask", "keep", "random")


@dataclass(frozen=True)
class MaskKeepPlan:
    """The neuron sets of :func:`mask_keep_table`, drawn once: ``masks[experiment][k]`` is a
    ``(case, layer, neuron)`` mask (``experiment`` in :data:`EXPERIMENTS`); ``coef[k]`` the
    per-case decrease (%) of the top-K neurons' summed absolute coefficients."""

    ks: tuple[int, ...]
    masks: Mapping[str, Mapping[int, Bool[Tensor, "prompt layer neuron"]]]
    coef: Mapping[int, Float[Tensor, " prompt"]]

    def take(self, idx: Sequence[int]) -> "MaskKeepPlan":
        """The plan restricted to the cases ``idx`` (a shard)."""
        sel = torch.as_tensor(list(idx), dtype=torch.long)
        masks = {e: {k: m[sel] for k, m in per_k.items()} for e, per_k in self.masks.items()}
        return MaskKeepPlan(self.ks, masks, {k: c[sel] for k, c in self.coef.items()})


def mask_keep_plan(
    comparison: NeuronComparison,
    *,
    ks: Sequence[int] = (100, 50, 30, 20, 10),
    deep_layers: Iterable[int] | None = None,
    seed: int = 0,
) -> MaskKeepPlan:
    """Every neuron set of :func:`mask_keep_table` (see there for the policies); needs only
    the comparison, so a driver without the model can draw them."""
    n_layers, d_mlp = comparison.scores.shape[1:]
    chosen = comparison.changed_layers if deep_layers is None else deep_layers
    deep = sorted({index_in(l, n_layers, "layer") for l in chosen})
    if not deep:
        raise EmptyInputError("deep_layers is empty")
    for k in ks:
        if positive_int(k, "K") > len(deep) * d_mlp:
            raise InvalidOptionError(
                f"K = {k} is more than the {len(deep) * d_mlp} FFN neurons of the deep layers"
            )
    deep_mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    deep_mask[deep] = True
    candidates = deep_mask.flatten().nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    m = comparison.extras["coefficient"].abs().double()
    m_o = comparison.extras["coefficient_other"].abs().double()
    masks: dict[str, dict[int, Tensor]] = {e: {} for e in EXPERIMENTS}
    coef: dict[int, Tensor] = {}
    for k in ks:
        top = comparison.top_mask(k)
        masks["mask"][k] = top
        masks["keep"][k] = deep_mask[None] & ~top
        rand = torch.zeros_like(top)
        for i in range(len(rand)):
            pick = candidates[torch.randperm(len(candidates), generator=gen)[:k]]
            rand[i].view(-1)[pick] = True
        masks["random"][k] = rand
        before = (m * top).sum((1, 2))
        after = (m_o * top).sum((1, 2))
        coef[k] = 100.0 * (before - after) / before.clamp_min(1e-30)
    return MaskKeepPlan(tuple(ks), masks, coef)


@per_call
def mask_keep_correct(
    model: Model,
    prompts: Prompts,
    targets: Int[Tensor, " prompt"],
    plan: MaskKeepPlan,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, dict[int, Bool[Tensor, " prompt"]]]:
    """Greedy correctness of every case: ``out["base"][0]`` with no ablation, and
    ``out[experiment][k]`` under each set of ``plan`` (cases are independent: any split of
    them gives the same rows)."""
    batch = prepare_prompts(model, prompts)
    if len(batch) != len(targets):
        raise MechcnaError(f"{len(batch)} prompts for {len(targets)} targets")
    out: dict[str, dict[int, Tensor]] = {
        "base": {0: _run_cases(model, batch, targets, None, batch_size)[0]}
    }
    for k in tqdm(plan.ks, desc="mask / keep per K", disable=not progress):
        for e in EXPERIMENTS:
            out.setdefault(e, {})[k] = _run_cases(
                model, batch, targets, plan.masks[e][k], batch_size
            )[0]
    return out


def mask_keep_frame(
    correct: Mapping[str, Mapping[int, Bool[Tensor, " prompt"]]], plan: MaskKeepPlan
) -> pd.DataFrame:
    """The table of :func:`mask_keep_table` from per-case correctness and the plan."""
    acc = float(correct["base"][0].double().mean())
    table: dict[str, dict[str, float]] = {e: {} for e in (*EXPERIMENTS, "coef")}
    for k in plan.ks:
        col = f"top{k}"
        for e in EXPERIMENTS:
            table[e][col] = _decrease(acc, float(correct[e][k].double().mean()))
        table["coef"][col] = float(plan.coef[k].mean())
    frame = pd.DataFrame(table).T
    frame.attrs["original_accuracy"] = acc
    return frame


@per_call
def mask_keep_table(
    model: Model,
    prompts: Prompts,
    comparison: NeuronComparison,
    *,
    ks: Sequence[int] = (100, 50, 30, 20, 10),
    deep_layers: Iterable[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """The paper's Table 5: accuracy decrease (%) when each case's top-K CNA neurons are
    zeroed ("mask"), when every other neuron in ``deep_layers`` is zeroed ("keep"), when K
    random neurons of ``deep_layers`` are zeroed ("random"), and the decrease (%) of the top
    neurons' coefficients from ``M`` to ``M'`` ("coef").

    ``deep_layers`` defaults to the comparison's :attr:`NeuronComparison.changed_layers`:
    from the intervened head's layer up, as the paper does (its layers 17-31 for head 17_22).

    Policies (the paper leaves them open): accuracy is greedy next-token accuracy against the
    comparison's targets over all cases, and the decrease is relative,
    ``(acc_M - acc_intervened) / acc_M``; "coef" is the mean over cases of
    ``(sum |m| - sum |m'|) / sum |m|`` over that case's top-K neurons; the random sets are
    drawn uniformly from ``deep_layers`` with ``seed`` (one set per case and K, drawn on the
    caller by :func:`mask_keep_plan`). Interventions act at every position.
    :func:`mechcna.distributed.mask_keep_table` shards the cases over Ray workers and returns
    the same table.

    Returns:
        One row per experiment (``mask``, ``keep``, ``random``, ``coef``), one column per K.
    """
    _batch(model, prompts, comparison)
    plan = mask_keep_plan(comparison, ks=ks, deep_layers=deep_layers, seed=seed)
    correct = mask_keep_correct(
        model, prompts, comparison.target_ids, plan, batch_size=batch_size, progress=progress
    )
    return mask_keep_frame(correct, plan)


@per_call
def lowest_neuron_decreases(
    model: Model,
    prompts: Prompts,
    comparison: NeuronComparison,
    *,
    ks: Sequence[int] = (100, 50, 30, 20, 10),
    batch_size: int = 64,
) -> dict[int, Float[Tensor, " prompt"]]:
    """Per K and case, the decrease (%) of the summed absolute coefficients of the *other*
    top-K CNA neurons at the scored position when the case's lowest-layer top-K neuron (ties:
    the most important) is zeroed in the original model (the per-case numbers that
    :func:`lowest_neuron_table` averages)."""
    batch = _batch(model, prompts, comparison)
    target = comparison.target_ids
    _, before = _run_cases(model, batch, target, batch_size=batch_size, coefficients=True)
    assert before is not None
    out = {}
    for k in ks:
        top = comparison.top_mask(k)
        lowest = torch.zeros_like(top)
        for i, neurons in enumerate(comparison.top_sets(k)):
            layer = min(l for l, _ in neurons)
            first = next(n for n in neurons if n[0] == layer)  # top_sets is sorted by delta
            lowest[i, first[0], first[1]] = True
        _, after = _run_cases(model, batch, target, lowest, batch_size, coefficients=True)
        assert after is not None
        rest = top & ~lowest
        b = (before.abs().double() * rest).sum((1, 2))
        a = (after.abs().double() * rest).sum((1, 2))
        out[k] = 100.0 * (b - a) / b.clamp_min(1e-30)
    return out


@per_call
def lowest_neuron_table(
    model: Model,
    prompts: Prompts,
    comparison: NeuronComparison,
    *,
    ks: Sequence[int] = (100, 50, 30, 20, 10),
    batch_size: int = 64,
) -> pd.DataFrame:
    """The paper's Table 6 (prediction enhancing): zero each case's lowest-layer top-K CNA
    neuron (ties: the most important) in the original model and report the decrease (%) of
    the summed absolute coefficients of the *other* top-K neurons at the scored position,
    averaged over cases (policy: the ablated neuron is excluded; absolute values, since the
    papers' coefficients can be negative; per case: :func:`lowest_neuron_decreases`)."""
    per_case = lowest_neuron_decreases(model, prompts, comparison, ks=ks, batch_size=batch_size)
    out = {f"top{k}": float(v.mean()) for k, v in per_case.items()}
    return pd.DataFrame({"lowest_neuron_ablation": out}).T
