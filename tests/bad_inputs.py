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


def model():
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
