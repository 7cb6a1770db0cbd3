"""The tokens an FFN neuron promotes, sign-aware: the one function every page uses.

A neuron adds ``m * W_out[k]`` to the residual stream, so the tokens it promotes on a prompt
are the top tokens of that product: with a negative coefficient ``m`` they are the value
vector's *bottom* tokens (the papers' README warns about this). :func:`neuron_tokens` is the
single place that turns neurons (and their coefficients) into token lists; the CLI tables,
the report pages, the CNA tables and every hover call it, so one neuron on one prompt shows
the same tokens everywhere.

Example:
    >>> res = neuron_importance(model, ["3+5="])                     # doctest: +SKIP
    >>> top = res.top(5, prompt=0)                                   # doctest: +SKIP
    >>> neuron_tokens(model, top["label"], top["coefficient"])       # doctest: +SKIP
"""

from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from mechcna.engine.projection import top_tokens
from mechcna.errors import MechcnaError
from mechcna.models.backend import Model

#: How many tokens every page lists per neuron.
TOKENS_K = 10

Label = str | tuple[int, int]


def parse_neuron(label: Label) -> tuple[int, int]:
    """``"3_266"`` or ``(3, 266)`` -> ``(3, 266)``."""
    if isinstance(label, tuple) and len(label) == 2:
        return int(label[0]), int(label[1])
    layer, sep, index = str(label).partition("_")
    if not sep or not layer.isdigit() or not index.isdigit():
        raise MechcnaError(f"an FFN neuron is 'LAYER_NEURON' or (layer, neuron), not {label!r}")
    return int(layer), int(index)


def _key(label: Label) -> str:
    layer, neuron = parse_neuron(label)
    return f"{layer}_{neuron}"


def neuron_tokens(
    model: Model,
    labels: Iterable[Label],
    coefficients: Iterable[float] | None = None,
    k: int = TOKENS_K,
) -> dict[str, str]:
    """``{"layer_neuron": "tok, tok, ..."}``: the ``k`` tokens each neuron promotes.

    Args:
        labels: FFN neurons as ``"layer_neuron"`` strings or ``(layer, neuron)`` pairs.
        coefficients: each neuron's coefficient ``m`` on the prompt shown (the ``coefficient``
            column of a result's ``.top(k, prompt=i)``): the tokens are those of
            ``m * W_out[k]``, so a negative coefficient lists the value vector's bottom
            tokens. ``None`` lists the value vector's own top tokens (no prompt).
    """
    keys = [_key(label) for label in labels]
    coefs: list[float | None] = (
        [None] * len(keys) if coefficients is None else [float(c) for c in coefficients]
    )
    if len(coefs) != len(keys):
        raise MechcnaError(f"{len(keys)} neurons but {len(coefs)} coefficients")
    out = {}
    for key, c in zip(keys, coefs, strict=True):
        tt = top_tokens(model, parse_neuron(key), k, coefficient=c)
        out[key] = ", ".join(t for t, _ in tt.top)
    return out


def coefficients_at(
    coefficient: torch.Tensor, labels: Sequence[Label], prompt: int | None
) -> list[float]:
    """Each neuron's coefficient from a ``[prompt, layer, neuron]`` tensor: at ``prompt``, or
    the mean over prompts (whose sign decides the tokens shown for an aggregate)."""
    sel = coefficient[prompt] if prompt is not None else coefficient.double().mean(0)
    return [float(sel[parse_neuron(label)]) for label in labels]


def frame_tokens(
    model: Model,
    frame: pd.DataFrame,
    coefficients: Sequence[float] | None = None,
    prompt: str | None = None,
) -> pd.DataFrame:
    """``frame`` (with ``layer`` and ``neuron`` columns) plus ``top_tokens``: what each neuron
    promotes, sign-aware with ``coefficients``, else the frame's ``coefficient`` column, else
    the coefficients read at ``prompt``; with none of these, the value vectors' own tokens."""
    labels = [(int(l), int(n)) for l, n in zip(frame["layer"], frame["neuron"], strict=True)]
    if coefficients is None and "coefficient" in frame.columns:
        coefficients = frame["coefficient"].tolist()
    if coefficients is None and prompt is not None:
        coefficients = prompt_coefficients(model, prompt, labels)
    tokens = neuron_tokens(model, labels, coefficients)
    return frame.assign(top_tokens=[tokens[_key(label)] for label in labels])


def prompt_coefficients(model: Model, prompt: str, labels: Sequence[Label]) -> list[float]:
    """Each neuron's coefficient ``m`` at ``prompt``'s scored position (one forward pass):
    for results that do not record coefficients (e.g. query neurons)."""
    from mechcna.analyses.capture import capture

    post = capture(model, [prompt], need=("post",)).post
    assert post is not None
    return coefficients_at(post, labels, 0)


def result_tokens(
    model: Model, result: object, labels: Sequence[Label], prompt: int | None = None
) -> dict[str, str]:
    """:func:`neuron_tokens` for neurons of a result that records ``coefficient`` (FFN
    attribution, CNA): their coefficients at ``prompt``, or the mean over prompts."""
    extras = getattr(result, "extras", {})
    coef = extras.get("coefficient") if isinstance(extras, dict) else None
    if coef is None:
        raise MechcnaError(f"{type(result).__name__} records no FFN coefficients")
    return neuron_tokens(model, labels, coefficients_at(coef, labels, prompt))
