"""The arithmetic paper's other cells and its appendix B as reproduction stages.

1. :func:`cells_stage`: Table 1's prompt templates 1-3 (the head stage runs the settings'
   templates, template 4 by default) and the 3-digit cells of Tables 24-27, each case run with
   the top heads of every operation (ranked on the head stage's selection half) ablated (not
   a full sweep: a full 3-digit sweep is the ``paper`` preset's, whose ``digits`` include 3);
   claims: the top + / - head still cuts accuracy on the other templates and on 3 digits.
2. :func:`division_stage`: appendix B, the division head (the paper's 14_19): chosen on the
   head stage's selection-half sweep of the ``/`` cases and scored on its evaluation-half
   sweep, then CNA against it on the model's correct 1-digit divisions, Table 15 (mask / keep
   / coef), Table 16 (lowest-neuron ablation) and, with ``division_zero_shot``, Table 17 (the
   zero-shot search below the division head), with the same claims as Tables 5, 6 and 8.
"""

from dataclasses import replace

import numpy as np
import torch

from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.analyses.head_results import HeadSweep
from mechcna.analyses.heads import head_sweep
from mechcna.errors import MechcnaError, UnknownTokenError
from mechcna.interventions.prompts import prepare_prompts
from mechcna.models.backend import Model
from mechcna.reproduce import arithmetic as arith
from mechcna.reproduce import claim_tests as ct
from mechcna.reproduce import paper, shallow_stage
from mechcna.reproduce.core import Claim, ReproduceSettings, StageBuilder, StageResult, stage
from mechcna.tasks.arithmetic import ArithmeticDataset, arithmetic_dataset

PAPER = arith.PAPER


# --------------------------------------------------------------------------- cells
def extra_cells(model: Model, settings: ReproduceSettings, form: str) -> ArithmeticDataset:
    """The held-out cases of the templates in ``cell_templates`` not already run (the
    settings' digits) and of the digit counts in ``cell_digits`` not already run (the
    settings' templates), ``cell_pairs`` pairs per cell, in prompt form ``form``. A template
    whose words the tokenizer does not know (a word-level vocabulary) is left out."""
    s = settings
    parts = []
    templates = tuple(t for t in s.cell_templates if t not in s.templates)
    digits = tuple(d for d in s.cell_digits if d not in s.digits)
    for temps, digs in ((templates, s.digits), (s.templates, digits)):
        for temp in temps if digs else ():
            part = arithmetic_dataset(
                s.operations, digs, temp, s.cell_pairs, tokenizer=model, seed=s.seed,
                split="heldout",
            )  # fmt: skip
            try:
                prepare_prompts(model, list(part.prompts))
            except UnknownTokenError:
                continue
            parts.append(part)
    if not parts:
        return ArithmeticDataset((), {})
    cases = ArithmeticDataset(tuple(c for p in parts for c in p), parts[0].policies)
    return arith.apply_prompt_form(cases, form, s.shots, s.seed)


def cell_heads(sweep: HeadSweep, head: tuple[int, int], k: int) -> list[tuple[int, int]]:
    """The chosen + / - head, then the top-``k`` heads of each operation of the sweep."""
    heads = [head]
    for op in sweep.labels["operation"].unique():
        top = sweep.top(k, cell={"operation": op})
        for h in zip(top["layer"].tolist(), top["head_index"].tolist(), strict=True):
            heads += [h] if h not in heads else []
    return heads


def _masks(cs: HeadSweep, settings: ReproduceSettings) -> dict[str, np.ndarray]:
    lab = cs.labels
    ops = lab["operation"].isin(["+", "-"]).to_numpy()
    return {
        "templates": ops & ~lab["template"].isin(settings.templates).to_numpy(),
        "digits": ops & ~lab["digits"].isin(settings.digits).to_numpy(),
    }


def cells_stage(
    model: Model,
    data: ArithmeticDataset,
    sweep: HeadSweep,
    head: tuple[int, int],
    settings: ReproduceSettings,
) -> StageResult:
    """Templates 1-3 (Table 1) and 3-digit cells (Tables 24-27) with the sweep's top heads
    ablated (``data["cells"]`` the :class:`HeadSweep` over those cases)."""
    title = "Arithmetic templates 1-3 and 3-digit cells (Tables 1, 24-27)"
    with stage("cells", title, PAPER) as st:
        form = data.policies.get("prompt_form", "zero-shot")
        cases = extra_cells(model, settings, form)
        if not len(cases):
            st.notes.append("Skipped: no extra template or digit count to run.")
            return st.result()
        heads = cell_heads(sweep, head, settings.cell_heads)
        cs = head_sweep(model, cases, heads=heads, progress=False)
        by = ["digits", "operation", "template"]  # cell labels such as "2D+1"
        t1 = cs.table(by=by, heads=heads[: 1 + settings.cell_heads])
        t1[f"{paper.LLAMA} 2D, 4 templates pooled: ori -> 17_22 (Table 1)"] = [
            "{} -> {}".format(*paper.TABLE1_17_22[c[2]]) if c[:2] == "2D" else "" for c in t1.index
        ]
        st.tables["templates"] = t1
        t24 = cs.table(by=by, k=5)
        t24[f"{paper.LLAMA} ori (template 4)"] = [
            paper.HEAD_CELLS.get(c[:-1], (np.nan,))[0] if c.endswith("4") else np.nan
            for c in t24.index  # cell labels such as "3D+4" (digits, operation, template)
        ]
        st.tables["cells_top_heads"] = t24
        st.data["cells"] = cs
        label = f"{head[0]}_{head[1]}"
        masks = _masks(cs, settings)
        paper_fig = {
            "templates": "17_22 on all four templates (2D): + 96.8 -> 42.9, - 94.4 -> 72.3 "
            "(Table 1)",
            "digits": "17_22 on 3D (template 4): + -52.5%, - -56.9% relative (Table 2)",
        }
        what = {"templates": "templates " + ", ".join(str(t) for t in settings.cell_templates
                                                      if t not in settings.templates),
                "digits": "digits " + ", ".join(str(d) for d in settings.cell_digits
                                                if d not in settings.digits)}  # fmt: skip
        for key, mask in masks.items():
            claim = (
                f"The top + / - head matters beyond template 4 and 2 digits too (test: ablating "
                f"{label}, chosen on the sweep's cases of template "
                f"{', '.join(map(str, settings.templates))}, cuts "
                f"accuracy on + and - of {what[key]} by at least 20% relative)"
            )
            if not mask.any():
                st.claim(claim, paper_fig[key], f"no {what[key]} case in this run", None)
                continue
            test = ct.head_effect_test(cs, head, mask, 20.0, settings.seed)
            right = int(cs.base_correct[torch.from_numpy(mask)].sum())
            ours = (
                f"{test.estimate:.1f}% relative on {test.n} cases ({right} right before)"
                if right
                else f"not measured: the model gets none of {test.n} cases right"
            )
            st.claim(claim, paper_fig[key], ours, test if right else None)
        st.notes.append(
            f"{len(cases)} held-out cases ({settings.cell_pairs} pairs per cell, {form}), each "
            f"run unablated and with each of {len(heads)} heads ablated: {label} and the top-"
            f"{settings.cell_heads} heads of each operation in the head stage's selection-half "
            "sweep of every head (the paper's "
            "Tables 24-27 rank every head per cell; the paper preset sweeps 3 digits in full)."
            " The paper's Table 1 pools its four templates; ours shows each template."
        )
    return st.result()


# --------------------------------------------------------------------------- division
def division_cases(
    model: Model, data: ArithmeticDataset, settings: ReproduceSettings
) -> ArithmeticDataset:
    """The model's correct 1-digit (smallest digit count) divisions, every pair, in the run's
    prompt form, at most ``division_cases``."""
    s = settings
    every = arithmetic_dataset("/", min(s.digits), s.templates, None, tokenizer=model,
                               seed=s.seed, split="all")  # fmt: skip
    form = data.policies.get("prompt_form", "zero-shot")
    cases = arith.apply_prompt_form(every, form, s.shots, s.seed)
    ok = evaluate_accuracy(model, cases, progress=False).correct.tolist()
    kept = ArithmeticDataset(tuple(c for c, k in zip(cases, ok, strict=True) if k), cases.policies)
    return arith._subsample(kept, s.division_cases, s.seed)


#: Our claim text's start -> the appendix-B figure put beside it.
_DIV_FIGURES = {
    "Masking": "mask top100 84.6% to top10 51.3% (Table 15)",
    "Keeping": "keep top100 48.7% decrease, top10 64.2% (Table 15)",
    "The top CNA": "coef decrease 50% (top100) to 73% (top10) (Table 15)",
    "Smaller sets": "50% (top100) rising to 73% (top10) (Table 15)",
    "Zeroing the lowest": "Table 16: 1.3% (top100), 0.9, 3.2, 4.9, 7.0% (top10)",
    "Zeroing the hidden": "M=1: 10,426 neurons -82.1%, M=2: 1,953 -30.8% vs random 10,426 "
    "-5.1% (Table 17)",
}


def _relabel(claims: list[Claim], head: str) -> list[Claim]:
    out = []
    for c in claims:
        fig = next((v for k, v in _DIV_FIGURES.items() if c.claim.startswith(k)), c.paper_figure)
        out.append(replace(c, claim=f"Division head {head} (appendix B): {c.claim}",
                           paper_figure=fig))  # fmt: skip
    return out


def division_stage(
    model: Model,
    data: ArithmeticDataset,
    sweep: HeadSweep,
    held: HeadSweep,
    settings: ReproduceSettings,
) -> StageResult:
    """Appendix B: the division head and Tables 15-17 (``data["head"]``, ``data["cases"]``).

    ``sweep`` is the head stage's selection-half sweep of every head (the division head is
    chosen there, :func:`claim_tests.chosen_heads`), ``held`` its evaluation-half sweep of the
    chosen heads (the head's claim is scored there)."""
    with stage("division", "Division head (appendix B, Tables 15-17)", PAPER) as st:
        chosen = ct.chosen_heads(sweep, settings.operations, int(model.cfg.n_layers))
        if "division" not in chosen or "/" not in set(held.labels["operation"]):
            st.notes.append("Skipped: no division case in the sweep.")
            st.claim("Division has its own head (appendix B)", "14_19: -54.9% on 1D / (Table 2)",
                     "no division case in this run", None)  # fmt: skip
            return st.result()
        head, plus = chosen["division"], chosen["+/-"]
        if head not in held.heads:
            raise MechcnaError(f"head {head} was not ablated on the evaluation half")
        label = f"{head[0]}_{head[1]}"
        div = ct._op_mask(held, ["/"])
        test = ct.head_effect_test(held, head, div, 20.0, settings.seed)
        right = int(held.base_correct[torch.from_numpy(div)].sum())
        n_sel = int(ct._op_mask(sweep, ["/"]).sum())
        st.claim(
            "Division has a head that carries it (the paper's 14_19, not the + / - head "
            "17_22): ablating the top division head cuts accuracy on / a lot (test: relative "
            "decrease of at least 20%, the head chosen on the selection half of the / cases and "
            "scored on the evaluation half)",
            "14_19 (not 17_22): -54.9% (1D /), -71.8% (2D /) relative (Table 2)",
            f"{label} (best of {len(sweep.heads)} on {n_sel} selection / cases; the + / - head "
            f"is {plus[0]}_{plus[1]}): {test.estimate:.1f}% relative on {test.n} held-out / "
            f"cases ({right} right before)",
            test if right else None,
        )
        st.data["head"] = head
        cases = division_cases(model, data, settings)
        st.data["cases"] = cases
        st.notes.append(
            f"Division head {label} (top + / - head {plus[0]}_{plus[1]}); CNA on "
            f"{len(cases)} correct 1-digit divisions (every pair, the run's prompt form)."
        )
        if len(cases):
            _division_tables(st, model, cases, head, label, settings)
    return st.result()


def _division_tables(
    st: StageBuilder,
    model: Model,
    cases: ArithmeticDataset,
    head: tuple[int, int],
    label: str,
    settings: ReproduceSettings,
) -> None:
    layer = head[0]
    cna, deep, ks, t15, lowest = arith.cna_experiments(model, cases, head, settings)
    st.tables["table15"] = arith._long(t15, paper.DIV_MASK_KEEP)
    t16 = arith.lowest_table(lowest)
    st.tables["table16"] = arith._long(t16, {"lowest_neuron_ablation": paper.DIV_LOWEST_NEURON})
    st.figures["division_cna"] = cna.plot(k=15)
    st.data["cna"] = cna
    sub = StageBuilder(st.name, st.title, st.paper)
    arith._cna_claims(sub, model, cases, cna, deep, ks, lowest, settings)
    if settings.division_zero_shot and layer > 0:
        t17, search, per_case = shallow_stage.zero_shot_table(model, cases, layer, settings)
        t17[t17.columns[-1]] = [
            f"{paper.DIV_ZERO_SHOT[m][0]} / {paper.DIV_ZERO_SHOT[m][1]}"
            if model.cfg.d_vocab >= 1000 and m in paper.DIV_ZERO_SHOT else ""
            for m in t17["M (count >= M)"]
        ]  # fmt: skip
        st.tables["table17"] = t17
        pool = len(search.neuron_layers) * int(model.cfg.d_mlp or 0)
        shallow_stage._zero_shot_claim(sub, t17, per_case, pool, settings)
    elif layer == 0:
        st.notes.append("Table 17 skipped: no layer below the division head.")
    else:
        st.notes.append("Table 17 (the zero-shot search below the division head) runs with "
                        "division_zero_shot (the paper preset).")  # fmt: skip
    st.claims.extend(_relabel(sub.claims, label))
