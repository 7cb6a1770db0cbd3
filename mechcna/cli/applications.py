"""Subcommands for the arithmetic paper's applications (ARITH section 5 and 6.2; docs/methods.md 9):
LoRA on one attention layer at a time and its CNA (Figure 2, Tables 9-10), CNA-guided pruning
(Table 11) and gender-bias editing (Tables 12-13).

The training data are 2-digit ``+``/``-`` problems with negative answers, as in the paper
(train split for training, held-out split for accuracy). Each subcommand also writes
``results.json`` (every number of its tables) into ``--out``.
"""

import argparse
import json
from typing import TYPE_CHECKING, Any

from mechcna.cli.base import Context, UsageError, command, with_tokens

PAPER_FIGURE2 = "Llama-7B: original 62.96%; LoRA on layers 1-9 about 90%, falling from layer 10."
PAPER_TABLE11 = (
    "Llama-7B: origin 62.9, LoRA9 89.3, LoRA9 on CNA-pruned 82.3, on random-pruned 17.1."
)

PAPER_TABLE13 = "Llama-7B: total bias 1.26 -> 0.81 (-35.7%), woman 1.45 -> 1.04, man 1.08 -> 0.59."


# ---------------------------------------------------------------------------- shared options
if TYPE_CHECKING:
    from mechcna.report.page import Report


def _training_args(p: argparse.ArgumentParser, steps: int = 200) -> None:
    """The data and LoRA hyper-parameters shared by ``lora`` and ``prune``."""
    p.add_argument("--train-pairs", type=int, default=200, help="operand pairs per operation")
    p.add_argument("--test-pairs", type=int, default=40, help="held-out pairs per operation")
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/rank)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--targets", nargs="+", default=["q", "k", "v", "o"], help="adapted weights of q k v o"
    )
    p.add_argument("--seed", type=int, default=0, help="adapter initialisation and batch order")


def _lora_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": args.steps, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
        "batch_size": args.batch_size, "targets": tuple(args.targets), "seed": args.seed,
    }  # fmt: skip


def _datasets(args: argparse.Namespace, ctx: Context) -> tuple[Any, Any]:
    """The paper's 2-digit +/- data with negatives: train split and held-out split."""
    from mechcna.tasks.arithmetic import arithmetic_dataset

    if args.train_pairs < 1 or args.test_pairs < 1:
        raise UsageError("--train-pairs and --test-pairs must be positive")
    kw = {"tokenizer": ctx.model, "nonnegative_subtraction": False}
    train = arithmetic_dataset(["+", "-"], 2, n_pairs=args.train_pairs, split="train", seed=1, **kw)
    test = arithmetic_dataset(["+", "-"], 2, n_pairs=args.test_pairs, split="heldout", seed=2, **kw)
    return train, test


def _save_json(report: "Report", results: dict[str, Any]) -> None:
    report.attach("results.json", json.dumps(results, indent=1, default=str) + "\n")


def _layers(values: list[int] | None, n_layers: int) -> list[int]:
    return list(range(n_layers)) if not values else values


# ---------------------------------------------------------------------------- lora
def _lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", type=int, default=None, help="LoRA layers (all)")
    _training_args(p)
    p.add_argument(
        "--cna-cases", type=int, default=8, help="held-out cases of the CNA (0: no Tables 9-10)"
    )
    p.add_argument("--ks", nargs="+", type=int, default=[50, 30, 20, 10],
                   help="K of Table 10 (default 50 30 20 10)")  # fmt: skip
    p.add_argument(
        "--direction",
        choices=["lora_minus_original", "original_minus_lora"],
        default="lora_minus_original",
        help="CNA sign convention",
    )


@command(
    "lora",
    "LoRA on one attention layer at a time (Figure 2) and CNA of each LoRA (Tables 9-10)",
    "mechcna lora --layers 0 1 2 3 --train-pairs 200 --steps 200 --out runs/lora",
    _lora_args,
)
def lora(args: argparse.Namespace, ctx: Context) -> "Report":
    import torch

    from mechcna.applications.lora import lora_layer_sweep
    from mechcna.applications.lora_analysis import (
        coefficient_increase_table,
        coefficient_table,
        compare_lora,
    )

    model = ctx.model
    layers = _layers(args.layers, model.cfg.n_layers)
    train, test = _datasets(args, ctx)
    sweep = lora_layer_sweep(
        model, layers, train, test=test, keep_models=False, progress=ctx.progress, **_lora_kw(args)
    )
    report = ctx.report(
        "LoRA on one attention layer at a time", n_train=len(train), n_test=len(test)
    )
    report.section(
        "Figure 2: accuracy after LoRA on each layer",
        f"{len(train)} training / {len(test)} held-out cases (2-digit + and - with negatives); "
        f"original accuracy {100 * sweep.original_accuracy:.1f}%. Paper: {PAPER_FIGURE2}",
    )
    fig2 = sweep.to_frame()
    report.table(fig2, "held-out accuracy per LoRA layer", "ARITH Fig. 2", name="figure2")
    report.figure(sweep.plot(), "accuracy after LoRA on one attention layer", "ARITH Fig. 2")
    results: dict[str, Any] = {
        "original_accuracy": sweep.original_accuracy,
        "figure2": fig2.to_dict("records"),
        "settings": sweep.runs[0].settings,
    }
    if args.cna_cases > 0:
        cases = test.filter(step=0)
        pick = torch.randperm(len(cases), generator=torch.Generator().manual_seed(args.seed))
        chosen = [cases[int(i)] for i in pick[: args.cna_cases]]
        prompts, targets = [c.prompt for c in chosen], [c.target for c in chosen]
        comps = {}
        for run in sweep.runs:
            lora_model = run.apply_to(model)
            comps[run.layers[0]] = compare_lora(
                model, lora_model, prompts, targets, direction=args.direction
            )
            del lora_model
        best = max(sweep.runs, key=lambda r: r.accuracy_after).layers[0]
        t9 = coefficient_table(comps, prompt=0, k=3, rank_by=best)
        t10 = coefficient_increase_table(comps, ks=args.ks)
        report.section(
            "Tables 9-10: CNA between the original and each LoRA model",
            f"{len(prompts)} held-out first-answer-token cases; CNA sign {args.direction}.",
        )
        report.table(
            t9,
            f"coefficient m of the top-3 CNA neurons (of LoRA layer {best}) on {prompts[0]!r}",
            "ARITH Table 9", name="table9",
        )  # fmt: skip
        report.table(
            t10, "% increase of the top-K CNA neurons' |coefficient|, per LoRA layer",
            "ARITH Table 10", name="table10", index=True,
        )  # fmt: skip
        results |= {"table9": t9.to_dict("records"), "table10": t10.to_dict("index")}
    _save_json(report, results)
    return report


# ---------------------------------------------------------------------------- prune
def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-layer", type=int, default=0, help="attention layer of the LoRA")
    p.add_argument(
        "--prune-layers", nargs="+", type=int, default=None, help="pruned layers (deep half)"
    )
    p.add_argument("--k", type=int, default=4, help="top CNA neurons kept per case (paper 500)")
    p.add_argument("--cna-pairs", type=int, default=None, help="1-digit pairs per operation (all)")
    p.add_argument("--cna-templates", nargs="+", type=int, default=[1, 2, 3, 4])
    _training_args(p)


@command(
    "prune",
    "CNA-guided pruning of the deep FFN neurons, then a fresh LoRA (Table 11)",
    "mechcna prune --lora-layer 0 --prune-layers 2 3 --k 4 --out runs/prune",
    _prune_args,
)
def prune(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.applications.lora import lora_finetune
    from mechcna.applications.lora_analysis import compare_lora
    from mechcna.applications.pruning import pruning_experiment
    from mechcna.models.view import architecture
    from mechcna.tasks.arithmetic import arithmetic_dataset

    model = ctx.model
    arch = architecture(model)
    layers = args.prune_layers or list(range(arch.n_layers // 2, arch.n_layers))
    for layer in [*layers, args.lora_layer]:  # before any training
        arch.check_layer(layer)
    if args.k < 1:
        raise UsageError(f"--k must be positive, not {args.k}")
    train, test = _datasets(args, ctx)
    cases = arithmetic_dataset(
        ["+", "-", "*", "/"], 1, args.cna_templates, args.cna_pairs, tokenizer=model, seed=3
    )
    kw = _lora_kw(args)
    run = lora_finetune(model, args.lora_layer, train, test=test, progress=ctx.progress, **kw)
    assert run.model is not None
    comp = compare_lora(model, run.model, cases.prompts, cases.targets)
    res = pruning_experiment(
        model, comp.comparison, layers, args.lora_layer, train, test,
        lora_accuracy=run.accuracy_after, k=args.k, progress=ctx.progress, **kw,
    )  # fmt: skip
    report = ctx.report("CNA-guided pruning", n_train=len(train), n_test=len(test))
    report.section(
        "Table 11: LoRA on a CNA-pruned and a randomly pruned model",
        f"CNA between the original and the layer-{args.lora_layer} LoRA model on {len(cases)} "
        f"1-digit + - * / cases; the union of each case's top-{args.k} neurons is kept, the "
        f"other {res.n_pruned} of {res.n_total} FFN neurons of layers {list(res.layers)} "
        f"({100 * res.pruned_share:.1f}%) are zeroed. Paper: {PAPER_TABLE11}",
    )
    report.table(res.to_frame(), "held-out accuracy per model", "ARITH Table 11", name="table11")
    report.figure(res.plot(), "accuracy: CNA-guided vs random pruning", "ARITH Table 11")
    _save_json(report, {
        "accuracy": res.accuracy, "n_pruned": res.n_pruned, "n_total": res.n_total,
        "pruned_share": res.pruned_share, "layers": list(res.layers), "cna_cases": len(cases),
        "wall_s": res.wall_s, "settings": res.settings,
        "correct": {k: [int(c) for c in v] for k, v in res.correct.items()},
    })  # fmt: skip
    return report


# ---------------------------------------------------------------------------- bias
def _bias_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template", action="append", default=[], help="prompt with {g} for the gender "
        "(repeatable; default the paper's eight, those the tokenizer cannot read dropped)",
    )  # fmt: skip
    p.add_argument("--profession", action="append", default=[], help="candidate (default: found)")
    p.add_argument("--threshold", type=float, default=0.5, help="|gap| (nats) of a biased one")
    p.add_argument("--k", type=int, default=18, help="neurons zeroed (paper 18)")
    p.add_argument("--aggregate", choices=["sum", "count"], default="sum")
    p.add_argument("--cna-templates", type=int, default=1, help="templates the CNA uses")
    p.add_argument("--random", type=int, default=3, help="random sets of the same size")
    p.add_argument("--cost-pairs", type=int, default=20, help="arithmetic pairs for the cost")
    p.add_argument("--seed", type=int, default=0)


@command(
    "bias",
    "gender-bias neurons by CNA between 'woman' and 'man' prompts, and bias after zeroing them "
    "(Tables 12-13)",
    "mechcna bias --k 18 --random 3 --out runs/bias",
    _bias_args,
)
def bias(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.applications.bias import (
        PAPER_TEMPLATES,
        gender_bias_experiment,
        refuse_unknown_professions,
    )
    from mechcna.tasks.arithmetic import arithmetic_dataset, arithmetic_problems

    if any("{g}" not in t for t in args.template):
        raise UsageError("every --template needs a {g} where the gender goes")
    model = ctx.model
    refuse_unknown_professions(model, args.profession)  # before any computation
    templates = args.template or list(PAPER_TEMPLATES)
    cost = arithmetic_dataset(
        ["+", "-"], 2, n_pairs=args.cost_pairs, tokenizer=model, split="heldout", seed=2
    )
    probs = arithmetic_problems(["+", "-"], 2, n_pairs=args.cost_pairs, split="heldout", seed=5)
    text = [p.text + p.separator + p.answer for p in probs]
    res = gender_bias_experiment(
        model, templates=templates, professions=args.profession or None,
        threshold=args.threshold, k=args.k, aggregate=args.aggregate,
        cna_templates=args.cna_templates, n_random=args.random, seed=args.seed,
        cost_data=cost, cost_text=text,
    )  # fmt: skip
    s = res.settings
    report = ctx.report("Gender-bias editing with CNA", n_templates=len(s["templates"]))
    report.section(
        "Table 12: the CNA neurons",
        f"{len(s['templates'])} templates, {len(s['candidates'])} candidate professions; "
        f"woman-biased {s['woman_biased']}, man-biased {s['man_biased']} (|gap| > "
        f"{args.threshold} nats). CNA per biased profession on the first {args.cna_templates} "
        f"template(s), aggregated by {args.aggregate} into the top {args.k}.",
    )
    neurons = res.neurons.to_frame().assign(neuron=[n for _, n in res.neurons.neurons])
    report.table(
        with_tokens(model, neurons),
        "the zeroed neurons (neuron = index in its layer; tokens: what each value vector "
        "promotes, as the neurons are pooled over prompts)",
        "ARITH Table 12", name="table12",
    )  # fmt: skip
    report.section(
        "Table 13: bias before and after zeroing",
        f"Bias {res.reduction('abs_total'):+.1f}% (mean |gap|), "
        f"{res.reduction('signed_total'):+.1f}% (signed, the paper's). Paper: {PAPER_TABLE13}",
    )
    report.table(
        res.metrics.rename_axis("model"), "bias, arithmetic accuracy and text log-prob per model",
        "ARITH Table 13", name="table13", index=True,
    )  # fmt: skip
    gaps = res.gaps.pivot(index="profession", columns="model", values="gap")
    report.table(gaps, "per-profession gap (nats)", "ARITH Table 23", name="gaps", index=True)
    report.figure(res.plot(), "log p(prof | woman) - log p(prof | man) before and after")
    _save_json(report, {
        "table13": res.metrics.to_dict("index"), "table12": res.neurons.to_frame().to_dict(
            "records"), "reduction_abs_pct": res.reduction("abs_total"),
        "reduction_signed_pct": res.reduction("signed_total"),
        "settings": {k: v for k, v in s.items()},
    })  # fmt: skip
    return report
