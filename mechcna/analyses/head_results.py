"""Results of the arithmetic-head sweep: per-cell tables, top heads and heatmaps.

:class:`HeadSweep` holds, for every ablated head of :func:`mechcna.head_sweep`, each case's
correctness and target log-probability next to the unablated baseline, and aggregates them per
label cell (operation, digits, template, ...) into the forms of the paper's Tables 1, 2 and 24
to 27 (original accuracy, top heads with their accuracies, relative decrease) and layer x head
heatmaps. :class:`HeadEffects` is the one-prompt version of :func:`mechcna.
single_prompt_head_effects` (docs/methods.md 6.1).

Example:
    >>> sweep = mechcna.head_sweep(model, dataset)                    # doctest: +SKIP
    >>> sweep.table(by=["operation", "digits"], k=3)                  # doctest: +SKIP
    >>> sweep.plot(cell={"operation": "+"})                           # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH Tables 1-3 and 24-27 (per-cell accuracy tables and
layer x head heatmaps).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool

from mechcna._types import Float, Int, Tensor
from mechcna.analyses import plotting
from mechcna.errors import MechcnaError
from mechcna.models.inputs import positive_int
from mechcna.models.processing import WeightProcessing

Head = tuple[int, int]
Cell = Mapping[str, Any] | str | None
Value = Literal["accuracy", "decrease", "relative_decrease", "logprob", "delta_logprob"]
PlotValue = Literal["delta_accuracy", "accuracy", "delta_logprob", "logprob"]


def _label(l: int, h: int) -> str:
    return f"{l}_{h}"


def _cell_label(by: Sequence[str], values: Sequence[Any]) -> str:
    parts = [f"{v}D" if c == "digits" else str(v) for c, v in zip(by, values)]
    return "".join(parts) if "digits" in by else ", ".join(parts)


@dataclass(frozen=True, eq=False)
class HeadSweep:
    """Per-head ablation results over a dataset (from :func:`head_sweep`).

    Attributes:
        heads: the ablated ``(layer, head)`` pairs, one per row of the tensors.
        correct: whether the argmax at the scored position equals the target.
        logprob: natural-log probability of the target after ablation.
        prediction: the argmax token after ablation.
        base_correct, base_logprob, base_prediction: the same for the unablated model.
        targets: target token ids.
        labels: one row of labels per case (may have no columns).
        n_layers, n_heads: the model's shape, for heatmaps.
        mode: ``"zero"`` or ``"mean"``.
        prompts: the prompts, when given as strings.
        model_name: the model's name.
        means: mean mode: the ``z`` each head was set to.
    """

    heads: tuple[Head, ...]
    correct: Bool[Tensor, "ablation case"]
    logprob: Float[Tensor, "ablation case"]
    prediction: Int[Tensor, "ablation case"]
    base_correct: Bool[Tensor, " case"]
    base_logprob: Float[Tensor, " case"]
    base_prediction: Int[Tensor, " case"]
    targets: Int[Tensor, " case"]
    labels: pd.DataFrame = field(repr=False)
    n_layers: int
    n_heads: int
    mode: Literal["zero", "mean"] = "zero"
    prompts: tuple[str, ...] | None = field(default=None, repr=False)
    model_name: str = ""
    means: dict[Head, Tensor] | None = field(default=None, repr=False)
    processing: WeightProcessing | None = None

    def __post_init__(self) -> None:
        if len(self.heads) != self.correct.shape[0] or len(self.labels) != self.correct.shape[1]:
            raise MechcnaError("heads and labels must match the result tensors")

    @property
    def head_labels(self) -> list[str]:
        """Heads as the papers write them, ``"layer_head"``."""
        return [_label(l, h) for l, h in self.heads]

    @property
    def n_cases(self) -> int:
        return self.correct.shape[1]

    # ------------------------------------------------------------------ selection
    def _mask(self, cell: Cell) -> np.ndarray:
        if cell is None:
            return np.ones(self.n_cases, dtype=bool)
        if isinstance(cell, str):
            try:
                mask = self.labels.eval(cell).to_numpy(dtype=bool)
            except Exception as err:  # pandas raises many kinds for a bad query
                raise MechcnaError(f"bad cell query {cell!r}: {err}") from err
        else:
            mask = np.ones(self.n_cases, dtype=bool)
            for col, value in cell.items():
                if col not in self.labels.columns:
                    raise MechcnaError(
                        f"no label column {col!r}; columns are {list(self.labels.columns)}"
                    )
                mask &= (self.labels[col] == value).to_numpy()
        if not mask.any():
            raise MechcnaError(f"no cases in cell {cell!r}")
        return mask

    def _summary(self, mask: np.ndarray) -> pd.DataFrame:
        m = torch.tensor(mask)
        acc = self.correct[:, m].double().mean(1).numpy()
        lp = self.logprob[:, m].double().mean(1).numpy()
        base_acc = float(self.base_correct[m].double().mean())
        base_lp = float(self.base_logprob[m].double().mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(base_acc > 0, (base_acc - acc) / base_acc, np.nan)
        return pd.DataFrame(
            {
                "head": self.head_labels,
                "layer": [l for l, _ in self.heads],
                "head_index": [h for _, h in self.heads],
                "n": int(mask.sum()),
                "accuracy": acc,
                "base_accuracy": base_acc,
                "delta_accuracy": acc - base_acc,
                "relative_decrease": rel,
                "logprob": lp,
                "base_logprob": base_lp,
                "delta_logprob": lp - base_lp,
            }
        )

    def summary(self, cell: Cell = None) -> pd.DataFrame:
        """One row per head: accuracy (fraction), mean target log-prob, and their changes.

        Args:
            cell: restrict to cases whose labels match, e.g. ``{"operation": "+",
                "digits": 2}``, or a :meth:`pandas.DataFrame.eval` query string.

        ``relative_decrease`` is ``(ori - int) / ori`` (the papers' Table 2), NaN when the
        unablated accuracy is zero.
        """
        return self._summary(self._mask(cell))

    def top(self, k: int = 10, cell: Cell = None) -> pd.DataFrame:
        """The ``k`` heads whose ablation lowers accuracy most (ties: log-prob decrease)."""
        k = positive_int(k, "k")
        df = self.summary(cell)
        df = df.sort_values(["delta_accuracy", "delta_logprob"], kind="stable")
        return df.head(k).reset_index(drop=True)

    def _groups(self, by: Sequence[str], cell: Cell) -> list[tuple[str, np.ndarray]]:
        base = self._mask(cell)
        missing = [c for c in by if c not in self.labels.columns]
        if missing:
            raise MechcnaError(f"no label columns {missing}; columns are {list(self.labels)}")
        out = []
        keys = by[0] if len(by) == 1 else list(by)
        for key, rows in self.labels[base].groupby(keys, sort=False).groups.items():
            mask = np.zeros(self.n_cases, dtype=bool)
            mask[np.asarray(rows)] = True
            values = key if isinstance(key, tuple) else (key,)
            out.append((_cell_label(by, values), mask))
        return out

    def to_frame(self, by: str | Sequence[str] | None = None) -> pd.DataFrame:
        """Per-head summaries overall (``by=None``) or per label cell (one row per head and
        cell, with the ``by`` columns first)."""
        if by is None:
            return self.summary()
        cols = [by] if isinstance(by, str) else list(by)
        frames = []
        for _, mask in self._groups(cols, None):
            df = self._summary(mask)
            first = self.labels[mask].iloc[0]
            for i, c in enumerate(cols):
                df.insert(i, c, first[c])
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def table(
        self,
        by: str | Sequence[str] | None = "operation",
        *,
        heads: Sequence[Head | str] | Literal["top"] | None = None,
        k: int = 5,
        values: Value = "accuracy",
        cell: Cell = None,
        overall: bool = True,
    ) -> pd.DataFrame:
        """The papers' head tables, in percent (log-probs in nats).

        * ``heads=None``: Tables 24 to 27: per row (cell), the unablated accuracy ``ori``
          then that cell's own top-``k`` heads (``head_1``, ``value_1``, ...).
        * ``heads=[(17, 22), "15_9", ...]`` or ``"top"`` (the overall top ``k``): Table 1:
          the same heads as columns for every row. With ``values="relative_decrease"``
          this is Table 2 (e.g. ``by="digits", cell={"operation": "+"}``).

        Args:
            by: label column(s) defining the rows (e.g. ``("digits", "operation")`` gives
                rows ``2D+``); ``None`` for the overall row only.
            heads: fixed head columns, ``"top"``, or ``None`` for per-row top heads.
            k: heads per row (``heads=None``) or top heads (``heads="top"``).
            values: ``"accuracy"`` (%), ``"decrease"`` (ori - int, points),
                ``"relative_decrease"`` ((ori - int) / ori, %), ``"logprob"``,
                ``"delta_logprob"``.
            cell: restrict every row to cases matching this cell first.
            overall: add an ``"all"`` row (all cases of ``cell``).

        Returns:
            A frame indexed by cell label, with ``ori`` (unablated accuracy, %) first.
        """
        rows: list[tuple[str, np.ndarray]] = []
        if overall or by is None:
            rows.append(("all", self._mask(cell)))
        if by is not None:
            rows += self._groups([by] if isinstance(by, str) else list(by), cell)
        fixed: list[int] | None = None
        if heads == "top":
            top = self.top(k, cell)
            fixed = [self.head_labels.index(h) for h in top["head"]]
        elif heads is not None:
            fixed = []
            for hd in heads:
                label = hd if isinstance(hd, str) else _label(*hd)
                if label not in self.head_labels:
                    raise MechcnaError(f"head {label} was not part of this sweep")
                fixed.append(self.head_labels.index(label))
        scale = 1.0 if values in ("logprob", "delta_logprob") else 100.0
        column = {
            "accuracy": "accuracy",
            "decrease": "decrease",
            "relative_decrease": "relative_decrease",
            "logprob": "logprob",
            "delta_logprob": "delta_logprob",
        }[values]
        records = []
        for name, mask in rows:
            df = self._summary(mask)
            df["decrease"] = -df["delta_accuracy"]
            record: dict[str, Any] = {"cell": name, "n": int(mask.sum())}
            record["ori"] = 100.0 * float(df["base_accuracy"].iloc[0])
            if fixed is not None:
                for i in fixed:
                    record[df["head"].iloc[i]] = scale * float(df[column].iloc[i])
            else:
                ranked = df.sort_values(["delta_accuracy", "delta_logprob"], kind="stable")
                names = ranked["head"].tolist()[:k]
                scores = ranked[column].to_numpy(dtype=float)[:k]
                for j, (name_j, score) in enumerate(zip(names, scores), start=1):
                    record[f"head_{j}"] = name_j
                    unit = " %" if values == "accuracy" else ""  # pages show it as is
                    record[f"{values}_{j}{unit}"] = scale * float(score)
            records.append(record)
        return pd.DataFrame.from_records(records).set_index("cell")

    def plot(
        self,
        operation: Any = None,
        *,
        cell: Cell = None,
        value: PlotValue = "delta_accuracy",
    ) -> go.Figure:
        """A layer x head heatmap of ``value`` (deltas on a diverging scale centred on 0).

        Args:
            operation: shorthand for ``cell={"operation": operation}``.
            cell: the cases to aggregate (default: all).
            value: ``"delta_accuracy"``/``"accuracy"`` (shown in percent) or
                ``"delta_logprob"``/``"logprob"`` (mean target log-prob, nats).
        """
        if operation is not None:
            if isinstance(cell, str):
                raise MechcnaError("give operation or a query-string cell, not both")
            cell = {**(cell or {}), "operation": operation}
        df = self.summary(cell)
        z = np.full((self.n_layers, self.n_heads), np.nan)
        unit = 100.0 if value.endswith("accuracy") else 1.0  # accuracy in percent
        z[df["layer"].to_numpy(), df["head_index"].to_numpy()] = unit * df[value].to_numpy()
        words = {
            "delta_accuracy": "change of accuracy (points)",
            "accuracy": "accuracy (%)",
            "delta_logprob": "change of mean log p(target)",
            "logprob": "mean log p(target)",
        }[value]
        title = (
            f"{words} when each head is {self.mode}-ablated "
            f"({plotting.cell_words(cell)}, {int(self._mask(cell).sum())} cases, {self.model_name})"
        )
        bar = f"{value} %" if unit == 100.0 else value
        return plotting.layer_head_heatmap(
            z, self.n_layers, self.n_heads, title, value.startswith("delta"), bar
        )


# --------------------------------------------------------------------- single prompt
@dataclass(frozen=True, eq=False)
class HeadEffects:
    """The target's probability after ablating each head, on one prompt (docs/methods.md 6.1).

    Attributes:
        heads: the ablated ``(layer, head)`` pairs.
        logprob: natural-log probability of the target after each ablation.
        base_logprob: the unablated log-probability of the target.
        target: the target token id (by default the model's own top-1 prediction).
        target_str: the target as a string, when the model has a tokenizer.
        prompt: the prompt, when given as a string.
        n_layers, n_heads: the model's shape.
    """

    heads: tuple[Head, ...]
    logprob: Float[Tensor, " ablation"]
    base_logprob: float
    target: int
    target_str: str | None
    prompt: str | None
    n_layers: int
    n_heads: int
    processing: WeightProcessing | None = None

    @property
    def prob(self) -> Float[Tensor, " ablation"]:
        return self.logprob.exp()

    def to_frame(self) -> pd.DataFrame:
        """One row per head, sorted by the target's probability after ablation, ascending."""
        lp = self.logprob.double().numpy()
        df = pd.DataFrame(
            {
                "head": [_label(l, h) for l, h in self.heads],
                "layer": [l for l, _ in self.heads],
                "head_index": [h for _, h in self.heads],
                "prob": np.exp(lp),
                "logprob": lp,
                "delta_prob": np.exp(lp) - np.exp(self.base_logprob),
                "delta_logprob": lp - self.base_logprob,
            }
        )
        return df.sort_values("logprob", kind="stable").reset_index(drop=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads whose ablation lowers the target's probability most."""
        return self.to_frame().head(positive_int(k, "k"))

    def plot(
        self, value: Literal["delta_logprob", "delta_prob", "prob", "logprob"] = "delta_logprob"
    ) -> go.Figure:
        """A layer x head heatmap (deltas on a diverging scale centred on 0)."""
        df = self.to_frame()
        z = np.full((self.n_layers, self.n_heads), np.nan)
        z[df["layer"].to_numpy(), df["head_index"].to_numpy()] = df[value].to_numpy()
        target = repr(self.target_str) if self.target_str is not None else f"token {self.target}"
        words = {
            "delta_logprob": f"change of log p({target})",
            "delta_prob": f"change of p({target})",
            "prob": f"p({target})",
            "logprob": f"log p({target})",
        }[value]
        title = f"{words} when each head is ablated"
        if self.prompt is not None:
            title += f" ({self.prompt!r})"
        return plotting.layer_head_heatmap(
            z, self.n_layers, self.n_heads, title, value.startswith("delta"), value
        )
