import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from mechcna import (
    HeadAblation,
    HeadSweep,
    MechcnaError,
    apply_to_weights,
    head_sweep,
    intervene,
    single_prompt_head_effects,
)
from mechcna.interventions.prompts import prepare_prompts
from tests.helpers import PROMPTS, build

# Prompts of several lengths (right padding inside batches) with labels.
CASES = [
    ("12+7=", "+", 2),
    ("3+5=", "+", 1),
    ("the sum of 3 and 5 is", "+", 1),
    ("12-7=", "-", 2),
    ("9-4=", "-", 1),
    ("Q : what is 12 minus 7 ? A :", "-", 2),
    ("Tim Duncan plays the sport of", "+", 2),
    ("a man works as", "-", 1),
]


def _prompts():
    return [p for p, _, _ in CASES]


def _labels():
    return pd.DataFrame({"operation": [o for _, o, _ in CASES], "digits": [d for _, _, d in CASES]})


def _targets(model):
    """Half the model's own top-1 (correct at baseline), half another digit."""
    out = []
    with torch.no_grad():
        for i, p in enumerate(_prompts()):
            top = int(model(p)[0, -1].argmax())
            out.append(top if i % 2 == 0 else model.to_single_token(str(i)))
    return out


def _reference(model, prompts, targets, heads, make):
    """The obvious way: one ablated model per head, prompts one at a time."""
    logprob = torch.empty(len(heads), len(prompts), dtype=torch.float64)
    pred = torch.empty(len(heads), len(prompts), dtype=torch.long)
    for i, head in enumerate(heads):
        with make(model, head) as ablated, torch.no_grad():
            for j, p in enumerate(prompts):
                lp = ablated(p)[0, -1].log_softmax(-1)
                logprob[i, j] = float(lp[targets[j]])
                pred[i, j] = int(lp.argmax())
    return logprob, pred


def _hooked(model, head):
    return intervene(model, HeadAblation([head]))


class _Weights:
    def __init__(self, model, head):
        self.copy = apply_to_weights(model, HeadAblation([head]))

    def __enter__(self):
        return self.copy

    def __exit__(self, *exc):
        return False


class _Clean:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False


def _no_hooks(model):
    return all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fast_equals_reference(kind, dtype, tol):
    model = build(kind, dtype=dtype)
    targets = _targets(model)
    sweep = head_sweep(model, _prompts(), targets, batch_size=3, heads_per_pass=3, progress=False)
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    assert sweep.heads == tuple(heads)
    make = _hooked if dtype == torch.float32 else _Weights
    ref_lp, ref_pred = _reference(model, _prompts(), targets, heads, make)
    torch.testing.assert_close(sweep.logprob.double(), ref_lp, atol=tol, rtol=0)
    assert torch.equal(sweep.prediction, ref_pred)
    assert torch.equal(sweep.correct, ref_pred == torch.tensor(targets)[None])
    assert sweep.correct.any() and not sweep.correct.all()
    base_lp, base_pred = _reference(model, _prompts(), targets, [None], lambda m, _: _Clean(m))
    torch.testing.assert_close(sweep.base_logprob.double(), base_lp[0], atol=tol, rtol=0)
    assert torch.equal(sweep.base_prediction, base_pred[0])
    assert _no_hooks(model)


def test_mean_mode_equals_reference(model64):
    model = model64
    prompts = _prompts()
    batch = prepare_prompts(model, prompts)
    mask = (torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]).long()
    heads = [(0, 1), (1, 3), (1, 0)]
    means = HeadAblation.mean_over(model, heads, batch.tokens, attention_mask=mask)
    targets = _targets(model)
    sweep = head_sweep(
        model, prompts, targets, heads=heads, mode="mean", reference=means, progress=False
    )
    assert means.means is not None
    ref_lp, ref_pred = _reference(
        model,
        prompts,
        targets,
        heads,
        lambda m, hd: intervene(m, HeadAblation([hd], "mean", means={hd: means.means[hd]})),  # type: ignore[index]
    )
    torch.testing.assert_close(sweep.logprob, ref_lp, atol=1e-10, rtol=0)
    assert torch.equal(sweep.prediction, ref_pred)
    # The sweep's own means (reference=None: the data, padding excluded) are mean_over's.
    own = head_sweep(model, prompts, targets, heads=heads, mode="mean", progress=False)
    assert own.means is not None
    for hd in heads:
        torch.testing.assert_close(own.means[hd], means.means[hd], atol=1e-12, rtol=0)
    torch.testing.assert_close(own.logprob, sweep.logprob, atol=1e-10, rtol=0)
    # Mean ablation differs from zero ablation.
    zero = head_sweep(model, prompts, targets, heads=heads, progress=False)
    assert (zero.logprob - sweep.logprob).abs().max() > 1e-6


def test_head_subset_and_input_forms(model64):
    model = model64
    targets = _targets(model)
    full = head_sweep(model, _prompts(), targets, heads_per_pass=2, progress=False)
    subset = [(1, 2), (0, 3), (1, 0), (1, 2)]
    sweep = head_sweep(model, _prompts(), targets, heads=subset, batch_size=2, progress=False)
    assert sweep.heads == ((1, 2), (0, 3), (1, 0))
    rows = [full.heads.index(hd) for hd in sweep.heads]
    torch.testing.assert_close(sweep.logprob, full.logprob[rows], atol=1e-10, rtol=0)
    assert torch.equal(sweep.correct, full.correct[rows])
    # Token rows of unequal lengths give the same numbers as strings.
    toks = [model.to_tokens(p)[0] for p in _prompts()]
    by_tokens = head_sweep(model, toks, torch.tensor(targets), heads=subset, progress=False)
    torch.testing.assert_close(by_tokens.logprob, sweep.logprob, atol=1e-10, rtol=0)
    fig = sweep.plot(value="delta_logprob")
    z = np.array(fig.data[0].z, dtype=float)  # type: ignore[attr-defined]
    assert z.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert np.isnan(z[0, 0]) and not np.isnan(z[1, 2])


class _Dataset:
    def __init__(self, prompts, targets, labels):
        self.prompts, self.targets, self._labels = prompts, targets, labels

    def to_frame(self):
        return self._labels


def test_labels_cells_and_dataset_object(model):
    targets = [model.to_single_str_token(t) for t in _targets(model)]
    data = _Dataset(_prompts(), targets, _labels())
    sweep = head_sweep(model, data, progress=False)
    plain = head_sweep(model, _prompts(), targets, labels=_labels(), progress=False)
    torch.testing.assert_close(sweep.logprob, plain.logprob, atol=0, rtol=0)
    plus = (_labels()["operation"] == "+").to_numpy()
    summary = sweep.summary({"operation": "+"})
    m = torch.from_numpy(plus.copy())
    expected = sweep.correct[:, m].double().mean(1).numpy()
    np.testing.assert_allclose(summary["accuracy"], expected)
    np.testing.assert_allclose(
        summary["delta_logprob"],
        (sweep.logprob[:, m].double().mean(1) - sweep.base_logprob[m].double().mean()).numpy(),
        atol=1e-6,
    )
    assert (summary["n"] == plus.sum()).all()
    frame = sweep.to_frame(["digits", "operation"])
    assert set(frame.columns[:2]) == {"digits", "operation"}
    assert len(frame) == 4 * len(sweep.heads)
    two_minus = frame[(frame.digits == 2) & (frame.operation == "-")]
    np.testing.assert_allclose(
        two_minus["accuracy"], sweep.summary("digits == 2 and operation == '-'")["accuracy"]
    )
    top = sweep.top(3, cell={"digits": 1})
    assert len(top) == 3 and top["delta_accuracy"].is_monotonic_increasing
    fig = sweep.plot("+")
    assert isinstance(fig, go.Figure)
    assert fig.data[0].zmid == 0  # type: ignore[attr-defined]
    assert _no_hooks(model)


def _handmade() -> HeadSweep:
    # 2 heads x 4 cases; base: T T T F; head 0_0: F T T F; head 0_1: T T F F
    return HeadSweep(
        heads=((0, 0), (0, 1)),
        correct=torch.tensor([[False, True, True, False], [True, True, False, False]]),
        logprob=torch.tensor([[-3.0, -1.0, -1.0, -2.0], [-1.0, -1.0, -4.0, -2.0]]),
        prediction=torch.zeros(2, 4, dtype=torch.long),
        base_correct=torch.tensor([True, True, True, False]),
        base_logprob=torch.tensor([-1.0, -1.0, -1.0, -2.0]),
        base_prediction=torch.zeros(4, dtype=torch.long),
        targets=torch.zeros(4, dtype=torch.long),
        labels=pd.DataFrame({"operation": ["+", "+", "-", "-"], "digits": [2, 2, 2, 2]}),
        n_layers=1,
        n_heads=2,
    )


def test_table_relative_decrease():
    sweep = _handmade()
    table = sweep.table("operation", heads=[(0, 0), "0_1"], values="relative_decrease")
    assert list(table.index) == ["all", "+", "-"]
    assert table.loc["all", "ori"] == pytest.approx(75.0)
    assert table.loc["all", "0_0"] == pytest.approx(100 * (0.75 - 0.5) / 0.75)
    assert table.loc["+", "0_0"] == pytest.approx(50.0)
    assert table.loc["+", "0_1"] == pytest.approx(0.0)
    assert table.loc["-", "ori"] == pytest.approx(50.0)
    assert table.loc["-", "0_1"] == pytest.approx(100.0)
    acc = sweep.table(("digits", "operation"), heads="top", k=1)
    assert list(acc.index) == ["all", "2D+", "2D-"]
    # Both heads lose 25 points overall; 0_1 lowers the mean log-prob more (-2 vs -1.75).
    assert list(acc.columns) == ["n", "ori", "0_1"]
    assert acc.loc["2D+", "0_1"] == pytest.approx(100.0)
    assert acc.loc["2D-", "0_1"] == pytest.approx(0.0)
    per_cell = sweep.table("operation", k=2, values="decrease", overall=False)
    assert per_cell.loc["-", "head_1"] == "0_1"
    assert per_cell.loc["-", "decrease_1"] == pytest.approx(50.0)
    assert per_cell.loc["+", "head_1"] == "0_0"
    table2 = sweep.table(
        "digits", heads=[(0, 0)], values="relative_decrease", cell="operation == '+'"
    )
    assert table2.loc["2D", "0_0"] == pytest.approx(50.0)
    zero = HeadSweep(**{**_handmade().__dict__, "base_correct": torch.zeros(4, dtype=torch.bool)})
    assert math.isnan(zero.summary()["relative_decrease"][0])


def test_single_prompt_effects(model64):
    model = model64
    effects = single_prompt_head_effects(model, "12+7=")
    with torch.no_grad():
        base = model("12+7=")[0, -1].log_softmax(-1)
    assert effects.target == int(base.argmax())
    assert effects.base_logprob == pytest.approx(float(base.max()), abs=1e-12)
    frame = effects.to_frame()
    assert frame["prob"].is_monotonic_increasing
    assert len(frame) == model.cfg.n_layers * model.cfg.n_heads
    first = frame.iloc[0]
    with intervene(model, HeadAblation([(int(first.layer), int(first.head_index))])):
        with torch.no_grad():
            lp = model("12+7=")[0, -1].log_softmax(-1)[effects.target]
    assert first["logprob"] == pytest.approx(float(lp), abs=1e-10)
    assert effects.top(3)["head"].tolist() == frame["head"][:3].tolist()
    fig = effects.plot()
    assert isinstance(fig, go.Figure) and fig.data[0].zmid == 0  # type: ignore[attr-defined]
    given = single_prompt_head_effects(model, model.to_tokens("12+7=")[0], target="3")
    assert given.target == model.to_single_token("3")


def test_bad_input(model):
    prompts = _prompts()[:3]
    with pytest.raises(MechcnaError, match="head 4 out of range"):
        head_sweep(model, prompts, "3", heads=[(0, 4)], progress=False)
    with pytest.raises(MechcnaError, match="layer 2 out of range"):
        head_sweep(model, prompts, "3", heads=[(2, 0)], progress=False)
    with pytest.raises(MechcnaError, match="not a single token"):
        head_sweep(model, prompts, "12", progress=False)
    with pytest.raises(MechcnaError, match="2 targets for 3 prompts"):
        head_sweep(model, prompts, ["3", "4"], progress=False)
    with pytest.raises(MechcnaError, match="label rows"):
        head_sweep(model, prompts, "3", labels=_labels(), progress=False)
    with pytest.raises(MechcnaError, match="mean"):
        head_sweep(model, prompts, "3", reference=PROMPTS, progress=False)
    with pytest.raises(MechcnaError, match="own targets"):
        head_sweep(model, _Dataset(prompts, ["3"] * 3, _labels()[:3]), "3", progress=False)
    sweep = head_sweep(model, prompts, "3", heads=[(0, 0)], labels=_labels()[:3], progress=False)
    with pytest.raises(MechcnaError, match="no label column"):
        sweep.summary({"template": 1})
    with pytest.raises(MechcnaError, match="no cases"):
        sweep.summary({"operation": "*"})
    with pytest.raises(MechcnaError, match="not part of this sweep"):
        sweep.table(heads=[(1, 1)])
    assert _no_hooks(model)


def test_no_hooks_left_when_a_pass_raises(model, monkeypatch):
    block = model.blocks[-1]
    original = block.forward

    def failing(resid, *args, **kwargs):
        if resid.shape[0] > 3:  # only the expanded, ablated passes
            raise RuntimeError("boom")
        return original(resid, *args, **kwargs)

    monkeypatch.setattr(block, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        head_sweep(model, _prompts()[:3], "3", heads_per_pass=2, progress=False)
    assert _no_hooks(model)


def test_cli_head_sweep(tmp_path, capsys):
    from mechcna import save_checkpoint
    from mechcna.cli import main

    ckpt = save_checkpoint(build("llama"), tmp_path / "tiny")
    args = ["head-sweep", "--model", str(ckpt), "--quiet", "--top", "3"]
    assert main([*args, "--prompt", "12+7=", "--out", str(tmp_path / "one")]) == 0
    assert "heads whose ablation lowers p(target) most" in capsys.readouterr().out
    assert (tmp_path / "one" / "index.html").stat().st_size > 1000
    (tmp_path / "cases.tsv").write_text("12+7=\t1\n3+5=\t8\nthe sum of 3 and 5 is\t8\n")
    out = tmp_path / "many"
    assert main([*args, "--prompts-file", str(tmp_path / "cases.tsv"), "--out", str(out)]) == 0
    assert "3 cases" in capsys.readouterr().out
    assert len(pd.read_csv(next(out.glob("table-*-all-heads.csv")))) == 8


def test_resid_mid_shortcut_equals_full_layer_rerun(monkeypatch):
    import mechcna.analyses.heads as heads_mod
    from tests.helpers import build as _build

    model = _build("llama", dtype=torch.float64)
    prompts, targets = ["12+7=", "3+5=", "the sum of 3 and 5 is"], ["1", "8", "8"]
    fast = heads_mod.head_sweep(model, prompts, targets, progress=False)
    monkeypatch.setattr(heads_mod, "_mid_shortcut", lambda model: False)
    full = heads_mod.head_sweep(model, prompts, targets, progress=False)
    torch.testing.assert_close(fast.logprob, full.logprob, atol=1e-10, rtol=0)
    assert torch.equal(fast.prediction, full.prediction)


def test_shared_prefixes_equal_reference(kind, monkeypatch):
    """Prompts sharing a few-shot prefix run it once per ablation; numbers are the deep copy's."""
    import mechcna.analyses.heads as heads_mod

    model = build(kind, dtype=torch.float64)
    shots = "3+5=8\n12+7=19\n"
    prompts = [shots + p for p in ("3+5=", "3+6=", "12+7=", "9-4=")] + ["3+5=8\n1+1=2\n4+4="]
    plans = []
    real_plan = heads_mod._prefix_plan

    def spy(tokens, positions):
        plan = real_plan(tokens, positions)
        plans.append(plan)
        return plan

    monkeypatch.setattr(heads_mod, "_prefix_plan", spy)
    heads = [(0, 1), (0, 3), (1, 2)]
    means = {hd: torch.randn(model.cfg.d_head, dtype=torch.float64) for hd in heads}
    for mode, make in [
        ("zero", _Weights),
        ("mean", lambda m, hd: intervene(m, HeadAblation([hd], "mean", means={hd: means[hd]}))),
    ]:
        reference = HeadAblation(heads, "mean", means=means) if mode == "mean" else None
        sweep = heads_mod.head_sweep(
            model, prompts, heads=heads, mode=mode, reference=reference, progress=False
        )
        ref_lp, ref_pred = _reference(model, prompts, sweep.targets.tolist(), heads, make)
        torch.testing.assert_close(sweep.logprob, ref_lp, atol=1e-10, rtol=0)
        assert torch.equal(sweep.prediction, ref_pred)
    # the plan shares the longest common prefix of the two groups and was used
    m, first, inverse = plans[0]
    n_shared = len(model.to_tokens(shots)[0])
    assert m >= n_shared and len(first) == 2
    assert sorted(torch.bincount(inverse).tolist()) == [1, 4]
    assert _no_hooks(model)


def test_prefix_plan_minimises_positions():
    from mechcna.analyses.head_passes import _prefix_plan

    # four rows share 6 tokens, then differ; the scored positions are the last ones
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, a, b] for a, b in [(7, 8), (7, 9), (8, 8), (9, 9)]])
    m, first, inverse = _prefix_plan(tokens, torch.full((4,), 7))  # type: ignore[misc]
    assert m == 6 and first.tolist() == [0] and inverse.tolist() == [0, 0, 0, 0]
    # the scored position bounds the prefix
    plan = _prefix_plan(tokens, torch.tensor([7, 7, 7, 5]))
    assert plan is not None and plan[0] == 5
    # nothing shared: no plan
    assert _prefix_plan(torch.arange(12).reshape(3, 4), torch.full((3,), 3)) is None
