"""``mechcna reproduce``: both papers end to end (:mod:`mechcna.reproduce`)."""

import argparse
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from mechcna.cli.base import Context, command

if TYPE_CHECKING:
    from mechcna.report.page import Report


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paper", choices=["attribution", "arithmetic", "both"], default="both")
    p.add_argument(
        "--quick", action="store_true", help="the smallest sizes (ReproduceSettings.quick)"
    )
    p.add_argument(
        "--lock",
        default=None,
        help="a file to flock during each stage, released between stages (shared machines)",
    )


@command(
    "reproduce",
    "both papers' tables and claims, the papers' numbers beside ours, with verdicts",
    "mechcna reproduce --model smollm2-135m --paper arithmetic --quick --out runs/reproduce",
    _args,
    out_default="runs/reproduce",
)
def reproduce_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.reproduce import reproduce
    from mechcna.reproduce.page import build_report, to_markdown

    start = time.perf_counter()
    model = ctx.model
    loaded = time.perf_counter() - start
    rep = reproduce(model, args.paper, quick=args.quick, progress=ctx.progress, lock=args.lock)
    flags = [f"--model {args.model}", f"--paper {args.paper}", f"--out {args.out}"]
    flags += ["--quick"] * bool(args.quick) + [f"--lock {args.lock}"] * bool(args.lock)
    command = " ".join(["mechcna reproduce", *flags])
    rep = replace(rep, load_seconds=loaded, command=command)
    report = build_report(rep, ctx.report("reproduce").provenance)
    report.attach("reproduce.md", to_markdown(rep))
    return report
