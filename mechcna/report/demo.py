"""The main demo: the papers' arithmetic pipeline on the model that ships with the package.

Offline, on ``mechcna/arith-small`` (trained by ``mechcna train-arithmetic``):

1. the residual self-check and held-out accuracy per cell;
2. the arithmetic-head sweep: which heads' zero-ablation hurts addition most;
3. log-probability-increase attribution on one prompt (layers, top FFN neurons);
4. Comparative Neuron Analysis against the top addition head over addition cases: the top
   CNA neurons with their tokens, and the mask / keep / random table (the paper's Table 5);
5. the gender-bias comparison of one input pair (``compare_inputs``).

Everything goes into one page, ``<out_dir>/index.html`` (see :mod:`mechcna.report.page`), with a
CSV per table and ``report.txt`` (the text :func:`run` returns and the CLI prints).
"""

import math
import shlex
from pathlib import Path

import pandas as pd
import torch

from mechcna.analyses.attribution import layer_importance, neuron_importance
from mechcna.analyses.case_ablation import mask_keep_table
from mechcna.analyses.comparative import cna_table, compare_inputs, compare_neurons
from mechcna.analyses.evaluation import evaluate_accuracy
from mechcna.analyses.heads import head_sweep
from mechcna.analyses.plotting import experiment_bars
from mechcna.analyses.tokens import frame_tokens, result_tokens
from mechcna.errors import MechcnaError
from mechcna.interventions.edits import HeadAblation
from mechcna.models.backend import Model, is_model
from mechcna.models.check import check_model
from mechcna.models.loading import SHIPPED_MODELS, load_model
from mechcna.models.provenance import get_provenance
from mechcna.report.page import Provenance, Report, check_out_dir
from mechcna.tasks.arithmetic import ArithmeticDataset, arithmetic_dataset

DEFAULT_MODEL = next(iter(SHIPPED_MODELS))


def run(
    model_name: str | None = None,
    progress: bool = True,
    out_dir: str | Path = "runs/demo",
    n_pairs: int = 40,
    overwrite: bool = False,
) -> str:
    """Run the demo, write its page into ``out_dir`` (which must be empty unless
    ``overwrite``, see :meth:`~mechcna.report.page.Report.write`) and return its text."""
    out = check_out_dir(out_dir, overwrite)
    with torch.no_grad():
        report = build(model_name, progress=progress, n_pairs=n_pairs)
    page = report.write(out, overwrite=overwrite)
    return report.to_text() + f"\nreport: {page}\n"


def build(
    model: Model | str | None = None,
    progress: bool = True,
    n_pairs: int = 40,
    command: str | None = None,
) -> Report:
    """The demo's :class:`~mechcna.report.page.Report` (nothing written) on a model or its name.

    ``command`` is recorded in the provenance as typed (the CLI passes its command line);
    by default, the ``mechcna demo`` line that reruns it with the name the model was loaded by.
    """
    if not is_model(model):
        model = load_model(model or DEFAULT_MODEL, device="cpu")
    name = str(model.cfg.model_name)
    cfg = model.cfg
    if command is None:
        source = get_provenance(model)
        command = (
            shlex.join(["mechcna", "demo", "--model", source.source, "--pairs", str(n_pairs)])
            if source.format != "user-built"
            else f"mechcna.report.demo.build(<user-built model {name!r}>, n_pairs={n_pairs})"
        )
    report = Report(
        f"mechcna demo: the arithmetic pipeline on {name}",
        Provenance.from_model(model, n_pairs=n_pairs, command=command),
        intro=(
            "The methods of Yu & Ananiadou (EMNLP 2024) on one model, offline: held-out "
            "accuracy, the arithmetic-head sweep, log-probability-increase attribution and "
            "Comparative Neuron Analysis (CNA). Paper references: ARITH = 'Interpreting "
            "Arithmetic Mechanism in LLMs through Comparative Neuron Analysis'; ATTR = "
            "'Neuron-Level Knowledge Attribution in LLMs'."
        ),
    )
    report.section("Model")
    check = check_model(model)
    report.text(
        f"{cfg.model_name}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"{cfg.d_mlp} FFN neurons per layer, vocabulary {cfg.d_vocab}. Residual self-check "
        f"passed (max relative error {check.max_error:.1e}): embedding, attention and FFN "
        "outputs sum to the residual stream, heads to attention outputs, neurons to FFN outputs."
    )

    data = arithmetic_dataset(
        ["+", "-"], [1, 2], n_pairs=n_pairs, tokenizer=model.tokenizer, split="heldout", seed=0
    )
    acc = evaluate_accuracy(model, data, progress=progress)
    report.section(
        "Held-out accuracy",
        f"{len(data)} teacher-forced next-token cases from operand pairs never trained on.",
    )
    report.table(
        acc.to_frame(("operation", "digits")),
        "greedy next-token accuracy and mean target log-probability per cell",
        paper_ref="ARITH Table 1, column 'ori'",
        name="accuracy",
    )
    report.figure(
        acc.plot(),
        "accuracy per (operation, digits, template) cell",
        paper_ref="ARITH section 3, Table 1 column 'ori' per cell (docs/methods.md 6.2)",
    )

    sweep = head_sweep(model, data, progress=progress)
    report.section(
        "Arithmetic heads",
        "Every attention head is zero-ablated in turn over all cases; heads whose removal "
        "lowers accuracy most are the candidates for 'arithmetic heads'.",
    )
    report.table(
        sweep.table(by="operation", k=3).round(1),
        "unablated accuracy (ori, %) and the three heads per operation whose ablation lowers "
        "accuracy most, with the accuracy (%) left",
        paper_ref="ARITH Tables 1-2",
        name="heads",
        index=True,
    )
    add = sweep.top(5, cell={"operation": "+"})
    layer, head = int(add.iloc[0]["layer"]), int(add.iloc[0]["head_index"])
    report.table(add, "top heads on addition", paper_ref="ARITH Table 1", name="top-heads-add")
    report.figure(
        sweep.plot(operation="+"),
        "change of addition accuracy when each head is zero-ablated (layer x head)",
        paper_ref="ARITH Tables 1-2 as a heatmap",
    )

    prompt = "3+5="
    layers = layer_importance(model, [prompt])
    target = layers.targets[0]
    p = math.exp(float(layers.final_logprob[0]))  # type: ignore[index]
    report.section(
        f"Attribution on {prompt!r}",
        f"Target {target!r} (the model's own top-1), p = {p:.3f}. Each component's "
        "log-probability increase: how much adding its output to the residual stream raises "
        "log p(target); the attention and FFN scores of all layers telescope to the final "
        "log-probability.",
    )
    scores = layers.scores[0].double()
    report.table(
        pd.DataFrame(
            {
                "layer": range(cfg.n_layers),
                "attention": scores[:, 0].tolist(),
                "FFN": scores[:, 1].tolist(),
            }
        ),
        "log-probability increase of each layer's attention and FFN output",
        paper_ref="ARITH notebook layer bars (docs/methods.md 4.1)",
        name="layers",
    )
    report.figure(
        layers.plot(0),
        "log-probability increase of each attention and FFN layer",
        paper_ref="ARITH notebook layer bars (docs/methods.md 4.1)",
    )
    ffn = neuron_importance(model, [prompt])
    report.table(
        frame_tokens(model, ffn.top(5, prompt=0)),
        f"top FFN neurons of {prompt!r} by log-probability increase, with the tokens each "
        "promotes here (sign-aware: a negative coefficient promotes its value vector's bottom "
        "tokens)",
        paper_ref="ATTR notebooks, top FFN value neurons (docs/methods.md 4.4)",
        name="top-ffn-neurons",
    )

    cases = data.filter(operation="+", digits=1)
    correct = evaluate_accuracy(model, cases, progress=False).correct
    kept = tuple(c for c, ok in zip(cases, correct.tolist(), strict=True) if ok)
    cases = ArithmeticDataset(kept, cases.policies)
    cna = compare_neurons(model, cases.prompts, HeadAblation([(layer, head)]), cases.targets)
    report.section(
        f"CNA against ablating head {layer}.{head}",
        f"On {len(cases)} correctly answered 1-digit addition cases, each FFN neuron's "
        f"importance in the model (M) minus in the model without head {layer}.{head} (M'). "
        f"Example case: {cases.prompts[0]!r} -> {cases.targets[0]!r}.",
    )
    report.table(
        cna_table(model, cna, prompt=0, k=8),
        f"top CNA neurons of {cases.prompts[0]!r} with importance and coefficients in M and "
        "M' and the tokens each neuron's value vector promotes",
        paper_ref="ARITH Table 4",
        name="cna-neurons",
    )
    report.table(
        cna.counts(10).head(8),
        "neurons most often in a case's top-10 CNA neurons",
        paper_ref="ARITH Table 4 over all cases (docs/methods.md 7.1)",
        name="cna-counts",
    )
    top15 = cna.top(15)["label"].tolist()
    report.figure(
        cna.plot(k=15, tokens=result_tokens(model, cna, top15)),
        "importance in M and M' of the 15 neurons whose importance fell most (mean over cases)",
        paper_ref="ARITH Table 4",
    )
    ks = [k for k in (50, 20, 10, 5) if k <= int(cfg.d_mlp or 0)]
    table = mask_keep_table(
        model, cases.prompts, cna, ks=ks, deep_layers=range(layer, cfg.n_layers),
        progress=progress,
    )  # fmt: skip
    report.table(
        table.round(1),
        "accuracy decrease (%) when each case's top-K CNA neurons are zeroed (mask), when all "
        "other deep neurons are zeroed (keep), or K random deep neurons (random); and the "
        "decrease (%) of the top-K neurons' coefficients from M to M' (coef)",
        paper_ref="ARITH Table 5",
        name="mask-keep",
        index=True,
    )
    report.figure(
        experiment_bars(table, "mask / keep / random (ARITH Table 5)"),
        "accuracy decrease (left) and coefficient decrease (right) per number of neurons K",
        paper_ref="ARITH Table 5",
    )

    _gender(model, report)
    return report


def _gender(model: Model, report: Report) -> None:
    """Single-input-pair CNA on the injected gender skew (ARITH section 6.2)."""
    woman, man, target = "A woman works as a", "A man works as a", "nurse"
    try:
        pair = compare_inputs(model, [woman], [man], [target])
    except MechcnaError as err:  # e.g. a model whose vocabulary lacks these words
        report.section("Gender bias: comparing two inputs", f"Skipped: {err}")
        return
    report.section(
        "Gender bias: comparing two inputs",
        f"The shipped model was trained with 'nurse' following 'woman' 4x as often as 'man'. "
        f"CNA between the inputs {woman!r} and {man!r} for the target {target!r} finds the "
        "neurons whose importance differs most between the two.",
    )
    report.table(
        frame_tokens(model, pair.top(8, prompt=0)),
        "neurons most important for 'nurse' after 'woman' vs 'man'",
        paper_ref="ARITH Table 12", name="gender",
    )  # fmt: skip
    tokens = result_tokens(model, pair, pair.top(15, prompt=0)["label"].tolist(), 0)
    report.figure(
        pair.plot(prompt=0, k=15, tokens=tokens, names=("'woman'", "'man'")),
        "importance after 'woman' and after 'man', and their difference",
        paper_ref="ARITH Table 12 (docs/methods.md 9.3)",
    )
