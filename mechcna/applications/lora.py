"""LoRA on one attention layer at a time, and what it changes (ARITH section 5; docs/methods.md 9).

The arithmetic paper fine-tunes Llama-7B with LoRA on **one** attention layer at a time on
2-digit arithmetic with negatives, and finds that shallow-layer LoRAs raise accuracy most
(its Figure 2). Comparative Neuron Analysis between the original and a LoRA model then shows
that the LoRA works by amplifying the coefficients of the top FFN neurons (Tables 9-10; see
:mod:`mechcna.applications`).

LoRA here is written by hand with :mod:`torch.nn.utils.parametrize` on HookedTransformer's own
attention weights (``W_Q``, ``W_K``/``_W_K``, ``W_V``/``_W_V``, ``W_O``): each adapted weight is
``W + (alpha / rank) * (down @ up)``, the low-rank product taken over the flattened
``d_model x (head d_head)`` matrix, i.e. exactly LoRA on a Hugging Face ``q_proj``/``o_proj``.
``down`` starts uniform in ``±1/sqrt(fan_in)`` (as peft's ``kaiming_uniform(a=sqrt(5))``) and
``up`` at zero, so an untrained adapter leaves the model bitwise unchanged. peft 0.21's
``target_parameters`` was measured and not used (``docs/applications.md``): TransformerLens calls
its attention with keyword arguments only, which peft's parameter wrapper cannot receive, and
peft treats the head axis of a 3-d weight as mixture-of-experts, i.e. a rank-r adapter per head.

After training the adapters are merged into a plain :class:`HookedTransformer`, so every
analysis (``compare_neurons`` included) reads the LoRA model directly.

Example:
    >>> train = arithmetic_dataset(["+", "-"], 2, n_pairs=200, tokenizer=model,
    ...                            nonnegative_subtraction=False, split="train")  # doctest: +SKIP
    >>> run = lora_finetune(model, 1, train, test=test, steps=200)                # doctest: +SKIP
    >>> run.accuracy_before, run.accuracy_after, run.model                        # doctest: +SKIP
"""

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from mechcna._types import Tensor
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.errors import InvalidOptionError, MechcnaError, UnsupportedArchitectureError
from mechcna.interventions.prompts import prepare_prompts, single_token_ids
from mechcna.models.backend import Model, is_bridge
from mechcna.models.view import architecture
from mechcna.tasks.arithmetic import ArithmeticDataset

LoraTarget = Literal["q", "k", "v", "o"]
TARGETS: tuple[str, ...] = ("q", "k", "v", "o")


class LowRankDelta(nn.Module):
    """The parametrisation ``W -> W + scale * reshape(down @ up)`` of one attention weight.

    Args:
        weight: the weight it will parametrise, ``[head, d_model, d_head]`` for q/k/v or
            ``[head, d_head, d_model]`` for o.
        target: ``"q"``, ``"k"``, ``"v"`` or ``"o"``.
        rank: the LoRA rank (0 allowed: no change).
        alpha: the LoRA scaling numerator (``scale = alpha / rank``).
        generator: the random generator for ``down``'s initialisation.
    """

    def __init__(
        self,
        weight: Tensor,
        target: str,
        rank: int,
        alpha: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        heads, a, b = weight.shape
        self.target = target
        self.shape = (heads, a, b)
        fan_in, fan_out = (heads * a, b) if target == "o" else (a, heads * b)
        bound = 1.0 / math.sqrt(fan_in)
        down = (torch.rand(fan_in, rank, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))
        self.up = nn.Parameter(torch.zeros(rank, fan_out, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank if rank else 0.0

    def delta(self) -> Tensor:
        """The weight change, in the weight's own layout."""
        flat = einops.einsum(self.down, self.up, "fan_in rank, rank fan_out -> fan_in fan_out")
        heads = self.shape[0]
        if self.target == "o":
            return einops.rearrange(flat, "(head a) b -> head a b", head=heads) * self.scale
        return einops.rearrange(flat, "a (head b) -> head a b", head=heads) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta()


def _param_name(attn: nn.Module, target: str) -> str:
    if target in ("k", "v"):
        grouped = f"_W_{target.upper()}"
        if isinstance(getattr(attn, grouped, None), nn.Parameter):
            return grouped
    return f"W_{target.upper()}"


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(targets))
    bad = [t for t in out if t not in TARGETS]
    if bad or not out:
        raise MechcnaError(f"LoRA targets must be a non-empty subset of {TARGETS}, not {bad}")
    return out


def _check_layers(model: Model, layers: int | Iterable[int]) -> tuple[int, ...]:
    if is_bridge(model):
        raise UnsupportedArchitectureError(
            "LoRA is put on a HookedTransformer's own attention weights; a TransformerBridge "
            "is not supported: load the model with backend='hooked' (TransformerLens 3.x)"
        )
    arch = architecture(model)
    items = (layers,) if isinstance(layers, int) else tuple(layers)
    if not items:
        raise MechcnaError("give at least one layer for LoRA")
    return tuple(sorted({arch.check_layer(l) for l in items}))


def attach_lora(
    model: Model,
    layers: int | Iterable[int],
    targets: Sequence[str] = ("q", "v"),
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
) -> dict[str, LowRankDelta]:
    """Put LoRA adapters on ``model``'s attention weights **in place** and freeze the rest.

    Returns:
        The adapters, keyed ``"blocks.{layer}.attn.{param}"``; only their ``down``/``up``
        require gradients afterwards.

    Raises:
        MechcnaError: bad layers, targets or rank, or a model that already has adapters.
    """
    layers = _check_layers(model, layers)
    targets = _check_targets(targets)
    if rank < 0:
        raise MechcnaError(f"rank must be non-negative, not {rank}")
    if any(parametrize.is_parametrized(b.attn) for b in model.blocks):
        raise MechcnaError("the model already has LoRA adapters: merge them first")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for l in layers:
        attn = model.blocks[l].attn
        for t in targets:
            name = _param_name(attn, t)
            lora = LowRankDelta(getattr(attn, name), t, rank, alpha, gen)
            parametrize.register_parametrization(attn, name, lora, unsafe=True)
            adapters[f"blocks.{l}.attn.{name}"] = lora
    return adapters


def merge_lora(model: Model) -> Model:
    """Write every adapter into its weight (in place) and remove the parametrisations."""
    for block in model.blocks:
        attn = block.attn
        if parametrize.is_parametrized(attn):
            for name in list(attn.parametrizations.keys()):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(attn, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class LoraResult:
    """A merged LoRA model and the record of its training.

    Attributes:
        model: the original model with the trained adapters merged into its weights.
        layers: the adapted attention layers.
        losses: the training loss (mean cross-entropy, nats) at every step.
        accuracy_before: test accuracy of the original model.
        accuracy_after: test accuracy of the LoRA model.
        wall_s: training wall time in seconds (evaluation excluded).
        settings: the hyper-parameters, seed and data sizes.
        deltas: each adapted weight's merged change (``W_lora - W``), for re-applying it.
    """

    model: Model | None = field(repr=False)
    layers: tuple[int, ...]
    losses: tuple[float, ...]
    accuracy_before: float
    accuracy_after: float
    wall_s: float
    settings: dict[str, Any]
    deltas: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The loss curve: one row per step (``step``, ``loss``)."""
        return pd.DataFrame({"step": range(1, len(self.losses) + 1), "loss": self.losses})

    def summary(self) -> dict[str, Any]:
        """One flat record: layers, accuracies, wall time, first/last loss, settings."""
        return {
            "layers": ",".join(map(str, self.layers)),
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "loss_first": self.losses[0] if self.losses else float("nan"),
            "loss_last": self.losses[-1] if self.losses else float("nan"),
            "wall_s": self.wall_s,
            **self.settings,
        }

    def plot(self) -> go.Figure:
        """The training loss curve."""
        frame = self.to_frame()
        fig = go.Figure(go.Scatter(x=frame["step"], y=frame["loss"], mode="lines"))
        fig.update_layout(
            title=f"LoRA on layer(s) {self.summary()['layers']}: accuracy "
            f"{100 * self.accuracy_before:.1f}% -> {100 * self.accuracy_after:.1f}%",
            xaxis_title="step",
            yaxis_title="training loss (nats)",
        )
        return fig

    def apply_to(self, model: Model) -> Model:
        """A copy of ``model`` with this run's weight changes added (e.g. to rebuild a LoRA
        model that a sweep did not keep)."""
        out = copy.deepcopy(model)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                out.get_parameter(name).add_(delta.to(out.get_parameter(name)))
        return out


def _loss(model: Model, tokens: Tensor, pos: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of each row's target at its scored position (right-padded rows).

    Only the scored positions go through the final norm and the unembedding (on SmolLM2 the
    49,152-token unembedding of every position is a fifth of a training step); equal to the
    cross-entropy of the full logits at those positions (``tests/test_lora.py``)."""
    resid = model(tokens[:, : int(pos.max()) + 1], stop_at_layer=model.cfg.n_layers)
    rows = torch.arange(len(tokens), device=tokens.device)
    logits = model.unembed(model.ln_final(resid[rows, pos][:, None]))[:, 0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32
    return torch.nn.functional.cross_entropy(logits, target)


def lora_finetune(
    model: Model,
    layers: int | Iterable[int],
    data: ArithmeticDataset,
    *,
    test: ArithmeticDataset | None = None,
    targets: Sequence[str] = ("q", "v"),
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-3,
    steps: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_batch_size: int = 256,
    accuracy_before: float | None = None,
    progress: bool = True,
) -> LoraResult:
    """Train LoRA adapters on the attention weights of ``layers`` and merge them.

    The loss is the cross-entropy of each teacher-forced case's target token (one case per
    answer token, :func:`mechcna.arithmetic_dataset`); AdamW at a constant ``lr``; batches are
    drawn without replacement from a seeded permutation, re-drawn each epoch. ``model`` is not
    changed: the adapters go on a deep copy.

    Args:
        layers: the attention layer(s) to adapt.
        data: the training cases.
        test: the cases whose accuracy is reported before and after (default ``data``).
        targets: which attention weights get an adapter (default ``q`` and ``v``).
        rank: LoRA rank; alpha: scaling numerator (``scale = alpha / rank``).
        steps: optimiser steps; default ``ceil(epochs * len(data) / batch_size)``.
        seed: seeds the adapters' initialisation and the batch order.
        accuracy_before: the original model's test accuracy when already known (skips
            measuring it again).
        progress: show tqdm progress bars.

    Returns:
        :class:`LoraResult` with the merged model and the training record.

    Raises:
        MechcnaError: empty data, bad layers, targets, rank, steps or batch size.
        TokenizationError: a target that is not a single token.
    """
    layers = _check_layers(model, layers)
    targets = _check_targets(targets)
    if not len(data):
        raise MechcnaError("no training cases")
    if batch_size < 1 or lr <= 0 or epochs <= 0 or (steps is not None and steps < 0):
        raise MechcnaError("batch_size, lr and epochs must be positive and steps non-negative")
    if rank < 1:
        raise InvalidOptionError(f"rank must be at least 1 (rank 0 trains nothing), not {rank}")
    n_steps = steps if steps is not None else math.ceil(epochs * len(data) / batch_size)
    test = data if test is None else test
    if accuracy_before is None:
        accuracy_before = evaluate_accuracy(
            model, test, batch_size=eval_batch_size, progress=progress
        ).accuracy
    batch = prepare_prompts(model, data.prompts)
    target = single_token_ids(model, data.targets)
    work = copy.deepcopy(model)
    adapters = attach_lora(work, layers, targets, rank, alpha, seed)
    params = [p for a in adapters.values() for p in (a.down, a.up)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order = torch.zeros(0, dtype=torch.long)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(n_steps), desc=f"LoRA {layers}", disable=not progress, leave=False):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        idx = idx.to(batch.tokens.device)
        loss = _loss(work, batch.tokens[idx], batch.positions[idx], target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    wall = time.perf_counter() - start
    with torch.no_grad():
        deltas = {name: a.delta().detach().clone() for name, a in adapters.items()}
    merge_lora(work)
    after = evaluate_accuracy(work, test, batch_size=eval_batch_size, progress=progress)
    settings = {
        "targets": ",".join(targets),
        "rank": rank,
        "alpha": alpha,
        "lr": lr,
        "steps": n_steps,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "seed": seed,
        "n_train": len(data),
        "n_test": len(test),
        "n_trainable": sum(p.numel() for p in params),
    }
    return LoraResult(
        work, layers, tuple(losses), accuracy_before, after.accuracy, wall, settings, deltas
    )


@dataclass(frozen=True)
class LoraSweep:
    """Figure 2: one LoRA per attention layer, trained the same way.

    Attributes:
        runs: one :class:`LoraResult` per layer, in layer order (models dropped unless kept).
        original_accuracy: the original model's test accuracy.
        model_name: the original model's name.
    """

    runs: tuple[LoraResult, ...]
    original_accuracy: float
    model_name: str = ""

    def to_frame(self) -> pd.DataFrame:
        """One row per LoRA layer: accuracy after, its gain, wall time, final loss."""
        rows = []
        for r in self.runs:
            rows.append(
                {
                    "layer": r.layers[0],
                    "accuracy": r.accuracy_after,
                    "gain": r.accuracy_after - self.original_accuracy,
                    "loss_last": r.losses[-1] if r.losses else float("nan"),
                    "wall_s": r.wall_s,
                }
            )
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """Test accuracy (%) against the LoRA layer, with the original model as a line."""
        frame = self.to_frame()
        fig = go.Figure(
            go.Scatter(x=frame["layer"], y=100 * frame["accuracy"], mode="lines+markers")
        )
        fig.add_hline(
            y=100 * self.original_accuracy, line_dash="dash", annotation_text="original model"
        )
        fig.update_layout(
            title=f"{self.model_name}: accuracy after LoRA on one attention layer",
            xaxis={"title": "LoRA layer", "tickmode": "linear", "dtick": 1},
            yaxis={"title": "test accuracy (%)", "range": [0, 100]},
        )
        return fig


def lora_layer_sweep(
    model: Model,
    layers: Iterable[int],
    data: ArithmeticDataset,
    *,
    test: ArithmeticDataset | None = None,
    keep_models: bool = True,
    progress: bool = True,
    **train: Any,
) -> LoraSweep:
    """:func:`lora_finetune` on each layer in turn with the same settings (Figure 2).

    Args:
        keep_models: keep each merged model (set False on large models to save memory;
            :meth:`LoraResult.apply_to` rebuilds one from the original).
        train: keyword arguments of :func:`lora_finetune` (``steps``, ``lr``, ``rank``, ...).
    """
    layers = _check_layers(model, layers)
    test = data if test is None else test
    original = evaluate_accuracy(model, test, progress=False).accuracy
    runs = []
    for l in tqdm(layers, desc="LoRA layers", disable=not progress):
        run = lora_finetune(
            model, l, data, test=test, accuracy_before=original, progress=False, **train
        )
        if not keep_models:
            run = replace(run, model=None)
        runs.append(run)
    return LoraSweep(tuple(runs), original, str(model.cfg.model_name))
