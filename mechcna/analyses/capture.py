"""One forward pass that records what every attribution score reads.

:func:`capture` runs the prompts (under any interventions) and stacks, per layer, the
residual streams before attention and before the MLP, the attention and MLP outputs, the
final residual and norm scale, and on request the FFN activations, ``hook_z``, the attention
pattern and ``v``, at each prompt's scored position; :func:`attention_coefficients` forms
the attention neurons' coefficients from them. Non-finite activations raise
:class:`~mechcna.errors.NonFiniteError` naming the layer.

**Sandwich norms** (Gemma 2 and 3, :attr:`~mechcna.models.architecture.Architecture.post_norms`):
the post-attention and post-feedforward norms' scales at the scored position are recorded and
frozen, and the coefficients ``post``, ``z`` and ``v`` are divided by them, so that a
coefficient times its effective value vector (``Architecture.W_out`` / ``W_O``, which include the
post-norm weight) is exactly that neuron's share of ``attn_out`` / ``mlp_out``.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from transformer_lens.hook_points import HookPoint

from mechcna._types import Float, Int, Tensor
from mechcna.engine.projection import compute_dtype
from mechcna.errors import MechcnaError, NonFiniteError
from mechcna.interventions.edits import Intervention, intervene
from mechcna.interventions.positions import prompt_lengths
from mechcna.interventions.prompts import PromptBatch, Prompts, prepare_prompts, single_token_ids
from mechcna.models.backend import Model, is_bridge
from mechcna.models.check import first_non_finite
from mechcna.models.hooks import hook_name, post_scale_name
from mechcna.models.inputs import warn_user_hooks
from mechcna.models.unembed import unembed_residual
from mechcna.models.view import architecture, per_call

#: What to score: one target for all prompts, one per prompt, or ``None`` (each prompt's top-1).
Targets = str | int | Sequence[str | int] | Tensor | None


# ---------------------------------------------------------------------------- capture
@dataclass(frozen=True)
class Capture:
    """What one forward pass gives the attribution code, at each prompt's scored position.

    Per-layer tensors have shape ``[prompt, layer, ...]``. ``pattern`` is the attention row of
    the scored position (``[prompt, layer, head, key_pos]``); ``v`` covers every position.
    Under sandwich norms ``post``, ``z`` and ``v`` are divided by ``mlp_post_scale`` /
    ``attn_post_scale`` (the post-norms' frozen scales at the scored position; ones otherwise).
    """

    batch: PromptBatch
    target: Int[Tensor, " prompt"]
    scale: Float[Tensor, " prompt"]
    resid_pre: Float[Tensor, "prompt layer d_model"]
    resid_mid: Float[Tensor, "prompt layer d_model"]
    attn_out: Float[Tensor, "prompt layer d_model"]
    mlp_out: Float[Tensor, "prompt layer d_model"]
    resid_final: Float[Tensor, "prompt d_model"]
    post: Float[Tensor, "prompt layer neuron"] | None
    z: Float[Tensor, "prompt layer head_index d_head"] | None
    pattern: Float[Tensor, "prompt layer head_index key_pos"] | None
    v: Float[Tensor, "prompt layer key_pos head_index d_head"] | None
    attn_post_scale: Float[Tensor, "prompt layer"] | None = None
    mlp_post_scale: Float[Tensor, "prompt layer"] | None = None


@per_call
def capture(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    position: int | None = None,
    interventions: Iterable[Intervention] = (),
    need: Iterable[Literal["post", "z", "attention"]] = ("post", "z", "attention"),
) -> Capture:
    """Run the prompts once (under ``interventions``) and keep what attribution needs.

    Only the scored position is stored for residuals, MLP activations and ``z``; the values
    ``v`` are kept at every position only when attention neurons are needed.

    Args:
        targets: target tokens (strings or ids, one or one per prompt); default: the model's
            own top-1 prediction at the scored position.
    """
    arch = architecture(model)
    warn_user_hooks(model)
    batch = prepare_prompts(model, prompts, position)
    need = set(need)
    rows = batch.batch_index
    pos = batch.positions
    store: dict[str, Tensor] = {}

    def at_position(key: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:
            store[key] = act[rows, pos].detach()

        return hook

    def whole(key: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:
            store[key] = act.detach()

        return hook

    def pattern_row(key: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:  # [batch head query key]
            store[key] = act[rows, :, pos].detach()

        return hook

    hooks: list[tuple[str | Callable, Callable]] = [(hook_name("scale"), at_position("scale"))]
    last = arch.n_layers - 1
    hooks.append((hook_name("resid_post", last), at_position("final")))
    for l in range(arch.n_layers):
        for kind in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
            hooks.append((hook_name(kind, l), at_position(f"{kind}{l}")))
        if "post" in need:
            hooks.append((hook_name("post", l), at_position(f"post{l}")))
        if "z" in need:
            hooks.append((hook_name("z", l), at_position(f"z{l}")))
        if "attention" in need:
            hooks.append((hook_name("pattern", l), pattern_row(f"pattern{l}")))
            hooks.append((hook_name("v", l), whole(f"v{l}")))
        if arch.post_norms:
            for sub in ("ln1_post", "ln2_post"):
                hooks.append((post_scale_name(l, sub), at_position(f"{sub}{l}")))
    if arch.final_norm == "none":
        hooks = hooks[1:]
    # a HookedTransformer stops before its unembedding (whose forward copies W_U: 0.1 s on
    # SmolLM2); the top-1 needs the logits at the scored positions only, formed below as the
    # unembedding does (same weights, bias and soft cap)
    own = not is_bridge(model)
    with torch.no_grad(), intervene(model, *interventions), prompt_lengths(batch.lengths):
        logits = model.run_with_hooks(
            batch.tokens, fwd_hooks=hooks, return_type=None if own else "logits"
        )
    _require_finite(store, arch.n_layers)
    if targets is None and own:
        with torch.no_grad():
            target = unembed_residual(model, store["final"]).argmax(-1)
    elif targets is None:
        assert logits is not None
        target = logits[rows, pos].argmax(-1)
    else:
        target = single_token_ids(model, targets, len(batch))
    if arch.final_norm == "none":
        scale = torch.ones(len(batch), dtype=compute_dtype(arch.dtype), device=arch.device)
    else:
        scale = store["scale"].reshape(len(batch)).to(compute_dtype(arch.dtype))

    def stack(prefix: str) -> Tensor:
        return torch.stack([store[f"{prefix}{l}"] for l in range(arch.n_layers)], 1)

    v = None
    if "attention" in need:
        vs = [store[f"v{l}"] for l in range(arch.n_layers)]
        repeat = arch.n_heads // vs[0].shape[2]
        v = torch.stack([x.repeat_interleave(repeat, dim=2) for x in vs], 1)
    post = stack("post") if "post" in need else None
    z = stack("z") if "z" in need else None
    attn_s = mlp_s = None
    if arch.post_norms:  # freeze the post-norms' scales: coefficients divided by them
        attn_s = stack("ln1_post").reshape(len(batch), arch.n_layers)
        mlp_s = stack("ln2_post").reshape(len(batch), arch.n_layers)
        post = None if post is None else post / mlp_s[..., None].to(post.dtype)
        z = None if z is None else z / attn_s[..., None, None].to(z.dtype)
        v = None if v is None else v / attn_s[..., None, None, None].to(v.dtype)
    return Capture(
        batch=batch,
        target=target,
        scale=scale,
        resid_pre=stack("resid_pre"),
        resid_mid=stack("resid_mid"),
        attn_out=stack("attn_out"),
        mlp_out=stack("mlp_out"),
        resid_final=store["final"],
        post=post,
        z=z,
        pattern=stack("pattern") if "attention" in need else None,
        v=v,
        attn_post_scale=attn_s,
        mlp_post_scale=mlp_s,
    )


def _require_finite(store: dict[str, Tensor], n_layers: int) -> None:
    """Refuse a forward pass whose activations went NaN or infinite, naming the layer."""
    order = {f"{kind}{l}": (l, kind) for l in range(n_layers) for kind in _KINDS}
    ordered = {k: store[k] for k in order if k in store}
    bad = first_non_finite(ordered)
    if bad is not None:
        l, kind = order[bad]
        raise NonFiniteError(
            f"layer {l}: {hook_name(kind, l)} is NaN or infinite; check the weights with "
            "mechcna.check_model"
        )
    if "final" in store and first_non_finite({"f": store["final"]}):
        raise NonFiniteError(f"layer {n_layers - 1}: the final residual is NaN or infinite")


_KINDS = ("resid_pre", "attn_out", "resid_mid", "post", "mlp_out", "z", "v")


def attention_coefficients(cap: Capture) -> Float[Tensor, "prompt layer key_pos head_index d_head"]:
    """Attention-neuron coefficients ``pattern[T, pos] * v[pos]`` (the papers' subvalues).

    Summed over ``key_pos`` they give ``z`` at the scored position.
    """
    if cap.pattern is None or cap.v is None:
        raise MechcnaError("this capture was made without attention values")
    return einops.einsum(
        cap.pattern,
        cap.v,
        "prompt layer head_index key_pos, prompt layer key_pos head_index d_head "
        "-> prompt layer key_pos head_index d_head",
    )
