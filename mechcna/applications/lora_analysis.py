"""What a LoRA changes inside the model: CNA between the original and a LoRA model (Tables 9-10).

ARITH section 5 (docs/methods.md 9) runs Comparative Neuron Analysis between the original model
and each one-layer LoRA model on arithmetic cases, and reads off the FFN coefficients ``m`` of
the top CNA neurons before and after LoRA (its Table 9) and their average increase grouped by
the LoRA layer (its Table 10): LoRA raises accuracy by amplifying the top neurons.

**Sign convention** (the paper does not state it; a parameter here): with
``direction="lora_minus_original"`` (default) the CNA score is ``Imp_LoRA - Imp_original``, so the
top neurons are those the LoRA made *more* important; ``"original_minus_lora"`` ranks those it
made less important (the convention of :func:`mechcna.compare_neurons` with the original as
``M``). Both models are scored on the given targets (the correct answers), each with its own
final-norm scale by default (``reference_scale="own"``).

The coefficient increase of one case over its top-K neurons is
``(sum |m_LoRA| - sum |m_original|) / sum |m_original|`` in percent (absolute values because
SiLU coefficients can be negative); a table cell is its mean over cases.

Example:
    >>> comp = compare_lora(model, run.model, test.prompts, test.targets)      # doctest: +SKIP
    >>> coefficient_increase(comp, ks=(50, 30, 20, 10))                        # doctest: +SKIP
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Tensor
from mechcna.analyses.comparative import NeuronComparison, ReferenceScale, compare_neurons
from mechcna.errors import MechcnaError
from mechcna.interventions.positions import prompt_lengths
from mechcna.interventions.prompts import Prompts, prepare_prompts
from mechcna.models.backend import Model

Direction = Literal["lora_minus_original", "original_minus_lora"]


@dataclass(frozen=True)
class LoraComparison:
    """A CNA between an original and a LoRA model, with its sign convention.

    Attributes:
        comparison: the CNA (``scores`` are signed by ``direction``).
        direction: ``"lora_minus_original"`` or ``"original_minus_lora"``.
    """

    comparison: NeuronComparison
    direction: str

    @property
    def coefficient_original(self) -> Float[Tensor, "prompt layer neuron"]:
        c = self.comparison.extras
        return c["coefficient_other" if self.direction == "lora_minus_original" else "coefficient"]

    @property
    def coefficient_lora(self) -> Float[Tensor, "prompt layer neuron"]:
        c = self.comparison.extras
        return c["coefficient" if self.direction == "lora_minus_original" else "coefficient_other"]

    def top(self, k: int = 10, prompt: int | None = None) -> pd.DataFrame:
        """The top-``k`` CNA neurons (of one prompt, or by the mean over prompts)."""
        return self.comparison.top(k, prompt=prompt)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, layer, neuron): CNA score, both models' importances
        (``imp_original``, ``imp_lora``) and coefficients (``m_original``, ``m_lora``), named
        by model whatever the direction (the CNA's own ``M``/``M'`` columns are renamed)."""
        first, second = (
            ("lora", "original")
            if self.direction == "lora_minus_original"
            else ("original", "lora")
        )
        frame = self.comparison.to_frame().rename(
            columns={
                "imp_original": f"imp_{first}",
                "imp_other": f"imp_{second}",
                "coefficient": f"m_{first}",
                "coefficient_other": f"m_{second}",
            }
        )
        return frame

    def plot(self, prompt: int | None = None, k: int = 20) -> go.Figure:
        """Importances in both models of the top-``k`` neurons (see NeuronComparison.plot)."""
        return self.comparison.plot(prompt=prompt, k=k)


def compare_lora(
    original: Model,
    lora_model: Model,
    prompts: Prompts,
    targets: str | Sequence[str] | Tensor | None = None,
    *,
    direction: str = "lora_minus_original",
    reference_scale: ReferenceScale = "own",
    progress: bool = False,
) -> LoraComparison:
    """CNA between ``original`` and ``lora_model`` on ``prompts`` (see the module docstring).

    Args:
        targets: the target tokens (default: the original model's own top-1, used for both
            models whichever the direction).
        direction: the sign convention.
        reference_scale: ``"own"`` (each model its own final-norm scale) or ``"original"``.

    Raises:
        MechcnaError: an unknown direction, or models of different architectures.
    """
    if direction == "lora_minus_original":
        first, second = lora_model, original
    elif direction == "original_minus_lora":
        first, second = original, lora_model
    else:
        raise MechcnaError(
            f"direction must be 'lora_minus_original' or 'original_minus_lora', not {direction!r}"
        )
    if targets is None:  # the original model's own top-1, in either direction
        targets = _top1(original, prompts)
    comp = compare_neurons(
        first, prompts, second, targets, reference_scale=reference_scale, progress=progress
    )
    return LoraComparison(comp, direction)


def _top1(model: Model, prompts: Prompts) -> Tensor:
    """Each prompt's greedy next token under ``model`` (at its last real token)."""
    batch = prepare_prompts(model, prompts)
    with torch.no_grad(), prompt_lengths(batch.lengths):
        logits = model(batch.tokens)
    rows = torch.arange(batch.tokens.shape[0], device=logits.device)
    return logits[rows, batch.positions.to(logits.device)].argmax(-1)


def coefficient_increase_per_case(
    comparison: LoraComparison, ks: Sequence[int] = (50, 30, 20, 10)
) -> dict[str, Float[Tensor, " prompt"]]:
    """Per case: the % increase of the summed absolute coefficients of the case's top-K CNA
    neurons, from original to LoRA (``{"top50": [prompt], ...}``)."""
    if not ks or any(k < 1 for k in ks):
        raise MechcnaError(f"ks must be positive, not {list(ks)}")
    m_o = comparison.coefficient_original.abs().double()
    m_l = comparison.coefficient_lora.abs().double()
    out = {}
    for k in ks:
        top = comparison.comparison.top_mask(k)
        before = (m_o * top).sum((1, 2))
        after = (m_l * top).sum((1, 2))
        out[f"top{k}"] = 100.0 * (after - before) / before.clamp_min(1e-30)
    return out


def coefficient_increase(
    comparison: LoraComparison, ks: Sequence[int] = (50, 30, 20, 10)
) -> dict[str, float]:
    """Table 10's cells for one LoRA model: mean over cases of the % increase of the summed
    absolute coefficients of each case's top-K CNA neurons, from original to LoRA."""
    per_case = coefficient_increase_per_case(comparison, ks)
    return {k: float(v.mean()) for k, v in per_case.items()}


def coefficient_increase_table(
    comparisons: Mapping[int, LoraComparison],
    ks: Sequence[int] = (50, 30, 20, 10),
    groups: Mapping[str, Sequence[int]] | None = None,
) -> pd.DataFrame:
    """Table 10: one row per LoRA layer (or per group of layers, the mean of its rows).

    Args:
        comparisons: the CNA of each LoRA model, keyed by its LoRA layer.
        groups: e.g. ``{"1-9": range(1, 10), ...}``; layers without a comparison are skipped.
    """
    rows = {l: coefficient_increase(c, ks) for l, c in sorted(comparisons.items())}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "lora_layer"
    if groups is None:
        return frame
    out = {}
    for name, layers in groups.items():
        present = [l for l in layers if l in rows]
        if present:
            out[name] = frame.loc[present].mean()
    grouped = pd.DataFrame(out).T
    grouped.index.name = "lora_layers"
    return grouped


def coefficient_table(
    comparisons: Mapping[int, LoraComparison],
    prompt: int = 0,
    k: int = 3,
    neurons: Sequence[tuple[int, int]] | None = None,
    rank_by: int | None = None,
) -> pd.DataFrame:
    """Table 9: the coefficient ``m`` of a few neurons on one case, in the original model
    (column ``ori``) and in each LoRA model (``L{layer}``).

    Args:
        neurons: the neurons; default the top-``k`` CNA neurons of the ``rank_by`` LoRA model
            (default the first key) on this case.
    """
    if not comparisons:
        raise MechcnaError("no comparisons given")
    layers = sorted(comparisons)
    if neurons is None:
        ref = comparisons[rank_by if rank_by is not None else layers[0]]
        top = ref.top(k, prompt=prompt)
        neurons = list(zip(top["layer"].tolist(), top["neuron"].tolist()))
    first = comparisons[layers[0]]
    rows = []
    for l, n in neurons:
        row: dict[str, object] = {"neuron": f"{l}_{n}"}
        row["ori"] = float(first.coefficient_original[prompt, l, n])
        for layer in layers:
            row[f"L{layer}"] = float(comparisons[layer].coefficient_lora[prompt, l, n])
        rows.append(row)
    return pd.DataFrame(rows)
