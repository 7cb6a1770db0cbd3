"""Benchmark: mechcna.head_sweep against the papers' approach (a deep copy per head).

The papers' code ablates head ``l_h`` by deep-copying the model, zeroing its ``W_O[l][h]``
slice, and running every prompt one at a time. This script times that baseline on a subset of
heads and cases and scales it linearly to all heads and cases (deep-copy time per head, plus
forward time per head and case, both measured), times :func:`mechcna.head_sweep` on all heads
and cases, checks that both give identical predictions and accuracies on the subset and the
largest log-prob difference, and prints the speed ratio.

Run on demand (not in CI)::

    .venv/bin/python benchmarks/head_sweep.py                 # shipped model if present
    .venv/bin/python benchmarks/head_sweep.py --model random  # random Llama-like model
"""

import argparse
import copy
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechcna

WORDS = (
    "the sum of and is what plus minus times divides difference between product ratio Q A".split()
    + list("0123456789")
    + ["+", "-", "*", "/", "=", "?", ":"]
)
TEMPLATES = ("{a}+{b}=", "the sum of {a} and {b} is", "Q : what is {a} plus {b} ? A :", "{a}-{b}=")


def random_model(args) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        d_head=args.d_model // args.heads,
        d_mlp=4 * args.d_model,
        n_ctx=64,
        d_vocab=len(WORDS) + 4,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=args.d_model // args.heads,
        gated_mlp=True,
        n_key_value_heads=args.heads // 2,
        original_architecture="LlamaForCausalLM",
        model_name="random-llama",
    )
    tok = mechcna.word_level_tokenizer(WORDS)
    return mechcna.load_model(cfg, device="cpu", seed=args.seed, tokenizer=tok)


def random_cases(
    n: int, seed: int, templates: str = "all"
) -> tuple[list[str], list[str], pd.DataFrame]:
    rng = random.Random(seed)
    prompts, targets, rows = [], [], []
    for i in range(n):
        t = i % len(TEMPLATES) if templates == "all" else 0
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        op = "-" if TEMPLATES[t].startswith("{a}-") else "+"
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        prompts.append(TEMPLATES[t].format(a=a, b=b))
        targets.append(str(answer)[0])
        rows.append({"operation": op, "digits": 2, "template": t})
    return prompts, targets, pd.DataFrame(rows)


def shipped(n: int):
    """The shipped arithmetic model and dataset, when the package has them."""
    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    data = mechcna.arithmetic_dataset(
        ["+", "-", "*", "/"], [1, 2], n_pairs=100, tokenizer=model.tokenizer, split="heldout"
    )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].tolist()
    prompts = [data.prompts[i] for i in order]
    targets = [data.targets[i] for i in order]
    labels = data.to_frame().iloc[order].reset_index(drop=True)
    return model, prompts, targets, labels


def baseline(model, prompts, target_ids, heads):
    """The papers' approach on ``heads``: deep copy, zero W_O[l][h], prompts one by one."""
    tokens = [model.to_tokens(p)[0] for p in prompts]
    copy_time = fwd_time = 0.0
    logprob = torch.empty(len(heads), len(prompts), dtype=torch.float64)
    pred = torch.empty(len(heads), len(prompts), dtype=torch.long)
    with torch.no_grad():
        for i, (l, h) in enumerate(heads):
            t0 = time.perf_counter()
            ablated = copy.deepcopy(model)
            ablated.blocks[l].attn.W_O[h] = 0.0
            t1 = time.perf_counter()
            for j, t in enumerate(tokens):
                lp = ablated(t[None])[0, -1].log_softmax(-1)
                logprob[i, j] = float(lp[target_ids[j]])
                pred[i, j] = int(lp.argmax())
            t2 = time.perf_counter()
            copy_time += t1 - t0
            fwd_time += t2 - t1
            del ablated
    return logprob, pred, copy_time / len(heads), fwd_time / (len(heads) * len(prompts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="shipped", help="'shipped' (default) or 'random'")
    p.add_argument("--cases", type=int, default=512)
    p.add_argument("--baseline-heads", type=int, default=6, help="heads timed for the baseline")
    p.add_argument("--baseline-cases", type=int, default=64, help="cases timed for the baseline")
    p.add_argument(
        "--templates",
        choices=["all", "last"],
        default="all",
        help="random cases: 4 templates of 7 to 14 tokens, or only 'n1+n2=' (the papers' "
        "appendix E tables)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--heads-per-pass", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="random model: layers")
    p.add_argument("--heads", type=int, default=8, help="random model: heads per layer")
    p.add_argument("--d-model", type=int, default=128, help="random model: d_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 is robust on a shared, busy machine",
    )
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "shipped":
        try:
            model, prompts, targets, labels = shipped(args.cases)
            source = "mechcna/arith-small with mechcna.arithmetic_dataset"
        except (FileNotFoundError, RuntimeError, mechcna.MechcnaError) as err:
            print(f"shipped model/dataset unavailable ({err}); using --model random")
            args.model = "random"
    if args.model == "random":
        model = random_model(args)
        prompts, targets, labels = random_cases(args.cases, args.seed, args.templates)
        source = f"random Llama-like model (seed {args.seed}), {args.templates} templates"
    elif args.model != "shipped":
        model = mechcna.load_model(args.model, device="cpu")
        prompts, targets, labels = random_cases(args.cases, args.seed, args.templates)
        source = f"{args.model}, {args.templates} templates"
    cfg = model.cfg
    n_all = cfg.n_layers * cfg.n_heads
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}")
    print(
        f"  {cfg.n_layers} layers x {cfg.n_heads} heads = {n_all} heads, d_model {cfg.d_model}, "
        f"{n_params / 1e6:.2f}M parameters, {cfg.dtype}"
    )
    print(
        f"cases: {len(prompts)}; torch threads: {torch.get_num_threads()}; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {os.getloadavg()[0]:.1f}; "
        f"{time.strftime('%Y-%m-%d')}"
    )

    t0 = time.perf_counter()
    sweep = mechcna.head_sweep(
        model,
        prompts,
        targets,
        labels=labels,
        batch_size=args.batch_size,
        heads_per_pass=args.heads_per_pass,
        progress=False,
    )
    fast = time.perf_counter() - t0
    print(
        f"fast head_sweep: {fast:.2f} s for {n_all} heads x {len(prompts)} cases "
        f"(batch {args.batch_size}, {args.heads_per_pass} heads per pass)"
    )

    rng = random.Random(args.seed)
    sub_heads = sorted(rng.sample(sweep.heads, min(args.baseline_heads, n_all)))
    sub_cases = sorted(rng.sample(range(len(prompts)), min(args.baseline_cases, len(prompts))))
    ids = sweep.targets
    lp, pred, per_copy, per_fwd = baseline(
        model, [prompts[j] for j in sub_cases], [int(ids[j]) for j in sub_cases], sub_heads
    )
    rows = [sweep.heads.index(hd) for hd in sub_heads]
    fast_lp = sweep.logprob[rows][:, sub_cases].double()
    fast_pred = sweep.prediction[rows][:, sub_cases]
    max_diff = float((fast_lp - lp).abs().max())
    same_pred = bool(torch.equal(fast_pred, pred))
    acc_fast = (fast_pred == ids[sub_cases][None]).double().mean(1)
    acc_base = (pred == ids[sub_cases][None]).double().mean(1)
    same_acc = bool(torch.equal(acc_fast, acc_base))
    scaled = n_all * (per_copy + len(prompts) * per_fwd)
    print(
        f"baseline (deepcopy per head, W_O[l][h] = 0, prompts one by one): timed on "
        f"{len(sub_heads)} heads x {len(sub_cases)} cases: {per_copy * 1e3:.1f} ms per deep "
        f"copy, {per_fwd * 1e3:.2f} ms per forward"
    )
    print(
        f"baseline scaled linearly to {n_all} heads x {len(prompts)} cases: "
        f"{n_all} x ({per_copy:.4f} + {len(prompts)} x {per_fwd:.5f}) s = {scaled:.1f} s"
    )
    print(
        f"check on the timed subset: identical predictions {same_pred}, identical accuracies "
        f"{same_acc}, max |log-prob diff| {max_diff:.2e}"
    )
    print(f"speed-up: {scaled / fast:.1f}x")
    print(f"baseline accuracy (all cases): {float(sweep.base_correct.double().mean()):.3f}")
    print(sweep.top(5).to_string(index=False))
    ok = same_pred and same_acc and max_diff < (1e-4 if cfg.dtype == torch.float32 else 1e-9)
    if not ok:
        print("MISMATCH between the fast sweep and the baseline")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
