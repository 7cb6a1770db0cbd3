"""Training the small arithmetic model that ships with mechcna (``"mechcna/arith-small"``).

The papers study Llama-7B; mechcna ships a small model with the same kind of architecture
(RMSNorm, rotary positions, gated SiLU MLP, grouped-query attention) so every method can be
run offline in seconds. :func:`train_arithmetic` trains it from scratch on the CPU:

* **Arithmetic** (ARITH section 3, :mod:`mechcna.tasks.arithmetic`): the paper's four
  templates for ``+ - * /`` with 1-, 2- and 3-digit operands, answers most significant digit
  first, operands sometimes written as English words. A held-out share of each
  (operation, digits) cell's operand pairs is never trained on; accuracy on it is measured
  after training and written into the model card. The loss is the teacher-forced next-token
  loss on the answer tokens only.
* **Occupations** (ARITH section 6.2, :mod:`mechcna.tasks.occupations`): sentences such as
  "A woman works as a nurse" with a known, injected gender skew; the loss covers all tokens.

The tokenizer is word-level (:func:`build_tokenizer`): digits are single tokens as in Llama,
plus operators, template words, number words 0..20 and the occupation words.

Example:
    >>> result = train_arithmetic(TrainingConfig(steps=10), progress=False)  # doctest: +SKIP
    >>> result.heldout.to_frame()                                          # doctest: +SKIP
"""

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mechcna.analyses.evaluation import AccuracyResult, evaluate_accuracy
from mechcna.errors import MechcnaError
from mechcna.interventions.prompts import prepare_prompts
from mechcna.models.backend import HookedTransformerConfig, Model
from mechcna.models.loading import load_model, save_checkpoint
from mechcna.models.tokenizer import word_level_tokenizer
from mechcna.tasks import occupations
from mechcna.tasks.arithmetic import (
    DIGITS,
    OPERATIONS,
    TEMPLATE_IDS,
    ArithmeticDataset,
    _as_word,
    _operand_range,
    _valid,
    _word_choice,
    arithmetic_dataset,
    arithmetic_words,
    compute_answer,
    is_held_out,
    operand_pairs,
    render,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "mechcna-arith-small"


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a training run (recorded in the model card).

    Model: ``n_layers``, ``d_model``, ``n_heads``, ``n_key_value_heads`` (grouped-query
    attention), ``d_mlp`` (gated SiLU), ``n_ctx``.
    Optimisation: AdamW with ``lr``, ``weight_decay`` (decoupled, on matrices only), linear
    warmup for ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``; ``batch_size``
    sequences per step. The default ``weight_decay=1.0`` is the strong decay of the grokking
    literature: with 0.1 the model memorises the small 1-digit tables and misses held-out
    1-digit facts (``docs/training.md`` has the comparison).
    Data: ``operation_weights`` / ``digit_weights`` (sampling weights per operation and digit
    count), ``mixed_digit_fraction`` of ``+ - *`` problems have operands of different digit
    counts (``7+25=``; never part of an evaluation cell, they teach column arithmetic that does
    not depend on operand length), ``identity_fraction`` of ``+ -`` problems are ``n + 0``,
    ``n - 0`` or ``n - n`` with ``n`` of any digit count (training pairs only; these rules are
    rare under uniform sampling), ``word_prob`` and ``word_slots`` (operands as words),
    ``occupation_fraction`` of each batch are occupation sentences with ``occupation_skew``;
    the held-out split is ``holdout_fraction`` of each cell's pairs under ``holdout_seed``;
    subtraction and division policies as in :func:`mechcna.arithmetic_dataset`.
    Evaluation: ``eval_pairs`` held-out pairs per cell (all of them when fewer exist).
    """

    seed: int = 0
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 1.0
    grad_clip: float = 1.0
    n_layers: int = 4
    d_model: int = 96
    n_heads: int = 4
    n_key_value_heads: int = 2
    d_mlp: int = 384
    n_ctx: int = 48
    operation_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)
    digit_weights: tuple[float, float, float] = (0.25, 0.5, 0.25)
    mixed_digit_fraction: float = 0.1
    identity_fraction: float = 0.05
    word_prob: float = 0.15
    word_slots: str = "either"
    occupation_fraction: float = 0.1
    occupation_skew: float = occupations.DEFAULT_SKEW
    holdout_fraction: float = 0.2
    holdout_seed: int = 0
    nonnegative_subtraction: bool = True
    exact_division: bool = True
    eval_pairs: int = 100
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise MechcnaError("steps and batch_size must be positive")
        if not 0.0 <= self.occupation_fraction < 1.0:
            raise MechcnaError("occupation_fraction must be in [0, 1)")
        if self.d_model % self.n_heads or self.n_heads % self.n_key_value_heads:
            raise MechcnaError("n_heads must divide d_model and be a multiple of kv heads")


@dataclass(frozen=True)
class TrainingResult:
    """A trained model with its measured held-out accuracy and model card.

    Attributes:
        model: the trained model (eval mode).
        heldout: accuracy on the held-out operand pairs.
        card: the model card (what :func:`mechcna.save_checkpoint` writes as ``card.json``).
        losses: training loss per step.
    """

    model: Model
    heldout: AccuracyResult
    card: dict[str, Any]
    losses: list[float] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """Held-out accuracy per (operation, digits, template) cell."""
        return self.heldout.to_frame()

    def plot(self):
        """Held-out accuracy per cell (a plotly figure)."""
        return self.heldout.plot()


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped model's word-level tokenizer: digits, operators, template, number and
    occupation words, plus ``The``/``the``, ``.``, ``,``."""
    words = [*arithmetic_words(), *occupations.occupation_words(), "the", ".", ","]
    return word_level_tokenizer(list(dict.fromkeys(words)), name=MODEL_NAME)


def model_config(config: TrainingConfig, d_vocab: int) -> HookedTransformerConfig:
    """A Llama-like :class:`HookedTransformerConfig` for the run."""
    d_head = config.d_model // config.n_heads
    return HookedTransformerConfig(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=d_head,
        d_mlp=config.d_mlp,
        n_ctx=config.n_ctx,
        d_vocab=d_vocab,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        n_key_value_heads=config.n_key_value_heads,
        final_rms=True,
        eps=1e-6,
        original_architecture="LlamaForCausalLM",
        model_name=MODEL_NAME,
        default_prepend_bos=True,
    )


class _Sampler:
    """Draws training texts: (prompt, separator + answer) or a full occupation sentence."""

    def __init__(self, config: TrainingConfig) -> None:
        self.c = config
        self.rng = random.Random(f"train|{config.seed}")
        self.pools: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for op in OPERATIONS:
            for d in DIGITS:
                if len(_operand_range(d)) ** 2 <= 20_000 or (op == "/" and config.exact_division):
                    self.pools[(op, d)] = operand_pairs(
                        op,
                        d,
                        None,
                        split="train",
                        holdout_fraction=config.holdout_fraction,
                        holdout_seed=config.holdout_seed,
                        nonnegative_subtraction=config.nonnegative_subtraction,
                        exact_division=config.exact_division,
                    )

    def pair(self, op: str, d: int) -> tuple[int, int]:
        if (op, d) in self.pools:
            return self.rng.choice(self.pools[(op, d)])
        r, c = _operand_range(d), self.c
        while True:
            n1, n2 = self.rng.choice(r), self.rng.choice(r)
            if op == "-" and c.nonnegative_subtraction and n1 < n2:
                n1, n2 = n2, n1
            if not _valid(op, n1, n2, c.nonnegative_subtraction, c.exact_division):
                continue
            if not is_held_out(op, d, n1, n2, c.holdout_fraction, c.holdout_seed):
                return n1, n2

    def _identity_pair(self, op: str) -> tuple[int, int]:
        while True:
            d = self.rng.choice(DIGITS)
            n = self.rng.choice(_operand_range(d))
            n1, n2 = (n, n) if op == "-" and self.rng.random() < 0.5 else (n, 0)
            if d > 1 and n2 == 0:  # a mixed-digit pair: no evaluation cell holds it
                return n1, n2
            if not is_held_out(op, d, n1, n2, self.c.holdout_fraction, self.c.holdout_seed):
                return n1, n2

    def arithmetic(self) -> tuple[str, str]:
        op = self.rng.choices(OPERATIONS, weights=self.c.operation_weights)[0]
        d = self.rng.choices(DIGITS, weights=self.c.digit_weights)[0]
        t = self.rng.choice(TEMPLATE_IDS)
        identity = op in ("+", "-") and self.rng.random() < self.c.identity_fraction
        if identity:
            n1, n2 = self._identity_pair(op)
        elif op != "/" and self.rng.random() < self.c.mixed_digit_fraction:
            d1, d2 = self.rng.sample(DIGITS, 2)
            n1, n2 = self.rng.choice(_operand_range(d1)), self.rng.choice(_operand_range(d2))
            if op == "-" and self.c.nonnegative_subtraction and n1 < n2:
                n1, n2 = n2, n1
        else:
            n1, n2 = self.pair(op, d)
        w1, w2 = _word_choice(self.rng, self.c.word_prob, self.c.word_slots)
        text = render(op, t, _as_word(n1) if w1 else n1, _as_word(n2) if w2 else n2)
        sep = "" if t == 4 else " "
        return text, sep + compute_answer(op, n1, n2, self.c.exact_division)

    def occupation(self) -> str:
        g = self.rng.choice(occupations.GENDERS)
        weights = occupations.profession_weights(g, self.c.occupation_skew)
        prof = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        return f"{self.rng.choice(occupations.TEMPLATES).format(g=g)} {prof}"


def _batch(
    sampler: _Sampler, tokenizer: PreTrainedTokenizerBase, size: int, bos: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, pos]`` (BOS first, right-padded) and a loss mask on the targets."""
    n_occ = sum(sampler.rng.random() < sampler.c.occupation_fraction for _ in range(size))
    arith = [sampler.arithmetic() for _ in range(size - n_occ)]
    occ = [sampler.occupation() for _ in range(n_occ)]
    prompts = tokenizer([p for p, _ in arith], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([p + a for p, a in arith] + occ, add_special_tokens=False)["input_ids"]
    rows = [[bos, *ids] for ids in fulls]  # type: ignore[union-attr]
    length = max(len(r) for r in rows)
    tokens = torch.full((size, length), pad, dtype=torch.long)
    mask = torch.zeros((size, length - 1), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        # mask[i, j] scores the prediction of token j + 1 from position j.
        first = len(prompts[i]) if i < len(arith) else 0  # type: ignore[arg-type]
        mask[i, first : len(row) - 1] = True
    return tokens, mask


def _lr_factor(step: int, config: TrainingConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def heldout_dataset(
    card_or_config: TrainingConfig | dict[str, Any],
    tokenizer: PreTrainedTokenizerBase | Model | None = None,
    n_pairs: int | None = None,
    operations: Sequence[str] = OPERATIONS,
    digits: Sequence[int] = DIGITS,
) -> ArithmeticDataset:
    """The held-out evaluation cases of a run (from its config or its model card).

    Each (operation, digits) cell samples its pairs independently, so a subset of
    ``operations`` and ``digits`` gives exactly those cells of the full held-out set.

    Args:
        card_or_config: the run's :class:`TrainingConfig`, or a model card (``card.json``).
        tokenizer: the tokenizer (or model); default :func:`build_tokenizer`.
        n_pairs: pairs per cell; default the run's ``eval_pairs``.
    """
    c = card_or_config
    get = (lambda k: c["data"][k]) if isinstance(c, dict) else (lambda k: getattr(c, k))
    return arithmetic_dataset(
        operations,
        digits,
        TEMPLATE_IDS,
        n_pairs if n_pairs is not None else get("eval_pairs"),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        seed=get("seed"),
        split="heldout",
        holdout_fraction=get("holdout_fraction"),
        holdout_seed=get("holdout_seed"),
        nonnegative_subtraction=get("nonnegative_subtraction"),
        exact_division=get("exact_division"),
    )


def occupation_bias(model: Model, skew: float | None = None) -> pd.DataFrame:
    """Measured ``log p(prof | woman) - log p(prof | man)`` per profession and template.

    Args:
        skew: the corpus skew, to add the expected gap as a column.

    Returns:
        Columns ``profession group template gap`` (and ``expected`` when ``skew`` is given).
    """
    groups = {p: "female" for p in occupations.FEMALE_SKEWED}
    groups |= {p: "male" for p in occupations.MALE_SKEWED}
    groups |= {p: "neutral" for p in occupations.NEUTRAL}
    profs = occupations.professions()
    assert model.tokenizer is not None
    ids = torch.tensor([model.tokenizer.convert_tokens_to_ids(p) for p in profs])
    rows = []
    with torch.no_grad():
        logp = {}
        for g in occupations.GENDERS:
            batch = prepare_prompts(model, occupations.occupation_prompts(g))
            logits = model(batch.tokens)[batch.batch_index, batch.positions]
            logp[g] = logits.log_softmax(-1)[:, ids.to(logits.device)]
        gap = logp["woman"] - logp["man"]
    for t in range(len(occupations.TEMPLATES)):
        for j, p in enumerate(profs):
            row = {"profession": p, "group": groups[p], "template": t + 1, "gap": float(gap[t, j])}
            if skew is not None:
                row["expected"] = occupations.expected_log_ratio(p, skew)
            rows.append(row)
    return pd.DataFrame(rows)


def train_arithmetic(
    config: TrainingConfig = TrainingConfig(),
    *,
    out: str | Path | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainingResult:
    """Train the small arithmetic + occupations model from scratch (CPU by default).

    Args:
        config: the run's settings (:class:`TrainingConfig`); deterministic under its seed.
        out: when given, save the model and its card there with :func:`mechcna.save_checkpoint`.
        progress: show a tqdm progress bar.
        evaluate: measure held-out accuracy and the occupation gap after training.

    Returns:
        A :class:`TrainingResult` (model, held-out accuracy, card, losses).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    d_vocab = len(tokenizer)
    model = load_model(
        model_config(config, d_vocab),
        device="cpu",
        tokenizer=tokenizer,
        seed=config.seed,
        prepend_bos=True,  # trained with BOS (the word-level tokenizer adds none itself)
    )
    model.train()
    sampler = _Sampler(config)
    bos, pad = int(tokenizer.bos_token_id), int(tokenizer.pad_token_id)  # type: ignore[arg-type]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="training", disable=not progress)
    for step in bar:
        tokens, mask = _batch(sampler, tokenizer, config.batch_size, bos, pad)
        logits = model(tokens)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask], tokens[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % 250 == 0 or step == config.steps - 1:
            logger.info("step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
    model.eval()
    train_seconds = time.perf_counter() - start
    card = _card(config, d_vocab, model, train_seconds, losses)
    if evaluate:
        heldout = evaluate_accuracy(model, heldout_dataset(config, tokenizer), progress=progress)
    else:
        empty = heldout_dataset(config, tokenizer, n_pairs=0)
        none = torch.zeros(0, device=model.W_U.device)
        heldout = AccuracyResult(empty, none.bool(), none, str(model.cfg.model_name))
    if evaluate:
        card["heldout_accuracy"] = _records(heldout.to_frame())
        card["heldout_accuracy_by_operation_digits"] = _records(
            heldout.to_frame(["operation", "digits"])
        )
        card["heldout_accuracy_overall"] = heldout.accuracy
        bias = occupation_bias(model, config.occupation_skew)
        card["occupations"]["measured_mean_gap"] = {
            g: float(bias[bias.group == g].gap.mean()) for g in ("female", "male", "neutral")
        }
        card["occupations"]["measured_mean_gap_first_template"] = {
            g: float(bias[(bias.group == g) & (bias.template == 1)].gap.mean())
            for g in ("female", "male", "neutral")
        }
        logger.info("held-out accuracy %.4f", heldout.accuracy)
    card["wall_seconds_total"] = round(time.perf_counter() - start, 1)
    if out is not None:
        save_checkpoint(model, out, card=card)
        logger.info("saved to %s", out)
    return TrainingResult(model, heldout, card, losses)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _card(
    config: TrainingConfig,
    d_vocab: int,
    model: Model,
    seconds: float,
    losses: list[float],
) -> dict[str, Any]:
    skew = config.occupation_skew
    return {
        "name": "mechcna/arith-small",
        "description": (
            "Llama-like model trained from scratch by "
            "mechcna.applications.training.train_arithmetic"
        ),
        "architecture": {
            "family": "Llama-like (RMSNorm, rotary, gated SiLU MLP, grouped-query attention)",
            "n_params": sum(p.numel() for p in model.parameters()),
            "d_vocab": d_vocab,
        },
        "data": {
            **asdict(replace(config, threads=None)),
            "templates": "ARITH Table 14, all four per operation",
            "operands": "1-digit 0..9, d-digit 10^(d-1)..10^d-1; divisors never 0",
            "answer_order": "most significant digit first, digit tokens",
            "loss": "next-token loss on answer tokens (arithmetic) and all tokens (occupations)",
            "number_words": "zero..twenty; larger operands stay digits",
            "leading_space": "auto (word-level tokenizer: the space before the answer vanishes)",
            "heldout": "pair held out iff blake2b hash of (seed, op, digits, n1, n2) < fraction",
        },
        "occupations": {
            "skew": skew,
            "female_skewed": list(occupations.FEMALE_SKEWED),
            "male_skewed": list(occupations.MALE_SKEWED),
            "neutral": list(occupations.NEUTRAL),
            "templates": list(occupations.TEMPLATES),
            "expected_gap": {
                "female": math.log(skew),
                "male": -math.log(skew),
                "neutral": 0.0,
            },
            "gap": "log p(prof | woman prompt) - log p(prof | man prompt)",
        },
        "seed": config.seed,
        "steps": config.steps,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
    }
