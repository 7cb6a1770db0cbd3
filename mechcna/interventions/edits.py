"""Interventions as scoped TransformerLens hooks, and their weight-space equivalents.

Each intervention is a small frozen dataclass that knows (a) the forward hooks that realise it
and (b), where possible, how to write the same change into a copy of the weights. Apply any
number of them with the :func:`intervene` context manager; contexts nest and compose, and no
hook survives the ``with`` block, even when the body raises.

* :class:`HeadAblation`: zero a head's output (``attn.hook_z``), or replace it with its mean
  over a reference set (:meth:`HeadAblation.mean_over`). Zeroing ``z`` equals zeroing the
  head's slice of ``W_O`` (the output bias stays, as in the papers' code).
* :class:`NeuronEdit`: zero, scale or set FFN neuron coefficients (``mlp.hook_post``).
* :class:`KeepNeurons`: zero every FFN neuron of the given layers except a kept set.
* :class:`AttentionNeuronEdit`: remove attention neurons' contributions at one position.
* :class:`Patch`: overwrite any activation with the one from another run.

All act on every position unless ``positions`` is given: indices into **each prompt's own
real tokens**, negative allowed (``-1`` is each prompt's last real token). mechcna's analyses
run right-padded batches and tell the hooks each prompt's length (:func:`prompt_lengths`), so
a batched analysis equals the same analysis prompt by prompt. Outside an analysis (a plain
``model(tokens)`` inside :func:`intervene`) every row counts as real, so negative positions
index the tensor's position axis.

Example:
    >>> with intervene(model, HeadAblation([(1, 0)]), NeuronEdit([(0, 5)])):  # doctest: +SKIP
    ...     logits = model(tokens)
    >>> edited = apply_to_weights(model, HeadAblation([(1, 0)]))              # doctest: +SKIP
"""

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import einops
import torch
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

from mechcna._types import Tensor, Tokens
from mechcna.errors import (
    EmptyInputError,
    InvalidOptionError,
    MechcnaError,
    PositionError,
    UnsupportedArchitectureError,
)
from mechcna.interventions.positions import position_mask, row_lengths
from mechcna.models import backend, replica
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name
from mechcna.models.inputs import as_int, edit_value, pair
from mechcna.models.processing import VALUE_BIAS, require_unprocessed
from mechcna.models.view import architecture

HookFn = Callable[[Tensor, HookPoint], Tensor]
FwdHooks = list[tuple[str, HookFn]]
Positions = Sequence[int] | None


@runtime_checkable
class Intervention(Protocol):
    """What :func:`intervene` needs from an intervention."""

    def fwd_hooks(self, model: Model) -> FwdHooks: ...

    def write_weights(self, model: Model) -> None: ...


def _positions(positions: Iterable[int] | None) -> Positions:
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise MechcnaError(f"positions must be a sequence of integers, not {positions!r}")
    out = [as_int(p, "positions") for p in positions]
    if not out:
        raise MechcnaError("positions is empty: pass None to act on every position")
    return tuple(out)


def _edit(
    act: Tensor, positions: Positions, index: tuple, fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Apply ``fn`` to ``act[:, positions][index]`` in place (all positions if ``None``);
    positions are relative to each prompt's real tokens (see :func:`prompt_lengths`)."""
    if positions is None:
        act[(slice(None), slice(None), *index)] = fn(act[(slice(None), slice(None), *index)])
        return act
    sel = position_mask(positions, act.shape[0], act.shape[1], act.device)
    sub = act[sel]  # [selected, ...]
    sub[(slice(None), *index)] = fn(sub[(slice(None), *index)])
    act[sel] = sub
    return act


def _pairs(items: object, what: str) -> tuple[tuple[int, int], ...]:
    """``(layer, index)`` integer pairs (a malformed pair is an error, never truncated)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise MechcnaError(f"{what}s must be a list of (layer, {what}) pairs, not {items!r}")
    out = []
    for item in items:
        a, b = pair(item, f"a (layer, {what}) pair")
        out.append((as_int(a, "layer"), as_int(b, what)))
    if not out:
        raise EmptyInputError(f"no {what}s given")
    return tuple(out)


def _no_positions(kind: str, positions: Positions) -> None:
    if positions is not None:
        raise MechcnaError(f"{kind} at given positions has no weight-space equivalent")


@dataclass(frozen=True, eq=False)
class HeadAblation:
    """Ablate attention heads: ``mode="zero"`` sets their ``z`` to 0, ``mode="mean"`` to a mean.

    Args:
        heads: ``(layer, head)`` pairs.
        mode: ``"zero"`` or ``"mean"`` (build the latter with :meth:`mean_over`).
        means: per-head mean ``z`` (``[d_head]``), keyed by ``(layer, head)``; mean mode only.
        positions: positions to ablate (default: all).
    """

    heads: Sequence[tuple[int, int]]
    mode: Literal["zero", "mean"] = "zero"
    means: dict[tuple[int, int], Tensor] | None = field(default=None, repr=False)
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _pairs(self.heads, "head"))
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.mode not in ("zero", "mean"):
            raise InvalidOptionError(f"mode must be 'zero' or 'mean', not {self.mode!r}")
        if self.mode == "mean" and (self.means is None or set(self.means) < set(self.heads)):
            raise MechcnaError(
                "mean ablation needs means for every head: use HeadAblation.mean_over"
            )

    @classmethod
    def mean_over(
        cls,
        model: Model,
        heads: Sequence[tuple[int, int]],
        reference: "Tokens | str | Sequence[str]",
        positions: Iterable[int] | None = None,
        attention_mask: Tensor | None = None,
    ) -> "HeadAblation":
        """Mean ablation: each head's ``z`` replaced by its mean over the reference tokens
        (over prompts and positions). ``reference`` is token ids (padding excluded when
        ``attention_mask`` is given) or prompt strings (right-padded; padding excluded)."""
        arch = architecture(model)
        heads = [arch.check_head(l, h) for l, h in heads]
        if not isinstance(reference, Tensor):
            from mechcna.interventions.prompts import prepare_prompts

            batch = prepare_prompts(model, reference)
            reference = batch.tokens
            n_pos = reference.shape[1]
            attention_mask = torch.arange(n_pos)[None] < batch.lengths.cpu()[:, None]
        layers = sorted({l for l, _ in heads})
        names = [hook_name("z", l) for l in layers]
        with torch.no_grad():
            _, cache = model.run_with_cache(reference, names_filter=lambda n: n in names)
        w = attention_mask if attention_mask is not None else torch.ones(reference.shape[:2])
        w = w.to(model.W_U.device, model.W_U.dtype)
        means = {}
        for l, h in heads:
            z = cache[hook_name("z", l)][:, :, h]
            total = einops.einsum(z, w, "batch pos d_head, batch pos -> d_head")
            means[(l, h)] = total / w.sum()
        return cls(heads, mode="mean", means=means, positions=_positions(positions))

    def fwd_hooks(self, model: Model) -> FwdHooks:
        arch = architecture(model)
        if self.mode == "zero":
            require_unprocessed(model, "zero-ablating a head", VALUE_BIAS)
        by_layer: dict[int, list[int]] = defaultdict(list)
        for l, h in self.heads:
            l, h = arch.check_head(l, h)
            by_layer[l].append(h)
        hooks: FwdHooks = []
        for layer, hs in by_layer.items():
            idx = torch.tensor(hs)
            if self.mode == "zero":
                fill = None
            else:
                assert self.means is not None
                fill = torch.stack([self.means[(layer, h)] for h in hs])

            def hook(z: Tensor, hook: HookPoint, idx=idx, fill=fill) -> Tensor:
                value = torch.zeros(()) if fill is None else fill
                return _edit(
                    z,
                    self.positions,
                    (idx.to(z.device),),
                    lambda sub, v=value: v.to(sub).expand_as(sub).clone(),
                )

            hooks.append((hook_name("z", layer), hook))
        return hooks

    def write_weights(self, model: Model) -> None:
        _no_positions("head ablation", self.positions)
        arch = architecture(model)
        if self.mode == "zero":
            require_unprocessed(model, "zero-ablating a head", VALUE_BIAS)
        with torch.no_grad():
            for l, h in self.heads:
                l, h = arch.check_head(l, h)
                attn = model.blocks[l].attn
                if self.mode == "mean":
                    assert self.means is not None
                    mean = self.means[(l, h)].to(attn.W_O)
                    shift = einops.einsum(mean, attn.W_O[h], "d_head, d_head d_model -> d_model")
                    backend.live_bias(attn, "b_O").add_(shift)
                attn.W_O[h] = 0.0


@dataclass(frozen=True, eq=False, init=False)
class NeuronEdit:
    """Zero, scale or set FFN neuron coefficients (``blocks.{l}.mlp.hook_post``).

    Args:
        neurons: ``(layer, neuron)`` pairs.
        mode: ``"zero"``, ``"scale"`` (multiply by ``value``) or ``"set"`` (to ``value``); the
            same keyword as :class:`HeadAblation`'s ``mode``. ``op=`` is its deprecated old name
            (accepted with a ``DeprecationWarning``).
        value: the factor or the value (required by "scale" and "set", none for "zero").
        positions: positions to edit (default: all).
    """

    neurons: Sequence[tuple[int, int]]
    mode: Literal["zero", "scale", "set"]
    value: float | None
    positions: Sequence[int] | None

    def __init__(
        self,
        neurons: Sequence[tuple[int, int]],
        mode: str | None = None,
        value: float | None = None,
        positions: Sequence[int] | None = None,
        *,
        op: str | None = None,
    ) -> None:
        if op is not None:
            warnings.warn(
                "NeuronEdit(op=...) is deprecated: use mode=... (as HeadAblation)",
                DeprecationWarning,
                stacklevel=2,
            )
            if mode is not None and mode != op:
                raise InvalidOptionError(f"NeuronEdit got mode={mode!r} and op={op!r}: give mode")
            mode = op
        mode = "zero" if mode is None else mode
        if mode not in ("zero", "scale", "set"):
            raise InvalidOptionError(f"mode must be 'zero', 'scale' or 'set', not {mode!r}")
        object.__setattr__(self, "neurons", _pairs(neurons, "neuron"))
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "value", edit_value(mode, value))
        object.__setattr__(self, "positions", _positions(positions))

    @property
    def op(self) -> str:
        """Deprecated name of :attr:`mode`."""
        return self.mode

    def _by_layer(self, model: Model) -> dict[int, Tensor]:
        arch = architecture(model)
        by_layer: dict[int, list[int]] = defaultdict(list)
        for l, k in self.neurons:
            l, k = arch.check_neuron(l, k)
            by_layer[l].append(k)
        return {l: torch.tensor(sorted(set(ks))) for l, ks in by_layer.items()}

    def _fn(self) -> Callable[[Tensor], Tensor]:
        v = self.value or 0.0
        if self.mode == "zero":
            return torch.zeros_like
        return (lambda sub: sub * v) if self.mode == "scale" else (lambda s: torch.full_like(s, v))

    def fwd_hooks(self, model: Model) -> FwdHooks:
        fn = self._fn()
        hooks: FwdHooks = []
        for layer, idx in self._by_layer(model).items():

            def hook(post: Tensor, hook: HookPoint, idx=idx) -> Tensor:
                return _edit(post, self.positions, (idx.to(post.device),), fn)

            hooks.append((hook_name("post", layer), hook))
        return hooks

    def write_weights(self, model: Model) -> None:
        _no_positions("neuron edit", self.positions)
        with torch.no_grad():
            for layer, idx in self._by_layer(model).items():
                mlp = model.blocks[layer].mlp
                v = self.value or 0.0
                if self.mode == "set":
                    backend.live_bias(mlp, "b_out").add_(v * mlp.W_out[idx].sum(0))
                factor = v if self.mode == "scale" else 0.0
                mlp.W_out[idx] = mlp.W_out[idx] * factor


@dataclass(frozen=True, eq=False)
class KeepNeurons:
    """Zero every FFN neuron in ``layers`` except ``neurons`` (the papers' "keep" experiment).

    Args:
        neurons: ``(layer, neuron)`` pairs to keep.
        layers: the layers whose other neurons are zeroed, e.g. ``range(17, 32)``.
        positions: positions to edit (default: all).
    """

    neurons: Sequence[tuple[int, int]]
    layers: Sequence[int]
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "neurons", _pairs(self.neurons, "neuron") if self.neurons else ())
        object.__setattr__(self, "layers", tuple(as_int(l, "layer") for l in self.layers))
        object.__setattr__(self, "positions", _positions(self.positions))

    def as_edit(self, model: Model) -> NeuronEdit:
        """The equivalent :class:`NeuronEdit` zeroing the complement."""
        arch = architecture(model)
        keep = {arch.check_neuron(l, k) for l, k in self.neurons}
        layers = sorted({arch.check_layer(l) for l in self.layers})
        drop = [(l, k) for l in layers for k in range(arch.d_mlp) if (l, k) not in keep]
        return NeuronEdit(drop, "zero", positions=self.positions)

    def fwd_hooks(self, model: Model) -> FwdHooks:
        return self.as_edit(model).fwd_hooks(model)

    def write_weights(self, model: Model) -> None:
        self.as_edit(model).write_weights(model)


@dataclass(frozen=True, eq=False)
class NeuronMask:
    """Zero FFN neurons per prompt: ``mask[prompt, layer, neuron]`` (True = zero it).

    Lets one batched forward pass run a different neuron set for each prompt (e.g. each
    case's own top-K CNA neurons). The batch must have ``mask.shape[0]`` prompts.
    """

    mask: Tensor = field(repr=False)
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.mask.ndim != 3 or self.mask.dtype != torch.bool:
            raise MechcnaError("mask must be a [prompt, layer, neuron] boolean tensor")
        object.__setattr__(self, "positions", _positions(self.positions))

    def fwd_hooks(self, model: Model) -> FwdHooks:
        arch = architecture(model)
        if self.mask.shape[1:] != (arch.n_layers, arch.d_mlp):
            raise MechcnaError(
                f"mask has shape {tuple(self.mask.shape)}, expected [prompt, "
                f"{arch.n_layers}, {arch.d_mlp}]"
            )
        hooks: FwdHooks = []
        for layer in self.mask.any(0).any(-1).nonzero().flatten().tolist():
            keep = ~self.mask[:, layer]

            def hook(post: Tensor, hook: HookPoint, keep=keep) -> Tensor:
                if post.shape[0] != keep.shape[0]:
                    raise MechcnaError(
                        f"NeuronMask for {keep.shape[0]} prompts applied to {post.shape[0]}"
                    )
                factor = keep.to(post)[:, None, :]
                if self.positions is None:
                    return post * factor
                sel = position_mask(self.positions, post.shape[0], post.shape[1], post.device)
                return torch.where(sel[..., None], post * factor, post)

            hooks.append((hook_name("post", layer), hook))
        return hooks

    def write_weights(self, model: Model) -> None:
        raise MechcnaError("a per-prompt neuron mask has no weight-space equivalent")


@dataclass(frozen=True, eq=False)
class AttentionNeuronEdit:
    """Remove attention neurons' contributions at one query position (ATTR's intervention on
    "value attention neurons"; docs/methods.md 4.5 and 4.6).

    Neuron ``(layer, source_pos, head, dim)`` writes ``pattern[head, T, source_pos] *
    v[source_pos, head, dim]`` into ``z[T, head, dim]`` (then row ``dim`` of ``W_O[head]``); this
    intervention subtracts exactly that term at query position ``T = position``, leaving every
    other position and source untouched. Removing every source of a head equals zeroing its
    ``z`` at ``T`` (tested). Policy: the paper does not say how it zeroes attention neurons;
    this removes precisely what :func:`mechcna.attention_neuron_importance` scores.

    Args:
        neurons: ``(layer, source_pos, head, dim)`` tuples (source positions index the prompt).
        position: the query position; negative counts from each prompt's last real token
            (so ``-1`` is every prompt's last token in a right-padded batch). Negative source
            positions count the same way. Repeated neurons are removed once.
    """

    neurons: Sequence[tuple[int, int, int, int]]
    position: int = -1

    def __post_init__(self) -> None:
        neurons = tuple(tuple(int(x) for x in n) for n in self.neurons)
        # each neuron once: a repeat must not remove the same term twice
        object.__setattr__(self, "neurons", tuple(dict.fromkeys(neurons)))
        if any(len(n) != 4 for n in self.neurons):
            raise MechcnaError("attention neurons are (layer, source_pos, head, dim) tuples")

    def fwd_hooks(self, model: Model) -> FwdHooks:
        arch = architecture(model)
        by_layer: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for l, p, h, d in self.neurons:
            l, h = arch.check_head(l, h)
            if not 0 <= d < arch.d_head:
                raise MechcnaError(f"dimension {d} out of range: heads have {arch.d_head}")
            by_layer[l].append((p, h, d))
        hooks: FwdHooks = []
        for layer, items in by_layer.items():
            idx = torch.tensor(items)  # neuron (pos head dim)
            store: dict[str, Tensor] = {}

            def keep_pattern(act: Tensor, hook: HookPoint, store=store) -> Tensor:
                store["pattern"] = act  # batch head query_pos key_pos
                return act

            def keep_v(act: Tensor, hook: HookPoint, store=store) -> Tensor:
                store["v"] = act  # batch key_pos kv_head d_head
                return act

            def edit_z(z: Tensor, hook: HookPoint, store=store, idx=idx) -> Tensor:
                # Per row of a right-padded batch, negative positions count from that
                # prompt's own last real token (the lengths announced by prompt_lengths).
                lengths = row_lengths(z.shape[0], z.shape[1]).to(z.device)
                t = (
                    self.position + lengths
                    if self.position < 0
                    else torch.full_like(lengths, self.position)
                )  # [batch]
                pos, head, dim = (idx[:, i].to(z.device) for i in range(3))
                src = torch.where(pos[None] < 0, lengths[:, None] + pos[None], pos[None])
                if (t < 0).any() or (t >= lengths).any():
                    raise PositionError(f"query position {self.position} is outside a prompt")
                if (src < 0).any() or (src > t[:, None]).any():
                    raise MechcnaError("a source position is after the query position")
                kv = head // (arch.n_heads // store["v"].shape[2])
                rows = torch.arange(z.shape[0], device=z.device)[:, None]
                term = (
                    store["pattern"][rows, head[None], t[:, None], src]
                    * store["v"][rows, src, kv[None], dim[None]]
                )  # [batch, neuron]
                z = z.clone()
                z.index_put_(
                    (rows.expand_as(term), t[:, None].expand_as(term), head[None].expand_as(term),
                     dim[None].expand_as(term)),
                    -term,
                    accumulate=True,
                )  # fmt: skip
                return z

            hooks += [
                (hook_name("pattern", layer), keep_pattern),
                (hook_name("v", layer), keep_v),
                (hook_name("z", layer), edit_z),
            ]
        return hooks

    def write_weights(self, model: Model) -> None:
        raise MechcnaError("an attention-neuron edit at one position has no weight equivalent")


@dataclass(frozen=True, eq=False)
class Patch:
    """Overwrite the activation at ``hook`` with ``source`` (e.g. from another run's cache).

    ``source`` must have the activation's shape, or batch size 1 to broadcast over prompts.
    """

    hook: str
    source: Tensor = field(repr=False)
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _positions(self.positions))

    @classmethod
    def from_cache(
        cls, cache: ActivationCache, hooks: Iterable[str], positions: Iterable[int] | None = None
    ) -> list["Patch"]:
        """One patch per hook name, taking the activations stored in ``cache``."""
        return [cls(h, cache[h], _positions(positions)) for h in hooks]

    def fwd_hooks(self, model: Model) -> FwdHooks:
        if self.hook not in model.hook_dict:
            raise MechcnaError(f"no hook named {self.hook!r} in this model")
        backend.check_writable(model, self.hook)

        def hook(act: Tensor, hook: HookPoint) -> Tensor:
            src = self.source.to(act)
            if src.shape[1:] != act.shape[1:] or src.shape[0] not in (1, act.shape[0]):
                raise MechcnaError(
                    f"patch source for {self.hook} has shape {tuple(src.shape)}, "
                    f"activation has {tuple(act.shape)}"
                )
            src = src.expand_as(act)
            if self.positions is None:
                return src.clone()
            sel = position_mask(self.positions, act.shape[0], act.shape[1], act.device)
            act[sel] = src[sel]
            return act

        return [(self.hook, hook)]

    def write_weights(self, model: Model) -> None:
        raise MechcnaError("activation patching has no weight-space equivalent")


def collect_hooks(model: Model, interventions: Iterable[object]) -> FwdHooks:
    """All forward hooks of ``interventions``, validated against ``model``."""
    hooks: FwdHooks = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise MechcnaError(f"{iv!r} is not an intervention")
        hooks.extend(iv.fwd_hooks(model))
    return hooks


@contextmanager
def intervene(model: Model, *interventions: Intervention) -> Iterator[Model]:
    """Context manager applying ``interventions`` through hooks; removes them on exit.

    Contexts nest (inner hooks add to outer ones) and clean up even if the body raises.
    """
    hooks = collect_hooks(model, interventions)
    with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
        yield model


def apply_to_weights(model: Model, *interventions: Intervention) -> Model:
    """A deep copy of ``model`` with ``interventions`` written into its weights (for export).

    Zeroing a head zeroes its ``W_O`` slice; zeroing a neuron zeroes its ``W_out`` row; mean
    ablation and ``set`` move the constant into the output bias. The original is untouched.
    On a TransformerBridge the edited copy is checked against the same edits by hooks on a
    short probe (a processed Llama bridge's weight properties are copies its forward pass
    does not read: refused with :class:`UnsupportedArchitectureError`).
    """
    edited = replica.copy_model(model)
    for iv in interventions:
        iv.write_weights(edited)
    if backend.is_bridge(model):
        _check_written(model, edited, interventions)
    return edited


def _check_written(model: Model, edited: Model, interventions: Sequence[Intervention]) -> None:
    """A bridge's weight properties need not be the tensors its forward pass uses (a
    processed Llama bridge hands out copies): compare the edited copy with the same edits by
    hooks on a short probe, and refuse rather than return a silently unedited model."""
    probe = (torch.arange(8, device=model.cfg.device) % model.cfg.d_vocab)[None]
    with torch.no_grad():
        by_weights = edited(probe)
        with intervene(model, *interventions):
            by_hooks = model(probe)
    if not torch.allclose(by_weights, by_hooks, rtol=1e-4, atol=1e-4):
        diff = float((by_weights - by_hooks).abs().max())
        raise UnsupportedArchitectureError(
            f"weight edits do not reach this TransformerBridge's forward pass (its processed "
            f"weights are copies; logits differ from the same edits by hooks by {diff:.3g}): "
            "apply the interventions with hooks (mechcna.intervene), or load the model "
            "unprocessed (processing=mechcna.NO_PROCESSING)"
        )
