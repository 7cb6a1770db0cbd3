"""Feature transfer through attention: shallow vectors read after an attention layer.

Yu & Ananiadou, *Interpreting Arithmetic Mechanism in Large Language Models through
Comparative Neuron Analysis* (EMNLP 2024), section 4.4; docs/methods.md section 8. A shallow FFN
neuron can write a vector whose own top tokens mean nothing, yet which becomes readable (e.g.
"three, Three, III, 3") once an attention layer moves it to a later position. The transfer is
linear once the norm scale is frozen:

* ``nrm_{l,t}(v) = centre(v) / scale_{l,t} * gamma_l``: the pre-attention norm of layer ``l``
  with the scale of the **real residual** at position ``t`` (``blocks.l.ln1.hook_scale``),
  frozen, so the map is linear; ``centre`` subtracts the mean for LayerNorm and is the identity
  for RMSNorm.
* ``VO_{l,h}(u) = (u @ W_V[l][h]) @ W_O[l][h]`` for one head, and ``VO_l`` the sum over all
  heads, **with no attention weights** (the notebook's "full-layer VO").
* **Sandwich norms** (Gemma 2 and 3): ``W_O`` is the effective one (times the post-attention
  norm weight, :class:`~mechcna.models.architecture.Architecture`) and each hop's image is
  divided by the post-attention norm's scale, frozen at the hop's **destination** position (the
  next hop's position; for the last hop ``destination``, default the last token), so the map
  stays linear; without a prompt that scale is 1, like the pre-norm's.
* **Biases are excluded** (the norm's ``beta``, ``b_V`` and ``b_O``): they do not depend on the
  transferred vector, so leaving them out keeps every map linear, makes the transforms of
  components add up to the transform of their sum, and lets a two-hop path be two one-hop
  paths in sequence.

What this module offers:

* :func:`ffn_keys`: a deep neuron's keys (``up``/``gate`` for gated MLPs, ``in`` otherwise),
  each times the pre-MLP norm weight, and their raw inner products with residual vectors.
* ``source_position_scores``, ``head_scores``, ``component_scores``, ``neuron_scores``
  (in :mod:`mechcna.analyses.key_scores`): the steps of the "3+5=" pipeline (docs/methods.md
  8.2): which source positions, heads, earlier components and shallow neurons feed a neuron's
  keys, optionally through a path of attention transforms.
* :func:`transform_through_attention`: one- and two-hop transformed vectors of FFN neurons,
  token embeddings or any vector, with original vs transformed top tokens (paper Table 7).
* The zero-shot search for hidden-interpretable shallow neurons, built on these transforms,
  is in :mod:`mechcna.analyses.shallow`.

Example:
    >>> keys = ffn_keys(model, 19, 5769)                                   # doctest: +SKIP
    >>> source_position_scores(model, "3+5=", 17, keys).top(3)             # doctest: +SKIP
    >>> t = transform_through_attention(model, (12, 4072), [(15, None, 2)], prompt="3+5=")
    >>> t.tokens(10).to_frame()                                            # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH Table 7 and the feature-transfer stage (keys,
source positions, heads, components, attention-transformed vectors).
"""

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from transformer_lens.hook_points import HookPoint

from mechcna._types import Float, Tensor
from mechcna.analyses import plotting
from mechcna.engine.projection import TopTokens, compute_dtype, top_tokens
from mechcna.errors import MechcnaError, PathOrderError
from mechcna.interventions.edits import Intervention, intervene
from mechcna.interventions.positions import prompt_lengths
from mechcna.interventions.prompts import PromptBatch, Prompts, prepare_prompts, single_token_id
from mechcna.models.architecture import Architecture
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name, post_scale_name
from mechcna.models.inputs import positive_int, warn_user_hooks
from mechcna.models.processing import WeightProcessing, get_processing, refuses_processing
from mechcna.models.view import architecture, per_call

PathStep = tuple[int, int | None, int | None]


# ---------------------------------------------------------------------------- capture
@dataclass(frozen=True)
class PositionCapture:
    """Per-position activations of one forward pass (``[prompt, layer, pos, ...]``).

    Attributes:
        batch: the prompts, right-padded.
        resid_pre: residual entering each layer (``resid_pre[:, 0]`` is the embedding).
        attn_out: attention output (with ``b_O``).
        mlp_out: FFN output (with ``b_out``).
        post: FFN coefficients (``mlp.hook_post``); under sandwich norms divided by the
            post-feedforward norm's frozen scale at their position (``mlp_post_scale``), so
            ``post * Architecture.W_out`` is exactly each neuron's share of ``mlp_out``.
        ln1_scale: the pre-attention norm's scale (ones when the model has no norm).
        pattern: attention probabilities ``[prompt, layer, head, query_pos, key_pos]``.
        v: values with grouped-query heads expanded ``[prompt, layer, pos, head, d_head]``
            (raw: under sandwich norms divide by ``attn_post_scale`` at the **query**
            position, where the attention output lands).
        attn_post_scale, mlp_post_scale: the post-attention / post-feedforward norms' scales
            ``[prompt, layer, pos]`` (``None`` without sandwich norms).
    """

    batch: PromptBatch
    resid_pre: Float[Tensor, "prompt layer pos d_model"]
    attn_out: Float[Tensor, "prompt layer pos d_model"]
    mlp_out: Float[Tensor, "prompt layer pos d_model"]
    post: Float[Tensor, "prompt layer pos neuron"]
    ln1_scale: Float[Tensor, "prompt layer pos"]
    pattern: Float[Tensor, "prompt layer head_index query_pos key_pos"] | None
    v: Float[Tensor, "prompt layer pos head_index d_head"] | None
    attn_post_scale: Float[Tensor, "prompt layer pos"] | None = None
    mlp_post_scale: Float[Tensor, "prompt layer pos"] | None = None

    def components(self) -> Float[Tensor, "prompt pos component d_model"]:
        """``[embedding, A0, F0, A1, F1, ...]`` at every position (component ``c`` has label
        ``c / 2 - 0.5``: -0.5 the embedding, ``l`` attention ``l``, ``l + 0.5`` FFN ``l``)."""
        pairs = torch.stack([self.attn_out, self.mlp_out], 2)  # prompt layer two pos d
        rest = einops.rearrange(
            pairs, "prompt layer two pos d_model -> prompt pos (layer two) d_model"
        )
        return torch.cat([self.resid_pre[:, 0, :, None], rest], 2)


@per_call
def capture_positions(
    model: Model,
    prompts: Prompts,
    *,
    position: int | None = None,
    attention: bool = True,
    interventions: Iterable[Intervention] = (),
) -> PositionCapture:
    """Run ``prompts`` once and keep every position's residual components and coefficients."""
    arch = architecture(model)
    warn_user_hooks(model)
    batch = prepare_prompts(model, prompts, position)
    store: dict[str, Tensor] = {}

    def keep(key: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:
            store[key] = act.detach()

        return hook

    kinds = ["resid_pre", "attn_out", "mlp_out", "post"] + (["pattern", "v"] if attention else [])
    hooks: list[tuple[str | Callable, Callable]] = []
    for l in range(arch.n_layers):
        hooks += [(hook_name(kind, l), keep(f"{kind}{l}")) for kind in kinds]
        if arch.norm != "none":
            hooks.append((hook_name("scale", l, "ln1"), keep(f"scale{l}")))
        if arch.post_norms:
            hooks += [(post_scale_name(l, sub), keep(f"{sub}{l}")) for sub in _POST]
    with torch.no_grad(), intervene(model, *interventions), prompt_lengths(batch.lengths):
        model.run_with_hooks(batch.tokens, fwd_hooks=hooks)

    def stack(prefix: str) -> Tensor:
        return torch.stack([store[f"{prefix}{l}"] for l in range(arch.n_layers)], 1)

    if arch.norm != "none":
        scale = stack("scale")[..., 0]
    else:
        scale = torch.ones(batch.tokens.shape[0], arch.n_layers, batch.tokens.shape[1])
        scale = scale.to(arch.device, arch.dtype)
    pattern = v = None
    if attention:
        pattern = stack("pattern")
        vs = [store[f"v{l}"] for l in range(arch.n_layers)]
        repeat = arch.n_heads // vs[0].shape[2]
        v = torch.stack([x.repeat_interleave(repeat, dim=2) for x in vs], 1)
    post = stack("post")
    attn_s = mlp_s = None
    if arch.post_norms:  # freeze the post-norms' scales per position
        attn_s, mlp_s = (stack(sub)[..., 0] for sub in _POST)
        post = post / mlp_s[..., None].to(post.dtype)
    return PositionCapture(
        batch=batch,
        resid_pre=stack("resid_pre"),
        attn_out=stack("attn_out"),
        mlp_out=stack("mlp_out"),
        post=post,
        ln1_scale=scale,
        pattern=pattern,
        v=v,
        attn_post_scale=attn_s,
        mlp_post_scale=mlp_s,
    )


_POST = ("ln1_post", "ln2_post")


def _check_position(cap: PositionCapture, position: int, prompt: int = 0) -> int:
    n = int(cap.batch.lengths[prompt])
    if not -n <= position < n:
        raise MechcnaError(f"position {position} out of range for a prompt of {n} tokens")
    return position % n


def component_labels(n_components: int) -> list[str]:
    """Names of residual components ``[emb, A0, F0, A1, ...]``."""
    return ["emb"] + [("A" if c % 2 else "F") + str((c - 1) // 2) for c in range(1, n_components)]


# ---------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class FFNKeys:
    """The keys of one FFN neuron, each times the pre-MLP norm weight (docs/methods.md 8.1).

    Attributes:
        layer, neuron: the neuron.
        names: ``("up", "gate")`` for gated MLPs, ``("in",)`` otherwise.
        vectors: ``[key, d_model]`` the keys.
    """

    layer: int
    neuron: int
    names: tuple[str, ...]
    vectors: Float[Tensor, "key d_model"]
    processing: WeightProcessing | None = None

    def inner(self, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... key"]:
        """Raw inner products ``<residual, key>`` (no norm scale, as in the notebook)."""
        keys = self.vectors.to(residual)
        return einops.einsum(residual, keys, "... d_model, key d_model -> ... key")


@per_call
@refuses_processing()
def ffn_keys(model: Model, layer: int, neuron: int) -> FFNKeys:
    """Keys of FFN neuron ``(layer, neuron)``: ``W_in`` (up) and ``W_gate`` columns times the
    pre-MLP norm weight ``ln2.w`` (only ``W_in`` for non-gated MLPs)."""
    arch = architecture(model)
    layer, neuron = arch.check_neuron(layer, neuron)
    gamma = arch.ln2_w(layer)
    gate = arch.W_gate(layer)
    with torch.no_grad():
        if gate is None:
            vectors = (arch.W_in(layer)[:, neuron] * gamma)[None]
            return FFNKeys(layer, neuron, ("in",), vectors, get_processing(model))
        vectors = torch.stack([arch.W_in(layer)[:, neuron], gate[:, neuron]]) * gamma
    return FFNKeys(layer, neuron, ("up", "gate"), vectors, get_processing(model))


def _keys(model: Model, keys: "FFNKeys | tuple[int, int]") -> FFNKeys:
    return keys if isinstance(keys, FFNKeys) else ffn_keys(model, *keys)


# ---------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class _Hop:
    layer: int
    head: int | None
    scale: float
    post_scale: float = 1.0


def _resolve_path(
    arch: Architecture,
    path: Sequence[PathStep],
    cap: PositionCapture | None,
    destination: int | None = None,
) -> list[_Hop]:
    """Each step's frozen pre-attention norm scale at its position, and under sandwich norms
    the post-attention norm's scale at its destination: the next step's position, and for the
    last step ``destination`` (default: the last token)."""
    hops = []
    for k, step in enumerate(path):
        if len(step) != 3:
            raise MechcnaError(f"path steps are (layer, head_or_None, position), got {step!r}")
        layer, head, position = step
        if head is None:
            layer = arch.check_layer(layer)
        else:
            layer, head = arch.check_head(layer, head)
        if cap is None:
            scale = 1.0
        elif position is None:
            raise MechcnaError("with a prompt, each path step needs a position")
        else:
            position = _check_position(cap, position)
            scale = float(cap.ln1_scale[0, layer, position])
        post_scale = 1.0
        if cap is not None and cap.attn_post_scale is not None:
            nxt = path[k + 1][2] if k + 1 < len(path) else destination
            dest = _check_position(cap, -1 if nxt is None else nxt)
            post_scale = float(cap.attn_post_scale[0, layer, dest])
        hops.append(_Hop(layer, head, scale, post_scale))
    return hops


def _centres(arch: Architecture) -> bool:
    return arch.norm in ("LN", "LNPre")


def _vo(arch: Architecture, hop: _Hop, x: Tensor) -> Tensor:
    """``VO(nrm(x))`` for one hop, biases excluded (divided by the frozen post-attention
    scale under sandwich norms; ``W_O`` already carries the post-norm weight)."""
    if _centres(arch):
        x = x - x.mean(-1, keepdim=True)
    x = x / hop.scale * arch.ln1_w(hop.layer).to(x)
    W_V, W_O = arch.W_V(hop.layer).to(x), arch.W_O(hop.layer).to(x) / hop.post_scale
    if hop.head is not None:
        z = einops.einsum(x, W_V[hop.head], "... d_model, d_model d_head -> ... d_head")
        return einops.einsum(z, W_O[hop.head], "... d_head, d_head d_model -> ... d_model")
    z = einops.einsum(x, W_V, "... d_model, head d_model d_head -> ... head d_head")
    return einops.einsum(z, W_O, "... head d_head, head d_head d_model -> ... d_model")


def _apply(arch: Architecture, hops: Sequence[_Hop], x: Tensor) -> list[Tensor]:
    out = []
    with torch.no_grad():
        for hop in hops:
            x = _vo(arch, hop, x)
            out.append(x)
    return out


@per_call
@refuses_processing()
def vo_transform(
    model: Model,
    vectors: Float[Tensor, "... d_model"],
    layer: int,
    head: int | None = None,
    *,
    scale: float = 1.0,
    post_scale: float = 1.0,
) -> Float[Tensor, "... d_model"]:
    """``VO_{l,h}(nrm(v))`` (or the full layer's ``VO_l`` when ``head`` is ``None``).

    Args:
        scale: the frozen norm scale ``scale_{l,t}`` (``blocks.l.ln1.hook_scale`` at the
            vector's position); 1 gives the direction only.
        post_scale: under sandwich norms, the post-attention norm's frozen scale at the
            destination position (``blocks.l.ln1_post.hook_scale``); ``W_O`` carries the
            post-norm weight. 1 gives the direction only; ignored without sandwich norms.
    """
    arch = architecture(model)
    layer, head = (arch.check_layer(layer), None) if head is None else arch.check_head(layer, head)
    post = post_scale if arch.post_norms else 1.0
    hop = _Hop(layer, head, scale, post)
    return _apply(arch, [hop], vectors.to(compute_dtype(arch.dtype)))[-1]


@dataclass(frozen=True)
class TokenComparison:
    """Top and bottom tokens of a vector before and after each transform (paper Table 7)."""

    label: str
    columns: tuple[str, ...]
    tokens: tuple[TopTokens, ...]
    processing: WeightProcessing | None = None

    def top(self, k: int = 10) -> pd.DataFrame:
        """Wide table: the top-``k`` tokens of each column."""
        k = positive_int(k, "k")
        return pd.DataFrame(
            {c: [t for t, _ in tt.top[:k]] for c, tt in zip(self.columns, self.tokens)}
        )

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for c, tt in zip(self.columns, self.tokens):
            frame = tt.to_frame()
            frame.insert(0, "column", c)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def plot(self) -> go.Figure:
        return plotting.token_table(self)


@dataclass(frozen=True)
class AttentionTransform:
    """A vector and its images after each hop of an attention path (docs/methods.md 8.1-8.2).

    Attributes:
        label: what was transformed (``"12_4072"``, ``"token '3'"``, ``"vector"``).
        path: the path, as ``(layer, head_or_None, position)`` steps.
        original: ``[..., d_model]`` the vector(s) before the first hop.
        hops: ``[hop, ..., d_model]`` the vector(s) after each hop.
    """

    label: str
    path: tuple[PathStep, ...]
    original: Float[Tensor, "... d_model"]
    hops: Float[Tensor, "hop ... d_model"]
    model: Model = field(repr=False)

    @property
    def processing(self) -> WeightProcessing:
        """The weight processing of the model the transform used."""
        return get_processing(self.model)

    @property
    def transformed(self) -> Tensor:
        """The vector(s) after the last hop."""
        return self.hops[-1]

    def tokens(self, k: int = 10, *, paper_compat: bool = True) -> TokenComparison:
        """Top/bottom tokens of the original and of each hop's image (one vector only)."""
        if self.original.ndim != 1:
            raise MechcnaError("tokens() needs a single vector, not a batch")
        columns = ["original"] + [_step_name(s) for s in self.path]
        vecs = [self.original, *self.hops]
        tt = tuple(top_tokens(self.model, v, k, paper_compat=paper_compat) for v in vecs)
        return TokenComparison(self.label, tuple(columns), tt, self.processing)

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.tokens(k).top(k)

    def to_frame(self, k: int = 10) -> pd.DataFrame:
        return self.tokens(k).to_frame()

    def plot(self, k: int = 10) -> go.Figure:
        return self.tokens(k).plot()


def _check_path_order(arch: Architecture, path: Sequence[PathStep], source: object) -> None:
    """Each hop must read what came before: an attention layer reads ``resid_pre``, so a
    neuron of layer ``i`` reaches attention layers ``> i`` only, and hops go up."""
    layers = []
    for step in path:
        if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) != 3:
            raise MechcnaError(f"a path step is (layer, head_or_None, position), not {step!r}")
        layers.append(arch.check_layer(step[0]))
    if isinstance(source, tuple):
        layer = arch.check_layer(source[0])
        if layers[0] <= layer:
            raise PathOrderError(
                f"neuron {source[0]}_{source[1]} writes after attention layer {layers[0]} "
                f"reads: the first hop must be a layer above {layer}"
            )
    for a, b in itertools.pairwise(layers):
        if b <= a:
            raise PathOrderError(f"hop to attention layer {b} after layer {a}: hops must go up")


def _step_name(step: PathStep) -> str:
    layer, head, position = step
    where = "" if position is None else f" @pos {position}"
    return f"after L{layer}" + ("" if head is None else f"H{head}") + where


@per_call
@refuses_processing()
def transform_through_attention(
    model: Model,
    vector_or_neuron: Float[Tensor, "... d_model"] | tuple[int, int] | str,
    path: Sequence[PathStep],
    prompt: str | Tensor | None = None,
    *,
    coefficient: bool = False,
    destination: int | None = None,
) -> AttentionTransform:
    """Transform a vector through a path of attention VO maps, without attention weights.

    Each step ``(layer, head_or_None, position)`` applies ``VO_{layer,head}(nrm_{layer,pos}(.))``
    (the full layer when ``head`` is ``None``), where ``nrm`` uses the real, frozen
    ``ln1.hook_scale`` of ``prompt`` at ``(layer, position)`` (docs/methods.md 8.1); biases are
    excluded so every step is linear. ``[(15, None, 2)]`` is one hop (Table 7);
    ``[(15, None, 2), (17, 22, 5)]`` is the two-hop transform of 8.2 step 5.

    Args:
        vector_or_neuron: a ``[..., d_model]`` vector (batch), an FFN neuron
            ``(layer, neuron)`` (its raw value vector, the ``W_out`` row, times the
            post-feedforward norm weight under sandwich norms), or a single token
            whose embedding row of ``W_E`` is used (no positional embedding).
        path: the steps, first applied first.
        prompt: the prompt whose residual scales are used; ``None`` uses scale 1 (token
            rankings are unchanged: the scale is a positive scalar per step).
        coefficient: for a neuron, multiply its value vector by its coefficient ``m`` at the
            first step's position in ``prompt`` (the notebook's ``u = m * fc2``; under
            sandwich norms ``m`` is divided by the post-feedforward norm's frozen scale there,
            so ``u`` is the neuron's exact share of the FFN output).
        destination: under sandwich norms, the position where the last hop's output lands
            (its post-attention norm scale is frozen there; default: the last token of
            ``prompt``). Ignored without sandwich norms or without a prompt.

    Raises:
        MechcnaError: an empty path, or a layer, head, position or neuron out of range.
    """
    arch = architecture(model)
    if not path:
        raise MechcnaError("the path needs at least one (layer, head_or_None, position) step")
    _check_path_order(arch, path, vector_or_neuron)
    cap = None
    if prompt is not None:
        if isinstance(prompt, Tensor) and prompt.ndim == 2 and prompt.shape[0] != 1:
            raise MechcnaError("transform_through_attention takes one prompt")
        cap = capture_positions(model, prompt, attention=False)
    hops = _resolve_path(arch, path, cap, destination)
    dtype = compute_dtype(arch.dtype)
    if isinstance(vector_or_neuron, tuple):
        layer, neuron = arch.check_neuron(*vector_or_neuron)
        vector = arch.W_out(layer)[neuron].detach().to(dtype)
        label = f"{layer}_{neuron}"
        if coefficient:
            if cap is None:
                raise MechcnaError("coefficient=True needs a prompt")
            pos = _check_position(cap, path[0][2] if path[0][2] is not None else -1)
            vector = vector * cap.post[0, layer, pos, neuron].to(dtype)
            label += f" x m@{pos}"
    elif isinstance(vector_or_neuron, str):
        token = single_token_id(model, vector_or_neuron, what="token")
        vector = model.W_E[token].detach().to(dtype)
        label = f"token {vector_or_neuron!r}"
    else:
        vector = vector_or_neuron.detach().to(dtype)
        label = "vector"
        if vector.shape[-1] != arch.d_model:
            raise MechcnaError(f"vectors have {vector.shape[-1]} features, not {arch.d_model}")
    steps = tuple((int(l), None if h is None else int(h), p) for l, h, p in path)
    out = _apply(arch, hops, vector)
    return AttentionTransform(label, steps, vector, torch.stack(out), model)
