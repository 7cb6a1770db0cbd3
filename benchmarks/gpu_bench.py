"""GPU benchmarks run by ``benchmarks/gpu.sh``: SmolLM2 and a Llama-7B-shaped random model.

(a) SmolLM2-135M (fp32): all FFN + attention neurons of a prompt (``neuron_importance`` +
    ``attention_neuron_importance``) against the vectorised literal method of the papers' code
    on the same GPU (every layer, one prompt), with the largest difference; ``head_sweep`` over
    64 arithmetic cases and all 270 heads against batched hooks (one ``run_with_hooks`` per
    head over the whole batch), with the predictions compared.
(b) A Llama-7B-shaped model with random weights (32 layers, d_model 4096, d_mlp 11008,
    32 heads, vocabulary 32000, bf16): all-FFN attribution per prompt (cold, warm one prompt
    at a time, and batched), checked against an fp32 literal on two layers; a head sweep over
    the heads of a few layers, scaled to all 1024 heads (stated as such), and batched hooks on a
    few heads.

Every figure is written to ``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md`` as soon as it is
measured; a step that would start after ``--deadline`` (seconds since the epoch) is recorded as
skipped. ``--dry-run`` runs every step with tiny shapes (the shipped model stands in for
SmolLM2) on the given device, for CI.
"""

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import mechcna  # noqa: E402
from mechcna.engine.blocks import BlockCache  # noqa: E402

RESULTS: dict[str, Any] = {"steps": {}}
OUT = Path(".")
DEADLINE = float("inf")
DEVICE = "cuda"

PROMPTS = [
    "The capital of France is",
    "Tim Duncan plays the sport of",
    "3+5=",
    "The Eiffel Tower is in the city of",
    "The sum of 4 and 3 is",
    "Q: What is 7 plus 2? A:",
]


# ------------------------------------------------------------------------------ recording
def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def write() -> None:
    RESULTS["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if DEVICE.startswith("cuda") and torch.cuda.is_available():
        RESULTS["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    (OUT / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    lines = ["# mechcna GPU benchmarks", ""]
    for key in ("device", "torch", "cuda", "dry_run", "python", "peak_gpu_memory_gb"):
        if key in RESULTS:
            lines.append(f"- {key}: {RESULTS[key]}")
    lines += ["", "| step | figure | value |", "| --- | --- | --- |"]
    for step, figures in RESULTS["steps"].items():
        for name, value in figures.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            lines.append(f"| {step} | {name} | {value} |")
    (OUT / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def step(name: str) -> Callable[[Callable[..., dict]], Callable[..., None]]:
    """Run a benchmark step unless past the deadline; record its figures or its error."""

    def wrap(fn: Callable[..., dict]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            if time.time() > DEADLINE:
                RESULTS["steps"][name] = {"skipped": "time limit reached before this step"}
                write()
                print(f"[{name}] skipped: time limit", flush=True)
                return
            print(f"[{name}] ...", flush=True)
            t = time.perf_counter()
            try:
                figures = fn(*args)
            except Exception as err:  # record and go on: the other figures still count
                figures = {"error": f"{type(err).__name__}: {err}"}
                traceback.print_exc()
            figures["step_seconds"] = round(time.perf_counter() - t, 2)
            RESULTS["steps"][name] = figures
            write()
            print(f"[{name}] {json.dumps(figures, default=str)}", flush=True)

        return run

    return wrap


# ------------------------------------------------------------------------------ references
@torch.no_grad()
def literal_all_layers(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The papers' literal method, vectorised per layer: every FFN neuron and attention neuron
    of one unpadded prompt (last position), materialising every augmented residual."""
    from tests.reference import frozen_bs

    logits, cache = model.run_with_cache(tokens[None])
    T = len(tokens) - 1
    w = int(logits[0, T].argmax())
    s = cache["ln_final.hook_scale"][0, T, 0]
    H = model.cfg.n_heads
    ffn, attn = [], []
    for l in range(model.cfg.n_layers):
        base = cache[f"blocks.{l}.hook_resid_mid"][0, T]
        vec = cache[f"blocks.{l}.mlp.hook_post"][0, T][:, None] * model.blocks[l].mlp.W_out
        lp = torch.log_softmax(frozen_bs(model, base[None] + vec, s), -1)[:, w]
        ffn.append(lp - torch.log_softmax(frozen_bs(model, base, s), -1)[w])
        base = cache[f"blocks.{l}.hook_resid_pre"][0, T]
        alpha = cache[f"blocks.{l}.attn.hook_pattern"][0, :, T, :]
        v = cache[f"blocks.{l}.attn.hook_v"][0]
        v = v.repeat_interleave(H // v.shape[1], dim=1)
        sub = alpha.T[:, :, None] * v
        vec = (sub[..., None] * model.blocks[l].attn.W_O[None]).flatten(0, 2)
        lp = torch.log_softmax(frozen_bs(model, base[None] + vec, s), -1)[:, w]
        attn.append(lp - torch.log_softmax(frozen_bs(model, base, s), -1)[w])
    return torch.stack(ffn), torch.stack(attn).reshape(model.cfg.n_layers, len(tokens), H, -1)


@torch.no_grad()
def literal_ffn_fp32(model: Any, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """FFN neuron scores of one prompt on ``layers``, the projection done in float32 (for a
    bf16 model; RMSNorm final norm)."""
    logits, cache = model.run_with_cache(tokens[None])
    T = len(tokens) - 1
    w = int(logits[0, T].argmax())
    s = cache["ln_final.hook_scale"][0, T, 0].float()
    gamma, W_U = model.ln_final.w.float(), model.W_U.float()

    def lp(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax((x / s * gamma) @ W_U, -1)[..., w]

    out = []
    for l in layers:
        base = cache[f"blocks.{l}.hook_resid_mid"][0, T].float()
        post = cache[f"blocks.{l}.mlp.hook_post"][0, T].float()
        out.append(lp(base[None] + post[:, None] * model.blocks[l].mlp.W_out.float()) - lp(base))
    return torch.stack(out)


@torch.no_grad()
def batched_hooks(model: Any, tokens: torch.Tensor, positions: torch.Tensor, target: torch.Tensor,
                  heads: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """What a TransformerLens user writes: one batched ``run_with_hooks`` per head, zeroing
    that head's ``z``; per-head correctness and target log-probs at each scored position."""
    rows = torch.arange(len(positions), device=tokens.device)
    correct, logprob = [], []
    for l, h in heads:

        def zero(z: torch.Tensor, hook: Any, h: int = h) -> torch.Tensor:
            z[:, :, h] = 0.0
            return z

        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero)])
        last = logits[rows, positions].float().log_softmax(-1)
        correct.append(last.argmax(-1) == target)
        logprob.append(last[rows, target])
    return torch.stack(correct), torch.stack(logprob)


# ------------------------------------------------------------------------------ (a) SmolLM2
def load_small(dry_run: bool) -> Any:
    if dry_run:
        return mechcna.load_model("mechcna/arith-small", device=DEVICE)
    from smollm2 import load_smollm2

    return load_smollm2().to(DEVICE)


@step("smollm2_attribution")
def smollm2_attribution(model: Any, dry_run: bool) -> dict:
    cache = BlockCache(budget=(2**28 if dry_run else 24 * 2**30), disk=False)
    prompts = PROMPTS if not dry_run else ["3+5=", "12+7=", "The sum of 4 and 3 is", "9-2="]
    fig: dict[str, Any] = {"model": model.cfg.model_name, "layers": model.cfg.n_layers,
                           "d_mlp": model.cfg.d_mlp, "dtype": str(model.cfg.dtype)}  # fmt: skip

    def both(ps: list[str]) -> tuple[Any, Any]:
        return (mechcna.neuron_importance(model, ps, cache=cache),
                mechcna.attention_neuron_importance(model, ps, cache=cache))  # fmt: skip

    (f1, a1), cold = timed(lambda: both(prompts[:1]))
    fig["all_neurons_first_prompt_cold_s"] = cold
    warm = [timed(lambda p=p: both([p]))[1] for p in prompts[1:] if time.time() < DEADLINE]
    fig["all_neurons_per_prompt_warm_ms_median"] = 1000 * median(warm)
    fig["ffn_certified_fraction"] = f1.stats.certified_fraction
    _, batch = timed(lambda: both(prompts * 4))
    fig["all_neurons_batched_ms_per_prompt"] = 1000 * batch / (4 * len(prompts))
    ffn_only = [timed(lambda p=p: mechcna.neuron_importance(model, [p], cache=cache))[1]
                for p in prompts[1:] if time.time() < DEADLINE]  # fmt: skip
    fig["ffn_only_per_prompt_warm_ms_median"] = 1000 * median(ffn_only)
    tokens = model.to_tokens(prompts[0])[0]
    literal_all_layers(model, tokens)  # warm-up (kernels, allocator)
    (lf, la), lit = timed(lambda: literal_all_layers(model, tokens))
    fig["literal_all_neurons_per_prompt_s"] = lit
    fig["speedup_vs_literal_warm"] = lit / median(warm)
    n = len(tokens)
    err = max(float((f1.scores[0] - lf.cpu()).abs().max()),
              float((a1.scores[0, :, :n] - la.cpu()).abs().max()))  # fmt: skip
    fig["max_abs_diff_vs_literal"] = err
    fig["top20_ffn_same_as_literal"] = set(f1.scores[0].flatten().topk(20).indices.tolist()) == set(
        lf.flatten().topk(20).indices.cpu().tolist()
    )
    return fig


@step("smollm2_head_sweep")
def smollm2_head_sweep(model: Any, dry_run: bool) -> dict:
    from mechcna.interventions.prompts import prepare_prompts, single_token_ids

    data = mechcna.arithmetic_dataset("+", 1, templates=1, n_pairs=None, tokenizer=model)
    prompts, targets = list(data.prompts)[:64], list(data.targets)[:64]
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    fig: dict[str, Any] = {"cases": len(prompts), "heads": len(heads)}
    for hp in (8, 32):  # the CPU default, and more heads per pass for a GPU
        mechcna.head_sweep(
            model,
            prompts[:8],
            targets[:8],
            heads=heads[:hp],
            batch_size=64,
            heads_per_pass=hp,
            progress=False,
        )  # fmt: skip  (warm-up)
        sweep, t = timed(lambda hp=hp: mechcna.head_sweep(
            model, prompts, targets, batch_size=64, heads_per_pass=hp, progress=False))  # fmt: skip
        fig[f"head_sweep_s_heads_per_pass_{hp}"] = t
    fig["base_accuracy"] = float(sweep.base_correct.double().mean())
    batch = prepare_prompts(model, prompts)
    target = single_token_ids(model, targets, len(prompts))
    batched_hooks(model, batch.tokens, batch.positions, target, heads[:2])  # warm-up
    (correct, logprob), t = timed(
        lambda: batched_hooks(model, batch.tokens, batch.positions, target, heads)
    )
    fig["batched_hooks_s"] = t
    best = min(v for k, v in fig.items() if k.startswith("head_sweep_s"))
    fig["speedup_vs_batched_hooks"] = t / best
    fig["same_correctness_as_hooks"] = bool(torch.equal(correct.cpu(), sweep.correct))
    fig["max_abs_logprob_diff_vs_hooks"] = float((logprob.cpu() - sweep.logprob).abs().max())
    return fig


# ------------------------------------------------------------------------------ (b) 7B shape
def llama7b(dry_run: bool) -> Any:
    from mechcna.models.backend import HookedTransformerConfig

    if dry_run:
        shape = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=172, d_vocab=512)
    else:
        shape = dict(n_layers=32, d_model=4096, n_heads=32, d_head=128, d_mlp=11008, d_vocab=32000)
    cfg = HookedTransformerConfig(
        **shape, n_ctx=256, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=shape["d_head"], gated_mlp=True,
        final_rms=True, original_architecture="LlamaForCausalLM", model_name="llama-7b-shape",
    )  # fmt: skip
    try:  # initialise on the device itself (13 GB of random weights)
        with torch.device(DEVICE):
            return mechcna.load_model(cfg, device=DEVICE, dtype=torch.bfloat16, seed=0)
    except Exception:
        traceback.print_exc()
        return mechcna.load_model(cfg, device=DEVICE, dtype=torch.bfloat16, seed=0)


def random_prompts(model: Any, n: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, length), generator=gen).to(DEVICE)


@step("llama7b_ffn_attribution")
def llama7b_attribution(model: Any, dry_run: bool) -> dict:
    cache = BlockCache(budget=(2**28 if dry_run else 48 * 2**30), disk=False)
    prompts = random_prompts(model, 24, 16, seed=1)
    fig: dict[str, Any] = {"layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp,
                           "d_vocab": model.cfg.d_vocab, "dtype": "bfloat16",
                           "prompt_tokens": prompts.shape[1]}  # fmt: skip
    first, cold = timed(lambda: mechcna.neuron_importance(model, prompts[:1], cache=cache))
    fig["first_prompt_cold_s"] = cold
    per = []
    for i in range(1, 12):
        if time.time() > DEADLINE:
            break
        per.append(timed(lambda i=i: mechcna.neuron_importance(model, prompts[i : i + 1],
                                                               cache=cache))[1])  # fmt: skip
    if per:
        fig["per_prompt_warm_ms_median"] = 1000 * median(per)
        fig["per_prompt_warm_ms_min"] = 1000 * min(per)
    if time.time() + 4 * max(per or [cold]) < DEADLINE:
        _, t = timed(lambda: mechcna.neuron_importance(model, prompts[12:24], cache=cache))
        fig["batched_12_prompts_ms_per_prompt"] = 1000 * t / 12
    fig["certified_fraction"] = first.stats.certified_fraction if first.stats else None
    layers = [0, model.cfg.n_layers - 1]
    ref = literal_ffn_fp32(model, prompts[0], layers)
    fig["max_abs_diff_vs_fp32_literal_2_layers"] = float(
        (first.scores[0, layers] - ref.cpu()).abs().max()
    )
    fig["score_scale_max_abs"] = float(ref.abs().max())
    return fig


@step("llama7b_head_sweep")
def llama7b_head_sweep(model: Any, dry_run: bool) -> dict:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    cases = random_prompts(model, 8, 16, seed=2)
    sample = sorted({0, L // 2, L - 1})
    heads = [(l, h) for l in sample for h in range(H)]
    fig: dict[str, Any] = {"cases": len(cases), "tokens": cases.shape[1],
                           "timed_layers": sample, "timed_heads": len(heads)}  # fmt: skip
    mechcna.head_sweep(model, cases, heads=heads[:4], heads_per_pass=4, progress=False)
    per_layer = {}
    for l in sample:
        hs = [(l, h) for h in range(H)]
        _, t = timed(lambda hs=hs: mechcna.head_sweep(
            model, cases, heads=hs, batch_size=64, heads_per_pass=32, progress=False))  # fmt: skip
        per_layer[l] = t
    fig["sweep_s_per_layer_of_heads"] = {str(k): round(v, 4) for k, v in per_layer.items()}
    # scale to every layer: linear in the layer between the timed ones
    xs = sorted(per_layer)
    est = 0.0
    for l in range(L):
        lo = max(x for x in xs if x <= l)
        hi = min(x for x in xs if x >= l)
        w = 0.0 if hi == lo else (l - lo) / (hi - lo)
        est += (1 - w) * per_layer[lo] + w * per_layer[hi]
    fig["all_heads_estimated_s (scaled from timed layers)"] = est
    target = None
    base = model(cases)[:, -1].float()
    target = base.argmax(-1)
    positions = torch.full((len(cases),), cases.shape[1] - 1, device=DEVICE)
    few = heads[:: max(1, len(heads) // 8)][:8]
    batched_hooks(model, cases, positions, target, few[:1])
    _, t = timed(lambda: batched_hooks(model, cases, positions, target, few))
    fig["batched_hooks_s_per_head"] = t / len(few)
    fig["batched_hooks_all_heads_estimated_s"] = t / len(few) * L * H
    return fig


# ------------------------------------------------------------------------------ main
def main() -> int:
    global OUT, DEADLINE, DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--deadline", type=float, default=None, help="seconds since the epoch")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    DEVICE = args.device
    DEADLINE = args.deadline or float("inf")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run --device cpu", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    try:
        name = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else None
    except Exception as err:
        name = f"unknown ({type(err).__name__}: {err})"
    RESULTS.update(
        device=name or platform.processor() or platform.machine(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        dry_run=args.dry_run,
        threads=torch.get_num_threads(),
        load=os.getloadavg(),
    )
    write()
    if not args.skip_smollm2:
        try:
            small = load_small(args.dry_run)
        except Exception as err:
            RESULTS["steps"]["smollm2_load"] = {"error": f"{type(err).__name__}: {err}"}
            write()
            small = None
        if small is not None:
            smollm2_attribution(small, args.dry_run)
            smollm2_head_sweep(small, args.dry_run)
            del small
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
    if time.time() < DEADLINE:
        try:
            big, t = timed(lambda: llama7b(args.dry_run))
            n_params = sum(p.numel() for p in big.parameters())
            RESULTS["steps"]["llama7b_load"] = {"random_init_s": t, "parameters_b": n_params / 1e9}
            write()
        except Exception as err:
            RESULTS["steps"]["llama7b_load"] = {"error": f"{type(err).__name__}: {err}"}
            write()
            big = None
        if big is not None:
            llama7b_attribution(big, args.dry_run)
            llama7b_head_sweep(big, args.dry_run)
    else:
        RESULTS["steps"]["llama7b"] = {"skipped": "time limit reached"}
    write()
    print(f"wrote {OUT / 'gpu_bench.json'} and {OUT / 'gpu_bench.md'}", flush=True)
    errors = [k for k, v in RESULTS["steps"].items() if "error" in v]
    return 1 if errors and args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
