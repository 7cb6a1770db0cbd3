"""Next-token logits at chosen positions only.

``model(tokens)[rows, positions]`` unembeds every position of every prompt and keeps a few: on
a 262,144-token vocabulary (Gemma 3) that is most of a forward's work and memory (a batch of
512 prompts of 12 tokens: 6,144 positions x 262,144 logits, 6.4 GB in float32). A
HookedTransformer here stops before its unembedding and forms the logits of the chosen
positions as its forward does: the final residual stream through ``ln_final``, ``W_U``,
``b_U`` and the output soft cap (Gemma 2). A TransformerBridge runs its own forward.
"""

from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import apply_softcap

from mechcna._types import Float, Int, Tensor
from mechcna.models.backend import Model, is_bridge
from mechcna.models.hooks import hook_name


def logits_at(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    rows: Int[Tensor, " n"],
    positions: Int[Tensor, " n"],
) -> Float[Tensor, "n d_vocab"]:
    """``model(tokens)[rows, positions]``, unembedding only those positions (see the module
    docstring). Hooks already on the model (interventions) apply as in ``model(tokens)``."""
    if is_bridge(model):
        return model(tokens)[rows, positions]
    kept: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: HookPoint) -> None:
        kept["x"] = act[rows.to(act.device), positions.to(act.device)]

    last = hook_name("resid_post", model.cfg.n_layers - 1)
    model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(last, keep)])
    return unembed_residual(model, kept["x"])


def unembed_residual(model: Model, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """The logits a HookedTransformer's forward forms from final residual-stream vectors
    ``x``: ``ln_final`` (when the model has one), ``W_U``, ``b_U`` and the soft cap."""
    norm = getattr(model, "ln_final", None)
    if norm is not None and model.cfg.normalization_type is not None:
        x = norm(x)
    return apply_softcap(x @ model.W_U + model.b_U, model.cfg.output_logits_soft_cap)
