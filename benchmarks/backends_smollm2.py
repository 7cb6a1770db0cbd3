"""HookedTransformer vs TransformerBridge on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantised).

Run under the shared lock (about 2 to 4 minutes on 2 cores, about 3 GB):
    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/backends_smollm2.py
Prints the largest absolute difference per analysis (docs/backends.md, acceptance table).
"""

import time

import torch

from mechcna import (
    HeadAblation,
    NeuronEdit,
    check_model,
    head_sweep,
    intervene,
    load_model,
    neuron_importance,
)
from mechcna.comparative import compare_neurons

PROMPTS = ["The capital of France is", "1+1=2\n2+3=5\n3+4="]
LAYERS = [27, 28, 29]


def main() -> None:
    t0 = time.perf_counter()
    hooked = load_model("smollm2-135m", device="cpu")
    bridge = load_model("smollm2-135m", device="cpu", backend="bridge")
    print(
        f"loaded in {time.perf_counter() - t0:.1f} s; prepend_bos hooked "
        f"{hooked.cfg.default_prepend_bos}, bridge {bridge.cfg.default_prepend_bos}"
    )
    rows = []

    def both(name, fn):
        t = time.perf_counter()
        a, b = fn(hooked), fn(bridge)
        rows.append((name, float((a.double() - b.double()).abs().max()), float(a.abs().max())))
        print(
            f"{name:<40} max|diff| {rows[-1][1]:.2e}  (scale {rows[-1][2]:.2e}, "
            f"{time.perf_counter() - t:.1f} s)"
        )

    tokens = hooked.to_tokens(PROMPTS[0])
    with torch.no_grad():
        both("log-probs", lambda m: m(tokens).log_softmax(-1))
    both(
        "neuron_importance (layers 27-29)",
        lambda m: neuron_importance(m, PROMPTS, layers=LAYERS).scores,
    )
    both(
        "compare_neurons vs head (29,0) ablated",
        lambda m: compare_neurons(m, PROMPTS, HeadAblation([(29, 0)]), layers=LAYERS).delta,
    )
    heads = [(29, 0), (29, 4), (20, 1), (10, 2)]
    both(
        "head_sweep logprob (4 heads)",
        lambda m: head_sweep(m, PROMPTS, heads=heads, progress=False).logprob,
    )

    def edited(m):
        with intervene(m, NeuronEdit([(5, 10), (29, 3)]), HeadAblation([(3, 1)])), torch.no_grad():
            return m(tokens).log_softmax(-1)

    both("intervene (neurons + head) log-probs", edited)
    for m, label in ((hooked, "hooked"), (bridge, "bridge")):
        r = check_model(m)
        print(
            f"check_model {label}: residual {r.residual:.1e} heads {r.heads:.1e} "
            f"neurons {r.neurons:.1e}"
        )
    left = sum(len(hp._forward_hooks) for hp in bridge.hook_dict.values())
    print(f"hooks left on the bridge: {left}")


if __name__ == "__main__":
    main()
