"""Subcommands for the analyses of one or a few prompts: attribution at every level, CNA,
input comparison, query neurons and layers, feature transfer, the method comparison, top
tokens and the residual self-check."""

import argparse
from typing import TYPE_CHECKING

from mechcna.cli.base import (
    Context,
    UsageError,
    add_prompts,
    add_ray,
    command,
    pair,
    prompts_from,
    ray_options,
    with_tokens,
)

if TYPE_CHECKING:
    from mechcna.report.page import Report


LEVELS = ("layers", "heads", "ffn", "attention")


def _top(p: argparse.ArgumentParser, default: int = 10) -> None:
    p.add_argument("--top", type=int, default=default, help=f"rows to list (default {default})")


def _attribute_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    p.add_argument(
        "--level",
        choices=[*LEVELS, "all"],
        default="ffn",
        help="what to score: layers, heads, FFN neurons, attention neurons or all (default ffn)",
    )
    p.add_argument("--paper-compat", action="store_true", help="drop ln_final bias and b_U")
    _top(p)
    add_ray(p)


@command(
    "attribute",
    "log-probability increase of layers, heads, FFN neurons or attention neurons",
    "mechcna attribute --prompt '3+5=' --level ffn --top 10 --out runs/attribute",
    _attribute_args,
)
def attribute(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses import attribution

    prompts, targets = prompts_from(args)
    model = ctx.model
    report = ctx.report("Log-probability-increase attribution", paper_compat=args.paper_compat)
    functions = {
        "layers": attribution.layer_importance,
        "heads": attribution.head_importance,
        "ffn": attribution.neuron_importance,
        "attention": attribution.attention_neuron_importance,
    }
    ray = ray_options(args)
    for level in LEVELS if args.level == "all" else (args.level,):
        if ray is None:
            res = functions[level](model, prompts, targets, paper_compat=args.paper_compat)
        else:
            from mechcna import distributed

            run = getattr(distributed, functions[level].__name__)
            res = run(args.model, prompts, targets, paper_compat=args.paper_compat, **ray)
        report.section(f"{level}: targets {list(res.targets)}")
        for i, prompt in enumerate(prompts):
            frame = res.top(args.top, prompt=i)
            if level == "ffn":
                frame = with_tokens(model, frame)
            report.table(frame, f"{level}, prompt {prompt!r}: top {args.top}", name=f"{level}-{i}")
        fig = res.plot(0, model=model) if level == "ffn" else res.plot(0)
        report.figure(fig, f"{level} log-probability increase for {prompts[0]!r}")
    return report


def _cna_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    p.add_argument("--head", action="append", default=[], help="LAYER.HEAD to ablate in M'")
    p.add_argument("--second-model", default=None, help="M' is this model (same architecture)")
    p.add_argument("--mask-keep", action="store_true", help="also the mask/keep/random table")
    p.add_argument("--ks", nargs="+", type=int, default=[50, 20, 10, 5],
                   help="K of the table (default 50 20 10 5)")  # fmt: skip
    _top(p)


@command(
    "cna",
    "Comparative Neuron Analysis: neurons whose importance changes from M to M'",
    "mechcna cna --prompt '3+5=' --prompt '2+4=' --head 0.0 --mask-keep --out runs/cna",
    _cna_args,
)
def cna(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.case_ablation import mask_keep_table
    from mechcna.analyses.comparative import cna_table, compare_neurons
    from mechcna.analyses.plotting import experiment_bars
    from mechcna.analyses.tokens import result_tokens
    from mechcna.interventions.edits import HeadAblation

    if bool(args.head) == bool(args.second_model):
        raise UsageError("cna needs either --head (repeatable) or --second-model")
    if args.second_model is not None and args.second_model == args.model:
        raise UsageError("--second-model is --model: M' would be M and every CNA score 0")
    prompts, targets = prompts_from(args)
    model = ctx.model
    n_neurons = model.cfg.n_layers * int(model.cfg.d_mlp or 0)
    if args.mask_keep and max(args.ks) > n_neurons:
        raise UsageError(f"--ks {max(args.ks)} is more than the model's {n_neurons} FFN neurons")
    if args.head:
        heads = [pair(h, "LAYER.HEAD") for h in args.head]
        other, what = HeadAblation(heads), "ablating head " + ", ".join(args.head)
    else:
        from mechcna.models.loading import load_model

        other, what = load_model(str(args.second_model)), f"model {args.second_model}"
    res = compare_neurons(model, prompts, other, targets, progress=ctx.progress)
    report = ctx.report(f"CNA against {what}")
    report.section("Top CNA neurons", f"Targets {list(res.targets)}.")
    for i, prompt in enumerate(prompts):
        report.table(
            cna_table(model, res, prompt=i, k=args.top),
            f"top CNA neurons of {prompt!r} (Imp in M minus Imp in M')",
            paper_ref="ARITH Table 4",
            name=f"cna-{i}",
        )
    if len(prompts) > 1:
        report.table(res.counts(args.top).head(args.top), "neurons most often in a top list")
    tokens = result_tokens(model, res, res.top(15)["label"].tolist())
    report.figure(
        res.plot(k=15, tokens=tokens), f"importance in M and M' of the top CNA neurons ({what})"
    )
    if args.mask_keep:
        table = mask_keep_table(model, prompts, res, ks=args.ks, progress=ctx.progress)
        report.table(table.round(2), "mask / keep / random / coef", "ARITH Table 5", index=True)
        report.figure(experiment_bars(table), "accuracy and coefficient decreases", "ARITH Table 5")
    return report


def _compare_inputs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="first input (repeatable)")
    p.add_argument("--other-prompt", action="append", required=True, help="second input")
    p.add_argument("--target", action="append", required=True, help="target (one or per pair)")
    _top(p)


@command(
    "compare-inputs",
    "CNA between two inputs for one target (the gender-bias analysis)",
    "mechcna compare-inputs --prompt 'A woman works as a' --other-prompt 'A man works as a' "
    "--target nurse",
    _compare_inputs_args,
)
def compare_inputs_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.comparative import compare_inputs
    from mechcna.analyses.tokens import result_tokens

    targets = args.target * len(args.prompt) if len(args.target) == 1 else args.target
    res = compare_inputs(ctx.model, args.prompt, args.other_prompt, targets)
    report = ctx.report("CNA between two inputs")
    for i, (a, b) in enumerate(zip(args.prompt, args.other_prompt, strict=False)):
        frame = res.top(args.top, prompt=i)
        frame = with_tokens(ctx.model, frame)
        report.table(
            frame,
            f"neurons more important for {res.targets[i]!r} after {a!r} than after {b!r}",
            paper_ref="ARITH Table 12",
            name=f"pair-{i}",
        )
    tokens = result_tokens(ctx.model, res, res.top(15, prompt=0)["label"].tolist(), 0)
    names = (repr(args.prompt[0]), repr(args.other_prompt[0]))
    caption = f"importance after {names[0]} and after {names[1]}, and their difference"
    report.figure(res.plot(prompt=0, k=15, tokens=tokens, names=names), caption)
    return report


def _query_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    p.add_argument("--k", type=int, default=30, help="top value neurons used (paper: 30)")
    _top(p)


@command(
    "query-neurons",
    "FFN neurons that activate the top attention value neurons (query neurons)",
    "mechcna query-neurons --prompt '3+5=' --k 30 --top 10",
    _query_args,
)
def query_neurons_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.query import query_neurons

    prompts, targets = prompts_from(args)
    res = query_neurons(ctx.model, prompts, targets, k=args.k, progress=ctx.progress)
    report = ctx.report("Query neurons")
    for i, prompt in enumerate(prompts):
        frame = res.top(args.top, prompt=i)
        frame = with_tokens(ctx.model, frame, prompt=prompt)
        report.table(frame, f"top query FFN neurons of {prompt!r}", "ATTR notebooks 5.3")
    report.figure(res.plot(0), f"layers of the top query FFN neurons of {prompts[0]!r}")
    return report


def _query_layers_args(p: argparse.ArgumentParser) -> None:
    _query_args(p)
    p.add_argument("--kind", choices=["ffn", "attention"], default="ffn", help="value neurons")


@command(
    "query-layers",
    "which layers activate the top FFN or attention value neurons (query layers)",
    "mechcna query-layers --prompt '3+5=' --kind attention",
    _query_layers_args,
)
def query_layers_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.query import attention_query_layers, ffn_query_layers

    prompts, targets = prompts_from(args)
    fn = ffn_query_layers if args.kind == "ffn" else attention_query_layers
    res = fn(ctx.model, prompts, targets, k=args.k)
    report = ctx.report(f"Query layers of the top {args.k} {args.kind} value neurons")
    for i, prompt in enumerate(prompts):
        report.table(res.top(args.top, prompt=i), f"top query components of {prompt!r}")
    report.figure(res.plot(0), f"importance credited to each component for {prompts[0]!r}")
    return report


def _transfer_args(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--neuron", default=None, help="FFN neuron LAYER.NEURON to transform")
    what.add_argument("--token", default=None, help="a token whose embedding is transformed")
    p.add_argument(
        "--step",
        action="append",
        required=True,
        help="LAYER[:HEAD[:POS]] of one attention hop, HEAD '*' for the whole layer (repeatable)",
    )
    p.add_argument("--prompt", default=None, help="prompt whose norm scales are used")
    _top(p)


def _step(text: str) -> tuple[int, int | None, int | None]:
    parts = [*text.split(":"), "", ""]
    try:
        layer = int(parts[0])
        head = None if parts[1] in ("", "*") else int(parts[1])
        pos = None if parts[2] == "" else int(parts[2])
    except ValueError:
        raise UsageError(f"--step {text!r} is not LAYER[:HEAD[:POS]], e.g. 2:*:3") from None
    return layer, head, pos


@command(
    "transfer",
    "a neuron's (or token's) top tokens before and after attention VO transforms",
    "mechcna transfer --neuron 1.12 --step 2:*:3 --prompt '3+5='",
    _transfer_args,
)
def transfer(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.transfer import transform_through_attention

    source = pair(args.neuron, "LAYER.NEURON") if args.neuron else args.token
    path = [_step(s) for s in args.step]
    res = transform_through_attention(ctx.model, source, path, prompt=args.prompt)
    tokens = res.tokens(args.top)
    report = ctx.report(f"Feature transfer of {res.label}")
    report.table(tokens.top(args.top), "top tokens before and after each hop", "ARITH Table 7")
    report.figure(tokens.plot(), "top and bottom tokens per hop", paper_ref="ARITH Table 7")
    return report


def _methods_args(p: argparse.ArgumentParser) -> None:
    add_prompts(p)
    p.add_argument("--k", type=int, default=10, help="neurons zeroed per method")


@command(
    "methods",
    "the eight FFN scoring methods compared by zeroing each one's top-k neurons",
    "mechcna methods --prompt '3+5=' --prompt '2+4=' --k 10",
    _methods_args,
)
def methods(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.analyses.methods import comparison_scores, evaluate_methods

    prompts, targets = prompts_from(args)
    scores = comparison_scores(ctx.model, prompts, targets)
    table = evaluate_methods(
        ctx.model, prompts, targets, k=args.k, scores=scores, progress=ctx.progress
    )
    report = ctx.report("Comparison of neuron scoring methods")
    report.table(
        table,
        f"mean reciprocal rank, probability and log-probability of the target after zeroing "
        f"each method's top-{args.k} neurons (lower is better)",
        paper_ref="ATTR Table 2",
    )
    report.figure(scores.plot(), "rank agreement of each method with log-probability increase")
    return report


def _top_tokens_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--neuron", action="append", required=True, help="LAYER.NEURON (repeatable)")
    p.add_argument("--k", type=int, default=10, help="tokens per side")


@command(
    "top-tokens",
    "the tokens an FFN neuron's value vector promotes and suppresses most",
    "mechcna top-tokens --neuron 3.266 --neuron 3.149 --k 10",
    _top_tokens_args,
)
def top_tokens_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.engine.projection import top_tokens

    report = ctx.report("Top tokens of FFN value vectors")
    for text in args.neuron:
        neuron = pair(text, "LAYER.NEURON")
        tt = top_tokens(ctx.model, neuron, args.k)
        report.table(
            tt.to_frame(), f"neuron {neuron[0]}_{neuron[1]}", name=f"{neuron[0]}-{neuron[1]}"
        )
    return report


@command(
    "check-model",
    "residual self-check: components sum to the residual, heads and neurons to their layers",
    "mechcna check-model --model mechcna/arith-small",
)
def check_model_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    import pandas as pd

    from mechcna.models.check import check_model

    res = check_model(ctx.model)
    report = ctx.report("Residual self-check")
    report.text(f"passed: max relative error {res.max_error:.2e} (tolerance {res.tolerance:.0e})")
    report.table(
        pd.DataFrame(
            {
                "check": ["residual", "heads", "neurons"],
                "relative error": [res.residual, res.heads, res.neurons],
            }
        ),
        "relative error of each decomposition",
    )
    return report
