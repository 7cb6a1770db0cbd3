"""The ``reproduce`` subcommand: ``mechcna reproduce --model M --out DIR [--paper ...] [--quick]``.

:func:`add_arguments` fills an argparse parser and :func:`run` executes parsed arguments, so the
main CLI registers the subcommand with two calls; ``python -m mechcna.reproduce`` runs it alone.
"""

import argparse
import sys
from collections.abc import Sequence

from mechcna.models.loading import load_model
from mechcna.report.page import Provenance, check_out_dir
from mechcna.reproduce import reproduce, write_report


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="model name or directory")
    p.add_argument("--out", required=True, help="folder for index.html, CSVs and reproduce.md")
    p.add_argument("--paper", choices=["attribution", "arithmetic", "both"], default="both")
    p.add_argument(
        "--quick", action="store_true", help="the smallest sizes (ReproduceSettings.quick)"
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
    rep = reproduce(model, args.paper, quick=args.quick, progress=not args.quiet, lock=args.lock)
    command = f"mechcna reproduce --model {args.model} --paper {args.paper}"
    prov = Provenance.from_model(model, command=command + (" --quick" if args.quick else ""))
    page = write_report(rep, out, prov)
    frame = rep.claims_frame()[["claim", "ours", "verdict"]]
    sys.stdout.write(frame.to_string(index=False) + "\n")
    sys.stdout.write(rep.timings().round(1).to_string(index=False) + "\n")
    sys.stdout.write(f"report: {page}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mechcna reproduce"))
    return run(parser.parse_args(argv))
