"""Command line: ``mechcna <subcommand>``; each subcommand is a thin call into the library."""

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from mechcna import demo, heads


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="mechcna", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the main demo on the shipped model, offline")
    p_demo.add_argument("--model", default=None, help="model name or directory")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")
    p_demo.add_argument("--pairs", type=int, default=40, help="operand pairs per cell")
    p_demo.add_argument("--out", default="runs/demo", help="folder for the HTML figures")
    p_heads = sub.add_parser(
        "head-sweep",
        help="ablate every attention head on one prompt, or over a file of prompt/target pairs",
    )
    p_heads.add_argument("--model", required=True, help="model name or directory")
    p_heads.add_argument("--prompt", default=None, help="one prompt (e.g. '3+5=')")
    p_heads.add_argument("--target", default=None, help="its target (default: top-1)")
    p_heads.add_argument(
        "--prompts-file", default=None, help="tab-separated lines 'prompt<TAB>target'"
    )
    p_heads.add_argument("--mode", choices=["zero", "mean"], default="zero")
    p_heads.add_argument("--top", type=int, default=10, help="heads to list")
    p_heads.add_argument("--html", default=None, help="write the layer x head heatmap here")
    p_heads.add_argument("--csv", default=None, help="write per-head results here")
    p_heads.add_argument("--quiet", action="store_true", help="no progress bars")
    p_attr = sub.add_parser("attribute", help="log-probability-increase scores for prompts")
    p_attr.add_argument("--model", required=True, help="model name or directory")
    p_attr.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p_attr.add_argument("--target", default=None, help="target token (default: top-1)")
    p_attr.add_argument("--level", choices=["layers", "heads", "ffn", "attention"], default="ffn")
    p_attr.add_argument("--paper-compat", action="store_true", help="drop ln_final bias and b_U")
    _outputs(p_attr)
    p_cna = sub.add_parser("cna", help="Comparative Neuron Analysis against head ablations")
    p_cna.add_argument("--model", required=True, help="model name or directory")
    p_cna.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p_cna.add_argument("--head", action="append", required=True, help="LAYER.HEAD to ablate")
    p_cna.add_argument("--target", default=None, help="target token (default: top-1)")
    _outputs(p_cna)
    p_train = sub.add_parser(
        "train-arithmetic", help="train the small arithmetic model (mechcna/arith-small)"
    )
    p_train.add_argument("--out", default=None, help="checkpoint directory to write")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--steps", type=int, default=None)
    p_train.add_argument("--batch-size", type=int, default=None)
    p_train.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs per cell")
    p_train.add_argument("--weight-decay", type=float, default=None, help="AdamW decay")
    p_train.add_argument("--holdout-seed", type=int, default=None, help="held-out split seed")
    p_train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p_train.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        report = demo.run(args.model, progress=not args.quiet, out_dir=args.out, n_pairs=args.pairs)
        sys.stdout.write(report)
        return 0
    if args.command == "head-sweep":
        return _head_sweep(args, parser)
    if args.command in ("attribute", "cna"):
        return _scores(args, parser)
    if args.command == "train-arithmetic":
        from mechcna import training

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
        result = training.train_arithmetic(config, out=args.out, progress=not args.quiet)
        sys.stdout.write(result.to_frame().to_string(index=False) + "\n")
        return 0
    return 2  # pragma: no cover


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top", type=int, default=10, help="rows to list")
    p.add_argument("--html", default=None, help="write the figure here")
    p.add_argument("--csv", default=None, help="write all scores here (long format)")


def _scores(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mechcna import attribution
    from mechcna.comparative import compare_neurons
    from mechcna.interventions import HeadAblation
    from mechcna.models import load_model

    model = load_model(args.model)
    if args.command == "cna":
        try:
            pairs = [tuple(int(x) for x in h.split(".")) for h in args.head]
        except ValueError:
            parser.error("--head takes LAYER.HEAD, e.g. 3.1")
        if any(len(p) != 2 for p in pairs):
            parser.error("--head takes LAYER.HEAD, e.g. 3.1")
        res = compare_neurons(model, args.prompt, HeadAblation(pairs), args.target)  # type: ignore[arg-type]
        title = f"CNA against ablating {', '.join(args.head)}"
    else:
        fn = {
            "layers": attribution.layer_importance,
            "heads": attribution.head_importance,
            "ffn": attribution.neuron_importance,
            "attention": attribution.attention_neuron_importance,
        }[args.level]
        res = fn(model, args.prompt, args.target, paper_compat=args.paper_compat)
        title = f"{args.level} log-probability increase"
    sys.stdout.write(f"{title}; targets {list(res.targets)}\n")
    for i, prompt in enumerate(args.prompt):
        sys.stdout.write(f"prompt {prompt!r}:\n")
        sys.stdout.write(res.top(args.top, prompt=i).to_string(index=False) + "\n")
    if args.csv:
        res.to_frame().to_csv(args.csv, index=False)
    if args.html:
        res.plot().write_html(args.html, include_plotlyjs=True)
    return 0


def _head_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mechcna.models import load_model

    if (args.prompt is None) == (args.prompts_file is None):
        parser.error("head-sweep needs exactly one of --prompt and --prompts-file")
    model = load_model(args.model)
    if args.prompt is not None:
        reference = [args.prompt] if args.mode == "mean" else None
        effects = heads.single_prompt_head_effects(
            model, args.prompt, args.target, mode=args.mode, reference=reference,
            progress=not args.quiet,
        )  # fmt: skip
        frame, fig = effects.to_frame(), effects.plot()
        sys.stdout.write(
            f"prompt {args.prompt!r}, target {effects.target_str!r}: "
            f"p = {math.exp(effects.base_logprob):.4f}; heads whose ablation lowers p most:\n"
        )
        sys.stdout.write(effects.top(args.top).to_string(index=False) + "\n")
    else:
        lines = Path(args.prompts_file).read_text().splitlines()
        pairs = [line.split("\t") for line in lines if line.strip()]
        if any(len(p) < 2 for p in pairs):
            parser.error("each line of --prompts-file must be 'prompt<TAB>target'")
        sweep = heads.head_sweep(
            model, [p[0] for p in pairs], [p[1] for p in pairs], mode=args.mode,
            progress=not args.quiet,
        )  # fmt: skip
        frame, fig = sweep.to_frame(), sweep.plot()
        sys.stdout.write(
            f"{len(pairs)} cases, accuracy {float(sweep.base_correct.double().mean()):.3f}; "
            "heads whose ablation lowers accuracy most:\n"
        )
        sys.stdout.write(sweep.top(args.top).to_string(index=False) + "\n")
    if args.csv:
        frame.to_csv(args.csv, index=False)
    if args.html:
        fig.write_html(args.html, include_plotlyjs=True)
    return 0
