"""The bad-input table: every user mistake mechcna must answer with a clear error.

Each row is run for real; ``python -m tests.bad_inputs`` prints ``docs/errors.md`` from the
messages it gets, and ``tests/test_errors.py`` checks every row and that the page is current
(in a subprocess: under pytest the jaxtyping/beartype hook would catch wrongly typed
arguments before mechcna's own checks, which are what users meet).
"""

import copy
import json
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mechcna
from mechcna import errors as E
from tests.helpers import PROMPTS, build, gpt2_cfg


@dataclass(frozen=True)
class Case:
    name: str
    call: str  # the input, as a user would write it
    run: Callable[[], object]
    expect: type[Exception] | type[Warning]


_MODELS: dict[str, object] = {}


def model() -> Any:
    if "m" not in _MODELS:
        _MODELS["m"] = build("gpt2", dtype=torch.float64)
    return _MODELS["m"]


def _no_weights() -> object:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "no-weights"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        return mechcna.load_model(folder, device="cpu")


def _nan_model() -> object:
    m = copy.deepcopy(model())
    with torch.no_grad():
        m.W_E.fill_(float("nan"))  # type: ignore[union-attr]
    return mechcna.check_model(m)  # type: ignore[arg-type]


def _processed() -> object:
    m = copy.deepcopy(model())
    m.load_and_process_state_dict(m.state_dict())  # type: ignore[union-attr]
    return mechcna.head_importance(m, PROMPTS)  # type: ignore[arg-type]


def _user_hook() -> object:
    m = copy.deepcopy(model())
    m.blocks[0].hook_resid_mid.add_hook(lambda act, hook: act * 2)  # type: ignore[union-attr]
    return mechcna.layer_importance(m, PROMPTS)  # type: ignore[arg-type]


def _empty_dataset() -> object:
    ds = mechcna.arithmetic_dataset(n_pairs=1, digits=[1], operations=["+"]).filter(digits=3)
    return mechcna.evaluate_accuracy(model(), ds, progress=False)  # type: ignore[arg-type]


def _cna() -> Any:
    return mechcna.compare_neurons(model(), PROMPTS, mechcna.HeadAblation([(0, 0)]))  # type: ignore[arg-type]


def _checkpoint(damage: str) -> object:
    """A mechcna checkpoint folder whose weights are missing or truncated, loaded by the CLI."""
    from mechcna import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        folder = Path(save_checkpoint(build("llama"), Path(d) / "ckpt"))
        weights = folder / "model.safetensors"
        if damage == "missing":
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[:1000])
        return cli(["attribute", "--model", str(folder), "--prompt", "3+5=", "--quiet"])()


def _shipped() -> Any:
    if "shipped" not in _MODELS:
        _MODELS["shipped"] = mechcna.load_model("mechcna/arith-small", device="cpu")
    return _MODELS["shipped"]


def _bias_experiment(professions: list[str]) -> object:
    from mechcna.applications.bias import gender_bias_experiment

    return gender_bias_experiment(_shipped(), professions=professions, n_random=0)


def _empty_prompts_file() -> object:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "prompts.txt"
        path.write_text("\n")
        return cli(["attribute", "--prompts-file", str(path), "--quiet"])()


class CliError(E.MechcnaError):
    """What a CLI run that printed one clear ``mechcna: error:`` line is recorded as."""


def cli(argv: list[str]) -> Callable[[], object]:
    """Run ``mechcna ARGV`` in-process: it must exit with status 2 and print exactly one short
    ``mechcna: error: ...`` line (no traceback, no usage text), recorded as :class:`CliError`."""

    def run() -> object:
        import contextlib
        import io

        from mechcna.cli import main

        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code
        text = err.getvalue()
        lines = text.strip().splitlines()
        if code == 2 and len(lines) == 1 and lines[0].startswith("mechcna: error: "):
            if len(lines[0]) <= 400:
                raise CliError(lines[0].removeprefix("mechcna: error: "))
        shown = text if len(text) < 300 else f"{text[:300]}... ({len(text)} characters)"
        raise RuntimeError(f"exit status {code}, {len(lines)} lines on stderr: {shown}")

    return run


def _cases() -> list[Case]:
    m = model
    return [
        Case("dtype as text", 'load_model(cfg, dtype="float16")',
             lambda: mechcna.load_model(gpt2_cfg(), dtype="float16"),  # type: ignore[arg-type]
             E.DtypeError),
        Case("unknown dtype", 'load_model(cfg, dtype="float17")',
             lambda: mechcna.load_model(gpt2_cfg(), dtype="float17"),  # type: ignore[arg-type]
             E.DtypeError),
        Case("unknown device", 'load_model(cfg, device="gpu")',
             lambda: mechcna.load_model(gpt2_cfg(), device="gpu"), E.DeviceError),
        Case("unavailable device", 'load_model(cfg, device="cuda:99")',
             lambda: mechcna.load_model(gpt2_cfg(), device="cuda:99"), E.DeviceError),
        Case("checkpoint folder without weights", "load_model(folder_with_only_config_json)",
             _no_weights, E.MissingWeightsError),
        Case("k < 1", "neuron_importance(model, prompts).top(0)",
             lambda: mechcna.layer_importance(m(), PROMPTS).top(0), E.InvalidOptionError),
        Case("token id beyond the vocabulary", "layer_importance(model, torch.tensor([[1, 999]]))",
             lambda: mechcna.layer_importance(m(), torch.tensor([[1, 999]])), E.TokenIdError),
        Case("target given as a bool", "neuron_importance(model, prompts, True)",
             lambda: mechcna.neuron_importance(m(), PROMPTS, True),  # type: ignore[arg-type]
             E.TokenizationError),
        Case("target given as a float", "neuron_importance(model, prompts, 3.0)",
             lambda: mechcna.neuron_importance(m(), PROMPTS, 3.0),  # type: ignore[arg-type]
             E.TokenizationError),
        Case("non-string in a prompt list", 'layer_importance(model, ["12+7=", 3])',
             lambda: mechcna.layer_importance(m(), ["12+7=", 3]),  # type: ignore[list-item]
             E.PromptTypeError),
        Case("malformed head tuple", "HeadAblation([(0.7, 1.2)])",
             lambda: mechcna.HeadAblation([(0.7, 1.2)]),  # type: ignore[list-item]
             E.ComponentIndexError),
        Case("head given as one number", "head_sweep(model, prompts, heads=[3])",
             lambda: mechcna.head_sweep(m(), PROMPTS, heads=[3], progress=False),  # type: ignore[list-item]
             E.ComponentIndexError),
        Case("unknown method", 'neuron_importance(model, prompts, method="fast")',
             lambda: mechcna.neuron_importance(m(), PROMPTS, method="fast"),  # type: ignore[arg-type]
             E.InvalidOptionError),
        Case("k = 0 for query layers", "ffn_query_layers(model, prompts, k=0)",
             lambda: mechcna.ffn_query_layers(m(), PROMPTS, k=0), E.InvalidOptionError),
        Case("empty dataset", "evaluate_accuracy(model, dataset_with_no_cases)",
             _empty_dataset, E.EmptyInputError),
        Case("prompt word not in the vocabulary", 'layer_importance(model, ["the zebra is"])',
             lambda: mechcna.layer_importance(m(), ["the zebra is"]), E.UnknownTokenError),
        Case("empty prompt", 'layer_importance(model, [""])',
             lambda: mechcna.layer_importance(m(), [""]), E.EmptyPromptError),
        Case("negative layer index", "NeuronEdit([(-1, 0)]) in layer_importance",
             lambda: mechcna.layer_importance(
                 m(), PROMPTS, interventions=[mechcna.NeuronEdit([(-1, 0)])]),
             E.ComponentIndexError),
        Case("negative layer in a head sweep", "head_sweep(model, prompts, heads=[(-1, 0)])",
             lambda: mechcna.head_sweep(m(), PROMPTS, heads=[(-1, 0)], progress=False),
             E.ComponentIndexError),
        Case("neuron through an attention layer below its own",
             "transform_through_attention(model, (1, 3), [(0, None, 0)])",
             lambda: mechcna.transform_through_attention(m(), (1, 3), [(0, None, 0)]),
             E.PathOrderError),
        Case("intervention position outside a short prompt",
             "HeadAblation([(0, 0)], positions=[7]) on a 5-token prompt",
             lambda: mechcna.layer_importance(
                 m(), PROMPTS, interventions=[mechcna.HeadAblation([(0, 0)], positions=[7])]),
             E.PositionError),
        Case("NaN weights", "check_model(model_with_nan_embedding)", _nan_model,
             E.NonFiniteError),
        Case("processed weights where they change scores",
             "head_importance(HookedTransformer.from_pretrained(...), prompts)", _processed,
             E.WeightProcessingError),
        Case("user hook attached", "layer_importance(model_with_a_hook, prompts)", _user_hook,
             E.UserHookWarning),
        # issue 23: silent nonsense and raw Python errors
        Case("no interventions for M'", "compare_neurons(model, prompts, [])",
             lambda: mechcna.compare_neurons(m(), PROMPTS, []), E.EmptyInputError),
        Case("M' given as a string", 'compare_neurons(model, prompts, "head 0.0")',
             lambda: mechcna.compare_neurons(m(), PROMPTS, "head 0.0"),  # type: ignore[arg-type]
             E.InvalidOptionError),
        Case("M' is M", "compare_neurons(model, prompts, model)",
             lambda: mechcna.compare_neurons(m(), PROMPTS, m()), E.InvalidOptionError),  # type: ignore[arg-type]
        Case("scale without a value", 'NeuronEdit([(0, 1)], mode="scale")',
             lambda: mechcna.NeuronEdit([(0, 1)], mode="scale"), E.InvalidOptionError),
        Case("tolerance NaN", 'neuron_importance(model, prompts, tol=float("nan"))',
             lambda: mechcna.neuron_importance(m(), PROMPTS, tol=float("nan")),
             E.InvalidOptionError),
        Case("negative tolerance", "neuron_importance(model, prompts, tol=-1.0)",
             lambda: mechcna.neuron_importance(m(), PROMPTS, tol=-1.0), E.InvalidOptionError),
        Case("negative prompt index", "layer_importance(model, prompts).top(prompt=-1)",
             lambda: mechcna.layer_importance(m(), PROMPTS).top(prompt=-1),
             E.ComponentIndexError),
        Case("neuron given as a string", 'top_tokens(model, "3.266")',
             lambda: mechcna.top_tokens(m(), "3.266"),  # type: ignore[arg-type]
             E.InvalidOptionError),
        Case("processing given as text", 'load_model("mechcna/arith-small", processing="fold")',
             lambda: mechcna.load_model("mechcna/arith-small", processing="fold"),  # type: ignore[arg-type]
             E.InvalidOptionError),
        Case("no model", "load_model(None)",
             lambda: mechcna.load_model(None), E.ModelNotFoundError),  # type: ignore[arg-type]
        Case("negative zero-shot threshold", "hidden_interpretable_neurons(model, thresholds=[-1])",
             lambda: mechcna.hidden_interpretable_neurons(m(), thresholds=[-1]),
             E.InvalidOptionError),
        Case("K beyond the neurons", "mask_keep_table(model, prompts, cna, ks=[10**6])",
             lambda: mechcna.mask_keep_table(m(), PROMPTS, _cna(), ks=[10**6]),
             E.InvalidOptionError),
        Case("CLI: K = 0", "mechcna cna --prompt 3+5= --head 0.0 --mask-keep --ks 0",
             cli(["cna", "--prompt", "3+5=", "--head", "0.0", "--mask-keep", "--ks", "0"]),
             CliError),
        Case("CLI: K beyond the neurons",
             "mechcna cna --prompt 3+5= --head 0.0 --mask-keep --ks 99999",
             cli(["cna", "--prompt", "3+5=", "--head", "0.0", "--mask-keep", "--ks", "99999"]),
             CliError),
        Case("CLI: M' is M", "mechcna cna --prompt 3+5= --second-model mechcna/arith-small",
             cli(["cna", "--prompt", "3+5=", "--second-model", "mechcna/arith-small"]), CliError),
        Case("CLI: cases options with --prompt", "mechcna head-sweep --prompt 3+5= --operations +",
             cli(["head-sweep", "--prompt", "3+5=", "--operations", "+"]), CliError),
        Case("CLI: negative zero-shot threshold", "mechcna zero-shot --thresholds -1",
             cli(["zero-shot", "--thresholds", "-1"]), CliError),
        Case("CLI: LoRA rank 0", "mechcna lora --rank 0",
             cli(["lora", "--rank", "0"]), CliError),
        Case("CLI: negative pairs", "mechcna accuracy --pairs -3",
             cli(["accuracy", "--pairs", "-3"]), CliError),
        Case("CLI: zero threads", "mechcna train-arithmetic --threads 0",
             cli(["train-arithmetic", "--threads", "0"]), CliError),
        Case("CLI: checkpoint without model.safetensors", "mechcna attribute --model <checkpoint>",
             lambda: _checkpoint("missing"), CliError),
        Case("CLI: truncated model.safetensors", "mechcna attribute --model <checkpoint>",
             lambda: _checkpoint("truncated"), CliError),
        Case("CLI: unknown model name", "mechcna attribute --model gpt3-small --prompt 1",
             cli(["attribute", "--model", "gpt3-small", "--prompt", "1"]), CliError),
        Case("CLI: empty prompts file", "mechcna attribute --prompts-file empty.txt",
             _empty_prompts_file, CliError),
        Case("word not in the vocabulary", 'transform_through_attention(shipped, "zebra", ...)',
             lambda: mechcna.transform_through_attention(_shipped(), "zebra", [(2, None, 3)]),
             E.TokenizationError),
        Case("profession not in the vocabulary",
             'gender_bias_experiment(shipped, professions=["astronaut"])',
             lambda: _bias_experiment(["nurse", "astronaut"]), E.TokenizationError),
        Case("CLI: token not in the vocabulary",
             "mechcna transfer --token zebra --step 2:*:3 --prompt 3+5=",
             cli(["transfer", "--token", "zebra", "--step", "2:*:3", "--prompt", "3+5="]),
             CliError),
        Case("CLI: token of two tokens", "mechcna transfer --token 12 --step 2:*:3",
             cli(["transfer", "--token", "12", "--step", "2:*:3"]), CliError),
        Case("CLI: profession not in the vocabulary", "mechcna bias --profession astronaut",
             cli(["bias", "--profession", "astronaut"]), CliError),
    ]  # fmt: skip


CASES = _cases()


def outcome(case: Case) -> tuple[bool, str]:
    """(whether the case gave its clear error or warning, the message it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run()
        except Exception as err:  # the table records whatever happens
            ok = isinstance(err, case.expect) and isinstance(err, E.MechcnaError)
            return ok, f"{type(err).__name__}: {err}"
    for w in caught:
        if issubclass(w.category, case.expect):
            return True, f"{w.category.__name__} (warning, once per model): {w.message}"
    return False, "no error: ran and returned a result"


def _cell(text: str) -> str:
    text = re.sub(r"\S*/no-weights", "<dir>/no-weights", " ".join(text.split()))
    text = re.sub(r"/\S*/(ckpt|prompts\.txt)", r"<dir>/\1", text)
    return text.replace("|", "\\|")


def render() -> str:
    rows = [outcome(c) for c in CASES]
    bad = sum(not ok for ok, _ in rows)
    lines = [
        "# Bad input and the error it gets",
        "",
        "Every row was run for real (`python -m tests.bad_inputs > docs/errors.md`; "
        "`tests/test_errors.py` fails when this page is out of date). Each error is a "
        "`mechcna.errors.MechcnaError` subclass raised before any work.",
        "",
        "Rules: layers, heads and neurons are non-negative integers (`-1` is an error, not the "
        "last layer); intervention `positions` index each prompt's own real tokens (`-1` is its "
        "last token); dtypes are `torch.dtype` objects.",
        "",
        "| bad input | call | error |",
        "|---|---|---|",
    ]
    for case, (_, msg) in zip(CASES, rows, strict=True):
        lines.append(f"| {case.name} | `{case.call}` | {_cell(msg)} |")
    lines += [
        "",
        f"Bad inputs that still give anything but a clear error: **{bad}** of {len(CASES)}.",
        "",
        "`single_prompt_head_effects` and `head_sweep` on attention-only or parallel-attention "
        "models used to fail with `KeyError: 'blocks.1.hook_resid_mid'`; they now run and "
        "equal a hooked forward pass (tests/test_errors.py).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--json"]:
        print(json.dumps({"page": render(), "rows": {c.name: outcome(c) for c in CASES}}))
    else:
        print(render(), end="")
