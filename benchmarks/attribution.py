"""Benchmark: fast certified attribution vs the papers' literal per-layer method.

Run on demand (not in CI):  ``.venv/bin/python benchmarks/attribution.py [--quick]``

1. GPT-2-small shape (12 layers, d_model 768, d_mlp 3072, 12 heads, vocabulary 50257; random
   weights): all FFN neurons and all attention neurons for 16 prompts of 8 tokens, against the
   literal method (per layer: add the base to every neuron's vector, final norm with the frozen
   scale, full unembedding, log-softmax) timed on 2 prompts and scaled linearly to 16.
   Prints the speed ratio with and without the one-time static precompute, peak memory, the
   max absolute difference and whether the top-100 rankings agree.
2. GPT-2-large shape (36 layers, d_model 1280, d_mlp 5120), FFN neurons for 4 prompts, run in
   a subprocess with block caching off (streaming): peak resident memory must stay under 8 GB.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechcna import BlockCache, attention_neuron_importance, load_model, neuron_importance
from mechcna.engine.blocks import attention_block, ffn_block
from tests.reference import literal_attention_scores, literal_ffn_scores


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM; getrusage's maxrss is inherited across
    fork and would report the parent's peak in the subprocess)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpt2_shape(n_layers: int, d_model: int, d_mlp: int, n_heads: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads,
        d_head=d_model // n_heads, n_ctx=64, d_vocab=50257, act_fn="gelu_new",
        normalization_type="LN", original_architecture="GPT2LMHeadModel", seed=0,
    )  # fmt: skip
    return load_model(cfg, device="cpu", seed=0)


def top_agreement(fast: torch.Tensor, ref: torch.Tensor, k: int = 100) -> tuple[bool, bool]:
    """(identical top-k order, identical up to swaps of entries whose reference scores are
    closer than 1e-4). Prints where the orders differ."""
    a = fast.flatten().topk(k).indices
    b = ref.flatten().topk(k).indices
    strict = bool(torch.equal(a, b))
    same_set = set(a.tolist()) == set(b.tolist())
    r = ref.flatten()
    gap = float((r[a] - r[b]).abs().max())
    if not strict:
        differ = int((a != b).sum())
        print(
            f"  top-{k}: {differ} ranks differ; same set {same_set}; largest reference-score "
            f"gap between the entries at a differing rank {gap:.2e}"
        )
    return strict, strict or (same_set and gap < 1e-4)


def small(n_prompts: int, n_literal: int, seq: int) -> dict:
    torch.manual_seed(0)
    model = gpt2_shape(12, 768, 3072, 12)
    tokens = torch.randint(0, 50257, (n_prompts, seq), generator=torch.Generator().manual_seed(1))

    cache = BlockCache(budget=16 * 2**30)
    t0 = time.perf_counter()
    with torch.no_grad():
        for l in range(model.cfg.n_layers):
            ffn_block(model, l, cache)
            attention_block(model, l, cache)
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    ffn = neuron_importance(model, tokens, cache=cache)
    att = attention_neuron_importance(model, tokens, cache=cache)
    t_scores = time.perf_counter() - t0
    t_fast = t_pre + t_scores
    peak_fast = peak_rss_gb()
    assert ffn.stats is not None and att.stats is not None
    cache.clear()

    t0 = time.perf_counter()
    max_diff, strict_all, tol_all = 0.0, True, True
    for i in range(n_literal):
        ref_f, w = literal_ffn_scores(model, tokens[i])
        ref_a, _ = literal_attention_scores(model, tokens[i])
        assert w == int(ffn.target_ids[i])
        max_diff = max(max_diff, float((ffn.scores[i] - ref_f).abs().max()))
        max_diff = max(max_diff, float((att.scores[i] - ref_a).abs().max()))
        for fast, ref in ((ffn.scores[i], ref_f), (att.scores[i], ref_a)):
            strict, tolerant = top_agreement(fast, ref)
            strict_all &= strict
            tol_all &= tolerant
    t_literal = (time.perf_counter() - t0) * n_prompts / n_literal
    return {
        "prompts": n_prompts,
        "tokens_per_prompt": seq,
        "literal_prompts_timed": n_literal,
        "literal_s_scaled": t_literal,
        "fast_s_total": t_fast,
        "fast_s_precompute": t_pre,
        "fast_s_scores": t_scores,
        "ratio_with_precompute": t_literal / t_fast,
        "ratio_without_precompute": t_literal / t_scores,
        "max_abs_diff": max_diff,
        "top100_identical": strict_all,
        "top100_identical_up_to_ties": tol_all,
        "ffn_certified_fraction": ffn.stats.certified_fraction,
        "attention_certified_fraction": att.stats.certified_fraction,
        "peak_rss_gb_fast": peak_fast,
        "peak_rss_gb_total": peak_rss_gb(),
    }


def large(n_prompts: int, seq: int) -> dict:
    torch.manual_seed(0)
    model = gpt2_shape(36, 1280, 5120, 20)
    tokens = torch.randint(0, 50257, (n_prompts, seq), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    res = neuron_importance(model, tokens, cache=BlockCache(budget=0))
    elapsed = time.perf_counter() - t0
    assert res.stats is not None
    return {
        "prompts": n_prompts,
        "fast_s": elapsed,
        "certified_fraction": res.stats.certified_fraction,
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 literal")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--only-large", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_large:
        print(json.dumps(large(4, 8)))
        return
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {args.threads}, torch {torch.__version__}"
    )
    r = small(4 if args.quick else 16, 1 if args.quick else 2, 8)
    print("\n== GPT-2-small shape: all FFN + attention neurons ==")
    print(f"prompts {r['prompts']} x {r['tokens_per_prompt']} tokens")
    print(
        f"literal method: timed on {r['literal_prompts_timed']} prompts, scaled linearly to "
        f"{r['prompts']}: {r['literal_s_scaled']:.1f} s"
    )
    print(
        f"fast: {r['fast_s_total']:.1f} s total = {r['fast_s_precompute']:.1f} s static "
        f"precompute + {r['fast_s_scores']:.1f} s scoring"
    )
    print(f"speed ratio with precompute:    {r['ratio_with_precompute']:.1f}x")
    print(f"speed ratio without precompute: {r['ratio_without_precompute']:.1f}x")
    print(f"max |fast - literal|: {r['max_abs_diff']:.2e}")
    print(
        f"top-100 rankings identical: {r['top100_identical']} "
        f"(up to ties closer than 1e-4: {r['top100_identical_up_to_ties']})"
    )
    print(
        f"certified without the exact sum: FFN {r['ffn_certified_fraction']:.1%}, "
        f"attention {r['attention_certified_fraction']:.1%}"
    )
    print(f"peak RSS after fast path: {r['peak_rss_gb_fast']:.2f} GB (with cached blocks)")
    if not args.skip_large:
        out = subprocess.run(
            [sys.executable, __file__, "--only-large", "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        g = json.loads(out.stdout.strip().splitlines()[-1])
        print("\n== GPT-2-large shape: all FFN neurons, streaming (no block cache) ==")
        print(
            f"prompts {g['prompts']}: {g['fast_s']:.1f} s, certified {g['certified_fraction']:.1%}"
        )
        verdict = "OK" if g["peak_rss_gb"] < 8 else "OVER"
        print(f"peak RSS: {g['peak_rss_gb']:.2f} GB (limit 8 GB): {verdict}")


if __name__ == "__main__":
    main()
