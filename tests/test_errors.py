"""Every bad input gets a clear MechcnaError subclass (issue 13); docs/errors.md is current.

The table of cases lives in ``tests/bad_inputs.py`` (``python -m tests.bad_inputs`` writes
``docs/errors.md``).
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mechcna
from mechcna.errors import UserHookWarning
from tests.bad_inputs import CASES
from tests.helpers import PROMPTS, build, gpt2_cfg, tokenizer

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def table():
    """The table run as users run it: a plain interpreter, no runtime type-checking hook."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.bad_inputs", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_error(table, case):
    ok, message = table["rows"][case.name]
    assert ok, f"{case.call}: {message}"


def test_errors_page_is_current(table):
    page = (ROOT / "docs" / "errors.md").read_text()
    assert page == table["page"], "regenerate: python -m tests.bad_inputs > docs/errors.md"
    assert "anything but a clear error: **0**" in page


def test_user_hook_warns_once_per_model():
    model = build("gpt2", dtype=torch.float64)
    model.blocks[0].hook_resid_mid.add_hook(lambda act, hook: act * 2)
    with pytest.warns(UserHookWarning, match="telescope"):
        mechcna.layer_importance(model, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechcna.layer_importance(model, PROMPTS)  # not a second time
    clean = build("gpt2", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechcna.layer_importance(clean, PROMPTS)  # no hook, no warning


@pytest.mark.parametrize("flag", ["attn_only", "parallel_attn_mlp"])
def test_head_effects_on_attention_only_and_parallel_models(flag):
    model = mechcna.load_model(
        gpt2_cfg(**{flag: True}), device="cpu", dtype=torch.float64, tokenizer=tokenizer(), seed=0
    )
    effects = mechcna.single_prompt_head_effects(model, PROMPTS[0])
    with torch.no_grad():
        target = int(model(PROMPTS[0])[0, -1].argmax())
        for i, (l, h) in enumerate(effects.heads):

            def ablate(z, hook, h=h):
                z[:, :, h] = 0
                return z

            logits = model.run_with_hooks(
                PROMPTS[0], fwd_hooks=[(f"blocks.{l}.attn.hook_z", ablate)]
            )
            expect = logits[0, -1].log_softmax(-1)[target]
            torch.testing.assert_close(effects.logprob[i], expect, atol=1e-10, rtol=0)


def test_unknown_word_error_names_the_word():
    """The error names the words the vocabulary lacks, not only the ones it knows."""
    from mechcna.errors import UnknownTokenError
    from tests.bad_inputs import model

    with pytest.raises(UnknownTokenError, match="outside the vocabulary: 'zebra' "):
        mechcna.layer_importance(model(), ["the zebra is"])
