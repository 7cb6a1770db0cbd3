"""The eight FFN-neuron scoring methods compared in the attribution paper (docs/methods.md 4.6).

For a neuron writing ``v = m * fc2`` into a residual stream ``h`` (``resid_mid``), with target
``w`` and the final norm's scale frozen:

=====================  ==========================================================
``log_prob_increase``  ``log p(w | h + v) - log p(w | h)`` (the proposed method)
``log_prob``           ``log p(w | v)``: the vector alone (close to direct logit attribution)
``prob_increase``      ``p(w | h + v) - p(w | h)``
``norm``               ``||v|| = |m| * ||fc2||``
``coefficient``        ``m``
``rank``               ``1 / rank of w in bs(v)`` (rank 1 is the top token)
``coef_x_norm``        ``m * ||fc2||`` (Geva et al. 2022 style)
``coef_x_rank``        ``m / rank of w in bs(v)``
=====================  ==========================================================

The paper leaves two details open; our policy: "norm" is the norm of the written vector
``m * fc2`` and "m x norm" the signed ``m * ||fc2||``; rank-based scores use ``1 / rank`` so
that, as for every method here, higher means more important.

:func:`evaluate_methods` reruns the paper's comparison: zero each method's top-``k`` neurons per
prompt and measure the target's reciprocal rank, probability and log-probability (lower after
the intervention means the method found more important neurons).

Example:
    >>> scores = comparison_scores(model, prompts)          # doctest: +SKIP
    >>> evaluate_methods(model, prompts, k=10)              # doctest: +SKIP

Paper items (README, "Paper to code"): ATTR Table 2 (the eight scoring methods compared by
zeroing their top neurons).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mechcna._types import Float, Int, Tensor
from mechcna.analyses.attribution import _meta
from mechcna.analyses.capture import Targets, capture
from mechcna.analyses.results import Scores
from mechcna.engine.blocks import BlockCache, layer_rows
from mechcna.engine.expansion import _exact_rows64, exact_rows_logprob, increase_from_rows
from mechcna.engine.projection import compute_dtype, linear_part, logit_offset
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import NeuronEdit, intervene
from mechcna.interventions.prompts import Prompts, prepare_prompts
from mechcna.models.architecture import refuses_soft_cap
from mechcna.models.backend import Model
from mechcna.models.processing import refuses_processing
from mechcna.models.view import architecture, per_call

MethodName = Literal[
    "log_prob_increase",
    "log_prob",
    "prob_increase",
    "norm",
    "coefficient",
    "rank",
    "coef_x_norm",
    "coef_x_rank",
]
METHODS: tuple[MethodName, ...] = get_args(MethodName)


@dataclass(frozen=True)
class ComparisonScores(Scores):
    """``scores[prompt, method, layer, neuron]``; ``methods`` names the method axis."""

    methods: tuple[str, ...] = METHODS

    def method(self, name: str) -> torch.Tensor:
        """``[prompt, layer, neuron]`` scores of one method."""
        if name not in self.methods:
            raise MechcnaError(f"unknown method {name!r}; choose from {self.methods}")
        return self.scores[:, self.methods.index(name)]

    def top_neurons(self, name: str, prompt: int, k: int) -> list[tuple[int, int]]:
        """The ``k`` best ``(layer, neuron)`` pairs of one method for one prompt."""
        values = self.method(name)[prompt]
        idx = values.flatten().topk(k).indices
        return [(int(i) // values.shape[1], int(i) % values.shape[1]) for i in idx]

    def plot(self, prompt: int | None = None) -> go.Figure:
        """Rank agreement of each method's neuron scores with log-probability increase."""
        values = self.select(prompt)  # method layer neuron
        ref = values[0].flatten().argsort().argsort().double()
        corr = []
        for m in range(values.shape[0]):
            r = values[m].flatten().argsort().argsort().double()
            corr.append(float(torch.corrcoef(torch.stack([ref, r]))[0, 1]))
        fig = go.Figure(go.Bar(x=list(self.methods), y=corr))
        fig.update_layout(
            title="Spearman correlation of each method with log-probability increase",
            yaxis_title="Spearman rho",
        )
        return fig


@per_call
@refuses_processing()
@refuses_soft_cap
def comparison_scores(
    model: Model,
    prompts: Prompts,
    targets: Targets = None,
    *,
    position: int | None = None,
    paper_compat: bool = False,
    cache: BlockCache | None = None,
    chunk: int = 128,
) -> ComparisonScores:
    """All eight method scores for every FFN neuron (docs/methods.md 4.6).

    Each layer's exact vocabulary rows ``W_out @ M`` are formed once, ``chunk`` rows at a
    time, and serve every prompt: ``log_prob`` (an exact log-softmax per prompt and row) and
    ``rank`` (:func:`target_ranks`) are read from them, and they fill the layer's row store
    in ``cache`` (default: the model's) when it can hold them, so that
    ``log_prob_increase`` (:func:`mechcna.engine.expansion.increase_from_rows`, as
    :func:`~mechcna.analyses.attribution.neuron_importance`) and any later attribution of the same
    weights (the value-neuron stage of ``mechcna reproduce``) find them computed.

    Returns:
        :class:`ComparisonScores` with ``scores[prompt, method, layer, neuron]``.
    """
    arch = architecture(model)
    cap = capture(model, prompts, targets, position=position, need=("post",))
    assert cap.post is not None
    dtype = compute_dtype(arch.dtype)
    n = len(cap.batch)
    out = torch.zeros(n, len(METHODS), arch.n_layers, arch.d_mlp, dtype=dtype)
    offset = logit_offset(arch, paper_compat)
    with torch.no_grad():
        for l in range(arch.n_layers):
            rows = layer_rows(model, "ffn", l, cache)
            keep = rows.cache.can_hold(rows.store, arch.n_layers)
            m = cap.post[:, l].to(dtype)
            a = m / cap.scale[:, None]
            alone, rank = torch.empty_like(a), torch.empty_like(a)
            for i in range(0, arch.d_mlp, chunk):
                idx = torch.arange(i, min(i + chunk, arch.d_mlp))
                R64 = _exact_rows64(rows, idx)  # [chunk, d_vocab], exact W_out @ M (float64)
                R = R64.to(dtype)
                if keep and not bool(rows.store.known[idx].all()):
                    rows.store.fill(idx, R64)
                for b in range(n):  # log p(w | v): the vector alone, exactly
                    logits = torch.addcmul(offset, a[b, idx, None], R)
                    alone[b, idx] = exact_rows_logprob(logits, cap.target[b].expand(len(idx)))
                rank[:, idx] = target_ranks(R, a[:, idx], offset, cap.target, chunk)
            base = linear_part(arch, cap.resid_mid[:, l]) / cap.scale[:, None] + offset
            imp = increase_from_rows(base, rows, a[:, None], cap.target, fill=keep)[:, 0]
            rows.cache.settle()
            base_lp = exact_rows_logprob(base, cap.target)[:, None]
            fc2_norm = arch.W_out(l).to(dtype).norm(dim=-1)
            values = {
                "log_prob_increase": imp,
                "log_prob": alone,
                "prob_increase": torch.exp(base_lp + imp) - torch.exp(base_lp),
                "norm": m.abs() * fc2_norm,
                "coefficient": m,
                "rank": 1.0 / rank,
                "coef_x_norm": m * fc2_norm,
                "coef_x_rank": m / rank,
            }
            for j, name in enumerate(METHODS):
                out[:, j, l] = values[name].cpu()
    return ComparisonScores(
        scores=out, dims=("prompt", "method", "layer", "neuron"), **_meta(model, cap, paper_compat)
    )


def target_ranks(
    U: Float[Tensor, "row d_vocab"],
    coef: Float[Tensor, "batch row"],
    offset: Float[Tensor, " d_vocab"],
    target: Int[Tensor, " batch"],
    chunk: int = 128,
) -> Float[Tensor, "batch row"]:
    """Rank of ``target[b]`` among the logits ``coef[b, k] * U[k] + offset`` of every row ``k``
    (1 is the top token; tokens tied with the target do not count against it).

    With a constant ``offset`` (no unembedding bias, or the papers' GPT-2 code) a positive
    coefficient only scales the row, so the rank is that of ``U[k, w]`` in ``U[k]``, a negative
    one reverses the order and a zero one ties every token (rank 1): the counts are computed
    once per distinct target and row, never per prompt, and no logit is formed. Otherwise the
    logits are compared chunk by chunk.
    """
    rank = torch.ones_like(coef)
    if bool((offset == offset[0]).all()):
        for t in target.unique().tolist():
            mine = target == t
            above, below = _counts_around(U, U[:, t], chunk)
            c = coef[mine]
            counts = torch.where(c > 0, above.to(c.dtype), torch.where(c < 0, below.to(c.dtype), 0))
            rank[mine] = 1 + counts
        return rank
    rows = torch.arange(len(target))
    for i in range(0, U.shape[0], chunk):
        logits = coef[:, i : i + chunk, None] * U[None, i : i + chunk] + offset
        own = logits[rows, :, target]
        rank[:, i : i + chunk] = 1 + (logits > own[..., None]).sum(-1)
    return rank


def _counts_around(
    U: Float[Tensor, "row d_vocab"], col: Float[Tensor, " row"], chunk: int
) -> tuple[Float[Tensor, " row"], Float[Tensor, " row"]]:
    """Per row ``k``: how many entries of ``U[k]`` are above and below ``col[k]``, in one pass
    (the sign of an exact difference: ``above - below`` and ``above + below`` are its sum and
    its absolute sum)."""
    acc = torch.float64 if U.shape[1] >= 2**24 else U.dtype  # sums of +-1 stay exact
    above, below = torch.empty(len(U), dtype=acc), torch.empty(len(U), dtype=acc)
    for i in range(0, len(U), chunk):
        sign = (U[i : i + chunk] - col[i : i + chunk, None]).sign_()
        net = sign.sum(-1, dtype=acc)
        both = sign.abs_().sum(-1, dtype=acc)
        above[i : i + chunk], below[i : i + chunk] = (both + net) / 2, (both - net) / 2
    return above, below


@per_call
def evaluate_methods(
    model: Model,
    prompts: Sequence[str] | torch.Tensor,
    targets: Targets = None,
    *,
    k: int = 10,
    methods: Iterable[str] = METHODS,
    scores: ComparisonScores | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The paper's method comparison: zero each method's top-``k`` neurons per prompt.

    Neurons are zeroed at every position (``mlp.hook_post``), as "setting parameters to zero".

    Returns:
        One row per method plus ``"original"``: mean reciprocal rank, probability and
        log-probability of the target after the intervention (lower is better).
    """
    scores = scores or comparison_scores(model, prompts, targets)
    batch = prepare_prompts(model, prompts)
    methods = list(methods)
    rows = []

    def measure(i: int, edit: NeuronEdit | None) -> tuple[float, float, float]:
        tokens = batch.tokens[i : i + 1, : int(batch.lengths[i])]
        with torch.no_grad(), intervene(model, *([edit] if edit else [])):
            logits = model(tokens)[0, int(batch.positions[i])]
        lp = logits.log_softmax(-1)
        w = int(scores.target_ids[i])
        rank = int((lp > lp[w]).sum()) + 1
        return 1.0 / rank, float(lp[w].exp()), float(lp[w])

    for name in tqdm(["original", *methods], desc="methods", disable=not progress):
        vals = []
        for i in range(scores.n_prompts):
            edit = None if name == "original" else NeuronEdit(scores.top_neurons(name, i, k))
            vals.append(measure(i, edit))
        t = torch.tensor(vals, dtype=torch.float64).mean(0)
        rows.append(
            {"method": name, "mrr": float(t[0]), "prob": float(t[1]), "log_prob": float(t[2])}
        )
    return pd.DataFrame(rows)
