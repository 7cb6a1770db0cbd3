"""Verdicts for the applications' claims (ARITH Figure 2, Tables 10 and 11), with the
reproduction's statistics: n, estimate, 95% interval, threshold, verdict.

The applications (``examples/applications.py``, ``mechcna lora / prune``) write their numbers to
``results.json``. :func:`application_claims` turns one such file into claim rows
(:class:`~mechcna.reproduce.core.Claim`, the same columns as ``Reproduction.claims``):

* **Figure 2** (LoRA on one attention layer raises accuracy): the best layer's accuracy minus
  the original's, Newcombe's interval for a difference of two proportions over the held-out
  cases, against 0.
* **Table 10** (LoRA on shallow layers amplifies the top CNA neurons' coefficients more than
  LoRA on deep layers: +42% to +59% on layers 1-9 against +2% to +28% on layers 17-30): the
  mean per-case increase (top-50) of the shallow-layer LoRAs minus that of the deep-layer
  LoRAs, paired bootstrap over the CNA cases (each case scored under every LoRA), against 0.
  Needs the per-case increases (``table10_per_case``); older files record only the means.
* **Table 11** (after a fresh LoRA, the CNA-pruned model keeps far more accuracy than the
  randomly pruned one: 82.3 vs 17.1): the accuracy difference, Newcombe's interval, against
  20 points (under a third of the paper's 65-point gap): a paired bootstrap over the test
  cases when the file holds each case's correctness (``table11.correct``, written since
  issue 21), else Newcombe's interval from the two accuracies as if independent (the cases
  are shared: the paired interval is narrower).

``python -m mechcna.reproduce.application_claims results.json [...]`` prints the rows as a
markdown table (how docs/applications.md's verdict table is made).
"""

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps

from mechcna.reproduce.core import Claim, claims_frame, markdown_table
from mechcna.reproduce.stats import Test, bootstrap_test

#: ARITH Table 10: mean % coefficient increase of the top-50 / 30 / 20 / 10 CNA neurons per
#: group of LoRA layers (Llama-7B).
TABLE10 = {"1-9": (42, 49, 57, 59), "10-16": (29, 36, 44, 53), "17-30": (2, 11, 14, 28)}
#: ARITH Table 11 (%): after a fresh LoRA, CNA-pruned vs randomly pruned (95% of layers 17-31).
TABLE11 = {"lora_pruned_cna": 82.3, "lora_pruned_random": 17.1}
#: "Far more": the CNA-pruned model must beat the random one by this many accuracy points.
PRUNING_MARGIN = 0.20


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of ``k / n``."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def newcombe_difference(
    k1: int, n1: int, k2: int, n2: int, level: float = 0.95
) -> tuple[float, float, float]:
    """``p1 - p2`` of two independent proportions and Newcombe's hybrid score interval
    (his method 10, from each proportion's Wilson interval)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, level)
    l2, u2 = wilson(k2, n2, level)
    d = p1 - p2
    lo = d - float(np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2))
    hi = d + float(np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))
    return d, lo, hi


def _count(accuracy: float, n: int) -> int:
    return round(accuracy * n)


def difference_test(acc1: float, acc2: float, n: int, threshold: float) -> Test:
    """Accuracy ``acc1 - acc2`` over ``n`` cases each (accuracies as recorded, turned back
    into counts), Newcombe's interval, against ``threshold``."""
    d, lo, hi = newcombe_difference(_count(acc1, n), n, _count(acc2, n), n)
    return Test(n, d, lo, hi, threshold, "above", "Newcombe (unpaired)")


def layer_pattern_test(
    per_case: Mapping[int, Float[np.ndarray, " case"]],
    shallow: Sequence[int],
    deep: Sequence[int],
    seed: int = 0,
) -> Test:
    """Mean per-case coefficient increase (%) of the LoRAs on ``shallow`` layers minus that of
    the LoRAs on ``deep`` layers, paired bootstrap over cases (every LoRA scored on the same
    cases), against 0 (the paper: shallow LoRAs amplify more)."""
    s = [l for l in shallow if l in per_case]
    d = [l for l in deep if l in per_case]
    if not s or not d:
        raise ValueError(f"need LoRA layers in both groups, have {sorted(per_case)}")
    a = np.stack([np.asarray(per_case[l], dtype=np.float64) for l in s], 1)
    b = np.stack([np.asarray(per_case[l], dtype=np.float64) for l in d], 1)
    return bootstrap_test(lambda x, y: float(x.mean() - y.mean()), a, b, threshold=0.0, seed=seed)


def _groups(n_layers: int) -> tuple[range, range]:
    """The paper's shallow (1-9 of 32) and deep (17-30 of 32) LoRA layers, scaled to
    ``n_layers``: layers ``1 .. ceil(10 L / 32) - 1`` and ``floor(17 L / 32) .. L - 1``."""
    return range(1, math.ceil(10 * n_layers / 32)), range(17 * n_layers // 32, n_layers)


def application_claims(results: Mapping[str, Any], n_layers: int | None = None) -> list[Claim]:
    """Claim rows for one ``results.json`` of the applications (see the module doc).

    Args:
        results: the parsed file.
        n_layers: the model's layer count (for Table 10's layer groups; default: read from
            ``results["n_layers"]``, else the largest LoRA layer + 1).
    """
    out: list[Claim] = []
    n = int(results.get("data", {}).get("test_cases", 0))
    fig2 = results.get("figure2") or []
    if fig2 and n:
        best = max(fig2, key=lambda r: r["accuracy"])
        orig = float(results["original_accuracy"])
        t = difference_test(float(best["accuracy"]), orig, n, 0.0)
        out.append(Claim(
            "arithmetic",
            "LoRA on one attention layer raises accuracy (test: best layer minus original "
            f"accuracy above 0; the best of {len(fig2)} LoRA layers, chosen on the same cases, "
            "so optimistic; Newcombe interval, unpaired)",
            "Figure 2: 62.96% -> about 90% on layers 1-9 (Llama-7B)",
            f"layer {best['layer']}: {orig:.3f} -> {best['accuracy']:.3f} on {n} held-out cases",
            t,
        ))  # fmt: skip
    per_case = results.get("table10_per_case")
    layers = sorted(int(r["layer"]) for r in fig2)
    if per_case:
        n_l = n_layers or int(results.get("n_layers", max(layers, default=0) + 1))
        shallow, deep = _groups(n_l)
        arrays = {int(l): np.asarray(v["top50"]) for l, v in per_case.items()}
        s = [l for l in shallow if l in arrays]
        d = [l for l in deep if l in arrays]
        if s and d:
            t = layer_pattern_test(arrays, s, d)
            means = ", ".join(f"L{l}: {np.mean(arrays[l]):+.1f}%" for l in sorted(arrays))
            out.append(Claim(
                "arithmetic",
                "LoRA on shallow layers amplifies the top-50 CNA neurons' coefficients more "
                f"than LoRA on deep layers (test: mean increase of layers {s} minus layers "
                f"{d} above 0; paired bootstrap over the CNA cases)",
                "Table 10: top-50 +42% (layers 1-9), +29% (10-16), +2% (17-30)",
                means,
                t,
            ))  # fmt: skip
    elif results.get("table10"):
        out.append(Claim(
            "arithmetic",
            "LoRA on shallow layers amplifies the top CNA neurons' coefficients more than "
            "LoRA on deep layers",
            "Table 10: top-50 +42% (layers 1-9), +29% (10-16), +2% (17-30)",
            "not measured: this run recorded only the mean per LoRA layer, not per case",
            None,
        ))  # fmt: skip
    block = results.get("table11") or results
    t11 = block.get("accuracy")
    n = n or len((block.get("correct") or {}).get("lora_pruned_cna", ()))
    if t11 and n and "lora_pruned_cna" in t11:
        cna, rand = float(t11["lora_pruned_cna"]), float(t11["lora_pruned_random"])
        per = block.get("correct") or {}
        if "lora_pruned_cna" in per and "lora_pruned_random" in per:
            a, b = (
                np.asarray(per[k], dtype=np.float64)
                for k in ("lora_pruned_cna", "lora_pruned_random")
            )
            t = bootstrap_test(lambda x, y: float(x.mean() - y.mean()), a, b,
                               threshold=PRUNING_MARGIN)  # fmt: skip
            how = "paired bootstrap over the test cases"
        else:
            t = difference_test(cna, rand, n, PRUNING_MARGIN)
            how = "Newcombe interval, unpaired"
        out.append(Claim(
            "arithmetic",
            "After a fresh LoRA, the CNA-pruned model keeps far more accuracy than a randomly "
            f"pruned one (test: accuracy difference above {PRUNING_MARGIN:g}; {how})",
            f"Table 11: {TABLE11['lora_pruned_cna']} vs {TABLE11['lora_pruned_random']}",
            f"{cna:.3f} vs {rand:.3f} on {n} held-out cases (before LoRA: "
            f"{float(t11['pruned_cna']):.3f} vs {float(t11['pruned_random']):.3f})",
            t,
        ))  # fmt: skip
    return out


def verdict_table(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The claim rows of several ``results.json`` files, with a ``run`` column (the folder)."""
    frames = []
    for p in paths:
        path = Path(p)
        results = json.loads(path.read_text())
        frame = claims_frame(application_claims(results))
        frame.insert(0, "run", path.parent.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else claims_frame([])


def main(argv: Sequence[str] | None = None) -> int:
    """Print the verdict table of the given ``results.json`` files as markdown."""
    paths = list(sys.argv[1:] if argv is None else argv)
    frame = verdict_table(paths).drop(columns=["paper"])
    sys.stdout.write(markdown_table(frame) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
