"""Pruning guided by Comparative Neuron Analysis (ARITH section 5, Table 11; docs/methods.md 9).

The paper runs CNA between the original model and its layer-9 LoRA model on every 1-digit
``+ - * /`` case, keeps the union of each case's top-500 neurons, zeroes every other FFN neuron
of the deep layers (17-31, about 95% of them), trains a fresh layer-9 LoRA on the pruned model
and compares its accuracy with a LoRA on a model pruned at random by the same count:
origin 62.9, LoRA 89.3, LoRA on CNA-pruned 82.3, LoRA on random-pruned 17.1.

Pruning is written into the weights (:func:`mechcna.apply_to_weights` with
:class:`mechcna.KeepNeurons`: the pruned neurons' ``W_out`` rows are zeroed), so the pruned
model is an ordinary model that LoRA can train (an attention LoRA never touches ``W_out``).
The random baseline keeps the same number of neurons in the same layers, drawn uniformly
with ``seed``.

Example:
    >>> keep = cna_keep_set(comparison, k=500, layers=range(2, 4))            # doctest: +SKIP
    >>> pruned = prune_model(model, keep, range(2, 4))                          # doctest: +SKIP
"""

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna.analyses.comparative import NeuronComparison
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.applications.lora import lora_finetune
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import KeepNeurons, apply_to_weights
from mechcna.models.backend import Model
from mechcna.models.view import architecture
from mechcna.tasks.arithmetic import ArithmeticDataset

Neuron = tuple[int, int]


def cna_keep_set(
    comparison: NeuronComparison, k: int = 500, layers: Iterable[int] | None = None
) -> list[Neuron]:
    """The union over cases of each case's top-``k`` CNA neurons (restricted to ``layers``),
    sorted by (layer, neuron)."""
    if k < 1:
        raise MechcnaError(f"k must be positive, not {k}")
    mask = comparison.top_mask(k).any(0)
    if layers is not None:
        keep_layers = torch.zeros(mask.shape[0], dtype=torch.bool)
        keep_layers[list(layers)] = True
        mask &= keep_layers[:, None]
    return [(int(l), int(n)) for l, n in mask.nonzero().tolist()]


def random_keep_set(
    model: Model, layers: Iterable[int], n_keep: int, seed: int = 0
) -> list[Neuron]:
    """``n_keep`` FFN neurons of ``layers`` drawn uniformly without replacement."""
    arch = architecture(model)
    layers = sorted({arch.check_layer(l) for l in layers})
    total = len(layers) * arch.d_mlp
    if not 0 <= n_keep <= total:
        raise MechcnaError(f"cannot keep {n_keep} of the {total} neurons of layers {layers}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=gen)[:n_keep].sort().values
    return [(layers[int(i) // arch.d_mlp], int(i) % arch.d_mlp) for i in pick]


def prune_model(model: Model, keep: Sequence[Neuron], layers: Iterable[int]) -> Model:
    """A copy of ``model`` with every FFN neuron of ``layers`` outside ``keep`` zeroed in the
    weights (its ``W_out`` row); ``model`` is unchanged."""
    return apply_to_weights(model, KeepNeurons(keep, tuple(layers)))


@dataclass(frozen=True)
class PruningResult:
    """Table 11: accuracies of the original, LoRA, and LoRA on CNA- / random-pruned models.

    Attributes:
        accuracy: test accuracy per model (``origin``, ``lora``, ``pruned_cna``,
            ``pruned_random``, ``lora_pruned_cna``, ``lora_pruned_random``).
        n_pruned: neurons zeroed (the same for both pruned models).
        n_total: FFN neurons in the pruned layers.
        layers: the pruned layers.
        keep: the CNA-kept neurons of those layers.
        wall_s: wall time per stage (``cna``, ``lora_pruned_cna``, ``lora_pruned_random``).
        settings: k, seed, LoRA settings.
        correct: per test case, whether each pruned model (``pruned_cna``, ``pruned_random``,
            ``lora_pruned_cna``, ``lora_pruned_random``) answers it (for paired intervals).
    """

    accuracy: dict[str, float]
    n_pruned: int
    n_total: int
    layers: tuple[int, ...]
    keep: tuple[Neuron, ...] = field(repr=False)
    wall_s: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, tuple[bool, ...]] = field(default_factory=dict, repr=False)

    @property
    def pruned_share(self) -> float:
        """Share of the pruned layers' FFN neurons that were zeroed."""
        return self.n_pruned / self.n_total if self.n_total else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per model: ``model``, ``accuracy``."""
        return pd.DataFrame(
            {"model": list(self.accuracy), "accuracy": list(self.accuracy.values())}
        )

    def plot(self) -> go.Figure:
        """Bar chart of the accuracies (%)."""
        frame = self.to_frame()
        fig = go.Figure(go.Bar(x=frame["model"], y=100 * frame["accuracy"]))
        fig.update_layout(
            title=f"CNA-guided pruning: {self.n_pruned}/{self.n_total} neurons of layers "
            f"{list(self.layers)} zeroed ({100 * self.pruned_share:.1f}%)",
            xaxis_title="model",
            yaxis={"title": "test accuracy (%)", "range": [0, 100]},
        )
        return fig


def pruning_experiment(
    model: Model,
    comparison: NeuronComparison,
    layers: Iterable[int],
    lora_layer: int,
    train: ArithmeticDataset,
    test: ArithmeticDataset,
    *,
    lora_accuracy: float | None = None,
    k: int = 500,
    seed: int = 0,
    progress: bool = True,
    **lora: Any,
) -> PruningResult:
    """Table 11: prune ``layers`` keeping the CNA set, LoRA the pruned model, and compare with a
    random pruning of the same count.

    Args:
        comparison: the CNA between the original and a LoRA model (e.g. from
            :func:`mechcna.applications.lora_analysis.compare_lora`) on the cases that define the
            kept set.
        layers: the (deep) layers to prune.
        lora_layer: the attention layer of the fresh LoRA.
        lora_accuracy: the unpruned LoRA model's test accuracy (reported as ``lora``).
        k: top neurons kept per case.
        seed: seed of the random pruning (the LoRA seed is in ``lora``).
        lora: keyword arguments of :func:`mechcna.applications.lora.lora_finetune`.
    """
    arch = architecture(model)
    layers = tuple(sorted({arch.check_layer(l) for l in layers}))
    arch.check_layer(lora_layer)
    t0 = time.perf_counter()
    keep = cna_keep_set(comparison, k, layers)
    n_total = len(layers) * arch.d_mlp
    rand = random_keep_set(model, layers, len(keep), seed)
    wall = {"cna_set": time.perf_counter() - t0}
    acc: dict[str, float] = {
        "origin": evaluate_accuracy(model, test, progress=False).accuracy,
    }
    if lora_accuracy is not None:
        acc["lora"] = lora_accuracy
    correct: dict[str, tuple[bool, ...]] = {}
    for name, kept in (("cna", keep), ("random", rand)):
        pruned = prune_model(model, kept, layers)
        before = evaluate_accuracy(pruned, test, progress=False)
        acc[f"pruned_{name}"] = before.accuracy
        correct[f"pruned_{name}"] = tuple(bool(c) for c in before.correct.tolist())
        t0 = time.perf_counter()
        run = lora_finetune(
            pruned, lora_layer, train, test=test, accuracy_before=acc[f"pruned_{name}"],
            progress=progress, **lora,
        )  # fmt: skip
        acc[f"lora_pruned_{name}"] = run.accuracy_after
        wall[f"lora_pruned_{name}"] = time.perf_counter() - t0
        if run.model is not None:  # per case, for a paired interval of the difference
            after = evaluate_accuracy(run.model, test, progress=False).correct
            correct[f"lora_pruned_{name}"] = tuple(bool(c) for c in after.tolist())
        del pruned, run
    return PruningResult(
        acc, n_total - len(keep), n_total, layers, tuple(keep), wall,
        {"k": k, "seed": seed, "lora_layer": lora_layer, **lora}, correct,
    )  # fmt: skip
