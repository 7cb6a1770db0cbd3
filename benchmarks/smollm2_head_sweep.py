"""Benchmark on SmolLM2-135M: ``head_sweep`` over all 270 heads against batched hooks.

The baseline is what a TransformerLens user writes: for each head, one batched
``run_with_hooks`` over the whole (right-padded) dataset with a hook on
``blocks.{l}.attn.hook_z`` zeroing that head, reading each prompt's logits at its last real
token. It is timed on ``--baseline-heads`` heads spread over the layers and scaled to all
heads (the script says so); on those heads predictions and accuracies are compared with
``head_sweep``'s. ``head_sweep`` is also timed with ``share_prefixes=False``; ``--shots N``
puts the reproduction's few-shot prefix (N solved problems) before every prompt. One torch
thread by default. Run under the shared lock::

    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/smollm2_head_sweep.py
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402

from mechcna import head_sweep  # noqa: E402
from mechcna.interventions.prompts import prepare_prompts, single_token_ids  # noqa: E402
from mechcna.reproduce.arithmetic import apply_prompt_form  # noqa: E402
from mechcna.tasks.arithmetic import arithmetic_dataset  # noqa: E402


@torch.no_grad()
def baseline(model, tokens, positions, target, heads):
    """One batched run_with_hooks per head; returns per-head correctness and log-probs."""
    rows = torch.arange(len(positions))
    correct, logprob = [], []
    for l, h in heads:

        def zero(z, hook, h=h):
            z[:, :, h] = 0.0
            return z

        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero)])
        last = logits[rows, positions].log_softmax(-1)
        correct.append(last.argmax(-1) == target)
        logprob.append(last[rows, target])
    return torch.stack(correct), torch.stack(logprob)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", type=int, default=64)
    ap.add_argument("--baseline-heads", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--heads-per-pass", type=int, default=8)
    ap.add_argument("--shots", type=int, default=0, help="few-shot prefix of N solved problems")
    ap.add_argument("--no-unshared", action="store_true", help="skip share_prefixes=False")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads} load {os.getloadavg()}", flush=True)
    model = load_smollm2()
    data = arithmetic_dataset("+", 1, templates=1, n_pairs=None, tokenizer=model)
    if args.shots:
        data = apply_prompt_form(data, "few-shot", shots=args.shots)
    prompts = list(data.prompts)[: args.cases]
    targets = list(data.targets)[: args.cases]
    batch = prepare_prompts(model, prompts)
    target = single_token_ids(model, targets, len(prompts))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    step = max(1, len(all_heads) // args.baseline_heads)
    timed = all_heads[::step][: args.baseline_heads]

    t, c = time.perf_counter(), time.process_time()
    sweep = head_sweep(model, prompts, targets, batch_size=args.batch_size,
                       heads_per_pass=args.heads_per_pass, progress=False)  # fmt: skip
    fast_s, fast_c = time.perf_counter() - t, time.process_time() - c
    print(f"head_sweep: wall {fast_s:.1f} s, cpu {fast_c:.1f} s", flush=True)
    if not args.no_unshared:
        t = time.perf_counter()
        plain = head_sweep(model, prompts, targets, batch_size=args.batch_size,
                           heads_per_pass=args.heads_per_pass, share_prefixes=False,
                           progress=False)  # fmt: skip
        plain_s = time.perf_counter() - t
        print(f"head_sweep(share_prefixes=False): wall {plain_s:.1f} s "
              f"({plain_s / fast_s:.2f}x the shared run); max |d log p| vs shared "
              f"{float((plain.logprob - sweep.logprob).abs().max()):.1e}", flush=True)  # fmt: skip
    t, c = time.perf_counter(), time.process_time()
    correct, logprob = baseline(model, batch.tokens, batch.positions, target, timed)
    base_s = (time.perf_counter() - t) * len(all_heads) / len(timed)
    base_c = (time.process_time() - c) * len(all_heads) / len(timed)
    idx = [all_heads.index(x) for x in timed]
    same_acc = torch.equal(sweep.correct[idx].float().mean(1), correct.float().mean(1))
    same_pred = torch.equal(sweep.correct[idx], correct)
    diff = float((sweep.logprob[idx] - logprob).abs().max())
    print(
        f"{len(prompts)} cases (1-digit '+', template 1, {args.shots} shots, "
        f"{batch.tokens.shape[1]} tokens at most), base accuracy "
        f"{float(sweep.base_correct.float().mean()):.3f}, {len(all_heads)} heads"
    )
    print(
        f"head_sweep: wall {fast_s:.1f} s, cpu {fast_c:.1f} s; batched hooks: wall {base_s:.1f} "
        f"s, cpu {base_c:.1f} s (timed on {len(timed)} heads, scaled to {len(all_heads)}) -> "
        f"wall {base_s / fast_s:.2f}x, cpu {base_c / fast_c:.2f}x"
    )
    print(f"load {os.getloadavg()}")
    print(f"identical accuracies {same_acc}, identical correctness {same_pred}, "
          f"max |d log p| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
