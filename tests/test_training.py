"""Training smoke tests: a few steps on a tiny config, deterministic under a seed."""

import json

import pytest
import torch

import mechcna
from mechcna.applications.training import (
    TrainingConfig,
    build_tokenizer,
    heldout_dataset,
    occupation_bias,
    train_arithmetic,
)
from mechcna.cli import main
from mechcna.errors import MechcnaError
from mechcna.tasks import occupations

TINY = dict(
    steps=3,
    batch_size=8,
    warmup_steps=1,
    n_layers=1,
    d_model=16,
    n_heads=2,
    n_key_value_heads=1,
    d_mlp=32,
    eval_pairs=1,
)


def test_training_is_deterministic_and_saves(tmp_path):
    config = TrainingConfig(seed=3, **TINY)
    a = train_arithmetic(config, out=tmp_path / "a", progress=False)
    b = train_arithmetic(config, progress=False, evaluate=False)
    assert a.losses == b.losses and all(torch.isfinite(torch.tensor(a.losses)))
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name
    c = train_arithmetic(TrainingConfig(seed=4, **TINY), progress=False, evaluate=False)
    assert c.losses != a.losses

    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["seed"] == 3 and card["steps"] == 3
    assert card["data"]["holdout_fraction"] == config.holdout_fraction
    assert {r["operation"] for r in card["heldout_accuracy"]} == {"+", "-", "*", "/"}
    assert set(card["occupations"]["measured_mean_gap"]) == {"female", "male", "neutral"}
    assert "train_seconds" in card
    loaded = mechcna.load_model(tmp_path / "a", device="cpu")
    tokens = loaded.to_tokens(["3+5=", "A woman works as a"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), a.model(tokens))
    again = mechcna.evaluate_accuracy(loaded, heldout_dataset(card, loaded), progress=False)
    assert again.accuracy == pytest.approx(card["heldout_accuracy_overall"], abs=1e-6)


def test_tokenizer_covers_templates_and_occupations():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    texts = [*occupations.occupation_prompts("woman"), "Q: What is seventeen plus 20? A: 37"]
    texts += [f"{p} {prof}" for p in occupations.occupation_prompts("man") for prof in
              occupations.professions()]  # fmt: skip
    for text in texts:
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"]) == [
        "1",
        "2",
        "3",
    ]


def test_occupation_corpus_skew():
    corpus = occupations.occupation_corpus(4000, seed=0, skew=4.0)
    women = sum(s.gender == "woman" and s.profession == "nurse" for s in corpus)
    men = sum(s.gender == "man" and s.profession == "nurse" for s in corpus)
    assert 2.5 < women / max(men, 1) < 6.5
    assert occupations.expected_log_ratio("nurse") == pytest.approx(torch.log(torch.tensor(4.0)))
    assert occupations.expected_log_ratio("teacher") == pytest.approx(0.0)
    with pytest.raises(MechcnaError):
        occupations.profession_weights("robot")


def test_occupation_bias_frame():
    result = train_arithmetic(TrainingConfig(**TINY), progress=False, evaluate=False)
    bias = occupation_bias(result.model, skew=4.0)
    assert set(bias.columns) == {"profession", "group", "template", "gap", "expected"}
    assert len(bias) == len(occupations.professions()) * len(occupations.TEMPLATES)


def test_bad_config():
    with pytest.raises(MechcnaError):
        TrainingConfig(steps=0)
    with pytest.raises(MechcnaError):
        TrainingConfig(n_heads=3)


def test_cli_train_arithmetic(tmp_path, capsys):
    args = ["train-arithmetic", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4"]
    args += ["--weight-decay", "0.5", "--holdout-seed", "2"]
    assert main([*args, "--eval-pairs", "1", "--quiet"]) == 0
    assert (tmp_path / "card.json").is_file() and (tmp_path / "model.safetensors").is_file()
    data = json.loads((tmp_path / "card.json").read_text())["data"]
    assert (data["weight_decay"], data["holdout_seed"], data["steps"]) == (0.5, 2, 2)
    out = capsys.readouterr().out
    assert "accuracy" in out and (tmp_path / "index.html").is_file()
