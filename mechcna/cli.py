"""Command line: ``mechcna <subcommand>``; each subcommand is a thin call into the library."""

import argparse
import logging
import sys
from collections.abc import Sequence

from mechcna import demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="mechcna", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the main demo on the shipped model, offline")
    p_demo.add_argument("--model", default=None, help="model name or directory")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        sys.stdout.write(demo.run(args.model, progress=not args.quiet))
        return 0
    return 2  # pragma: no cover
