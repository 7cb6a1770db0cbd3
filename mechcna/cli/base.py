"""The command registry and the options every subcommand shares.

A subcommand is registered in one place, by decorating its run function::

    def _args(p: argparse.ArgumentParser) -> None:
        add_prompts(p)

    @command("attribute", "log-probability increase of every component",
             "mechcna attribute --prompt '3+5=' --level ffn", _args)
    def attribute(args: argparse.Namespace, ctx: Context) -> Report:
        report = ctx.report("...")
        ...
        return report

The framework adds ``--model`` (default: the shipped model), ``--out``, ``--quiet`` and
``--debug`` to every subcommand, checks ``--out`` before anything runs, loads the model on first
use of ``ctx.model``, prints the returned report's text and writes its page into ``--out``.
"""

import argparse
import contextlib
import io
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechcna.errors import MechcnaError

if TYPE_CHECKING:  # imported on use: `mechcna --help` must not load torch or pandas
    import pandas as pd

    from mechcna.models.backend import Model
    from mechcna.report.page import Report

DEFAULT_MODEL = "mechcna/arith-small"

Run = Callable[[argparse.Namespace, "Context"], "Report"]
Arguments = Callable[[argparse.ArgumentParser], None]


class UsageError(MechcnaError):
    """A command-line value that cannot be used (a bad neuron spec, an unreadable file)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, an example, its own options and its run."""

    name: str
    help: str
    example: str
    arguments: Arguments
    run: Run
    model: bool = True
    out_default: str | None = None


#: Every registered subcommand, in registration order.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    example: str,
    arguments: Arguments | None = None,
    *,
    model: bool = True,
    out_default: str | None = None,
) -> Callable[[Run], Run]:
    """Register ``run`` as subcommand ``name`` (see the module docstring)."""

    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = Command(
            name, help, example, arguments or (lambda p: None), run, model, out_default
        )
        return run

    return register


@dataclass
class Context:
    """What a run needs besides its options: the model (loaded once) and report defaults."""

    args: argparse.Namespace
    argv: Sequence[str]
    _model: "Model | None" = field(default=None, repr=False)

    @property
    def progress(self) -> bool:
        return not self.args.quiet

    @property
    def model(self) -> "Model":
        if self._model is None:
            from mechcna.models.loading import load_model

            with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints on load
                self._model = load_model(self.args.model, device=getattr(self.args, "device", None))
        return self._model

    @property
    def command_line(self) -> str:
        """The command as typed (shell-quoted, so it can be pasted back)."""
        return shlex.join(["mechcna", *self.argv])

    def report(self, title: str, intro: str = "", **extra: Any) -> "Report":
        """A report titled ``title`` with the model's provenance and the command line."""
        from mechcna.report.page import Provenance, Report

        line = self.command_line
        if getattr(self.args, "model", None) is not None:
            prov = Provenance.from_model(self.model, command=line, **extra)
        else:
            prov = Provenance(model="-", extra={"command": line, **extra})
        return Report(title, prov, intro=intro)


# ---------------------------------------------------------------------------- shared options
def add_prompts(p: argparse.ArgumentParser, targets: bool = True) -> None:
    """``--prompt`` (repeatable), ``--prompts-file`` and optionally ``--target``."""
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file",
        default=None,
        help="a file with one prompt per line, or 'prompt<TAB>target' lines",
    )
    if targets:
        p.add_argument(
            "--target",
            action="append",
            default=[],
            help="target token: one for all prompts or one per prompt (default: top-1)",
        )


def prompts_from(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The prompts and targets (``None``: each prompt's own top-1) the options name."""
    prompts = list(args.prompt)
    targets = list(getattr(args, "target", []) or [])
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {err}") from err
        rows = [line.split("\t") for line in lines if line.strip()]
        if not rows:
            raise UsageError(f"--prompts-file {args.prompts_file} has no prompts (it is empty)")
        prompts += [r[0] for r in rows]
        file_targets = [r[1] for r in rows if len(r) > 1]
        if file_targets and len(file_targets) != len(rows):
            raise UsageError("either every line of --prompts-file has a target or none does")
        targets += file_targets
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    if not targets:
        return prompts, None
    if len(targets) == 1:
        return prompts, targets * len(prompts)
    if len(targets) != len(prompts):
        raise UsageError(f"{len(targets)} targets for {len(prompts)} prompts")
    return prompts, targets


def pair(text: str, what: str = "LAYER.INDEX") -> tuple[int, int]:
    """``"3.1"`` or ``"3_1"`` -> ``(3, 1)``."""
    parts = text.replace("_", ".").split(".")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise UsageError(f"{text!r} is not {what}, e.g. 3.1")
    return int(parts[0]), int(parts[1])


def add_dataset(p: argparse.ArgumentParser, pairs: int = 20) -> None:
    """Options of an arithmetic dataset (ARITH section 3 templates)."""
    p.add_argument("--operations", nargs="+", default=["+", "-"], help="of + - * / (default + -)")
    p.add_argument("--digits", nargs="+", type=int, default=[1, 2],
                   help="operand digits (default 1 2)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=pairs,
                   help=f"operand pairs per cell (default {pairs})")  # fmt: skip
    p.add_argument(
        "--split",
        choices=["heldout", "train", "all"],
        default="heldout",
        help="operand pairs never trained on, trained on, or both (default heldout)",
    )


def dataset_from(args: argparse.Namespace, ctx: Context) -> Any:
    from mechcna.tasks.arithmetic import arithmetic_dataset

    return arithmetic_dataset(
        args.operations,
        args.digits,
        n_pairs=args.pairs,
        tokenizer=ctx.model.tokenizer,
        split=args.split,
        seed=0,
    )


def add_interventions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ablate-head", action="append", default=[], help="LAYER.HEAD to zero-ablate (repeatable)"
    )
    p.add_argument(
        "--zero-neuron", action="append", default=[], help="LAYER.NEURON to zero (repeatable)"
    )


def interventions_from(args: argparse.Namespace) -> list[Any]:
    from mechcna.interventions.edits import HeadAblation, NeuronEdit

    out: list[Any] = []
    if args.ablate_head:
        out.append(HeadAblation([pair(h, "LAYER.HEAD") for h in args.ablate_head]))
    if args.zero_neuron:
        out.append(NeuronEdit([pair(n, "LAYER.NEURON") for n in args.zero_neuron]))
    return out


def with_tokens(model: "Model", frame: "pd.DataFrame", prompt: str | None = None) -> "pd.DataFrame":
    """``frame`` (with ``layer`` and ``neuron`` columns) plus the tokens each FFN neuron
    promotes on ``prompt``, sign-aware (:func:`mechcna.analyses.tokens.frame_tokens`)."""
    from mechcna.analyses.tokens import frame_tokens

    return frame_tokens(model, frame, prompt=prompt)


def add_ray(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]`` and ``--workers N``: run the dataset-level work on a Ray cluster."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: join ADDRESS (default: RAY_ADDRESS) or start a local one "
        "(needs mechcna[distributed])",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray workers (a local cluster's CPUs); implies --ray",
    )


def ray_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Keyword arguments of the :mod:`mechcna.distributed` functions, or ``None`` without
    ``--ray``/``--workers``; connects to (or starts) the cluster."""
    if getattr(args, "ray", None) is None and getattr(args, "workers", None) is None:
        return None
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be positive")
    from mechcna import distributed

    distributed.connect(args.ray or None, num_cpus=args.workers)
    return {"workers": args.workers, "progress": not args.quiet}
