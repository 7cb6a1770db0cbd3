"""The shipped model: loads offline, and its held-out accuracy matches its card and targets."""

import json
from dataclasses import asdict

import pytest

import mechcna
from mechcna.applications.training import TrainingConfig, heldout_dataset
from mechcna.models.loading import CHECKPOINT_DIR, SHIPPED_MODELS

PATH = CHECKPOINT_DIR / SHIPPED_MODELS["mechcna/arith-small"]
# Held-out accuracy targets (issue 4): 95% on 1-digit, 90% on 2-digit + and -.
TARGETS = {("+", 1): 0.95, ("+", 2): 0.90, ("-", 1): 0.95, ("-", 2): 0.90}


@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


@pytest.fixture(scope="module")
def card():
    return json.loads((PATH / "card.json").read_text())


def test_files_are_small_and_present():
    sizes = {p.name: p.stat().st_size for p in PATH.iterdir()}
    assert {"mechcna.json", "model.safetensors", "tokenizer.json", "card.json"} <= set(sizes)
    assert sum(sizes.values()) < 8 * 2**20


def test_architecture_is_llama_like(shipped):
    cfg = shipped.cfg
    assert cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.act_fn == "silu"
    assert cfg.positional_embedding_type == "rotary"
    assert cfg.n_key_value_heads is not None and cfg.n_key_value_heads < cfg.n_heads


def test_heldout_accuracy_matches_card_and_targets(shipped, card):
    # Every cell of the card (4 operations x 3 digit counts, and per template) is re-measured.
    result = mechcna.evaluate_accuracy(shipped, heldout_dataset(card, shipped), progress=False)
    for by, key in (
        (["operation", "digits"], "heldout_accuracy_by_operation_digits"),
        (["operation", "digits", "template"], "heldout_accuracy"),
    ):
        measured = result.to_frame(by).set_index(by)
        recorded = {tuple(r[c] for c in by): r for r in card[key]}
        assert set(recorded) == set(measured.index), key
        for cell, row in measured.iterrows():
            rec = recorded[cell]  # type: ignore[index]
            assert row["n"] == rec["n"], cell
            assert row["accuracy"] == pytest.approx(rec["accuracy"], abs=0.01), cell
    by_cell = result.to_frame(["operation", "digits"]).set_index(["operation", "digits"])
    for (op, digits), target in TARGETS.items():
        assert by_cell.loc[(op, digits), "accuracy"] >= target, (op, digits)


def test_card_is_the_default_recipe(card):
    # `mechcna train-arithmetic --threads 1` retrains the shipped model: its recipe is the default.
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in card["data"].items()}
    defaults = asdict(TrainingConfig())
    for key in defaults.keys() - {"threads"}:
        assert recorded[key] == defaults[key], key


def test_card_records_the_recipe(card):
    assert card["seed"] == card["data"]["seed"]
    assert card["steps"] > 0 and card["train_seconds"] > 0
    assert len(card["heldout_accuracy"]) == 4 * 3 * 4
    occ = card["occupations"]
    assert occ["measured_mean_gap"]["female"] > 0.5 > -0.5 > occ["measured_mean_gap"]["male"]


def test_gender_skew_is_learned(shipped):
    from mechcna.applications.training import occupation_bias

    bias = occupation_bias(shipped, skew=4.0)
    first = bias[bias.template == 1].set_index("profession").gap
    assert first["nurse"] > 0.5 and first["driver"] < -0.5
