"""Subcommands that write whole pages or models: the demo, the attribution report of a prompt,
and training the shipped arithmetic model."""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mechcna.cli.base import Context, add_prompts, command, prompts_from, with_tokens

if TYPE_CHECKING:
    from mechcna.report.page import Report


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=40, help="operand pairs per cell (default 40)")


@command(
    "demo",
    "the papers' arithmetic pipeline on the shipped model, offline, as one page",
    "mechcna demo --out runs/demo",
    _demo_args,
    out_default="runs/demo",
)
def demo_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    import torch

    from mechcna.report import demo

    with torch.no_grad():
        return demo.build(
            ctx.model, progress=ctx.progress, n_pairs=args.pairs, command=ctx.command_line
        )


def _report_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    p.add_argument("--k", type=int, default=30, help="value neurons for the query layers")
    p.add_argument("--top", type=int, default=10, help="rows per table")


@command(
    "report",
    "the knowledge-attribution sequence on prompts (layers, heads, value and query neurons)",
    "mechcna report --prompt 'Tim Duncan plays the sport of' --model DIR --out runs/report",
    _report_args,
    out_default="runs/report",
)
def report_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses import attribution, query, query_overlap

    prompts, targets = prompts_from(args)
    model = ctx.model
    report = ctx.report(
        "Knowledge attribution",
        intro="The attribution paper's sequence: which layers, heads and neurons raise the "
        "log-probability of the target, and which shallow neurons activate them.",
    )
    layers = attribution.layer_importance(model, prompts, targets)
    report.section("Layers", f"Targets {list(layers.targets)}; scores telescope to log p.")
    report.figure(layers.plot(0), f"attention and FFN log-probability increase, {prompts[0]!r}")
    heads = attribution.head_importance(model, prompts, targets)
    report.section("Heads")
    report.table(heads.top(args.top, prompt=0), f"top heads of {prompts[0]!r}", name="heads")
    report.figure(heads.plot(0), f"log-probability increase of each head, {prompts[0]!r}")
    ffn = attribution.neuron_importance(model, prompts, targets)
    report.section("FFN value neurons")
    frame = ffn.top(args.top, prompt=0)
    frame = with_tokens(model, frame)
    report.table(
        frame, f"top FFN neurons of {prompts[0]!r} and the tokens they promote", name="ffn"
    )
    report.figure(
        ffn.plot(0, model=model), "layers of the top-300 FFN neurons (hover: their top tokens)"
    )
    att = attribution.attention_neuron_importance(model, prompts, targets)
    report.section("Attention value neurons")
    report.table(att.top(args.top, prompt=0), "top attention neurons", name="attention")
    report.figure(att.plot(0), "layers of the top-300 attention neurons")
    report.section("Query layers and neurons")
    ql = query.ffn_query_layers(model, prompts, targets, k=args.k, values=ffn)
    report.figure(ql.plot(0), f"which components activate the top-{args.k} FFN value neurons")
    qa = query.attention_query_layers(model, prompts, targets, k=args.k, attention=att)
    report.figure(qa.plot(0), f"which components activate the top-{args.k} attention neurons")
    qn = query.query_neurons(model, prompts, targets, k=args.k, attention=att)
    frame = qn.top(args.top, prompt=0)
    frame = with_tokens(model, frame, prompt=prompts[0])
    report.table(frame, "top query FFN neurons", name="query-neurons")
    overlap = query_overlap.query_value_overlap(ffn, qn, k=min(300, ffn.scores[0].numel()))
    report.figure(overlap.plot(0), "query-only vs query-value neurons per layer")
    return report


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs per cell")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW decay")
    p.add_argument("--holdout-seed", type=int, default=None, help="held-out split seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


@command(
    "train-arithmetic",
    "train the small arithmetic model (mechcna/arith-small) from scratch on the CPU",
    "mechcna train-arithmetic --out runs/arith-small --steps 2000   (checkpoint, card and page)",
    _train_args,
    model=False,
)
def train_arithmetic(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.applications import training

    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_pairs": args.eval_pairs,
        "weight_decay": args.weight_decay,
        "holdout_seed": args.holdout_seed,
        "threads": args.threads,
    }
    config = training.TrainingConfig(
        seed=args.seed, **{k: v for k, v in overrides.items() if v is not None}
    )
    out = Path(args.out).expanduser() if args.out else None
    before = {p.name for p in out.iterdir()} if out is not None and out.is_dir() else set()
    result = training.train_arithmetic(config, out=args.out, progress=ctx.progress)
    report = ctx.report("Training the arithmetic model", seed=args.seed)
    if out is not None:  # the checkpoint and card, listed in the folder's manifest
        report.adopt({p.name for p in out.iterdir()} - before)
    report.table(result.to_frame(), "held-out accuracy per cell after training")
    return report
