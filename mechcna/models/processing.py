"""Weight processing of any model: inferred from its modules and weights, refused where it matters.

TransformerLens's ``HookedTransformer.from_pretrained`` processes weights by default: it folds
the norms' weights into the next linear maps (the norms become ``LNPre``/``RMSPre``), centres
the weights that write to the residual stream and the unembedding, and folds the value biases
``b_V`` into the output bias ``b_O``. The model computes the same logits, but the pieces the
papers score change:

* **invariant** (computed exactly on any model): layer and FFN-neuron log-probability
  increases (:func:`~mechcna.layer_importance`, :func:`~mechcna.neuron_importance`), CNA
  against a second model, mean ablation, the top tokens of a vector;
* **changed by value-bias folding** (refused): head and attention-neuron scores (a head's
  output loses ``b_V @ W_O``), and zero-ablating a head (``b_V @ W_O`` stays in ``b_O``), so
  the head sweep, CNA against a zero-ablated head and accuracy under it;
* **changed by any processing** (refused): raw inner products with keys and values (query
  neurons, key scores, value-key products, the attention transforms, the zero-shot search and
  the method comparison's weight norms).

:func:`infer_processing` reads what was applied from the model itself (norm module kinds,
all-zero ``b_V`` with a non-zero ``b_O``, residual-writing weights and ``W_U`` centred to zero
mean), so it works for models loaded by anyone; :func:`mechcna.get_processing` combines it with
what :func:`mechcna.load_model` recorded. :func:`require_unprocessed` is the refusal, with the
way to load the model unprocessed.

Example:
    >>> from transformer_lens import HookedTransformer                   # doctest: +SKIP
    >>> infer_processing(HookedTransformer.from_pretrained("gpt2"))      # doctest: +SKIP
    WeightProcessing(fold_ln=True, center_writing_weights=True, center_unembed=True,
                     fold_value_biases=True)
"""

import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import ParamSpec, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mechcna.errors import WeightProcessingError
from mechcna.models import backend
from mechcna.models.backend import Model, is_bridge, is_model
from mechcna.models.fingerprint import tensor_state

Step = str


@dataclass(frozen=True)
class WeightProcessing:
    """Which of TransformerLens's weight-processing steps were applied to a model."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False

    @property
    def any(self) -> bool:
        return any(asdict(self).values())


NO_PROCESSING = WeightProcessing()
_PROCESSING_ATTR = "_mechcna_processing"


def get_processing(model: Model) -> WeightProcessing:
    """The weight processing of ``model``: what :func:`load_model` recorded, together with
    what :func:`mechcna.models.processing.infer_processing` sees in its modules and weights (so
    models
    from ``HookedTransformer.from_pretrained`` or processed after loading are known too)."""
    return combine(getattr(model, _PROCESSING_ATTR, None), infer_processing(model))


def _record(model: Model, processing: WeightProcessing) -> Model:
    object.__setattr__(model, _PROCESSING_ATTR, processing)
    return model


P = ParamSpec("P")
R = TypeVar("R")
ALL_STEPS: tuple[Step, ...] = tuple(f.name for f in fields(WeightProcessing))
#: Steps that change head outputs, attention neurons and zero head ablation.
VALUE_BIAS: tuple[Step, ...] = ("fold_value_biases",)

_HOW = (
    "load it unprocessed: mechcna.load_model(name, processing=mechcna.NO_PROCESSING) or "
    "HookedTransformer.from_pretrained_no_processing(name) (a TransformerBridge: "
    "bridge.enable_compatibility_mode(no_processing=True))"
)


_CENTRED = WeakIdKeyDictionary()


def _centred(w: torch.Tensor, dim: int = -1) -> bool:
    """Whether ``w``'s mean over ``dim`` is zero up to rounding (relative to its size).

    Memoised per tensor object and state (address, version counter, shape, dtype and a
    checksum over every entry, as for the block cache's content keys): every analysis asks,
    and reading ``W_U`` and every ``W_out`` again took about a second per call on SmolLM2."""
    state = (tensor_state(w), dim)
    memo = _CENTRED.get(w)
    if memo is not None and memo[0] == state:
        return memo[1]
    x = w.detach().double()
    top = x.abs().max() if x.numel() else None
    found = top is not None and bool(top > 0) and bool(x.mean(dim).abs().max() <= 1e-5 * top)
    _CENTRED[w] = (state, found)
    return found


def _norm_weights_folded(norms: list) -> bool:
    """Whether every norm present has a weight that is exactly all ones."""
    weights = [backend.weight(n, "weight") for n in norms if n is not None]
    present = [w for w in weights if w is not None]
    return bool(present) and all(bool((w.detach() == 1).all()) for w in present)


def infer_processing(model: Model) -> WeightProcessing:
    """The weight processing applied to ``model``, read from its modules and weights.

    * ``fold_ln``: the block norms are ``LNPre``/``RMSPre`` (weights folded away); on a
      TransformerBridge (whose norm modules stay), the bridge says its weights were processed
      and every norm weight is exactly 1;
    * ``fold_value_biases``: every ``b_V`` is exactly zero while some ``b_O`` is not, in a
      model with query or key biases (one without attention biases has a zero ``b_V`` anyway,
      and a weight edit such as mean ablation may set its ``b_O``);
    * ``center_writing_weights``: ``W_E``, every ``W_O`` and ``W_out`` have zero mean over
      ``d_model`` (TransformerLens centres only LayerNorm models);
    * ``center_unembed``: ``W_U`` has zero mean over the vocabulary.
    """
    norms = [getattr(b, name, None) for b in model.blocks for name in ("ln1", "ln2")]
    fold_ln = any(type(n).__name__ in ("LayerNormPre", "RMSNormPre") for n in norms)
    if is_bridge(model) and getattr(model, "_weights_processed", False):
        # A processed bridge keeps its norm modules (and ``normalization_type``); folding
        # leaves every norm weight exactly 1, which is what is read here.
        fold_ln = fold_ln or _norm_weights_folded([*norms, getattr(model, "ln_final", None)])

    def biases(name: str) -> list:
        return [backend.weight(b.attn, name) for b in model.blocks]

    def any_set(tensors: list) -> bool:
        return any(t is not None and bool(t.detach().any()) for t in tensors)

    value_zero = not any_set(biases("b_V"))
    out_set = any_set(biases("b_O"))
    # A model without attention biases (Llama) has a zero b_V by architecture, and b_O may be
    # set by a weight edit (mean ablation): folding is only read off a model with q/k biases.
    has_biases = any_set(biases("b_Q")) or any_set(biases("b_K"))
    writers = [model.W_E]
    for block in model.blocks:
        writers.append(block.attn.W_O)
        if not model.cfg.attn_only:
            writers.append(block.mlp.W_out)
    return WeightProcessing(
        fold_ln=fold_ln,
        center_writing_weights=all(_centred(w) for w in writers),
        center_unembed=_centred(model.W_U),
        fold_value_biases=value_zero and out_set and has_biases,
    )


def combine(recorded: WeightProcessing | None, inferred: WeightProcessing) -> WeightProcessing:
    """A step counts as applied when it was recorded or is seen in the weights."""
    rec = asdict(recorded) if recorded is not None else {}
    return WeightProcessing(
        **{k: bool(v or rec.get(k, False)) for k, v in asdict(inferred).items()}
    )


def require_unprocessed(model: Model, analysis: str, steps: Iterable[Step] = ALL_STEPS) -> None:
    """Refuse ``analysis`` on a model with any of ``steps`` applied, saying how to load it.

    Raises:
        WeightProcessingError: naming the analysis, the steps found and the way out.
    """

    processing = get_processing(model)
    found = [s for s in steps if processing is not None and getattr(processing, s)]
    if found:
        raise WeightProcessingError(
            f"{analysis} on a model with processed weights ({', '.join(found)}) would not give "
            f"the papers' numbers (they use unprocessed weights); {_HOW}"
        )


def refuses_processing(
    steps: Iterable[Step] = ALL_STEPS,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an analysis whose first argument is the model: refuse ``steps`` before work."""
    chosen = tuple(steps)

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            model = args[0] if args else kwargs.get("model")
            if is_model(model):
                require_unprocessed(model, f"{fn.__name__}()", chosen)
            return fn(*args, **kwargs)

        return inner

    return wrap
