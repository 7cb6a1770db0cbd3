"""The statistics behind the reproduced claims: per-case numbers in, a :class:`Test` out.

Each function turns the per-case (or per-prompt, per-head) measurements of one claim into a
:class:`~mechcna.reproduce.stats.Test` (n, estimate, 95% interval, threshold), designed so
that the test can fail and can pass:

* :func:`split_halves` and :func:`top_head_test`: the top head is **selected on one half** of
  the cases and its effect **reported on the other half** (no winner's curse).
* :func:`quiet_heads_test`: "most heads barely matter" counts heads whose ablation changes
  accuracy by less than the tolerance **in either direction** (absolute change).
* :func:`coefficient_tests`: the coefficient fall of the top CNA neurons tested by its
  magnitude (against the paper's smallest figure) and its trend with K, not only its sign.
* :func:`operand_concepts`: number concepts among an operand's top tokens, **excluding the
  operand's own token** (tied embeddings make the operand its own top token).
* :func:`chance_rate` and :func:`auto_thresholds`: the chance that a random vocabulary
  direction passes the zero-shot search, and an ``M`` whose sets are a few percent of the pool.
"""

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import stats as sps

from mechcna.analyses.head_results import HeadSweep
from mechcna.analyses.shallow import selective_thresholds
from mechcna.reproduce.stats import Side, Test, bootstrap_test, relative_decrease


def split_halves(
    n: int, seed: int = 0, groups: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random split of ``n`` cases into a selection half and an evaluation half (boolean
    masks; the selection half gets the extra case when ``n`` is odd). With ``groups`` (one
    label per case, e.g. the operation), each group is split in halves on its own (its extra
    case to selection), so every group of two or more cases is in both halves."""
    rng = np.random.default_rng(seed)
    select = np.zeros(n, dtype=bool)
    if groups is None:
        order = rng.permutation(n)
        select[order[: (n + 1) // 2]] = True
        return select, ~select
    labels = np.asarray(groups, dtype=object)
    for g in sorted(set(labels.tolist()), key=str):
        idx = np.flatnonzero(labels == g)
        select[idx[rng.permutation(len(idx))[: (len(idx) + 1) // 2]]] = True
    return select, ~select


def sub_sweep(sweep: HeadSweep, mask: Bool[np.ndarray, " case"]) -> HeadSweep:
    """The sweep restricted to the cases of ``mask``."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    idx = np.flatnonzero(mask)
    return replace(
        sweep,
        correct=sweep.correct[:, m],
        logprob=sweep.logprob[:, m],
        prediction=sweep.prediction[:, m],
        base_correct=sweep.base_correct[m],
        base_logprob=sweep.base_logprob[m],
        base_prediction=sweep.base_prediction[m],
        targets=sweep.targets[m],
        labels=sweep.labels.iloc[idx].reset_index(drop=True),
        prompts=None if sweep.prompts is None else tuple(sweep.prompts[i] for i in idx),
    )


def _op_mask(sweep: HeadSweep, operations: list[str]) -> np.ndarray:
    if "operation" not in sweep.labels.columns:
        return np.ones(sweep.n_cases, dtype=bool)
    ops = sweep.labels["operation"].isin(operations).to_numpy(copy=True)  # writable
    return ops if ops.any() else np.ones(sweep.n_cases, dtype=bool)


def best_head(sweep: HeadSweep, cases: np.ndarray, min_layer: int = 0) -> tuple[int, int]:
    """The head (layer >= ``min_layer``) whose ablation lowers accuracy most on ``cases``
    (ties: the larger log-probability decrease), as :meth:`HeadSweep.top` ranks them."""
    m = torch.from_numpy(cases)
    delta = (sweep.correct[:, m].double().mean(1) - sweep.base_correct[m].double().mean()).numpy()
    dlp = (sweep.logprob[:, m].double().mean(1) - sweep.base_logprob[m].double().mean()).numpy()
    layers = np.array([l for l, _ in sweep.heads])
    order = np.lexsort((dlp, delta))  # by delta, then log-prob change
    i = next(int(i) for i in order if layers[i] >= min_layer)
    return sweep.heads[i]


def chosen_heads(
    sweep: HeadSweep, operations: Sequence[str], n_layers: int
) -> dict[str, tuple[int, int]]:
    """The heads a reproduction chooses on the selection half (``sweep``: every head, the
    selection cases only) and then scores on the evaluation half, by role:

    * ``"+/-"``: the top head on + and - (the paper's 17_22; on every case when neither is
      swept);
    * ``"shallow"``: that head, or the top + / - head above layer 0 when it sits in layer 0
      (Tables 7-8 need layers below the head);
    * ``"division"``: the top head on ``/`` (appendix B's 14_19), when ``/`` is swept;
    * ``"op <o>"``: each swept operation's top head (Tables 2-3).

    Every head is ranked as :func:`best_head` ranks them."""
    ops = _op_mask(sweep, ["+", "-"])
    head = best_head(sweep, ops)
    shallow = head if head[0] > 0 or n_layers < 2 else best_head(sweep, ops, min_layer=1)
    out = {"+/-": head, "shallow": shallow}
    swept = set(sweep.labels["operation"]) if "operation" in sweep.labels.columns else set()
    if "/" in swept:
        out["division"] = best_head(sweep, _op_mask(sweep, ["/"]))
    for op in operations:
        if op in swept:
            out[f"op {op}"] = best_head(sweep, _op_mask(sweep, [op]))
    return out


def head_effect_test(
    sweep: HeadSweep, head: tuple[int, int], cases: np.ndarray, threshold: float, seed: int = 0
) -> Test:
    """Relative accuracy decrease (%) of ablating ``head`` on ``cases``, paired bootstrap
    over those cases (each case's correctness with and without the head)."""
    i = sweep.heads.index(head)
    m = torch.from_numpy(cases)
    base = sweep.base_correct[m].double().numpy()
    after = sweep.correct[i, m].double().numpy()
    return bootstrap_test(relative_decrease, base, after, threshold=threshold, seed=seed)


def top_head_test(
    sweep: HeadSweep,
    operations: list[str],
    threshold: float = 20.0,
    seed: int = 0,
    min_layer: int = 0,
) -> tuple[tuple[int, int], Test]:
    """Select the top head of ``operations`` on the selection half, report its relative
    accuracy decrease (%) on the evaluation half (winner's curse removed)."""
    select, evaluate = split_halves(sweep.n_cases, seed)
    ops = _op_mask(sweep, operations)
    head = best_head(sweep, select & ops, min_layer)
    return head, head_effect_test(sweep, head, evaluate & ops, threshold, seed)


def quiet_heads_test(
    sweep: HeadSweep, tolerance: float = 0.02, threshold: float = 0.9, seed: int = 0
) -> Test:
    """Share of heads whose ablation changes overall accuracy by less than ``tolerance``
    (absolute change, either direction), bootstrap over cases (each resample recomputes every
    head's change on the same resampled cases)."""
    diff = (sweep.correct.double() - sweep.base_correct.double()[None]).numpy().T  # case head

    def share(d: np.ndarray) -> float:
        return float(np.mean(np.abs(d.mean(0)) < tolerance))

    t = bootstrap_test(share, diff, threshold=threshold, seed=seed, n_boot=1000)
    return replace(t, n=sweep.n_cases)


def coefficient_falls(
    coefficient: Float[torch.Tensor, "case layer neuron"],
    coefficient_other: Float[torch.Tensor, "case layer neuron"],
    top: Bool[torch.Tensor, "case layer neuron"],
) -> np.ndarray:
    """Per case: ``100 * (sum|m| - sum|m'|) / sum|m|`` over its top neurons (the "coef" row
    of :func:`mechcna.analyses.comparative.mask_keep_table`, before the mean over cases)."""
    m, m_o = coefficient.abs().double(), coefficient_other.abs().double()
    before, after = (m * top).sum((1, 2)), (m_o * top).sum((1, 2))
    return (100.0 * (before - after) / before.clamp_min(1e-30)).numpy()


def coefficient_tests(
    falls: dict[int, np.ndarray], magnitude: float, seed: int = 0
) -> tuple[Test, Test]:
    """The coefficient fall of the top CNA neurons at the largest K against ``magnitude`` (%)
    and its trend: the fall at the smallest K minus that at the largest K (> 0: smaller sets
    of top neurons fall more, as the paper's 49.1% at top100 to 77.1% at top10)."""
    big, small = max(falls), min(falls)
    mag = bootstrap_test(np.mean, falls[big], threshold=magnitude, seed=seed)
    trend = bootstrap_test(
        lambda s, b: float(np.mean(s) - np.mean(b)), falls[small], falls[big], threshold=0.0,
        seed=seed,
    )  # fmt: skip
    return mag, trend


def mean_test(values: np.ndarray, threshold: float, side: Side = "above", seed: int = 0) -> Test:
    """The mean of per-case ``values`` against ``threshold``, bootstrap over cases."""
    return bootstrap_test(np.mean, values, threshold=threshold, side=side, seed=seed)


def operand_concepts(tokens: list[str], operand: str, concepts: set[str]) -> int:
    """How many of ``tokens`` are number concepts (their stripped, case-folded text is in
    ``concepts``) other than the operand itself (``"3"``, ``" 3"`` do not count for
    operand ``"3"``)."""
    own = operand.strip().lower()
    n = 0
    for t in tokens:
        key = t.strip().strip("▁Ġ").strip()
        if key.lower() != own and (key in concepts or key.lower() in concepts):
            n += 1
    return n


def chance_rate(d_vocab: int, n_concepts: int, top: int, m: int, readers: int = 1) -> float:
    """The probability that a random direction counts at least ``m`` concept tokens among its
    top-``top`` tokens through at least one of ``readers`` independent readers
    (hypergeometric: ``top`` of ``d_vocab`` tokens drawn, ``n_concepts`` of them concepts)."""
    if m <= 0:
        return 1.0
    one = float(sps.hypergeom.sf(m - 1, d_vocab, n_concepts, top))
    return 1.0 - (1.0 - one) ** max(readers, 1)


#: Thresholds ``M`` whose sets are a few percent of the pool
#: (:func:`mechcna.analyses.shallow.selective_thresholds`).
auto_thresholds = selective_thresholds


def number_concepts() -> set[str]:
    """The number concepts (digits, number words, Roman numerals, super/subscripts) of
    :mod:`mechcna.analyses.shallow`, case-folded except the Roman numerals."""
    from mechcna.analyses import shallow

    words = [*shallow.DIGITS, *shallow.NUMBER_WORDS, *shallow.SCRIPTS]
    return {w.lower() for w in words} | set(shallow.ROMAN)
