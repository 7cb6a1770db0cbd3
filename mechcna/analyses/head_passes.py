"""The forward passes of a head sweep: ablated passes that start at the ablated layer, and
exact shared-prompt-prefix passes through TransformerLens's key-value cache.

:func:`~mechcna.analyses.heads.head_sweep` plans its batches and calls these. Every path is
exact: a pass started at the ablated layer from the stored residual, or a batch whose shared
prefix ran once with its keys and values fed to each later block, equals a full forward
pass with the head zeroed (tested against one deep copy per head, fp64 to 1e-10).
"""

from collections.abc import Callable, Sequence
from typing import Any, cast

import einops
import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import apply_softcap

from mechcna._types import Float, Int, Tensor
from mechcna.models import backend
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name


def _forward_kwargs(model: Model) -> dict[str, Any]:
    # Right padding and no attention mask, whatever the tokenizer's default padding side,
    # so passes from the tokens and from a cached residual see the same positions.
    return {"padding_side": "right"} if model.tokenizer is not None else {}


# ------------------------------------------------------------------------------ the sweep
def _final_logits(
    model: Model,
    inputs: Tensor,
    positions: Int[Tensor, " batch"],
    start_at_layer: int | None = None,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> Float[Tensor, "batch d_vocab"]:
    """Final logits at each row's scored position.

    After the last block's attention only per-position maps remain (its MLP, the final norm,
    the unembedding), so a hook on the last ``hook_resid_mid`` keeps just the scored position
    of each row; blocks without ``resid_mid`` (parallel attention/MLP) run in full.
    """
    rows = torch.arange(len(positions), device=positions.device)
    shrunk: list[bool] = []

    def keep_scored(resid_mid: Tensor, hook: HookPoint) -> Tensor:
        shrunk.append(True)
        return resid_mid[rows, positions][:, None]

    last_mid = hook_name("resid_mid", model.cfg.n_layers - 1)
    hooks = [*fwd_hooks]
    # attention-only and parallel blocks have none; on a bridge it may not be writable
    if last_mid in model.hook_dict and backend.hook_writable(model, last_mid):
        hooks.append((last_mid, keep_scored))
    with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
        if start_at_layer is None:
            final = backend.forward(
                model, inputs, stop_at_layer=model.cfg.n_layers, **_forward_kwargs(model)
            )
        else:
            final = backend.forward(
                model, inputs, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers
            )
    x = final if shrunk else final[rows, positions][:, None]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = model.unembed(x)[:, 0]
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _ablated_pass(
    model: Model,
    resid: Float[Tensor, "batch pos d_model"],
    positions: Int[Tensor, " batch"],
    layer: int,
    heads: list[int],
    fill: Tensor | None,
) -> Float[Tensor, "copy_batch d_vocab"]:
    """Final logits with head ``heads[c]`` of ``layer`` ablated in copy ``c`` of the batch."""
    k, n = len(heads), resid.shape[0]
    x = einops.repeat(resid, "batch pos d_model -> (copy batch) pos d_model", copy=k)
    rows = torch.arange(k * n, device=resid.device)
    head_idx = einops.repeat(
        torch.tensor(heads, device=resid.device), "copy -> (copy batch)", batch=n
    )
    if fill is None:
        value = torch.zeros((), dtype=resid.dtype, device=resid.device)
    else:
        value = einops.repeat(fill.to(resid), "copy d_head -> (copy batch) 1 d_head", batch=n)

    def ablate(z: Tensor, hook: HookPoint) -> Tensor:
        z[rows, :, head_idx] = value
        return z

    hooks = [(hook_name("z", layer), ablate)]
    return _final_logits(model, x, positions.repeat(k), start_at_layer=layer, fwd_hooks=hooks)


def _mid_shortcut(model: Model) -> bool:
    """Whether an ablated pass may start from the clean ``resid_mid`` of the ablated layer.

    In a standard pre-norm block the other heads of the ablated layer are unchanged, so the
    ablated ``resid_mid`` is the clean one minus ``(z_h - fill) @ W_O[h]`` and the layer's
    attention need not be rerun.
    """
    return backend.standard_prenorm(model)


def _ablated_mid(
    model: Model,
    resid_mid: Float[Tensor, "batch pos d_model"],
    z: Float[Tensor, "batch pos head_index d_head"],
    layer: int,
    heads: list[int],
    fill: Tensor | None,
) -> Float[Tensor, "copy_batch pos d_model"]:
    """The clean ``resid_mid`` of ``layer`` with head ``heads[c]``'s output replaced by
    ``fill`` (zero by default) in copy ``c``: minus ``(z_h - fill) @ W_O[h]``."""
    idx = torch.tensor(heads, device=z.device)
    z_h = z[:, :, idx]  # batch pos copy d_head
    if fill is not None:
        z_h = z_h - fill.to(z_h)[None, None]
    W_O = model.blocks[layer].attn.W_O[idx]
    delta = einops.einsum(
        z_h, W_O, "batch pos copy d_head, copy d_head d_model -> copy batch pos d_model"
    )
    x = resid_mid[None] - delta
    return einops.rearrange(x, "copy batch pos d_model -> (copy batch) pos d_model")


def _ablated_from_mid(
    model: Model,
    resid_mid: Float[Tensor, "batch pos d_model"],
    z: Float[Tensor, "batch pos head_index d_head"],
    positions: Int[Tensor, " batch"],
    layer: int,
    heads: list[int],
    fill: Tensor | None,
    plan: tuple[int, Tensor, Tensor] | None = None,
) -> Float[Tensor, "copy_batch d_vocab"]:
    """:func:`_ablated_pass` starting from the clean ``resid_mid`` of ``layer``; with a
    :func:`_prefix_plan`, each distinct prefix runs once (:func:`_shared_prefix_logits`)."""
    k = len(heads)
    if plan is not None and layer < model.cfg.n_layers - 1:

        def ablated(rows: Tensor, part: slice) -> Tensor:
            x = _ablated_mid(model, resid_mid[rows, part], z[rows, part], layer, heads, fill)
            return x + backend.mlp_sublayer(model, layer, x)

        return _shared_prefix_logits(model, ablated, positions, layer, k, plan)
    x = _ablated_mid(model, resid_mid, z, layer, heads, fill)
    pos = positions.repeat(k)
    last = layer == model.cfg.n_layers - 1
    if last:  # only per-position maps remain: keep the scored positions
        x = x[torch.arange(len(pos), device=x.device), pos][:, None]
    x = x + backend.mlp_sublayer(model, layer, x)
    if last:
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x)
        return apply_softcap(model.unembed(x)[:, 0], model.cfg.output_logits_soft_cap)
    return _final_logits(model, x, pos, start_at_layer=layer + 1)


class _PrefixKV:
    """A layer's keys and values of shared prefixes, in the shape TransformerLens's attention
    reads a key-value cache entry (``past_keys`` and ``append``).

    Empty, the first ``append`` stores the prefix's keys and values; given them, it returns
    them followed by the new positions' and stores nothing.
    """

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None) -> None:
        self.frozen = keys is not None
        self.past_keys = torch.empty(1, 0) if keys is None else keys
        self.past_values = torch.empty(1, 0) if values is None else values

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if not self.frozen:
            self.past_keys, self.past_values, self.frozen = keys, values, True
            return keys, values
        return torch.cat([self.past_keys, keys], 1), torch.cat([self.past_values, values], 1)


def _can_share_prefixes(model: Model) -> bool:
    """Whether ablated passes may run shared prefixes once (see :func:`_prefix_plan`)."""
    cfg = model.cfg
    return (
        not backend.is_bridge(model)
        and backend.standard_prenorm(model)
        and cfg.positional_embedding_type in ("standard", "rotary")
        and not getattr(cfg, "use_logn_attn", False)
    )


def _prefix_plan(
    tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " batch"]
) -> tuple[int, Tensor, Tensor] | None:
    """The shared prefix length ``m`` that minimises the positions an ablated pass computes
    (``distinct prefixes * m + prompts * (pos - m)``), with one representative row per
    distinct prefix and each row's prefix index; ``None`` when sharing saves under a quarter.
    The scored positions stay outside the prefix (``m <= min(positions)``).
    """
    n, T = tokens.shape
    full = n * T
    best: tuple[int, Tensor, Tensor] | None = None
    best_cost = 0.75 * full
    for m in range(1, int(positions.min()) + 1):
        distinct, inverse = torch.unique(tokens[:, :m], dim=0, return_inverse=True)
        cost = len(distinct) * m + n * (T - m)
        if cost < best_cost:
            first = torch.full((len(distinct),), n, dtype=torch.long, device=tokens.device)
            rows = torch.arange(n, device=tokens.device)
            first = first.scatter_reduce(0, inverse, rows, reduce="amin")
            best, best_cost = (m, first, inverse), cost
    return best


def _shared_prefix_logits(
    model: Model,
    ablated: Callable[[Tensor, slice], Tensor],
    positions: Int[Tensor, " batch"],
    layer: int,
    k: int,
    plan: tuple[int, Tensor, Tensor],
) -> Float[Tensor, "copy_batch d_vocab"]:
    """Final logits at the scored positions, running each distinct prefix of ``plan`` once.

    ``ablated(rows, part)`` gives those rows' residuals at positions ``part`` after block
    ``layer`` for each of the ``k`` copies. The prefixes go through blocks ``layer + 1 ...``
    once per distinct prefix and copy, leaving each block's keys and values; every prompt's
    later positions then run against its own prefix's keys and values.
    """
    m, first, inverse = plan
    n_layers, device = model.cfg.n_layers, positions.device
    blocks = range(layer + 1, n_layers)
    kv = {i: _PrefixKV() for i in blocks}
    x = ablated(first, slice(0, m))
    for i in blocks:
        x = model.blocks[i](x, past_kv_cache_entry=cast(Any, kv[i]))
    g = len(first)
    rows_all = torch.arange(len(positions), device=device)
    pick = (torch.arange(k, device=device)[:, None] * g + inverse[None]).flatten()
    past = {i: _PrefixKV(e.past_keys[pick], e.past_values[pick]) for i, e in kv.items()}
    x = ablated(rows_all, slice(m, None))
    pos = positions.repeat(k) - m
    out_rows = torch.arange(len(pos), device=x.device)

    def keep_scored(mid: Tensor, hook: HookPoint) -> Tensor:
        return mid[out_rows, pos][:, None]

    last_mid = hook_name("resid_mid", n_layers - 1)
    for i in blocks:
        hooks = [(last_mid, keep_scored)] if i == n_layers - 1 else []
        with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
            x = model.blocks[i](x, past_kv_cache_entry=cast(Any, past[i]))
    if x.shape[1] != 1:  # no resid_mid hook point: read the scored positions after the block
        x = x[out_rows, pos][:, None]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    return apply_softcap(model.unembed(x)[:, 0], model.cfg.output_logits_soft_cap)
