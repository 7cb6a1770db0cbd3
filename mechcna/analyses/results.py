"""Result containers: frozen dataclasses holding a score tensor with named, labelled axes.

Every analysis returns a subclass of :class:`Scores`: the tensor, the name of each axis, the
prompts and target tokens, the model name and its weight processing. They share ``.top(k)``,
``.to_frame()`` (pandas) and ``.plot()`` (plotly, see :mod:`mechcna.analyses.plotting`).
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pandas as pd
import plotly.graph_objects as go
import torch

from mechcna._types import Float, Int, Tensor
from mechcna.errors import MechcnaError, NonFiniteError
from mechcna.models.inputs import index_in, positive_int
from mechcna.models.processing import WeightProcessing
from mechcna.models.provenance import ModelProvenance

Aggregate = Literal["mean", "sum", "max", "min"]


def attention_neuron_label(layer: int, pos: int, head: int, dim: int) -> str:
    """The papers' label of an attention neuron: ``layer_head_dim_pos`` (e.g. ``15_2_7_3``)."""
    return f"{layer}_{head}_{dim}_{pos}"


@dataclass(frozen=True)
class Scores:
    """A score tensor whose first axis is ``prompt``, with every axis named.

    Attributes:
        scores: the scores (natural-log probability units unless stated otherwise).
        dims: the name of each axis of ``scores``; the first is ``"prompt"``.
        target_ids: ``[prompt]`` target token per prompt.
        targets: the targets as strings.
        prompts: the prompts as strings (``None`` when given as tokens).
        model_name: ``cfg.model_name`` of the scored model.
        processing: the weight processing recorded on the model (``None`` if unknown).
        paper_compat: whether the final norm's bias and ``b_U`` were dropped.
        model_source: where the model came from (format, the quantisation its weights were
            dequantised from, BOS policy); see :func:`mechcna.get_provenance`.
    """

    scores: Float[Tensor, "prompt ..."]
    dims: tuple[str, ...]
    target_ids: Int[Tensor, " prompt"]
    targets: tuple[str, ...]
    prompts: tuple[str, ...] | None
    model_name: str
    processing: WeightProcessing | None = None
    paper_compat: bool = False
    model_source: ModelProvenance | None = None
    extras: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: The axes a ``.top()`` label joins, in order (default: the axes after ``prompt``).
    label_dims: ClassVar[tuple[str, ...] | None] = None
    #: Names of the values of categorical axes (e.g. ``component``: attention, FFN), used by
    #: ``.top()`` and ``.to_frame()`` instead of codes.
    category_names: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        if self.scores.ndim != len(self.dims) or self.dims[0] != "prompt":
            raise MechcnaError(f"scores of shape {tuple(self.scores.shape)} vs dims {self.dims}")
        n = self.scores.shape[0]
        if len(self.target_ids) != n or len(self.targets) != n:
            raise MechcnaError("one target per prompt is required")
        if self.prompts is not None and len(self.prompts) != n:
            raise MechcnaError("one prompt string per prompt is required")
        for name, t in self.extras.items():
            if t.shape != self.scores.shape:
                raise MechcnaError(f"extra {name!r} has shape {tuple(t.shape)}, not the scores'")
        finite = torch.isfinite(self.scores)
        if not bool(finite.all()):
            where = (~finite).nonzero()[0].tolist()
            named = ", ".join(f"{d} {i}" for d, i in zip(self.dims, where, strict=True))
            raise NonFiniteError(
                f"{type(self).__name__}: score at {named} is NaN or infinite; check the model "
                "with mechcna.check_model"
            )

    def provenance(self, **overrides: Any) -> dict[str, Any]:
        """What was scored (targets, prompts, model, processing, ``paper_compat``, model
        source), as keyword arguments for a result derived from this one; ``overrides`` replace
        fields."""
        return {
            "target_ids": self.target_ids,
            "targets": self.targets,
            "prompts": self.prompts,
            "model_name": self.model_name,
            "processing": self.processing,
            "paper_compat": self.paper_compat,
            "model_source": self.model_source,
            **overrides,
        }

    # ------------------------------------------------------------------ access
    @property
    def n_prompts(self) -> int:
        return self.scores.shape[0]

    def select(self, prompt: int | None = None, aggregate: Aggregate = "mean") -> Tensor:
        """Scores of one prompt, or aggregated over prompts (axes after ``prompt`` kept)."""
        if prompt is not None:
            return self.scores[index_in(prompt, self.n_prompts, "prompt")]
        s = self.scores.double()
        if aggregate == "mean":
            return s.mean(0)
        if aggregate == "sum":
            return s.sum(0)
        if aggregate == "max":
            return s.max(0).values
        if aggregate == "min":
            return s.min(0).values
        raise MechcnaError(f"aggregate must be mean, sum, max or min, not {aggregate!r}")

    def top(
        self,
        k: int = 10,
        prompt: int | None = None,
        aggregate: Aggregate = "mean",
        largest: bool = True,
    ) -> pd.DataFrame:
        """The ``k`` highest-scoring entries (of one prompt, or aggregated over prompts).

        Returns:
            A DataFrame with one column per non-prompt axis, ``score``, ``label`` and, where
            recorded, the per-entry extras (e.g. ``coefficient``) of that prompt.
        """
        k = positive_int(k, "k")
        values = self.select(prompt, aggregate)
        flat = values.flatten()
        k = min(k, flat.numel())
        top = flat.topk(k, largest=largest)
        coords = torch.stack(torch.unravel_index(top.indices, values.shape), 1).tolist()
        for i, d in enumerate(self.dims[1:]):
            if d in self.category_names:
                for row in coords:
                    row[i] = self.category_names[d][row[i]]
        frame = pd.DataFrame(coords, columns=list(self.dims[1:]))
        frame["score"] = top.values.tolist()
        order = [self.dims[1:].index(d) for d in (self.label_dims or self.dims[1:])]
        frame["label"] = ["_".join(str(row[i]) for i in order) for row in coords]
        if prompt is not None:
            for name, t in self.extras.items():
                frame[name] = t[prompt].flatten()[top.indices].tolist()
        return frame

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per score, with a column per axis (prompt first)."""
        idx = torch.stack(
            torch.unravel_index(torch.arange(self.scores.numel()), self.scores.shape), 1
        )
        frame = pd.DataFrame(idx.tolist(), columns=list(self.dims))
        for d, names in self.category_names.items():
            frame[d] = [names[i] for i in frame[d]]
        frame["score"] = self.scores.detach().cpu().flatten().tolist()
        for name, t in self.extras.items():
            frame[name] = t.detach().cpu().flatten().tolist()
        frame["target"] = [self.targets[i] for i in frame["prompt"]]
        return frame

    def plot(self, prompt: int | None = None) -> go.Figure:  # pragma: no cover - overridden
        raise NotImplementedError
