"""Hook names, built in one place with TransformerLens's own helper and matched exactly."""

from transformer_lens.utilities import get_act_name

#: The hook kinds mechcna reads or writes (TransformerLens short names).
HOOK_KINDS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "z",
    "v",
    "pattern",
    "post",
    "pre",
    "pre_linear",
    "scale",
)


def hook_name(kind: str, layer: int | None = None, sub: str | None = None) -> str:
    """The full TransformerLens hook name, e.g. ``hook_name("post", 3)`` is
    ``"blocks.3.mlp.hook_post"`` and ``hook_name("scale")`` is ``"ln_final.hook_scale"``.

    Args:
        kind: a TransformerLens short name (``"z"``, ``"post"``, ``"resid_mid"``, ...).
        layer: the block index (``None`` for model-level hooks).
        sub: the layer type for ambiguous kinds (``"ln1"``, ``"ln2"`` for ``"scale"``).
    """
    if kind == "scale" and layer is None:
        return "ln_final.hook_scale"
    if kind in ("embed", "pos_embed"):
        return f"hook_{kind}"
    return get_act_name(kind, layer, sub)


def post_scale_name(layer: int, which: str) -> str:
    """The scale hook of a post-attention (``"ln1_post"``) or post-feedforward
    (``"ln2_post"``) norm, e.g. ``"blocks.3.ln2_post.hook_scale"``."""
    return f"blocks.{layer}.{which}.hook_scale"
