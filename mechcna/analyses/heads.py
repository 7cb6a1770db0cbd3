"""Arithmetic heads: ablate every attention head and measure what breaks (ARITH section 3).

Yu & Ananiadou (EMNLP 2024, "Interpreting Arithmetic Mechanism in Large Language Models
through Comparative Neuron Analysis", section 3 and appendix E) find the heads arithmetic
depends on by ablating one head at a time: the head's output ``z`` is set to zero at every
position (equivalently its slice of ``W_O`` is zeroed; the output bias stays), and the model's
accuracy on an arithmetic dataset is compared with the unablated model's (their Tables 1, 2
and 24 to 27). On a single prompt they rank heads by the probability of the model's own top-1
token after ablation (docs/methods.md 6.1).

:func:`head_sweep` reports, for every head, per-case correctness (greedy argmax at the scored
position equals the target) and the target's log-probability, plus the unablated baseline.
:class:`HeadSweep` aggregates them per label cell (operation, digits, template, ...),
ranks heads (:meth:`HeadSweep.top`), builds the paper's tables (:meth:`HeadSweep.table`) and
plots layer x head heatmaps. :func:`single_prompt_head_effects` is the one-prompt ranking.
``mode="mean"`` replaces a head's ``z`` with its mean over reference prompts instead
(:meth:`~mechcna.HeadAblation.mean_over` semantics: over prompts and real positions).

How it is fast (exact; equal to one deep copy per head, see ``tests/test_heads.py``):

* prompts run in right-padded batches sorted by length (causal attention keeps the real
  tokens unaffected by later padding; each prompt is read at its own scored position);
* one clean pass caches ``blocks.{l}.hook_resid_pre``; a head of layer ``l`` cannot change
  anything before layer ``l``, so its ablated pass starts there
  (``model(resid, start_at_layer=l)``; rotary models take positions ``0..T-1`` as in a pass
  from the tokens, since no attention mask is used);
* several heads of one layer share a pass: the batch is repeated once per head and one hook on
  ``blocks.{l}.attn.hook_z`` ablates head ``h_c`` only in copy ``c``;
* after the last block's attention only per-position maps remain, so its MLP, the final
  norm and the unembedding run at the scored positions only (in the clean pass too, so
  ablated and unablated numbers go through the same arithmetic);
* prompts that share their first ``m`` tokens (a few-shot prefix, ``"3+"`` in ``"3+5="``
  and ``"3+6="``) share those positions' computation: in a causal model a position depends
  on its prefix only, so an ablated pass runs each distinct prefix once, keeps its keys and
  values (TransformerLens's own key-value cache interface) and runs every prompt's remaining
  positions against them. ``m`` is chosen per batch to minimise the positions computed
  (``share_prefixes=False`` turns this off).

Example:
    >>> sweep = head_sweep(model, ["3+5=", "12+7="], ["8", "1"])      # doctest: +SKIP
    >>> sweep.top(5)                                                  # doctest: +SKIP
    >>> sweep.table("operation", heads="top")      # Table 1 form      # doctest: +SKIP
    >>> single_prompt_head_effects(model, "3+5=").top(10)             # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH Tables 1-3 and 24-27 (arithmetic heads found by
zero ablation over a dataset).
"""

from collections.abc import Sequence
from typing import Any, Literal

import einops
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from mechcna._types import Int, Tensor
from mechcna.analyses.head_passes import (
    _ablated_from_mid,
    _ablated_pass,
    _can_share_prefixes,
    _final_logits,
    _forward_kwargs,
    _mid_shortcut,
    _prefix_plan,
)
from mechcna.analyses.head_results import Head, HeadEffects, HeadSweep
from mechcna.errors import (
    ComponentIndexError,
    EmptyInputError,
    MechcnaError,
    NonFiniteError,
    PromptTypeError,
    UnsupportedArchitectureError,
)
from mechcna.interventions.edits import HeadAblation
from mechcna.interventions.prompts import (
    PromptBatch,
    check_token_ids,
    prepare_prompts,
    single_token_ids,
)
from mechcna.models.backend import Model
from mechcna.models.check import refuse_non_finite
from mechcna.models.hooks import hook_name
from mechcna.models.inputs import check_prompt_list, index_in, pair, warn_user_hooks
from mechcna.models.processing import VALUE_BIAS, get_processing, require_unprocessed
from mechcna.models.view import per_call

TokenPrompts = str | Sequence[str] | Tensor | Sequence[Tensor] | Sequence[Sequence[int]]
Targets = str | int | Sequence[str | int] | Tensor | None


# ------------------------------------------------------------------------------------ inputs
def _check_heads(model: Model, heads: Sequence[Head] | None) -> tuple[Head, ...]:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if heads is None:
        return tuple((l, h) for l in range(n_layers) for h in range(n_heads))
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise ComponentIndexError(f"heads must be a list of (layer, head) pairs, not {heads!r}")
    out: list[Head] = []
    for item in heads:
        a, b = pair(item, "a (layer, head) pair")
        l, h = index_in(a, n_layers, "layer"), index_in(b, n_heads, "head")
        if (l, h) not in out:
            out.append((l, h))
    if not out:
        raise EmptyInputError("no heads to ablate")
    return tuple(out)


def _tokenize(model: Model, prompts: TokenPrompts, position: int | None) -> PromptBatch:
    """Like :func:`prepare_prompts`, also accepting a list of unequal-length token rows."""
    if isinstance(prompts, (str, Tensor)) or (
        len(prompts) > 0 and all(isinstance(p, str) for p in prompts)
    ):
        return prepare_prompts(model, prompts, position)  # type: ignore[arg-type]
    if len(prompts) == 0:
        raise EmptyInputError("no prompts given")
    if any(isinstance(p, str) for p in prompts):
        check_prompt_list(prompts)  # names the first non-string
    try:
        rows = [torch.as_tensor(p).reshape(-1) for p in prompts]
    except (TypeError, ValueError, RuntimeError):
        raise PromptTypeError("prompts must be strings or rows of integer token ids") from None
    if any(len(r) == 0 or r.dtype.is_floating_point or r.dtype == torch.bool for r in rows):
        raise PromptTypeError("token prompts must be non-empty integer ids")
    for r in rows:
        check_token_ids(model, r)
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows], device=model.W_U.device)
    pos = -1 if position is None else int(position)
    positions = lengths + pos if pos < 0 else torch.full_like(lengths, pos)
    if (positions < 0).any() or (positions >= lengths).any():
        raise MechcnaError(f"position {pos} is outside a prompt of {int(lengths.min())} tokens")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise MechcnaError(f"prompts of {tokens.shape[1]} tokens exceed n_ctx {model.cfg.n_ctx}")
    return PromptBatch(tokens.to(model.W_U.device), lengths, positions, None)


def _unpack(data: Any, targets: Targets, labels: pd.DataFrame | None):
    """(prompts, targets, labels frame or None) from a dataset object or plain prompts."""
    if all(hasattr(data, a) for a in ("prompts", "targets", "to_frame")) and not isinstance(
        data, (str, Tensor)
    ):
        if targets is not None or labels is not None:
            raise MechcnaError("a dataset brings its own targets and labels: pass neither")
        prompts, targets, labels = list(data.prompts), list(data.targets), data.to_frame()
        return prompts, targets, labels
    if isinstance(data, str):
        data = [data]
    return data, targets, labels


def _target_ids(model: Model, targets: Targets, n: int) -> Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, Tensor):
        ids = targets.reshape(-1).long().to(model.W_U.device)
        if len(ids) == 1:
            ids = ids.expand(n)
        if len(ids) != n:
            raise MechcnaError(f"{len(ids)} targets for {n} prompts")
        if ((ids < 0) | (ids >= model.cfg.d_vocab_out)).any():
            raise MechcnaError("target id outside the vocabulary")
        return ids
    if not isinstance(targets, (str, int)) and len(targets) != n:
        raise MechcnaError(f"{len(targets)} targets for {n} prompts")
    return single_token_ids(model, targets, n)


def _batches(batch: PromptBatch, batch_size: int) -> list[Tensor]:
    """Case indices per batch, sorted by length so batches carry little padding."""
    order = torch.argsort(batch.positions.cpu(), stable=True)
    return list(order.split(batch_size))


def _head_means(
    model: Model,
    heads: Sequence[Head],
    reference: PromptBatch,
    batch_size: int,
) -> dict[Head, Tensor]:
    """Mean ``z`` of each head over the reference prompts' real tokens (padding excluded)."""
    layers = sorted({l for l, _ in heads})
    names = {hook_name("z", l): l for l in layers}
    sums = {
        l: torch.zeros(model.cfg.n_heads, model.cfg.d_head, dtype=torch.float64) for l in layers
    }
    count = 0
    for idx in _batches(reference, batch_size):
        idx = idx.to(reference.tokens.device)
        length = reference.lengths[idx]
        tokens = reference.tokens[idx, : int(length.max())]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < length[:, None]
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda n: n in names, **_forward_kwargs(model)
        )
        for name, l in names.items():
            z = cache[name].double()
            w = mask.to(z)
            sums[l] += einops.einsum(z, w, "batch pos head d_head, batch pos -> head d_head").cpu()
        count += int(mask.sum())
    dtype, device = model.W_U.dtype, model.W_U.device
    return {(l, h): (sums[l][h] / count).to(device, dtype) for l, h in heads}


@per_call
def head_sweep(
    model: Model,
    data: Any,
    targets: Targets = None,
    *,
    labels: pd.DataFrame | None = None,
    heads: Sequence[Head] | None = None,
    mode: Literal["zero", "mean"] = "zero",
    reference: HeadAblation | TokenPrompts | None = None,
    position: int | None = None,
    batch_size: int = 64,
    heads_per_pass: int = 8,
    share_prefixes: bool = True,
    progress: bool = True,
) -> "HeadSweep":
    """Ablate each head in turn over a dataset; per-case correctness and target log-probs.

    Args:
        model: the model (left unchanged; hooks are scoped to each pass).
        data: a dataset object with ``.prompts``, ``.targets`` and ``.to_frame()`` (labels
            such as ``operation``, ``digits``, ``template``, ``kind``), or prompts: a string,
            a list of strings, ``[batch, pos]`` token ids or a list of token-id rows.
        targets: with plain prompts, one target per prompt (single-token strings or ids) or
            one for all; ``None`` uses the unablated model's own top-1 token per prompt.
        labels: with plain prompts, an optional frame of per-case labels (one row per prompt).
        heads: the ``(layer, head)`` pairs to ablate (default: all, layer-major).
        mode: ``"zero"`` sets the head's ``z`` to zero at every position (the papers' code);
            ``"mean"`` sets it to its mean over ``reference``.
        reference: mean mode only: a mean-mode :class:`HeadAblation` holding the means (e.g.
            from :meth:`HeadAblation.mean_over`), or reference prompts (default: ``data``'s),
            averaged over prompts and real positions.
        position: the scored position within each prompt's real tokens (default: the last).
        batch_size: prompts per pass.
        heads_per_pass: heads of one layer ablated side by side in a pass (each in its own
            copy of the batch); a pass holds ``batch_size * heads_per_pass`` rows. The
            defaults (128 rows) suit a CPU; raise both on a GPU.
        share_prefixes: run the leading tokens that prompts of a batch share once per
            ablation (exact; see the module notes). Used on HookedTransformer models with
            pre-norm blocks and standard or rotary positions; other models run in full.
        progress: show a progress bar.

    Returns:
        A :class:`HeadSweep` with ``[ablation, case]`` correctness, log-probs (natural log)
        and predictions, and the unablated baseline.

    Raises:
        MechcnaError: a head out of range, a target that is not one token, lengths that do
            not match, or mean mode without usable means.
    """
    if mode not in ("zero", "mean"):
        raise MechcnaError(f"mode must be 'zero' or 'mean', not {mode!r}")
    if batch_size < 1 or heads_per_pass < 1:
        raise MechcnaError("batch_size and heads_per_pass must be positive")
    if model.cfg.positional_embedding_type == "shortformer":
        raise UnsupportedArchitectureError("shortformer positional embeddings")
    if mode == "zero":
        require_unprocessed(model, "head_sweep(mode='zero')", VALUE_BIAS)
    warn_user_hooks(model)
    prompts, targets, labels = _unpack(data, targets, labels)
    heads_t = _check_heads(model, heads)
    batch = _tokenize(model, prompts, position)
    n = len(batch)
    target_ids = _target_ids(model, targets, n)
    if labels is not None:
        if len(labels) != n:
            raise MechcnaError(f"{len(labels)} label rows for {n} prompts")
        labels = labels.reset_index(drop=True)
    else:
        labels = pd.DataFrame(index=range(n))

    means: dict[Head, Tensor] | None = None
    if mode == "mean":
        if isinstance(reference, HeadAblation):
            if reference.mode != "mean" or reference.means is None:
                raise MechcnaError("reference must be a mean-mode HeadAblation (mean_over)")
            missing = [hd for hd in heads_t if hd not in reference.means]
            if missing:
                raise MechcnaError(f"reference has no means for heads {missing}")
            means = {hd: reference.means[hd] for hd in heads_t}
        else:
            ref = batch if reference is None else _tokenize(model, reference, None)
            means = _head_means(model, heads_t, ref, batch_size)
    elif reference is not None:
        raise MechcnaError("reference is for mode='mean' only")

    by_layer: dict[int, list[int]] = {}
    for l, h in heads_t:
        by_layer.setdefault(l, []).append(h)
    row_of = {hd: i for i, hd in enumerate(heads_t)}
    dtype = model.W_U.dtype
    logprob = torch.empty(len(heads_t), n, dtype=dtype)
    prediction = torch.empty(len(heads_t), n, dtype=torch.long)
    base_logprob = torch.empty(n, dtype=dtype)
    base_prediction = torch.empty(n, dtype=torch.long)
    targets_out = torch.empty(n, dtype=torch.long)

    batches = _batches(batch, batch_size)
    chunks = [
        (l, hs[i : i + heads_per_pass])
        for l, hs in by_layer.items()
        for i in range(0, len(hs), heads_per_pass)
    ]
    shortcut = _mid_shortcut(model)
    share = share_prefixes and shortcut and _can_share_prefixes(model)
    kinds = ("resid_mid", "z") if shortcut else ("resid_pre",)
    names = {hook_name(kind, l) for l in by_layer for kind in kinds}
    bar = tqdm(total=len(batches) * len(chunks), desc="head sweep", disable=not progress)
    cache: dict[str, Tensor] = {}

    def store(act: Tensor, hook: HookPoint) -> Tensor:
        cache[str(hook.name)] = act
        return act

    with torch.no_grad():
        for idx_cpu in batches:
            idx = idx_cpu.to(batch.tokens.device)
            pos = batch.positions[idx]
            tokens = batch.tokens[idx, : int(pos.max()) + 1]
            cache.clear()
            base = _final_logits(
                model, tokens, pos, fwd_hooks=[(name, store) for name in names]
            ).log_softmax(-1)
            if not bool(torch.isfinite(base).all()):
                refuse_non_finite(model, tokens, "the unablated log-probability")
            rows = torch.arange(len(idx), device=base.device)
            tgt = base.argmax(-1) if target_ids is None else target_ids[idx]
            base_logprob[idx_cpu] = base[rows, tgt].cpu()
            base_prediction[idx_cpu] = base.argmax(-1).cpu()
            targets_out[idx_cpu] = tgt.cpu()
            plan = _prefix_plan(tokens, pos) if share else None
            for layer, hs in chunks:
                fill = None if means is None else torch.stack([means[(layer, h)] for h in hs])
                if shortcut:
                    mid, z = cache[hook_name("resid_mid", layer)], cache[hook_name("z", layer)]
                    lp = _ablated_from_mid(model, mid, z, pos, layer, hs, fill, plan)
                else:
                    resid = cache[hook_name("resid_pre", layer)]
                    lp = _ablated_pass(model, resid, pos, layer, hs, fill)
                lp = lp.log_softmax(-1)
                if not bool(torch.isfinite(lp).all()):
                    raise NonFiniteError(
                        f"layer {layer}: ablating heads {hs} gives NaN or infinite log-probs"
                    )
                lp = einops.rearrange(
                    lp, "(copy batch) d_vocab -> copy batch d_vocab", copy=len(hs)
                )
                out_rows = torch.tensor([row_of[(layer, h)] for h in hs])
                picked = lp.gather(-1, einops.repeat(tgt, "batch -> copy batch 1", copy=len(hs)))
                logprob[out_rows[:, None], idx_cpu[None]] = picked[..., 0].cpu()
                prediction[out_rows[:, None], idx_cpu[None]] = lp.argmax(-1).cpu()
                bar.update()
    bar.close()
    return HeadSweep(
        heads=heads_t,
        correct=prediction == targets_out[None],
        logprob=logprob,
        prediction=prediction,
        base_correct=base_prediction == targets_out,
        base_logprob=base_logprob,
        base_prediction=base_prediction,
        targets=targets_out,
        labels=labels,
        n_layers=model.cfg.n_layers,
        n_heads=model.cfg.n_heads,
        mode=mode,
        prompts=batch.strings,
        model_name=str(model.cfg.model_name),
        means=means,
        processing=get_processing(model),
    )


# --------------------------------------------------------------------- single prompt
@per_call
def single_prompt_head_effects(
    model: Model,
    prompt: str | Int[Tensor, " pos"],
    target: str | int | None = None,
    *,
    heads: Sequence[Head] | None = None,
    mode: Literal["zero", "mean"] = "zero",
    reference: HeadAblation | TokenPrompts | None = None,
    heads_per_pass: int = 64,
    progress: bool = False,
) -> HeadEffects:
    """Ablate each head on one prompt and record the target's probability (docs/methods.md 6.1).

    Args:
        model: the model.
        prompt: a string or 1-D token ids.
        target: a single-token string or id; default the unablated model's top-1 token.
        heads: the heads to ablate (default: all).
        mode: ``"zero"`` (default) or ``"mean"`` (means over ``reference``).
        reference: see :func:`head_sweep`.
        heads_per_pass: heads ablated side by side in one pass.
        progress: show a progress bar.
    """
    if mode == "mean" and reference is None:
        raise MechcnaError("mean mode on one prompt needs reference prompts or means")
    data = prompt if isinstance(prompt, str) else [prompt]
    sweep = head_sweep(
        model,
        data,
        None if target is None else [target],
        heads=heads,
        mode=mode,
        reference=reference,
        batch_size=1,
        heads_per_pass=heads_per_pass,
        progress=progress,
    )
    tid = int(sweep.targets[0])
    tok = model.tokenizer
    return HeadEffects(
        heads=sweep.heads,
        logprob=sweep.logprob[:, 0],
        base_logprob=float(sweep.base_logprob[0]),
        target=tid,
        target_str=None if tok is None else model.to_single_str_token(tid),
        prompt=prompt if isinstance(prompt, str) else None,
        n_layers=sweep.n_layers,
        n_heads=sweep.n_heads,
        processing=sweep.processing,
    )
