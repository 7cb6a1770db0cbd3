"""The ``reproduce`` subcommand: ``mechcna reproduce --model M --out DIR [--paper ...] [--quick]``.

:func:`add_arguments` fills an argparse parser and :func:`run` executes parsed arguments, so the
main CLI registers the subcommand with two calls; ``python -m mechcna.reproduce`` runs it alone.
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from mechcna.models.loading import load_model
from mechcna.report.page import Provenance, check_out_dir
from mechcna.reproduce import ReproduceSettings, reproduce, write_report


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="model name or directory")
    p.add_argument("--out", required=True, help="folder for index.html, CSVs and reproduce.md")
    p.add_argument("--paper", choices=["attribution", "arithmetic", "both"], default="both")
    p.add_argument(
        "--quick", action="store_true", help="the smallest sizes (ReproduceSettings.quick)"
    )
    p.add_argument(
        "--preset",
        choices=["quick", "standard", "paper", "full"],
        default=None,
        help="sizes (see ReproduceSettings; default standard); --quick is --preset quick",
    )
    p.add_argument(
        "--filter-top-k",
        type=int,
        default=None,
        help="knowledge filter rank (10: the paper's, default; 1: top-1)",
    )
    forms = ["auto", "zero-shot", "few-shot", "both"]
    p.add_argument("--prompt-form", choices=forms, help="arithmetic prompts (both: side by side)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="save finished stages under --out and continue from them",
    )
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--lock",
        default=None,
        help="a file to flock during each stage, released between stages (shared machines)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model, run the stages, write the page; prints the claim table."""
    out = check_out_dir(args.out)  # fail on a bad folder before any work
    model = load_model(args.model, device=args.device)
    settings = ReproduceSettings.named(args.preset or ("quick" if args.quick else "standard"))
    if args.filter_top_k:
        settings = replace(settings, knowledge_top_k=args.filter_top_k)
    if args.prompt_form:
        settings = replace(settings, prompt_form=args.prompt_form)
    # reproduce() logs the expected stage times (shown unless --quiet)
    resume = out if args.resume or settings.preset == "paper" else None
    rep = reproduce(model, args.paper, settings=settings, progress=not args.quiet,
                    lock=args.lock, checkpoint=resume)  # fmt: skip
    command = f"mechcna reproduce --model {args.model} --paper {args.paper}"
    command += " --quick" * bool(args.quick) + f" --preset {args.preset}" * bool(args.preset)
    command += f" --prompt-form {args.prompt_form}" * bool(args.prompt_form)
    prov = Provenance.from_model(model, command=command)
    page = write_report(rep, out, prov)
    frame = rep.claims[["claim", "n", "estimate", "lo", "hi", "test", "verdict"]]
    sys.stdout.write(frame.to_string(index=False) + "\n")
    sys.stdout.write(rep.timings().round(1).to_string(index=False) + "\n")
    sys.stdout.write(f"report: {page}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mechcna reproduce"))
    return run(parser.parse_args(argv))
