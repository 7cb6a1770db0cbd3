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
    p_train = sub.add_parser(
        "train-arithmetic", help="train the small arithmetic model (mechcna/arith-small)"
    )
    p_train.add_argument("--out", default=None, help="checkpoint directory to write")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--steps", type=int, default=None)
    p_train.add_argument("--batch-size", type=int, default=None)
    p_train.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs per cell")
    p_train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p_train.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        sys.stdout.write(demo.run(args.model, progress=not args.quiet))
        return 0
    if args.command == "train-arithmetic":
        from mechcna import training

        overrides = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_pairs": args.eval_pairs,
            "threads": args.threads,
        }
        config = training.TrainingConfig(
            seed=args.seed, **{k: v for k, v in overrides.items() if v is not None}
        )
        result = training.train_arithmetic(config, out=args.out, progress=not args.quiet)
        sys.stdout.write(result.to_frame().to_string(index=False) + "\n")
        return 0
    return 2  # pragma: no cover
