"""Which source positions, heads, earlier components and shallow neurons feed a deep neuron's keys.

The steps of the arithmetic paper's "3+5=" feature-transfer pipeline (ARITH section 4.2;
``docs/policies.md``): :func:`source_position_scores`, :func:`head_scores`,
:func:`component_scores` and :func:`neuron_scores` score the raw inner products of residual
pieces with a neuron's keys (:func:`~mechcna.analyses.transfer.ffn_keys`), optionally read
through a path of attention transforms (:mod:`mechcna.analyses.transfer`).

**Sandwich norms** (Gemma 2 and 3): every residual piece is its exact share of the residual
stream, with the post-norm scales frozen per position: an attention output at query position
``q`` is divided by the post-attention norm's scale at ``q`` (``W_O`` carries its weight), an
FFN neuron's ``u_j`` uses its coefficient divided by the post-feedforward norm's scale at its
position, and a path's last hop lands on the last token (its post-attention scale is frozen
there). The keys read the pre-MLP norm with its scale left out, as in the notebooks.

Paper items (README, "Paper to code"): ARITH Table 7 and the feature-transfer stage.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import einops
import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Tensor
from mechcna.analyses import plotting
from mechcna.analyses.transfer import (
    FFNKeys,
    PathStep,
    PositionCapture,
    _apply,
    _check_position,
    _Hop,
    _keys,
    _resolve_path,
    capture_positions,
    component_labels,
)
from mechcna.engine.projection import compute_dtype
from mechcna.errors import MechcnaError
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.inputs import positive_int
from mechcna.models.processing import WeightProcessing, get_processing, refuses_processing
from mechcna.models.view import architecture, per_call


# ---------------------------------------------------------------------------- key scores
@dataclass(frozen=True)
class KeyScores:
    """Inner products of a set of vectors with a neuron's keys (docs/methods.md 8.2).

    Attributes:
        scores: ``[row, key]`` raw inner products.
        rows: a label per row (a position, a head, a component, a neuron).
        keys: the key names (``up``/``gate`` or ``in``).
        title: what was scored.
        row_values: a numeric value per row (the component label ``c/2 - 0.5``, a position,
            a head or a neuron index).
    """

    scores: Float[Tensor, "row key"]
    rows: tuple[str, ...]
    keys: tuple[str, ...]
    title: str
    row_values: tuple[float, ...]
    processing: WeightProcessing | None = None

    def total(self) -> Tensor:
        """Sum over keys (the notebook ranks by up + gate)."""
        return self.scores.sum(-1)

    def top(self, k: int = 10, by: str | None = None) -> pd.DataFrame:
        """The ``k`` rows with the largest score (sum over keys, or the key named ``by``)."""
        if by is None:
            values = self.total()
        elif by in self.keys:
            values = self.scores[:, self.keys.index(by)]
        else:
            raise MechcnaError(f"by must be one of {self.keys} or None, not {by!r}")
        order = values.argsort(descending=True)[: positive_int(k, "k")].tolist()
        return self.to_frame().iloc[order].reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"row": list(self.rows), "value": list(self.row_values)})
        for i, name in enumerate(self.keys):
            frame[name] = self.scores[:, i].tolist()
        frame["total"] = self.total().tolist()
        return frame

    def plot(self) -> go.Figure:
        return plotting.key_score_bars(self)


def _key_scores(
    arch: Architecture,
    keys: FFNKeys,
    vectors: Tensor,
    hops: list[_Hop],
    rows: Sequence[str],
    values: Iterable[float | int],
    title: str,
) -> KeyScores:
    x = vectors.to(compute_dtype(arch.dtype))
    if hops:
        x = _apply(arch, hops, x)[-1]
    with torch.no_grad():
        scores = keys.inner(x)
    values_t = tuple(float(v) for v in values)
    processing = get_processing(arch.model)
    return KeyScores(scores.cpu(), tuple(rows), keys.names, title, values_t, processing)


def _one_prompt(model: Model, prompt: str | Tensor, attention: bool) -> PositionCapture:
    cap = capture_positions(model, prompt, attention=attention)
    if len(cap.batch) != 1:
        raise MechcnaError("this analysis takes one prompt")
    return cap


def _head_position_vectors(
    arch: Architecture, cap: PositionCapture, layer: int, query: int
) -> Float[Tensor, "key_pos head_index d_model"]:
    """``alpha[h, q, p] * v[p, h] @ W_O[h]`` for every source position and head (no ``b_O``),
    divided by the post-attention norm's frozen scale at ``q`` under sandwich norms."""
    assert cap.pattern is not None and cap.v is not None
    n = int(cap.batch.lengths[0])
    coef = einops.einsum(
        cap.pattern[0, layer, :, query, :n],
        cap.v[0, layer, :n],
        "head key_pos, key_pos head d_head -> key_pos head d_head",
    )
    if cap.attn_post_scale is not None:
        coef = coef / cap.attn_post_scale[0, layer, query].to(coef)
    return einops.einsum(
        coef, arch.W_O(layer).to(coef), "pos head d_head, head d_head d_model -> pos head d_model"
    )


@per_call
@refuses_processing()
def source_position_scores(
    model: Model,
    prompt: str | Tensor,
    layer: int,
    keys: "FFNKeys | tuple[int, int]",
    *,
    query_position: int | None = None,
    path: Sequence[PathStep] = (),
) -> KeyScores:
    """Attention layer ``layer``'s output at ``query_position``, split by source position,
    against a neuron's keys (docs/methods.md 8.2 steps 1 and 4).

    Row ``p`` is ``sum_h alpha[h, q, p] * v[p, h] @ W_O[h]`` (``b_O`` excluded), optionally sent
    through ``path`` first (e.g. ``[(17, 22, 5)]`` for step 4).

    Args:
        query_position: the position whose attention output is split (default: last token).
    """
    arch = architecture(model)
    keys = _keys(model, keys)
    layer = arch.check_layer(layer)
    cap = _one_prompt(model, prompt, attention=True)
    q = _check_position(cap, -1 if query_position is None else query_position)
    hops = _resolve_path(arch, path, cap)
    vectors = _head_position_vectors(arch, cap, layer, q).sum(1)
    n = vectors.shape[0]
    return _key_scores(
        arch, keys, vectors, hops, [f"pos {p}" for p in range(n)], range(n),
        f"attention layer {layer} at position {q} by source position",
    )  # fmt: skip


@per_call
@refuses_processing()
def head_scores(
    model: Model,
    prompt: str | Tensor,
    layer: int,
    keys: "FFNKeys | tuple[int, int]",
    *,
    source_position: int,
    query_position: int | None = None,
    path: Sequence[PathStep] = (),
) -> KeyScores:
    """Each head's contribution from one source position against a neuron's keys (8.2
    step 2): row ``h`` is ``alpha[h, q, p] * v[p, h] @ W_O[h]``."""
    arch = architecture(model)
    keys = _keys(model, keys)
    layer = arch.check_layer(layer)
    cap = _one_prompt(model, prompt, attention=True)
    q = _check_position(cap, -1 if query_position is None else query_position)
    p = _check_position(cap, source_position)
    hops = _resolve_path(arch, path, cap)
    vectors = _head_position_vectors(arch, cap, layer, q)[p]
    return _key_scores(
        arch, keys, vectors, hops, [f"{layer}_{h}" for h in range(arch.n_heads)],
        range(arch.n_heads), f"heads of layer {layer}, source {p} -> position {q}",
    )  # fmt: skip


@per_call
@refuses_processing()
def component_scores(
    model: Model,
    prompt: str | Tensor,
    keys: "FFNKeys | tuple[int, int]",
    *,
    position: int,
    below_layer: int | None = None,
    path: Sequence[PathStep] = (),
) -> KeyScores:
    """Residual components at ``position`` (embedding, ``A[i]``, ``F[i]`` for ``i`` below
    ``below_layer``) through ``path`` against a neuron's keys (8.2 steps 3 and 5).

    Rows are labelled ``emb``, ``A3``, ``F3``; ``row_values`` hold the notebook's labels
    ``c / 2 - 0.5``. ``below_layer`` defaults to the first path step's layer (or the keys'
    layer without a path). Components include their biases (``b_O``, ``b_out``).
    """
    arch = architecture(model)
    keys = _keys(model, keys)
    cap = _one_prompt(model, prompt, attention=False)
    p = _check_position(cap, position)
    hops = _resolve_path(arch, path, cap)
    if below_layer is None:
        below_layer = path[0][0] if path else keys.layer
    if not 0 <= below_layer <= arch.n_layers:
        raise MechcnaError(f"below_layer {below_layer} out of range 0..{arch.n_layers}")
    n = 2 * below_layer + 1
    vectors = cap.components()[0, p, :n]
    return _key_scores(
        arch, keys, vectors, hops, component_labels(n), [c / 2 - 0.5 for c in range(n)],
        f"components at position {p} below layer {below_layer}",
    )  # fmt: skip


@per_call
@refuses_processing()
def neuron_scores(
    model: Model,
    prompt: str | Tensor,
    keys: "FFNKeys | tuple[int, int]",
    *,
    layer: int,
    position: int,
    path: Sequence[PathStep] = (),
) -> KeyScores:
    """Every neuron of FFN ``layer`` at ``position``, ``u_j = m[pos, j] * W_out[j]``, through
    ``path`` against a neuron's keys (8.2 step 6). Rows are ``"layer_neuron"``."""
    arch = architecture(model)
    keys = _keys(model, keys)
    layer = arch.check_layer(layer)
    cap = _one_prompt(model, prompt, attention=False)
    p = _check_position(cap, position)
    hops = _resolve_path(arch, path, cap)
    W_out = arch.W_out(layer).detach()
    vectors = cap.post[0, layer, p, :, None].to(W_out) * W_out
    return _key_scores(
        arch, keys, vectors, hops, [f"{layer}_{j}" for j in range(arch.d_mlp)],
        range(arch.d_mlp), f"FFN {layer} neurons at position {p}",
    )  # fmt: skip
