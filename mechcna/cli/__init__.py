"""Command line: ``mechcna <subcommand>``; every subcommand is a thin call into the library.

Each prints its result as text; with ``--out DIR`` it also writes a self-contained page
(``index.html``), one CSV per table, ``report.txt`` and ``provenance.json`` into ``DIR``
(:mod:`mechcna.report.page`). ``--model`` defaults to the shipped model ``mechcna/arith-small``.
A mistake in the input prints one line (``mechcna: error: ...``) and exits with status 2;
``--debug`` shows the traceback instead.

Subcommands are registered with :func:`mechcna.cli.base.command` in the modules listed in
``COMMAND_MODULES`` (add a module there to add subcommands).
"""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from mechcna.cli.base import COMMANDS, DEFAULT_MODEL, Context
from mechcna.errors import MechcnaError
from mechcna.report.outdir import check_out_dir

#: Modules whose import registers subcommands (one line per module).
COMMAND_MODULES: tuple[str, ...] = (
    "mechcna.cli.analyses",
    "mechcna.cli.arithmetic",
    "mechcna.cli.runs",
    "mechcna.cli.papers",
    "mechcna.cli.applications",
)


def _version() -> str:
    from mechcna._version import __version__

    return f"mechcna {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="mechcna",
        description=__doc__.split("\n\n")[0].replace("``", "") if __doc__ else None,
        epilog="example:\n  mechcna attribute --prompt '3+5=' --level ffn --out runs/attr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            epilog=f"example:\n  {cmd.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if cmd.model:
            p.add_argument(
                "--model",
                default=DEFAULT_MODEL,
                help=f"model name or checkpoint directory (default: {DEFAULT_MODEL})",
            )
            p.add_argument(
                "--device",
                default=None,
                help="torch device for the model: cpu, cuda, cuda:1, ... (default: CUDA when "
                "available)",
            )
        cmd.arguments(p)
        p.add_argument(
            "--out",
            default=cmd.out_default,
            help="folder for index.html, CSVs, report.txt, provenance.json"
            + (f" (default: {cmd.out_default})" if cmd.out_default else " (default: none)"),
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="write into a non-empty --out folder, deleting what mechcna wrote there before",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    return parser


def quiet_progress_bars() -> None:
    """``--quiet``: no progress bars from tqdm (e.g. transformers' GGUF conversion) or the
    Hugging Face hub. tqdm reads ``TQDM_*`` when it is imported, so this works in a fresh
    process (the command line), where nothing heavy is imported before the options."""
    if "tqdm" not in sys.modules:  # else too late, and it would leak into subprocesses
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        quiet_progress_bars()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return _run(args, argv)
    except MechcnaError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        sys.stderr.write(f"mechcna: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mechcna: interrupted\n")
        return 130


#: Options that count something: each must be at least 1.
_COUNTS = (
    "pairs", "threads", "top", "k", "ks", "rank", "train_pairs", "test_pairs", "cost_pairs",
    "eval_pairs", "cna_pairs", "cna_templates", "tokens", "batch_size",
)  # fmt: skip
#: Options that are thresholds or counts that may be 0.
_NON_NEGATIVE = ("thresholds", "threshold", "random", "steps", "cna_cases")


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts below 1 and negative thresholds before anything runs."""
    for names, low in ((_COUNTS, 1), (_NON_NEGATIVE, 0)):
        for name in names:
            value = getattr(args, name, None)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int | float) and not v >= low:
                    option = "--" + name.replace("_", "-")
                    rule = "a positive integer" if low else "at least 0"
                    raise MechcnaError(f"{option} must be {rule}, not {v}")


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cmd = COMMANDS[args.command]
    _check_numbers(args)
    # before any computation: a bad or non-empty folder fails in milliseconds
    out = check_out_dir(args.out, args.overwrite) if args.out else None
    report = cmd.run(args, Context(args, argv))
    sys.stdout.write(report.to_text())
    if out is not None:
        page = report.write(out, overwrite=args.overwrite)
        sys.stdout.write(f"\nwrote {page} (+ CSV per table, report.txt, provenance.json)\n")
    return 0
