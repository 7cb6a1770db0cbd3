"""Subcommands over arithmetic datasets: accuracy, the head sweep and the zero-shot search for
hidden-interpretable shallow neurons with its masking test."""

import argparse
import math
from typing import TYPE_CHECKING

from mechcna.cli.base import (
    Context,
    UsageError,
    add_dataset,
    add_interventions,
    add_prompts,
    add_ray,
    command,
    dataset_from,
    interventions_from,
    prompts_from,
    ray_options,
)

if TYPE_CHECKING:
    from mechcna.report.page import Report


def _accuracy_args(p: argparse.ArgumentParser) -> None:
    add_dataset(p, pairs=40)
    add_interventions(p)


@command(
    "accuracy",
    "greedy next-token accuracy on arithmetic cases, optionally under ablations",
    "mechcna accuracy --operations + - --digits 1 2 --ablate-head 0.0 --out runs/accuracy",
    _accuracy_args,
)
def accuracy(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.evaluation import evaluate_accuracy

    edits = interventions_from(args)
    data = dataset_from(args, ctx)
    base = evaluate_accuracy(ctx.model, data, progress=ctx.progress)
    report = ctx.report("Arithmetic accuracy", n_cases=len(data), split=args.split)
    report.text(f"{len(data)} teacher-forced cases; overall accuracy {100 * base.accuracy:.1f}%.")
    cells = ("operation", "digits")
    report.table(base.to_frame(cells), "accuracy per cell", "ARITH Table 1, column 'ori'")
    report.figure(base.plot(), "accuracy per (operation, digits, template) cell")
    if edits:
        cut = evaluate_accuracy(ctx.model, data, edits, progress=ctx.progress)
        what = ", ".join(str(e) for e in edits)
        report.section(f"Under {what}", f"Overall accuracy {100 * cut.accuracy:.1f}%.")
        frame = base.to_frame(cells).merge(
            cut.to_frame(cells), on=[*cells, "n"], suffixes=("", "_int")
        )
        frame["relative_decrease %"] = (
            100 * (frame["accuracy"] - frame["accuracy_int"]) / frame["accuracy"]
        )
        report.table(frame, "accuracy before and after the intervention", "ARITH Table 2")
        report.figure(cut.plot(), "accuracy per cell under the intervention")
    return report


def _head_sweep_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    add_dataset(p)
    p.add_argument("--mode", choices=["zero", "mean"], default="zero")
    p.add_argument("--top", type=int, default=10, help="heads to list")
    add_ray(p)


#: ``add_dataset``'s defaults for head-sweep: any other value means the user chose cases.
_DATASET_DEFAULTS = {"operations": ["+", "-"], "digits": [1, 2], "pairs": 20, "split": "heldout"}


@command(
    "head-sweep",
    "ablate every attention head over arithmetic cases, one prompt or a prompt file",
    "mechcna head-sweep --operations + --digits 1 --out runs/heads   "
    "(or: mechcna head-sweep --prompt '3+5=')",
    _head_sweep_args,
)
def head_sweep_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses import heads

    if args.prompt or args.prompts_file:
        given = [f"--{a}" for a in ("operations", "digits", "pairs", "split")
                 if getattr(args, a) != _DATASET_DEFAULTS[a]]  # fmt: skip
        if given:
            raise UsageError(
                f"{', '.join(given)} choose arithmetic cases; they do not apply to --prompt or "
                "--prompts-file (give one or the other)"
            )
    model = ctx.model
    ray = ray_options(args)

    def sweep_fn(model, *a, **kw):
        if ray is None:
            return heads.head_sweep(model, *a, **kw)
        from mechcna import distributed  # the workers load args.model themselves

        return distributed.head_sweep(args.model, *a, **{**kw, **ray})

    if args.prompt and len(args.prompt) == 1 and args.prompts_file is None:
        target = args.target[0] if args.target else None
        reference = args.prompt if args.mode == "mean" else None
        effects = heads.single_prompt_head_effects(
            model, args.prompt[0], target, mode=args.mode, reference=reference,
            progress=ctx.progress,
        )  # fmt: skip
        report = ctx.report(f"Head ablations on {args.prompt[0]!r}")
        report.text(
            f"target {effects.target_str!r}: p = {math.exp(effects.base_logprob):.4f} unablated"
        )
        report.table(effects.top(args.top), "heads whose ablation lowers p(target) most")
        report.table(effects.to_frame(), "every head", name="all-heads")
        report.figure(effects.plot(), "change of log p(target) when each head is ablated")
        return report
    if args.prompt or args.prompts_file:
        prompts, targets = prompts_from(args)
        if targets is None:
            raise UsageError("a head sweep over several prompts needs their targets")
        sweep = sweep_fn(model, prompts, targets, mode=args.mode, progress=ctx.progress)
        by = None
    else:
        data = dataset_from(args, ctx)
        sweep = sweep_fn(model, data, mode=args.mode, progress=ctx.progress)
        by = "operation"
    accuracy = float(sweep.base_correct.double().mean())
    report = ctx.report("Arithmetic heads: every head ablated", n_cases=sweep.n_cases)
    report.text(f"{sweep.n_cases} cases, unablated accuracy {100 * accuracy:.1f}%.")
    report.table(
        sweep.table(by=by, k=3).round(1), "the heads whose ablation lowers accuracy most, with the "
        "accuracy (%) left", paper_ref="ARITH Tables 1-2, 24-27", index=True,
    )  # fmt: skip
    report.table(sweep.top(args.top), "top heads over all cases", name="top-heads")
    report.table(sweep.to_frame(), "every head over all cases", name="all-heads")
    report.figure(sweep.plot(), "change of accuracy when each head is ablated")
    return report


def _zero_shot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--thresholds",
        nargs="+",
        type=int,
        default=None,
        help="values of M (default: the smallest M whose set is at most 5%% of the searched "
        "neurons and the next two; the paper's 0-3 select every neuron of a small model)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="top tokens inspected (default: the paper's 50, or 10 for a vocabulary under 1,000)",
    )
    p.add_argument(
        "--concepts",
        choices=["all", "pruned"],
        default="all",
        help="concept list: all (digits, number words, operators) or pruned (without common "
        "English words such as one, second, times, product)",
    )
    p.add_argument("--aggregate", choices=["max", "union"], default="max")
    p.add_argument("--mask-test", action="store_true", help="zero each set vs a random one")
    add_dataset(p)
    p.add_argument("--top", type=int, default=10, help="neurons to list")


@command(
    "zero-shot",
    "search shallow FFN neurons whose attention-moved value vectors show number tokens",
    "mechcna zero-shot --mask-test --operations + --digits 1",
    _zero_shot_args,
)
def zero_shot(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.evaluation import evaluate_accuracy
    from mechcna.analyses.shallow import (
        PRUNED_CONCEPTS,
        hidden_interpretable_neurons,
        mask_experiment,
    )

    model = ctx.model
    tokens = args.tokens or (50 if model.cfg.d_vocab >= 1000 else 10)
    search = hidden_interpretable_neurons(
        model, top=tokens, thresholds=args.thresholds or (), aggregate=args.aggregate,
        concepts=PRUNED_CONCEPTS if args.concepts == "pruned" else None, progress=ctx.progress,
    )  # fmt: skip
    if args.thresholds is None:
        search = search.selective()
    report = ctx.report("Zero-shot search for hidden-interpretable shallow neurons")
    report.table(search.summary(), "neurons with at least M concept tokens", "ARITH Table 8")
    report.table(search.top_neurons(args.top), "searched neurons with the most concept tokens")
    report.figure(search.plot(), "hidden-interpretable neurons per layer, one line per M")
    if args.mask_test:
        data = dataset_from(args, ctx)

        def evaluate(m, edits) -> float:
            return evaluate_accuracy(m, data, edits, progress=False).accuracy

        res = mask_experiment(model, search, evaluate, progress=ctx.progress)
        report.section("Masking test", f"accuracy on {len(data)} arithmetic cases per zeroed set")
        report.table(
            res.to_frame(), "accuracy after zeroing each set and a random set", "ARITH Table 8"
        )
        report.figure(res.plot(), "accuracy decrease: found set vs random set of the same size")
    return report
