"""Projection into the vocabulary with a frozen final norm: the papers' ``bs`` values.

docs/methods.md section 3. Every score in mechcna goes through one map, which sends a
residual-space vector ``v`` to vocabulary logits using the final norm's scale ``s`` **frozen**
from the real forward pass at the scored position (it is not recomputed for partial sums):

* LayerNorm:  ``bs(v) = ((v - mean(v)) / s * gamma + beta) @ W_U + b_U``
* RMSNorm:    ``bs(v) = (v / s * gamma) @ W_U + b_U``

With the frozen scale ``bs`` is affine: ``bs(v) = L(v) / s + const`` with ``L`` linear. By
default ``const = beta @ W_U + b_U``, so the projection of the real final residual equals the
model's real logits. ``paper_compat=True`` drops ``beta`` and ``b_U`` (``const = 0``), which
reproduces the GPT-2 notebook exactly (for Llama the two agree: there is no bias).

**Soft-capped logits (Gemma 2).** With a final logit soft cap ``c`` the model's logits are
``c * tanh(bs(v) / c)``: :func:`project_to_vocab` applies it (:func:`soft_cap`), so projecting
the real final residual still gives the real logits; :func:`linear_part` and the static rows
below stay uncapped, and the neuron scores take the exact path on such models.

Because ``L`` is linear, the projection of a neuron's contribution ``c * w_k`` is
``(c / s) * U[k]`` with ``U[k] = L(w_k)`` static per model: :func:`direction_block`
computes these rows once per layer and shares them across prompts, positions and models.

Example:
    >>> state = final_norm_state(model, "Tim Duncan plays the sport of")  # doctest: +SKIP
    >>> logits = project_to_vocab(model, cache["resid_post", -1][0, -1], state.scale)
    >>> top_tokens(model, (9, 1254), k=10).top(5)                          # doctest: +SKIP
"""

from dataclasses import dataclass

import einops
import pandas as pd
import torch
from transformer_lens import ActivationCache

from mechcna._types import Float, Int, Tensor
from mechcna.errors import InvalidOptionError, MechcnaError
from mechcna.interventions.prompts import Prompts, prepare_prompts
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name
from mechcna.models.inputs import positive_int
from mechcna.models.view import architecture


def _centre(arch: Architecture, v: Tensor) -> Tensor:
    return v - v.mean(-1, keepdim=True) if arch.centres_final else v


def linear_part(
    arch: Architecture, vectors: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_vocab"]:
    """``L(v)``: the linear part of ``bs`` before division by the frozen scale."""
    dtype = compute_dtype(arch.dtype)
    x = _centre(arch, vectors.to(dtype)) * arch.ln_final_w.to(dtype)
    return einops.einsum(x, arch.W_U.to(dtype), "... d_model, d_model d_vocab -> ... d_vocab")


def soft_cap(
    arch: Architecture, logits: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, "... d_vocab"]:
    """``c * tanh(logits / c)`` for a model with a final logit soft cap ``c``, else ``logits``."""
    c = arch.logit_soft_cap
    return logits if c <= 0 else c * torch.tanh(logits / c)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are computed in float64 for float64 models and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_offset(arch: Architecture, paper_compat: bool = False) -> Float[Tensor, " d_vocab"]:
    """``const``: ``beta @ W_U + b_U`` by default, zero with ``paper_compat``."""
    dtype = compute_dtype(arch.dtype)
    if paper_compat:
        return torch.zeros(arch.d_vocab, dtype=dtype, device=arch.device)
    return (arch.ln_final_b @ arch.W_U + arch.b_U).to(dtype)


def project_to_vocab(
    model: Model,
    vectors: Float[Tensor, "... d_model"],
    scale: float | Float[Tensor, "..."] = 1.0,
    *,
    paper_compat: bool = False,
) -> Float[Tensor, "... d_vocab"]:
    """Project residual-space vectors to vocabulary logits with a frozen final-norm scale.

    Args:
        model: the model.
        vectors: ``[..., d_model]`` residual-space vectors.
        scale: the frozen final-norm scale (``ln_final.hook_scale`` at the scored position,
            see :func:`final_norm_state`), a float or a tensor broadcasting against
            ``vectors.shape[:-1]``. ``1.0`` gives the unscaled direction (fine for rankings).
        paper_compat: drop the final norm's bias and ``b_U`` as the papers' GPT-2 code does.

    Returns:
        ``[..., d_vocab]`` logits. Projecting the real final residual with its real scale
        gives the model's real logits (default) or the papers' bias-free ones; a final logit
        soft cap (Gemma 2) is applied.
    """
    arch = architecture(model)
    if vectors.shape[-1] != arch.d_model:
        raise MechcnaError(f"vectors have {vectors.shape[-1]} features, d_model is {arch.d_model}")
    s = torch.as_tensor(scale, dtype=compute_dtype(arch.dtype), device=arch.device)
    return soft_cap(
        arch, linear_part(arch, vectors) / s[..., None] + logit_offset(arch, paper_compat)
    )


@dataclass(frozen=True)
class FinalNormState:
    """The final norm's frozen scale at each prompt's scored position.

    Attributes:
        scale: ``[batch]`` ``ln_final.hook_scale`` (the std for LayerNorm, the RMS for
            RMSNorm, both with ``eps``); ones when the model has no final norm.
        positions: the scored position per prompt.
    """

    scale: Float[Tensor, " batch"]
    positions: Int[Tensor, " batch"]


def final_norm_state(model: Model, prompts: Prompts, position: int | None = None) -> FinalNormState:
    """Run ``prompts`` and read the final norm's scale at the scored positions."""
    batch = prepare_prompts(model, prompts, position)
    name = hook_name("scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n == name)
    return FinalNormState(scale_at(model, cache, batch.positions), batch.positions)


def scale_at(
    model: Model,
    cache: ActivationCache | dict[str, Tensor],
    positions: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """The final-norm scale at ``positions`` from a cache (ones if there is no final norm)."""
    name = hook_name("scale")
    if name not in cache:
        if architecture(model).final_norm == "none":
            return torch.ones(len(positions), dtype=model.W_U.dtype, device=model.W_U.device)
        raise MechcnaError(f"cache lacks {name}")
    scale = cache[name]
    scale = scale[..., 0] if scale.ndim == 3 else scale
    return scale[torch.arange(len(positions), device=positions.device), positions]


@dataclass(frozen=True)
class DirectionBlock:
    """Static vocabulary directions of a set of residual-space vectors (one per row).

    Each row is stored centred on its midrange, ``U[k] = L(w_k) - centre[k]``, so that
    ``|U[k, j]| <= radius[k]``: the certified fast path bounds its error by the radius, and
    shifting a row by a constant never changes a log-probability.

    Attributes:
        U: ``[row, d_vocab]`` centred directions.
        centre: ``[row]`` the subtracted midranges.
        radius: ``[row]`` half the range of each row over the vocabulary.
    """

    U: Float[Tensor, "row d_vocab"]
    centre: Float[Tensor, " row"]
    radius: Float[Tensor, " row"]

    @property
    def nbytes(self) -> int:
        return self.U.numel() * self.U.element_size()


def direction_block(
    model: Model, vectors: Float[Tensor, "row d_model"], chunk: int = 1024
) -> DirectionBlock:
    """Compute :class:`DirectionBlock` rows ``L(v)`` for ``vectors`` (chunked, no grad)."""
    arch = architecture(model)
    rows = []
    with torch.no_grad():
        for i in range(0, vectors.shape[0], chunk):
            rows.append(linear_part(arch, vectors[i : i + chunk]))
        U = torch.cat(rows) if rows else vectors.new_zeros(0, arch.d_vocab)
        hi, lo = U.max(-1).values, U.min(-1).values
        centre = (hi + lo) / 2
        U -= centre[:, None]
    return DirectionBlock(U, centre, (hi - lo) / 2)


class TokenList(tuple[tuple[str, float], ...]):
    """``(token, value)`` pairs, best first: a tuple, and callable like every result's ``.top``.

    ``tokens.top(k)`` is a DataFrame (``rank``, ``token``, ``value``) of the first ``k`` pairs
    (all of them without ``k``), as ``.top(k)`` of every other result; the tuple access
    (``for t, v in tokens.top``, ``tokens.top[0]``) keeps working.
    """

    __slots__ = ()

    def __call__(self, k: int | None = None) -> pd.DataFrame:
        n = len(self) if k is None else min(positive_int(k, "k"), len(self))
        rows = [(i, t, v) for i, (t, v) in enumerate(self[:n])]
        return pd.DataFrame(rows, columns=["rank", "token", "value"])

    def tokens(self) -> list[str]:
        """The token strings alone, best first."""
        return [t for t, _ in self]


@dataclass(frozen=True)
class TopTokens:
    """Top and bottom tokens of a projected vector, with their values (logits).

    ``top`` and ``bottom`` are :class:`TokenList`: ``res.top(k)`` is a DataFrame of the ``k``
    most promoted tokens like every result's ``.top(k)``, ``res.bottom(k)`` of the most
    suppressed (most negative first); both still iterate as ``(token, value)`` pairs.
    """

    top: TokenList
    bottom: TokenList
    label: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "top", TokenList(self.top))
        object.__setattr__(self, "bottom", TokenList(self.bottom))

    def to_frame(self) -> pd.DataFrame:
        rows = [("top", i, t, v) for i, (t, v) in enumerate(self.top)]
        rows += [("bottom", i, t, v) for i, (t, v) in enumerate(self.bottom)]
        return pd.DataFrame(rows, columns=["side", "rank", "token", "value"])


def top_tokens(
    model: Model,
    vector_or_neuron: Float[Tensor, " d_model"] | tuple[int, int],
    k: int = 10,
    *,
    coefficient: float | None = None,
    scale: float = 1.0,
    paper_compat: bool = True,
) -> TopTokens:
    """The ``k`` tokens a vector promotes most (top) and suppresses most (bottom).

    Args:
        vector_or_neuron: a ``[d_model]`` vector, or an FFN neuron ``(layer, neuron)`` whose
            value vector (``W_out`` row) is used.
        coefficient: multiply the vector first (sign-aware: with a negative coefficient the
            value vector's bottom tokens become the promoted ones, as the papers' README warns).
        scale: frozen final-norm scale (positive, so it never changes the ranking).
        paper_compat: drop the final norm's bias and ``b_U`` (default ``True``: the papers
            read a vector's tokens from its direction alone).

    Returns:
        :class:`TopTokens`; ``bottom`` lists the most negative first.
    """
    arch = architecture(model)
    if isinstance(vector_or_neuron, tuple):
        layer, neuron = arch.check_neuron(*vector_or_neuron)
        vector = arch.W_out(layer)[neuron]
        label = f"{layer}_{neuron}"
    elif isinstance(vector_or_neuron, Tensor):
        vector, label = vector_or_neuron, "vector"
    else:
        raise InvalidOptionError(
            f"top_tokens takes (layer, neuron) or a vector, not {vector_or_neuron!r}"
        )
    if coefficient is not None:
        vector = vector * coefficient
    if not 0 < k <= arch.d_vocab:
        raise MechcnaError(f"k must be in 1..{arch.d_vocab}, got {k}")
    with torch.no_grad():
        logits = project_to_vocab(model, vector.detach(), scale, paper_compat=paper_compat)
    top = logits.topk(k)
    bottom = (-logits).topk(k)

    def pairs(ids: Tensor, vals: Tensor) -> TokenList:
        names = [_token_str(model, int(i)) for i in ids]
        return TokenList(zip(names, (float(v) for v in vals), strict=True))

    return TopTokens(pairs(top.indices, top.values), pairs(bottom.indices, -bottom.values), label)


def _token_str(model: Model, token: int) -> str:
    if model.tokenizer is None:
        return str(token)
    return model.to_single_str_token(token)
