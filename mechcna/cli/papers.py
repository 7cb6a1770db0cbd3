"""``mechcna reproduce``: both papers end to end (:mod:`mechcna.reproduce`)."""

import argparse
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from mechcna.cli.base import Context, add_ray, command, ray_options

if TYPE_CHECKING:
    from mechcna.report.page import Report
    from mechcna.reproduce import ReproduceSettings


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paper", choices=["attribution", "arithmetic", "both"], default="both")
    p.add_argument(
        "--quick", action="store_true", help="the smallest sizes (ReproduceSettings.quick)"
    )
    p.add_argument(
        "--preset",
        choices=["quick", "standard", "paper", "full"],
        default=None,
        help="sizes: quick (minutes, verdicts mostly inconclusive), standard (the default: "
        "sized by power, about 25 minutes for SmolLM2 on 2 cores), paper (the papers' sizes, "
        "hours, resumable), full (the earlier, smaller default; too small to decide most "
        "claims); --quick is --preset quick",
    )
    p.add_argument(
        "--filter-top-k",
        type=int,
        default=None,
        help="knowledge filter: keep prompts whose gold answer is in the top K (10: the "
        "paper's, the default; 1: the model's top-1 answer)",
    )
    p.add_argument(
        "--prompt-form",
        choices=["auto", "zero-shot", "few-shot", "both"],
        default=None,
        help="arithmetic prompts (default: the preset's, zero-shot as in the paper): both runs "
        "every arithmetic stage once per form, side by side, claims labelled with their form",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="save each finished stage under --out and continue from them on a rerun "
        "(always on for --preset paper)",
    )
    p.add_argument(
        "--lock",
        default=None,
        help="a file to flock during each stage, released between stages (shared machines)",
    )
    add_ray(p)


def _settings(args: argparse.Namespace) -> "ReproduceSettings":
    from mechcna.reproduce import ReproduceSettings

    name = args.preset or ("quick" if args.quick else "standard")
    s = ReproduceSettings.named(name)
    if args.filter_top_k:
        s = replace(s, knowledge_top_k=args.filter_top_k)
    if args.prompt_form:
        s = replace(s, prompt_form=args.prompt_form)
    return s


@command(
    "reproduce",
    "both papers' tables and claims, the papers' numbers beside ours, with verdicts",
    "mechcna reproduce --model smollm2-135m --paper arithmetic --quick --out runs/reproduce",
    _args,
    out_default="runs/reproduce",
)
def reproduce_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.reproduce import RayRun, expected_times, reproduce
    from mechcna.reproduce.page import build_report, to_markdown

    on_ray = ray_options(args)
    ray = (
        None
        if on_ray is None
        else RayRun(args.model, workers=args.workers, address=args.ray or None)
    )

    start = time.perf_counter()
    model = ctx.model
    loaded = time.perf_counter() - start
    settings = _settings(args)
    sys.stderr.write(
        "expected stage times (s, rough, 2-core CPU):\n"
        + expected_times(model, settings, args.paper).round(1).to_string(index=False)
        + "\n"
    )
    resume = args.out if (args.resume or settings.preset == "paper") and args.out else None
    rep = reproduce(
        model, args.paper, settings=settings, progress=ctx.progress, lock=args.lock,
        checkpoint=resume, ray=ray,
    )  # fmt: skip
    flags = [f"--model {args.model}", f"--paper {args.paper}", f"--out {args.out}"]
    flags += ["--quick"] * bool(args.quick) + [f"--lock {args.lock}"] * bool(args.lock)
    flags += [f"--preset {args.preset}"] * bool(args.preset)
    flags += [f"--filter-top-k {args.filter_top_k}"] * bool(args.filter_top_k)
    flags += [f"--prompt-form {args.prompt_form}"] * bool(args.prompt_form)
    flags += [f"--ray {args.ray}".rstrip()] * (args.ray is not None)
    flags += [f"--workers {args.workers}"] * (args.workers is not None)
    command = " ".join(["mechcna reproduce", *flags])
    rep = replace(rep, load_seconds=loaded, command=command)
    report = build_report(rep, ctx.report("reproduce").provenance)
    report.attach("reproduce.md", to_markdown(rep))
    return report


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "records",
        nargs="+",
        help="two or more reproduce records: run folders (--out of mechcna reproduce), their "
        "table-01-claims.csv, or markdown records (reproduce.md, docs/reproduce/*.md)",
    )
    p.add_argument("--names", nargs="+", default=None, help="a column name per record")
    p.add_argument(
        "--form",
        default="zero-shot",
        help="in a record of both arithmetic prompt forms, the form whose claims match the "
        "other records' (default: zero-shot, the presets' form; 'tagged': match as written)",
    )


@command(
    "compare-claims",
    "the claim tables of several reproduce records side by side (which claims hold on both)",
    "mechcna compare-claims runs/smollm2-standard runs/gemma-standard --names SmolLM2 Gemma",
    _compare_args,
    model=False,
    out_default="runs/compare-claims",
)
def compare_claims_cmd(args: argparse.Namespace, ctx: Context) -> "Report":
    from mechcna.reproduce.compare import compare_claims

    form = None if args.form == "tagged" else args.form
    cmp = compare_claims(args.records, names=args.names, form=form)
    report = ctx.report("Claims side by side", records=" ".join(args.records))
    report.table(cmp.summary(), "counts over the claims every record has")
    report.figure(cmp.plot(), "the verdict of every claim in every record")
    report.table(cmp.to_frame(), "the claims every record has, matched by paper, title and order")
    if len(cmp.unmatched):
        report.table(cmp.unmatched, "claims some record lacks")
    report.attach("compare.md", cmp.to_markdown() + "\n")
    return report
