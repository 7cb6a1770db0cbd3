"""Arithmetic accuracy: greedy next-token accuracy on teacher-forced cases (ARITH section 3).

The paper measures how much zeroing a head lowers arithmetic accuracy (Tables 1 to 3 and
24 to 27; docs/methods.md 6.2). Accuracy is taken per teacher-forced case: the model is correct
when the argmax of its next-token distribution at the prompt's last token is the expected
answer token. :func:`evaluate_accuracy` computes it for a whole
:class:`~mechcna.tasks.arithmetic.ArithmeticDataset` in right-padded batches, optionally under
interventions (any of :mod:`mechcna.interventions.edits`), with the mean log-probability of the
expected token, per (operation, digits, template) cell and overall.

Example:
    >>> ds = mechcna.arithmetic_dataset(operations="+", digits=1, tokenizer=model)  # doctest: +SKIP
    >>> base = evaluate_accuracy(model, ds)                                         # doctest: +SKIP
    >>> cut = evaluate_accuracy(model, ds, [mechcna.HeadAblation([(3, 1)])])        # doctest: +SKIP
    >>> base.accuracy - cut.accuracy                                                # doctest: +SKIP

Paper items (README, "Paper to code"): ARITH section 3's accuracy per cell, under any
interventions.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool
from tqdm.auto import tqdm

from mechcna._types import Float, Tensor
from mechcna.errors import EmptyInputError, InvalidOptionError, MechcnaError
from mechcna.interventions.edits import Intervention, intervene
from mechcna.interventions.positions import prompt_lengths
from mechcna.interventions.prompts import prepare_prompts, single_token_ids
from mechcna.models.backend import Model
from mechcna.models.check import refuse_non_finite
from mechcna.models.inputs import positive_int, warn_user_hooks
from mechcna.models.processing import WeightProcessing, get_processing
from mechcna.models.unembed import logits_at
from mechcna.models.view import per_call
from mechcna.tasks.arithmetic import ArithmeticDataset

CELL = ["operation", "digits", "template"]


@dataclass(frozen=True)
class AccuracyResult:
    """Per-case greedy correctness and log-probabilities of an arithmetic dataset.

    Attributes:
        dataset: the cases, aligned with the tensors.
        correct: ``[case]`` whether the argmax next token is the target.
        logprob: ``[case]`` log-probability (natural log) of the target token.
        model_name: the evaluated model's name.
        interventions: a description of each intervention applied.
    """

    dataset: ArithmeticDataset
    correct: Bool[Tensor, " case"]
    logprob: Float[Tensor, " case"]
    model_name: str = ""
    interventions: tuple[str, ...] = field(default=())
    processing: WeightProcessing | None = None

    def __post_init__(self) -> None:
        if not len(self.dataset) == len(self.correct) == len(self.logprob):
            raise MechcnaError("dataset, correct and logprob must have one entry per case")

    @property
    def accuracy(self) -> float:
        """Overall accuracy (fraction of cases, in [0, 1])."""
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability of the target over all cases."""
        return float(self.logprob.mean()) if len(self.logprob) else float("nan")

    def case_frame(self) -> pd.DataFrame:
        """One row per case: its labels plus ``correct`` and ``logprob``."""
        frame = self.dataset.to_frame()
        frame["correct"] = self.correct.cpu().numpy()
        frame["logprob"] = self.logprob.cpu().numpy()
        return frame

    def to_frame(self, by: Sequence[str] = CELL) -> pd.DataFrame:
        """Accuracy, mean log-prob and case count per cell (default operation, digits, template).

        Args:
            by: the case labels to group by, e.g. ``["operation", "digits", "kind"]``.
        """
        frame = self.case_frame()
        if not len(frame):
            return pd.DataFrame(columns=[*by, "n", "accuracy", "mean_logprob"])
        grouped = frame.groupby(list(by), sort=True)
        return pd.DataFrame(
            {
                "n": grouped.size(),
                "accuracy": grouped["correct"].mean(),
                "mean_logprob": grouped["logprob"].mean(),
            }
        ).reset_index()

    def plot(self, by: Sequence[str] = CELL) -> go.Figure:
        """Bar chart of accuracy per cell; returns the figure."""
        table = self.to_frame(by)
        short = {"digits": "{}-digit", "template": "template {}", "kind": "{}"}
        labels = [
            ", ".join(short.get(k, "{}").format(row[k]) for k in by) for _, row in table.iterrows()
        ]
        fig = go.Figure(
            go.Bar(
                x=labels,
                y=100 * table["accuracy"],
                customdata=table[["n", "mean_logprob"]].to_numpy(),
                hovertemplate="%{x}<br>accuracy %{y:.1f}%<br>n %{customdata[0]}"
                "<br>mean log p %{customdata[1]:.3f}<extra></extra>",
            )
        )
        title = f"greedy accuracy per cell (overall {100 * self.accuracy:.1f}%, "
        title += f"{len(self.correct)} cases"
        title += f", {self.model_name})" if self.model_name else ")"
        if self.interventions:
            shown = ", ".join(short_name(i) for i in self.interventions)
            title += "<br>under " + (shown if len(shown) <= 80 else shown[:77] + "...")
        fig.update_layout(
            title=title,
            xaxis_title=" / ".join(by),
            yaxis={"title": "accuracy (%)", "range": [0, 100]},
        )
        return fig


def describe_intervention(iv: Intervention) -> str:
    """A short description, e.g. ``HeadAblation(zero: 3.0, 4.1)`` (not the full repr)."""
    parts = []
    mode = getattr(iv, "mode", None)
    if isinstance(mode, str):
        parts.append(mode)
    for attr in ("heads", "neurons"):
        items = getattr(iv, attr, None)
        if isinstance(items, tuple | list) and items:
            shown = ", ".join(".".join(str(x) for x in item) for item in items[:4])
            parts.append(shown + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
    return f"{type(iv).__name__}({': '.join(parts)})"


def short_name(description: str) -> str:
    """A recorded intervention description, cut to fit a title."""
    return description if len(description) <= 60 else description[:57] + "..."


@per_call
def evaluate_accuracy(
    model: Model,
    dataset: ArithmeticDataset,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 256,
    progress: bool = True,
) -> AccuracyResult:
    """Greedy next-token accuracy and target log-probability for every case.

    Prompts are right-padded (:func:`mechcna.interventions.prompts.prepare_prompts`) and each is
    scored at
    its own last real token, so padding never changes a result.

    Args:
        model: the model; its tokenizer must make every target a single token.
        dataset: the cases (see :func:`mechcna.arithmetic_dataset`).
        interventions: applied during every forward pass (:func:`mechcna.intervene`).
        batch_size: prompts per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        An :class:`AccuracyResult` aligned with ``dataset``.

    Raises:
        InvalidOptionError: a non-positive batch size, or a dataset of another type.
        EmptyInputError: a dataset with no cases.
        NonFiniteError: the model's output is NaN or infinite (the first such hook named).
        TokenizationError: a target that is not a single token.
    """
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(dataset, ArithmeticDataset):
        raise InvalidOptionError(
            f"dataset must be an ArithmeticDataset (mechcna.arithmetic_dataset), not "
            f"{type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise EmptyInputError("the dataset has no cases: accuracy would be undefined (nan)")
    warn_user_hooks(model)
    targets = single_token_ids(model, dataset.targets)
    correct, logprob = [], []
    prompts = dataset.prompts
    starts = range(0, len(dataset), batch_size)
    with torch.no_grad(), intervene(model, *interventions):
        for start in tqdm(starts, desc="accuracy", disable=not progress, leave=False):
            batch = prepare_prompts(model, prompts[start : start + batch_size])
            with prompt_lengths(batch.lengths):
                logits = logits_at(model, batch.tokens, batch.batch_index, batch.positions)
            logp = logits.float().log_softmax(-1)
            if not bool(torch.isfinite(logp).all()):
                refuse_non_finite(model, batch.tokens, "the target log-probability")
            target = targets[start : start + batch_size]
            correct.append(logp.argmax(-1) == target)
            logprob.append(logp.gather(-1, target[:, None])[:, 0])
    device = model.W_U.device
    return AccuracyResult(
        dataset=dataset,
        correct=torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool, device=device),
        logprob=torch.cat(logprob) if logprob else torch.zeros(0, device=device),
        model_name=str(model.cfg.model_name),
        interventions=tuple(describe_intervention(i) for i in interventions),
        processing=get_processing(model),
    )
