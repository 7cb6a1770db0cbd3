"""Benchmark on SmolLM2-135M: all FFN and all attention neurons against the literal method.

Measured in one run, torch's default thread count (``--threads N`` to set one), fp32:

* the literal method of the papers' code (``tests/reference.py``: add the base to every
  neuron's vector, final norm with the frozen scale, full unembedding, log-softmax): one
  forward pass with the activations cached, timed once, plus the per-layer work timed on
  ``--literal-layers`` layers of one prompt and scaled to all 30 layers (the script prints
  what it scaled; until 2026-12-05 the forward was timed inside every layer, which inflated
  the literal by about a third);
* ``neuron_importance`` + ``attention_neuron_importance`` with default settings: first
  prompt on a cold cache (a fresh disk-cache directory); a second single prompt, timed for
  FFN neurons alone and attention neurons alone (issue 20's targets: FFN >= 20x the literal
  FFN method, attention no slower than FFN, both >= 40x); a new session warm from the disk
  cache; then 64 prompts amortised (warm cache, or cold with ``--amortised-cold``);
* with ``--repeats N``: N further warm single prompts, the literal method re-timed on each
  prompt right before its fast calls, and the median, min and max of the ratios (this VM's
  speed drifts by up to 1.6x between runs, so one sample does not settle a target);
* the first prompt when streaming (``BlockCache(budget=0, disk=False)``: only the rows the
  second-order expansion cannot certify are computed);
* accuracy: max |fast - literal| on the timed layers and the top-100 FFN neurons of the
  first prompt against the literal method on all layers (``--check-all-ffn``).

Peak memory is measured in separate processes (``--rss default|streaming``, VmHWM).

Run under the shared lock::

    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/smollm2_attribution.py
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402

from mechcna import attention_neuron_importance, neuron_importance  # noqa: E402
from mechcna.engine.blocks import BlockCache  # noqa: E402
from tests.reference import frozen_bs  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Tim Duncan plays the sport of",
    "3+5=",
    "The Eiffel Tower is in the city of",
]

# the warm prompts of --repeats: none of them is scored anywhere else in the run
REPEAT_PROMPTS = [
    "The Great Wall is in the country of",
    "Lionel Messi plays the sport of",
    "The largest planet in the solar system is",
    "The currency of Japan is the",
    "Shakespeare was born in the town of",
    "The chemical symbol for gold is",
    "The Nile flows into the",
    "Mount Everest is in the mountain range of",
    "The author of Hamlet is William",
    "The language spoken in Brazil is",
    "Water freezes at zero degrees",
    "The first man on the moon was Neil",
]


def scratch() -> str:
    """A fresh disk-cache directory, deleted when the benchmark exits (up to 6 GB each)."""
    path = tempfile.mkdtemp(prefix="mechcna-bench-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` also cleans up
    return path


def many_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b = (7 * i + 3) % 10, (3 * i + 1) % 10
        out.append([f"{a}+{b}=", f"The sum of {a} and {b} is", PROMPTS[i % 4]][i % 3])
    return out


@torch.no_grad()
def literal_forward(model, tokens):
    """The literal method's one forward pass with the activations cached (a competent user runs
    it once per prompt, not once per layer)."""
    return model.run_with_cache(tokens[None])


@torch.no_grad()
def literal_layer(model, tokens, layer: int, kind: str, run=None):
    """The papers' literal per-layer computation for one unpadded prompt (``run``: the output
    of :func:`literal_forward`, computed here when not given)."""
    logits, cache = literal_forward(model, tokens) if run is None else run
    T = len(tokens) - 1
    w = int(logits[0, T].argmax())
    s = cache["ln_final.hook_scale"][0, T, 0]
    if kind == "ffn":
        base = cache[f"blocks.{layer}.hook_resid_mid"][0, T]
        vectors = (
            cache[f"blocks.{layer}.mlp.hook_post"][0, T][:, None] * model.blocks[layer].mlp.W_out
        )
    else:
        base = cache[f"blocks.{layer}.hook_resid_pre"][0, T]
        H = model.cfg.n_heads
        alpha = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, T, :]
        v = cache[f"blocks.{layer}.attn.hook_v"][0]
        v = v.repeat_interleave(H // v.shape[1], dim=1)
        sub = alpha.T[:, :, None] * v
        vectors = (sub[..., None] * model.blocks[layer].attn.W_O[None]).flatten(0, 2)
    lp = torch.log_softmax(frozen_bs(model, base[None] + vectors, s), -1)[:, w]
    lp0 = torch.log_softmax(frozen_bs(model, base, s), -1)[w]
    return lp - lp0


LAYERS: list[int] | None = None


class Clock:
    """Wall and CPU (process) time of a block; on a shared, loaded machine the CPU time of a
    one-thread run is the fairer measure (other jobs stretch the wall time unevenly)."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c

    def ratio(self, base: "Clock") -> str:
        return (f"wall {self.wall:.2f} s -> {base.wall / self.wall:.1f}x, "
                f"cpu {self.cpu:.2f} s -> {base.cpu / self.cpu:.1f}x")  # fmt: skip


def time_literal(model, tokens, literal_layers, L: int, verbose: bool = False):
    """The literal method for one prompt: one forward with the activations cached, then the
    per-layer FFN and attention work timed on ``literal_layers`` and scaled to ``L`` layers.
    Returns the literal scores on the timed layers, the all-neuron, FFN-only and
    attention-only clocks (each includes the one forward) and the mean wall time per layer."""
    lit = {"ffn": {}, "attn": {}}
    lit_t = {"ffn": [], "attn": []}
    lit_c = {"ffn": [], "attn": []}
    literal_forward(model, tokens)  # warm-up
    with Clock() as fwd:
        run = literal_forward(model, tokens)
    for kind in ("ffn", "attn"):
        for l in literal_layers:
            with Clock() as c:
                lit[kind][l] = literal_layer(model, tokens, l, kind, run)
            lit_t[kind].append(c.wall)
            lit_c[kind].append(c.cpu)
    per_layer = {k: sum(v) / len(v) for k, v in lit_t.items()}
    per_layer_cpu = {k: sum(v) / len(v) for k, v in lit_c.items()}
    # one forward per prompt (and per analysis: FFN and attention neurons each need one)
    literal, lit_ffn, lit_att = Clock(), Clock(), Clock()
    literal.wall = fwd.wall + L * (per_layer["ffn"] + per_layer["attn"])
    literal.cpu = fwd.cpu + L * (per_layer_cpu["ffn"] + per_layer_cpu["attn"])
    lit_ffn.wall, lit_ffn.cpu = fwd.wall + L * per_layer["ffn"], fwd.cpu + L * per_layer_cpu["ffn"]
    lit_att.wall = fwd.wall + L * per_layer["attn"]
    lit_att.cpu = fwd.cpu + L * per_layer_cpu["attn"]
    if verbose:
        print(f"literal: forward with cache {fwd.wall:.2f} s (cpu {fwd.cpu:.2f}) once, then "
              f"FFN {per_layer['ffn']:.2f} s/layer (cpu {per_layer_cpu['ffn']:.2f}), "
              f"attention {per_layer['attn']:.2f} s/layer (cpu {per_layer_cpu['attn']:.2f}) "
              f"({len(tokens)} positions); timed on layers {literal_layers}, scaled to the "
              f"{L} scored layers: wall {literal.wall:.1f} s, cpu {literal.cpu:.1f} s per prompt",
              flush=True)  # fmt: skip
    return lit, literal, lit_ffn, lit_att, per_layer


def spread(xs: list[float]) -> str:
    """``median (min-max, n)`` of a list of ratios."""
    ys = sorted(xs)
    n = len(ys)
    med = ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2
    return f"median {med:.1f}x (min {ys[0]:.1f}x, max {ys[-1]:.1f}x, n {n})"


def repeated_warm(model, cache, literal_layers, L: int, repeats: int) -> None:
    """``repeats`` further warm single prompts, each timed right after the literal method on
    the same prompt, so that the machine's drift between runs shows in both alike; prints every
    repeat's ratios and their median, min and max (wall and CPU time)."""
    if repeats > len(REPEAT_PROMPTS):
        raise SystemExit(f"--repeats: at most {len(REPEAT_PROMPTS)}")
    pool = REPEAT_PROMPTS[:repeats]
    rows: dict[str, list[float]] = {k: [] for k in ("ffn", "attn", "all", "ffn_cpu", "all_cpu")}
    for i, text in enumerate(pool):
        tokens = model.to_tokens(text)[0]
        _, literal, lit_ffn, lit_att, _ = time_literal(model, tokens, literal_layers, L)
        with Clock() as f:
            neuron_importance(model, [text], cache=cache, layers=LAYERS)
        with Clock() as a:
            attention_neuron_importance(model, [text], cache=cache, layers=LAYERS)
        rows["ffn"].append(lit_ffn.wall / f.wall)
        rows["attn"].append(lit_att.wall / a.wall)
        rows["all"].append(literal.wall / (f.wall + a.wall))
        rows["ffn_cpu"].append(lit_ffn.cpu / f.cpu)
        rows["all_cpu"].append(literal.cpu / (f.cpu + a.cpu))
        print(f"  repeat {i + 1} ({text!r}, {len(tokens)} positions): FFN {f.wall:.2f} s "
              f"{rows['ffn'][-1]:.1f}x (cpu {rows['ffn_cpu'][-1]:.1f}x); attention "
              f"{a.wall:.2f} s {rows['attn'][-1]:.1f}x; all {rows['all'][-1]:.1f}x "
              f"(cpu {rows['all_cpu'][-1]:.1f}x); load {os.getloadavg()[0]:.2f}",
              flush=True)  # fmt: skip
    print(f"warm single prompts, {len(pool)} repeats, literal re-timed beside each:", flush=True)
    print(f"  FFN only: wall {spread(rows['ffn'])}; cpu {spread(rows['ffn_cpu'])} "
          f"(target >= 20x)", flush=True)  # fmt: skip
    print(f"  attention only: wall {spread(rows['attn'])}", flush=True)
    print(f"  all neurons: wall {spread(rows['all'])}; cpu {spread(rows['all_cpu'])} "
          f"(target >= 40x)", flush=True)  # fmt: skip


def all_neurons(model, prompts, cache):
    with Clock() as clock:
        f = neuron_importance(model, prompts, cache=cache, layers=LAYERS)
        a = attention_neuron_importance(model, prompts, cache=cache, layers=LAYERS)
    return clock, f, a


def cert(res) -> float:
    """The share of scores certified without the exact sum."""
    return res.stats.certified_fraction if res.stats is not None else float("nan")


def top_shared(f, a, lit, layers, n_pos) -> int:
    """How many of the top-100 FFN and attention neurons of prompt 0 on the timed layers the
    fast scores share with the literal ones."""
    fast = torch.cat([f.scores[0, l] for l in layers]
                     + [a.scores[0, l, :n_pos].flatten() for l in layers])  # fmt: skip
    ref = torch.cat([lit["ffn"][l] for l in layers] + [lit["attn"][l] for l in layers])
    return len(set(fast.topk(100).indices.tolist()) & set(ref.topk(100).indices.tolist()))


def rss_child(mode: str, n: int) -> None:
    model = load_smollm2()
    cache = BlockCache(budget=0, disk=False) if mode == "streaming" else None
    if mode == "default":
        cache = BlockCache(disk=scratch())
    first, _, _ = all_neurons(model, PROMPTS[:n], cache)
    again, _, _ = all_neurons(model, PROMPTS[:n], cache)
    print(f"{n} prompts: wall {first.wall:.1f} s (cpu {first.cpu:.1f} s), again "
          f"{again.wall:.1f} s (cpu {again.cpu:.1f} s); load {os.getloadavg()}")  # fmt: skip
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"mode": mode, "peak_rss_gb": hwm / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--layers", type=int, nargs="*", help="score only these layers (default all)")
    ap.add_argument("--literal-layers", type=int, nargs="*", default=[0, 15, 29])
    ap.add_argument("--amortised", type=int, default=64)
    ap.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="time this many further warm single prompts, the literal re-timed beside each, and "
        "print the median, min and max ratios (this VM's speed drifts between runs)",
    )
    ap.add_argument("--check-all-ffn", action="store_true")
    ap.add_argument("--rss", choices=["default", "streaming"])
    ap.add_argument("--rss-prompts", type=int, default=4)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-streaming", action="store_true", help="also skips the rss runs")
    ap.add_argument(
        "--amortised-cold",
        action="store_true",
        help="time the prompt batch on a fresh cache (rows computed inside)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    global LAYERS
    LAYERS = args.layers
    if args.rss:
        rss_child(args.rss, args.rss_prompts)
        return
    print(f"{platform.node()} {platform.processor()} torch {torch.__version__} "
          f"threads {args.threads} load {os.getloadavg()}", flush=True)  # fmt: skip
    model = load_smollm2()
    L = model.cfg.n_layers if LAYERS is None else len(LAYERS)
    prompt, second = PROMPTS[0], PROMPTS[1]
    tokens = model.to_tokens(prompt)[0]
    n_pos = len(tokens)

    lit, literal, lit_ffn, lit_att, per_layer = time_literal(
        model, tokens, args.literal_layers, L, verbose=True
    )

    disk = scratch()
    cache = BlockCache(disk=disk)
    first, f1, a1 = all_neurons(model, [prompt], cache)
    print(f"first prompt, cold (default cache, empty disk dir): {first.ratio(literal)}; "
          f"certified FFN {cert(f1):.3f} "
          f"attention {cert(a1):.3f}", flush=True)  # fmt: skip
    err = 0.0
    for l in args.literal_layers:
        err = max(err, float((f1.scores[0, l] - lit["ffn"][l]).abs().max()))
        att = a1.scores[0, l, :n_pos].flatten()
        err = max(err, float((att - lit["attn"][l]).abs().max()))
    print(f"max |fast - literal| on the timed layers (FFN and attention): {err:.2e}", flush=True)
    shared = top_shared(f1, a1, lit, args.literal_layers, n_pos)
    print(f"top-100 of the timed layers (FFN and attention neurons): {shared} of 100 shared "
          f"with the literal", flush=True)  # fmt: skip

    # second single prompt: FFN only, attention only, then both (issue 20's targets)
    with Clock() as ffn2:
        f2 = neuron_importance(model, [second], cache=cache, layers=LAYERS)
    with Clock() as att2:
        a2 = attention_neuron_importance(model, [second], cache=cache, layers=LAYERS)
    both = Clock()
    both.wall, both.cpu = ffn2.wall + att2.wall, ffn2.cpu + att2.cpu
    print(f"second single prompt, FFN only: {ffn2.ratio(lit_ffn)} (target >= 20x); certified "
          f"{cert(f2):.3f}", flush=True)  # fmt: skip
    print(f"second single prompt, attention only: {att2.ratio(lit_att)}; attention / FFN "
          f"time: wall {att2.wall / ffn2.wall:.2f}, cpu {att2.cpu / ffn2.cpu:.2f} (target <= 1); "
          f"certified {cert(a2):.3f}", flush=True)  # fmt: skip
    print(f"second single prompt, all neurons: {both.ratio(literal)} (target >= 40x)",
          flush=True)  # fmt: skip
    # the second call also pays the process's first compilations of the exact path's kernels
    with Clock() as ffn3:
        neuron_importance(model, [PROMPTS[3]], cache=cache, layers=LAYERS)
    with Clock() as att3:
        attention_neuron_importance(model, [PROMPTS[3]], cache=cache, layers=LAYERS)
    both3 = Clock()
    both3.wall, both3.cpu = ffn3.wall + att3.wall, ffn3.cpu + att3.cpu
    print(f"third single prompt: FFN only {ffn3.ratio(lit_ffn)}; attention only "
          f"{att3.ratio(lit_att)}; all neurons {both3.ratio(literal)}", flush=True)  # fmt: skip
    if args.repeats:
        repeated_warm(model, cache, args.literal_layers, L, args.repeats)
    warm = BlockCache(disk=disk)
    warm_c, _, _ = all_neurons(model, [PROMPTS[2]], warm)
    print(f"new session, warm from disk: {warm_c.ratio(literal)}", flush=True)
    print(f"load {os.getloadavg()}", flush=True)

    if args.amortised:
        prompts = [prompt, *many_prompts(args.amortised - 1)]
        am_cache = BlockCache(disk=scratch()) if args.amortised_cold else cache
        am, fa, aa = all_neurons(model, prompts, am_cache)
        scale = sum(
            (per_layer["ffn"] + per_layer["attn"] * len(model.to_tokens(p)[0]) / n_pos)
            / (per_layer["ffn"] + per_layer["attn"])
            for p in prompts
        )
        lit_many = Clock()
        lit_many.wall, lit_many.cpu = literal.wall * scale, literal.cpu * scale
        what = "cold cache included" if args.amortised_cold else "warm cache"
        print(f"{len(prompts)} prompts, {what}: {am.ratio(lit_many)} (target >= 150x; literal "
              f"scaled by positions: wall {lit_many.wall:.0f} s, cpu {lit_many.cpu:.0f} s)",
              flush=True)  # fmt: skip
        print(f"  certified FFN {cert(fa):.3f} attention "
              f"{cert(aa):.3f}", flush=True)  # fmt: skip
        same = float((fa.scores[0] - f1.scores[0]).abs().max())
        shared = top_shared(fa, aa, lit, args.literal_layers, n_pos)
        print(f"  prompt 0 in the batch: max |diff| vs single prompt {same:.2e}; top-100 of the "
              f"timed layers shared with the literal: {shared} of 100", flush=True)  # fmt: skip
        print(f"load {os.getloadavg()}", flush=True)

    if args.skip_streaming:
        print(f"load at end {os.getloadavg()}", flush=True)
        return
    stream, fs, ats = all_neurons(model, [prompt], BlockCache(budget=0, disk=False))
    diff = max(
        float((fs.scores - f1.scores).abs().max()), float((ats.scores - a1.scores).abs().max())
    )
    print(f"first prompt, streaming (budget 0, no disk): {stream.ratio(literal)}; "
          f"max |streaming - default| {diff:.2e}", flush=True)  # fmt: skip

    if args.check_all_ffn:
        t = time.perf_counter()
        chosen = range(model.cfg.n_layers) if LAYERS is None else LAYERS
        ref = torch.zeros_like(f1.scores[0])
        for l in chosen:
            ref[l] = literal_layer(model, tokens, l, "ffn")
        print(f"literal FFN, all layers: {time.perf_counter() - t:.1f} s")
        top_ref = set(ref.flatten().topk(100).indices.tolist())
        top_fast = set(f1.scores[0].flatten().topk(100).indices.tolist())
        print(f"top-100 FFN: {len(top_ref & top_fast)} of 100 shared; max |diff| "
              f"{float((f1.scores[0] - ref).abs().max()):.2e}", flush=True)  # fmt: skip

    print(f"load at end {os.getloadavg()}", flush=True)
    if not args.skip_rss:
        for mode in ("default", "streaming"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss", mode, "--threads", str(args.threads)]
                + (["--layers", *map(str, LAYERS)] if LAYERS else []),
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
