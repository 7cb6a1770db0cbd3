"""The backend seam: everything that differs between TransformerLens's two model classes.

mechcna runs on a :class:`~transformer_lens.HookedTransformer` (TransformerLens 3.x) and on a
``TransformerBridge`` (TransformerLens 3.x and 4.x, which removed ``HookedTransformer``).
Analysis modules type their models as :data:`Model` and never branch on the class; what the
classes do differently is answered here (measured on TL 3.9 and 4.3, ``docs/backends.md``):

* ``stop_at_layer=n_layers`` returns the final residual on a HookedTransformer but logits on a
  bridge, and TL 3.x bridges reject ``start_at_layer``: use :func:`forward`;
* a bridge's ``blocks.L.hook_resid_mid`` is the input of ``ln2`` only, so writing to it does
  not change the residual stream: :func:`hook_writable` / :func:`check_writable`;
* grouped-query ``W_K``/``W_V``/``b_K``/``b_V`` keep the key-value head count on a bridge:
  :func:`expand_kv`; missing biases are ``None`` (or raise) instead of zeros: :func:`weight`;
* a block's MLP applied to a residual: :func:`mlp_sublayer`; the architecture name:
  :func:`architecture_name`.

``HookedTransformer`` and ``HookedTransformerConfig`` are importable from here under every
TransformerLens version; under 4.x they are stand-ins whose use raises a clear error.

Example:
    >>> from mechcna.models.backend import Model, default_backend
    >>> default_backend() in ("hooked", "bridge")
    True
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from transformer_lens.model_bridge import TransformerBridge
from typing_extensions import TypeIs

from mechcna._types import Tensor
from mechcna.errors import MechcnaError, UnsupportedArchitectureError

Backend = Literal["hooked", "bridge"]
BACKENDS: tuple[Backend, ...] = ("hooked", "bridge")

_REMOVED = (
    "HookedTransformer is not in the installed TransformerLens (4.x removed it): load models "
    "with mechcna.load_model(..., backend='bridge') or pass a TransformerBridge"
)


class _RemovedMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # introspection (typing, beartype, copy) sees a plain class
            raise AttributeError(name)
        raise UnsupportedArchitectureError(f"{cls.__name__}.{name}: {_REMOVED}")


class _Removed(metaclass=_RemovedMeta):
    """Stands in for a class TransformerLens 4 removed: no object is an instance of it, and
    constructing it or reading its attributes raises :class:`UnsupportedArchitectureError`."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise UnsupportedArchitectureError(f"{type(self).__name__}(...): {_REMOVED}")


def _hooked_classes() -> tuple[type, type] | None:
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return None
    return HookedTransformer, HookedTransformerConfig


_HOOKED = _hooked_classes()

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    #: A model mechcna accepts: a HookedTransformer or a TransformerBridge (type checkers see
    #: the HookedTransformer interface, which a bridge in compatibility mode mirrors).
    Model = HookedTransformer
else:
    if _HOOKED is None:
        HookedTransformer = type("HookedTransformer", (_Removed,), {})
        HookedTransformerConfig = type("HookedTransformerConfig", (_Removed,), {})
        Model = TransformerBridge
    else:
        HookedTransformer, HookedTransformerConfig = _HOOKED
        Model = Union[HookedTransformer, TransformerBridge]  # noqa: UP007 (runtime alias)

# Post-norm architectures (TL 3.9's POST_NORM_ARCHITECTURES): their blocks are not the
# standard pre-norm ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.
_POST_NORM = frozenset({"Olmo2ForCausalLM", "Olmo3ForCausalLM"})


# ----------------------------------------------------------------------- which backend
def hooked_available() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (3.x does, 4.x not)."""
    return _HOOKED is not None


def default_backend() -> Backend:
    """``"hooked"`` where the installed TransformerLens has it, ``"bridge"`` otherwise."""
    return "hooked" if hooked_available() else "bridge"


def check_backend(backend: str | None) -> Backend:
    """Resolve ``backend`` (``None``: the default) or raise naming the choices.

    Raises:
        MechcnaError: an unknown name, or ``"hooked"`` under TransformerLens 4.
    """
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise MechcnaError(f"backend must be 'hooked' or 'bridge', not {backend!r}")
    if backend == "hooked" and not hooked_available():
        raise UnsupportedArchitectureError(_REMOVED)
    return backend  # type: ignore[return-value]


def is_bridge(obj: object) -> bool:
    """Whether ``obj`` is a TransformerLens ``TransformerBridge``."""
    return isinstance(obj, TransformerBridge)


def is_model(obj: object) -> TypeIs[Model]:
    """Whether ``obj`` is a model mechcna accepts (either backend)."""
    return is_bridge(obj) or (_HOOKED is not None and isinstance(obj, _HOOKED[0]))


def backend_of(model: object) -> Backend:
    """``"hooked"`` or ``"bridge"``.

    Raises:
        MechcnaError: ``model`` is neither.
    """
    if is_bridge(model):
        return "bridge"
    if is_model(model):
        return "hooked"
    raise MechcnaError(
        f"expected a HookedTransformer or a TransformerBridge, got {type(model).__name__}"
    )


def architecture_name(model: Model) -> str:
    """The Hugging Face architecture name (``"LlamaForCausalLM"``), ``""`` if unknown.

    A HookedTransformer records it as ``cfg.original_architecture``; a bridge as
    ``cfg.architecture`` (its ``original_architecture`` is ``None``).
    """
    cfg = model.cfg
    return str(cfg.original_architecture or getattr(cfg, "architecture", None) or "")


def standard_prenorm(model: Model) -> bool:
    """Whether every block is ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (pre-norm,
    sequential attention and MLP): what shortcuts from a cached ``resid_mid`` rely on."""
    cfg = model.cfg
    return not (
        cfg.attn_only
        or cfg.parallel_attn_mlp
        or getattr(cfg, "use_normalization_before_and_after", False)
        or architecture_name(model) in _POST_NORM
    )


# ----------------------------------------------------------------------------- weights
def weight(module: torch.nn.Module, name: str) -> Tensor | None:
    """``module.name`` as a tensor, or ``None`` where the model has none.

    A bias-free HookedTransformer returns zeros, a bridge ``None`` (or raises).
    """
    try:
        value = getattr(module, name)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return None
    return value if isinstance(value, Tensor) else None


def expand_kv(w: Tensor, n_heads: int) -> Tensor:
    """Repeat grouped-query key/value heads (leading axis) to ``n_heads``, as a
    HookedTransformer's ``W_K``/``W_V`` do; a bridge keeps the key-value head count."""
    if w.shape[0] == n_heads:
        return w
    if n_heads % w.shape[0]:
        raise UnsupportedArchitectureError(
            f"{w.shape[0]} key-value heads do not divide {n_heads} query heads"
        )
    return torch.repeat_interleave(w, n_heads // w.shape[0], dim=0)


# ------------------------------------------------------------------------------- hooks
def hook_writable(model: Model, name: str) -> bool:
    """Whether a hook's returned value replaces the activation in the rest of the pass.

    On a bridge ``blocks.L.hook_resid_mid`` is an alias of ``blocks.L.ln2.hook_in``: it reads
    the residual exactly, but what a hook returns reaches the MLP's input only, not the
    residual stream (measured on TL 3.9 and 4.3).
    """
    return not (is_bridge(model) and name.endswith("hook_resid_mid"))


def check_writable(model: Model, name: str) -> None:
    """Raise if writing to hook ``name`` would be silently wrong on this model.

    Raises:
        UnsupportedArchitectureError: ``hook_resid_mid`` on a bridge.
    """
    if not hook_writable(model, name):
        raise UnsupportedArchitectureError(
            f"{name}: on a TransformerBridge this hook feeds only the MLP's input norm, so a "
            "write there does not change the residual stream; patch hook_attn_out (which "
            "resid_mid sums) or the next layer's hook_resid_pre instead"
        )


# ----------------------------------------------------------------------------- forward
def forward(
    model: Model,
    inputs: Tensor,
    *,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """``model(inputs, ...)`` with HookedTransformer's meaning on either backend.

    With ``start_at_layer`` the input is the residual entering that block; with
    ``stop_at_layer`` the result is the residual after that many blocks (also when it equals
    ``n_layers``, where a bridge would return logits). A bridge without native
    ``start_at_layer`` (TL 3.x) runs from dummy tokens with the residual substituted at
    ``blocks.{start}.hook_resid_pre`` (exact: nothing before it reaches later blocks).
    Hooks already on the model fire as in a pass from the tokens.
    """
    if not is_bridge(model):
        return model(inputs, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, **kwargs)
    n = model.cfg.n_layers
    hooks: list[tuple[str, Callable[..., Any]]] = []
    captured: list[Tensor] = []
    if stop_at_layer is not None:
        stop = stop_at_layer % n if stop_at_layer < 0 else stop_at_layer
        if stop >= n:

            def capture(x: Tensor, hook: Any) -> None:
                captured.append(x)

            hooks.append((f"blocks.{n - 1}.hook_resid_post", capture))
            stop_at_layer = None
    if start_at_layer is not None and not _native_start():
        resid = inputs

        def substitute(x: Tensor, hook: Any) -> Tensor:
            return resid

        hooks.append((f"blocks.{start_at_layer}.hook_resid_pre", substitute))
        inputs = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
        start_at_layer = None
    extra = {"start_at_layer": start_at_layer, "stop_at_layer": stop_at_layer}
    extra = {k: v for k, v in extra.items() if v is not None}
    with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
        out = model(inputs, **extra, **kwargs)
    return captured[-1] if captured else out


def _native_start() -> bool:
    """TransformerLens 4 bridges accept ``start_at_layer``; 3.x bridges raise."""
    return not hooked_available()


def mlp_sublayer(model: Model, layer: int, resid_mid: Tensor) -> Tensor:
    """What block ``layer``'s MLP adds to the residual ``resid_mid`` (its ``ln2`` then MLP)."""
    block = model.blocks[layer]
    apply = getattr(block, "apply_mlp", None) or block.mlp
    return apply(block.ln2(resid_mid))


def live_bias(module: torch.nn.Module, name: str) -> Tensor:
    """The bias tensor ``module.name`` itself, to edit in place.

    Raises:
        UnsupportedArchitectureError: the model has no such bias (a bias-free bridge), so a
            weight edit that moves a constant into it cannot be written.
    """
    b = weight(module, name)
    if b is None:
        raise UnsupportedArchitectureError(
            f"this model has no {name} to write into; apply the intervention with hooks "
            "(mechcna.intervene) instead"
        )
    return b
