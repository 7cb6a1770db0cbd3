"""Intervals and verdicts for reproduced claims: exact binomial, paired bootstrap, threshold.

Every claim of :mod:`mechcna.reproduce` is a number (an accuracy, a rate, a decrease, a
difference) compared with a threshold. Its verdict is read from a 95% interval, not from the
point estimate: **holds** when the whole interval lies on the claim's side of the threshold,
**does not hold** when the whole interval lies on the other side, **inconclusive** when the
interval straddles the threshold (the sample is too small to decide).

* :func:`clopper_pearson`: the exact binomial interval of ``k`` successes in ``n`` trials
  (accuracies and rates; the same interval as ``scipy.stats.binomtest(k, n).proportion_ci()``).
* :func:`paired_bootstrap`: a percentile interval of any statistic of per-case arrays,
  resampling cases (the rows of every array together, so paired before/after values stay
  paired) with a fixed seed: the same inputs always give the same interval.
* :func:`verdict`: holds / does not hold / inconclusive from an interval and a threshold.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Shaped
from scipy import stats as sps

Side = Literal["above", "below"]
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED)
#: Fewer cases than this: a bootstrap interval is not trusted (percentile intervals
#: under-cover on tiny samples) and the verdict is inconclusive whatever the interval.
MIN_BOOTSTRAP_N = 10


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion ``k / n``.

    ``(nan, nan)`` when ``n == 0``. The bounds are beta quantiles: ``lo = Beta(a/2; k, n-k+1)``
    (0 when ``k == 0``), ``hi = Beta(1-a/2; k+1, n-k)`` (1 when ``k == n``), ``a = 1 - level``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..{n}, got {k}")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(sps.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def paired_bootstrap(
    statistic: Callable[..., float],
    *arrays: Shaped[np.ndarray, "case ..."],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The statistic and its percentile bootstrap interval over cases.

    Each resample draws ``n`` case indices with replacement (``numpy`` generator seeded with
    ``seed``) and applies ``statistic`` to every array indexed by them together: paired
    measurements of one case (before / after, method A / method B) stay together. Resamples
    whose statistic is NaN (e.g. a zero denominator) are dropped.

    Returns:
        ``(estimate, lo, hi)``: the statistic on the data and the ``level`` interval
        (``nan`` bounds with fewer than 2 cases).
    """
    if not arrays:
        raise ValueError("paired_bootstrap needs at least one array")
    data = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError("every array must have one row per case")
    estimate = float(statistic(*data)) if n else float("nan")
    if n < 2:
        return estimate, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    values = np.array([float(statistic(*(a[i] for a in data))) for i in idx])
    values = values[~np.isnan(values)]
    if not len(values):
        return estimate, float("nan"), float("nan")
    a = (1.0 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return estimate, float(lo), float(hi)


def verdict(lo: float, hi: float, threshold: float, side: Side = "above") -> str:
    """``"holds"`` when ``[lo, hi]`` lies wholly on ``side`` of ``threshold`` (strictly
    above / below), ``"does not hold"`` when it lies wholly on the other side (a bound equal
    to the threshold counts as the other side), ``"inconclusive"`` when it straddles it, and
    ``"not measured"`` when a bound is NaN."""
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below', not {side!r}")
    if lo != lo or hi != hi:
        return NOT_MEASURED
    if side == "above":
        return HOLDS if lo > threshold else FAILS if hi <= threshold else INCONCLUSIVE
    return HOLDS if hi < threshold else FAILS if lo >= threshold else INCONCLUSIVE


@dataclass(frozen=True)
class Test:
    """A claim's number, its interval and threshold (what a verdict is computed from).

    Attributes:
        n: the sample size behind the interval (cases, prompts, tokens or heads).
        estimate: the measured number.
        lo, hi: its 95% interval.
        threshold: the claim's threshold.
        side: the claim holds when the number is ``"above"`` / ``"below"`` the threshold.
        method: how the interval was computed (``"exact binomial"``, ``"paired bootstrap"``).
    """

    n: int
    estimate: float
    lo: float
    hi: float
    threshold: float
    side: Side = "above"
    method: str = "paired bootstrap"

    @property
    def verdict(self) -> str:
        """:func:`verdict` of the interval; ``"inconclusive"`` for a bootstrap over fewer
        than :data:`MIN_BOOTSTRAP_N` cases (unless it is not measured)."""
        v = verdict(self.lo, self.hi, self.threshold, self.side)
        if v != NOT_MEASURED and self.method == "paired bootstrap" and self.n < MIN_BOOTSTRAP_N:
            return INCONCLUSIVE
        return v

    @property
    def test(self) -> str:
        return f"{'>' if self.side == 'above' else '<'} {self.threshold:g}"


def binomial_test(k: int, n: int, threshold: float, side: Side = "above") -> Test:
    """A rate ``k / n`` against ``threshold`` with its exact interval."""
    lo, hi = clopper_pearson(k, n)
    return Test(n, k / n if n else float("nan"), lo, hi, threshold, side, "exact binomial")


def bootstrap_test(
    statistic: Callable[..., float],
    *arrays: Shaped[np.ndarray, "case ..."],
    threshold: float,
    side: Side = "above",
    seed: int = 0,
    n_boot: int = 2000,
) -> Test:
    """A statistic of per-case arrays against ``threshold`` with its paired bootstrap interval."""
    est, lo, hi = paired_bootstrap(statistic, *arrays, seed=seed, n_boot=n_boot)
    return Test(len(arrays[0]), est, lo, hi, threshold, side, "paired bootstrap")


def relative_decrease(before: np.ndarray, after: np.ndarray) -> float:
    """``100 * (mean(before) - mean(after)) / mean(before)`` (NaN when the mean before is 0)."""
    b = float(np.mean(before))
    return 100.0 * (b - float(np.mean(after))) / b if b else float("nan")


def spread(values: np.ndarray | list[float]) -> str:
    """``"mean (min-max over N draws)"`` of repeated random baselines."""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ({v.min():.1f} to {v.max():.1f} over {len(v)} draws)"
