"""Architecture facts in one place: a read-only view over a model (either backend).

Attribution code asks this view for per-layer weights (FFN value vectors ``W_out`` rows, keys
``W_in``/``W_gate``, per-head ``W_V``/``W_O`` with grouped-query heads expanded, pre-norm
weights) and the final-norm kind, so no analysis module branches on architecture itself.
Missing biases are returned as zeros and missing norm weights as ones.

**Sandwich norms (Gemma 2 and 3).** A post-attention / post-feedforward RMSNorm rescales a
layer's output before it reaches the residual stream: ``out = (sum_k m_k W[k] + b) / s * w``
with ``s`` the post-norm's scale at that position. With ``s`` frozen per position (as the
papers freeze the final norm's), each neuron writes ``(m_k / s) * (W[k] * w)``: this view
returns the *effective* value vectors ``W[k] * w`` (and ``b * w``) from :meth:`W_out`,
:meth:`b_out`, :meth:`W_O` and :meth:`b_O`, and the capture divides coefficients by ``s``
(:attr:`post_norms`), so neurons sum exactly to the layer's output. The raw module weights are
:meth:`W_out_raw` and :meth:`W_O_raw`.

Example:
    >>> arch = Architecture(model)          # doctest: +SKIP
    >>> arch.W_out(3).shape                 # (d_mlp, d_model): row k is neuron k's value
"""

import functools
from collections.abc import Callable
from typing import Literal, ParamSpec, TypeVar, cast

import torch

from mechcna._types import Float, Tensor
from mechcna.errors import UnsupportedArchitectureError
from mechcna.models.backend import Model, expand_kv, weight
from mechcna.models.inputs import index_in

P = ParamSpec("P")
R = TypeVar("R")

NormKind = Literal["LN", "LNPre", "RMS", "RMSPre", "none"]
_NORMS = {"LN": "LN", "LNPre": "LNPre", "RMS": "RMS", "RMSPre": "RMSPre", None: "none"}


def norm_kind(module: object, default: NormKind | None = None) -> NormKind:
    """The kind of a TransformerLens norm module (``"none"`` for ``None``), read from its class
    name (TransformerLens 4 has no ``transformer_lens.components``); ``default`` for modules of
    another class (a TransformerBridge's norm wrappers), else an error."""
    if module is None:
        return "none"
    kinds: dict[str, NormKind] = {
        "LayerNorm": "LN",
        "LayerNormPre": "LNPre",
        "RMSNorm": "RMS",
        "RMSNormPre": "RMSPre",
    }
    kind = cast("NormKind | None", kinds.get(type(module).__name__, default))
    if kind is None:
        raise UnsupportedArchitectureError(f"unknown norm module {type(module).__name__}")
    return kind


class Architecture:
    """Per-layer weights and norm facts of a supported model (a view; nothing is copied).

    Raises:
        UnsupportedArchitectureError: attention-only models, parallel attention/MLP blocks,
            post-attention/post-MLP norms other than RMSNorm, mixtures of experts, or unknown
            normalisation types.
    """

    def __init__(self, model: Model):
        cfg = model.cfg
        problems = []
        if cfg.attn_only:
            problems.append("attention-only models have no FFN neurons")
        if cfg.parallel_attn_mlp:
            problems.append("parallel attention/MLP blocks (GPT-J style) have no resid_mid")
        if cfg.use_normalization_before_and_after and cfg.normalization_type not in (
            "RMS",
            "RMSPre",
        ):
            problems.append(
                "post-attention/post-MLP norms that are not RMSNorm "
                f"(normalization_type {cfg.normalization_type!r})"
            )
        if getattr(cfg, "num_experts", None):
            problems.append("mixture-of-experts MLPs")
        if cfg.normalization_type not in _NORMS:
            problems.append(f"normalization_type {cfg.normalization_type!r}")
        if cfg.d_mlp is None:
            problems.append("no d_mlp")
        if problems:
            raise UnsupportedArchitectureError(
                f"{cfg.model_name}: unsupported architecture: " + "; ".join(problems)
            )
        self.model = model
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self.d_mlp: int = int(cfg.d_mlp)  # type: ignore[arg-type]
        self.d_vocab: int = cfg.d_vocab_out
        self.n_key_value_heads: int = cfg.n_key_value_heads or cfg.n_heads
        self.gated: bool = bool(cfg.gated_mlp)
        self.norm: NormKind = _NORMS[cfg.normalization_type]  # type: ignore[assignment]
        # The final norm can be of another kind than the block norms (LayerNorm blocks with
        # ``final_rms=True``): read it from the module itself.
        final_default: NormKind = self.norm
        if getattr(cfg, "final_rms", False) and self.norm in ("LN", "LNPre"):
            final_default = "RMS" if self.norm == "LN" else "RMSPre"
        self.final_norm: NormKind = norm_kind(getattr(model, "ln_final", None), final_default)
        self.eps: float = cfg.eps
        #: post-attention and post-feedforward RMSNorms (Gemma 2 and 3 "sandwich norms")
        self.post_norms: bool = bool(cfg.use_normalization_before_and_after)
        #: final logit soft cap ``c``: logits become ``c * tanh(logits / c)`` (0: none)
        self.logit_soft_cap: float = float(max(cfg.output_logits_soft_cap, 0.0))
        self._effective: dict[tuple[str, int], Tensor] = {}

    # ----------------------------------------------------------------- checks
    def check_layer(self, layer: int) -> int:
        """Return ``layer`` or raise a clear error (one rule everywhere: indices are
        non-negative; ``-1`` is an error, not the last layer)."""
        return index_in(layer, self.n_layers, "layer")

    def check_head(self, layer: int, head: int) -> tuple[int, int]:
        layer = self.check_layer(layer)
        return layer, index_in(head, self.n_heads, "head")

    def check_neuron(self, layer: int, neuron: int) -> tuple[int, int]:
        layer = self.check_layer(layer)
        return layer, index_in(neuron, self.d_mlp, "neuron")

    # ---------------------------------------------------------------- weights
    def _block(self, layer: int):
        return self.model.blocks[self.check_layer(layer)]

    def W_out(self, layer: int) -> Float[Tensor, "neuron d_model"]:
        """FFN value vectors: row ``k`` is what neuron ``k`` writes per unit coefficient
        (times the post-feedforward norm weight under sandwich norms)."""
        return self._post("W_out", layer, self.W_out_raw, "ln2_post")

    def W_out_raw(self, layer: int) -> Float[Tensor, "neuron d_model"]:
        """The MLP module's own ``W_out`` (before any post-feedforward norm)."""
        return self._block(layer).mlp.W_out

    def b_out(self, layer: int) -> Float[Tensor, " d_model"]:
        raw = lambda l: self._bias(self._block(l).mlp, "b_out", self.d_model)  # noqa: E731
        return self._post("b_out", layer, raw, "ln2_post")

    def W_in(self, layer: int) -> Float[Tensor, "d_model neuron"]:
        """FFN keys (the ``up`` projection for gated MLPs)."""
        return self._block(layer).mlp.W_in

    def b_in(self, layer: int) -> Float[Tensor, " neuron"]:
        return self._bias(self._block(layer).mlp, "b_in", self.d_mlp)

    def W_gate(self, layer: int) -> Float[Tensor, "d_model neuron"] | None:
        """Gate keys of a gated MLP (``None`` otherwise)."""
        return cast(Tensor, self._block(layer).mlp.W_gate) if self.gated else None

    def W_V(self, layer: int) -> Float[Tensor, "head_index d_model d_head"]:
        """Value weights per query head (grouped-query heads repeated to ``n_heads``)."""
        return expand_kv(self._block(layer).attn.W_V, self.n_heads)

    def b_V(self, layer: int) -> Float[Tensor, "head_index d_head"]:
        b = weight(self._block(layer).attn, "b_V")
        return (
            expand_kv(b, self.n_heads) if b is not None else self._zeros(self.n_heads, self.d_head)
        )

    def W_O(self, layer: int) -> Float[Tensor, "head_index d_head d_model"]:
        """Output weights per head (times the post-attention norm weight under sandwich
        norms): row ``d`` of head ``h`` is what attention neuron ``(h, d)`` writes per unit."""
        return self._post("W_O", layer, self.W_O_raw, "ln1_post")

    def W_O_raw(self, layer: int) -> Float[Tensor, "head_index d_head d_model"]:
        """The attention module's own ``W_O`` (before any post-attention norm)."""
        return self._block(layer).attn.W_O

    def b_O(self, layer: int) -> Float[Tensor, " d_model"]:
        raw = lambda l: self._bias(self._block(l).attn, "b_O", self.d_model)  # noqa: E731
        return self._post("b_O", layer, raw, "ln1_post")

    def post_norm_w(self, layer: int, which: Literal["ln1_post", "ln2_post"]) -> Tensor:
        """The weight of a post-attention (``"ln1_post"``) or post-feedforward
        (``"ln2_post"``) norm (ones without sandwich norms)."""
        if not self.post_norms:
            return self._ones()
        return self._norm_w(getattr(self._block(layer), which))

    def _post(
        self,
        name: str,
        layer: int,
        raw: Callable[[int], Tensor],
        which: Literal["ln1_post", "ln2_post"],
    ) -> Tensor:
        """``raw(layer)`` itself, or times the post-norm weight (memoised in this view, so
        one call sees one tensor object per weight)."""
        layer = self.check_layer(layer)
        if not self.post_norms:
            return raw(layer)
        key = (name, layer)
        if key not in self._effective:
            self._effective[key] = raw(layer).detach() * self.post_norm_w(layer, which).detach()
        return self._effective[key]

    def ln1_w(self, layer: int) -> Float[Tensor, " d_model"]:
        """Pre-attention norm weight (ones if the norm has no weight)."""
        return self._norm_w(self._block(layer).ln1)

    def ln2_w(self, layer: int) -> Float[Tensor, " d_model"]:
        """Pre-MLP norm weight (ones if the norm has no weight)."""
        return self._norm_w(self._block(layer).ln2)

    @property
    def ln_final_w(self) -> Float[Tensor, " d_model"]:
        return self._norm_w(self.model.ln_final) if self.final_norm != "none" else self._ones()

    @property
    def ln_final_b(self) -> Float[Tensor, " d_model"]:
        b = getattr(self.model.ln_final, "b", None) if self.final_norm != "none" else None
        return b if b is not None else self._zeros(self.d_model)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.model.b_U

    @property
    def centres_final(self) -> bool:
        """Whether the final norm subtracts the mean (LayerNorm kinds)."""
        return self.final_norm in ("LN", "LNPre")

    # ---------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.model.W_U.device

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _ones(self) -> Tensor:
        return torch.ones(self.d_model, dtype=self.dtype, device=self.device)

    def _bias(self, module: torch.nn.Module, name: str, size: int) -> Tensor:
        b = weight(module, name)
        return b if b is not None else self._zeros(size)

    def _norm_w(self, module: torch.nn.Module) -> Tensor:
        w = weight(module, "w")
        return w if w is not None else self._ones()


def refuses_soft_cap(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate an analysis (first argument: the model) that handles sandwich norms but not a
    final logit soft cap: such models are refused before any work."""

    @functools.wraps(fn)
    def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        cfg = getattr(model, "cfg", None)
        if getattr(cfg, "output_logits_soft_cap", -1.0) > 0:
            raise UnsupportedArchitectureError(
                f"{fn.__name__}() does not support a final logit soft cap (Gemma 2) yet; layer, "
                "head, FFN-neuron and attention-neuron importance, CNA (compare_neurons, "
                "compare_inputs), query neurons and key scores do"
            )
        return fn(*args, **kwargs)

    return inner
